"""``algo="shift"`` through the public API and ``torch.ops.fastconv.*``: what it refuses, and by which words.

Its kernels are checked against torch in ``tests/test_cpu_conv_kernels.py`` (the whole 2-D matrix, 1-D, float32)
and through the conv suite's grouped cases (forward, gradients, gradcheck, opcheck) in ``tests/test_conv.py``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import fastconv.functional as F
from helpers import assert_close


@pytest.mark.parametrize("case", ["dense", "3-D"])
def test_shift_refuses_dense_and_3d_convs_by_name(case):
    if case == "dense":
        x, w, call = torch.randn(1, 4, 6, 6), torch.randn(4, 4, 3, 3), F.conv2d
        op, why = torch.ops.fastconv.conv2d, r"grouped convolutions only \(groups > 1\)"
    else:
        x, w, call = torch.randn(1, 4, 5, 6, 6), torch.randn(4, 2, 3, 3, 3), lambda *a, **k: F.conv3d(*a, groups=2, **k)
        op, why = torch.ops.fastconv.conv3d, r"1-D and 2-D convolutions only, got a 3-D kernel \(3, 3, 3\)"
    message = rf"algo='shift' cannot run this convolution \({why}"
    with pytest.raises(ValueError, match=message):
        call(x, w, algo="shift")
    nd = w.dim() - 2
    groups = 1 if case == "dense" else 2
    with pytest.raises(ValueError, match=message):
        op(x, w, None, [1] * nd, [0] * nd, [0] * nd, [1] * nd, groups, "shift")
    # a grouped 2-D conv runs, and agrees with torch
    xg, wg = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(6, 2, 3, 3, dtype=torch.float64)
    assert_close(F.conv2d(xg, wg, groups=2, padding=1, algo="shift"), TF.conv2d(xg, wg, groups=2, padding=1),
                 algo="shift", what="grouped shift")


@pytest.mark.parametrize("route", ["by-group", "batch-planes"])
@pytest.mark.parametrize("case", [
    # N, C, K, groups, H, W, kernel, stride, padding, dilation
    (8, 16, 16, 2, 4, 4, 3, 1, 1, 1),        # RegNet-like 8-wide groups on a 4x4 plane, all images in one task
    (5, 12, 18, 3, 17, 9, 3, 2, 1, 1),       # stride 2, odd sizes, 6 output channels per group (a 4-block + 2)
    (3, 6, 6, 3, 10, 11, (3, 5), 1, (2, 1), 2),  # dilation, rectangular kernel and padding
    (7, 8, 4, 4, 1, 40, (1, 3), 1, (0, 1), 1),  # a 1-D conv as H == 1; 1 output channel per group
    (4, 8, 8, 2, 9, 9, 1, 2, 0, 1),          # 1x1 stride 2: three of the four phases no tap reads (zero gradient)
])
def test_shift_forward_routes_agree_with_torch(case, route, monkeypatch):
    """The forward runs per (group, block of images) with task-local planes when a group's planes of one image are
    small (``GROUP_PLANES_MAX_BYTES``), the weight gradient and the strided input gradient per group when the
    group's planes (or widened output gradient) of the batch are; else all on planes of the whole batch. Both routes against torch in float64, forward and all gradients (the stride-1
    input gradient runs the forward kernel too), with a spy on the routes taken."""
    from fastconv.cpu import shift

    N, C, K, groups, H, W, k, s, p, d = case
    if route == "batch-planes":
        monkeypatch.setattr(shift, "GROUP_PLANES_MAX_BYTES", 0)
    ran = []
    real_sized = shift._sized
    monkeypatch.setattr(shift, "_sized", lambda kernel, macs: (ran.append(kernel.py_func.__name__),
                                                                 real_sized(kernel, macs))[1])
    torch.manual_seed(0)
    x = torch.randn(N, C, H, W, dtype=torch.float64, requires_grad=True)
    w = torch.randn(K, C // groups, *((k, k) if isinstance(k, int) else k), dtype=torch.float64, requires_grad=True)
    b = torch.randn(K, dtype=torch.float64, requires_grad=True)
    kw = dict(stride=s, padding=p, dilation=d, groups=groups)
    y = F.conv2d(x, w, b, algo="shift", **kw)
    ref = TF.conv2d(x, w, b, **kw)
    assert_close(y, ref, algo="shift", what="forward")
    expected = "_forward_by_group" if route == "by-group" else "_forward_planes"
    assert ran and ran[0] == expected, ran
    gy = torch.randn_like(ref)
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), torch.autograd.grad(y, (x, w, b), gy),
                          torch.autograd.grad(ref, (x, w, b), gy)):
        assert_close(a, e, algo="shift", what=name)
    assert ("_grad_weight_by_group" if route == "by-group" else "_grad_weight_planes") in ran, ran
    if s != 1:  # strided: the adjoint kernels (stride 1 runs the forward on the flipped weights)
        assert ("_grad_input_by_group" if route == "by-group" else "_grad_input_planes") in ran, ran
