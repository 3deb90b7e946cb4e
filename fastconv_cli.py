"""The ``fastconv`` console script: ``fastconv bench | flops | train | info | gpu-check``.

Why this module sits beside the package instead of inside it: importing anything under ``fastconv``
runs the package's ``__init__``, which imports torch and registers the ops (about 1.5 s). Here
``fastconv --help`` and ``fastconv --version`` answer without importing torch, and a subcommand's module
(:mod:`fastconv.commands.<name>`, exposing ``add_arguments(parser)`` and ``run(args) -> int``) is
imported only when that subcommand runs. ``fastconv info`` still answers when the package itself cannot
be imported (a broken install), which is when it is needed most.
"""
from __future__ import annotations

import argparse
import sys

#: name -> (module under fastconv.commands, one-line help)
COMMANDS = {
    "bench": ("bench", "run the layer benchmark suite: fastconv algorithms vs torch, per pass"),
    "flops": ("flops", "count MACs/FLOPs/parameters of a zoo model, or compare textbook designs"),
    "train": ("train", "train LeNet-5 built from fastconv layers on scikit-learn's digits"),
    "info": ("info", "versions, threading layer, caches, backends, algorithms: diagnose an install"),
    "gpu-check": ("gpu_check", "the prepared device check: GPU tests + quick GPU benchmark -> one JSON and one "
                               "log (--emulate: on the CPU harness)"),
}


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("fastconv")
    except metadata.PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        return "unknown (not installed)"


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastconv", description="fastconv: convolution and pooling kernels "
                                     "for PyTorch. Run 'fastconv COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"fastconv {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _broken_install_report(error: BaseException) -> int:
    """``fastconv info`` when ``import fastconv`` itself fails: what is installed and what broke."""
    import platform
    from importlib import metadata

    print(f"fastconv {_version()}: the package cannot be imported: {type(error).__name__}: {error}")
    print(f"python {platform.python_version()} at {sys.executable} (prefix {sys.prefix})")
    for dist in ("torch", "numba", "llvmlite", "numpy", "scipy", "tbb", "threadpoolctl", "cupy-cuda13x",
                 "nvidia-cuda-nvrtc"):
        try:
            print(f"  {dist:<18} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            print(f"  {dist:<18} not installed")
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        parser = _top_parser()
        if command is None and not argv:
            parser.print_help()
            return 2
        parser.parse_args(argv)  # prints help/version/an unknown-command error and exits
        return 2
    module_name, help_text = COMMANDS[command]
    import importlib

    try:
        module = importlib.import_module(f"fastconv.commands.{module_name}")
    except Exception as error:  # noqa: BLE001 - a broken install: diagnose instead of a traceback
        if command == "info":
            return _broken_install_report(error)
        print(f"fastconv {command}: cannot import fastconv ({type(error).__name__}: {error}); "
              f"run 'fastconv info' to diagnose the install", file=sys.stderr)
        return 1
    parser = argparse.ArgumentParser(prog=f"fastconv {command}", description=help_text)
    module.add_arguments(parser)
    rest = argv[:argv.index(command)] + argv[argv.index(command) + 1:]
    args = parser.parse_args(rest)
    args.command = command
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
