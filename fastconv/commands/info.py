"""``fastconv info``: what this installation runs on."""
from __future__ import annotations

import argparse
import platform


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    import numba
    import numpy
    import torch

    import fastconv
    from fastconv import backends

    F = fastconv.functional
    F.conv2d(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3))  # starts Numba's threading layer
    print(f"fastconv {fastconv.__version__}  torch {torch.__version__}  numba {numba.__version__}  "
          f"numpy {numpy.__version__}  python {platform.python_version()}")
    print(f"threads: torch {torch.get_num_threads()}, numba {numba.get_num_threads()} "
          f"(threading layer {numba.threading_layer()})")
    print(f"CPU backend: {backends.current()}   CUDA available to torch: {torch.cuda.is_available()}")
    print("algorithms:")
    for row in fastconv.algorithms():
        print(f"  {row['name']:<12} {'/'.join(row['targets']):<18} {row['summary']}")
    return 0
