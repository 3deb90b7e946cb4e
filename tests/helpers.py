"""THE test helpers: the tolerance table (from :mod:`fastconv.tolerances`, shared with the benchmark) and
the one comparison, which reports the worst element and where it is.

    from helpers import assert_close, tolerance
"""
from __future__ import annotations

import numpy as np
import torch

from fastconv.tolerances import ALGORITHM_TOLERANCES, TOLERANCES, tolerance  # noqa: F401  (re-exported)


def _as_tensor(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a)) if not isinstance(a, torch.Tensor) else a.detach()


def assert_close(actual, expected, *, algo: str = "auto", what: str = "", rtol: float | None = None,
                 atol: float | None = None, equal_nan: bool = True) -> None:
    """Shape, dtype and values equal within the table's tolerance; on failure name the worst element.

    ``actual``/``expected``: tensors or numpy arrays (mixed is fine). The bound is
    ``atol + rtol * |expected|`` from :func:`tolerance` for ``expected``'s dtype and ``algo``;
    ``rtol``/``atol`` override it where a test is stricter (bit-exact kernels) or says why it is looser.
    NaN must sit where the reference has NaN (``equal_nan``); infinities must match exactly.
    """
    actual, expected = _as_tensor(actual), _as_tensor(expected)
    where = f"{what}: " if what else ""
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{where}shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    assert actual.dtype == expected.dtype, f"{where}dtype {actual.dtype} != {expected.dtype}"
    if actual.numel() == 0:
        return
    if expected.is_floating_point():
        tol = dict(tolerance(expected.dtype, algo))
    else:
        tol = dict(rtol=0.0, atol=0.0)  # integers (indices, integer pooling) compare exactly
    if rtol is not None:
        tol["rtol"] = rtol
    if atol is not None:
        tol["atol"] = atol
    a, e = actual.to(torch.float64), expected.to(torch.float64)
    err = (a - e).abs()
    bound = tol["atol"] + tol["rtol"] * e.abs()
    same_inf = a.isinf() & (a == e)
    bad = (err > bound) & ~same_inf
    nan_mismatch = (a.isnan() != e.isnan()) if equal_nan else (a.isnan() | e.isnan())
    bad = bad & ~a.isnan() & ~e.isnan()
    if bad.any() or nan_mismatch.any():
        score = torch.full_like(err, -torch.inf)
        score[bad] = (err - bound)[bad]
        score[nan_mismatch] = torch.inf
        idx = tuple(int(i) for i in torch.unravel_index(score.argmax(), score.shape))
        raise AssertionError(
            f"{where}{int(bad.sum() + nan_mismatch.sum())} of {actual.numel()} elements differ; worst at {idx}: "
            f"got {actual[idx].item()!r}, expected {expected[idx].item()!r} (tolerance {tol})")


def allocations(monkeypatch, module, call) -> list[int]:
    """The sizes (bytes) of the arrays ``call()`` allocates through ``module.np.empty`` or the cache-line aligned
    ``fastconv.cpu.memory.empty_aligned`` (its array's size, not the few bytes of slack it allocates to align it),
    in order."""
    from fastconv.cpu import memory

    allocated = []
    real_empty = module.np.empty
    real_aligned = memory.empty_aligned
    inside_aligned = []

    def counting_empty(shape, dtype=float, *a, **k):
        out = real_empty(shape, dtype, *a, **k)
        if not inside_aligned:
            allocated.append(out.nbytes)
        return out

    def counting_aligned(shape, dtype):
        inside_aligned.append(1)
        try:
            out = real_aligned(shape, dtype)
        finally:
            inside_aligned.pop()
        allocated.append(out.nbytes)
        return out

    with monkeypatch.context() as m:
        m.setattr(module.np, "empty", counting_empty)
        m.setattr(memory, "empty_aligned", counting_aligned)
        call()
    return allocated


def bytes_allocated(monkeypatch, module, call) -> int:
    """Bytes that ``call()`` allocates through ``module.np.empty`` (a kernel module's workspace, to compare with what
    the registry reports)."""
    return sum(allocations(monkeypatch, module, call))


def assert_same_nonfinite(reference: torch.Tensor, actual: torch.Tensor, what: str, rtol: float) -> None:
    """``actual`` has NaN, +Inf and -Inf exactly where ``reference`` has them, and its other values agree to
    ``rtol`` of the reference's largest finite magnitude (the non-finite suites' comparison)."""
    actual = actual.to(reference.dtype)
    for mask, name in ((torch.isnan, "NaN"), (torch.isposinf, "+Inf"), (torch.isneginf, "-Inf")):
        rm, am = mask(reference), mask(actual)
        if not torch.equal(rm, am):
            where = (rm != am).nonzero()[:3].tolist()
            raise AssertionError(f"{what}: {name} pattern differs (reference {int(rm.sum())}, "
                                 f"fastconv {int(am.sum())}; first differences at {where})")
    fin = torch.isfinite(reference)
    assert torch.isfinite(actual[fin]).all(), f"{what}: non-finite values where the reference is finite"
    if fin.any():
        scale = reference[fin].abs().max().clamp_min(1e-30)
        err = ((reference[fin] - actual[fin]).abs().max() / scale).item()
        assert err < rtol, f"{what}: finite values differ by {err:.3g} of the scale"
