"""algo="depthwise" (fastconv/cpu/depthwise.py) against torch in float64: forward, gradients, gradcheck,
opcheck, refusal of non-depthwise geometries, non-finite inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import fastconv
import fastconv.functional as F
from fastconv import backends
from helpers import assert_close

pytestmark = pytest.mark.skipif(backends.current() != "numba", reason="algo='depthwise' runs on the numba backend")

ALGO = "depthwise"

# name: (ndim, N, C, multiplier, spatial, kernel, conv kwargs)
CASES = {
    "3x3_pad1": (2, 2, 4, 1, (8, 7), (3, 3), dict(padding=1)),
    "3x3_stride2_pad1": (2, 2, 3, 1, (9, 8), (3, 3), dict(stride=2, padding=1)),
    "multiplier2_stride2": (2, 2, 3, 2, (9, 10), (3, 3), dict(stride=2, padding=1)),
    "multiplier3_mixed": (2, 1, 2, 3, (12, 13), (4, 3), dict(stride=(3, 2), padding=(0, 1), dilation=(2, 3))),
    "same_even_kernel": (2, 2, 3, 1, (7, 6), (4, 2), dict(padding="same")),
    "same_even_dilated_mult2": (2, 1, 2, 2, (8, 9), (2, 4), dict(padding="same", dilation=(3, 2))),
    "dilation2": (2, 2, 3, 1, (11, 10), (3, 3), dict(padding=2, dilation=2)),
    "valid_5x5": (2, 2, 4, 1, (9, 9), (5, 5), dict(padding="valid")),
    "padding_exceeds_kernel": (2, 1, 2, 1, (5, 6), (3, 3), dict(padding=(4, 3))),
    "asymmetric_stride3": (2, 1, 2, 1, (10, 5), (3, 1), dict(stride=(3, 1), padding=(2, 0))),
    "kernel_equals_input": (2, 2, 3, 2, (5, 4), (5, 4), dict()),
    "1x1_stride2": (2, 2, 4, 1, (7, 7), (1, 1), dict(stride=2)),
    "wide_rows": (2, 1, 3, 1, (5, 70), (3, 3), dict(padding=1)),
    "conv1d_stride2": (1, 2, 3, 1, (17,), (3,), dict(stride=2, padding=1)),
    "conv1d_same_even_mult2": (1, 2, 3, 2, (11,), (4,), dict(padding="same", dilation=2)),
    "conv3d_pad1": (3, 2, 2, 1, (4, 5, 6), (3, 3, 3), dict(padding=1)),
    "conv3d_mixed_mult2": (3, 1, 2, 2, (5, 6, 7), (3, 3, 2), dict(stride=(1, 2, 2), padding=(1, 1, 0),
                                                                  dilation=(2, 1, 1))),
    "batch0": (2, 0, 3, 2, (6, 6), (3, 3), dict(padding=1)),
}


def _make(case, dtype=torch.float64, requires_grad=True):
    ndim, n, c, m, size, kernel, kw = CASES[case]
    x = torch.randn(n, c, *size, dtype=dtype, requires_grad=requires_grad)
    w = torch.randn(c * m, 1, *kernel, dtype=dtype, requires_grad=requires_grad)
    b = torch.randn(c * m, dtype=dtype, requires_grad=requires_grad)
    return ndim, x, w, b, dict(kw, groups=c)


@pytest.mark.parametrize("case", list(CASES))
def test_depthwise_forward_and_gradients_match_torch(case):
    ndim, x, w, b, kw = _make(case)
    ours, theirs = getattr(F, f"conv{ndim}d"), getattr(TF, f"conv{ndim}d")
    y = ours(x, w, b, algo=ALGO, **kw)
    ref = theirs(x, w, b, **kw)
    assert_close(y, ref, what="forward")
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, w, b), g)
    want = torch.autograd.grad(ref, (x, w, b), g)
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), got, want):
        assert_close(a, e, what=name)


@pytest.mark.parametrize("case", ["3x3_stride2_pad1", "multiplier3_mixed", "same_even_dilated_mult2",
                                  "conv1d_same_even_mult2", "conv3d_mixed_mult2"])
def test_depthwise_gradcheck_and_gradgradcheck(case):
    ndim, x, w, b, kw = _make(case)
    fn = lambda x, w, b: getattr(F, f"conv{ndim}d")(x, w, b, algo=ALGO, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x, w, b), fast_mode=True)


@pytest.mark.parametrize("case", ["3x3_pad1", "multiplier2_stride2", "same_even_kernel", "conv1d_stride2",
                                  "conv3d_pad1"])
def test_opcheck_conv_ops_with_depthwise_algo(case):
    ndim, x, w, b, kw = _make(case)
    a = F.conv.ConvArgs(f"conv{ndim}d", ndim, x, w, b, kw.get("stride", 1), kw.get("padding", 0),
                        kw.get("dilation", 1), kw["groups"], ALGO)
    geometry = [*a.lists(), a.groups, ALGO]
    y = getattr(TF, f"conv{ndim}d")(x, w, b, **kw).detach()
    gy = torch.randn_like(y)
    ops = torch.ops.fastconv
    torch.library.opcheck(getattr(ops, f"conv{ndim}d").default, (x, w, b, *geometry))
    torch.library.opcheck(getattr(ops, f"conv{ndim}d_grad_input").default,
                          (gy.requires_grad_(), w, list(x.shape[2:]), *geometry))
    torch.library.opcheck(getattr(ops, f"conv{ndim}d_grad_weight").default,
                          (gy, x, list(w.shape[2:]), *geometry))


@pytest.mark.parametrize("groups, channels, out_channels, message", [
    (1, 64, 8, r"needs groups == in_channels \(depthwise\); got groups=1 with 64 input channels"),
    (2, 4, 4, r"needs groups == in_channels \(depthwise\); got groups=2 with 4 input channels"),
])
def test_non_depthwise_geometry_is_refused_with_reason(groups, channels, out_channels, message):
    x = torch.randn(1, channels, 6, 6)
    w = torch.randn(out_channels, channels // groups, 3, 3)
    with pytest.raises(ValueError, match=r"algo='depthwise' cannot run this convolution \(" + message):
        F.conv2d(x, w, groups=groups, algo=ALGO)
    # the refusal also lists what can run it, so the user knows the fix
    with pytest.raises(ValueError, match=r"Algorithms that can: auto"):
        F.conv2d(x, w, groups=groups, algo=ALGO)


def test_algorithm_is_listed():
    rows = {row["name"]: row for row in fastconv.algorithms()}
    assert "numba" in rows["depthwise"]["targets"]


def test_float32_matches_float64_reference():
    _, x, w, b, kw = _make("multiplier2_stride2", requires_grad=False)
    y = F.conv2d(x.float(), w.float(), b.float(), algo=ALGO, **kw)
    assert y.dtype == torch.float32
    assert_close(y, TF.conv2d(x, w, b, **kw).float())


def test_non_finite_input_matches_torch():
    """NaN/Inf propagate as in torch: forward, and the weight gradient's exact path for planes with
    non-finite values (the whole-plane loop would multiply 0 * Inf in its dropped columns)."""
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    x[0, 1, 4, 4] = float("nan")
    # stride 2, no padding, 10 wide: column 9 is read by no window; Inf there must not reach any gradient
    x[1, 2, 3, 9] = float("inf")
    x[1, 0, 0, 0] = float("inf")
    w = torch.randn(6, 1, 3, 3, dtype=torch.float64)
    kw = dict(stride=(1, 2), groups=3)
    assert_close(F.conv2d(x, w, algo=ALGO, **kw), TF.conv2d(x, w, **kw), what="forward")
    gy = torch.randn_like(TF.conv2d(x, w, **kw))
    want = torch.ops.aten.convolution_backward(gy, x, w, None, [1, 2], [0, 0], [1, 1], False, [0, 0], 3,
                                               [False, True, False])[1]
    got = torch.ops.fastconv.conv2d_grad_weight(gy, x, [3, 3], [1, 2], [0, 0], [0, 0], [1, 1], 3, ALGO)
    assert want[4:].isfinite().all() and not want[0].isfinite().all()  # the case exercises both paths
    assert_close(got, want, what="grad_weight")


def test_kernel_api_rejects_non_depthwise_weights():
    from fastconv.cpu import depthwise

    x = np.zeros((1, 4, 1, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"need weight \(m\*C, 1, \.\.\.\) for C=4 input channels"):
        depthwise.depthwise_forward(x, np.zeros((4, 2, 1, 3, 3), np.float32), None, (1, 1, 1), (0, 0, 0),
                                    (1, 1, 1), 4, (1, 3, 3))


# The fast 2-D path (fastconv.cpu.depthwise._fast2d_layout): per-tap-column shifted copies at output row
# pitch, the "flat" whole-plane fill (W == stride*OW) with its zeroed wrap-around columns, the direct
# phase-slot reads, the row-picking forward for a stride in H, the stride-1 input gradient run as a
# forward with the flipped kernel, and the in-place weight gradient.
FAST_CASES = {
    "flat_s1_14": (2, 3, 1, (14, 14), (3, 3), dict(padding=1)),
    "flat_s2_even": (2, 3, 1, (14, 12), (3, 3), dict(stride=2, padding=1)),
    "rows_s2_odd": (2, 3, 1, (13, 11), (3, 3), dict(stride=2, padding=1)),
    "flat_s2_unused_rows": (1, 2, 1, (11, 10), (3, 3), dict(stride=(3, 2), padding=(0, 1))),
    "flat_s1_5x5_mult2": (2, 2, 2, (9, 9), (5, 5), dict(padding=2)),
    "flat_s1_dilated": (2, 2, 1, (10, 9), (3, 3), dict(padding=2, dilation=2)),
    "s1_valid_mult1": (2, 3, 1, (9, 10), (3, 3), dict()),
    "s1_1x3_pad_w_only": (2, 2, 1, (6, 7), (1, 3), dict(padding=(0, 1))),
    "s3_flat": (1, 2, 1, (12, 12), (3, 3), dict(stride=3, padding=1)),
}


@pytest.mark.parametrize("case", list(FAST_CASES))
def test_fast_2d_path_matches_torch(case):
    n, c, m, size, kernel, kw = FAST_CASES[case]
    x = torch.randn(n, c, *size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c * m, 1, *kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c * m, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, w, b, algo=ALGO, groups=c, **kw)
    ref = TF.conv2d(x, w, b, groups=c, **kw)
    assert_close(y, ref, what="forward")
    g = torch.randn_like(ref)
    for name, a, e in zip(("grad_input", "grad_weight"), torch.autograd.grad(y, (x, w), g),
                          torch.autograd.grad(ref, (x, w), g)):
        assert_close(a, e, what=name)


@pytest.mark.parametrize("stride", [1, 2])
def test_fast_2d_path_non_finite_at_row_ends(stride):
    """Inf/NaN in the first and last input columns: the flat fill wraps those columns into the
    neighbouring rows' padding positions, which must be zeroed (else Inf leaks into the other border)."""
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    x[0, 0, 5, 11] = float("inf")
    x[0, 1, 3, 0] = float("-inf")
    x[1, 2, 7, 0] = float("nan")
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64)
    kw = dict(stride=stride, padding=1, groups=3)
    ref = TF.conv2d(x, w, **kw)
    assert_close(F.conv2d(x, w, algo=ALGO, **kw), ref, what="forward")
    gy = torch.randn_like(ref)
    gy[0, 1, 2, -1] = float("inf")
    want = torch.ops.aten.convolution_backward(gy, x, w, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 3,
                                               [True, True, False])
    got_gx = torch.ops.fastconv.conv2d_grad_input(gy, w, [12, 12], [stride] * 2, [1, 1], [1, 1], [1, 1], 3, ALGO)
    got_gw = torch.ops.fastconv.conv2d_grad_weight(gy, x, [3, 3], [stride] * 2, [1, 1], [1, 1], [1, 1], 3, ALGO)
    assert_close(got_gx, want[0], what="grad_input")
    # torch's float64 path multiplies padding zeros by the Inf in gy (0 * Inf = NaN) where no term of
    # the sum is NaN; its float32 path (oneDNN) and fastconv sum only the terms that exist (see
    # tests/test_nonfinite.py): those entries are compared with torch's float32 result.
    want32 = torch.ops.aten.convolution_backward(gy.float(), x.float(), w.float(), None, [stride] * 2, [1, 1],
                                                 [1, 1], False, [0, 0], 3, [False, True, False])[1]
    spurious = want[1].isnan() & ~want32.isnan()
    assert_close(got_gw[~spurious], want[1][~spurious], what="grad_weight")
    assert_close(got_gw[spurious].float(), want32[spurious], what="grad_weight (padding x Inf)")


