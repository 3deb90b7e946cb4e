"""fastconv's CUDA kernels run on the CPU execution harness (target "cuda-emu") against torch.

Every CUDA conv algorithm on a geometry matrix (forward and both gradients in float64, float32,
gradcheck), the split-K weight gradient, transposed convs through the registry, every pooling op
of the PoolKernels protocol (values, indices, NaN, ties, subnormals, ceil_mode, both gather forms of
the max-pool backward, packed grids for small planes, unpool duplicates and bad indices), the seeds, and a planted bug (the implicit-GEMM tile-loop barrier
deleted) that the harness must catch. Shapes are small: every CUDA thread is a fiber here.
"""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import fastconv
import fastconv.functional as F
from fastconv.cuda import conv as cuda_conv
from fastconv.cuda import loader
from fastconv.cuda import pool as cuda_pool
from helpers import assert_close

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU harness needs g++")
CUDA_ALGOS = ["cuda-direct", "implicit-gemm", "cuda-depthwise"]


@pytest.fixture(autouse=True)
def _emu():
    with fastconv.backend("cuda-emu"):
        yield


# (N, C, spatial, K, kernel, kwargs)
CONV_CASES = {
    "2d_stride_pad": (2, 3, (7, 6), 4, (3, 3), dict(stride=2, padding=1)),
    "2d_dilated_mixed": (1, 4, (9, 8), 3, (3, 2), dict(stride=(2, 1), padding=(2, 1), dilation=(2, 3))),
    "2d_same_even": (2, 2, (6, 5), 3, (4, 2), dict(padding="same")),
    "2d_groups": (2, 4, (5, 6), 6, (3, 3), dict(padding=1, groups=2)),
    "2d_depthwise_m2": (2, 3, (6, 7), 6, (3, 3), dict(stride=2, padding=1, groups=3)),
    "2d_pointwise": (2, 5, (4, 5), 7, (1, 1), {}),
    "2d_kernel_eq_input": (2, 3, (4, 5), 2, (4, 5), {}),
    "2d_wide_gemm": (1, 70, (3, 3), 66, (1, 1), {}),  # more than one 64-wide tile in N and K
    "1d": (2, 4, (11,), 5, (3,), dict(stride=2, padding=2, dilation=2)),
    "3d": (1, 2, (4, 5, 4), 3, (2, 3, 2), dict(stride=(1, 2, 1), padding=(1, 1, 0))),
    "batch0": (0, 3, (5, 5), 4, (3, 3), dict(padding=1)),
}


def _conv(nd):
    return getattr(F, f"conv{nd}d"), getattr(TF, f"conv{nd}d")


def _case(name, dtype=torch.float64):
    n, c, spatial, k, ks, kw = CONV_CASES[name]
    g = kw.get("groups", 1)
    x = torch.randn(n, c, *spatial, dtype=dtype, requires_grad=True)
    w = torch.randn(k, c // g, *ks, dtype=dtype, requires_grad=True)
    b = torch.randn(k, dtype=dtype, requires_grad=True)
    return x, w, b, kw, len(spatial)


def _runs(algo, name):
    n, c, spatial, k, ks, kw = CONV_CASES[name]
    return algo != "cuda-depthwise" or kw.get("groups", 1) == c


@pytest.mark.parametrize("algo", CUDA_ALGOS)
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_forward_and_gradients_match_torch(name, algo):
    x, w, b, kw, nd = _case(name)
    ours, theirs = _conv(nd)
    if not _runs(algo, name):
        with pytest.raises(ValueError, match="cannot run this convolution.*depthwise"):
            ours(x, w, b, algo=algo, **kw)
        pytest.skip(f"{algo} refuses {name} (the refusal is what this case checks)")
    y, r = ours(x, w, b, algo=algo, **kw), theirs(x, w, b, **kw)
    assert_close(y, r, what=f"{algo} forward")
    g = torch.randn_like(r)
    for what, a, e in zip(("grad_input", "grad_weight", "grad_bias"), torch.autograd.grad(y, (x, w, b), g),
                          torch.autograd.grad(r, (x, w, b), g)):
        assert_close(a, e, what=f"{algo} {what}")


@pytest.mark.parametrize("algo", CUDA_ALGOS)
def test_conv_float32(algo):
    x, w, b, kw, nd = _case("2d_depthwise_m2", torch.float32)
    assert_close(F.conv2d(x, w, b, algo=algo, **kw), TF.conv2d(x, w, b, **kw), what=algo)


@pytest.mark.parametrize("algo", ["cuda-direct", "implicit-gemm"])
def test_gradcheck(algo):
    x, w, b, kw, nd = _case("2d_same_even")
    assert torch.autograd.gradcheck(lambda x, w, b: F.conv2d(x, w, b, algo=algo, **kw), (x, w, b), fast_mode=True)


def test_implicit_gemm_split_k_weight_gradient(monkeypatch):
    monkeypatch.setattr(cuda_conv, "IGEMM_MIN_SPLIT_LEN", 16)
    x, w, b, kw, nd = _case("2d_groups")
    geom_splits = []
    real = cuda_conv.igemm_splits
    monkeypatch.setattr(cuda_conv, "igemm_splits", lambda g: geom_splits.append(real(g)) or geom_splits[-1])
    y = F.conv2d(x, w, b, algo="implicit-gemm", **kw)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, w, g)[0]
    want = torch.autograd.grad(TF.conv2d(x, w, b, **kw), w, g)[0]
    assert geom_splits and geom_splits[0][0] > 1, geom_splits
    assert_close(got, want, what="split-K grad_weight")
    again = torch.autograd.grad(F.conv2d(x, w, b, algo="implicit-gemm", **kw), w, g)[0]
    assert torch.equal(got, again)  # the second pass adds the partials in a fixed order


