"""depthwise_separable_conv2d (functional, op, module) against torch's composition in float64:
``conv2d(conv2d(x, dw, db, groups=C), pw, pb)``. Forward, gradients, gradcheck/gradgradcheck, opcheck,
FLOP count, module state_dict/init/padding modes, unbatched input, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from torch.utils.flop_counter import FlopCounterMode

import fastconv
import fastconv.functional as F
from fastconv import backends
from fastconv.ops import separable as separable_ops
from helpers import assert_close

# fused exists on the numba (CPU) backend only; unfused runs on any backend
ALGOS = ["auto", "fused", "unfused"] if backends.current() == "numba" else ["auto", "unfused"]

# name: (N, C, multiplier, K, H, W, kernel, kwargs, biases)
CASES = {
    "3x3_pad1": (2, 4, 1, 5, 8, 7, (3, 3), dict(padding=1), (True, True)),
    "stride2_mult2": (2, 3, 2, 4, 9, 10, (3, 3), dict(stride=2, padding=1), (True, True)),
    "same_even_dilated": (1, 3, 1, 6, 8, 9, (2, 4), dict(padding="same", dilation=(3, 2)), (False, True)),
    "mixed_no_bias": (2, 2, 3, 3, 12, 11, (5, 3), dict(stride=(2, 1), padding=(2, 0), dilation=(1, 2)),
                      (False, False)),
    "depthwise_bias_only": (2, 4, 1, 2, 6, 6, (3, 3), dict(padding="valid"), (True, False)),
    "batch0": (0, 3, 1, 4, 6, 6, (3, 3), dict(padding=1), (True, True)),
}


def _make(case, dtype=torch.float64, requires_grad=True):
    n, c, m, k, h, w, kernel, kw, (has_db, has_pb) = CASES[case]
    t = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    x, dw, pw = t(n, c, h, w), t(c * m, 1, *kernel), t(k, c * m, 1, 1)
    db = t(c * m) if has_db else None
    pb = t(k) if has_pb else None
    return (x, dw, pw, db, pb), kw


def _reference(x, dw, pw, db, pb, stride=1, padding=0, dilation=1):
    z = TF.conv2d(x, dw, db, stride, padding, dilation, groups=x.shape[-3])
    return TF.conv2d(z, pw, pb)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_composition_forward_and_gradients(case, algo):
    args, kw = _make(case)
    y = F.depthwise_separable_conv2d(*args, algo=algo, **kw)
    ref = _reference(*args, **kw)
    assert_close(y, ref, what="forward")
    g = torch.randn_like(ref)
    wrt = [a for a in args if a is not None]
    got = torch.autograd.grad(y, wrt, g)
    want = torch.autograd.grad(ref, wrt, g)
    for i, (a, e) in enumerate(zip(got, want)):
        assert_close(a, e, what=f"gradient {i}")


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", ["stride2_mult2", "same_even_dilated"])
def test_gradcheck_and_gradgradcheck(case, algo):
    args, kw = _make(case)
    args = tuple(a for a in args)
    fn = lambda *a: F.depthwise_separable_conv2d(*a, algo=algo, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, args, fast_mode=True)


@pytest.mark.parametrize("algo", ALGOS)
def test_opcheck(algo):
    (x, dw, pw, db, pb), kw = _make("stride2_mult2")
    op = torch.ops.fastconv.depthwise_separable_conv2d.default
    torch.library.opcheck(op, (x, dw, pw, db, pb, [2, 2], [1, 1], [1, 1], [1, 1], algo))
    torch.library.opcheck(op, (x, dw, pw, None, None, [1, 1], [0, 1], [1, 2], [1, 1], algo))


def test_frozen_pointwise_weight_skips_the_recomputation():
    """Backward recomputes the intermediate only for the pointwise weight gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    (x, dw, pw, db, pb), kw = _make("3x3_pad1")
    pw.requires_grad_(False)
    calls = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return func(*args, **(kwargs or {}))

    y = F.depthwise_separable_conv2d(x, dw, pw, db, pb, **kw)
    with Spy():
        y.sum().backward()
    assert not any(c.startswith("fastconv.conv2d.") for c in calls), calls
    assert sum("conv2d_grad_input" in c for c in calls) == 2  # through the 1x1, then the depthwise
    assert sum("conv2d_grad_weight" in c for c in calls) == 1  # depthwise weight only


