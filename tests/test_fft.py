"""The FFT algorithm (``algo="fft"``) against torch in float64: every pass, gradcheck, opcheck, refusals,
the exact fallback for non-finite and huge operands, and its workspace and multiplication count."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF

import fastconv.functional as F
from fastconv import backends, registry
from fastconv.cpu import fft
from fastconv.ops.conv import make_geometry
from helpers import assert_close

if backends.current() != "numba":
    pytest.skip("the FFT algorithm runs on the CPU (numba) target only", allow_module_level=True)

# (ndim, input shape, weight shape, kwargs): large kernels, where the FFT is meant to be used, across
# stride, dilation, groups, depthwise, 'same' with an even kernel, 1-D and 3-D.
CASES = {
    "alexnet_11x11_stride4": ((2, 3, 31, 31), (8, 3, 11, 11), dict(stride=4, padding=2)),
    "stem_7x7_stride2": ((2, 3, 20, 18), (6, 3, 7, 7), dict(stride=2, padding=3)),
    "convnext_dw_7x7": ((2, 4, 9, 9), (4, 1, 7, 7), dict(padding=3, groups=4)),
    "dw_multiplier2": ((1, 3, 12, 11), (6, 1, 5, 5), dict(padding=2, groups=3)),
    "grouped_5x5_dilated": ((2, 4, 15, 14), (6, 2, 5, 5), dict(padding=2, dilation=(2, 1), groups=2)),
    "same_even_6x4": ((1, 2, 10, 9), (3, 2, 6, 4), dict(padding="same")),
    "mixed_stride_3x1": ((1, 2, 13, 12), (3, 2, 5, 4), dict(stride=(3, 1), padding=(1, 2))),
    "audio_80_taps": ((2, 1, 300), (5, 1, 80), dict(stride=4)),
    "conv1d_same": ((2, 3, 40), (4, 3, 17), dict(padding="same", dilation=2)),
    "conv3d_5x3x3": ((1, 2, 7, 8, 9), (3, 2, 5, 3, 3), dict(stride=(1, 2, 1), padding=1)),
}


def _make(case, dtype=torch.float64):
    x_shape, w_shape, kw = CASES[case]
    x = torch.randn(x_shape, dtype=dtype, requires_grad=True)
    w = torch.randn(w_shape, dtype=dtype, requires_grad=True)
    b = torch.randn(w_shape[0], dtype=dtype, requires_grad=True)
    ndim = len(x_shape) - 2
    return x, w, b, kw, getattr(F, f"conv{ndim}d"), getattr(TF, f"conv{ndim}d")


@pytest.mark.parametrize("case", list(CASES))
def test_fft_forward_and_gradients_match_torch(case):
    x, w, b, kw, ours, theirs = _make(case)
    y = ours(x, w, b, algo="fft", **kw)
    ref = theirs(x, w, b, **kw)
    assert_close(y, ref, what="forward")
    g = torch.randn_like(ref)
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), torch.autograd.grad(y, (x, w, b), g),
                          torch.autograd.grad(ref, (x, w, b), g)):
        assert_close(a, e, what=name)


@pytest.mark.parametrize("case", ["alexnet_11x11_stride4", "convnext_dw_7x7", "audio_80_taps"])
def test_fft_float32_within_tolerance(case):
    x, w, b, kw, ours, theirs = _make(case, torch.float32)
    assert_close(ours(x, w, b, algo="fft", **kw), theirs(x, w, b, **kw), what="forward float32")


@pytest.mark.parametrize("case", ["stem_7x7_stride2", "grouped_5x5_dilated", "conv1d_same"])
def test_fft_gradcheck_and_gradgradcheck(case):
    x, w, b, kw, ours, _ = _make(case)
    fn = lambda x, w, b: ours(x, w, b, algo="fft", **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x, w, b), fast_mode=True)


def test_fft_opcheck():
    x, w, b, kw, _, _ = _make("stem_7x7_stride2")
    a = F.conv.ConvArgs("conv2d", 2, x, w, b, kw["stride"], kw["padding"], 1, 1, "fft")
    geometry = [*a.lists(), a.groups, "fft"]
    gy = torch.randn_like(TF.conv2d(x, w, b, **kw).detach())
    torch.library.opcheck(torch.ops.fastconv.conv2d.default, (x, w, b, *geometry))
    torch.library.opcheck(torch.ops.fastconv.conv2d_grad_input.default,
                          (gy.requires_grad_(), w, list(x.shape[2:]), *geometry))
    torch.library.opcheck(torch.ops.fastconv.conv2d_grad_weight.default, (gy, x, list(w.shape[2:]), *geometry))


@pytest.mark.parametrize("kernel, reason", [((3, 3), "kernel of 9 taps"), ((1, 1), "kernel of 1 taps")])
def test_fft_refuses_small_kernels_with_the_reason(kernel, reason):
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match=rf"algo='fft' cannot run this convolution \({reason}"):
        F.conv2d(x, torch.randn(3, 2, *kernel), algo="fft")


@pytest.mark.parametrize("where", ["input_inf", "input_nan", "weight_inf", "huge"])
def test_fft_non_finite_and_huge_operands_are_exact(where):
    # An FFT spreads one NaN/Inf over every output; such calls take the exact direct kernel.
    x = torch.randn(1, 2, 16, 16)
    w = torch.randn(3, 2, 7, 7)
    if where == "input_inf":
        x[0, 1, 5, 6] = math.inf
    elif where == "input_nan":
        x[0, 0, 9, 2] = math.nan
    elif where == "weight_inf":
        w[1, 0, 3, 3] = -math.inf
    else:
        x = x * 1e30
    y = F.conv2d(x, w, padding=3, algo="fft")
    ref = TF.conv2d(x.double(), w.double(), padding=3)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isposinf(), ref.isposinf())
    finite = ref.isfinite()
    if where == "huge":
        assert finite.all() and y.isfinite().all()
    torch.testing.assert_close(y[finite].double(), ref[finite], rtol=1e-4, atol=1e-4 * ref[finite].abs().max())


def test_fft_workspace_and_multiplications_are_reported():
    g = make_geometry(2, 8, 3, 96, 1, (227, 227), (11, 11), None, (4, 4), (0, 0), (0, 0), (1, 1),
                      torch.float32, "numba")
    alg = registry.choose("fft", g, "forward")
    ws = alg.workspace_bytes(g)
    # AlexNet conv1: 16 stride phases of 3 channels; 55 outputs + 3 taps - 1 -> 57, a 2/3/5-smooth 60.
    bins = 60 * (60 // 2 + 1)
    assert ws == 8 * ((8 * 3 * 16) + (96 * 3 * 16) + 8 * 96) * bins
    executed = alg.mult_ratio(g) * g.macs
    products = 4 * bins * 8 * 96 * 48
    assert products < executed < 2 * g.macs  # cheaper than direct's 843M multiplications
    assert fft._next_fast_len(57) == 60 and fft._next_fast_len(64) == 64 and fft._next_fast_len(97) == 100