def test_implicit_gemm_reports_its_split_k_workspace(monkeypatch):
    """implicit-gemm's workspace is the split-K partial sums (splits x |W|), not 0."""
    from fastconv.ops.conv import make_geometry

    geom = make_geometry(2, 64, 16, 32, 1, (28, 28), (3, 3), None, (1, 1), (1, 1), (1, 1), (1, 1),
                         torch.float32, "cuda-emu")
    alg = next(a for a in cuda_conv.ALGORITHMS if a.name == "implicit-gemm")
    splits, _ = cuda_conv.igemm_splits(geom)
    assert splits > 1
    assert alg.workspace_bytes(geom) == splits * 32 * 16 * 9 * 4
    monkeypatch.setattr(cuda_conv, "IGEMM_TARGET_BLOCKS", 1)  # one split: no partial buffer
    assert alg.workspace_bytes(geom) == 0


def test_a_kernel_launched_with_another_block_size_traps():
    """Kernels written for exactly 256 threads (shared partial[256], the 16x16 GEMM map) refuse any
    other block size on the device (FC_REQUIRE_BLOCK) instead of computing garbage."""
    from fastconv import emu

    fn = loader.function("cuda-emu", "conv", "conv_direct_grad_weight<double>")
    gy, x, gw = torch.randn(1, 1, 1, 2, 2, dtype=torch.float64), torch.randn(1, 1, 1, 2, 2, dtype=torch.float64), \
        torch.zeros(1, 1, 1, 1, 1, dtype=torch.float64)
    geom = [1, 1, 1, 2, 2, 1, 1, 1, 1, 1, 2, 2, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1]
    args = (gy, x, gw, *map(np.int32, geom))
    fn((1,), (256,), args)  # the right size runs
    assert gw.item() == pytest.approx(float((gy * x).sum()))
    with pytest.raises(emu.KernelTrap):
        fn((1,), (128,), args)


@pytest.mark.parametrize("algo", ["auto", "cuda-direct", "implicit-gemm"])
def test_conv_transpose2d_through_the_registry(algo):
    if not hasattr(F, "conv_transpose2d"):
        pytest.skip("fastconv.functional.conv_transpose2d has not landed")
    x = torch.randn(2, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    kw = dict(stride=2, padding=1, output_padding=1)
    try:
        y = F.conv_transpose2d(x, w, algo=algo, **kw)
    except ValueError as e:
        pytest.skip(f"transposed conv does not take algo={algo!r} here: {e}")
    r = TF.conv_transpose2d(x, w, **kw)
    assert_close(y, r, what="conv_transpose2d")
    g = torch.randn_like(r)
    for a, e in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(r, (x, w), g)):
        assert_close(a, e, what="conv_transpose2d grads")


