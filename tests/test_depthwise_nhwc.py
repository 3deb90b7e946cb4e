"""The depthwise kernels on channels-last operands (:mod:`fastconv.cpu.depthwise_nhwc`): read and written as they are.

Each geometry runs torch's conv and fastconv's ``algo="depthwise"`` in float64 on channels_last tensors: forward
and both gradients against torch, which passes the channels-last kernels ran (spied: the forward, and the input
gradient at stride 1), the result's layout, ``gradcheck`` and ``opcheck`` (the fake kernel's promised strides).
Geometries the kernels do not take (a channel count that is not whole vectors, a channel multiplier, a stride's
input gradient) are checked to fall back to the NCHW kernels with the same results.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import fastconv.functional as F
from fastconv.cpu import depthwise_nhwc
from helpers import assert_close

CL = torch.channels_last

# name -> (N, C, (H, W), K, (KH, KW), kwargs, passes the channels-last kernels run)
GEOMETRIES = {
    "7x7 pad 3": (2, 16, (9, 8), 16, (7, 7), dict(padding=3), {"forward", "grad_input"}),
    "3x3 pad 1 bias-free": (2, 8, (10, 7), 8, (3, 3), dict(padding=1), {"forward", "grad_input"}),
    "3x3 stride 2": (2, 16, (9, 11), 16, (3, 3), dict(stride=2, padding=1), {"forward"}),
    "5x5 stride (1, 3) dilation 2": (1, 8, (12, 13), 8, (5, 5), dict(stride=(1, 3), padding=(2, 4), dilation=2),
                                     {"forward"}),
    "asymmetric 3x5, no padding": (2, 24, (6, 9), 24, (3, 5), {}, {"forward", "grad_input"}),
    "batch 1, more rows than bands": (1, 8, (40, 5), 8, (3, 3), dict(padding=1), {"forward", "grad_input"}),
    "5x5 pad 2, rows of 19": (2, 16, (6, 19), 16, (5, 5), dict(padding=2), {"forward", "grad_input"}),
    "120 channels, 7x7 on 4x4 (8+4+2+1 vector tiles)": (2, 120, (4, 4), 120, (7, 7), dict(padding=3),
                                                         {"forward", "grad_input"}),
    "3x3 pad 4 (windows wholly in the padding)": (1, 16, (3, 5), 16, (3, 3), dict(padding=4), {"forward"}),
    "6 channels (not whole vectors)": (2, 6, (8, 8), 6, (3, 3), dict(padding=1), set()),
    "multiplier 2": (2, 8, (8, 8), 16, (3, 3), dict(padding=1), set()),
}


def _make(geometry):
    N, C, spatial, K, kernel, kw, _ = GEOMETRIES[geometry]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, C, *spatial, generator=gen, dtype=torch.float64).contiguous(memory_format=CL)
    w = torch.randn(K, 1, *kernel, generator=gen, dtype=torch.float64)
    b = None if "bias-free" in geometry else torch.randn(K, generator=gen, dtype=torch.float64)
    return x, w, b, dict(kw, groups=C)


@pytest.fixture
def spy(monkeypatch):
    """Names the channels-last kernels that ran."""
    ran = set()
    for name in ("forward", "grad_input"):
        real = getattr(depthwise_nhwc, name)

        def counted(*a, _real=real, _name=name, **k):
            ran.add(_name)
            return _real(*a, **k)

        monkeypatch.setattr(depthwise_nhwc, name, counted)
    return ran


@pytest.mark.parametrize("route", ["window", "taps", "clipped", "chosen"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_matches_torch_in_place(geometry, route, spy, monkeypatch):
    """Forward and every gradient against torch in float64, results channels_last, on each kernel: stride-1
    undilated rows on the window tiles (each row's inputs loaded once for all its taps; rows of 8 or more
    positions), the tap-by-tap tiles (both over a padded copy), the clipped kernel (only the taps inside the
    input, read in place) and the kernel the rule chooses."""
    clipped_ran = []
    if route != "chosen":
        monkeypatch.setattr(depthwise_nhwc, "WINDOW", route == "window")
        monkeypatch.setattr(depthwise_nhwc, "CLIPPED_MAX_INSIDE", 1.0 if route == "clipped" else -1.0)
        real = depthwise_nhwc._forward_clipped
        monkeypatch.setattr(depthwise_nhwc, "_forward_clipped", lambda *a: clipped_ran.append(1) or real(*a))
    x, w, b, kw = _make(geometry)
    leaves = [t for t in (x, w, b) if t is not None]
    ours = [t.detach().clone().requires_grad_() for t in leaves]
    theirs = [t.detach().clone().requires_grad_() for t in leaves]
    call = (lambda fn, a, algo: fn(a[0], a[1], a[2] if b is not None else None, **kw, **algo))
    y = call(F.conv2d, ours, dict(algo="depthwise"))
    ref = call(TF.conv2d, theirs, {})
    assert_close(y, ref, what=f"{geometry} forward")
    assert y.is_contiguous(memory_format=CL), f"{geometry}: result is not channels_last (strides {y.stride()})"
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    g = g.contiguous(memory_format=CL)
    got = torch.autograd.grad(y, ours, g)
    want = torch.autograd.grad(ref, theirs, g)
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), got, want):
        assert_close(a, e, what=f"{geometry} {name}")
    assert got[0].is_contiguous(memory_format=CL), f"{geometry}: input gradient strides {got[0].stride()}"
    assert spy == GEOMETRIES[geometry][-1], spy
    if route != "chosen":
        assert bool(clipped_ran) == (route == "clipped" and bool(spy)), (route, clipped_ran)


def test_clipped_kernel_is_chosen_for_small_padded_maps():
    """The rule: ConvNeXt's 7x7 on 4x4 (33% of the taps inside) and 8x8 (62%) maps take the clipped kernel, its
    16x16 (79%) and unpadded windows the padded copy."""
    frac = depthwise_nhwc.channel_taps.inside_fraction
    assert frac(4, 4, 7, 1, 3, 1) ** 2 == pytest.approx((16 / 28) ** 2)
    assert frac(4, 4, 7, 1, 3, 1) ** 2 <= depthwise_nhwc.CLIPPED_MAX_INSIDE
    assert frac(8, 8, 7, 1, 3, 1) ** 2 <= depthwise_nhwc.CLIPPED_MAX_INSIDE
    assert frac(16, 16, 7, 1, 3, 1) ** 2 > depthwise_nhwc.CLIPPED_MAX_INSIDE
    assert frac(9, 7, 3, 1, 0, 1) == 1.0
    for size, out, K, stride, pad, dilation in ((3, 9, 3, 1, 4, 1), (12, 6, 5, 2, 2, 2), (5, 4, 3, 3, 6, 2)):
        inside = sum(0 <= o * stride - pad + k * dilation < size for o in range(out) for k in range(K))
        assert frac(size, out, K, stride, pad, dilation) == pytest.approx(inside / (out * K))
    assert frac(3, 9, 3, 1, 4, 1) == pytest.approx(9 / 27), "positions with no tap inside count as 0"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_convnext_block_shape_float32_and_float64(dtype, spy):
    """ConvNeXt's 7x7 depthwise on a permuted (channels-innermost) activation, as torchvision hands it over."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 8, 32, generator=gen, dtype=dtype).permute(0, 3, 1, 2)  # NHWC memory, NCHW view
    w = torch.randn(32, 1, 7, 7, generator=gen, dtype=dtype)
    b = torch.randn(32, generator=gen, dtype=dtype)
    with torch.no_grad():
        y = F.conv2d(x, w, b, padding=3, groups=32, algo="auto")
    assert_close(y, TF.conv2d(x, w, b, padding=3, groups=32), what=f"{dtype} forward")
    assert y.is_contiguous(memory_format=CL)
    assert "forward" in spy


