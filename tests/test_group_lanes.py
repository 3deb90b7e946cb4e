"""``algo="group_lanes"`` (grouped convs with eight groups across the vector lanes): its kernels against torch in
float64 and float32 on the shapes that exercise each of their parts, and what it refuses, by which words, through
the public API and ``torch.ops.fastconv.*``.

The conv suite (``tests/test_conv.py``) runs it on its 8-wide grouped cases too (forward, gradients, gradcheck,
opcheck).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import fastconv.functional as F
from helpers import assert_close


@pytest.mark.parametrize("case", [
    # N, C, K, groups, H, W, kernel, stride, padding, dilation
    (8, 440, 440, 55, 4, 4, 3, 1, 1, 1),        # RegNet's 4x4 layer: 7 blocks of 8 groups, the last of 7
    (3, 48, 48, 6, 9, 7, 3, 2, 1, 1),           # one block of 6 groups, stride 2, odd sizes (a spread input grad)
    (2, 32, 64, 2, 7, 9, (3, 5), 1, (2, 1), 2),  # 16 in / 32 out per group: channel tiles 3+3+3+3+3+1, two output
                                                 # blocks; dilation, rectangular kernel and padding
    (5, 32, 16, 2, 1, 23, (1, 3), 1, (0, 1), 1),  # one row (H == 1); 16 in, 8 out per group
    (2, 16, 16, 2, 8, 8, 1, 2, 0, 1),           # 1x1 stride 2: three of the four phases no tap reads
    (4, 64, 64, 8, 5, 6, (2, 4), (2, 1), 0, 1),  # even kernel, unequal strides, no padding
    (3, 16, 16, 2, 9, 10, 3, 3, 1, 1),          # stride 3 with padding: each image's last row and column unread
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_group_lanes_agrees_with_torch(case, dtype):
    N, C, K, groups, H, W, k, s, p, d = case
    torch.manual_seed(0)
    x = torch.randn(N, C, H, W, dtype=dtype, requires_grad=True)
    w = torch.randn(K, C // groups, *((k, k) if isinstance(k, int) else k), dtype=dtype, requires_grad=True)
    b = torch.randn(K, dtype=dtype, requires_grad=True)
    kw = dict(stride=s, padding=p, dilation=d, groups=groups)
    y = F.conv2d(x, w, b, algo="group_lanes", **kw)
    # the reference in float64 whatever the dtype
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = TF.conv2d(xr, wr, br, **kw)
    assert_close(y, ref.to(dtype), algo="group_lanes", what="forward")
    gy = torch.randn_like(ref)
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), torch.autograd.grad(y, (x, w, b), gy.to(dtype)),
                          torch.autograd.grad(ref, (xr, wr, br), gy)):
        assert_close(a, e.to(dtype), algo="group_lanes", what=name)


def test_group_lanes_1d_and_image_blocks(monkeypatch):
    """A 1-D conv (H == 1 inside), and tasks of one image each (``TASK_BYTES`` lowered): the packed buffers are
    reused across image blocks, stale images must not leak into the next block."""
    from fastconv.cpu import group_lanes

    monkeypatch.setattr(group_lanes, "TASK_BYTES", 1)
    torch.manual_seed(1)
    x = torch.randn(5, 24, 23, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, 8, 3, dtype=torch.float64, requires_grad=True)
    y = F.conv1d(x, w, None, padding=1, groups=3, algo="group_lanes")
    ref = TF.conv1d(x, w, None, padding=1, groups=3)
    assert_close(y, ref, algo="group_lanes", what="forward")
    gy = torch.randn_like(ref)
    for name, a, e in zip(("grad_input", "grad_weight"), torch.autograd.grad(y, (x, w), gy),
                          torch.autograd.grad(ref, (x, w), gy)):
        assert_close(a, e, algo="group_lanes", what=name)


def test_group_lanes_weight_gradient_is_the_same_for_any_thread_count():
    """The weight gradient's halves of the batch are added in a fixed order: one thread or two, the same bits."""
    from fastconv.cpu import group_lanes

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 48, 1, 8, 8)).astype(np.float32)
    go = rng.standard_normal((6, 48, 1, 8, 8)).astype(np.float32)
    args = (go, x, (1, 1, 1), (0, 1, 1), (1, 1, 1), 6, (1, 3, 3))
    parallel_kernel = group_lanes._grad_weight_lanes
    a = group_lanes.grad_weight(*args)
    try:
        group_lanes._grad_weight_lanes = parallel_kernel.serial
        b = group_lanes.grad_weight(*args)
    finally:
        group_lanes._grad_weight_lanes = parallel_kernel
    assert np.array_equal(a, b)


@pytest.mark.parametrize("case, why", [
    ("dense", r"grouped convolutions only \(groups > 1\)"),
    ("3-D", r"1-D and 2-D convolutions only, got a 3-D kernel \(3, 3, 3\)"),
    ("4-wide", r"needs a multiple of 8 channels per group in and out .* got 4 in and 8 out"),
    ("padding", r"padding \(3, 1\) reaches past the kernel's extent \(\(k - 1\) \* dilation = \(2, 2\)\)"),
])
def test_group_lanes_refuses_by_name(case, why):
    x, w, groups, kw = torch.randn(1, 16, 6, 6), torch.randn(16, 8, 3, 3), 2, {}
    call, op = F.conv2d, torch.ops.fastconv.conv2d
    if case == "dense":
        w, groups = torch.randn(16, 16, 3, 3), 1
    elif case == "3-D":
        x, w = torch.randn(1, 16, 5, 6, 6), torch.randn(16, 8, 3, 3, 3)
        call, op = F.conv3d, torch.ops.fastconv.conv3d
    elif case == "4-wide":
        w, groups = torch.randn(32, 4, 3, 3), 4
    else:
        kw = dict(padding=(3, 1))
    message = rf"algo='group_lanes' cannot run this convolution \({why}"
    with pytest.raises(ValueError, match=message):
        call(x, w, groups=groups, algo="group_lanes", **kw)
    nd = w.dim() - 2
    padding = list(kw.get("padding", [0] * nd))
    with pytest.raises(ValueError, match=message):
        op(x, w, None, [1] * nd, padding, [0] * nd, [1] * nd, groups, "group_lanes")


def test_group_lanes_counts_the_spare_lanes():
    """The executed multiplications: whole blocks of eight groups (55 groups compute 56)."""
    from fastconv.cpu import group_lanes

    n = group_lanes.executed_multiplications(8, 440, 440, 55, (1, 3, 3), (1, 4, 4))
    assert n == 56 * 8 * 8 * 16 * 8 * 9
