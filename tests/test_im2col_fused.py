"""The fused im2col path (``fastconv.cpu.im2col_fused``): which convs take it, how it cuts the work, and its
results through the public API (forward, gradients, gradcheck) at the sizes where it runs by default.

The kernel matrix of ``tests/test_cpu_conv_kernels.py`` also runs every dense 1-D/2-D case through it
("im2col-fused": any size, single-row chunks, the parallel region forced).

The gather kernels, which the default rules now prefer for many of these sizes, are switched off here (they have
their own tests, ``tests/test_im2col_gather.py``): this file checks the column fills and the taps kernels.
"""
from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import fastconv.functional as F
from fastconv.cpu import conv as cc
from fastconv.cpu import im2col_fused, memory
from helpers import allocations, assert_close, bytes_allocated


@pytest.fixture(autouse=True)
def no_gather(monkeypatch):
    """The column fills and the taps kernels, not the gather kernels (see the module docstring)."""
    monkeypatch.setattr(im2col_fused, "GATHER", False)


@pytest.fixture
def spy(monkeypatch):
    """The fused forward's calls (each one a list of its arguments)."""
    calls = []
    real = im2col_fused.forward
    monkeypatch.setattr(im2col_fused, "forward", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def test_which_convs_take_it():
    f32 = 4
    assert im2col_fused.applies((1, 3, 3), 1, 64, 64, (1, 32, 32), (1, 32, 32), f32)
    assert im2col_fused.applies((1, 1, 5), 1, 16, 8, (1, 1, 40), (1, 1, 36), f32)  # 1-D
    assert not im2col_fused.applies((1, 3, 3), 2, 64, 64, (1, 32, 32), (1, 32, 32), f32)  # grouped
    assert not im2col_fused.applies((3, 3, 3), 1, 64, 64, (8, 8, 8), (6, 6, 6), f32)  # 3-D
    assert not im2col_fused.applies((1, 1, 1), 1, 64, 64, (1, 8, 8), (1, 8, 8), f32)  # 1x1: a plain GEMM
    assert im2col_fused.applies((1, 7, 7), 1, 3, 64, (1, 128, 128), (1, 64, 64), f32)  # an RGB stem, since the flat fills
    assert im2col_fused.applies((1, 3, 3), 1, 256, 256, (1, 8, 8), (1, 8, 8), f32)  # 2.4 MB
    # large weights (beyond LARGE_WEIGHT_BYTES) take longer chunks, so their tall columns fit: ResNet's 512 -> 512
    # (9.4 MB, 4608 long), AlexNet's 384 -> 256 (3.5 MB, 3456 long) ...
    assert im2col_fused.applies((1, 3, 3), 1, 512, 512, (1, 4, 4), (1, 4, 4), f32)
    assert im2col_fused.applies((1, 3, 3), 1, 384, 256, (1, 7, 7), (1, 7, 7), f32)
    # ... but not beyond MAX_FORWARD_WEIGHT_BYTES, and not the weight gradient beyond MAX_WEIGHT_BYTES
    assert not im2col_fused.applies((1, 3, 3), 1, 2048, 1024, (1, 4, 4), (1, 4, 4), f32)  # 75 MB
    longer = im2col_fused.MIN_GRAD_WEIGHT_CHUNK_COLUMNS
    assert not im2col_fused.applies((1, 3, 3), 1, 512, 512, (1, 4, 4), (1, 4, 4), f32, longer)
    # columns too tall for a (1 MB) chunk of small weights to hold MIN_CHUNK_COLUMNS output positions: the input
    # gradient of AlexNet's 64 -> 192 5x5 (1.2 MB of weights; the flipped conv reduces over 192 * 25)
    assert not im2col_fused.applies((1, 5, 5), 1, 192, 64, (1, 15, 15), (1, 15, 15), f32)


def test_large_weights_take_longer_chunks():
    """Forwards whose weights exceed LARGE_WEIGHT_BYTES plan their chunks by LARGE_WEIGHT_CHUNK_BYTES (each chunk's
    GEMM streams all the weights: fewer chunks, fewer reads); the weight gradient keeps CHUNK_BYTES."""
    f32 = 4
    small, large = im2col_fused.LARGE_WEIGHT_BYTES, im2col_fused.LARGE_WEIGHT_BYTES + 1
    assert im2col_fused.forward_chunk_bytes(small) == im2col_fused.CHUNK_BYTES
    assert im2col_fused.forward_chunk_bytes(large) == im2col_fused.LARGE_WEIGHT_CHUNK_BYTES
    assert im2col_fused.LARGE_WEIGHT_CHUNK_BYTES > im2col_fused.CHUNK_BYTES
    # ResNet's 512 -> 512 at 7x7, batch 8: 392 columns of 18 KB (7.2 MB) over 2 tasks
    N, K, CK, OH, OW = 8, 512, 4608, 7, 7
    _, tasks, rpc_forward, _, _ = im2col_fused._layout(N, K, CK, OH, OW, f32)
    _, _, rpc_weight_gradient, _, _ = im2col_fused._layout(N, K, CK, OH, OW, f32, forward=False)
    if tasks == 2:
        assert rpc_forward * OW * CK * f32 > im2col_fused.CHUNK_BYTES
    assert rpc_weight_gradient * OW * CK * f32 <= im2col_fused.CHUNK_BYTES
    assert rpc_forward >= rpc_weight_gradient


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_weight_forward_matches_torch(spy, dtype):
    """A forward with weights beyond LARGE_WEIGHT_BYTES (ResNet's last 3x3 layer, 512 -> 512 at 4x4) runs on the
    fused region with its long chunks, and matches torch (float64, and float32 at float32's tolerance)."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 512, 4, 4, generator=g, dtype=dtype)
    w = torch.randn(512, 512, 3, 3, generator=g, dtype=dtype) / 48
    b = torch.randn(512, generator=g, dtype=dtype)
    assert 512 * 4608 * x.element_size() > im2col_fused.LARGE_WEIGHT_BYTES
    assert_close(F.conv2d(x, w, b, padding=1, algo="im2col"), TF.conv2d(x, w, b, padding=1), algo="im2col",
                 what="fused, large weights")
    assert spy, "the fused path did not run"


def test_weight_gradient_needs_longer_chunks():
    """The weight gradient's chunk GEMM rereads and rewrites the task's accumulator: it asks for
    MIN_GRAD_WEIGHT_CHUNK_COLUMNS output positions per chunk, the forward for MIN_CHUNK_COLUMNS."""
    f32, longer = 4, im2col_fused.MIN_GRAD_WEIGHT_CHUNK_COLUMNS
    assert longer > im2col_fused.MIN_CHUNK_COLUMNS
    assert im2col_fused.applies((1, 3, 3), 1, 128, 128, (1, 16, 16), (1, 16, 16), f32, longer)  # 1152 long
    assert im2col_fused.applies((1, 3, 3), 1, 256, 256, (1, 8, 8), (1, 8, 8), f32)  # 2304 long: forward only
    assert not im2col_fused.applies((1, 3, 3), 1, 256, 256, (1, 8, 8), (1, 8, 8), f32, longer)


@pytest.mark.parametrize("C,fused", [(64, True), (128, False)])  # float64: 128 * 9 * 8 * 192 > 1 MB
def test_weight_gradient_routing(monkeypatch, C, fused):
    """im2col's weight gradient takes the fused region exactly where applies() says so, and matches torch."""
    calls = []
    real = im2col_fused.grad_weight
    monkeypatch.setattr(im2col_fused, "grad_weight", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, C, 8, 8, generator=g, dtype=torch.float64)
    w = torch.randn(8, C, 3, 3, generator=g, dtype=torch.float64)
    go = torch.randn(2, 8, 8, 8, generator=g, dtype=torch.float64)
    gw = cc.im2col_grad_weight(go.numpy()[:, :, None], x.numpy()[:, :, None], (1, 1, 1), (0, 1, 1), (1, 1, 1), 1,
                               (1, 3, 3))
    expected = torch.nn.grad.conv2d_weight(x, w.shape, go, padding=1)
    assert_close(torch.from_numpy(gw[:, :, 0]), expected)
    assert bool(calls) == fused


@pytest.mark.parametrize("N,K,CK,OH,OW,tasks", [
    (1, 32, 1152, 16, 16, 2), (8, 64, 576, 32, 32, 2), (1, 64, 27, 3, 3, 2), (1, 512, 2304, 4, 4, 2),
    (3, 8, 18, 1, 40, 4), (1, 4, 9, 1, 1, 2), (2, 16, 144, 5, 7, 1), (8, 512, 4608, 4, 4, 2),
    (8, 512, 4608, 7, 7, 2), (8, 256, 2304, 14, 14, 2)])
@pytest.mark.parametrize("chunk_bytes", [im2col_fused.CHUNK_BYTES, im2col_fused.LARGE_WEIGHT_CHUNK_BYTES])
def test_plan_covers_every_row_and_channel(N, K, CK, OH, OW, tasks, chunk_bytes):
    rpc, kparts = im2col_fused._plan(N, K, CK, OH, OW, 4, tasks, chunk_bytes)
    rows = N * OH
    assert 1 <= rpc <= rows and 1 <= kparts <= max(1, tasks)
    nchunks = -(-rows // rpc)
    if kparts > 1:  # the channels are split only when there is one chunk
        assert nchunks == 1
    if rpc > 1:  # a chunk of several rows stays within the column budget
        assert rpc * CK * OW * 4 <= chunk_bytes or nchunks == 1
    if rows >= tasks and kparts == 1:  # work for every task
        assert nchunks >= tasks


def test_channel_split_between_tasks_matches_torch(spy, monkeypatch):
    """One chunk (a batch-1 4x4 map) with more output channels than the map has positions: each task fills the
    columns and multiplies its part of the channels."""
    if numba.get_num_threads() < 2:
        pytest.skip("needs 2 Numba threads to split the channels between tasks")
    monkeypatch.setattr(im2col_fused, "PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(numba, "get_num_threads", lambda: 2)
    x = torch.randn(1, 16, 4, 4, dtype=torch.float64)
    w = torch.randn(40, 16, 3, 3, dtype=torch.float64)
    b = torch.randn(40, dtype=torch.float64)
    assert im2col_fused._plan(1, 40, 144, 4, 4, 8, 2) == (4, 2)
    assert_close(F.conv2d(x, w, b, padding=1, algo="im2col"), TF.conv2d(x, w, b, padding=1), algo="im2col",
                 what="fused, channels split")
    assert spy, "the fused path did not run"


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (1, 0, 1), (3, 2, 1)])
def test_public_api_forward_and_gradients(spy, stride, padding, dilation):
    """float64 through ``fastconv.functional`` at a size the default rules send to the fused path (16 input
    channels): forward and both gradients against torch, and gradcheck."""
    g = torch.Generator().manual_seed(stride * 10 + padding)
    x = torch.randn(2, 16, 9, 11, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(8, 16, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    kw = dict(stride=stride, padding=padding, dilation=dilation)
    y = F.conv2d(x, w, b, algo="im2col", **kw)
    ref = TF.conv2d(x, w, b, **kw)
    assert_close(y, ref, algo="im2col", what="fused forward")
    assert spy, "the fused path did not run"
    go = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, w, b), go)
    want = torch.autograd.grad(ref, (x, w, b), go)
    for name, a, e in zip(("input", "weight", "bias"), got, want):
        assert_close(a, e, algo="im2col", what=f"fused, grad {name}")
    xs, ws = x[:1, :, :5, :6].detach().requires_grad_(), w[:3].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, c: F.conv2d(a, c, algo="im2col", **kw), (xs, ws))


