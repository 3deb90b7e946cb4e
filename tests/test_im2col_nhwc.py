"""The CPU im2col on channels-last operands (:mod:`fastconv.cpu.im2col_nhwc`): read as they are, no NCDHW copy.

Each geometry runs torch's conv and fastconv's ``algo="im2col"`` in float64 on channels_last (or channels_last_3d)
tensors, with the weight contiguous (columns channel-major) and channels_last (tap-major): forward and both
gradients against torch, the channels-last kernels really called (spied), the result's layout, ``gradcheck`` and
``opcheck`` (whose fake kernel must promise the strides the real kernel gives).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import fastconv.functional as F
from fastconv.cpu import im2col_nhwc
from helpers import assert_close

CL, CL3 = torch.channels_last, torch.channels_last_3d

# name -> (N, C, spatial, K, kernel, kwargs)
GEOMETRIES = {
    "3x3 pad 1": (2, 8, (9, 7), 6, (3, 3), dict(padding=1)),
    "3x3 stride 2 groups 2": (2, 8, (9, 7), 6, (3, 3), dict(stride=2, padding=1, groups=2)),
    "1x1": (2, 6, (10, 8), 4, (1, 1), {}),
    "1x1 stride 2": (2, 6, (10, 8), 4, (1, 1), dict(stride=2)),
    "3x3 stride 3 dilation 2 pad 2": (1, 4, (11, 9), 5, (3, 3), dict(stride=3, padding=2, dilation=2)),
    "depthwise 3x3": (2, 6, (8, 8), 6, (3, 3), dict(padding=1, groups=6)),
    "asymmetric 2x5 pad (0, 2)": (2, 3, (7, 12), 4, (2, 5), dict(padding=(0, 2))),
    "3-d 3x3x3 pad 1": (2, 4, (5, 6, 5), 3, (3, 3, 3), dict(padding=1)),
    "3-d 1x1x1": (1, 5, (3, 4, 4), 7, (1, 1, 1), {}),
    # windows that do not overlap: the forward reads them in place (im2col_nhwc._forward_patches)
    "2x2 stride 2 patches": (2, 16, (8, 10), 20, (2, 2), dict(stride=2)),
    "4x4 stride 4 patches, rest dropped": (3, 3, (13, 9), 40, (4, 4), dict(stride=4)),
    "2x3 stride (3, 4) gaps": (2, 5, (10, 11), 7, (2, 3), dict(stride=(3, 4))),
    "3-d 2x2x2 stride 2 patches": (1, 4, (4, 6, 4), 9, (2, 2, 2), dict(stride=2)),
    "2x2 stride 2 small patches": (1, 3, (4, 6), 4, (2, 2), dict(stride=2)),
}
PATCH_GEOMETRIES = [g for g in GEOMETRIES if "patches" in g or "gaps" in g]


def _make(geometry, weight_cl: bool):
    N, C, spatial, K, kernel, kw = GEOMETRIES[geometry]
    gen = torch.Generator().manual_seed(11)
    fmt = CL if len(spatial) == 2 else CL3
    x = torch.randn(N, C, *spatial, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt)
    w = torch.randn(K, C // kw.get("groups", 1), *kernel, generator=gen, dtype=torch.float64)
    if weight_cl:
        w = w.contiguous(memory_format=fmt)
    b = torch.randn(K, generator=gen, dtype=torch.float64)
    fn = (F.conv2d, TF.conv2d) if len(spatial) == 2 else (F.conv3d, TF.conv3d)
    return x, w, b, fn, kw, fmt


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the channels-last kernels."""
    calls = {"forward": 0, "grad_input": 0, "grad_weight": 0}
    for name in calls:
        real = getattr(im2col_nhwc, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(im2col_nhwc, name, counted)
    return calls


@pytest.mark.parametrize("weight_cl", [False, True], ids=["weight contiguous", "weight channels_last"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_matches_torch_without_copies(geometry, weight_cl, spy):
    x, w, b, (fc, tc), kw, fmt = _make(geometry, weight_cl)
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    xt, wt, bt = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fc(xs, ws, bs, algo="im2col", **kw)
    ref = tc(xt, wt, bt, **kw)
    assert_close(y, ref, what=f"{geometry} forward")
    assert y.is_contiguous(memory_format=fmt), f"{geometry}: result is not {fmt} (strides {y.stride()})"
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    g = g.contiguous(memory_format=fmt)
    got = torch.autograd.grad(y, (xs, ws, bs), g)
    want = torch.autograd.grad(ref, (xt, wt, bt), g)
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), got, want):
        assert_close(a, e, what=f"{geometry} {name}")
    assert spy == {"forward": 1, "grad_input": 1, "grad_weight": 1}, spy


@pytest.mark.parametrize("weight_cl", [False, True], ids=["weight contiguous", "weight channels_last"])
@pytest.mark.parametrize("geometry", PATCH_GEOMETRIES)
def test_patches_are_read_in_place(geometry, weight_cl, monkeypatch):
    """Non-overlapping, unpadded windows: the forward runs the in-place patch GEMM (no columns), with and without
    bias, equal to torch's and to the column route."""
    x, w, b, (fc, tc), kw, fmt = _make(geometry, weight_cl)
    calls = []
    real = im2col_nhwc._forward_patches

    def counted(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(im2col_nhwc, "_forward_patches", counted)
    for bias in (b, None):
        y = fc(x, w, bias, algo="im2col", **kw)
        assert_close(y, tc(x, w, bias, **kw), what=f"{geometry} forward")
        assert y.is_contiguous(memory_format=fmt)
    assert len(calls) == 2
    monkeypatch.setattr(im2col_nhwc, "PATCHES_IN_PLACE", False)
    columns = fc(x, w, b, algo="im2col", **kw)
    assert len(calls) == 2, "the switch must take the column route"
    assert_close(columns, tc(x, w, b, **kw), what=f"{geometry} forward on columns")


def test_overlapping_padded_or_large_windows_keep_the_columns():
    small = 1 << 10
    for ksz, stride, padding, dilation, groups in [((3, 3, 3), (2, 2, 2), (0, 0, 0), (1, 1, 1), 1),
                                                   ((1, 2, 2), (1, 2, 2), (0, 1, 0), (1, 1, 1), 1),
                                                   ((1, 2, 2), (1, 2, 2), (0, 0, 0), (1, 2, 1), 1),
                                                   ((1, 2, 2), (1, 2, 2), (0, 0, 0), (1, 1, 1), 2)]:
        assert not im2col_nhwc._patches_apply(groups, ksz, stride, padding, dilation, small)
    assert im2col_nhwc._patches_apply(1, (1, 2, 2), (1, 2, 2), (0, 0, 0), (1, 1, 1), small)
    limit = im2col_nhwc.PATCH_MAX_WEIGHT_BYTES
    assert im2col_nhwc._patches_apply(1, (1, 2, 2), (1, 2, 2), (0, 0, 0), (1, 1, 1), limit)
    assert not im2col_nhwc._patches_apply(1, (1, 2, 2), (1, 2, 2), (0, 0, 0), (1, 1, 1), limit + 1)


@pytest.mark.parametrize("geometry", ["3x3 stride 2 groups 2", "1x1", "3-d 3x3x3 pad 1", "2x2 stride 2 small patches"])
def test_gradcheck(geometry):
    x, w, b, (fc, _), kw, _ = _make(geometry, weight_cl=False)
    x, w, b = (t[:1] if t is x else t for t in (x, w, b))
    args = tuple(t.detach().clone().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda a, c, d: fc(a, c, d, algo="im2col", **kw), args)


@pytest.mark.parametrize("weight_cl", [False, True], ids=["weight contiguous", "weight channels_last"])
@pytest.mark.parametrize("geometry", ["3x3 pad 1", "1x1 stride 2", "3-d 3x3x3 pad 1", "2x2 stride 2 small patches"])
@pytest.mark.parametrize("algo", ["im2col", "direct", "auto"])
def test_opcheck_layout_promise(geometry, weight_cl, algo):
    """Every algorithm's result has the layout the fake kernel promises (torch's rule), channels-last reader or not."""
    x, w, b, (fc, _), kw, _ = _make(geometry, weight_cl)
    N, C, spatial, K, kernel, _ = GEOMETRIES[geometry]
    d = len(spatial)
    pad = kw.get("padding", 0)
    pad = list(pad) if isinstance(pad, tuple) else [pad] * d
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), [kw.get("stride", 1)] * d, pad, pad,
            [kw.get("dilation", 1)] * d, kw.get("groups", 1), algo)
    op = getattr(torch.ops.fastconv, f"conv{d}d").default
    torch.library.opcheck(op, args)