def test_fast_2d_path_float32_mobilenet_shape():
    x = torch.randn(2, 8, 28, 28)
    w = torch.randn(8, 1, 3, 3)
    for stride in (1, 2):
        y = F.conv2d(x, w, stride=stride, padding=1, groups=8, algo=ALGO)
        assert_close(y, TF.conv2d(x.double(), w.double(), stride=stride, padding=1, groups=8).float())


# The channel-blocked path for small planes (fastconv.cpu.depthwise._forward2d_cb): 64-channel blocks
# packed channels-innermost, a partial last block (its spare lanes hold stale values that must never
# reach the output), stride phases in W, dilation, asymmetric padding; the stride-1 input gradient runs
# through it as a forward with the flipped kernel.
CB_CASES = {
    "two_blocks_tail_7x7": (2, 70, (7, 7), (7, 7), dict(padding=3)),
    "three_blocks_s2_dilated_5x5": (2, 130, (13, 12), (5, 5), dict(stride=2, padding=(2, 3), dilation=(2, 1))),
    "one_lane_tail_3x3_s2": (1, 65, (13, 14), (3, 3), dict(stride=2, padding=1)),
    "s1_dilated_3x3": (3, 66, (7, 8), (3, 3), dict(padding=2, dilation=2)),
    # strided input gradients (input planes up to 32x32): the output gradient spread into a zero plane
    "spread_grad_input_s2": (2, 70, (8, 7), (3, 3), dict(stride=2, padding=1)),
    "spread_grad_input_mixed": (1, 65, (7, 8), (5, 5), dict(stride=(2, 3), padding=(2, 1), dilation=(1, 2))),
    "spread_grad_input_20x19_s2": (1, 70, (20, 19), (3, 3), dict(stride=2, padding=1)),
    # larger stride-1 planes with large kernels (ConvNeXt's 16x16 7x7): forward and input gradient
    "large_kernel_16x13_7x7": (2, 70, (16, 13), (7, 7), dict(padding=3)),
    "large_kernel_12x12_5x5_dilated": (1, 65, (12, 12), (5, 5), dict(padding=(4, 2), dilation=(2, 1))),
    # planes above 16x16 reach it only with 25+ taps over 128+ planes (batch x channels): ConvNeXt's and
    # EfficientNet's 28x28 layers
    "wide_kernel_28x28_7x7": (1, 130, (28, 28), (7, 7), dict(padding=3)),
    "wide_kernel_30x27_5x5_two_images": (2, 70, (30, 27), (5, 5), dict(padding=(2, 1))),
}