@pytest.mark.parametrize("K,fused", [(16, True), (40, False)])
def test_stride1_input_gradient_takes_the_flipped_fused_forward_unless_the_conv_expands(spy, monkeypatch, K, fused):
    """A stride-1 dense input gradient over enough positions is the fused forward of the output gradient (20 -> 16
    channels); a conv with more output than input channels (20 -> 40) keeps the plain path, as its flipped conv
    would fill more column entries than its GEMM gives outputs (measured 1.2-2.3x slower). Both match torch."""
    monkeypatch.setattr(cc, "FUSED_GRAD_INPUT_MIN_POSITIONS", 1)
    go = np.random.default_rng(0).standard_normal((2, K, 1, 6, 7))
    w = np.random.default_rng(1).standard_normal((K, 20, 1, 3, 3))
    gx = cc.im2col_grad_input(go, w, (1, 1, 1), (0, 1, 1), (1, 1, 1), 1, (1, 6, 7))
    ref = torch.nn.grad.conv2d_input((2, 20, 6, 7), torch.from_numpy(w[:, :, 0]), torch.from_numpy(go[:, :, 0]),
                                     padding=1)
    np.testing.assert_allclose(gx[:, :, 0], ref.numpy(), rtol=1e-10, atol=1e-10)
    assert len(spy) == (1 if fused else 0)


