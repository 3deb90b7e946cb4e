"""Fixtures and session setup. The tolerance table and the comparison helper live in ``helpers.py``
(``from helpers import assert_close``)."""
from __future__ import annotations

import os
import tempfile

from fastconv.config import cache_folder  # noqa: E402  (the one cache-folder rule)

# The harness's build cache is content-addressed, so sharing it between runs is safe and saves the compiles:
# pin it to the user's folder before the per-run folder below would move it.
os.environ.setdefault("FASTCONV_EMU_CACHE", str(cache_folder("emu")))
# Tests must not read or write the user's autotune cache (~/.cache/fastconv): a folder per test process. The
# pytest-xdist workers inherit the controller's environment; each makes a folder of its own (a choice stored by one
# worker's test would otherwise be found by another's test that expects to tune), unless the user set one.
if os.environ.get("FASTCONV_CACHE_DIR", "") in ("", os.environ.get("_FASTCONV_TEST_CACHE_DIR")):
    os.environ["FASTCONV_CACHE_DIR"] = os.environ["_FASTCONV_TEST_CACHE_DIR"] = \
        tempfile.mkdtemp(prefix="fastconv-test-cache-")


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): one test process per core, at most 4. The tests are mostly single calls
    on small tensors and Numba compiles, one core's work each: on this project's 2-core machine two processes ran
    the suite in 663 s from an empty Numba cache (one process: 1182-1233 s) and 380 s from a warm one (kernels
    compiled in parallel into the shared cache). More than 4 would mostly repeat compiles and hold memory (about
    1 GB a process)."""
    return max(1, min(4, os.cpu_count() or 1))

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
