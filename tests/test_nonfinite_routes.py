"""Non-finite inputs and output gradients on the routes real layers take: the NaN/+-Inf pattern is torch's exact one.

Why this file: the forward and input-gradient passes of the pair-forming kernels (direct, im2col's routes,
depthwise, shift, group_lanes, the channels-last kernels) skip reading their result when the weight is finite
(:func:`fastconv.cpu.nonfinite.exact`, ``finite_b_suffices``): that is exact only if every kept output sums torch's
pairs plus padding zeros times weights -- no zero weight taps of a kernel's own, no lanes mixing channels, no
dropped junk positions leaking into kept ones. :mod:`tests.test_nonfinite` checks the semantics on tiny maps, which
the fast routes (gather, taps, thin-input stems, channel-blocked depthwise, lane-packed groups) never take; here the
maps are large enough for them, with the route switches flipped as well, and the non-finite values sit at borders,
corners, row ends and inside.

The reference is exact by construction: the operand with its non-finite values zeroed, through torch's float64
kernels, then the special values laid over where their pair counts (0/1 masks through the same kernels, so padding
counts nothing) say -- the semantics of :func:`fastconv.cpu.nonfinite.exact`.
"""
from __future__ import annotations

import os

import pytest
import torch

import fastconv.functional as F
from fastconv.cpu import im2col_fused, nonfinite, thin_input
from helpers import assert_same_nonfinite

# The kernels under test are the Numba ones; under FASTCONV_BACKEND=cuda-emu the CPU tensors go to the emulated CUDA
# kernels, which check their outputs themselves (tests/test_cuda_emu.py).
pytestmark = pytest.mark.skipif(os.environ.get("FASTCONV_BACKEND", "numba") != "numba",
                                reason="the Numba kernels' non-finite rule; this run's backend is not numba")

INF = float("inf")
NAN = float("nan")