def test_off_switch_keeps_the_plain_paths(spy, monkeypatch):
    monkeypatch.setattr(im2col_fused, "ENABLED", False)
    x, w = torch.randn(1, 16, 8, 8, dtype=torch.float64), torch.randn(8, 16, 3, 3, dtype=torch.float64)
    assert_close(F.conv2d(x, w, padding=1, algo="im2col"), TF.conv2d(x, w, padding=1), algo="im2col",
                 what="plain path")
    assert not spy


@pytest.mark.parametrize("taps", [False, True])
def test_reported_workspace_is_what_the_fused_forward_allocates(monkeypatch, taps):
    """With the column fills (a column chunk and a GEMM result per task) and on the taps kernel (the padded input
    and a GEMM result per task)."""
    from fastconv import registry
    from fastconv.cpu import jit_gemm
    from fastconv.ops.conv import make_geometry

    monkeypatch.setattr(im2col_fused, "TAPS", taps)
    monkeypatch.setattr(im2col_fused, "TAPS_MIN_OW", 1)
    monkeypatch.setattr(im2col_fused, "GATHER", False)  # on AVX-512 the gather kernel runs stride-1 forwards first
    previous = jit_gemm.use_own_gemm(True)
    try:
        assert im2col_fused.takes_taps((3, 3), (1, 1), 32, 12) == taps
        g = make_geometry(2, 2, 32, 24, 1, (12, 12), (3, 3), None, (1, 1), (1, 1), (1, 1), (1, 1), torch.float32,
                          "numba")
        assert im2col_fused.applies(g.kernel, 1, 32, 24, g.in_spatial, g.out_spatial, 4)
        alg = registry.choose("im2col", g, "forward")
        x = np.zeros((2, 32, 12, 12), np.float32)
        w2 = np.zeros((24, 32 * 9), np.float32)
        y3 = np.empty((2, 24, 144), np.float32)
        im2col_fused.forward(x, w2, None, (3, 3), (1, 1), (1, 1), (1, 1), (12, 12), y3)  # compiled before counting
        memory.clear_scratch()  # (workspaces are reused between calls: count a first call's)
        allocated = bytes_allocated(monkeypatch, im2col_fused, lambda: im2col_fused.forward(
            x, w2, None, (3, 3), (1, 1), (1, 1), (1, 1), (12, 12), y3))
        assert allocated == alg.workspace_bytes(g)  # (the zero bias comes from np.zeros, not counted)
    finally:
        jit_gemm.use_own_gemm(previous)


