"""``fastconv::conv{1,2,3}d_bias_act`` (conv, bias and ReLU/ReLU6 in one op) against torch's conv + activation.

The Numba epilogue kernel on every layout it takes; the op in float64 on the Numba path and on the CUDA
harness path (forward, gradients, gradcheck, gradgradcheck, opcheck); NaN as torch's relu; half dtypes;
channels_last, unbatched and empty inputs; its errors; FlopCounterMode and torch.compile; the module.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import fastconv
import fastconv.functional as F
from fastconv.cpu import epilogue
from helpers import assert_close

ACTS = {"none": lambda t: t, "relu": torch.relu, "relu6": TF.relu6}
TORCH_CONV = {1: TF.conv1d, 2: TF.conv2d, 3: TF.conv3d}


@pytest.fixture(params=["numba", "cuda-emu"])
def backend(request):
    """Each op test on the Numba path (conv without bias, then the epilogue kernel) and on the CUDA harness
    path (the .cu conv with its bias, then torch's in-place activation)."""
    if request.param == "cuda-emu" and shutil.which("g++") is None:
        pytest.skip("the CUDA harness needs g++")
    with fastconv.backend(request.param):
        yield request.param


def _reference(x, w, b, activation, **kw):
    return ACTS[activation](TORCH_CONV[w.dim() - 2](x, w, b, **kw))


# ---- the kernel ----------------------------------------------------------------------------------------

def _kernel_reference(y: torch.Tensor, b, activation):
    shape = (1, -1) + (1,) * (y.dim() - 2)
    return ACTS[activation](y if b is None else y + b.reshape(shape))


@pytest.fixture(params=["serial", "parallel"])
def launch(request, monkeypatch):
    """Small outputs run on the calling thread; ``parallel`` sends every size through the prange kernels."""
    if request.param == "parallel":
        monkeypatch.setattr(epilogue, "SERIAL_MAX", 0)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "one_big_plane", "3d", "1d"])
def test_kernel_matches_torch_bitwise_with_nan_and_inf(launch, layout, activation, dtype):
    shapes = {"contiguous": (2, 5, 6, 7), "channels_last": (2, 5, 6, 7), "strided": (2, 5, 6, 7),
              "one_big_plane": (1, 1, 300, 200), "3d": (2, 3, 4, 5, 6), "1d": (3, 4, 9)}
    y = torch.randn(shapes[layout], dtype=dtype) * 5
    flat = y.view(-1)
    flat[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 6.0], dtype=dtype)
    flat[-1] = float("nan")
    b = torch.randn(y.shape[1], dtype=dtype)
    expected = _kernel_reference(y, b, activation)
    if layout == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last)
        assert not y.is_contiguous()
    elif layout == "strided":
        y = torch.cat([y, y], dim=3)[..., ::2]  # every other column: neither layout
        expected = _kernel_reference(y, b, activation)
    out = epilogue.bias_act_(y.numpy(), b.numpy(), activation)
    assert np.shares_memory(out, y.numpy())
    # one add and a compare per element, as torch: equal to the bit, NaN where torch has NaN
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)


def test_kernel_splits_few_planes_over_threads():
    """N*K planes fewer than the threads: planes are cut in chunks, and every chunk (the last a short one) is done."""
    y = torch.randn(1, 2, 1, max(epilogue.CHUNK * 3, epilogue.SERIAL_MAX) + 5)  # big enough to run in parallel
    b = torch.tensor([0.5, -0.25])
    expected = _kernel_reference(y, b, "relu")
    epilogue.bias_act_(y.numpy(), b.numpy(), "relu")
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("activation", list(ACTS))
def test_kernel_without_bias_applies_the_activation_only(launch, activation):
    y = torch.randn(2, 3, 4, 5)
    expected = ACTS[activation](y.clone())
    epilogue.bias_act_(y.numpy(), None, activation)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


# ---- the op against torch, float64 -----------------------------------------------------------------------

