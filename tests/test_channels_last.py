"""channels_last in, channels_last out, as torch: conv (input's or weight's layout), pooling (input's layout).

Each case runs torch's op and fastconv's on the same channels_last (or channels_last_3d) tensors in float32 and
checks the result's memory format equals torch's, the values agree, and the input gradient keeps the layout.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF

import fastconv
import fastconv.functional as F
from helpers import assert_close

CL, CL3 = torch.channels_last, torch.channels_last_3d


def _fmt(t: torch.Tensor) -> str:
    if t.dim() == 4 and t.is_contiguous(memory_format=CL) and not t.is_contiguous():
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=CL3) and not t.is_contiguous():
        return "channels_last_3d"
    return "contiguous" if t.is_contiguous() else f"strided {t.stride()}"


def _cl(t):
    return t.contiguous(memory_format=CL if t.dim() == 4 else CL3)


x4, x5 = torch.randn(2, 4, 9, 8), torch.randn(2, 4, 5, 6, 5)
w4, w5 = torch.randn(6, 4, 3, 3), torch.randn(6, 2, 3, 3, 3)

# name -> (fastconv fn, torch fn, args builder, kwargs)
CASES = {
    "conv2d_input_cl": (F.conv2d, TF.conv2d, lambda: (_cl(x4), w4, torch.randn(6)), dict(padding=1)),
    "conv2d_weight_cl": (F.conv2d, TF.conv2d, lambda: (x4, _cl(w4)), dict(stride=2)),
    "conv2d_both_cl_groups": (F.conv2d, TF.conv2d, lambda: (_cl(x4), _cl(torch.randn(6, 2, 3, 3))), dict(groups=2)),
    "conv2d_depthwise_cl": (F.conv2d, TF.conv2d, lambda: (_cl(x4), torch.randn(8, 1, 3, 3)), dict(groups=4)),
    "conv2d_1x1_cl": (F.conv2d, TF.conv2d, lambda: (_cl(x4), torch.randn(5, 4, 1, 1)), {}),
    "conv2d_plain": (F.conv2d, TF.conv2d, lambda: (x4, w4), {}),
    "conv3d_input_cl": (F.conv3d, TF.conv3d, lambda: (_cl(x5), torch.randn(3, 4, 2, 3, 2)), dict(padding=1)),
    "conv_transpose2d_input_cl": (F.conv_transpose2d, TF.conv_transpose2d,
                                  lambda: (_cl(x4), torch.randn(4, 3, 3, 3)), dict(stride=2)),
    "conv_transpose2d_weight_cl": (F.conv_transpose2d, TF.conv_transpose2d,
                                   lambda: (x4, _cl(torch.randn(4, 3, 3, 3))), {}),
    "max_pool2d": (F.max_pool2d, TF.max_pool2d, lambda: (_cl(x4),), dict(kernel_size=3, stride=2, padding=1)),
    "max_pool3d": (F.max_pool3d, TF.max_pool3d, lambda: (_cl(x5),), dict(kernel_size=2)),
    "avg_pool2d": (F.avg_pool2d, TF.avg_pool2d, lambda: (_cl(x4),), dict(kernel_size=2)),
    "avg_pool3d": (F.avg_pool3d, TF.avg_pool3d, lambda: (_cl(x5),), dict(kernel_size=2)),
    "adaptive_avg_pool2d": (F.adaptive_avg_pool2d, TF.adaptive_avg_pool2d, lambda: (_cl(x4),), dict(output_size=3)),
    "adaptive_avg_pool3d": (F.adaptive_avg_pool3d, TF.adaptive_avg_pool3d, lambda: (_cl(x5),),
                            dict(output_size=2)),
    "adaptive_max_pool2d": (F.adaptive_max_pool2d, TF.adaptive_max_pool2d, lambda: (_cl(x4),),
                            dict(output_size=(4, 3))),
    "adaptive_max_pool3d": (F.adaptive_max_pool3d, TF.adaptive_max_pool3d, lambda: (_cl(x5),),
                            dict(output_size=2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_result_layout_follows_torch(name):
    fc, tc, make, kwargs = CASES[name]
    args = make()
    want = tc(*args, **kwargs)
    leaf = args[0].detach().clone(memory_format=torch.preserve_format).requires_grad_()
    got = fc(leaf, *args[1:], **kwargs)
    assert _fmt(got) == _fmt(want), f"{name}: fastconv gave {_fmt(got)}, torch {_fmt(want)}"
    assert_close(got, want, what=name)
    got.backward(torch.ones_like(got))
    # a leaf's gradient takes the leaf's layout (autograd's layout contract), as with torch
    assert _fmt(leaf.grad) == _fmt(leaf)


def test_max_pool_indices_and_unpool_keep_channels_last():
    x = _cl(x4)
    v, i = F.max_pool2d(x, 2, return_indices=True)
    tv, ti = TF.max_pool2d(x, 2, return_indices=True)
    assert _fmt(v) == _fmt(i) == _fmt(tv) == _fmt(ti) == "channels_last"
    assert torch.equal(i, ti)
    u = F.max_unpool2d(v, i, 2)
    assert _fmt(u) == _fmt(TF.max_unpool2d(tv, ti, 2)) == "channels_last"


def test_separable_keeps_channels_last():
    x = _cl(x4)
    dw, pw = torch.randn(4, 1, 3, 3), torch.randn(5, 4, 1, 1)
    y = F.depthwise_separable_conv2d(x, dw, pw, padding=1)
    assert _fmt(y) == "channels_last"
    assert_close(y, TF.conv2d(TF.conv2d(x, dw, padding=1, groups=4), pw), what="separable")


def test_converted_model_keeps_channels_last_through_the_network():
    torch_model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                      torch.nn.Conv2d(8, 8, 1), torch.nn.AvgPool2d(2)).eval()
    model = fastconv.convert(copy.deepcopy(torch_model))
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=CL)
    with torch.no_grad():
        want = torch_model(x)
        got = model(x)
    assert _fmt(got) == _fmt(want) == "channels_last"
    assert_close(got, want, what="converted model")


def test_half_channels_last():
    x = _cl(x4).bfloat16()
    y = F.conv2d(x, w4.bfloat16(), padding=1)
    assert y.dtype == torch.bfloat16 and _fmt(y) == "channels_last"