def test_auto_heuristic_picks_cuda_algorithms():
    from fastconv import registry
    from fastconv.ops.conv import make_geometry

    def geom(c, k, groups, ks):
        return make_geometry(2, 1, c, k, groups, (8, 8), ks, None, (1, 1), (1, 1), (1, 1), (1, 1),
                             torch.float32, "cuda-emu")

    assert registry.choose("auto", geom(32, 32, 32, (3, 3)), "forward").name == "cuda-depthwise"
    assert registry.choose("auto", geom(64, 64, 1, (3, 3)), "forward").name == "implicit-gemm"
    assert registry.choose("auto", geom(1, 2, 1, (3, 3)), "forward").name == "cuda-direct"


def test_seed_examples_exact_for_every_cuda_algorithm():
    x = torch.tensor([[0, 0, 5, 2, 1, 4], [3, 4, 1, 1, 1, 3], [6, 7, 1, 1, 1, 4], [8, 9, 2, 1, 5, 2],
                      [2, 0, 0, 0, 2, 1], [6, 2, 2, 2, 2, 1]], dtype=torch.float32)[None, None]
    w = torch.tensor([[1, 0, -1]] * 3, dtype=torch.float32)[None, None]
    want = torch.tensor([[2, 7, 4, -7], [13, 17, -3, -6], [13, 14, -5, -5], [12, 8, -5, -1]], dtype=torch.float32)
    for algo in CUDA_ALGOS:
        assert torch.equal(F.conv2d(x, w, algo=algo)[0, 0], want), algo


# ------------------------------------------------------------------------------------------ planted bug
def test_missing_tile_loop_barrier_is_caught(monkeypatch):
    """Delete the implicit-GEMM tile-loop __syncthreads(): the harness's shuffled threads must show it."""
    marker = "__syncthreads();  // tile-loop barrier"
    text = loader.source("conv")
    assert text.count(marker) == 1
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    w = torch.randn(20, 16, 3, 3, dtype=torch.float64)
    ref = TF.conv2d(x, w, padding=1)
    assert_close(F.conv2d(x, w, padding=1, algo="implicit-gemm"), ref)
    real_source = loader.source
    monkeypatch.setattr(loader, "source", lambda f: text.replace(marker, ";  // planted bug: deleted") if f == "conv" else real_source(f))
    loader.clear()
    try:
        bad = F.conv2d(x, w, padding=1, algo="implicit-gemm")
        assert not torch.allclose(bad, ref, atol=1e-6, equal_nan=False), "the planted bug went unnoticed"
    finally:
        monkeypatch.undo()
        loader.clear()
    assert_close(F.conv2d(x, w, padding=1, algo="implicit-gemm"), ref)


# ------------------------------------------------------------------------------------------ pooling
SIZES = {1: (10,), 2: (7, 6), 3: (4, 5, 5)}


def _as5d(t):
    return t.reshape(*t.shape[:2], *(1,) * (5 - t.dim()), *t.shape[2:]).contiguous()


def _t3(v, ndim, fill):
    v = (v,) * ndim if isinstance(v, int) else tuple(v)
    return (fill,) * (3 - ndim) + v


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("case", [(3, 2, 1, 1, True), (2, 2, 0, 2, False), (3, 1, 1, 1, False)])
@pytest.mark.parametrize("backward", ["claims", "window"])
def test_max_min_pool_values_indices_and_both_backward_kernels(ndim, case, backward):
    """Values, indices (NaNs and ties) and both gather forms of the backward against torch."""
    k, s, p, d, ceil = case
    x = torch.randn(2, 3, *SIZES[ndim], dtype=torch.float64)
    x.view(-1)[::5] = float("nan")
    x.view(-1)[1::7] = x.view(-1)[2::7][: x.view(-1)[1::7].numel()]  # ties
    x.requires_grad_()
    y, i = getattr(F, f"max_pool{ndim}d")(x, k, s, p, d, ceil, return_indices=True)
    r, ri = getattr(TF, f"max_pool{ndim}d")(x, k, s, p, d, ceil, return_indices=True)
    assert_close(y, r)
    assert torch.equal(i, ri)
    g = torch.randn_like(r)
    want = torch.autograd.grad(r, x, g)[0]
    if backward == "claims":  # what the op's autograd runs
        assert_close(torch.autograd.grad(y, x, g)[0], want)
    else:
        window = (_t3(k, ndim, 1), _t3(s, ndim, 1), _t3(p, ndim, 0), _t3(d, ndim, 1))
        got = cuda_pool.CudaPoolKernels().max_pool_backward(_as5d(g), _as5d(i), _t3(x.shape[2:], ndim, 1),
                                                             window=window)
        assert_close(got.reshape(want.shape), want)
    m, mi = getattr(F, f"min_pool{ndim}d")(x, k, s, p, d, ceil, return_indices=True)
    r2, ri2 = getattr(TF, f"max_pool{ndim}d")(-x, k, s, p, d, ceil, return_indices=True)
    assert_close(m, -r2)
    assert torch.equal(mi, ri2)