# (N, C, spatial, K, kernel, kwargs)
CASES = {
    "2d_stride_pad": (2, 3, (7, 6), 4, (3, 3), dict(stride=2, padding=1)),
    "2d_same_even_dilated": (2, 2, (6, 5), 3, (4, 2), dict(padding="same", dilation=(1, 2))),
    "2d_groups": (2, 4, (5, 6), 6, (3, 3), dict(padding=1, groups=2)),
    "2d_pointwise": (2, 5, (4, 5), 7, (1, 1), {}),
    "1d": (2, 4, (11,), 5, (3,), dict(stride=2, padding=2, dilation=2)),
    "3d": (1, 2, (4, 5, 4), 3, (2, 3, 2), dict(stride=(1, 2, 1), padding=(1, 1, 0))),
}


def _case(name, dtype=torch.float64, bias=True, scale=1.0):
    n, c, spatial, k, ks, kw = CASES[name]
    g = kw.get("groups", 1)
    x = (torch.randn(n, c, *spatial, dtype=dtype) * scale).requires_grad_()
    w = torch.randn(k, c // g, *ks, dtype=dtype, requires_grad=True)
    b = torch.randn(k, dtype=dtype, requires_grad=True) if bias else None
    return x, w, b, kw


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_match_torch(backend, name, activation):
    x, w, b, kw = _case(name, scale=2.0)  # scaled so relu6 clamps some outputs at 6 too
    y = F.conv_bias_act(x, w, b, activation=activation, **kw)
    r = _reference(x, w, b, activation, **kw)
    assert_close(y, r)
    if activation == "relu6":
        assert bool((r == 6).any()) and bool((r == 0).any()), "the case must reach both clamps"
    gy = torch.randn_like(r)
    ours = torch.autograd.grad(y, (x, w, b), gy)
    theirs = torch.autograd.grad(r, (x, w, b), gy)
    for what, o, t in zip(("input", "weight", "bias"), ours, theirs):
        assert_close(o, t, what=f"grad {what}")


def test_epilogue_kernel_runs_on_the_numba_path_only(backend, monkeypatch):
    """Numba: conv without bias, then one epilogue pass; the CUDA targets: the conv's own bias, torch's relu_."""
    from fastconv.ops import fused as fused_ops

    calls = []
    real = fused_ops.epilogue.bias_act_

    def spy(y, b, activation):
        calls.append(activation)
        return real(y, b, activation)

    monkeypatch.setattr(fused_ops.epilogue, "bias_act_", spy)
    x, w, b, kw = _case("2d_stride_pad")
    assert_close(F.conv_bias_act(x, w, b, activation="relu", **kw), _reference(x, w, b, "relu", **kw))
    assert calls == (["relu"] if backend == "numba" else [])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("activation", list(ACTS))
def test_gradcheck(backend, activation, bias):
    x, w, b, kw = _case("2d_stride_pad", bias=bias, scale=2.0)
    inputs = (x, w, b) if bias else (x, w)

    def f(x, w, b=None):
        return F.conv_bias_act(x, w, b, activation=activation, **kw)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_gradgradcheck(activation):
    x, w, b, kw = _case("1d", scale=2.0)

    def f(x, w, b):
        return F.conv_bias_act(x, w, b, activation=activation, **kw)

    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_frozen_weight_gets_no_gradient_and_input_grad_only_saves_what_it_needs():
    x, w, b, kw = _case("2d_groups")
    w.requires_grad_(False)
    y = F.conv_bias_act(x, w, b, activation="relu", **kw)
    gx, gb = torch.autograd.grad(y.sum(), (x, b))
    r = _reference(x, w, b, "relu", **kw)
    rx, rb = torch.autograd.grad(r.sum(), (x, b))
    assert_close(gx, rx)
    assert_close(gb, rb)


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_opcheck(backend, ndim, activation):
    name = {1: "1d", 2: "2d_stride_pad", 3: "3d"}[ndim]
    x, w, b, kw = _case(name, scale=2.0)
    a = F.conv.ConvArgs(f"conv{ndim}d", ndim, x, w, b, kw.get("stride", 1), kw.get("padding", 0),
                        kw.get("dilation", 1), kw.get("groups", 1), "auto")
    op = getattr(torch.ops.fastconv, f"conv{ndim}d_bias_act").default
    torch.library.opcheck(op, (x, w, b, *a.lists(), a.groups, "auto", activation))
    torch.library.opcheck(op, (x.detach(), w.detach(), None, *a.lists(), a.groups, "auto", activation))


@pytest.mark.parametrize("algo", ["direct", "im2col"])
def test_named_numba_algorithms(algo):
    x, w, b, kw = _case("2d_stride_pad")
    assert_close(F.conv_bias_act(x, w, b, activation="relu", algo=algo, **kw), _reference(x, w, b, "relu", **kw),
                 algo=algo)


@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_nan_stays_nan_as_in_torch(backend, activation):
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    x[0, 0, 2, 2] = float("nan")
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    y = F.conv_bias_act(x, w, b, activation=activation)
    r = _reference(x, w, b, activation)
    assert bool(r.isnan().any())
    assert_close(y, r)  # NaN exactly where torch's relu keeps it


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_compute_in_float32_and_round_once(dtype):
    x, w, b, kw = _case("2d_groups", dtype=torch.float32, scale=2.0)
    xh, wh, bh = x.detach().to(dtype), w.detach().to(dtype), b.detach().to(dtype)
    y = F.conv_bias_act(xh, wh, bh, activation="relu6", **kw)
    assert y.dtype == dtype
    expected = _reference(xh.float(), wh.float(), bh.float(), "relu6", **kw).to(dtype)
    assert_close(y, expected)


def test_channels_last_unbatched_and_empty(backend):
    x, w, b, kw = _case("2d_groups")
    xc = x.detach().contiguous(memory_format=torch.channels_last)
    y = F.conv_bias_act(xc, w, b, activation="relu", **kw)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, _reference(x, w, b, "relu", **kw))
    y1 = F.conv_bias_act(x[0], w, b, activation="relu", **kw)
    assert_close(y1, _reference(x[0], w, b, "relu", **kw))
    empty = x.detach()[:0]
    assert_close(F.conv_bias_act(empty, w, b, activation="relu", **kw), _reference(empty, w, b, "relu", **kw))


