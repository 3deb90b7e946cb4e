"""float16 and bfloat16 through every conv and pooling op: computed in float32, rounded once, as torch does.

Reference: torch's op in float32 on the same half-rounded inputs, its result rounded once to the half dtype
(what torch's CPU kernels compute). Gradients likewise: the half grad_output upcast, torch's float32 gradient,
rounded once. Tolerances: the table in conftest (torch's own default ones for these dtypes).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF

import fastconv
import fastconv.functional as F
from fastconv import models
from fastconv.nn.convert import to_torch
from conftest import emu_available
from helpers import assert_close

HALF = [torch.float16, torch.bfloat16]


def _r(*shape):
    return torch.randn(*shape, dtype=torch.float64)


# name -> (fastconv fn, torch fn, float64 inputs (floating ones differentiated), kwargs)
CASES = {
    "conv1d": (F.conv1d, TF.conv1d, lambda: (_r(2, 3, 11), _r(4, 3, 3), _r(4)), dict(stride=2, padding=1)),
    "conv2d": (F.conv2d, TF.conv2d, lambda: (_r(2, 4, 9, 8), _r(6, 2, 3, 3), _r(6)), dict(padding=1, groups=2)),
    "conv2d_same": (F.conv2d, TF.conv2d, lambda: (_r(1, 3, 7, 7), _r(5, 3, 4, 2), None),
                    dict(padding="same", dilation=2)),
    "conv3d": (F.conv3d, TF.conv3d, lambda: (_r(1, 2, 5, 6, 5), _r(3, 2, 3, 2, 3), _r(3)), dict(stride=(1, 2, 1))),
    "depthwise2d": (F.conv2d, TF.conv2d, lambda: (_r(2, 4, 8, 8), _r(8, 1, 3, 3), _r(8)),
                    dict(padding=1, groups=4)),
    "conv_transpose1d": (F.conv_transpose1d, TF.conv_transpose1d, lambda: (_r(2, 3, 6), _r(3, 4, 3), _r(4)),
                         dict(stride=2, output_padding=1)),
    "conv_transpose2d": (F.conv_transpose2d, TF.conv_transpose2d, lambda: (_r(2, 4, 5, 5), _r(4, 3, 3, 3), _r(6)),
                         dict(stride=2, padding=1, groups=2)),
    "conv_transpose3d": (F.conv_transpose3d, TF.conv_transpose3d, lambda: (_r(1, 2, 3, 4, 3), _r(2, 3, 2, 2, 2),
                                                                           None), dict(stride=2)),
    "max_pool1d": (F.max_pool1d, TF.max_pool1d, lambda: (_r(2, 3, 12),), dict(kernel_size=3, stride=2)),
    "max_pool2d": (F.max_pool2d, TF.max_pool2d, lambda: (_r(2, 3, 9, 9),), dict(kernel_size=3, stride=2, padding=1)),
    "max_pool3d": (F.max_pool3d, TF.max_pool3d, lambda: (_r(1, 2, 6, 6, 6),), dict(kernel_size=2)),
    "avg_pool1d": (F.avg_pool1d, TF.avg_pool1d, lambda: (_r(2, 3, 12),), dict(kernel_size=3, stride=2)),
    "avg_pool2d": (F.avg_pool2d, TF.avg_pool2d, lambda: (_r(2, 3, 9, 9),),
                   dict(kernel_size=3, stride=2, padding=1, count_include_pad=False)),
    "avg_pool3d": (F.avg_pool3d, TF.avg_pool3d, lambda: (_r(1, 2, 6, 6, 6),), dict(kernel_size=2)),
    "adaptive_avg_pool2d": (F.adaptive_avg_pool2d, TF.adaptive_avg_pool2d, lambda: (_r(2, 3, 9, 7),),
                            dict(output_size=(4, 3))),
    "adaptive_avg_pool3d": (F.adaptive_avg_pool3d, TF.adaptive_avg_pool3d, lambda: (_r(1, 2, 5, 6, 7),),
                            dict(output_size=2)),
    "adaptive_max_pool2d": (F.adaptive_max_pool2d, TF.adaptive_max_pool2d, lambda: (_r(2, 3, 9, 7),),
                            dict(output_size=(4, 3))),
    "adaptive_max_pool1d": (F.adaptive_max_pool1d, TF.adaptive_max_pool1d, lambda: (_r(2, 3, 10),),
                            dict(output_size=4)),
}


#: torch 2.13's CPU kernels refuse half for these (NotImplementedError); fastconv computes them in float32.
TORCH_CPU_LACKS_HALF = {"avg_pool3d"}


def _run(fn, inputs, kwargs, g=None):
    """Output and gradients of every differentiable input for ``fn`` (``g`` the grad_output, same dtype)."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    y = fn(*leaves, **kwargs)
    if g is None:
        g = torch.randn(y.shape, dtype=y.dtype)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], g.to(y.dtype))
    return y, grads, g  # g in y's dtype: the reference run upcasts the same half-rounded values


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_op_in_half_matches_float32_rounded_once(name, dtype):
    fc, tc, make, kwargs = CASES[name]
    inputs = [None if t is None else t.to(dtype) for t in make()]
    y, grads, g = _run(fc, inputs, kwargs)
    assert y.dtype == dtype and all(gr.dtype == dtype for gr in grads)
    y32, grads32, _ = _run(tc, [None if t is None else t.float() for t in inputs], kwargs, g)
    assert_close(y, y32.to(dtype), what=f"{name} {dtype} forward")
    for i, (a, b) in enumerate(zip(grads, grads32)):
        assert_close(a, b.to(dtype), what=f"{name} {dtype} grad {i}")
    # torch's own op in the half dtype gives the same dtype; the ones torch's CPU lacks, fastconv has anyway
    if name in TORCH_CPU_LACKS_HALF:
        with pytest.raises(NotImplementedError, match="not implemented for"):
            tc(*inputs, **kwargs)
    else:
        assert tc(*inputs, **kwargs).dtype == dtype


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_separable_and_unpool_and_lp_pool_in_half(dtype):
    x = _r(2, 4, 8, 8).to(dtype)
    dw, pw, db, pb = _r(8, 1, 3, 3).to(dtype), _r(5, 8, 1, 1).to(dtype), _r(8).to(dtype), _r(5).to(dtype)
    y = F.depthwise_separable_conv2d(x, dw, pw, db, pb, padding=1)
    xf = x.float()
    ref = TF.conv2d(TF.conv2d(xf, dw.float(), db.float(), padding=1, groups=4), pw.float(), pb.float())
    assert_close(y, ref.to(dtype), what="separable")

    v, idx = F.max_pool2d(x, 2, return_indices=True)
    assert v.dtype == dtype and idx.dtype == torch.int64
    u = F.max_unpool2d(v, idx, 2)
    assert_close(u, TF.max_unpool2d(v.float(), idx, 2).to(dtype), what="max_unpool2d")

    xp = x.abs() + 0.5  # positive: lp pooling of a fractional power
    assert_close(F.lp_pool2d(xp, 2.0, 2), TF.lp_pool2d(xp, 2.0, 2), what="lp_pool2d (both in the half dtype)")


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_registered_ops_take_half_directly(dtype):
    x, w, b = _r(1, 2, 6, 6).to(dtype), _r(3, 2, 3, 3).to(dtype), _r(3).to(dtype)
    y = torch.ops.fastconv.conv2d(x, w, b, [1, 1], [1, 1], [1, 1], [1, 1], 1, "auto")
    assert_close(y, TF.conv2d(x.float(), w.float(), b.float(), padding=1).to(dtype), what="torch.ops conv2d")
    g = torch.randn_like(y)
    gi = torch.ops.fastconv.conv2d_grad_input(g, w, [6, 6], [1, 1], [1, 1], [1, 1], [1, 1], 1, "auto")
    gw = torch.ops.fastconv.conv2d_grad_weight(g, x, [3, 3], [1, 1], [1, 1], [1, 1], [1, 1], 1, "auto")
    assert gi.dtype == gw.dtype == dtype
    v, i = torch.ops.fastconv.max_pool(x, [2, 2], [2, 2], [0, 0], [1, 1], False, False)
    assert v.dtype == dtype and i.dtype == torch.int64
    assert torch.ops.fastconv.avg_pool_backward(v, [6, 6], [2, 2], [2, 2], [0, 0], False, True, 0).dtype == dtype


