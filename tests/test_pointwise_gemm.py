"""The im2col algorithm's 1x1 fast paths (:mod:`fastconv.cpu.pointwise`, watched through
``fastconv.cpu.algorithms._pointwise_forward``, ``_pointwise_grad_input`` and ``_pointwise_grad_weight``): the
three passes of a 1x1, unpadded, ungrouped conv (any stride) run their GEMMs on the tensors themselves instead
of through the numpy kernel.

Checked against torch in float64 and float32 (with and without bias, batch 1 and 3, 1-D to 3-D), with a spy
that proves the fast path ran (or, for the geometries it must not take, did not run), and with non-finite
operands, which the path takes too: an unpadded 1x1 product forms exactly torch's pairs, so NaN and infinities
land where torch's conv puts them (checked on fastconv's own GEMM and on torch's).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF

import fastconv.functional as F
from fastconv.cpu import algorithms, jit_gemm, micro_gemm, parallel_gemm, pointwise
from helpers import assert_close


@pytest.fixture(params=["own", "library"])
def gemm_route(request, monkeypatch):
    """Runs a test with the 1x1 products on fastconv's own GEMM (its size floors lowered so the small test
    layers take it) and on torch's; the own route must have been taken."""
    own = request.param == "own"
    previous = jit_gemm.use_own_gemm(own)
    calls = []
    if own:
        monkeypatch.setattr(pointwise, "OWN_GEMM_MIN_REDUCTION", 1)
        monkeypatch.setattr(pointwise, "OWN_GEMM_MIN_PIXELS", 1)
        monkeypatch.setattr(pointwise, "OWN_GEMM_MIN_MACS_ONE_IMAGE", 1)
        monkeypatch.setattr(pointwise, "OWN_GRAD_WEIGHT_MIN_CHANNELS", 1)
        monkeypatch.setattr(pointwise, "OWN_GRAD_WEIGHT_MIN_WEIGHTS", 0)
        monkeypatch.setattr(pointwise, "AVX2_OWN_GEMM_MIN_CHANNELS", 1)
        monkeypatch.setattr(pointwise, "AVX2_OWN_GEMM_MAX_PIXELS", 1 << 30)
        real = parallel_gemm.matmul
        monkeypatch.setattr(parallel_gemm, "matmul", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    try:
        yield request.param
    finally:
        jit_gemm.use_own_gemm(previous)
    if own:
        assert calls, "the own GEMM route was not taken"


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


@pytest.fixture
def grad_spy(monkeypatch):
    """Counts, per gradient pass, the calls its 1x1 path took and the ones it handed to the kernel."""
    calls = {"grad_input": [0, 0], "grad_weight": [0, 0]}

    def counting(name, real):
        def fn(*args):
            out = real(*args)
            calls[name][0 if out is not None else 1] += 1
            return out
        return fn

    monkeypatch.setattr(algorithms, "_pointwise_grad_input",
                        counting("grad_input", algorithms._pointwise_grad_input))
    monkeypatch.setattr(algorithms, "_pointwise_grad_weight",
                        counting("grad_weight", algorithms._pointwise_grad_weight))
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("N,spatial", [(1, (1, 1)), (3, (5, 7)), (2, (9,)), (2, (3, 4, 5))])
def test_pointwise_matches_torch_and_takes_the_gemm(spy, gemm_route, dtype, bias, N, spatial):
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
def test_strided_pointwise_matches_torch_and_takes_the_gemm(spy, gemm_route, N, spatial, stride):
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


@pytest.mark.parametrize("K", [5, 2])  # 5: an expanding layer (the result larger than the operands)
def test_nonfinite_operands_give_torchs_result_on_the_gemm(spy, gemm_route, K):
    if algorithms.blas.GEMM_LIBRARY != "torch":
        pytest.skip("FASTCONV_GEMM=numpy: the 1x1 path runs through the numpy kernel")
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64) + 0.5
    x[0, 1, 2, 3] = math.inf
    x[1, 0, 0, 0] = math.nan
    w = torch.rand(K, 3, 1, 1, dtype=torch.float64) + 0.5
    w[K - 1, 1] = 0.0  # 0 * Inf: NaN in the last channel at that pixel, +Inf in the others
    b = torch.tensor([0.0, -math.inf, 1.0, 2.0, 3.0][:K], dtype=torch.float64)
    got = F.conv2d(x, w, b, algo="im2col")
    want = TF.conv2d(x, w, b)
    assert want.isnan().any() and want.isinf().any()  # the case must hold both kinds
    assert_close(got, want, algo="im2col", what=f"non-finite 1x1, {K} output channels")
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert spy == {"taken": 1, "declined": 0}



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
def test_pointwise_gradients_and_opcheck_with_operands_that_require_grad(spy, gemm_route, N, bias, stride):
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