def test_opcheck_on_the_fused_path(spy, monkeypatch):
    """``torch.ops.fastconv.conv2d`` and its two gradient ops, float64, at a size the default rules send to the fused
    path with 16 input channels (the conv suite's opcheck cases, thin inputs, reach it too since the stems moved
    there; this case stays as the wider one)."""
    monkeypatch.setattr(cc, "FUSED_GRAD_INPUT_MIN_POSITIONS", 1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 7, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 16, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    geometry = ([1, 1], [1, 1], [1, 1], [1, 1], 1, "im2col")  # stride, padding, padding end, dilation, groups
    y = TF.conv2d(x, w, b, padding=1).detach()
    gy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.fastconv.conv2d.default, (x, w, b, *geometry))
    torch.library.opcheck(torch.ops.fastconv.conv2d_grad_input.default,
                          (gy.requires_grad_(), w, list(x.shape[2:]), *geometry))
    torch.library.opcheck(torch.ops.fastconv.conv2d_grad_weight.default, (gy, x, list(w.shape[2:]), *geometry))
    assert spy, "the fused path did not run"


@pytest.mark.parametrize("route", ["gather", "segments"])
@pytest.mark.parametrize("case", [
    # N, C, K, H, W, stride, padding, dilation
    (3, 16, 8, 4, 4, 1, 1, 1),    # DenseNet-like 4x4: chunks span images
    (2, 16, 6, 9, 7, 2, 1, 1),    # stride 2, odd sizes
    (2, 16, 5, 8, 8, 1, 2, 2),    # dilation
    (2, 16, 4, 9, 9, 1, -1, 1),   # negative padding (a crop)
])
def test_both_fills_agree_with_torch(monkeypatch, route, case):
    """Narrow output rows gather their columns from a zero-padded copy (:func:`_fill_gather`), wider ones copy row
    segments (:func:`_fill`); with the threshold moved, each geometry runs either way: forward and weight gradient
    of the fused regions against torch in float64, with a spy on which fill ran."""
    N, C, K, H, W, s, p, d = case
    monkeypatch.setattr(im2col_fused, "TAPS", False)  # stride 1 would take the taps kernel, which fills nothing
    monkeypatch.setattr(im2col_fused, "GATHER_MAX_OW", 64 if route == "gather" else 0)
    monkeypatch.setattr(im2col_fused, "MIN_CHUNK_COLUMNS", 1)
    monkeypatch.setattr(im2col_fused, "MIN_GRAD_WEIGHT_CHUNK_COLUMNS", 1)
    monkeypatch.setattr(im2col_fused, "CHUNK_BYTES", 16 * 9 * 8 * 5)  # a few rows per chunk: many chunks
    sources = []
    real = im2col_fused._gather_source
    monkeypatch.setattr(im2col_fused, "_gather_source", lambda *a: sources.append(real(*a)) or sources[-1])
    rng = np.random.default_rng(N * 100 + H)
    x = rng.standard_normal((N, C, H, W))
    w = rng.standard_normal((K, C, 3, 3))
    OH, OW = (H + 2 * p - d * 2 - 1) // s + 1, (W + 2 * p - d * 2 - 1) // s + 1
    # torch's reference: the input padded (or, for negative padding, cropped) by p on every side
    xt = TF.pad(torch.from_numpy(x), [p] * 4)
    y3 = np.empty((N, K, OH * OW))
    im2col_fused.forward(x, w.reshape(K, -1), None, (3, 3), (s, s), (p, p), (d, d), (OH, OW), y3)
    ref = TF.conv2d(xt, torch.from_numpy(w), stride=s, dilation=d)
    np.testing.assert_allclose(y3.reshape(ref.shape), ref.numpy(), rtol=1e-10, atol=1e-10)
    go = rng.standard_normal(ref.shape)
    gw2 = np.empty((K, C * 9))
    im2col_fused.grad_weight(go.reshape(N, K, -1), x, (3, 3), (s, s), (p, p), (d, d), (OH, OW), gw2)
    ref_gw = torch.nn.grad.conv2d_weight(xt, w.shape, torch.from_numpy(go), stride=s, dilation=d)
    np.testing.assert_allclose(gw2.reshape(w.shape), ref_gw.numpy(), rtol=1e-10, atol=1e-10)
    assert len(sources) == 2 and all((src[2].size > 0) == (route == "gather") for src in sources)


