"""Bad pooling arguments are refused clearly, before any kernel runs, with torch's exception type."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import fastconv.functional as F

x = torch.randn(2, 3, 8, 8)
pooled, idx = TF.max_pool2d(x, 2, return_indices=True)

# name: (function name, args, kwargs, torch raises too?, message regex)
BAD = {
    "pad_over_half_kernel": ("max_pool2d", (x, 3), dict(padding=2), True, r"pad should be at most half of kernel size"),
    "avg_pad_over_half": ("avg_pool2d", (x, 2), dict(padding=2), True, r"pad should be at most half of kernel size"),
    "kernel_zero": ("max_pool2d", (x, 0), {}, True, r"non-positive kernel_size is not supported"),
    "stride_zero": ("avg_pool2d", (x, 2), dict(stride=0), True, r"non-positive stride"),
    "negative_padding": ("max_pool2d", (x, 3), dict(padding=-1), True, r"negative padding"),
    "dilation_zero": ("max_pool2d", (x, 3), dict(dilation=0), True, r"non-positive dilation"),
    "output_too_small": ("max_pool2d", (torch.randn(1, 1, 2, 2), 3), {}, True, r"output size is too small"),
    "wrong_dims": ("max_pool2d", (torch.randn(8, 8), 2), {}, True, r"expected input to be 3-D \(unbatched\) or 4-D"),
    "zero_size_spatial": ("avg_pool2d", (torch.randn(1, 3, 0, 4), 1), {}, True, r"non-zero size"),
    "kernel_wrong_length": ("max_pool2d", (x, (2, 2, 2)), {}, True, r"kernel_size to be a single int or a tuple of 2"),
    # Integer max pooling is supported (test_pool.py); bool is refused by torch and fastconv alike, and
    # integer average pooling (torch: int64 only) is refused by fastconv.
    "bool_input": ("max_pool2d", (x > 0, 2), {}, True, r"input has dtype torch.bool, which is not implemented"),
    "integer_avg_input": ("avg_pool2d", (x.long(), 2), {}, False, r"input has dtype torch.int64"),
    "divisor_zero": ("avg_pool2d", (x, 2), dict(divisor_override=0), True, r"divisor must be not zero"),
    "adaptive_negative": ("adaptive_avg_pool2d", (x, (-1, 2)), {}, True, r"non-negative ints or None"),
    "adaptive_bad_length": ("adaptive_max_pool2d", (x, (1, 2, 3)), {}, True, r"output_size must be an int or a tuple of 2"),
    "unpool_wrong_indices_shape": ("max_unpool2d", (pooled, idx[:, :, :2], 2), {}, True,
                                   r"expected indices to have the same shape as input"),
    "unpool_indices_dtype": ("max_unpool2d", (pooled, idx.int(), 2), {}, True, r"expected indices of dtype torch.int64"),
    "unpool_bad_output_size": ("max_unpool2d", (pooled, idx, 2), dict(output_size=(20, 20)), True,
                               r"invalid output_size \(20, 20\): dim 0 must lie between 7 and 9"),
    "unpool_output_size_length": ("max_unpool2d", (pooled, idx, 2), dict(output_size=(8,)), True,
                                  r"output_size should have 2 or 4 elements"),
    "unpool_index_out_of_range": ("max_unpool2d", (pooled, idx * 100, 2), {}, True, r"invalid max index"),
    "lp_zero_norm": ("lp_pool2d", (x, 0, 2), {}, False, r"norm_type must be a non-zero number"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_pooling_argument_is_refused_clearly(name):
    fn, args, kwargs, torch_raises, message = BAD[name]
    expected = Exception
    if torch_raises:
        with pytest.raises(Exception) as torch_error:
            getattr(TF, fn)(*args, **kwargs)
        expected = type(torch_error.value)
    with pytest.raises(expected, match=message):
        getattr(F, fn)(*args, **kwargs)
