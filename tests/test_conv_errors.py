"""Every bad conv argument gets a clear error before any kernel runs, of torch's exception type.

Each case runs torch's own function on the same bad input first: where torch raises, ours must
raise an exception of the same type (or a subclass), with a message naming the argument.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import fastconv
import fastconv.functional as F
from fastconv.backends import current as current_backend

x4 = torch.randn(2, 4, 8, 8)
w4 = torch.randn(6, 4, 3, 3)

# name: (args, kwargs, torch raises too?, message regex)
BAD = {
    "input_2d": ((torch.randn(8, 8), w4), {}, True, r"expected input to be 3-D \(unbatched\) or 4-D"),
    "input_5d": ((torch.randn(1, 2, 4, 8, 8), w4), {}, True, r"got 5-D input"),
    "weight_3d": ((x4, torch.randn(6, 4, 3)), {}, True, r"expected weight to be 4-D"),
    "channel_mismatch": ((x4, torch.randn(6, 3, 3, 3)), {}, True,
                         r"weight has 3 input channels per group but input has 4 channels with groups=1 "
                         r"\(expected input.shape\[1\] == weight.shape\[1\] \* groups"),
    "groups_not_dividing_out": ((x4, torch.randn(5, 2, 3, 3)), dict(groups=2), True,
                                r"groups=2 must divide out_channels"),
    "groups_zero": ((x4, w4), dict(groups=0), True, r"non-positive groups"),
    "stride_zero": ((x4, w4), dict(stride=0), True, r"non-positive stride is not supported"),
    "stride_negative_tuple": ((x4, w4), dict(stride=(1, -1)), True, r"non-positive stride"),
    "dilation_zero": ((x4, w4), dict(dilation=0), True, r"non-positive dilation"),
    "padding_negative": ((x4, w4), dict(padding=-1), True, r"negative padding is not supported"),
    "padding_wrong_length": ((x4, w4), dict(padding=(1, 1, 1)), True, r"padding to be a single int or a tuple of 2"),
    "same_with_stride": ((x4, w4), dict(padding="same", stride=2), True,
                         r"padding='same' is not supported for strided convolutions"),
    "unknown_padding_string": ((x4, w4), dict(padding="full"), True, r"invalid padding string 'full'"),
    "kernel_larger_than_input": ((torch.randn(1, 4, 2, 2), w4), {}, True,
                                 r"kernel size can't be greater than the padded input size"),
    "dtype_mismatch_weight": ((x4, w4.double()), {}, True, r"input has dtype torch.float32 but weight has dtype torch.float64"),
    "dtype_mismatch_bias": ((x4, w4, torch.randn(6, dtype=torch.float64)), {}, True,
                            r"but bias has dtype torch.float64"),
    "bias_wrong_shape": ((x4, w4, torch.randn(5)), {}, True, r"expected bias of shape \(6,\)"),
    "integer_input": ((x4.long(), w4.long()), {}, False, r"input has dtype torch.int64; expected a floating tensor"),
    # float16/bfloat16 are computed in float32 (tests/test_half.py); float8 is refused by name
    "float8_input": ((x4.to(torch.float8_e4m3fn), w4.to(torch.float8_e4m3fn)), {}, False,
                     r"dtype torch.float8_e4m3fn, which fastconv does not support"),
    "input_not_tensor": (([[1.0]], w4), {}, True, r"input must be a torch.Tensor, got list"),
    "stride_float": ((x4, w4), dict(stride=1.5), True, r"stride must be an int or a tuple of 2 ints"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_conv2d_argument_is_refused_clearly(name):
    args, kwargs, torch_raises, message = BAD[name]
    expected_type = Exception
    if torch_raises:
        with pytest.raises(Exception) as torch_error:
            TF.conv2d(*args, **kwargs)
        expected_type = type(torch_error.value)
    with pytest.raises(expected_type, match=message):
        F.conv2d(*args, **kwargs)


def test_device_mismatch_is_refused():
    meta_w = torch.randn(6, 4, 3, 3, device="meta")
    with pytest.raises(RuntimeError, match=r"input is on cpu but weight is on meta"):
        F.conv2d(x4, meta_w)


def test_unknown_algo_lists_the_algorithms():
    with pytest.raises(ValueError, match=r"unknown algo 'fft9'; expected one of auto, .*direct.*im2col"):
        F.conv2d(x4, w4, algo="fft9")


def test_module_rejects_unknown_algo_and_padding_mode():
    with pytest.raises(ValueError, match=r"unknown algo 'nope'"):
        fastconv.nn.Conv2d(4, 6, 3, algo="nope")
    with pytest.raises(ValueError, match=r"padding_mode"):
        fastconv.nn.Conv2d(4, 6, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match=r"padding='same' is not supported for strided"):
        fastconv.nn.Conv2d(4, 6, 3, padding="same", stride=2)
    with pytest.raises(ValueError, match=r"groups must be a positive integer|in_channels must be divisible"):
        fastconv.nn.Conv2d(4, 6, 3, groups=3)


def test_unsupported_algo_names_working_algorithms():
    """A registered algorithm that refuses the geometry says why, and lists the ones that work."""
    from fastconv import registry
    from fastconv.registry import ConvAlgorithm

    def never(*_):
        raise AssertionError("a refused algorithm must not run")

    registry.register(ConvAlgorithm("only3x3_test", frozenset({current_backend()}), "test algorithm", never, never, never,
                                      refuse=lambda g: None if g.kernel[1:] == (3, 3) else "needs a 3x3 kernel"))
    try:
        with pytest.raises(ValueError, match=r"algo='only3x3_test' cannot run this convolution \(needs a 3x3 "
                                             r"kernel\)\. Algorithms that can: auto, .*direct"):
            F.conv2d(x4, torch.randn(6, 4, 5, 5), algo="only3x3_test")
    finally:
        registry._REGISTRY.pop(("only3x3_test", current_backend()))