# ---- errors ------------------------------------------------------------------------------------------------

def test_unknown_activation_is_a_value_error_listing_the_valid_ones():
    x, w, b, _ = _case("2d_pointwise")
    with pytest.raises(ValueError, match=r"fastconv.conv2d_bias_act: unknown activation 'gelu'; expected one of "
                                         r"'none', 'relu', 'relu6'"):
        F.conv_bias_act(x, w, b, activation="gelu")
    with pytest.raises(ValueError, match=r"unknown activation 'tanh'"):
        torch.ops.fastconv.conv2d_bias_act(x, w, b, [1, 1], [0, 0], [0, 0], [1, 1], 1, "auto", "tanh")
    with pytest.raises(ValueError, match=r"ConvBiasAct: unknown activation 'sigmoid'"):
        fastconv.nn.ConvBiasAct(w, b, activation="sigmoid")


def test_bad_arguments_are_named_with_torchs_exception_types():
    x, w, b, _ = _case("2d_pointwise")
    with pytest.raises(RuntimeError, match=r"fastconv.conv2d_bias_act: weight has 5 input channels per "
                                           r"group but input has 3 channels with groups=1"):
        F.conv_bias_act(x[:, :3], w, b)
    with pytest.raises(RuntimeError, match=r"fastconv.conv2d_bias_act: expected bias of shape \(7,\)"):
        F.conv_bias_act(x, w, b[:3])
    with pytest.raises(RuntimeError, match=r"fastconv.conv2d_bias_act: input has dtype torch.float64 but weight "
                                           r"has dtype torch.float32"):
        F.conv_bias_act(x, w.float(), None)
    with pytest.raises(TypeError, match=r"fastconv.conv2d_bias_act: bias must be a torch.Tensor, got list"):
        F.conv_bias_act(x, w, [1.0] * 7)
    with pytest.raises(ValueError, match=r"fastconv.conv2d_bias_act: unknown algo 'fastest'"):
        F.conv_bias_act(x, w, b, algo="fastest")
    with pytest.raises(RuntimeError, match=r"padding='same' is not supported for strided"):
        F.conv_bias_act(x, w, b, stride=2, padding="same")
    with pytest.raises(RuntimeError, match=r"weight must be \(K, C/groups, \*kernel\) with 1 to 3 spatial dims"):
        F.conv_bias_act(x, w[0, 0], b)
    with pytest.raises(ValueError, match=r"padding_mode must be 'zeros'"):
        fastconv.nn.ConvBiasAct.from_conv(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"))


# ---- the op in torch's machinery -----------------------------------------------------------------------------

def test_flop_counter_counts_the_fused_op_like_torchs_conv():
    from torch.utils.flop_counter import FlopCounterMode

    x, w, b = torch.randn(2, 8, 10, 10), torch.randn(16, 8, 3, 3), torch.randn(16)
    with FlopCounterMode(display=False) as ours:
        F.conv_bias_act(x, w, b, padding=1)
    with FlopCounterMode(display=False) as theirs:
        torch.relu(TF.conv2d(x, w, b, padding=1))
    assert ours.get_total_flops() == theirs.get_total_flops() == 2 * 2 * 16 * 100 * 8 * 9


def test_torch_compile_fullgraph_matches_eager():
    model = nn.Sequential(fastconv.nn.ConvBiasAct.from_conv(nn.Conv2d(3, 8, 3, padding=1), "relu6"),
                          fastconv.nn.ConvBiasAct.from_conv(nn.Conv2d(8, 4, 3, stride=2), "relu")).double()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), model(x))


