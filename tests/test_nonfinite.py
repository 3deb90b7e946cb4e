"""Non-finite and large operands: every CPU algorithm gives the exact NaN/+-Inf pattern in every pass.

The semantics is the exact sum over the pairs that exist: padding contributes no term, so a NaN
weight tap reaches only the outputs whose window covers a real input element with it. torch's
float32 CPU convolution (oneDNN) does exactly that for stride-1 convolutions (checked here too), but
its other paths (float64, strided or grouped convolutions: an im2col with stored zeros) multiply
padding zeros by the weights and spread NaN over outputs that do not depend on it. So the reference
is :func:`_exact_conv2d`, an unfold in float64 whose padded products are masked out (not multiplied),
differentiated by autograd. Where results are finite they must agree to a loose tolerance; the
large-operand cases are scaled so that the exact result is finite in float32.
"""
from __future__ import annotations

import pytest
import torch

import fastconv
import fastconv.functional as F
from helpers import assert_same_nonfinite

INF = float("inf")
NAN = float("nan")


def _cpu_algorithms():
    return [row["name"] for row in fastconv.algorithms() if "numba" in row["targets"] and row["family"] == "conv"]


def _cases(x, w, g):
    """name -> (x, w, grad_out): one special value each, interior and border positions."""
    out = {}

    def put(t, idx, v):
        t = t.clone()
        t[idx] = v
        return t

    out["inf pixel"] = (put(x, (0, 0, 3, 4), INF), w, g)
    out["-inf pixel"] = (put(x, (1, 1, 0, 0), -INF), w, g)
    out["nan pixel"] = (put(x, (0, 1, 4, 4), NAN), w, g)
    # read by no window where the geometry skips the last row and column (stride 3 on 13 pixels)
    out["nan last pixel"] = (put(x, (1, 0, -1, -1), NAN), w, g)
    out["inf and -inf pixels"] = (put(put(x, (0, 0, 3, 4), INF), (0, 1, 3, 5), -INF), w, g)
    out["inf weight"] = (x, put(w, (1, 0, 1, 2), INF), g)
    out["-inf weight corner"] = (x, put(w, (0, 0, 2, 2), -INF), g)
    out["nan weight tap"] = (x, put(w, (1, 0, 0, 0), NAN), g)
    out["zero weight with inf pixel"] = (put(x, (0, 0, 2, 2), INF), put(w, (0, 0, 1, 1), 0.0), g)
    out["inf grad border"] = (x, w, put(g, (0, 1, 0, 0), INF))
    out["nan grad"] = (x, w, put(g, (1, 0, 2, 3), NAN))
    # large but finite: the exact results stay below float32's 3.4e38 (Winograd's transforms do not)
    out["large input 1e36"] = (x * 1e36, w * 1e-2, g)
    out["large input 3e37"] = (x * 3e37, w * 1e-3, g * 1e-3)
    out["large weight 3e36"] = (x, w * 3e36, g * 1e-2)
    out["large grad 1e36"] = (x * 1e-2, w * 1e-2, g * 1e36)
    return out


def _exact_conv2d(x, w, stride=1, padding=0, groups=1):
    """Reference conv2d summing only existing pairs (float64; padded positions masked, not multiplied)."""
    N, C, H, W = x.shape
    K, Cg, KH, KW = w.shape
    G = groups
    unf = dict(kernel_size=(KH, KW), stride=stride, padding=padding)
    col = torch.nn.functional.unfold(x.double(), **unf)  # (N, C*KH*KW, L)
    valid = torch.nn.functional.unfold(torch.ones(1, C, H, W, dtype=torch.float64), **unf) > 0.5
    L = col.shape[-1]
    col = col.view(N, G, Cg * KH * KW, 1, L)
    valid = valid.view(1, G, Cg * KH * KW, 1, L)
    wg = w.double().reshape(G, K // G, Cg * KH * KW).transpose(1, 2).reshape(1, G, Cg * KH * KW, K // G, 1)
    prod = torch.where(valid, col * wg, torch.zeros((), dtype=torch.float64))
    OH = (H + 2 * padding - KH) // stride + 1
    OW = (W + 2 * padding - KW) // stride + 1
    return prod.sum(2).reshape(N, K, OH, OW)


def _passes(fn, x, w, g, **kw):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w, **kw)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    return {"forward": y.detach(), "grad_input": gx, "grad_weight": gw}


def _compare(ref: dict, got: dict, what: str) -> None:
    for pass_, r in ref.items():
        assert_same_nonfinite(r, got[pass_], f"{what}, {pass_}", rtol=1e-3)