def test_max_pool_backward_sums_duplicates_in_output_order():
    """Arbitrary indices (the gradient of max_unpool's gradient): every input sums the outputs that
    point at it, in output order (torch's order), bit for bit, with many planes."""
    torch.manual_seed(3)
    n, c, o, i_plane = 3, 700, 9, 5   # 2100 planes: the count that used to select a serial kernel
    idx = torch.randint(0, i_plane, (n, c, o))
    gy = torch.randn(n, c, o, dtype=torch.float32) * torch.logspace(-6, 6, o)  # order-sensitive sums
    got = torch.ops.fastconv.max_pool_backward(gy, idx, [i_plane])
    want = torch.zeros(n, c, i_plane, dtype=torch.float32)
    for j in range(o):  # torch's CPU scatter order
        want.scatter_add_(2, idx[:, :, j:j + 1], gy[:, :, j:j + 1])
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_max_pool_subnormals_pick_torchs_index(dtype):
    """The kernels compile with -ftz=false (loader.options): subnormal values compare as themselves,
    not as flushed zeros, so the index is torch's."""
    tiny = torch.finfo(dtype).tiny
    x = torch.tensor([[[tiny / 4, tiny / 2, tiny / 8, 0.0, -tiny / 2, tiny / 16]]], dtype=dtype)
    y, i = F.max_pool1d(x, 3, 1, return_indices=True)
    r, ri = TF.max_pool1d(x, 3, 1, return_indices=True)
    assert torch.equal(y, r) and torch.equal(i, ri)
    m, mi = F.min_pool1d(x, 3, 1, return_indices=True)
    r2, ri2 = TF.max_pool1d(-x, 3, 1, return_indices=True)
    assert torch.equal(m, -r2) and torch.equal(mi, ri2)