def test_reported_workspace_counts_the_gather_corners(monkeypatch):
    """A narrow layer (4x4 outputs) gathers its columns: the reported workspace counts each task's corner buffer
    (the padded input copy aside, as on the plain path). (The column fills, not the taps kernel.)"""
    from fastconv import registry
    from fastconv.ops.conv import make_geometry

    monkeypatch.setattr(im2col_fused, "TAPS", False)
    g = make_geometry(2, 8, 32, 24, 1, (4, 4), (3, 3), None, (1, 1), (1, 1), (1, 1), (1, 1), torch.float32, "numba")
    assert im2col_fused.applies(g.kernel, 1, 32, 24, g.in_spatial, g.out_spatial, 4)
    alg = registry.choose("im2col", g, "forward")
    x = np.zeros((8, 32, 4, 4), np.float32)
    w2 = np.zeros((24, 32 * 9), np.float32)
    y3 = np.empty((8, 24, 16), np.float32)
    im2col_fused.forward(x, w2, None, (3, 3), (1, 1), (1, 1), (1, 1), (4, 4), y3)  # compiled before counting
    box_bytes = 8 * 32 * 6 * 6 * 4
    memory.clear_scratch()  # (workspaces are reused between calls: count a first call's)
    allocated = allocations(monkeypatch, im2col_fused, lambda: im2col_fused.forward(
        x, w2, None, (3, 3), (1, 1), (1, 1), (1, 1), (4, 4), y3))
    assert box_bytes in allocated
    assert sum(allocated) - box_bytes == alg.workspace_bytes(g)