def test_opcheck_in_half():
    x, w, b = _r(1, 2, 5, 5).half(), _r(3, 2, 3, 3).half(), _r(3).half()
    args = (x.requires_grad_(), w.requires_grad_(), b, [1, 1], [1, 1], [1, 1], [1, 1], 1, "auto")
    torch.library.opcheck(torch.ops.fastconv.conv2d.default, args)
    torch.library.opcheck(torch.ops.fastconv.avg_pool.default,
                          (_r(1, 2, 6, 6).bfloat16().requires_grad_(), [2, 2], [2, 2], [0, 0], False, True, 0))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_zero_batch_in_half(dtype):
    x, w = torch.zeros(0, 2, 5, 5, dtype=dtype), _r(3, 2, 3, 3).to(dtype)
    assert F.conv2d(x, w).dtype == dtype and F.conv2d(x, w).shape == (0, 3, 3, 3)
    assert F.max_pool2d(x, 2).dtype == dtype


@pytest.mark.parametrize(("a", "b"), [(torch.float16, torch.float32), (torch.bfloat16, torch.float16),
                                      (torch.float32, torch.bfloat16)])
def test_mixed_dtypes_raise_like_torch(a, b):
    x, w = _r(1, 2, 5, 5).to(a), _r(3, 2, 3, 3).to(b)
    with pytest.raises(RuntimeError):
        TF.conv2d(x, w)
    with pytest.raises(RuntimeError, match=r"fastconv.conv2d: input has dtype .* but weight has dtype"):
        F.conv2d(x, w)


