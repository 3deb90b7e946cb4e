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