@pytest.fixture
def taps_route(monkeypatch):
    """The taps kernel at every size on the own GEMM (the parallel region from the first multiply-add, output rows
    of any width); yields the list of calls that ran on it (a spy on ``_forward_taps``)."""
    from fastconv.cpu import jit_gemm

    ran = []
    real = im2col_fused._forward_taps
    monkeypatch.setattr(im2col_fused, "_forward_taps", lambda *a: ran.append("_forward_taps") or real(*a))
    monkeypatch.setattr(im2col_fused, "PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(im2col_fused, "TAPS_MIN_OW", 1)
    monkeypatch.setattr(im2col_fused, "GATHER", False)  # on AVX-512 the gather kernel runs stride-1 forwards first
    previous = jit_gemm.use_own_gemm(True)
    try:
        yield ran
    finally:
        jit_gemm.use_own_gemm(previous)


def _each_dtype_and_chunk(monkeypatch):
    """(dtype, tolerance) in float64 and float32, each with chunks of one output row and of several."""
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 2e-4)):
        for chunk_bytes in (64, 1 << 20):
            monkeypatch.setattr(im2col_fused, "TAPS_CHUNK_BYTES", chunk_bytes)
            yield dtype, tol


def _check_taps_forward(monkeypatch, ran, N, C, K, H, W, kernel, stride, pb, pe, d):
    KH, KW = kernel
    for dtype, tol in _each_dtype_and_chunk(monkeypatch):
        rng = np.random.default_rng(N * 100 + H + W)
        x = rng.standard_normal((N, C, H, W)).astype(dtype)
        w = rng.standard_normal((K, C, KH, KW)).astype(dtype)
        b = rng.standard_normal(K).astype(dtype)
        xt = TF.pad(torch.from_numpy(x), [pb[1], pe[1], pb[0], pe[0]])
        ref = TF.conv2d(xt, torch.from_numpy(w), torch.from_numpy(b), stride=stride, dilation=d)
        OH, OW = ref.shape[2:]
        y3 = np.full((N, K, OH * OW), np.nan, dtype)
        im2col_fused.forward(x, w.reshape(K, -1), b, (KH, KW), stride, pb, d, (OH, OW), y3)
        np.testing.assert_allclose(y3.reshape(ref.shape), ref.numpy(), rtol=tol, atol=tol)
    assert ran == ["_forward_taps"] * 4