def test_is_channels_last():
    a = torch.randn(2, 3, 1, 4, 5).contiguous(memory_format=CL3).numpy()
    assert im2col_nhwc.is_channels_last(a)
    assert not im2col_nhwc.is_channels_last(torch.randn(2, 3, 1, 4, 5).numpy())
    # both layouts at once (1x1 spatial): counts as NCDHW, the plain kernels run it
    assert not im2col_nhwc.is_channels_last(torch.randn(2, 3, 1, 1, 1).contiguous(memory_format=CL3).numpy())


@pytest.mark.parametrize("weight_cl", [False, True], ids=["weight contiguous", "weight channels_last"])
@pytest.mark.parametrize("algo", ["im2col", "direct"])
def test_fused_op_layout_promise(algo, weight_cl):
    """The fused conv + bias + ReLU op keeps the conv ops' layout promise (its fake kernel agrees with it)."""
    x, w, b, _, kw, fmt = _make("3x3 pad 1", weight_cl)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), [1, 1], [1, 1], [1, 1], [1, 1], 1, algo,
            "relu")
    torch.library.opcheck(torch.ops.fastconv.conv2d_bias_act.default, args)
    y = torch.ops.fastconv.conv2d_bias_act(*args)
    assert y.is_contiguous(memory_format=fmt)
    assert_close(y, TF.relu(TF.conv2d(x, w, b, padding=1)), what="fused")
