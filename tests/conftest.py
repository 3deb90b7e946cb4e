"""Fixtures and session setup. The tolerance table and the comparison helper live in ``helpers.py``
(``from helpers import assert_close``)."""
from __future__ import annotations

import os
import tempfile

from fastconv.config import cache_folder  # noqa: E402  (the one cache-folder rule)

# The harness's build cache is content-addressed, so sharing it between runs is safe and saves the compiles:
# pin it to the user's folder before the per-run folder below would move it.
os.environ.setdefault("FASTCONV_EMU_CACHE", str(cache_folder("emu")))
# Tests must not read or write the user's autotune cache (~/.cache/fastconv): a per-run folder.
os.environ.setdefault("FASTCONV_CACHE_DIR", tempfile.mkdtemp(prefix="fastconv-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_report_header(config):
    import fastconv

    return f"fastconv {fastconv.__version__} from {os.path.dirname(fastconv.__file__)}"


if os.environ.get("FASTCONV_EXPECT_INSTALLED"):
    # CI tests the wheel a user installs, not the source tree: a file the wheel lacks must fail here.
    import fastconv as _installed

    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.abspath(_installed.__file__).startswith(os.path.join(_here, "fastconv")):
        raise pytest.UsageError(f"FASTCONV_EXPECT_INSTALLED is set but fastconv was imported from the source "
                                f"tree ({_installed.__file__}); run the console script 'pytest', not "
                                f"'python -m pytest', so that the installed package is tested")

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def emu_available() -> bool:
    return os.environ.get("FASTCONV_BACKEND") == "cuda-emu"