def test_unbatched_input():
    (x, dw, pw, db, pb), kw = _make("stride2_mult2")
    y = F.depthwise_separable_conv2d(x[0], dw, pw, db, pb, **kw)
    assert y.shape == (4, 5, 5)
    assert_close(y, _reference(x[:1], dw, pw, db, pb, **kw)[0])


def test_float32_matches_float64_reference():
    args, kw = _make("stride2_mult2", requires_grad=False)
    y = F.depthwise_separable_conv2d(*(a.float() for a in args), **kw)
    assert y.dtype == torch.float32
    assert_close(y, _reference(*args, **kw).float())


def test_flop_counter_counts_both_convolutions_like_torch():
    args, kw = _make("stride2_mult2", requires_grad=False)
    with FlopCounterMode(display=False) as ours:
        F.depthwise_separable_conv2d(*args, **kw)
    with FlopCounterMode(display=False) as theirs:
        _reference(*args, **kw)
    x, dw, pw = args[:3]
    positions = 5 * 5
    expected = 2 * x.shape[0] * positions * (dw.shape[0] * 9 + pw.shape[0] * dw.shape[0])
    assert ours.get_total_flops() == theirs.get_total_flops() == expected


def test_auto_rule_is_fused_on_cpu_and_unfused_elsewhere():
    def decide(algo, target):
        g = separable_ops.geometry((2, 4, 8, 8), (4, 1, 3, 3), (6, 4, 1, 1), (8, 8), [1, 1], [1, 1], [1, 1], [1, 1],
                                   torch.float32, target)
        return fastconv.registry.decide(algo, g, "forward", "fastconv.depthwise_separable_conv2d", "separable").name

    assert decide("auto", "numba") == "fused"
    assert decide("auto", "cuda") == "unfused"
    assert decide("unfused", "numba") == "unfused"


def test_fused_is_refused_off_the_numba_backend():
    args, _ = _make("3x3_pad1", requires_grad=False)
    with fastconv.backend("cuda-emu"):
        with pytest.raises(ValueError, match=r"fastconv.depthwise_separable_conv2d: algo='fused' cannot run this "
                                             r"depthwise-separable convolution \(runs on numba, not cuda-emu\)\. "
                                             r"Algorithms that can: auto, unfused"):
            F.depthwise_separable_conv2d(*args, algo="fused")


# ---- module -----------------------------------------------------------------------------------------

def test_module_parameters_init_state_dict_and_output():
    torch.manual_seed(3)
    m = fastconv.nn.DepthwiseSeparableConv2d(4, 6, 3, stride=2, padding=1, depth_multiplier=2)
    torch.manual_seed(3)
    torch_dw = torch.nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4)
    torch_pw = torch.nn.Conv2d(8, 6, 1)
    sd = m.state_dict()
    assert list(sd) == ["depthwise.weight", "depthwise.bias", "pointwise.weight", "pointwise.bias"]
    # same init as torch's Conv2d: same draws from the same seed
    for ours, theirs in zip(sd.values(), [torch_dw.weight, torch_dw.bias, torch_pw.weight, torch_pw.bias]):
        assert_close(ours, theirs.detach())
    x = torch.randn(2, 4, 9, 9)
    assert_close(m(x), torch_pw(torch_dw(x)))
    m2 = fastconv.nn.DepthwiseSeparableConv2d(4, 6, 3, stride=2, padding=1, depth_multiplier=2, algo="unfused")
    m2.load_state_dict(sd)
    assert_close(m2(x), m(x))
    assert m2(x[0]).shape == (6, 5, 5)


def test_module_without_bias_double_and_padding_modes():
    torch.manual_seed(0)
    for mode in ("zeros", "reflect", "circular"):
        m = fastconv.nn.DepthwiseSeparableConv2d(3, 5, (3, 2), padding="same", bias=False, padding_mode=mode,
                                                 dtype=torch.float64)
        assert m.depthwise.bias is None and m.pointwise.bias is None
        ref = torch.nn.Conv2d(3, 3, (3, 2), padding="same", groups=3, bias=False, padding_mode=mode,
                              dtype=torch.float64)
        ref.weight.data.copy_(m.depthwise.weight)
        x = torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)
        y = m(x)
        expected = TF.conv2d(ref(x), m.pointwise.weight)
        assert_close(y, expected, what=mode)
        assert_close(torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0], what=mode)