@pytest.mark.parametrize("plane", [(1, 1), (7, 7), (3, 5), (16, 16), (11, 13)])
def test_small_planes_use_packed_grids(plane):
    """Planes smaller than half a block are packed several per block (plane_grid); every plane and
    position is still covered, including more planes than one grid row holds."""
    from fastconv.cuda.launch import BLOCK, plane_grid

    h, w = plane
    x = torch.randn(5, 37, h + 2, w + 2, dtype=torch.float64, requires_grad=True)
    y = F.avg_pool2d(x, 3, 1)
    r = TF.avg_pool2d(x, 3, 1)
    assert_close(y, r)
    g = torch.randn_like(r)
    assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(r, x, g)[0])
    gx, gy = plane_grid(5 * 37, h * w)
    if 2 * h * w <= BLOCK:
        assert gx == 1 and gy == -(-5 * 37 // (BLOCK // (h * w)))
    z = torch.randn(3, 300, 7, 7, dtype=torch.float64, requires_grad=True)  # global pooling: 1x1 planes
    assert_close(F.adaptive_avg_pool2d(z, 1), TF.adaptive_avg_pool2d(z, 1))
    ym, im = F.adaptive_max_pool2d(z, 1, return_indices=True)
    rm, rim = TF.adaptive_max_pool2d(z, 1, return_indices=True)
    assert_close(ym, rm)
    assert torch.equal(im, rim)
    gm = torch.randn_like(rm)
    assert_close(torch.autograd.grad(ym, z, gm)[0], torch.autograd.grad(rm, z, gm)[0])


def test_plane_loop_covers_every_plane_with_a_capped_grid(monkeypatch):
    """FC_PLANE_LOOP derives planes-per-block from the launch, so a grid smaller than the work
    (the 65535 cap on grid.y, reached here by lowering it) still covers every plane."""
    from fastconv.cuda import launch

    monkeypatch.setattr(launch, "MAX_GRID_YZ", 3)
    x = torch.randn(4, 50, 5, 6, dtype=torch.float64)
    assert_close(F.avg_pool2d(x, 2, 1), TF.avg_pool2d(x, 2, 1))
    x = torch.randn(2, 5, 20, 20, dtype=torch.float64)
    assert_close(F.avg_pool2d(x, 2, 1), TF.avg_pool2d(x, 2, 1))


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("case", [(3, 2, 1, True, True, None), (3, 2, 1, True, False, None),
                                  (2, 1, 1, False, False, 3)])
def test_avg_pool_and_backward(ndim, case):
    k, s, p, ceil, include_pad, divisor = case
    if ndim == 1 and divisor:
        pytest.skip("avg_pool1d has no divisor_override (as torch)")
    x = torch.randn(2, 3, *SIZES[ndim], dtype=torch.float64, requires_grad=True)
    extra = {} if ndim == 1 else dict(divisor_override=divisor)
    y = getattr(F, f"avg_pool{ndim}d")(x, k, s, p, ceil, include_pad, **extra)
    r = getattr(TF, f"avg_pool{ndim}d")(x, k, s, p, ceil, include_pad, **extra)
    assert_close(y, r)
    g = torch.randn_like(r)
    assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(r, x, g)[0])


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_adaptive_pools(ndim):
    x = torch.randn(2, 3, *SIZES[ndim], dtype=torch.float64)
    x.view(-1)[::9] = float("nan")
    x.requires_grad_()
    out = (3, 4, 3)[3 - ndim:]
    y, r = getattr(F, f"adaptive_avg_pool{ndim}d")(x, out), getattr(TF, f"adaptive_avg_pool{ndim}d")(x, out)
    assert_close(y, r)
    g = torch.randn_like(r)
    xc = x.detach().nan_to_num().requires_grad_()
    assert_close(torch.autograd.grad(getattr(F, f"adaptive_avg_pool{ndim}d")(xc, out), xc, g)[0],
                 torch.autograd.grad(getattr(TF, f"adaptive_avg_pool{ndim}d")(xc, out), xc, g)[0])
    y, i = getattr(F, f"adaptive_max_pool{ndim}d")(x, out, return_indices=True)
    r, ri = getattr(TF, f"adaptive_max_pool{ndim}d")(x, out, return_indices=True)
    assert_close(y, r)
    assert torch.equal(i, ri)


def test_max_unpool_duplicates_later_wins_and_gradients():
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64, requires_grad=True)
    y, i = F.max_pool2d(x.detach(), 3, 1, 1, return_indices=True)   # overlapping windows: duplicate indices
    yy = y.clone().requires_grad_()
    ours = F.max_unpool2d(yy, i, 3, 1, 1, output_size=x.shape[2:])
    theirs = TF.max_unpool2d(y, i, 3, 1, 1, output_size=x.shape[2:])
    assert_close(ours, theirs)
    g = torch.randn_like(theirs)
    assert_close(torch.autograd.grad(ours, yy, g)[0], g.flatten(2).gather(2, i.flatten(2)).view_as(y))


def test_bad_indices_raise():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    idx = torch.zeros(1, 2, 2, 2, dtype=torch.int64)
    idx[0, 1, 1, 1] = 99
    with pytest.raises(RuntimeError, match="invalid max index"):
        torch.ops.fastconv.max_unpool(x[:, :, :2, :2].contiguous(), idx, [4, 4])
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.fastconv.max_pool_backward(x[:, :, :2, :2].contiguous(), idx, [4, 4])


def test_pool_float32_and_gradcheck():
    x32 = torch.randn(2, 3, 9, 8)
    assert_close(F.max_pool2d(x32, 3, 2, 1), TF.max_pool2d(x32, 3, 2, 1))
    assert_close(F.avg_pool2d(x32, 3, 2, 1), TF.avg_pool2d(x32, 3, 2, 1))
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    for fn in (lambda x: F.max_pool2d(x, 2, 1), lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True),
               lambda x: F.adaptive_avg_pool2d(x, (4, 3))):
        assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)


# ------------------------------------------------------------------------------------------ loading
def test_importing_fastconv_does_not_import_cupy():
    code = "import sys, fastconv; assert 'cupy' not in sys.modules, 'cupy imported at import time'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_cupy_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(ImportError, match=r"pip install fastconv\[cuda\]"):
        loader.import_cupy()