def test_other_floating_dtypes_still_refused():
    x, w = _r(1, 2, 5, 5).to(torch.float8_e4m3fn), _r(3, 2, 3, 3).to(torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match=r"fastconv.conv2d: input has dtype torch.float8_e4m3fn, which fastconv "
                                           r"does not support \(expected torch.float32 or torch.float64 or "
                                           r"torch.float16 or torch.bfloat16\)"):
        F.conv2d(x, w)


@pytest.mark.skipif(not emu_available(),
                    reason="the CUDA kernels on the CPU harness run with FASTCONV_BACKEND=cuda-emu")
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_cuda_emu_half_upcasts_for_simt_kernels(dtype):
    x, w, b = _r(2, 3, 7, 7).to(dtype), _r(4, 3, 3, 3).to(dtype), _r(4).to(dtype)
    with fastconv.backend("cuda-emu"):
        y, grads, g = _run(F.conv2d, (x, w, b), dict(padding=1))
        p = F.max_pool2d(x, 2)
    y32, grads32, _ = _run(TF.conv2d, (x.float(), w.float(), b.float()), dict(padding=1), g)
    assert_close(y, y32.to(dtype), what="cuda-emu conv2d")
    for a, c in zip(grads, grads32):
        assert_close(a, c.to(dtype), what="cuda-emu conv2d grad")
    assert_close(p, TF.max_pool2d(x.float(), 2).to(dtype), what="cuda-emu max_pool2d")


# ---- autocast -------------------------------------------------------------------------------------------------
AUTOCAST_MODELS = {"lenet5_max": (lambda: models.lenet5(pool="max"), (2, 1, 32, 32)),
                   "dcgan_generator": (lambda: models.dcgan_generator(), (2, 100, 1, 1)),
                   "resnet18": (lambda: models.resnet18(num_classes=10), (2, 3, 32, 32))}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", list(AUTOCAST_MODELS))
def test_zoo_model_under_autocast_matches_torch(name, dtype):
    build, shape = AUTOCAST_MODELS[name]
    model = build().eval()
    twin = to_torch(copy.deepcopy(model))  # the same network from torch's layers, same parameters
    x = torch.randn(*shape)
    with torch.autocast("cpu", dtype=dtype):
        got, want = model(x), twin(x)
    assert got.dtype == want.dtype == dtype
    # Both round after every layer in the autocast dtype; differences of one rounding can grow through the
    # layers, so the bound is the dtype's tolerance relative to the output's scale.
    tol = {torch.float16: 1e-3, torch.bfloat16: 1.6e-2}[dtype]
    scale = want.float().abs().max().item()
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 4 * tol * scale, f"{name} under autocast {dtype}: max error {err} at output scale {scale}"


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_autocast_casts_convs_not_pooling_nor_float64(dtype):
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = torch.ops.fastconv.conv2d(x, w, None, [1, 1], [0, 0], [0, 0], [1, 1], 1, "auto")
        t = F.conv_transpose2d(x, w.transpose(0, 1))
        p = F.max_pool2d(x, 2)
        a = F.adaptive_avg_pool2d(x, 1)
        d = F.conv2d(x.double(), w.detach().double())
    assert y.dtype == t.dtype == dtype
    assert p.dtype == a.dtype == torch.float32  # pooling follows its input, as torch's
    assert d.dtype == torch.float64  # autocast leaves float64 alone, as torch's
    assert_close(y, TF.conv2d(x.to(dtype).float(), w.detach().to(dtype).float()).to(dtype), what="autocast conv2d")
    # the float32 parameter gets a float32 gradient through the cast, as with torch
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32
    w2 = w.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        TF.conv2d(x, w2).float().sum().backward()
    assert_close(w.grad, w2.grad, what="autocast weight gradient")


def test_autocast_rule_registered_for_cuda_too():
    for name in ("conv2d", "conv_transpose3d", "depthwise_separable_conv2d"):
        op = getattr(torch.ops.fastconv, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "AutocastCPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "AutocastCUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("fastconv::max_pool", "AutocastCPU")


def test_compiled_model_under_autocast_and_in_bfloat16_channels_last():
    torch_model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                      torch.nn.Conv2d(8, 4, 1), torch.nn.AdaptiveAvgPool2d(1)).eval()
    model = fastconv.convert(copy.deepcopy(torch_model))
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = compiled(x), torch_model(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert_close(got, want, what="compiled converted model under autocast")
    xb = x.bfloat16().contiguous(memory_format=torch.channels_last)
    half_model = copy.deepcopy(model).bfloat16()
    got = torch.compile(half_model, fullgraph=True, backend="aot_eager")(xb)
    assert got.dtype == torch.bfloat16
    assert_close(got, half_model(xb), what="compiled bfloat16 model")