@pytest.mark.parametrize("geometry", ["7x7 pad 3", "3x3 stride 2", "5x5 stride (1, 3) dilation 2",
                                      "5x5 pad 2, rows of 19", "120 channels, 7x7 on 4x4 (8+4+2+1 vector tiles)",
                                      "3x3 pad 4 (windows wholly in the padding)"])
def test_gradcheck(geometry):
    x, w, b, kw = _make(geometry)
    args = tuple(t.detach().clone().requires_grad_() for t in (x[:1], w, b))
    assert torch.autograd.gradcheck(lambda a, c, d: F.conv2d(a, c, d, algo="depthwise", **kw), args)


@pytest.mark.parametrize("geometry", ["7x7 pad 3", "3x3 stride 2", "6 channels (not whole vectors)",
                                      "120 channels, 7x7 on 4x4 (8+4+2+1 vector tiles)"])
@pytest.mark.parametrize("algo", ["depthwise", "auto"])
def test_opcheck_layout_promise(geometry, algo):
    x, w, b, kw = _make(geometry)
    stride = kw.get("stride", 1)
    stride = list(stride) if isinstance(stride, tuple) else [stride] * 2
    pad = kw.get("padding", 0)
    pad = list(pad) if isinstance(pad, tuple) else [pad] * 2
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), stride, pad, pad,
            [kw.get("dilation", 1)] * 2, kw["groups"], algo)
    torch.library.opcheck(torch.ops.fastconv.conv2d.default, args)


def test_applies():
    assert depthwise_nhwc.applies(16, 16, (1, 3, 3), (0, 1, 1), 4)
    assert depthwise_nhwc.applies(8, 8, (1, 3, 3), (0, 1, 1), 8)
    assert not depthwise_nhwc.applies(8, 8, (1, 3, 3), (0, 1, 1), 4), "8 float32 channels are half a vector"
    assert not depthwise_nhwc.applies(16, 32, (1, 3, 3), (0, 1, 1), 4), "channel multiplier 2"
    assert not depthwise_nhwc.applies(16, 16, (3, 3, 3), (1, 1, 1), 4), "3-D"
    assert not depthwise_nhwc.applies(16, 16, (1, 3, 3), (0, -1, 1), 4), "negative padding (cropping)"
    assert not depthwise_nhwc.applies(16, 16, (1, 3, 3), (0, 1, 1), 2), "half precision"