def test_module_extra_repr_and_argument_errors():
    m = fastconv.nn.DepthwiseSeparableConv2d(8, 16, 3, stride=2, padding=1, depth_multiplier=2, algo="fused")
    assert m.extra_repr() == ("8, 16, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), depth_multiplier=2, "
                              "algo='fused'")
    assert "(depthwise): Conv2d(8, 16, kernel_size=(3, 3)" in repr(m)
    with pytest.raises(ValueError, match=r"depth_multiplier must be a positive int, got 0"):
        fastconv.nn.DepthwiseSeparableConv2d(8, 16, 3, depth_multiplier=0)
    with pytest.raises(ValueError, match=r"unknown algo 'im2col'; expected one of auto, fused, unfused"):
        fastconv.nn.DepthwiseSeparableConv2d(8, 16, 3, algo="im2col")


def test_module_compiles_fullgraph():
    m = torch.nn.Sequential(fastconv.nn.DepthwiseSeparableConv2d(3, 4, 3, padding=1), torch.nn.ReLU()).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), m(x))


# ---- errors -------------------------------------------------------------------------------------------

x4 = torch.randn(2, 4, 8, 8)
dw4, pw4 = torch.randn(4, 1, 3, 3), torch.randn(6, 4, 1, 1)

BAD = {
    "depthwise_weight_3d": ((x4, torch.randn(4, 1, 3), pw4), {}, RuntimeError,
                            r"expected depthwise_weight to be 4-D \(in_channels \* depth_multiplier, 1, kh, kw\)"),
    "pointwise_weight_2d": ((x4, dw4, torch.randn(6, 4)), {}, RuntimeError, r"expected pointwise_weight to be 4-D"),
    "depthwise_two_channels_per_group": ((x4, torch.randn(4, 2, 3, 3), pw4), {}, RuntimeError,
                                         r"depthwise_weight must have 1 input channel per group"),
    "depthwise_not_multiple": ((x4, torch.randn(6, 1, 3, 3), torch.randn(6, 6, 1, 1)), {}, RuntimeError,
                               r"depthwise_weight has 6 output channels, which is not a positive multiple of the "
                               r"input's 4 channels"),
    "pointwise_channel_mismatch": ((x4, dw4, torch.randn(6, 8, 1, 1)), {}, RuntimeError,
                                   r"pointwise_weight has 8 input channels but depthwise_weight has 4 output channels"),
    "pointwise_not_1x1": ((x4, dw4, torch.randn(6, 4, 3, 3)), {}, RuntimeError, r"pointwise_weight must be 1x1"),
    "depthwise_bias_shape": ((x4, dw4, pw4, torch.randn(5)), {}, RuntimeError,
                             r"expected depthwise_bias of shape \(4,\)"),
    "pointwise_bias_shape": ((x4, dw4, pw4, None, torch.randn(4)), {}, RuntimeError,
                             r"expected pointwise_bias of shape \(6,\)"),
    "dtype_mismatch": ((x4, dw4, pw4.double()), {}, RuntimeError,
                       r"input has dtype torch.float32 but pointwise_weight has dtype torch.float64"),
    "input_5d": ((torch.randn(1, 2, 4, 8, 8), dw4, pw4), {}, RuntimeError, r"got 5-D input"),
    # float16/bfloat16 are computed in float32 (tests/test_half.py); float8 stays refused by name
    "float8": ((x4.to(torch.float8_e4m3fn), dw4.to(torch.float8_e4m3fn), pw4.to(torch.float8_e4m3fn)), {},
               RuntimeError, r"which fastconv does not support"),
    "half_mixed": ((x4.half(), dw4, pw4), {}, RuntimeError, r"input has dtype torch.float16 but depthwise_weight"),
    "not_a_tensor": ((x4, [[1.0]], pw4), {}, TypeError, r"depthwise_weight must be a torch.Tensor"),
    "stride_zero": ((x4, dw4, pw4), dict(stride=0), RuntimeError, r"non-positive stride"),
    "same_with_stride": ((x4, dw4, pw4), dict(stride=2, padding="same"), RuntimeError,
                         r"padding='same' is not supported for strided"),
    "kernel_too_large": ((torch.randn(1, 4, 2, 2), dw4, pw4), {}, RuntimeError,
                         r"kernel size can't be greater than the padded input size"),
    "unknown_algo": ((x4, dw4, pw4), dict(algo="winograd"), ValueError,
                     r"unknown algo 'winograd'; expected one of auto, fused, unfused"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_argument_is_refused_clearly(name):
    args, kwargs, error, message = BAD[name]
    with pytest.raises(error, match=message):
        F.depthwise_separable_conv2d(*args, **kwargs)
