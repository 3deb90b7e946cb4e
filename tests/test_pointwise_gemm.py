"""The im2col algorithm's 1x1 fast path (``fastconv.cpu.algorithms._pointwise_forward``): a 1x1, unpadded,
ungrouped forward (any stride) runs its GEMM on the tensors themselves instead of through the numpy kernel.

Checked against torch in float64 and float32 (with and without bias, batch 1 and 3, 1-D to 3-D), with a spy
that proves the fast path ran (or, for the geometries it must not take, did not run), and with non-finite
operands, where the path hands the call to the kernel's exact handling.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF

import fastconv.functional as F
from fastconv.cpu import algorithms
from helpers import assert_close


@pytest.fixture
def spy(monkeypatch):
    calls = {"taken": 0, "declined": 0}
    real = algorithms._pointwise_forward

    def counting(*args):
        out = real(*args)
        calls["taken" if out is not None else "declined"] += 1
        return out

    monkeypatch.setattr(algorithms, "_pointwise_forward", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("N,spatial", [(1, (1, 1)), (3, (5, 7)), (2, (9,)), (2, (3, 4, 5))])
def test_pointwise_matches_torch_and_takes_the_gemm(spy, dtype, bias, N, spatial):
    if algorithms.blas.GEMM_LIBRARY != "torch":
        pytest.skip("FASTCONV_GEMM=numpy: the 1x1 path runs through the numpy kernel")
    g = torch.Generator().manual_seed(len(spatial) * 10 + N)
    x = torch.randn(N, 6, *spatial, generator=g, dtype=dtype)
    w = torch.randn(4, 6, *(1,) * len(spatial), generator=g, dtype=dtype)
    b = torch.randn(4, generator=g, dtype=dtype) if bias else None
    conv = {1: (F.conv1d, TF.conv1d), 2: (F.conv2d, TF.conv2d), 3: (F.conv3d, TF.conv3d)}[len(spatial)]
    got = conv[0](x, w, b, algo="im2col")
    assert_close(got, conv[1](x, w, b), algo="im2col", what="1x1 forward")
    assert got.is_contiguous()
    assert spy == {"taken": 1, "declined": 0}


@pytest.mark.parametrize("N,spatial,stride", [(2, (9, 8), 2), (1, (7, 10), (3, 2)), (2, (11,), 4),
                                               (2, (3, 5, 6), (1, 2, 3))])
def test_strided_pointwise_matches_torch_and_takes_the_gemm(spy, N, spatial, stride):
    if algorithms.blas.GEMM_LIBRARY != "torch":
        pytest.skip("FASTCONV_GEMM=numpy: the 1x1 path runs through the numpy kernel")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, 5, *spatial, generator=g, dtype=torch.float64)
    w = torch.randn(3, 5, *(1,) * len(spatial), generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    conv = {1: (F.conv1d, TF.conv1d), 2: (F.conv2d, TF.conv2d), 3: (F.conv3d, TF.conv3d)}[len(spatial)]
    assert_close(conv[0](x, w, b, stride=stride, algo="im2col"), conv[1](x, w, b, stride=stride), algo="im2col",
                 what=f"1x1 stride {stride}")
    assert spy == {"taken": 1, "declined": 0}


@pytest.mark.parametrize("kw", [dict(padding=1), dict(groups=2)])
def test_other_1x1_geometries_keep_the_kernel(spy, kw):
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    w = torch.randn(4, 6 // kw.get("groups", 1), 1, 1, dtype=torch.float64)
    assert_close(F.conv2d(x, w, algo="im2col", **kw), TF.conv2d(x, w, **kw), algo="im2col", what=str(kw))
    assert spy == {"taken": 0, "declined": 0}


def test_nonfinite_operands_get_the_exact_result(spy):
    if algorithms.blas.GEMM_LIBRARY != "torch":
        pytest.skip("FASTCONV_GEMM=numpy: the 1x1 path runs through the numpy kernel")
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64) + 0.5
    x[0, 1, 2, 3] = math.inf
    x[1, 0, 0, 0] = math.nan
    w = torch.rand(5, 3, 1, 1, dtype=torch.float64) + 0.5
    w[2, 1] = 0.0  # 0 * Inf: NaN in channel 2 at that pixel, +Inf in the others
    b = torch.tensor([0.0, -math.inf, 1.0, 2.0, 3.0], dtype=torch.float64)
    got = F.conv2d(x, w, b, algo="im2col")
    assert_close(got, TF.conv2d(x, w, b), algo="im2col", what="non-finite 1x1")
    assert spy == {"taken": 0, "declined": 1}



def test_batched_gemm_gets_operands_that_do_not_require_grad(spy, monkeypatch):
    """A module's weight requires grad even under ``no_grad``, and ``torch.matmul`` of a 2-D by a 3-D operand
    then takes a route 4x slower (MobileNet-v2's 1x1 layers at batch 8 ran 1.5x torch's time): the batched GEMM
    must see detached operands. The result still equals torch's."""
    if algorithms.blas.GEMM_LIBRARY != "torch":
        pytest.skip("FASTCONV_GEMM=numpy: the 1x1 path runs through the numpy kernel")
    seen = []
    real_matmul = torch.matmul

    def matmul(a, b, *args, **kwargs):
        seen.append((a.requires_grad, b.requires_grad))
        return real_matmul(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "matmul", matmul)
    layer = torch.nn.Conv2d(6, 4, 1, bias=False).double()
    x = torch.randn(3, 6, 5, 7, dtype=torch.float64)
    with torch.no_grad():
        got = F.conv2d(x, layer.weight, algo="im2col")
        want = TF.conv2d(x, layer.weight)
    assert_close(got, want, algo="im2col", what="batched 1x1 with a weight that requires grad")
    assert spy == {"taken": 1, "declined": 0}
    assert seen == [(False, False)]


@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_gradients_and_opcheck_with_operands_that_require_grad(spy, N, bias, stride):
    """The single-image GEMM runs on the operands as they are (no ``detach``): through the dispatcher, with
    every operand requiring grad, the op still records exactly its own autograd formula: gradcheck,
    gradgradcheck and opcheck in float64, and the path really ran."""
    if algorithms.blas.GEMM_LIBRARY != "torch":
        pytest.skip("FASTCONV_GEMM=numpy: the 1x1 path runs through the numpy kernel")
    g = torch.Generator().manual_seed(N * 10 + stride)
    x = torch.randn(N, 5, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True) if bias else None

    def conv(x, w, b):
        return F.conv2d(x, w, b, stride=stride, algo="im2col")

    assert_close(conv(x, w, b), TF.conv2d(x, w, b, stride=stride), algo="im2col", what="1x1 with grads")
    assert spy["taken"] >= 1
    assert torch.autograd.gradcheck(conv, (x, w, b))
    assert torch.autograd.gradgradcheck(conv, (x, w, b))
    torch.library.opcheck(torch.ops.fastconv.conv2d.default,
                          (x, w, b, [stride, stride], [0, 0], [0, 0], [1, 1], 1, "im2col"))