GEOMETRIES = {
    "3x3 pad 1": dict(C=8, K=8, H=9, kw=dict(padding=1)),
    "3x3 stride 2 pad 1 groups 2": dict(C=8, K=6, H=9, kw=dict(stride=2, padding=1, groups=2)),
    "3x3 depthwise pad 1": dict(C=6, K=6, H=8, kw=dict(padding=1, groups=6)),
    "3x3 stride 3, last row unread": dict(C=4, K=4, H=13, kw=dict(stride=3)),
    # outputs larger than input and weight together: the forward's finiteness is read from the operands first
    "expanding 3x3 pad 1": dict(C=2, K=16, H=9, kw=dict(padding=1)),
    "expanding 3x3 pad 1 groups 2": dict(C=4, K=16, H=9, kw=dict(padding=1, groups=2)),
    # 8 channels per group (group_lanes), stride 2: the input gradient reads the output gradient spread by zeros
    "3x3 stride 2 pad 1 groups 2 x 8 wide": dict(C=16, K=16, H=7, kw=dict(stride=2, padding=1, groups=2)),
}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("algo", _cpu_algorithms())
def test_nonfinite_pattern_matches_torch(algo, geometry):
    spec = GEOMETRIES[geometry]
    kw = spec["kw"]
    groups = kw.get("groups", 1)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, spec["C"], spec["H"], spec["H"], generator=gen)
    w = torch.randn(spec["K"], spec["C"] // groups, 3, 3, generator=gen)
    y = torch.nn.functional.conv2d(x, w, **kw)
    g = torch.randn(y.shape, generator=gen)
    try:
        F.conv2d(x, w, algo=algo, **kw)
    except ValueError as e:
        pytest.skip(f"{algo} cannot run {geometry}: {e}")
    for name, (xc, wc, gc) in _cases(x, w, g).items():
        ref = {k: v.float() for k, v in _passes(_exact_conv2d, xc.double(), wc.double(), gc.double(),
                                                 **kw).items()}
        got = _passes(lambda a, b, **k: F.conv2d(a, b, algo=algo, **k), xc, wc, gc, **kw)
        _compare(ref, got, f"{algo}, {geometry}, {name}")
        if geometry == "3x3 pad 1":  # here torch's own float32 kernels follow the same semantics
            _compare(_passes(torch.nn.functional.conv2d, xc, wc, gc, **kw), got, f"{algo}, torch, {name}")


@pytest.mark.parametrize("algo", _cpu_algorithms())
def test_nonfinite_pattern_float64(algo):
    """float64 follows the same exact semantics."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 7, 7, generator=gen)
    w = torch.randn(4, 4, 3, 3, generator=gen)
    g = torch.randn(2, 4, 7, 7, generator=gen)
    kw = dict(padding=1)
    try:
        F.conv2d(x.double(), w.double(), algo=algo, **kw)
    except ValueError as e:
        pytest.skip(f"{algo} cannot run a dense 3x3 conv: {e}")
    for name, (xc, wc, gc) in _cases(x, w, g).items():
        if name.startswith("large"):
            continue  # float64 has no overflow at these scales; covered in float32
        ref = _passes(_exact_conv2d, xc.double(), wc.double(), gc.double(), **kw)
        got = _passes(lambda a, b, **k: F.conv2d(a, b, algo=algo, **k), xc.double(), wc.double(),
                      gc.double(), **kw)
        _compare(ref, got, f"{algo}, float64, {name}")


@pytest.mark.parametrize("algo", ["direct", "im2col", "winograd4", "shift"])
def test_nonfinite_bias(algo):
    """A non-finite bias makes its channel non-finite; +Inf bias meeting a -Inf term gives NaN."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 6, 6, generator=gen)
    x[0, 0, 2, 2] = -INF
    groups = 2 if algo == "shift" else 1  # shift runs grouped convs only
    w = torch.rand(4, 4 // groups, 3, 3, generator=gen) + 0.5  # positive: the -Inf pixel gives -Inf terms
    b = torch.tensor([INF, NAN, 0.0, -INF])
    ref = torch.nn.functional.conv2d(x, w, b, padding=1, groups=groups)
    got = F.conv2d(x, w, b, padding=1, groups=groups, algo=algo)
    _compare({"forward": ref}, {"forward": got}, f"{algo}, bias")


def test_max_abs_reports_nan_and_inf():
    import numpy as np

    from fastconv.cpu.nonfinite import all_finite, max_abs

    for dt in (np.float32, np.float64):
        a = np.arange(-100000, 100000, dtype=dt)
        assert max_abs(a) == 100000
        a[12345] = -np.inf
        assert max_abs(a) == np.inf
        a[54321] = np.nan
        assert np.isnan(max_abs(a))
        assert not all_finite(a)
        assert all_finite(np.ones(3, dt), None)
        assert max_abs(np.empty(0, dt)) == 0.0


def test_large_results_are_read_by_every_thread(monkeypatch):
    """Arrays of :data:`FINITE_PARALLEL_MIN` elements or more are read in claimed chunks: a NaN or an infinity in
    any chunk (its first, middle or last element, the array's very first and last) is found, in any dtype, in a
    channels-last view and beside a small operand; a forked child reads them serially."""
    import numpy as np

    from fastconv.cpu import nonfinite

    calls = []
    real = nonfinite._max_bits_claimed

    def counted(*a):
        calls.append(a[0].size)
        return real(*a)

    monkeypatch.setattr(nonfinite, "_max_bits_claimed", counted)
    n = nonfinite.FINITE_PARALLEL_MIN + 37
    chunk = n // nonfinite.FINITE_CHUNKS
    places = sorted({0, n - 1} | {c * chunk + d for c in range(nonfinite.FINITE_CHUNKS) for d in (0, chunk // 2)})
    for dt in (np.float16, np.float32, np.float64):
        a = np.linspace(-1, 1, n).astype(dt)
        small = np.ones(5, dt)
        assert nonfinite.all_finite(a) and nonfinite.all_finite(small, a, None)
        for i in places:
            for bad in (np.nan, np.inf, -np.inf):
                b = a.copy()
                b[i] = bad
                assert not nonfinite.all_finite(b), (dt, i, bad)
                assert not nonfinite.all_finite(small, b)
    assert calls and min(calls) == n
    x = np.random.default_rng(0).standard_normal((2, 3, 1, 150, 160)).astype(np.float32)
    cl = np.ascontiguousarray(np.transpose(x, (0, 2, 3, 4, 1))).transpose(0, 4, 1, 2, 3)  # channels-last view
    assert nonfinite.all_finite(cl)
    cl[1, 2, 0, 149, 159] = np.nan
    assert not nonfinite.all_finite(cl)
    calls.clear()
    monkeypatch.setattr(nonfinite.parallel, "SERIAL_ONLY", True)
    assert not nonfinite.all_finite(cl) and calls == []