def _overlay(linear, a: torch.Tensor, w: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``base`` (float64, the finite part) with the special values that ``a``'s non-finite elements make, paired with
    the finite weight ``w`` through the bilinear ``linear(a_like, w_like)``."""
    pinf, minf, nan = (a == INF).double(), (a == -INF).double(), torch.isnan(a).double()
    wp, wn, wz = (w > 0).double(), (w < 0).double(), (w == 0).double()
    pos = linear(pinf, wp) + linear(minf, wn)
    neg = linear(pinf, wn) + linear(minf, wp)
    nan_terms = linear(nan, torch.ones_like(wp)) + linear(pinf + minf, wz)
    out = base.clone()
    out[pos > 0.5] = INF
    out[neg > 0.5] = -INF
    out[(pos > 0.5) & (neg > 0.5)] = NAN
    out[nan_terms > 0.5] = NAN
    return out


def _reference(x, w, go, kw):
    """float64 exact forward (x non-finite) and input gradient (go non-finite), w finite."""
    x64, w64, go64 = x.double(), w.double(), go.double()

    def fwd(a, b):
        return torch.nn.functional.conv2d(a, b, **kw)

    def gin(a, b):
        return torch.nn.grad.conv2d_input(x.shape, b, a, **kw)

    y = _overlay(fwd, x64, w64, fwd(x64.where(torch.isfinite(x64), 0.0), w64))
    gx = _overlay(gin, go64, w64, gin(go64.where(torch.isfinite(go64), 0.0), w64))
    return y, gx


def _spoil(t: torch.Tensor, seed: int) -> torch.Tensor:
    """``t`` with +Inf, -Inf and NaN at its corners, row ends, first and last columns and a few inner places."""
    t = t.clone()
    N, C, H, W = t.shape
    gen = torch.Generator().manual_seed(seed)
    places = [(0, 0, 0, 0), (N - 1, C - 1, H - 1, W - 1), (0, C // 2, H // 2, W - 1), (N - 1, 0, H - 1, 0),
              (0, C - 1, 0, W // 2), (N - 1, C // 3, H // 3, 1)]
    for _ in range(6):
        places.append(tuple(int(torch.randint(0, n, (1,), generator=gen)) for n in (N, C, H, W)))
    values = [INF, -INF, NAN]
    for i, p in enumerate(places):
        t[p] = values[i % 3]
    return t


def _compare(ref: torch.Tensor, got: torch.Tensor, what: str) -> None:
    assert torch.isfinite(ref).any(), f"{what}: the case spoils every output; it tests nothing finite"
    assert_same_nonfinite(ref, got.double(), what, rtol=1e-4)


# (algo, N, C, K, H, kernel size, conv kwargs, channels_last): maps sized for the routes real layers take
CASES = {
    "im2col 32->32 3x3 32x32 (gather)": ("im2col", 2, 32, 32, 32, 3, dict(padding=1), False),
    "im2col 16->64 3x3 30x30 (narrow input)": ("im2col", 2, 16, 64, 30, 3, dict(padding=1), False),
    "im2col 64->64 3x3 8x8": ("im2col", 4, 64, 64, 8, 3, dict(padding=1), False),
    "im2col 32->64 3x3 stride 2": ("im2col", 2, 32, 64, 32, 3, dict(stride=2, padding=1), False),
    "im2col 16->32 5x5 15x15": ("im2col", 4, 16, 32, 15, 5, dict(padding=2), False),
    "im2col 3->16 3x3 stride 2 (thin-input stem)": ("im2col", 2, 3, 16, 64, 3, dict(stride=2, padding=1), False),
    "im2col 3->16 7x7 stride 2 (taps stem)": ("im2col", 2, 3, 16, 64, 7, dict(stride=2, padding=3), False),
    "im2col 3->24 7x7 stride 2 unpadded": ("im2col", 2, 3, 24, 61, 7, dict(stride=2), False),
    "im2col 8->16 3x3 dilation 2": ("im2col", 2, 8, 16, 20, 3, dict(padding=2, dilation=2), False),
    "im2col 32->32 3x3 channels_last": ("im2col", 2, 32, 32, 16, 3, dict(padding=1), True),
    "im2col 32->64 3x3 stride 2 channels_last": ("im2col", 2, 32, 64, 16, 3, dict(stride=2, padding=1), True),
    "direct 16->16 3x3": ("direct", 2, 16, 16, 12, 3, dict(padding=1), False),
    "depthwise 32 3x3 16x16": ("depthwise", 2, 32, 32, 16, 3, dict(padding=1, groups=32), False),
    "depthwise 32 3x3 stride 2 17x17": ("depthwise", 2, 32, 32, 17, 3, dict(stride=2, padding=1, groups=32), False),
    "depthwise 48 5x5 12x12": ("depthwise", 2, 48, 48, 12, 5, dict(padding=2, groups=48), False),
    "depthwise 96 3x3 8x8 (channel blocks)": ("depthwise", 4, 96, 96, 8, 3, dict(padding=1, groups=96), False),
    "depthwise 100 3x3 stride 2 7x7 (last block partial)": ("depthwise", 2, 100, 100, 7, 3,
                                                            dict(stride=2, padding=1, groups=100), False),
    "depthwise 16 -> 32 (multiplier 2)": ("depthwise", 2, 16, 32, 14, 3, dict(padding=1, groups=16), False),
    "depthwise 32 3x3 channels_last": ("depthwise", 2, 32, 32, 16, 3, dict(padding=1, groups=32), True),
    "group_lanes 64 in groups of 8": ("group_lanes", 2, 64, 64, 16, 3, dict(padding=1, groups=8), False),
    "group_lanes 64 in groups of 8 stride 2": ("group_lanes", 2, 64, 64, 16, 3, dict(stride=2, padding=1, groups=8),
                                                False),
    "shift 64 in groups of 4": ("shift", 2, 64, 64, 16, 3, dict(padding=1, groups=16), False),
    "shift 48 in groups of 8 stride 2": ("shift", 2, 48, 48, 15, 3, dict(stride=2, padding=1, groups=6), False),
}

#: The im2col route switches (module flags the kernels read per call): every route a geometry can take.
SWITCHES = {
    "default": {},
    "no gather": {(im2col_fused, "GATHER"): False},
    "no taps, no gather": {(im2col_fused, "GATHER"): False, (im2col_fused, "TAPS"): False},
    "plain columns": {(im2col_fused, "ENABLED"): False, (thin_input, "ENABLED"): False},
}


@pytest.mark.parametrize("switches", list(SWITCHES))
@pytest.mark.parametrize("case", list(CASES))
def test_nonfinite_input_and_gradient_on_the_layer_routes(case, switches, monkeypatch):
    algo, N, C, K, H, k, kw, channels_last = CASES[case]
    if switches != "default" and algo != "im2col":
        pytest.skip(f"the route switches {switches!r} are im2col's; {algo} has one route per geometry")
    for (module, flag), value in SWITCHES[switches].items():
        monkeypatch.setattr(module, flag, value)
    assert nonfinite.FINITE_B_RULE  # the rule under test is on
    gen = torch.Generator().manual_seed(11)
    groups = kw.get("groups", 1)
    x = torch.randn(N, C, H, H, generator=gen)
    w = torch.randn(K, C // groups, k, k, generator=gen)
    y_shape = torch.nn.functional.conv2d(x, w, **kw).shape
    go = torch.randn(y_shape, generator=gen)
    xs, gos = _spoil(x, 1), _spoil(go, 2)
    if channels_last:
        xs, gos = xs.to(memory_format=torch.channels_last), gos.to(memory_format=torch.channels_last)
    want_y, want_gx = _reference(xs, w, gos, kw)
    xr = xs.detach().clone().requires_grad_()
    y = F.conv2d(xr, w, algo=algo, **kw)
    (gx,) = torch.autograd.grad(y, xr, gos)
    _compare(want_y, y.detach(), f"{case}, {switches}, forward")
    _compare(want_gx, gx, f"{case}, {switches}, input gradient")


@pytest.mark.parametrize("algo, kw, groups", [("im2col", dict(padding=1), 1), ("depthwise", dict(padding=1), 8)])
def test_nonfinite_float64_on_the_layer_routes(algo, kw, groups):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 16, 16, generator=gen, dtype=torch.float64)
    w = torch.randn(8, 8 // groups, 3, 3, generator=gen, dtype=torch.float64)
    kw = dict(kw, groups=groups)
    go = torch.randn(torch.nn.functional.conv2d(x, w, **kw).shape, generator=gen, dtype=torch.float64)
    xs, gos = _spoil(x, 3), _spoil(go, 4)
    want_y, want_gx = _reference(xs, w, gos, kw)
    xr = xs.clone().requires_grad_()
    y = F.conv2d(xr, w, algo=algo, **kw)
    (gx,) = torch.autograd.grad(y, xr, gos)
    _compare(want_y, y.detach(), f"{algo} float64 forward")
    _compare(want_gx, gx, f"{algo} float64 input gradient")


def test_a_nonfinite_weight_still_takes_the_exact_path():
    """With the weight not finite the rule proves nothing: padding pairs (0 x Inf) must not leak NaN."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 32, 32, 32, generator=gen)
    w = torch.randn(32, 32, 3, 3, generator=gen)
    w[3, 5, 0, 0] = INF  # reaches the border outputs only through padding there
    want = torch.nn.functional.conv2d(x, w, padding=1)  # torch's float32 stride-1 kernel: exact pairs
    got = F.conv2d(x, w, padding=1, algo="im2col")
    assert torch.equal(torch.isnan(want), torch.isnan(got)) and torch.equal(torch.isinf(want), torch.isinf(got))
    assert torch.isposinf(got[:, 3]).any() and not torch.isnan(got).any()