def _gradient_ops(x, w, gy, stride):
    """The two gradient ops of a 1x1 conv2d with im2col, called directly."""
    args = ([stride, stride], [0, 0], [0, 0], [1, 1], 1, "im2col")
    gi = torch.ops.fastconv.conv2d_grad_input(gy, w, list(x.shape[2:]), *args)
    gw = torch.ops.fastconv.conv2d_grad_weight(gy, x, [1, 1], *args)
    return gi, gw


# (N, C, K, H, W): one image; a batched GEMM over few weights; one GEMM over the batch (small planes); one
# GEMM per image (large planes) -- the weight gradient's three ways (pointwise.GW_* thresholds)
_GRAD_SHAPES = [(1, 5, 3, 4, 6), (3, 5, 3, 4, 6), (2, 130, 129, 3, 3), (2, 130, 129, 9, 9)]


@pytest.mark.parametrize("N,C,K,H,W", _GRAD_SHAPES)
@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_gradients_match_torch_and_take_the_gemm(grad_spy, gemm_route, N, C, K, H, W, stride):
    if algorithms.blas.GEMM_LIBRARY != "torch":
        pytest.skip("FASTCONV_GEMM=numpy: the 1x1 path runs through the numpy kernel")
    g = torch.Generator().manual_seed(N * 100 + C + stride)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(K, C, 1, 1, generator=g, dtype=torch.float64)
    gy = torch.randn(N, K, (H - 1) // stride + 1, (W - 1) // stride + 1, generator=g, dtype=torch.float64)
    want_gi, want_gw, _ = torch.ops.aten.convolution_backward(gy, x, w, None, [stride] * 2, [0, 0], [1, 1], False,
                                                             [0, 0], 1, [True, True, False])
    gi, gw = _gradient_ops(x, w, gy, stride)
    assert_close(gi, want_gi, algo="im2col", what=f"1x1 input gradient, stride {stride}")
    assert_close(gw, want_gw, algo="im2col", what=f"1x1 weight gradient, stride {stride}")
    assert gi.is_contiguous() and gw.is_contiguous()
    assert grad_spy == {"grad_input": [1, 0], "grad_weight": [1, 0]}


def test_pointwise_gradients_read_a_channel_slice_in_place(grad_spy):
    """ShuffleNet's 1x1 convs read one half of a ``chunk``: such a view is read as rows without a copy, and the
    results equal torch's for the forward and both gradients (through autograd)."""
    if algorithms.blas.GEMM_LIBRARY != "torch":
        pytest.skip("FASTCONV_GEMM=numpy: the 1x1 path runs through the numpy kernel")
    g = torch.Generator().manual_seed(3)
    whole = torch.randn(3, 8, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(3, 7, 5, 6, generator=g, dtype=torch.float64)
    half = whole.chunk(2, dim=1)[1]
    assert not half.is_contiguous()
    got = torch.autograd.grad(F.conv2d(half, w, algo="im2col"), (whole, w), gy)
    want = torch.autograd.grad(TF.conv2d(half, w), (whole, w), gy)
    for a, b, what in zip(got, want, ("input", "weight")):
        assert_close(a, b, algo="im2col", what=f"{what} gradient through a chunk")
    assert grad_spy == {"grad_input": [1, 0], "grad_weight": [1, 0]}


def test_channels_last_gradients_keep_the_kernel(grad_spy):
    """A channels_last output gradient cannot be read as rows: the kernel, which keeps the layout, runs."""
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    w = torch.randn(4, 6, 1, 1, dtype=torch.float64)
    gy = torch.randn(2, 4, 5, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    want_gi, want_gw, _ = torch.ops.aten.convolution_backward(gy, x, w, None, [1, 1], [0, 0], [1, 1], False,
                                                             [0, 0], 1, [True, True, False])
    gi, gw = _gradient_ops(x, w, gy, 1)
    assert_close(gi, want_gi, algo="im2col", what="channels_last input gradient")
    assert_close(gw, want_gw, algo="im2col", what="channels_last weight gradient")
    assert gi.is_contiguous(memory_format=torch.channels_last)
    assert grad_spy == {"grad_input": [0, 1], "grad_weight": [0, 1]}


def test_nonfinite_gradients_give_torchs_result_on_the_gemm(grad_spy, gemm_route):
    """A NaN or an infinity in the output gradient: both gradient passes stay on the GEMMs and put NaN and
    infinities where torch's conv backward does."""
    if algorithms.blas.GEMM_LIBRARY != "torch":
        pytest.skip("FASTCONV_GEMM=numpy: the 1x1 path runs through the numpy kernel")
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64) + 0.5
    w = torch.rand(5, 3, 1, 1, dtype=torch.float64) + 0.5
    w[2, 1] = 0.0
    gy = torch.rand(2, 5, 4, 4, dtype=torch.float64)
    gy[0, 2, 1, 1] = math.inf
    gy[1, 3, 0, 2] = math.nan
    want_gi, want_gw, _ = torch.ops.aten.convolution_backward(gy, x, w, None, [1, 1], [0, 0], [1, 1], False,
                                                             [0, 0], 1, [True, True, False])
    gi, gw = _gradient_ops(x, w, gy, 1)
    assert_close(gi, want_gi, algo="im2col", what="non-finite 1x1 input gradient")
    assert_close(gw, want_gw, algo="im2col", what="non-finite 1x1 weight gradient")
    for got, want in ((gi, want_gi), (gw, want_gw)):
        assert want.isnan().any()
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert grad_spy == {"grad_input": [1, 0], "grad_weight": [1, 0]}


@pytest.mark.parametrize("N,C,K,H,W", _GRAD_SHAPES[:3])
def test_pointwise_gradient_ops_pass_gradcheck_and_opcheck(grad_spy, gemm_route, N, C, K, H, W):
    """The gradient ops are differentiable ops themselves (double backward): gradcheck through them, and
    opcheck of each, in float64."""
    if algorithms.blas.GEMM_LIBRARY != "torch":
        pytest.skip("FASTCONV_GEMM=numpy: the 1x1 path runs through the numpy kernel")
    C, K = min(C, 6), min(K, 5)  # gradcheck's numerical Jacobian grows with every element
    g = torch.Generator().manual_seed(N + C)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(K, C, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(N, K, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    args = ([1, 1], [0, 0], [0, 0], [1, 1], 1, "im2col")
    assert torch.autograd.gradcheck(
        lambda gy, w: torch.ops.fastconv.conv2d_grad_input(gy, w, [H, W], *args), (gy, w))
    assert torch.autograd.gradcheck(
        lambda gy, x: torch.ops.fastconv.conv2d_grad_weight(gy, x, [1, 1], *args), (gy, x))
    torch.library.opcheck(torch.ops.fastconv.conv2d_grad_input.default, (gy, w, [H, W], *args))
    torch.library.opcheck(torch.ops.fastconv.conv2d_grad_weight.default, (gy, x, [1, 1], *args))
    assert grad_spy["grad_input"][0] >= 1 and grad_spy["grad_weight"][0] >= 1


def test_a_nonfinite_bias_alone_gives_torchs_result(spy, gemm_route):
    """An infinite or NaN bias with a finite input and weight (an expanding layer): the GEMM adds it as torch's
    conv does."""
    if algorithms.blas.GEMM_LIBRARY != "torch":
        pytest.skip("FASTCONV_GEMM=numpy: the 1x1 path runs through the numpy kernel")
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64)
    w = torch.rand(6, 2, 1, 1, dtype=torch.float64)
    b = torch.tensor([0.0, math.inf, 1.0, -math.inf, math.nan, 3.0], dtype=torch.float64)
    got, want = F.conv2d(x, w, b, algo="im2col"), TF.conv2d(x, w, b)
    assert_close(got, want, algo="im2col", what="non-finite bias")
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert spy == {"taken": 1, "declined": 0}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channel_slice", [False, True])
def test_small_planes_multiply_the_whole_batch_in_one_gemm(monkeypatch, bias, stride, channel_slice):
    """Planes of at most ONE_GEMM_MAX_PIXELS pixels: the forward's and the input gradient's per-image products
    run as one GEMM over the batch's pixels side by side (a spy proves it ran); the results equal torch's in
    float64, for a channel slice of a wider input (ShuffleNet) too. The weight threshold is lowered here so that
    a small layer takes that branch."""
    if algorithms.blas.GEMM_LIBRARY != "torch":
        pytest.skip("FASTCONV_GEMM=numpy: the 1x1 path runs through the numpy kernel")
    from fastconv.cpu import pointwise
    monkeypatch.setattr(pointwise, "ONE_GEMM_MIN_WEIGHTS", 0)
    taken = []
    real = pointwise._one_gemm_over_batch
    monkeypatch.setattr(pointwise, "_one_gemm_over_batch", lambda a, b3: taken.append(real(a, b3)) or taken[-1])
    g = torch.Generator().manual_seed(11 + stride)
    whole = torch.randn(3, 10, 5, 6, generator=g, dtype=torch.float64)
    x = (whole[:, 2:8] if channel_slice else whole[:, :6].contiguous()).requires_grad_()
    w = torch.randn(7, 6, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    got = F.conv2d(x, w, b, stride=stride, algo="im2col")
    want = TF.conv2d(x, w, b, stride=stride)
    assert_close(got, want, algo="im2col", what="1x1 forward as one GEMM over the batch")
    gy = torch.randn(got.shape, generator=g, dtype=torch.float64)
    got_gx, got_gw = torch.autograd.grad(got, (x, w), gy)
    want_gx, want_gw = torch.autograd.grad(want, (x, w), gy)
    assert_close(got_gx, want_gx, algo="im2col", what="1x1 input gradient as one GEMM over the batch")
    assert_close(got_gw, want_gw, algo="im2col", what="1x1 weight gradient")
    # (a strided conv of a non-contiguous input leaves its forward to the kernel that keeps the input's layout)
    expected = [True] if stride > 1 and channel_slice else [True, True]
    assert taken == expected, "forward and input gradient should take the one-GEMM branch"
    args = ([stride, stride], [0, 0], [0, 0], [1, 1], 1, "im2col")
    torch.library.opcheck(torch.ops.fastconv.conv2d.default, (x, w, b, *args))
    torch.library.opcheck(torch.ops.fastconv.conv2d_grad_input.default, (gy, w, list(x.shape[2:]), *args))


def test_large_planes_keep_the_batched_gemm(monkeypatch):
    from fastconv.cpu import pointwise
    monkeypatch.setattr(pointwise, "ONE_GEMM_MIN_WEIGHTS", 0)
    a = torch.randn(4, 3)
    assert pointwise._one_gemm_over_batch(a, torch.randn(2, 3, pointwise.ONE_GEMM_MAX_PIXELS))
    assert not pointwise._one_gemm_over_batch(a, torch.randn(2, 3, pointwise.ONE_GEMM_MAX_PIXELS + 1))
    assert not pointwise._one_gemm_over_batch(a, torch.randn(1, 3, 4))  # one image: a plain GEMM anyway


@pytest.mark.parametrize("bias", [True, False])
def test_own_gemm_lays_small_planes_side_by_side(monkeypatch, bias):
    """On the own GEMM, planes under OWN_GEMM_MIN_PIXELS go through one product over the batch's pixels side by
    side (a spy sees one image of N*P pixels); forward and input gradient equal torch's in float64."""
    previous = jit_gemm.use_own_gemm(True)
    monkeypatch.setattr(pointwise, "OWN_GEMM_MIN_REDUCTION", 1)
    monkeypatch.setattr(pointwise, "OWN_GRAD_WEIGHT_MIN_CHANNELS", 1)
    monkeypatch.setattr(pointwise, "OWN_GRAD_WEIGHT_MIN_WEIGHTS", 0)
    monkeypatch.setattr(pointwise, "AVX2_OWN_GEMM_MIN_CHANNELS", 1)
    seen = []
    real = parallel_gemm.matmul
    monkeypatch.setattr(parallel_gemm, "matmul", lambda a, b3, *rest, **kw: seen.append(b3.shape) or real(a, b3, *rest, **kw))
    try:
        g = torch.Generator().manual_seed(5)
        x = torch.randn(3, 6, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.randn(5, 6, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
        b = torch.randn(5, generator=g, dtype=torch.float64) if bias else None
        got = F.conv2d(x, w, b, algo="im2col")
        want = TF.conv2d(x, w, b)
        assert_close(got, want, algo="im2col", what="own 1x1 forward, planes side by side")
        gy = torch.randn(got.shape, generator=g, dtype=torch.float64)
        assert_close(torch.autograd.grad(got, x, gy)[0], torch.autograd.grad(want, x, gy)[0], algo="im2col",
                     what="own 1x1 input gradient, planes side by side")
    finally:
        jit_gemm.use_own_gemm(previous)
    # forward and input gradient side by side; the weight gradient sums the images' products (b is x^T per image)
    assert sorted(seen) == [(1, 5, 18), (1, 6, 18), (3, 6, 6)]


@pytest.mark.parametrize("own", [True, False])
def test_side_by_side_workspaces_never_reach_a_result(monkeypatch, own):
    """The side-by-side copies and products of small planes live in reused workspaces: a result must own its
    memory, so a second call on other inputs leaves the first call's results as they were (and both equal
    torch's in float64), on the own GEMM and on torch's."""
    previous = jit_gemm.use_own_gemm(own)
    monkeypatch.setattr(pointwise, "ONE_GEMM_MIN_WEIGHTS", 0)
    monkeypatch.setattr(pointwise, "OWN_GEMM_MIN_REDUCTION", 1)
    monkeypatch.setattr(pointwise, "AVX2_OWN_GEMM_MIN_CHANNELS", 1)
    monkeypatch.setattr(pointwise, "SIDE_BY_SIDE_SCRATCH", True)
    try:
        g = torch.Generator().manual_seed(11)
        N, C, K, P = 3, 40, 24, 4
        calls = []
        for _ in range(2):
            x = torch.randn(N, C, P, generator=g, dtype=torch.float64)
            w = torch.randn(K, C, generator=g, dtype=torch.float64)
            gy = torch.randn(N, K, P, generator=g, dtype=torch.float64)
            got = (pointwise._batch_mm(w, x), pointwise._batch_mm(w.t(), gy), pointwise._torch_grad_weight(gy, x))
            want = (torch.matmul(w, x), torch.matmul(w.t(), gy), torch.einsum("nkp,ncp->kc", gy, x))
            calls.append((got, want))
        for got, want in calls:
            for what, a, b in zip(("forward", "input gradient", "weight gradient"), got, want):
                assert_close(a, b, algo="im2col", what=f"side-by-side {what} (own GEMM {own})")
    finally:
        jit_gemm.use_own_gemm(previous)


def test_strided_inputs_copied_to_a_workspace_leave_earlier_results_alone(monkeypatch):
    """A strided 1x1 conv copies the pixels it reads into a reused workspace: two calls on other inputs give
    torch's forward and both gradients in float64, the first call's results unchanged by the second."""
    copies = []
    real = pointwise._strided
    monkeypatch.setattr(pointwise, "_strided", lambda x, geom: copies.append(geom.stride) or real(x, geom))
    g = torch.Generator().manual_seed(12)
    results = []
    for _ in range(2):
        x = torch.randn(2, 6, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.randn(4, 6, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
        got = F.conv2d(x, w, stride=2, algo="im2col")
        want = TF.conv2d(x, w, stride=2)
        gy = torch.randn(got.shape, generator=g, dtype=torch.float64)
        results.append((got, want, torch.autograd.grad(got, (x, w), gy), torch.autograd.grad(want, (x, w), gy)))
    for got, want, got_grads, want_grads in results:
        assert_close(got, want, algo="im2col", what="strided 1x1 forward")
        for what, a, b in zip(("input", "weight"), got_grads, want_grads):
            assert_close(a, b, algo="im2col", what=f"strided 1x1 {what} gradient")
    assert copies and all(stride == (1, 2, 2) for stride in copies)  # the workspace path ran


def test_own_weight_gradient_leaves_few_weights_on_small_planes_to_torch(monkeypatch):
    """The own GEMM's weight gradient declines layers of at most GW_BATCHED_MAX_WEIGHTS weights on planes of at most
    OWN_GRAD_WEIGHT_SMALL_PLANE pixels (torch's batched GEMM and a sum were faster: ShuffleNet's 58 -> 58 at 16x16)
    and takes larger planes and larger layers; what it returns equals torch's in float64."""
    monkeypatch.setattr(micro_gemm, "HOST_HAS_AVX512", True)  # (AVX2 hosts decline narrow layers on other rules)
    previous = jit_gemm.use_own_gemm(True)
    try:
        small = pointwise.OWN_GRAD_WEIGHT_SMALL_PLANE
        g = torch.Generator().manual_seed(9)
        for K, C, P, own in ((58, 58, small, False), (58, 58, 4 * small, True), (128, 160, small, True)):
            gy = torch.randn(2, K, P, generator=g, dtype=torch.float64)
            xr = torch.randn(2, C, P, generator=g, dtype=torch.float64)
            gw = pointwise._own_grad_weight(gy, xr)
            assert (gw is not None) == own, (K, C, P)
            if own:
                assert_close(gw, torch.einsum("nkp,ncp->kc", gy, xr), algo="im2col", what=f"own {K}x{C} gw")
    finally:
        jit_gemm.use_own_gemm(previous)


def test_avx2_hosts_leave_narrow_and_large_plane_products_to_the_library(monkeypatch):
    """Without 512-bit vectors the own 1x1 route declines few channels and large planes (MKL runs the same AVX2
    code faster there) and takes the rest; with them the limits do not apply."""
    monkeypatch.setattr(micro_gemm, "HOST_HAS_AVX512", False)
    assert pointwise._avx2_declines(116, 116, 64)
    assert pointwise._avx2_declines(1024, 256, 1024)
    assert pointwise._avx2_declines(144, 24, None)
    assert not pointwise._avx2_declines(1024, 256, 64)
    assert not pointwise._avx2_declines(512, 1024, None)
    monkeypatch.setattr(micro_gemm, "HOST_HAS_AVX512", True)
    assert not pointwise._avx2_declines(116, 116, 4096)


@pytest.mark.parametrize("channel_slice", [False, True])
def test_single_pixel_batches_are_one_gemm_with_torchs_gradients(channel_slice):
    # Squeeze-and-excitation convs (1x1 planes, batch > 1) run as one (N, C) x (C, K) GEMM; a channel slice of a
    # wider tensor (not contiguous) reads its rows in place. Forward and both gradients against torch.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 14 if channel_slice else 7, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 7, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)

    def conv(fn, x, w, b):
        return fn(x[:, 3:10] if channel_slice else x, w, b)

    got = conv(lambda *t: F.conv2d(*t, algo="im2col"), x, w, b)
    want = conv(TF.conv2d, x, w, b)
    assert_close(got, want, algo="im2col", what="single-pixel forward")
    gy = torch.randn_like(want)
    for a, t, name in zip(torch.autograd.grad(got, (x, w, b), gy), torch.autograd.grad(want, (x, w, b), gy),
                          ("input", "weight", "bias")):
        assert_close(a, t, algo="im2col", what=f"single-pixel {name} gradient")
    assert torch.autograd.gradcheck(lambda *t: conv(lambda *u: F.conv2d(*u, algo="im2col"), *t), (x, w, b))