@pytest.mark.parametrize("case", [
    # N, C, K, H, W, padding (before), padding_end, dilation
    (3, 16, 8, 4, 4, (1, 1), (1, 1), (1, 1)),      # DenseNet-like 4x4
    (2, 5, 7, 9, 7, (2, 0), (0, 1), (1, 1)),       # asymmetric padding, odd sizes, few channels
    (2, 16, 5, 8, 8, (2, 2), (2, 2), (2, 2)),      # dilation
    (2, 16, 4, 9, 9, (-1, -1), (-1, -1), (1, 1)),  # negative padding (a crop)
    (1, 3, 10, 1, 40, (0, 3), (0, 3), (1, 1)),     # a 1-D conv (one row)
])
def test_taps_kernel_matches_torch(monkeypatch, taps_route, case):
    """Stride-1 forwards on the taps kernel (no columns: the GEMM reads each tap's shifted rows of the padded input
    in place), against torch in float64 and float32: every padding kind, dilation, one-row (1-D) inputs, chunks
    of one output row and of several, the parallel region; a spy proves the kernel ran."""
    N, C, K, H, W, pb, pe, d = case
    _check_taps_forward(monkeypatch, taps_route, N, C, K, H, W, (1 if H == 1 else 3, 3), (1, 1), pb, pe, d)


def test_taps_kernel_only_where_the_own_gemm_runs(monkeypatch):
    """The taps kernel needs the own GEMM (its packing copies the taps' rows straight from the padded input): with
    the library's GEMM, switched off, with short output rows, strided with many input channels or windows no
    larger than their stride, the forward fills columns."""
    from fastconv.cpu import jit_gemm

    thin = im2col_fused.TAPS_STRIDED_MAX_IN_CHANNELS
    previous = jit_gemm.use_own_gemm(False)
    try:
        assert not im2col_fused.takes_taps((3, 3), (1, 1), 64, 32)
        jit_gemm.use_own_gemm(True)
        assert im2col_fused.takes_taps((3, 3), (1, 1), 64, 32)
        assert im2col_fused.takes_taps((7, 7), (2, 2), 3, 32)  # an RGB stem, through its phases
        assert im2col_fused.takes_taps((3, 3), (2, 1), thin, 32)
        assert not im2col_fused.takes_taps((3, 3), (2, 2), thin + 1, 32)  # deep strided: columns
        assert not im2col_fused.takes_taps((4, 4), (4, 4), 3, 32)  # a patchify stem: one tap per phase
        assert not im2col_fused.takes_taps((3, 3), (1, 1), 64, im2col_fused.TAPS_MIN_OW - 1)  # short rows
        monkeypatch.setattr(im2col_fused, "TAPS_STRIDED", False)
        assert not im2col_fused.takes_taps((7, 7), (2, 2), 3, 32)
        assert im2col_fused.takes_taps((3, 3), (1, 1), 64, 32)
        monkeypatch.setattr(im2col_fused, "TAPS", False)
        assert not im2col_fused.takes_taps((3, 3), (1, 1), 64, 32)
    finally:
        jit_gemm.use_own_gemm(previous)


@pytest.mark.parametrize("case", [
    # N, C, K, H, W, kernel, stride, padding before, padding after, dilation
    (2, 3, 16, 21, 23, (7, 7), (2, 2), (3, 3), (3, 3), (1, 1)),     # a ResNet stem
    (1, 3, 8, 35, 33, (11, 11), (4, 4), (2, 2), (2, 2), (1, 1)),    # AlexNet's stem
    (2, 5, 6, 17, 19, (3, 3), (2, 2), (1, 1), (1, 1), (1, 1)),
    (1, 4, 7, 18, 16, (3, 5), (3, 2), (0, 2), (2, 0), (1, 1)),      # uneven strides, asymmetric padding
    (2, 4, 5, 20, 22, (3, 3), (2, 2), (2, 2), (2, 2), (2, 3)),      # dilated: taps land in other phases
    (1, 6, 4, 16, 18, (3, 3), (2, 2), (-1, -1), (-1, -1), (1, 1)),  # negative padding (a crop)
    (1, 3, 5, 1, 50, (1, 5), (1, 3), (0, 2), (0, 2), (1, 1)),       # a 1-D conv (one row)
])
def test_strided_taps_kernel_matches_torch(monkeypatch, taps_route, case):
    """Strided forwards on the taps kernel through their phases (:func:`im2col_fused._phase_box`: the padded
    input's ``sh*sw`` subsampled images, each tap reading the phase its offset falls in), against torch in float64
    and float32, chunks of one output row and of several, the parallel region; a spy proves the kernel ran."""
    _check_taps_forward(monkeypatch, taps_route, *case)


