"""float16 / bfloat16 in the CUDA pooling and depthwise kernels, on the CPU harness (issue 13 item 3).

The kernels are templates instantiated for ``__half`` and ``__nv_bfloat16`` (kernels/pool.cu, conv.cu): they
read and write 16 bits and compute in float32, rounding once. The reference is torch on the same values in
float32, rounded to the half dtype: max/min pooling must agree exactly (values, indices, ties, NaN), the sums
within one rounding of the dtype (tolerances.py). A spy on the loader checks the half kernels really ran (the
pooling ops are in ``precision.NATIVE_HALF``, so no float32 copy is made on "cuda"/"cuda-emu").
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import fastconv
import fastconv.functional as F
from fastconv.cuda import launch, loader
from fastconv.ops import precision
from helpers import assert_close

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU harness needs g++")
HALF = [torch.float16, torch.bfloat16]
CTYPE = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}


@pytest.fixture(autouse=True)
def _emu():
    with fastconv.backend("cuda-emu"):
        yield


@pytest.fixture
def launched(monkeypatch):
    """The kernel names the CUDA host code looks up during the test."""
    names = []
    real = loader.function

    def spy(target, family, name, device_id=0):
        names.append(name)
        return real(target, family, name, device_id)
    monkeypatch.setattr(loader, "function", spy)
    return names


def _ties_and_nans(dtype, shape=(2, 3, 7, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, shape, generator=g).to(dtype)   # small integers: many ties, exact in both dtypes
    x.view(-1)[::11] = float("nan")
    return x


def _ref_grad(fn, x, g, **kw):
    x32 = x.detach().float().requires_grad_()
    y = fn(x32, **kw)
    (y[0] if isinstance(y, tuple) else y).backward(g.float())
    return y, x32.grad


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=(2, 3), dilation=(2, 1)),
                                dict(kernel_size=3, stride=2, ceil_mode=True)], ids=["pad", "dilated", "ceil"])
def test_half_max_pool_values_indices_ties_nan_and_backward(dtype, kw, launched):
    assert ("cuda-emu", "max_pool") in precision.NATIVE_HALF
    x = _ties_and_nans(dtype).requires_grad_()
    y, idx = F.max_pool2d(x, return_indices=True, **kw)
    want, want_idx = TF.max_pool2d(x.detach().float(), return_indices=True, **kw)
    assert y.dtype == dtype
    torch.testing.assert_close(y, want.to(dtype), rtol=0, atol=0, equal_nan=True)   # exact, NaN where torch's
    torch.testing.assert_close(idx, want_idx, rtol=0, atol=0)                         # ties keep the first
    g = torch.randn(y.shape).to(dtype)
    y.backward(g)
    _, gx = _ref_grad(lambda t, **k: TF.max_pool2d(t, **k), x, g, **kw)
    assert x.grad.dtype == dtype
    assert_close(x.grad, gx.to(dtype), what=f"max_pool2d backward {dtype}")
    assert f"max_pool_forward<{CTYPE[dtype]}>" in launched
    assert {f"max_pool_backward_window<{CTYPE[dtype]}>", f"max_pool_backward_gather<{CTYPE[dtype]}>"} & set(launched)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_adaptive_max_pool_and_unpool(dtype, launched):
    x = _ties_and_nans(dtype, (2, 2, 9, 7), seed=1).requires_grad_()
    y, idx = F.adaptive_max_pool2d(x, (4, 3), return_indices=True)
    want, want_idx = TF.adaptive_max_pool2d(x.detach().float(), (4, 3), return_indices=True)
    torch.testing.assert_close(y, want.to(dtype), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(idx, want_idx, rtol=0, atol=0)
    g = torch.randn(y.shape).to(dtype)
    y.backward(g)
    _, gx = _ref_grad(lambda t: TF.adaptive_max_pool2d(t, (4, 3)), x, g)
    assert_close(x.grad, gx.to(dtype), what=f"adaptive_max_pool2d backward {dtype}")
    # max_unpool: a scatter of 16-bit values, exact.
    p, pi = TF.max_pool2d(torch.randn(1, 2, 6, 6), 2, return_indices=True)
    u = F.max_unpool2d(p.to(dtype), pi, 2)
    torch.testing.assert_close(u, TF.max_unpool2d(p, pi, 2).to(dtype), rtol=0, atol=0)
    for stem in ("adaptive_max_pool_forward", "max_pool_backward_gather", "max_unpool_gather"):
        assert f"{stem}<{CTYPE[dtype]}>" in launched, stem


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=3, padding=1, count_include_pad=False),
                                dict(kernel_size=(3, 2), stride=2, ceil_mode=True, divisor_override=5)],
                         ids=["pad", "exclude_pad", "ceil_divisor"])
def test_half_avg_pool_forward_backward(dtype, kw, launched):
    x = torch.randn(2, 3, 8, 7).to(dtype).requires_grad_()
    y = F.avg_pool2d(x, **kw)
    want = TF.avg_pool2d(x.detach().float(), **kw)
    assert y.dtype == dtype
    assert_close(y, want.to(dtype), what=f"avg_pool2d {dtype}")
    g = torch.randn(y.shape).to(dtype)
    y.backward(g)
    _, gx = _ref_grad(lambda t, **k: TF.avg_pool2d(t, **k), x, g, **kw)
    assert_close(x.grad, gx.to(dtype), what=f"avg_pool2d backward {dtype}")
    assert {f"avg_pool_forward<{CTYPE[dtype]}>", f"avg_pool_backward<{CTYPE[dtype]}>"} <= set(launched)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_adaptive_avg_pool_forward_backward(dtype, launched):
    x = torch.randn(2, 3, 9, 10).to(dtype).requires_grad_()
    y = F.adaptive_avg_pool2d(x, (4, 3))
    assert_close(y, TF.adaptive_avg_pool2d(x.detach().float(), (4, 3)).to(dtype), what=f"adaptive_avg_pool2d {dtype}")
    g = torch.randn(y.shape).to(dtype)
    y.backward(g)
    _, gx = _ref_grad(lambda t: TF.adaptive_avg_pool2d(t, (4, 3)), x, g)
    assert_close(x.grad, gx.to(dtype), what=f"adaptive_avg_pool2d backward {dtype}")
    assert {f"adaptive_avg_pool_forward<{CTYPE[dtype]}>", f"adaptive_avg_pool_backward<{CTYPE[dtype]}>"} <= set(launched)


def test_half_nan_propagates_in_min_pooling_as_in_float():
    """minimum=True (the min-pool path of the same kernel): float32 and float16 pick the same elements."""
    x = _ties_and_nans(torch.float16, (1, 2, 6, 6), seed=3)
    y16, i16 = torch.ops.fastconv.max_pool(x, [2, 2], [2, 2], [0, 0], [1, 1], False, True)
    y32, i32 = torch.ops.fastconv.max_pool(x.float(), [2, 2], [2, 2], [0, 0], [1, 1], False, True)
    torch.testing.assert_close(y16, y32.to(torch.float16), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(i16, i32, rtol=0, atol=0)


# ---- the depthwise conv kernel in 16 bits (launched directly: conv2d's half path is chosen by the registry) ----
def _geom_args(n, c, hw, k, ks, stride, pad):
    oh = (hw[0] + 2 * pad - ks) // stride + 1
    ow = (hw[1] + 2 * pad - ks) // stride + 1
    return (oh, ow), [np.int32(v) for v in (n, c, 1, *hw, k, 1, ks, ks, 1, oh, ow, 1, stride, stride, 0, pad, pad,
                                            1, 1, 1, c)]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("mult", [1, 2])
def test_half_depthwise_forward_and_grad_input_kernels(dtype, mult):
    n, c, hw, ks, stride, pad = 2, 3, (7, 6), 3, 2, 1
    k = c * mult
    (oh, ow), gargs = _geom_args(n, c, hw, k, ks, stride, pad)
    x, w, b = torch.randn(n, c, *hw).to(dtype), torch.randn(k, 1, ks, ks).to(dtype), torch.randn(k).to(dtype)
    fwd = loader.function("cuda-emu", "conv", launch.instance("conv_direct_forward", dtype, "true"))
    y = torch.empty(n, k, 1, oh, ow, dtype=dtype)
    grid = launch.plane_grid(n * k, oh * ow)
    fwd(grid, (launch.BLOCK,), (x.reshape(n, c, 1, *hw), w.reshape(k, 1, 1, ks, ks), b, y, np.int32(1), *gargs))
    want = TF.conv2d(x.float(), w.float(), b.float(), stride=stride, padding=pad, groups=c)
    assert_close(y.reshape(want.shape), want.to(dtype), what=f"depthwise forward {dtype}")
    gy = torch.randn(want.shape).to(dtype)
    x32 = x.float().requires_grad_()
    TF.conv2d(x32, w.float(), None, stride=stride, padding=pad, groups=c).backward(gy.float())
    bwd = loader.function("cuda-emu", "conv", launch.instance("conv_direct_grad_input", dtype, "true"))
    gx = torch.empty(n, c, 1, *hw, dtype=dtype)
    bwd(launch.plane_grid(n * c, hw[0] * hw[1]), (launch.BLOCK,),
        (gy.reshape(n, k, 1, oh, ow), w.reshape(k, 1, 1, ks, ks), gx, *gargs))
    assert_close(gx.reshape(x.shape), x32.grad.to(dtype), what=f"depthwise grad_input {dtype}")


def test_half_kernels_refuse_a_float_array():
    """The harness checks each instantiation's element type: a float32 tensor is no __half array."""
    from fastconv import emu

    fn = loader.function("cuda-emu", "pool", "avg_pool_forward<__half>")
    with pytest.raises(TypeError, match="has dtype float32"):
        fn((1,), (256,), (torch.zeros(4), torch.zeros(4, dtype=torch.float16), *[np.int32(1)] * 21))
    assert isinstance(fn, emu.Function)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_max_pool_backward_window_form(dtype):
    """The one-launch gather of max_pool's backward (window known) in 16 bits, against the generic form."""
    from fastconv.cuda import pool as cuda_pool

    impl = cuda_pool.POOL_IMPLS["cuda-emu"]
    x = _ties_and_nans(dtype, (2, 2, 1, 7, 8), seed=4)
    window = ((1, 3, 3), (1, 2, 2), (0, 1, 1), (1, 1, 1))
    y, idx = impl.max_pool(x, *window, (1, 4, 4), False)
    g = torch.randn(y.shape).to(dtype)
    by_window = impl.max_pool_backward(g, idx, (1, 7, 8), window=window)
    generic = impl.max_pool_backward(g, idx, (1, 7, 8))
    assert by_window.dtype == dtype
    torch.testing.assert_close(by_window, generic, rtol=0, atol=0)
    want = torch.zeros(2, 2, 56).scatter_add_(2, idx.reshape(2, 2, -1), g.float().reshape(2, 2, -1))
    assert_close(by_window.reshape(2, 2, -1), want.to(dtype), what=f"max_pool backward (window) {dtype}")


