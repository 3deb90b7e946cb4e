"""The ``fastconv`` command, for code that imports it from the package (``python -m fastconv``, tests).

The implementation is the top-level module :mod:`fastconv_cli`, which the console script runs without
importing this package (so ``fastconv --help`` does not import torch).
"""
from __future__ import annotations

import sys

from fastconv_cli import COMMANDS, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