def test_strided_taps_through_the_public_api(taps_route):
    """A thin strided conv (a 7x7 stride-2 stem) in float64 through ``fastconv.functional``, its forward on the taps
    kernel:
    forward and both gradients against torch, gradcheck, and opcheck of the forward op."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 13, 15, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(8, 3, 7, 7, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    kw = dict(stride=2, padding=3)
    y = F.conv2d(x, w, b, algo="im2col", **kw)
    ref = TF.conv2d(x, w, b, **kw)
    assert_close(y, ref, algo="im2col", what="strided taps forward")
    go = torch.randn_like(ref)
    for name, a, e in zip(("input", "weight", "bias"), torch.autograd.grad(y, (x, w, b), go),
                          torch.autograd.grad(ref, (x, w, b), go)):
        assert_close(a, e, algo="im2col", what=f"strided taps, grad {name}")
    assert "_forward_taps" in taps_route, taps_route
    xs, ws = x[:1, :, :9, :10].detach().requires_grad_(), w[:3].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, c: F.conv2d(a, c, algo="im2col", **kw), (xs, ws))
    torch.library.opcheck(torch.ops.fastconv.conv2d.default, (x, w, b, [2, 2], [3, 3], [3, 3], [1, 1], 1, "im2col"))


def test_weight_gradient_whichever_task_claims_the_chunks(monkeypatch):
    """Task 0 accumulates in the result itself and every task's first product is stored, not added (nothing is
    zeroed first): the result must be right whichever tasks claimed chunks. The real region, parallel, a few
    chunks, many times (the claiming order varies between runs); then the reduction alone, with a stand-in region
    where task 0 claimed nothing and left the result unwritten (garbage) and task 1 computed everything."""
    monkeypatch.setattr(im2col_fused, "TAPS", False)
    monkeypatch.setattr(im2col_fused, "MIN_GRAD_WEIGHT_CHUNK_COLUMNS", 1)
    monkeypatch.setattr(im2col_fused, "PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(im2col_fused, "CHUNK_BYTES", 16 * 9 * 8 * 6)  # 6 output rows a chunk: 3 chunks
    N, C, K, H = 2, 16, 8, 9
    rng = np.random.default_rng(5)
    x = rng.standard_normal((N, C, H, H))
    go = rng.standard_normal((N, K, H, H))
    ref = torch.nn.grad.conv2d_weight(torch.from_numpy(x), (K, C, 3, 3), torch.from_numpy(go), padding=1).numpy()
    for _ in range(40):
        gw2 = np.full((K, C * 9), np.nan)
        im2col_fused.grad_weight(go.reshape(N, K, -1), x, (3, 3), (1, 1), (1, 1), (1, 1), (H, H), gw2)
        np.testing.assert_allclose(gw2.reshape(ref.shape), ref, rtol=1e-10, atol=1e-10)

    def task_one_did_everything(*args):
        gw2, acc, used = args[15], args[16], args[17]
        assert acc.shape[0] >= 1 and used.shape[0] >= 2
        gw2[...] = np.nan  # task 0's accumulator, never written
        acc[0] = ref.reshape(K, -1)
        used[:] = False
        used[1] = True
    monkeypatch.setattr(im2col_fused, "_grad_weight_region",
                        type("Stub", (), {"parallel": staticmethod(task_one_did_everything),
                                          "serial": staticmethod(task_one_did_everything)}))
    if numba.get_num_threads() < 2:
        pytest.skip("one Numba thread: the weight gradient runs a single task")
    gw2 = np.full((K, C * 9), np.nan)
    im2col_fused.grad_weight(go.reshape(N, K, -1), x, (3, 3), (1, 1), (1, 1), (1, 1), (H, H), gw2)
    np.testing.assert_allclose(gw2.reshape(ref.shape), ref, rtol=1e-12, atol=0)