# ---- convolutions through the ops: every SIMT CUDA algorithm takes 16-bit tensors (NATIVE_HALF) -------------
CONV_HALF_CASES = {
    "cuda-direct": ((2, 3, 7, 6), (4, 3, 3, 3), dict(stride=2, padding=1)),
    "implicit-gemm": ((2, 4, 6, 5), (6, 2, 3, 2), dict(padding=(1, 0), groups=2, dilation=(1, 2))),
    "cuda-depthwise": ((2, 3, 7, 7), (6, 1, 3, 3), dict(stride=2, padding=1, groups=3)),
}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("algo", list(CONV_HALF_CASES))
def test_half_conv2d_algorithms_forward_and_gradients(algo, dtype, launched, monkeypatch):
    """Forward, input and weight gradient in 16 bits (float32 accumulation, one rounding) against torch in
    float32 rounded; the implicit GEMM's weight gradient with several splits (float32 partial sums)."""
    from fastconv.cuda import conv as cuda_conv

    monkeypatch.setattr(cuda_conv, "IGEMM_MIN_SPLIT_LEN", 8)   # force split-K on this small case
    xs, ws, kw = CONV_HALF_CASES[algo]
    torch.manual_seed(0)
    x, w, b = torch.randn(xs), torch.randn(ws), torch.randn(ws[0])
    xh, wh, bh = (t.to(dtype).requires_grad_() for t in (x, w, b))
    y = F.conv2d(xh, wh, bh, algo=algo, **kw)
    assert y.dtype == dtype
    x32, w32, b32 = (t.detach().float().requires_grad_() for t in (xh, wh, bh))
    want = TF.conv2d(x32, w32, b32, **kw)
    assert_close(y, want.to(dtype), what=f"{algo} forward {dtype}")
    g = torch.randn(want.shape).to(dtype)
    y.backward(g)
    want.backward(g.float())
    assert_close(xh.grad, x32.grad.to(dtype), what=f"{algo} grad_input {dtype}")
    assert_close(wh.grad, w32.grad.to(dtype), what=f"{algo} grad_weight {dtype}")
    ctype = CTYPE[dtype]
    assert any(f"<{ctype}" in n for n in launched), launched
    if algo == "implicit-gemm":
        assert f"conv_reduce_splits<{ctype}>" in launched
