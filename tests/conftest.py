"""Shared test helpers: the tolerance table and a comparison that reports the worst element."""
from __future__ import annotations

import os
import tempfile

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

# Tolerances per dtype (and algorithm where one needs its own). float64 is the reference dtype: every
# op is checked against torch's CPU op in float64.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    # Half dtypes are computed in float32 and rounded once, and compared with torch's float32 op on the same
    # (half-rounded) inputs, rounded once: torch's own default comparison tolerances for these dtypes
    # (torch.testing._comparison._DTYPE_PRECISIONS; one rounding is at most 2**-11 resp. 2**-8 relative).
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
}
ALGORITHM_TOLERANCES = {
    # Winograd F(4x4,3x3) loses more precision in float32 (DESIGN.md §4: about 3e-5 worse).
    ("winograd4", torch.float32): dict(rtol=5e-4, atol=5e-4),
}


def tolerance(dtype: torch.dtype, algo: str = "auto") -> dict:
    return ALGORITHM_TOLERANCES.get((algo, dtype), TOLERANCES[dtype])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, algo: str = "auto", what: str = "") -> None:
    """Shape, dtype and values equal within the table's tolerance; on failure name the worst element."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    tol = tolerance(expected.dtype, algo)
    if actual.numel() == 0:
        return
    actual, expected = actual.detach(), expected.detach()
    err = (actual - expected).abs()
    bound = tol["atol"] + tol["rtol"] * expected.abs()
    bad = err > bound
    nan_mismatch = actual.isnan() != expected.isnan()
    if bad.any() or nan_mismatch.any():
        score = torch.where(nan_mismatch, torch.inf, (err - bound).nan_to_num(nan=0.0))
        idx = tuple(int(i) for i in torch.unravel_index(score.argmax(), score.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum() + nan_mismatch.sum())} of {actual.numel()} elements differ; worst at {idx}: "
            f"got {actual[idx].item()!r}, expected {expected[idx].item()!r} (tolerance {tol})")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def emu_available() -> bool:
    return os.environ.get("FASTCONV_BACKEND") == "cuda-emu"
