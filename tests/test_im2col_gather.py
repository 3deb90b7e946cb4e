"""The gather kernels (``fastconv.cpu.im2col_fused.forward_gather`` / ``grad_weight_gather``): the own GEMM reading
a conv's zero-padded input through offset tables, no columns. Which convs take them, their results against torch
(kernels and public API: forward, both gradients, gradcheck, opcheck, float64), and the workspace they report.

The kernel matrix of ``tests/test_cpu_conv_kernels.py`` also runs every dense 1-D/2-D case through them
("im2col-gather": any size, jobs of one micro-kernel tile, the parallel region forced).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import fastconv.functional as F
from fastconv.cpu import im2col_fused, jit_gemm, memory, micro_gemm
from helpers import assert_close, bytes_allocated

pytestmark = pytest.mark.skipif(not micro_gemm.HOST_HAS_VECTOR_FMA,
                                reason="the gather kernels run on the own GEMM, which needs AVX2 with FMA or "
                                       "AVX-512; this CPU has neither")


@pytest.fixture(autouse=True)
def own_gemm_route():
    """The gather kernels are taken only where the own GEMM is the route; hosts whose default is the library (an
    Intel CPU with AVX-512 and torch's MKL) switch it on for these tests."""
    previous = jit_gemm.use_own_gemm(True)
    yield
    jit_gemm.use_own_gemm(previous)


@pytest.fixture
def gather_spy(monkeypatch):
    """The passes that ran on the gather kernels, in order."""
    ran = []
    for name, label in (("forward_gather", "forward"), ("grad_input_gather", "grad_input"),
                        ("grad_weight_gather", "grad_weight")):
        real = getattr(im2col_fused, name)
        monkeypatch.setattr(im2col_fused, name, lambda *a, real=real, label=label: ran.append(label) or real(*a))
    return ran


def test_which_convs_take_them(monkeypatch):
    """Dense 1-D/2-D only; the forward up to GATHER_MAX_WEIGHT_BYTES of weights (stride 1 on AVX-512 with at least
    AVX512_GATHER_MIN_POSITIONS output positions: AVX512_GATHER_STRIDE1_MAX_WEIGHT_BYTES), and on AVX2 not where the taps kernel runs a stride-1 conv of
    GATHER_TAPS_MIN_OUT_CHANNELS or more output channels; the weight gradient up to
    GATHER_GRAD_MAX_WEIGHT_BYTES; off with GATHER or ENABLED."""
    assert im2col_fused.gather_applies((1, 3, 3), 1, (1, 8, 8), (1, 8, 8))
    assert not im2col_fused.gather_applies((1, 3, 3), 2, (1, 8, 8), (1, 8, 8))  # grouped
    assert not im2col_fused.gather_applies((3, 3, 3), 1, (8, 8, 8), (6, 6, 6))  # 3-D
    for switch in ("GATHER", "ENABLED"):
        with monkeypatch.context() as m:
            m.setattr(im2col_fused, switch, False)
            assert not im2col_fused.gather_applies((1, 3, 3), 1, (1, 8, 8), (1, 8, 8))
    limit = im2col_fused.GATHER_MAX_WEIGHT_BYTES
    C = limit // (4 * 9 * 32)
    assert im2col_fused.takes_gather_forward((3, 3), (2, 2), C, 32, 8, 4)
    assert not im2col_fused.takes_gather_forward((3, 3), (2, 2), C + 1, 32, 8, 4)  # weights over the limit
    # AVX2 hosts take larger weights where the batch has enough output positions; AVX-512 hosts larger stride-1 ones
    big = im2col_fused.AVX2_GATHER_LARGE_MIN_POSITIONS
    wide = im2col_fused.TAPS_MIN_OW
    many = im2col_fused.GATHER_TAPS_MIN_OUT_CHANNELS
    with monkeypatch.context() as m:
        m.setattr(micro_gemm, "HOST_HAS_AVX512", False)
        assert im2col_fused.takes_gather_forward((3, 3), (1, 1), C, 32, 8, 4)  # DenseNet's 128 -> 32 at 8x8
        assert not im2col_fused.takes_gather_forward((3, 3), (1, 1), C + 1, 32, 8, 4)
        assert im2col_fused.takes_gather_forward((3, 3), (1, 1), C + 1, 32, 8, 4, big)
        assert not im2col_fused.takes_gather_forward((3, 3), (1, 1), C + 1, 32, 8, 4, big - 1)
        over = im2col_fused.AVX2_GATHER_MAX_WEIGHT_BYTES // (4 * 9 * 32) + 1
        assert not im2col_fused.takes_gather_forward((3, 3), (1, 1), over, 32, 8, 4, big)
        # the taps kernel keeps wide rows of many output channels there
        assert not im2col_fused.takes_gather_forward((3, 3), (1, 1), 16, many, wide, 4)
        assert im2col_fused.takes_gather_forward((3, 3), (1, 1), 16, many - 1, wide, 4)
        assert im2col_fused.takes_gather_forward((3, 3), (1, 1), 16, many, wide - 1, 4)  # short rows: no taps
        assert im2col_fused.takes_gather_forward((3, 3), (2, 2), 64, many, wide, 4)  # deep strided: no taps
        m.setattr(micro_gemm, "HOST_HAS_AVX512", True)
        # stride 1 with enough output positions: up to the larger limit; fewer positions: the general one
        stride1 = im2col_fused.AVX512_GATHER_STRIDE1_MAX_WEIGHT_BYTES // (4 * 9 * 32)
        enough = im2col_fused.AVX512_GATHER_MIN_POSITIONS
        assert im2col_fused.takes_gather_forward((3, 3), (1, 1), stride1, 32, 8, 4, enough)
        assert not im2col_fused.takes_gather_forward((3, 3), (1, 1), stride1 + 1, 32, 8, 4, enough)
        assert im2col_fused.takes_gather_forward((3, 3), (1, 1), C, 32, 8, 4, enough - 1)
        assert not im2col_fused.takes_gather_forward((3, 3), (1, 1), C + 1, 32, 8, 4, enough - 1)
        assert not im2col_fused.takes_gather_forward((3, 3), (2, 2), C + 1, 32, 8, 4, enough)
        assert im2col_fused.takes_gather_forward((3, 3), (1, 1), 16, many, wide, 4)  # before the taps kernel
        # few output channels on wide stride-1 rows: the taps kernel (output channels as its GEMM's rows)
        narrow = im2col_fused.TAPS_NARROW_MAX_OUT_CHANNELS
        assert im2col_fused.takes_narrow_taps((3, 3), (1, 1), 64, narrow, wide)
        assert not im2col_fused.takes_gather_forward((3, 3), (1, 1), 64, narrow, wide, 4, enough)
        assert im2col_fused.takes_gather_forward((3, 3), (1, 1), 64, narrow + 1, wide, 4, enough)
        assert im2col_fused.takes_gather_forward((3, 3), (1, 1), 64, narrow, wide - 1, 4, enough)  # short rows
        assert im2col_fused.takes_gather_forward((3, 3), (2, 2), 64, narrow, wide, 4, enough)  # strided
        m.setattr(micro_gemm, "HOST_HAS_AVX512", False)
        assert not im2col_fused.takes_narrow_taps((3, 3), (1, 1), 64, narrow, wide)
    grad_limit = im2col_fused.GATHER_GRAD_MAX_WEIGHT_BYTES
    assert im2col_fused.takes_gather_grad_weight(grad_limit // (4 * 9 * 256), 256, 9, 4)
    assert not im2col_fused.takes_gather_grad_weight(grad_limit // (4 * 9 * 256) + 1, 256, 9, 4)


_CASES = [
    # N, C, K, (H, W), kernel, stride, padding, dilation
    (8, 128, 32, (4, 4), (3, 3), (1, 1), (1, 1), (1, 1)),   # DenseNet's 4x4 layers: jobs span images
    (2, 3, 16, (23, 21), (7, 7), (2, 2), (3, 3), (1, 1)),   # an RGB stem
    (2, 3, 8, (35, 35), (11, 11), (4, 4), (2, 2), (1, 1)),  # AlexNet's stem
    (2, 12, 20, (9, 11), (3, 5), (2, 1), (0, 2), (2, 1)),   # uneven strides and dilations
    (3, 7, 9, (10, 10), (3, 3), (1, 1), (-1, 1), (1, 1)),   # negative padding (a crop)
    (2, 16, 40, (9, 9), (1, 1), (2, 2), (0, 0), (1, 1)),    # a strided 1x1 (ResNet's downsampling)
    (2, 6, 10, (1, 50), (1, 9), (1, 3), (0, 4), (1, 2)),    # 1-D
]


def _tables(case, dtype, seed):
    N, C, K, (H, W), kernel, stride, padding, dilation = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn((K, C) + kernel, generator=g, dtype=torch.float64)
    b = torch.randn(K, generator=g, dtype=torch.float64)
    # torch's padding cannot crop: pad (or crop) first, then an unpadded conv
    ph, pw = padding
    xp = TF.pad(x, (pw, pw, ph, ph))
    y = TF.conv2d(xp, w, b, stride, 0, dilation)
    go = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gw = torch.ops.aten.convolution_backward(go, xp, w, None, list(stride), [0, 0], list(dilation), False, [0, 0], 1,
                                             [False, True, False])[1]
    cast = lambda t: np.ascontiguousarray(t.numpy().astype(dtype))  # noqa: E731
    return cast(x), cast(w), cast(b), cast(y), cast(go), cast(gw)


@pytest.mark.parametrize("case", _CASES)
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 2e-4)])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 20], ids=["tiny-jobs", "default-jobs"])
def test_kernels_match_torch(monkeypatch, case, dtype, tol, chunk_bytes):
    """Forward (bias added on the way out) and weight gradient against torch, with jobs and output-gradient chunks
    of a micro-kernel's rows (spanning images, many accumulations) and of the default size, serial and parallel."""
    monkeypatch.setattr(im2col_fused, "GATHER_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(im2col_fused, "GATHER_GRAD_CHUNK_BYTES", chunk_bytes)
    N, C, K, _, kernel, stride, padding, dilation = case
    x, w, b, y, go, gw = _tables(case, dtype, seed=len(_CASES) + C)
    OH, OW = y.shape[2:]
    for parallel_min in (0, 1 << 62):
        monkeypatch.setattr(im2col_fused, "PARALLEL_MIN_MACS", parallel_min)
        y3 = np.full((N, K, OH * OW), np.nan, dtype)
        im2col_fused.forward_gather(x, w.reshape(K, -1), b, kernel, stride, padding, dilation, (OH, OW), y3)
        scale = max(1.0, float(np.abs(y).max()))
        np.testing.assert_allclose(y3.reshape(y.shape), y, rtol=tol, atol=tol * scale)
        gw2 = np.full((K, w[0].size), np.nan, dtype)
        im2col_fused.grad_weight_gather(go.reshape(N, K, -1), x, kernel, stride, padding, dilation, (OH, OW), gw2)
        scale = max(1.0, float(np.abs(gw).max()))
        np.testing.assert_allclose(gw2.reshape(gw.shape), gw, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("total", [16, 49, 128, 392, 512, 1000, 2048])
@pytest.mark.parametrize("out_channels", [32, 64, 96, 320])
@pytest.mark.parametrize("itemsize", [4, 8])
def test_forward_jobs_share_the_positions_equally(total, out_channels, itemsize):
    """The forward's jobs (``_job_rows``) cover every position once, in order, each starting at a multiple of its
    tiles' height, and none is more than that height from an equal share (a fixed job size rounded to the tiles had
    left 8x8 maps at batch 8 split 288 / 224 between two tasks); the workspace holds the largest."""
    grain = im2col_fused._gather_grain(out_channels, itemsize)
    assert grain in (micro_gemm.MR, micro_gemm.WIDE_MR, micro_gemm.ROW_GRAIN)
    for tasks in (1, 2, 3, 4):
        jobs = im2col_fused._gather_jobs(total, out_channels * itemsize, tasks, im2col_fused.GATHER_CHUNK_BYTES,
                                         grain)
        starts = [im2col_fused._job_rows(j, jobs, total, grain) for j in range(jobs + 1)]
        assert starts[0] == 0 and starts[-1] == total
        sizes = np.diff(starts)
        assert (sizes > 0).all(), (jobs, starts)
        assert all(s % grain == 0 for s in starts[:-1]), starts
        assert (np.abs(sizes - total / jobs) <= grain).all(), sizes
        assert sizes.max() <= min(total, -(-total // jobs) + grain)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (3, 0, 1)])
def test_public_api_forward_and_gradients(gather_spy, stride, padding, dilation):
    """float64 through ``fastconv.functional`` at a size the default rules send to the gather kernels (DenseNet's
    narrow 3x3 layers): forward and both gradients against torch, gradcheck, and the passes that took them."""
    g = torch.Generator().manual_seed(stride * 10 + padding)
    x = torch.randn(2, 24, 8, 9, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(8, 24, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    kw = dict(stride=stride, padding=padding, dilation=dilation)
    y = F.conv2d(x, w, b, algo="im2col", **kw)
    ref = TF.conv2d(x, w, b, **kw)
    assert_close(y, ref, algo="im2col", what="gather forward")
    go = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, w, b), go)
    want = torch.autograd.grad(ref, (x, w, b), go)
    for name, a, e in zip(("input", "weight", "bias"), got, want):
        assert_close(a, e, algo="im2col", what=f"gather, grad {name}")
    assert {"forward", "grad_weight"} <= set(gather_spy), gather_spy
    xs, ws = x[:1, :, :6, :7].detach().requires_grad_(), w[:3].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, c: F.conv2d(a, c, algo="im2col", **kw), (xs, ws))


def test_input_gradient_into_few_channels_takes_the_taps_kernel(monkeypatch):
    """SqueezeNet's expanding 3x3 (16 -> 64 at 30x30): its stride-1 input gradient, a forward into 16 channels,
    runs on the taps kernel on AVX-512 hosts (:data:`.im2col_fused.TAPS_NARROW_MAX_OUT_CHANNELS`), float64 against
    torch through the public API, and gradcheck on a smaller size with the rule's limits lowered to reach it."""
    if not micro_gemm.HOST_HAS_AVX512:
        pytest.skip("the narrow-output rule is for AVX-512 hosts; elsewhere the gather kernel keeps these")
    ran = []
    real = im2col_fused._forward_taps
    monkeypatch.setattr(im2col_fused, "_forward_taps", lambda *a: ran.append(a[1].shape) or real(*a))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16, 30, 30, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(64, 16, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    y = F.conv2d(x, w, padding=1, algo="im2col")
    ref = TF.conv2d(x, w, padding=1)
    assert_close(y, ref, algo="im2col", what="forward")
    go = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, w), go)
    want = torch.autograd.grad(ref, (x, w), go)
    for name, a, e in zip(("input", "weight"), got, want):
        assert_close(a, e, algo="im2col", what=f"grad {name}")
    assert ran == [(16, 64 * 9)], ran  # the input gradient only: the flipped weights, 16 rows of 64 x 9 taps
    monkeypatch.setattr(im2col_fused, "TAPS_MIN_OW", 1)
    from fastconv.cpu import conv as cc
    monkeypatch.setattr(cc, "FUSED_GRAD_INPUT_MIN_POSITIONS", 1)
    xs, ws = x[:1, :, :5, :6].detach().requires_grad_(), w[:6].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, c: F.conv2d(a, c, padding=1, algo="im2col"), (xs, ws))
    assert len(ran) > 1, "gradcheck's input gradients did not reach the taps kernel"


def test_which_convs_count_as_small_for_the_own_kernels(monkeypatch):
    """:func:`.im2col_fused.small_for_own`: weights up to SMALL_ON_OWN_MAX_WEIGHT_BYTES, reductions of at least
    SMALL_ON_OWN_MIN_REDUCTION, overlapping windows; :func:`.im2col_fused.own_kernels_take`: always on the own route,
    on the library route only small convs and only with SMALL_ON_OWN in force."""
    small = im2col_fused.small_for_own
    limit, shortest = im2col_fused.SMALL_ON_OWN_MAX_WEIGHT_BYTES, im2col_fused.SMALL_ON_OWN_MIN_REDUCTION
    assert small(32, 128 * 9, (3, 3), (1, 1), 4)  # DenseNet's 128 -> 32 3x3
    assert small(64, 3 * 49, (7, 7), (2, 2), 4)  # the RGB 7x7 stride-2 stem
    assert not small(64, 3 * 9, (3, 3), (1, 1), 4)  # VGG's RGB stem: too short a reduction
    assert not small(96, 3 * 16, (4, 4), (4, 4), 4) and not small(192, 96 * 4, (2, 2), (2, 2), 4)  # patchify
    assert small(limit // (4 * shortest), shortest, (3, 3), (1, 1), 4)
    assert not small(limit // (4 * shortest) + 1, shortest, (3, 3), (1, 1), 4)  # weights over the limit
    assert not small(8, shortest - 1, (3, 3), (1, 1), 4)
    # a forward: enough output positions, or few output channels
    many, narrow = im2col_fused.SMALL_ON_OWN_FORWARD_MIN_POSITIONS, im2col_fused.SMALL_ON_OWN_FORWARD_NARROW_CHANNELS
    assert small(128, 128 * 9, (3, 3), (1, 1), 4, positions=many)
    assert not small(128, 128 * 9, (3, 3), (1, 1), 4, positions=many - 1)  # ResNet's 128 -> 128 at 16x16, batch 1
    assert small(narrow, 128 * 9, (3, 3), (1, 1), 4, positions=1)
    assert not small(narrow + 1, 128 * 9, (3, 3), (1, 1), 4, positions=many - 1)
    assert small(128, 128 * 9, (3, 3), (1, 1), 4)  # a gradient: no position rule
    # an input gradient's flipped conv: its own weight limit (ResNet's 256 -> 256 3x3, 2.4 MB, yes; its forward not)
    input_limit = im2col_fused.SMALL_ON_OWN_GRAD_INPUT_MAX_BYTES
    assert input_limit > limit
    assert small(256, 256 * 9, (3, 3), (1, 1), 4, grad_input=True) and not small(256, 256 * 9, (3, 3), (1, 1), 4)
    assert small(input_limit // (4 * shortest), shortest, (3, 3), (1, 1), 4, grad_input=True)
    assert not small(input_limit // (4 * shortest) + 1, shortest, (3, 3), (1, 1), 4, grad_input=True)
    assert im2col_fused.own_kernels_take(False) and im2col_fused.own_kernels_take(True)  # the own route
    jit_gemm.use_own_gemm(False)  # (the fixture restores it)
    monkeypatch.setattr(im2col_fused, "SMALL_ON_OWN", True)
    assert im2col_fused.own_kernels_take(True) and not im2col_fused.own_kernels_take(False)
    assert im2col_fused.gather_applies((1, 3, 3), 1, (1, 8, 8), (1, 8, 8), True)
    assert not im2col_fused.gather_applies((1, 3, 3), 1, (1, 8, 8), (1, 8, 8), False)
    assert im2col_fused.takes_taps((7, 7), (2, 2), 3, 32, True)  # an RGB stem
    assert not im2col_fused.takes_taps((7, 7), (2, 2), 3, 32, False)
    monkeypatch.setattr(im2col_fused, "SMALL_ON_OWN", False)
    assert not im2col_fused.own_kernels_take(True)
    assert not im2col_fused.gather_applies((1, 3, 3), 1, (1, 8, 8), (1, 8, 8), True)


def test_strided_rgb_stems_take_the_taps_kernel_first(monkeypatch):
    """With STRIDED_TAPS_BEFORE_GATHER, a strided conv that the taps kernel takes (3 input channels, rows of at least
    TAPS_MIN_OW) is not sent to the gather kernel; without it, it is (AVX-512 hosts, where the gather kernel comes
    first); a stride-1 conv and a stem with short rows stay on the gather kernel either way."""
    if not micro_gemm.HOST_HAS_AVX512:
        pytest.skip("on AVX2 hosts the taps kernel comes before the gather kernel for these convs anyway")
    wide = im2col_fused.TAPS_MIN_OW
    for first in (True, False):
        monkeypatch.setattr(im2col_fused, "STRIDED_TAPS_BEFORE_GATHER", first)
        assert im2col_fused.takes_gather_forward((7, 7), (2, 2), 3, 96, wide, 4) is not first
        assert im2col_fused.takes_gather_forward((7, 7), (2, 2), 3, 96, wide - 1, 4)  # short rows: no taps
        assert im2col_fused.takes_gather_forward((3, 3), (1, 1), 16, 64, wide, 4)


def test_small_convs_on_the_gather_kernels_with_the_library_route(gather_spy, monkeypatch):
    """With the kernels' GEMMs on the library (an Intel host's default) and SMALL_ON_OWN in force, a small dense conv
    still runs on the gather kernels and a conv over the weight limit does not; both match torch in float64
    through the public API (forward and both gradients), and gradcheck passes on the small one."""
    jit_gemm.use_own_gemm(False)  # (the fixture restores it)
    monkeypatch.setattr(im2col_fused, "SMALL_ON_OWN", True)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 24, 8, 9, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(8, 24, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    # the forward's and the weight gradient's limits (SMALL_ON_OWN_GRAD_WEIGHT_MAX_BYTES) move together here; the
    # next loop moves them apart
    for limit, gathered in ((w.numel() * 8, True), (w.numel() * 8 - 1, False)):
        monkeypatch.setattr(im2col_fused, "SMALL_ON_OWN_MAX_WEIGHT_BYTES", limit)
        monkeypatch.setattr(im2col_fused, "SMALL_ON_OWN_GRAD_WEIGHT_MAX_BYTES", limit)
        monkeypatch.setattr(im2col_fused, "SMALL_ON_OWN_GRAD_INPUT_MAX_BYTES", limit)
        gather_spy.clear()
        y = F.conv2d(x, w, padding=1, algo="im2col")
        ref = TF.conv2d(x, w, padding=1)
        assert_close(y, ref, algo="im2col", what=f"forward, limit {limit}")
        go = torch.randn_like(ref)
        for name, a, e in zip(("input", "weight"), torch.autograd.grad(y, (x, w), go),
                              torch.autograd.grad(ref, (x, w), go)):
            assert_close(a, e, algo="im2col", what=f"grad {name}, limit {limit}")
        assert ({"forward", "grad_weight"} <= set(gather_spy)) is gathered, (limit, gather_spy)
        assert gathered or not gather_spy, gather_spy
    for forward_limit, grad_weight_limit in ((w.numel() * 8 - 1, w.numel() * 8), (w.numel() * 8, w.numel() * 8 - 1)):
        monkeypatch.setattr(im2col_fused, "SMALL_ON_OWN_MAX_WEIGHT_BYTES", forward_limit)
        monkeypatch.setattr(im2col_fused, "SMALL_ON_OWN_GRAD_WEIGHT_MAX_BYTES", grad_weight_limit)
        gather_spy.clear()
        y = F.conv2d(x, w, padding=1, algo="im2col")
        go = torch.randn_like(y)
        ref = TF.conv2d(x, w, padding=1)
        assert_close(y, ref, algo="im2col", what=f"forward, limits {forward_limit} {grad_weight_limit}")
        assert_close(torch.autograd.grad(y, w, go)[0], torch.autograd.grad(ref, w, go)[0], algo="im2col",
                     what=f"grad weight, limits {forward_limit} {grad_weight_limit}")
        assert ("forward" in gather_spy) is (forward_limit >= w.numel() * 8), gather_spy
        assert ("grad_weight" in gather_spy) is (grad_weight_limit >= w.numel() * 8), gather_spy
    # the input gradient's limit alone (16 outputs: its flipped conv's reduction, 16 x 9, is long enough): the input
    # gradient on the gather kernel at the limit, not above it; the forward not
    w16 = torch.randn(16, 24, 3, 3, dtype=torch.float64, generator=g)
    monkeypatch.setattr(im2col_fused, "SMALL_ON_OWN_MAX_WEIGHT_BYTES", w16.numel() * 8 - 1)
    for input_limit, gathered in ((w16.numel() * 8, True), (w16.numel() * 8 - 1, False)):
        monkeypatch.setattr(im2col_fused, "SMALL_ON_OWN_GRAD_INPUT_MAX_BYTES", input_limit)
        gather_spy.clear()
        y = F.conv2d(x, w16, padding=1, algo="im2col")
        ref = TF.conv2d(x, w16, padding=1)
        go = torch.randn_like(ref)
        assert_close(torch.autograd.grad(y, x, go)[0], torch.autograd.grad(ref, x, go)[0], algo="im2col",
                     what=f"grad input, input-gradient limit {input_limit}")
        assert gather_spy == (["grad_input"] if gathered else []), (input_limit, gather_spy)
    monkeypatch.setattr(im2col_fused, "SMALL_ON_OWN_MAX_WEIGHT_BYTES", w.numel() * 8)
    gather_spy.clear()
    xs, ws = x[:1, :, :6, :7].detach().requires_grad_(), w.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, c: F.conv2d(a, c, padding=1, algo="im2col"), (xs, ws))
    assert gather_spy, "gradcheck's calls did not reach the gather kernels"


def test_opcheck_on_the_gather_kernels(gather_spy):
    """``torch.ops.fastconv.conv2d`` and its two gradient ops, float64, on the gather kernels."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 7, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 16, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    geometry = ([2, 1], [1, 1], [1, 1], [1, 1], 1, "im2col")  # stride, padding, padding end, dilation, groups
    y = TF.conv2d(x, w, b, stride=(2, 1), padding=1).detach()
    gy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.fastconv.conv2d.default, (x, w, b, *geometry))
    torch.library.opcheck(torch.ops.fastconv.conv2d_grad_input.default,
                          (gy.requires_grad_(), w, list(x.shape[2:]), *geometry))
    torch.library.opcheck(torch.ops.fastconv.conv2d_grad_weight.default, (gy, x, list(w.shape[2:]), *geometry))
    assert {"forward", "grad_weight"} <= set(gather_spy), gather_spy


def test_reported_workspace_is_what_the_gather_forward_allocates(monkeypatch):
    """The registry's im2col workspace for a conv on the gather forward: the padded input, the packed weights and a
    result per task, as allocated."""
    from fastconv import registry
    from fastconv.ops.conv import make_geometry

    g = make_geometry(2, 3, 40, 24, 1, (12, 11), (3, 3), None, (2, 1), (1, 1), (1, 1), (1, 1), torch.float32,
                      "numba")
    OH, OW = g.out_spatial[1:]
    assert im2col_fused.takes_gather_forward((3, 3), (2, 1), 40, 24, OW, 4)
    alg = registry.choose("im2col", g, "forward")
    x = np.zeros((3, 40, 12, 11), np.float32)
    w2 = np.zeros((24, 40 * 9), np.float32)
    y3 = np.empty((3, 24, OH * OW), np.float32)
    args = (x, w2, None, (3, 3), (2, 1), (1, 1), (1, 1), (OH, OW), y3)
    im2col_fused.forward_gather(*args)  # compiled, and the offset tables cached, before counting
    memory.clear_scratch()  # (workspaces are reused between calls: count a first call's)
    assert bytes_allocated(monkeypatch, im2col_fused, lambda: im2col_fused.forward_gather(*args)) == \
        alg.workspace_bytes(g)