# float32 too: its blocks are packed and unpacked by 16 x 16 register transposes (float64: 8 x 8), with edges;
# stride-1 undilated rows on the window tiles (each row's inputs loaded once for all its taps) and on the
# tap-by-tap tiles
@pytest.mark.parametrize("window", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(CB_CASES))
def test_channel_blocked_path_matches_torch(case, dtype, window, monkeypatch):
    from fastconv.cpu import depthwise

    monkeypatch.setattr(depthwise, "CB_WINDOW", window)
    n, c, size, kernel, kw = CB_CASES[case]
    x = torch.randn(n, c, *size, dtype=dtype, requires_grad=True)
    w = torch.randn(c, 1, *kernel, dtype=dtype, requires_grad=True)
    b = torch.randn(c, dtype=dtype, requires_grad=True)
    ref = TF.conv2d(x, w, b, groups=c, **kw)
    pad = kw.get("padding", 0)
    pad = (pad, pad) if isinstance(pad, int) else pad
    stride = kw.get("stride", 1)
    stride = (stride, stride) if isinstance(stride, int) else stride
    assert depthwise._use_cb_forward(c, c, ref.shape[2:], pad, kernel, n), \
        "case does not reach the channel-blocked path"
    if stride in (1, (1, 1)) and not case.startswith("spread"):
        dil = kw.get("dilation", 1)
        dil = (dil, dil) if isinstance(dil, int) else dil
        flipped = tuple((k - 1) * d - p for k, d, p in zip(kernel, dil, pad))
        assert depthwise._use_cb_forward(c, c, size, flipped, kernel, n), \
            "input gradient does not reach the channel-blocked path"
    if case.startswith("spread"):
        dil = kw.get("dilation", 1)
        dil = (dil, dil) if isinstance(dil, int) else dil
        flipped = tuple((k - 1) * d - p for k, d, p in zip(kernel, dil, pad))
        assert depthwise._use_cb(c, c, size, flipped, depthwise.CB_MAX_SPREAD_PLANE), \
            "input gradient does not reach the channel-blocked path"
    y = F.conv2d(x, w, b, algo=ALGO, groups=c, **kw)
    assert_close(y, ref, what="forward")
    g = torch.randn_like(ref)
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), torch.autograd.grad(y, (x, w, b), g),
                          torch.autograd.grad(ref, (x, w, b), g)):
        assert_close(a, e, what=name)


