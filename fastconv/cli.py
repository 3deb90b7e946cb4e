"""The ``fastconv`` command: ``fastconv bench | flops | train | info``.

Each subcommand lives in its own module under :mod:`fastconv.commands` exposing
``add_arguments(parser)`` and ``run(args) -> int``; they are imported only when used, so
``fastconv info`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "bench": "run the layer benchmark suite: fastconv algorithms vs torch, per pass",
    "flops": "count MACs/FLOPs/parameters of a zoo model, or compare textbook designs",
    "train": "train LeNet-5 built from fastconv layers on scikit-learn's digits",
    "info": "versions, threading layer, algorithms, backends",
    "gpu-check": "the prepared device check: GPU tests + quick GPU benchmark -> one JSON and one log (--emulate: CPU harness)",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastconv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"fastconv.commands.{name.replace('-', '_')}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return int(importlib.import_module(f"fastconv.commands.{args.command.replace('-', '_')}").run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