# ---- the module ----------------------------------------------------------------------------------------------

def test_module_from_conv_shares_parameters_and_matches_conv_then_activation():
    conv = fastconv.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, algo="direct").double()
    m = fastconv.nn.ConvBiasAct.from_conv(conv, "relu6")
    assert m.weight is conv.weight and m.bias is conv.bias
    assert repr(m) == ("ConvBiasAct(4, 6, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), groups=2, "
                       "activation='relu6', algo='direct')")
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64) * 3
    assert_close(m(x), TF.relu6(conv(x)))
    nobias = fastconv.nn.ConvBiasAct.from_conv(nn.Conv1d(2, 3, 5, bias=False), "relu")
    assert repr(nobias) == "ConvBiasAct(2, 3, kernel_size=(5,), stride=(1,), bias=False, activation='relu')"
    x1 = torch.randn(2, 2, 12)
    assert_close(nobias(x1), torch.relu(TF.conv1d(x1, nobias.weight)))


def test_torch_func_grad_works_and_forward_mode_is_refused_by_name():
    x, w, b, kw = _case("2d_groups", scale=2.0)
    x, w, b = x.detach(), w.detach(), b.detach()

    def loss(fn, w):
        return (fn(x, w) ** 2).sum()

    ours = torch.func.grad(lambda w: loss(lambda x, w: F.conv_bias_act(x, w, b, activation="relu6", **kw), w))(w)
    theirs = torch.func.grad(lambda w: loss(lambda x, w: _reference(x, w, b, "relu6", **kw), w))(w)
    assert_close(ours, theirs)
    with pytest.raises(NotImplementedError, match=r"fastconv.conv2d_bias_act: forward-mode"):
        torch.func.jvp(lambda x: F.conv_bias_act(x, w, b, **kw), (x,), (torch.ones_like(x),))


def test_vmap_over_inputs_and_over_weights_is_one_call_with_torch_values(monkeypatch):
    from fastconv.ops import fused as fused_ops

    calls = []
    real = fused_ops.epilogue.bias_act_
    monkeypatch.setattr(fused_ops.epilogue, "bias_act_", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 2, 4, 6, 6, dtype=torch.float64)
    w = torch.randn(3, 5, 4, 3, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    with fastconv.backend("numba"):
        ours = torch.vmap(lambda x: F.conv_bias_act(x, w[0], b, padding=1, activation="relu6"))(x * 3)
        theirs = torch.vmap(lambda x: _reference(x, w[0], b, "relu6", padding=1))(x * 3)
        assert_close(ours, theirs)
        ours = torch.vmap(lambda x, w: F.conv_bias_act(x, w, b, activation="relu"))(x, w)
        theirs = torch.vmap(lambda x, w: _reference(x, w, b, "relu"))(x, w)
        assert_close(ours, theirs)
    assert len(calls) == 2  # one op call per vmap, not one per sample (functorch's fallback loop)
