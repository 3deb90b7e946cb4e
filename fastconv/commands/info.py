"""``fastconv info``: what this installation runs on, and where it is broken when it is.

Every probe runs on its own and reports its failure in one line instead of stopping the report, so
the command is the place to diagnose an install (threading layer and the TBB it loaded, caches, CuPy
and NVRTC, the algorithms). When the package itself cannot be imported, the console script
(:mod:`fastconv_cli`) prints a shorter report of the installed distributions instead.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-kernel", action="store_true",
                        help="do not run a small convolution (it starts Numba's threading layer)")


def _probe(label: str, fn) -> bool:
    try:
        text = fn()
    except Exception as error:  # noqa: BLE001 - report and go on: this command diagnoses broken installs
        print(f"{label}: FAILED: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        return False
    print(f"{label}: {text}")
    return True


def _versions() -> str:
    from importlib import metadata

    import fastconv

    parts = [f"fastconv {fastconv.__version__}"]
    for dist in ("torch", "numba", "numpy", "scipy", "tbb"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} -")
    return "  ".join(parts) + f"  python {platform.python_version()} ({sys.executable})"


def _threading(run_kernel: bool) -> str:
    import numba
    import torch

    from fastconv import config

    if run_kernel:
        import fastconv

        fastconv.functional.conv2d(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3), algo="direct")
        layer = numba.threading_layer()
    else:
        layer = "not started (--no-kernel)"
    t = config.THREADING
    lock = ", parallel launches serialised by a lock" if t["needs_lock"] else ""
    from fastconv.cpu import jit_gemm

    return (f"layer {layer} (asked for {t['layer']}{lock}); TBB: {t['tbb_path'] or 'not loaded'} "
            f"({t['reason']}); threads: torch {torch.get_num_threads()}, numba {numba.get_num_threads()}; "
            f"GEMMs: {_gemm_route(jit_gemm)}")


def _gemm_route(jit_gemm) -> str:
    """Which code runs the CPU kernels' GEMMs: fastconv's own AVX-512 or AVX2 kernels, or a library."""
    from fastconv.cpu import im2col_fused, micro_gemm

    library = jit_gemm.SOURCE or "none found"
    if jit_gemm.own_gemm_in_use():
        isa = "AVX-512" if micro_gemm.HOST_HAS_AVX512 else "AVX2"
        return f"fastconv's own {isa} kernels (fallback library: {library})"
    if jit_gemm.default_own_gemm("auto") is False and micro_gemm.HOST_HAS_VECTOR_FMA:
        limit_mb = im2col_fused.SMALL_ON_OWN_MAX_WEIGHT_BYTES / 2**20
        small = (f"except dense convs with at most {limit_mb:g} MB of weights, which take the own gather and taps "
                 "kernels" if im2col_fused.SMALL_ON_OWN else "the own kernels are off")
        why = (f"{small}: MKL runs its AVX-512 code on this Intel CPU and was the faster; FASTCONV_JIT_GEMM=own "
               "switches")
    else:
        why = "the own kernels are off: no AVX2 with FMA, or FASTCONV_JIT_GEMM chose a library"
    return f"library ({library}; {why})"


def _caches() -> str:
    from fastconv import autotune

    numba_dir = os.environ.get("NUMBA_CACHE_DIR") or "beside the kernel modules (__pycache__)"
    return f"autotune {autotune.cache_path()}; Numba {numba_dir}"


def _cuda() -> str:
    import importlib.util

    import torch

    have_cupy = importlib.util.find_spec("cupy") is not None
    # find_spec of a submodule raises when its parent package is missing: look for the parent first.
    have_nvrtc = importlib.util.find_spec("nvidia") is not None and \
        importlib.util.find_spec("nvidia.cuda_nvrtc") is not None
    gpu = torch.cuda.is_available()
    hint = "" if have_cupy else " (pip install 'fastconv[cuda]' for the CUDA kernels)"
    return (f"torch sees a GPU: {gpu}; CuPy: {'yes' if have_cupy else 'no'}; "
            f"NVRTC wheel: {'yes' if have_nvrtc else 'no'}{hint}")


def _backend() -> str:
    from fastconv import backends

    return f"{backends.current()} (FASTCONV_BACKEND={os.environ.get('FASTCONV_BACKEND', 'unset')})"


def run(args: argparse.Namespace) -> int:
    ok = True
    ok &= _probe("versions", _versions)
    ok &= _probe("threading", lambda: _threading(not args.no_kernel))
    ok &= _probe("caches", _caches)
    ok &= _probe("CPU backend", _backend)
    ok &= _probe("CUDA", _cuda)
    print("algorithms:")

    def algorithms() -> str:
        import fastconv

        rows = fastconv.algorithms()
        for row in rows:
            # Rows of the other op families (transposed, separable) name theirs; conv rows read as before.
            family = "" if row["family"] == "conv" else f"[{row['family']}] "
            print(f"  {row['name']:<15} {'/'.join(row['targets']):<18} {family}{row['summary']}")
        return f"{len(rows)} registered"

    ok &= _probe("algorithms", algorithms)
    return 0 if ok else 1