def test_channel_blocked_route_for_wide_kernels():
    """Planes above 16x16 take the channel-blocked forward only with 25+ taps, 128+ planes and at most 32x32."""
    from fastconv.cpu import depthwise

    use = depthwise._use_cb_forward
    assert use(130, 130, (28, 28), (3, 3), (7, 7), 1)
    assert use(64, 64, (32, 32), (2, 2), (5, 5), 2)
    assert not use(96, 96, (32, 32), (2, 2), (5, 5), 1)      # one image, a block and a part-empty one
    assert not use(192, 192, (28, 28), (1, 1), (3, 3), 8)    # 9 taps: up to 16x16 only
    assert not use(192, 192, (33, 32), (3, 3), (7, 7), 8)    # above 32x32
    assert not use(192, 384, (28, 28), (3, 3), (7, 7), 8)    # a channel multiplier: not this path at all
    assert use(192, 192, (16, 16), (1, 1), (3, 3), 1)        # small planes as before


def test_channel_blocked_wide_kernel_route_gradcheck_and_opcheck(monkeypatch):
    """The wide-kernel route (planes above 16x16) under gradcheck / gradgradcheck and opcheck. gradcheck's
    numerical Jacobian needs few elements, so its case lowers the plane count the route asks for (the route, not
    the kernel, is what the threshold decides; the assert checks the case takes it); opcheck runs a ConvNeXt-sized
    call with the threshold as shipped."""
    from fastconv.cpu import depthwise

    x = torch.randn(1, 2, 17, 17, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(depthwise, "CB_WIDE_MIN_PLANES", 2)
    assert depthwise._use_cb_forward(2, 2, (17, 17), (2, 2), (5, 5), 1)
    assert not depthwise._use_cb_forward(2, 2, (17, 17), (2, 2), (3, 3), 1)
    fn = lambda x, w, b: F.conv2d(x, w, b, padding=2, groups=2, algo=ALGO)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x, w, b), fast_mode=True)
    monkeypatch.undo()

    x = torch.randn(1, 130, 28, 28, dtype=torch.float64)
    w = torch.randn(130, 1, 7, 7, dtype=torch.float64)
    b = torch.randn(130, dtype=torch.float64)
    assert depthwise._use_cb_forward(130, 130, (28, 28), (3, 3), (7, 7), 1)
    geometry = [[1, 1], [3, 3], [3, 3], [1, 1], 130, ALGO]
    gy = torch.randn(1, 130, 28, 28, dtype=torch.float64)
    ops = torch.ops.fastconv
    torch.library.opcheck(ops.conv2d.default, (x, w, b, *geometry))
    torch.library.opcheck(ops.conv2d_grad_input.default, (gy, w, [28, 28], *geometry))
    torch.library.opcheck(ops.conv2d_grad_weight.default, (gy, x, [7, 7], *geometry))


def test_channel_blocked_forward_into_writes_the_requested_rows():
    """depthwise_forward_into's row mapping (row n * nstride + chan0 + k) on the channel-blocked path,
    with the rows around left untouched."""
    from fastconv.cpu import depthwise

    x = np.random.default_rng(0).standard_normal((2, 70, 1, 7, 7))
    w = np.random.default_rng(1).standard_normal((70, 1, 1, 3, 3))
    assert depthwise._use_cb(70, 70, (7, 7), (1, 1))
    y = np.full((2 * 75, 1, 7, 7), 7.0)
    depthwise.depthwise_forward_into(x, w, None, (1, 1, 1), (0, 1, 1), (1, 1, 1), (1, 7, 7), y, chan0=3, nstride=75)
    ref = TF.conv2d(torch.from_numpy(x[:, :, 0]), torch.from_numpy(w[:, :, 0]), padding=1, groups=70).numpy()
    for n in range(2):
        assert_close(torch.from_numpy(y[n * 75 + 3:n * 75 + 73, 0]), torch.from_numpy(ref[n]), what=f"image {n}")
        assert (y[n * 75:n * 75 + 3] == 7.0).all() and (y[n * 75 + 73:(n + 1) * 75] == 7.0).all()
