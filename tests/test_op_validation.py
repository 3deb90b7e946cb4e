"""The registered ops validate their own arguments: ``torch.ops.fastconv.*`` called directly with bad arguments.

Before the ops validated, such calls aborted the process (negative padding: ``double free or corruption``),
crashed it (SIGSEGV on a channel mismatch) or returned wrong results (a made-up ``input_size``, a bias of the
wrong length). So every abuse case runs in a child process: a signal, an abort or an unexpected exit fails
the test, and the child reports, per case, the exception torch raised for the same call (each case first
asserts that torch rejects it too) and the one fastconv raised. Cases are batched into a few children to keep
the run short. A hypothesis fuzz of the ops' arguments runs in a child as well.

Run this file as a script (``python tests/test_op_validation.py child <group>``) to run a group in-process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as TF

ops = torch.ops.fastconv
aten = torch.ops.aten
D = torch.float64

x4 = torch.randn(2, 4, 8, 8, dtype=D)
w4 = torch.randn(6, 4, 3, 3, dtype=D)
b6 = torch.randn(6, dtype=D)
gy = torch.randn(2, 6, 6, 6, dtype=D)                  # the conv2d output of x4, w4 (no padding)
wt = torch.randn(4, 3, 3, 3, dtype=D)                  # transposed conv weight (C_in, C_out, k, k)
pool_x = torch.randn(2, 3, 8, 8, dtype=D)
pooled, pool_idx = TF.max_pool2d(pool_x, 2, return_indices=True)
dw4, pw4 = torch.randn(4, 1, 3, 3, dtype=D), torch.randn(6, 4, 1, 1, dtype=D)


def conv2d(x=x4, w=w4, b=None, stride=(1, 1), padding=(0, 0), padding_end=None, dilation=(1, 1), groups=1,
           algo="auto"):
    pe = padding if padding_end is None else padding_end
    return ops.conv2d(x, w, b, list(stride), list(padding), list(pe), list(dilation), groups, algo)


def aconv(x=x4, w=w4, b=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, transposed=False,
          output_padding=(0, 0)):
    return aten.convolution(x, w, b, list(stride), list(padding), list(dilation), transposed, list(output_padding),
                            groups)


def convT(x=x4, w=wt, b=None, stride=(1, 1), padding=(0, 0), output_padding=(0, 0), dilation=(1, 1), groups=1):
    return ops.conv_transpose2d(x, w, b, list(stride), list(padding), list(output_padding), list(dilation), groups,
                                "auto")


def conv_bwd(gy, x, w, mask, stride=(1, 1), padding=(0, 0), groups=1):
    return aten.convolution_backward(gy, x, w, None, list(stride), list(padding), [1, 1], False, [0, 0], groups,
                                     mask)


# name: (group, torch's call that must raise too (None: torch accepts it, see the comment), fastconv's call,
#        message regex). fastconv's exception must be an instance of torch's exception type.
CASES = {
    # ---- conv2d: the cases of issue 10 ------------------------------------------------------------
    "conv_negative_padding": ("conv", lambda: aconv(padding=(-1, -1)), lambda: conv2d(padding=(-1, -1)),
                              r"fastconv.conv2d: negative padding is not supported"),
    "conv_negative_padding_end": ("conv", lambda: aconv(padding=(-1, -1)),
                                  lambda: conv2d(padding=(0, 0), padding_end=(0, -2)),
                                  r"negative padding_end is not supported"),
    "conv_channel_mismatch": ("conv", lambda: aconv(w=torch.randn(6, 3, 3, 3, dtype=D)),
                              lambda: conv2d(w=torch.randn(6, 3, 3, 3, dtype=D)),
                              r"weight has 3 input channels per group but input has 4 channels with groups=1"),
    "conv_channel_mismatch_large": ("conv", lambda: aconv(torch.randn(2, 64, 64, 64), torch.randn(64, 16, 3, 3)),
                                    lambda: conv2d(torch.randn(2, 64, 64, 64), torch.randn(64, 16, 3, 3)),
                                    r"weight has 16 input channels per group but input has 64"),
    "conv_bias_wrong_length_direct": ("conv", lambda: aconv(b=torch.randn(5, dtype=D)),
                                      lambda: conv2d(b=torch.randn(5, dtype=D), algo="direct"),
                                      r"expected bias of shape \(6,\) to match weight.shape\[0\], got \[5\]"),
    "conv_bias_2d": ("conv", lambda: aconv(b=torch.randn(6, 1, dtype=D)), lambda: conv2d(b=torch.randn(6, 1, dtype=D)),
                     r"expected bias of shape \(6,\)"),
    "conv_stride_zero": ("conv", lambda: aconv(stride=(0, 1)), lambda: conv2d(stride=(0, 1)),
                         r"non-positive stride is not supported"),
    "conv_dilation_zero": ("conv", lambda: aconv(dilation=(1, 0)), lambda: conv2d(dilation=(1, 0)),
                           r"non-positive dilation is not supported"),
    "conv_groups_zero": ("conv", lambda: aconv(groups=0), lambda: conv2d(groups=0),
                         r"non-positive groups is not supported"),
    "conv_groups_inconsistent": ("conv", lambda: aconv(groups=2), lambda: conv2d(groups=2),
                                 r"weight has 4 input channels per group but input has 4 channels with groups=2"),
    "conv_groups_not_dividing_out": ("conv", lambda: aconv(w=torch.randn(5, 2, 3, 3, dtype=D), groups=2),
                                     lambda: conv2d(w=torch.randn(5, 2, 3, 3, dtype=D), groups=2),
                                     r"groups=2 must divide out_channels"),
    "conv_kernel_larger_than_input": ("conv", lambda: aconv(x=x4[:, :, :2, :2]), lambda: conv2d(x=x4[:, :, :2, :2]),
                                      r"kernel size can't be greater than the padded input size"),
    "conv_stride_wrong_length": ("conv", lambda: aconv(stride=(1, 1, 1)), lambda: conv2d(stride=(1, 1, 1)),
                                 r"expected stride to be a list of 2 ints"),
    "conv_padding_wrong_length": ("conv", lambda: aconv(padding=(1,) * 3), lambda: conv2d(padding=(1,) * 3),
                                  r"expected padding to be a list of 2 ints"),
    "conv_input_3d": ("conv", lambda: aconv(x=x4[0]), lambda: conv2d(x=x4[0]), r"expected input to be 4-D"),
    "conv_weight_3d": ("conv", lambda: aconv(w=w4[0]), lambda: conv2d(w=w4[0]), r"expected weight to be 4-D"),
    "conv_weight_zero_out_channels": ("conv", lambda: aconv(w=w4[:0]), lambda: conv2d(w=w4[:0]),
                                      r"expected weight to be at least 1 at dimension 0"),
    "conv_kernel_zero": ("conv", lambda: aconv(w=w4[:, :, :0]), lambda: conv2d(w=w4[:, :, :0]),
                         r"kernel size should be greater than zero"),
    "conv_zero_spatial_with_padding": ("conv", lambda: aconv(x=x4[:, :, :0], padding=(2, 2)),
                                       lambda: conv2d(x=x4[:, :, :0], padding=(2, 2)),
                                       r"only zero batch or zero channel inputs are supported"),
    "conv_dtype_mismatch": ("conv", lambda: aconv(w=w4.float()), lambda: conv2d(w=w4.float()),
                            r"input has dtype torch.float64 but weight has dtype torch.float32"),
    # aten.convolution casts a bias of another dtype; torch's functional conv2d refuses it, and so does fastconv.
    "conv_bias_dtype_mismatch": ("conv", lambda: TF.conv2d(x4, w4, b6.float()), lambda: conv2d(b=b6.float()),
                                 r"but bias has dtype torch.float32"),
    "conv_padding_overflow": ("conv", lambda: aconv(padding=(2 ** 62, 0)), lambda: conv2d(padding=(2 ** 62, 0)),
                              r"makes a padded input plane of \d+ elements, more than any machine can address"),
    # aten.convolution returns a result for a cpu input and a meta weight; fastconv's CPU kernel has no data to
    # read there, so it refuses (before, it returned a CPU tensor computed from nothing).
    "conv_device_mismatch": ("conv", None, lambda: conv2d(w=w4.to("meta")), r"input is on cpu but weight is on meta"),
    "conv_bias_device_mismatch": ("conv", None, lambda: conv2d(b=b6.to("meta")), r"input is on cpu but bias is on meta"),
    # torch computes integer convolutions on the CPU; fastconv refuses them by name (and float8, which torch
    # refuses too); float16/bfloat16 are computed in float32 (tests/test_half.py).
    "conv_integer": ("conv", None, lambda: conv2d(x4.long(), w4.long()), r"input has dtype torch.int64"),
    "conv_float8": ("conv", None, lambda: conv2d(x4.to(torch.float8_e5m2), w4.to(torch.float8_e5m2)),
                    r"which fastconv does not support"),
    "conv_not_a_tensor": ("conv", lambda: aconv(w=[[1.0]]), lambda: conv2d(w=[[1.0]]),
                          r"Expected a value of type 'Tensor' for argument 'weight'"),
    # ---- the gradient ops ---------------------------------------------------------------------------
    "grad_input_made_up_input_size": (
        "conv", lambda: conv_bwd(gy, torch.zeros(2, 4, 20, 20, dtype=D), w4, [True, False, False]),
        lambda: ops.conv2d_grad_input(gy, w4, [20, 20], [1, 1], [0, 0], [0, 0], [1, 1], 1, "auto"),
        r"conv2d_grad_input: expected grad_output of spatial size \(18, 18\)"),
    "grad_input_channel_mismatch": (
        "conv", lambda: conv_bwd(gy[:, :5], x4, w4, [True, False, False]),
        lambda: ops.conv2d_grad_input(gy[:, :5], w4, [8, 8], [1, 1], [0, 0], [0, 0], [1, 1], 1, "auto"),
        r"grad_output has 5 channels but weight has 6 output channels"),
    "grad_input_negative_padding": (
        "conv", lambda: conv_bwd(gy, x4, w4, [True, False, False], padding=(-1, 0)),
        lambda: ops.conv2d_grad_input(gy, w4, [8, 8], [1, 1], [-1, 0], [0, 0], [1, 1], 1, "auto"),
        r"negative padding is not supported"),
    "grad_input_groups_zero": (
        "conv", lambda: conv_bwd(gy, x4, w4, [True, False, False], groups=0),
        lambda: ops.conv2d_grad_input(gy, w4, [8, 8], [1, 1], [0, 0], [0, 0], [1, 1], 0, "auto"),
        r"non-positive groups"),
    "grad_weight_made_up_weight_size": (
        "conv", lambda: conv_bwd(gy, x4, torch.zeros(6, 4, 5, 5, dtype=D), [False, True, False]),
        lambda: ops.conv2d_grad_weight(gy, x4, [5, 5], [1, 1], [0, 0], [0, 0], [1, 1], 1, "auto"),
        r"conv2d_grad_weight: expected grad_output of spatial size \(4, 4\)"),
    # aten.convolution_backward does not compare the two batch sizes (it returns a result); no torch call
    # refuses this, fastconv does (its kernels would read past the shorter tensor).
    "grad_weight_batch_mismatch": (
        "conv", None,
        lambda: ops.conv2d_grad_weight(gy[:1], x4, [3, 3], [1, 1], [0, 0], [0, 0], [1, 1], 1, "auto"),
        r"grad_output has batch size 1 but input has 2"),
    "grad_weight_stride_zero": (
        "conv", lambda: conv_bwd(gy, x4, w4, [False, True, False], stride=(0, 0)),
        lambda: ops.conv2d_grad_weight(gy, x4, [3, 3], [0, 0], [0, 0], [0, 0], [1, 1], 1, "auto"),
        r"non-positive stride"),
    # ---- conv + bias + activation (fastconv.ops.fused): conv_op's checks plus the activation's ------------
    "bias_act_unknown_activation": (
        "conv", None,  # torch has no such op: a ValueError naming the activation and listing the valid ones
        lambda: ops.conv2d_bias_act(x4, w4, b6, [1, 1], [0, 0], [0, 0], [1, 1], 1, "auto", "gelu"),
        r"fastconv.conv2d_bias_act: unknown activation 'gelu'; expected one of 'none', 'relu', 'relu6'"),
    "bias_act_channel_mismatch": (
        "conv", lambda: TF.conv1d(x4[:, :, 0], torch.randn(6, 3, 3, dtype=D)),
        lambda: ops.conv1d_bias_act(x4[:, :, 0], torch.randn(6, 3, 3, dtype=D), None, [1], [0], [0], [1], 1, "auto",
                                    "relu"),
        r"fastconv.conv1d_bias_act: weight has 3 input channels per group but input has 4 channels"),
    "bias_act_bias_wrong_length": (
        "conv", lambda: TF.conv3d(x4[:, :, None], w4[:, :, None], torch.randn(3, dtype=D)),
        lambda: ops.conv3d_bias_act(x4[:, :, None], w4[:, :, None], torch.randn(3, dtype=D), [1, 1, 1], [0, 0, 0],
                                    [0, 0, 0], [1, 1, 1], 1, "auto", "relu6"),
        r"fastconv.conv3d_bias_act: expected bias of shape \(6,\)"),
    # ---- transposed and separable ---------------------------------------------------------------------
    "transposed_negative_padding": ("transposed", lambda: aconv(w=wt, transposed=True, padding=(-1, -1)),
                                    lambda: convT(padding=(-1, -1)), r"negative padding is not supported"),
    "transposed_channel_mismatch": ("transposed", lambda: aconv(w=wt[:3], transposed=True),
                                    lambda: convT(w=wt[:3]), r"weight has 3 input channels"),
    "transposed_output_padding": ("transposed",
                                  lambda: aconv(w=wt, transposed=True, stride=(2, 2), output_padding=(2, 2)),
                                  lambda: convT(stride=(2, 2), output_padding=(2, 2)),
                                  r"output padding must be smaller than either stride or dilation"),
    "transposed_bias_wrong_length": ("transposed", lambda: aconv(w=wt, b=b6, transposed=True),
                                     lambda: convT(b=b6), r"expected bias of shape \(3,\)"),
    "transposed_output_too_small": ("transposed", lambda: aconv(x4[:, :, :1, :1], wt, transposed=True, padding=(3, 3)),
                                    lambda: convT(x4[:, :, :1, :1], padding=(3, 3)),
                                    r"computed output size \(-3, -3\) is too small"),
    "transposed_groups_zero": ("transposed", lambda: aconv(w=wt, transposed=True, groups=0),
                               lambda: convT(groups=0), r"non-positive groups"),
    "transposed_empty_weight": ("transposed", lambda: aconv(w=wt[:, :0], transposed=True),
                                lambda: convT(w=wt[:, :0]), r"expected a non-empty weight"),
    "transposed_zero_spatial": ("transposed", lambda: aconv(x4[:, :, :0], wt, transposed=True),
                                lambda: convT(x4[:, :, :0]), r"only zero batch or zero channel inputs"),
    "separable_pointwise_mismatch": (
        "transposed", lambda: TF.conv2d(TF.conv2d(x4, dw4, groups=4), torch.randn(6, 8, 1, 1, dtype=D)),
        lambda: ops.depthwise_separable_conv2d(x4, dw4, torch.randn(6, 8, 1, 1, dtype=D), None, None, [1, 1],
                                               [0, 0], [0, 0], [1, 1], "auto"),
        r"pointwise_weight has 8 input channels but depthwise_weight has 4"),
    "separable_negative_padding": (
        "transposed", lambda: aconv(x4, dw4, padding=(-1, -1), groups=4),
        lambda: ops.depthwise_separable_conv2d(x4, dw4, pw4, None, None, [1, 1], [-1, -1], [-1, -1], [1, 1], "auto"),
        r"negative padding is not supported"),
    "separable_bias_wrong_length": (
        "transposed", lambda: aconv(x4, dw4, torch.randn(3, dtype=D), groups=4),
        lambda: ops.depthwise_separable_conv2d(x4, dw4, pw4, torch.randn(3, dtype=D), None, [1, 1], [0, 0], [0, 0],
                                               [1, 1], "auto"),
        r"expected depthwise_bias of shape \(4,\)"),
    # ---- pooling ----------------------------------------------------------------------------------------
    "max_pool_padding_over_half": ("pool", lambda: TF.max_pool2d(pool_x, 3, 1, 2),
                                   lambda: ops.max_pool(pool_x, [3, 3], [1, 1], [2, 2], [1, 1], False, False),
                                   r"fastconv.max_pool: pad should be at most half of kernel size"),
    "max_pool_negative_kernel": ("pool", lambda: TF.max_pool2d(pool_x, -1),
                                 lambda: ops.max_pool(pool_x, [-1, -1], [1, 1], [0, 0], [1, 1], False, False),
                                 r"non-positive kernel_size is not supported"),
    "max_pool_stride_zero": ("pool", lambda: TF.max_pool2d(pool_x, 2, 0),
                             lambda: ops.max_pool(pool_x, [2, 2], [0, 0], [0, 0], [1, 1], False, False),
                             r"non-positive stride"),
    "max_pool_negative_padding": ("pool", lambda: TF.max_pool2d(pool_x, 3, 1, -1),
                                  lambda: ops.max_pool(pool_x, [3, 3], [1, 1], [-1, -1], [1, 1], False, False),
                                  r"negative padding"),
    "max_pool_list_lengths": ("pool", lambda: aten.max_pool2d_with_indices(pool_x, [2, 2], [2, 2, 2]),
                              lambda: ops.max_pool(pool_x, [2, 2], [2, 2, 2], [0, 0], [1, 1], False, False),
                              r"expected stride to be a list of 2 ints"),
    "max_pool_input_rank": ("pool", lambda: TF.max_pool2d(pool_x[0, 0], 2),
                            lambda: ops.max_pool(pool_x[0, 0], [2, 2], [2, 2], [0, 0], [1, 1], False, False),
                            r"expected input to be 4-D"),
    "max_pool_zero_channels": ("pool", lambda: TF.max_pool2d(pool_x[:, :0], 2),
                               lambda: ops.max_pool(pool_x[:, :0], [2, 2], [2, 2], [0, 0], [1, 1], False, False),
                               r"expected input with non-zero size"),
    "max_pool_output_too_small": ("pool", lambda: TF.max_pool2d(pool_x[:, :, :2, :2], 3),
                                  lambda: ops.max_pool(pool_x[:, :, :2, :2], [3, 3], [3, 3], [0, 0], [1, 1], False,
                                                       False),
                                  r"output size is too small"),
    "max_pool_bool": ("pool", lambda: TF.max_pool2d(pool_x > 0, 2),
                      lambda: ops.max_pool(pool_x > 0, [2, 2], [2, 2], [0, 0], [1, 1], False, False),
                      r"input has dtype torch.bool, which is not implemented"),
    "avg_pool_stride_zero": ("pool", lambda: TF.avg_pool2d(pool_x, 2, 0),
                             lambda: ops.avg_pool(pool_x, [2, 2], [0, 0], [0, 0], False, True, 0),
                             r"non-positive stride"),
    "avg_pool_padding_over_half": ("pool", lambda: TF.avg_pool2d(pool_x, 2, 1, 2),
                                   lambda: ops.avg_pool(pool_x, [2, 2], [1, 1], [2, 2], False, True, 0),
                                   r"pad should be at most half of kernel size"),
    "avg_pool_backward_wrong_grad_shape": (
        "pool", lambda: aten.avg_pool2d_backward(torch.randn(2, 3, 3, 3, dtype=D), pool_x, [2, 2], [2, 2], [0, 0],
                                                 False, True, None),
        lambda: ops.avg_pool_backward(torch.randn(2, 3, 3, 3, dtype=D), [8, 8], [2, 2], [2, 2], [0, 0], False, True,
                                      0),
        r"expected grad_output of spatial size \(4, 4\)"),
    "max_pool_backward_indices_shape": (
        "pool", lambda: aten.max_pool2d_with_indices_backward(pooled, pool_x, [2, 2], [2, 2], [0, 0], [1, 1], False,
                                                              pool_idx[:, :, :2]),
        lambda: ops.max_pool_backward(pooled, pool_idx[:, :, :2], [8, 8]),
        r"expected indices to have the same shape as grad_output"),
    "max_pool_backward_indices_dtype": (
        "pool", lambda: aten.max_pool2d_with_indices_backward(pooled, pool_x, [2, 2], [2, 2], [0, 0], [1, 1], False,
                                                              pool_idx.int()),
        lambda: ops.max_pool_backward(pooled, pool_idx.int(), [8, 8]), r"expected indices of dtype torch.int64"),
    "max_unpool_indices_dtype": ("pool", lambda: TF.max_unpool2d(pooled, pool_idx.int(), 2),
                                 lambda: ops.max_unpool(pooled, pool_idx.int(), [8, 8]),
                                 r"expected indices of dtype torch.int64"),
    "max_unpool_indices_shape": ("pool", lambda: TF.max_unpool2d(pooled, pool_idx[:, :, :1], 2),
                                 lambda: ops.max_unpool(pooled, pool_idx[:, :, :1], [8, 8]),
                                 r"expected indices to have the same shape as input"),
    "max_unpool_negative_output_size": ("pool", lambda: aten.max_unpool2d(pooled, pool_idx, [-1, 8]),
                                        lambda: ops.max_unpool(pooled, pool_idx, [-1, 8]),
                                        r"negative output_size is not supported"),
    "max_unpool_index_out_of_range": ("pool", lambda: aten.max_unpool2d(pooled, pool_idx, [2, 2]),
                                      lambda: ops.max_unpool(pooled, pool_idx, [2, 2]), r"invalid max index"),
    "adaptive_negative_output": ("pool", lambda: aten.adaptive_max_pool2d(pool_x, [-1, 2]),
                                 lambda: ops.adaptive_max_pool(pool_x, [-1, 2]),
                                 r"negative output_size is not supported"),
    "adaptive_output_rank": ("pool", lambda: aten._adaptive_avg_pool2d(pool_x, [2, 2, 2]),
                             lambda: ops.adaptive_avg_pool(pool_x, [2, 2, 2]), r"expected input to be 5-D"),
    "adaptive_avg_backward_rank": (
        "pool", lambda: aten._adaptive_avg_pool2d_backward(torch.randn(2, 3, 2, 2, dtype=D), pool_x[..., None]),
        lambda: ops.adaptive_avg_pool_backward(torch.randn(2, 3, 2, 2, dtype=D), [8, 8, 1]),
        r"expected grad_output to be 5-D"),
    # The gather this op is accepts int32 indices in torch; fastconv's kernels take int64 only.
    "max_unpool_backward_indices_dtype": (
        "pool", None,
        lambda: ops.max_unpool_backward(pool_x, pool_idx.int()), r"expected indices of dtype torch.int64"),
}

GROUPS = sorted({case[0] for case in CASES.values()})
#: Refused before or after the op's validation: by the kernel (an index outside the plane is only known from
#: the data), or by the dispatcher's schema check (a list where a Tensor belongs).
NOT_VALIDATION_MESSAGES = {"max_unpool_index_out_of_range", "conv_not_a_tensor"}


# ------------------------------------------------------------------------------------------------
# the child process
# ------------------------------------------------------------------------------------------------
def _child(group: str) -> None:
    """Run one group's cases; print one JSON line per case. Progress goes to stderr first, so a crash
    shows which case killed the process."""
    import fastconv  # noqa: F401  (registers the ops)

    for name, (g, torch_call, our_call, _) in CASES.items():
        if g != group:
            continue
        print(f"START {name}", file=sys.stderr, flush=True)
        torch_error = None
        if torch_call is not None:
            try:
                torch_call()
            except Exception as e:  # noqa: BLE001  (any exception: the case's premise is that torch refuses)
                torch_error = e
        ours = None
        try:
            result = our_call()
        except Exception as e:  # noqa: BLE001
            ours = e
        record = dict(name=name, torch=type(torch_error).__name__ if torch_error is not None else None,
                      ours=type(ours).__name__ if ours is not None else None,
                      message=str(ours) if ours is not None else None,
                      same_type=ours is not None and torch_error is not None and isinstance(ours, type(torch_error)),
                      returned=None if ours is not None else repr(getattr(result, "shape", result)))
        print(json.dumps(record), flush=True)


def _run_child(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


_RESULTS: dict[str, dict] = {}


def _group_results(group: str) -> dict:
    if group not in _RESULTS:
        proc = _run_child("child", group)
        records = {}
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                records[rec["name"]] = rec
        _RESULTS[group] = dict(returncode=proc.returncode, stderr=proc.stderr[-3000:], records=records)
    return _RESULTS[group]


@pytest.mark.parametrize("name", list(CASES))
def test_direct_op_call_with_bad_arguments_is_refused(name):
    group, torch_call, _, message = CASES[name]
    res = _group_results(group)
    rec = res["records"].get(name)
    assert rec is not None, (f"the child process for group {group!r} died before reporting {name!r} "
                             f"(exit status {res['returncode']}; a negative status is a signal):\n{res['stderr']}")
    assert rec["ours"] is not None, f"{name}: fastconv returned {rec['returned']} instead of raising"
    if torch_call is not None:
        assert rec["torch"] is not None, f"{name}: torch accepts this call, so the case tests nothing torch refuses"
        assert rec["same_type"], f"{name}: torch raised {rec['torch']}, fastconv raised {rec['ours']}: {rec['message']}"
    else:
        assert rec["ours"] in ("RuntimeError", "NotImplementedError", "TypeError", "ValueError"), rec
    if name not in NOT_VALIDATION_MESSAGES:
        assert rec["message"].startswith("fastconv."), rec["message"]
    import re

    assert re.search(message, rec["message"]), f"{name}: message {rec['message']!r} does not match {message!r}"


def test_every_child_exits_cleanly():
    for group in GROUPS:
        res = _group_results(group)
        assert res["returncode"] == 0, f"group {group}: exit status {res['returncode']}\n{res['stderr']}"


def test_every_registered_op_has_an_abuse_case():
    """A new op must come with at least one direct-call case here (its name in one of the calls)."""
    import inspect

    import fastconv  # noqa: F401

    names = [n for n in dir(ops) if not n.startswith("_") and n != "name"]
    sources = "\n".join(inspect.getsource(case[2]) for case in CASES.values())
    covered = {n for n in names if f"ops.{n}(" in sources or (n == "conv2d" and "conv2d(" in sources)
               or (n == "conv_transpose2d" and "convT(" in sources)}
    # conv1d/conv3d and their gradient ops share conv2d's validator (validation.conv_op & co., ndim given);
    # the fuzz below calls them directly.
    shared = {"conv1d", "conv3d", "conv1d_grad_input", "conv3d_grad_input", "conv1d_grad_weight",
              "conv3d_grad_weight", "conv_transpose1d", "conv_transpose3d"}
    missing = set(names) - covered - shared
    assert not missing, f"registered ops without a direct-call abuse case: {sorted(missing)}"


# ------------------------------------------------------------------------------------------------
# zero sizes and mixed dtypes: the same result as torch (in-process: nothing here runs a kernel)
# ------------------------------------------------------------------------------------------------
import fastconv  # noqa: E402
import fastconv.functional as F  # noqa: E402

ZERO_CASES = {
    # name: (torch function, fastconv function, args, kwargs)
    "conv2d_batch0": (TF.conv2d, F.conv2d, (torch.randn(0, 2, 5, 5, dtype=D), torch.randn(3, 2, 3, 3, dtype=D),
                                            torch.randn(3, dtype=D)), {}),
    "conv2d_batch0_padding": (TF.conv2d, F.conv2d, (torch.randn(0, 2, 5, 5, dtype=D), torch.randn(3, 2, 3, 3, dtype=D)),
                              dict(padding=2, stride=2)),
    "conv2d_batch0_zero_spatial": (TF.conv2d, F.conv2d, (torch.randn(0, 2, 0, 5, dtype=D),
                                                         torch.randn(3, 2, 1, 1, dtype=D)), dict(padding=1)),
    "conv2d_zero_channels": (TF.conv2d, F.conv2d, (torch.randn(2, 0, 5, 5, dtype=D), torch.randn(5, 0, 3, 3, dtype=D),
                                                   torch.randn(5, dtype=D)), {}),
    "conv2d_zero_channels_zero_spatial": (TF.conv2d, F.conv2d, (torch.randn(2, 0, 0, 5, dtype=D),
                                                                torch.randn(5, 0, 1, 1, dtype=D)), dict(padding=1)),
    "conv1d_zero_channels": (TF.conv1d, F.conv1d, (torch.randn(2, 0, 5, dtype=D), torch.randn(5, 0, 3, dtype=D)), {}),
    "conv3d_zero_channels_unbatched": (TF.conv3d, F.conv3d, (torch.randn(0, 4, 4, 4, dtype=D),
                                                             torch.randn(5, 0, 3, 3, 3, dtype=D)), {}),
    "conv2d_zero_channels_mixed_dtype": (TF.conv2d, F.conv2d, (torch.randn(2, 0, 5, 5),
                                                               torch.randn(5, 0, 3, 3, dtype=D)), {}),
    "conv1d_batch0_mixed_dtype": (TF.conv1d, F.conv1d, (torch.randn(0, 2, 5), torch.randn(3, 2, 3, dtype=D)), {}),
    "conv2d_batch0_mixed_dtype": (TF.conv2d, F.conv2d, (torch.randn(0, 2, 5, 5), torch.randn(3, 2, 3, 3, dtype=D),
                                                        torch.randn(3)), {}),
    "conv2d_batch0_float64_input": (TF.conv2d, F.conv2d, (torch.randn(0, 2, 5, 5, dtype=D), torch.randn(3, 2, 3, 3)),
                                    {}),
    "conv3d_batch0_mixed_dtype": (TF.conv3d, F.conv3d, (torch.randn(0, 2, 5, 5, 5),
                                                        torch.randn(3, 2, 3, 3, 3, dtype=D)), {}),
    "conv_transpose2d_batch0_mixed": (TF.conv_transpose2d, F.conv_transpose2d,
                                      (torch.randn(0, 2, 5, 5), torch.randn(2, 3, 3, 3, dtype=D),
                                       torch.randn(3, dtype=D)), dict(stride=2)),
    "conv_transpose2d_batch0_zero_spatial": (TF.conv_transpose2d, F.conv_transpose2d,
                                             (torch.randn(0, 2, 0, 5, dtype=D), torch.randn(2, 3, 3, 3, dtype=D)), {}),
    "max_pool2d_batch0_padding": (TF.max_pool2d, F.max_pool2d, (torch.randn(0, 2, 4, 4, dtype=D), 3, 1, 1), {}),
    "avg_pool2d_batch0": (TF.avg_pool2d, F.avg_pool2d, (torch.randn(0, 2, 4, 4, dtype=D), 2), {}),
    "max_pool3d_batch0": (TF.max_pool3d, F.max_pool3d, (torch.randn(0, 2, 4, 4, 4, dtype=D), 2), {}),
    "adaptive_avg_zero_channels": (TF.adaptive_avg_pool2d, F.adaptive_avg_pool2d, (torch.randn(2, 0, 4, 4, dtype=D), 2),
                                   {}),
    "adaptive_avg_output_zero": (TF.adaptive_avg_pool2d, F.adaptive_avg_pool2d, (torch.randn(2, 3, 4, 4, dtype=D), 0),
                                 {}),
    "adaptive_max_output_zero": (TF.adaptive_max_pool2d, F.adaptive_max_pool2d, (torch.randn(2, 3, 4, 4, dtype=D), 0),
                                 {}),
    "adaptive_max_unbatched_zero_channels": (TF.adaptive_max_pool2d, F.adaptive_max_pool2d,
                                             (torch.randn(0, 4, 4, dtype=D), 2), dict(return_indices=True)),
    "adaptive_avg_unbatched_zero_channels": (TF.adaptive_avg_pool2d, F.adaptive_avg_pool2d,
                                             (torch.randn(0, 4, 4, dtype=D), 2), {}),
    "max_unpool2d_batch0": (TF.max_unpool2d, F.max_unpool2d, (torch.randn(0, 2, 2, 2, dtype=D),
                                                              torch.zeros(0, 2, 2, 2, dtype=torch.long), 2), {}),
    "lp_pool2d_batch0": (TF.lp_pool2d, F.lp_pool2d, (torch.randn(0, 2, 4, 4, dtype=D), 2, 2), {}),
    # torch refuses these (a zero spatial size with a non-zero batch and channel count): fastconv too.
    "conv2d_zero_spatial_padding": (TF.conv2d, F.conv2d, (torch.randn(2, 2, 0, 5, dtype=D),
                                                          torch.randn(3, 2, 1, 1, dtype=D)), dict(padding=1)),
    "conv2d_zero_out_channels": (TF.conv2d, F.conv2d, (torch.randn(2, 2, 5, 5, dtype=D),
                                                       torch.randn(0, 2, 3, 3, dtype=D)), {}),
    "conv_transpose2d_zero_channels": (TF.conv_transpose2d, F.conv_transpose2d,
                                       (torch.randn(2, 0, 5, 5, dtype=D), torch.randn(0, 3, 3, 3, dtype=D)), {}),
    "max_pool2d_zero_channels": (TF.max_pool2d, F.max_pool2d, (torch.randn(2, 0, 4, 4, dtype=D), 2), {}),
    "max_pool2d_zero_spatial": (TF.max_pool2d, F.max_pool2d, (torch.randn(2, 2, 0, 4, dtype=D), 1), {}),
    "avg_pool2d_zero_channels_unbatched": (TF.avg_pool2d, F.avg_pool2d, (torch.randn(0, 4, 4, dtype=D), 2), {}),
    "adaptive_max_zero_channels": (TF.adaptive_max_pool2d, F.adaptive_max_pool2d,
                                   (torch.randn(2, 0, 4, 4, dtype=D), 2), {}),
    "adaptive_avg_zero_spatial": (TF.adaptive_avg_pool2d, F.adaptive_avg_pool2d,
                                  (torch.randn(2, 3, 0, 4, dtype=D), 2), {}),
    "max_unpool2d_zero_channels": (TF.max_unpool2d, F.max_unpool2d, (torch.randn(2, 0, 2, 2, dtype=D),
                                                                     torch.zeros(2, 0, 2, 2, dtype=torch.long), 2), {}),
}


@pytest.mark.parametrize("name", list(ZERO_CASES))
def test_zero_sizes_and_mixed_dtypes_match_torch(name):
    """Same shape and dtype as torch (zeros, where torch's result is non-empty), or an error of torch's type."""
    ref_fn, our_fn, args, kwargs = ZERO_CASES[name]
    ref = torch_error = None
    try:
        ref = ref_fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        torch_error = e
    if torch_error is not None:
        with pytest.raises(type(torch_error)):
            our_fn(*args, **kwargs)
    else:
        ours = our_fn(*args, **kwargs)
        refs, outs = (ref, ours) if isinstance(ref, tuple) else ((ref,), (ours,))
        assert len(outs) == len(refs)
        for r, o in zip(refs, outs):
            assert o.shape == r.shape and o.dtype == r.dtype, \
                f"{name}: got {o.shape} {o.dtype}, torch {r.shape} {r.dtype}"
            assert torch.equal(o, r)


def test_zero_channel_conv_backward_matches_torch():
    x = torch.randn(2, 0, 5, 5, dtype=D, requires_grad=True)
    w = torch.randn(5, 0, 3, 3, dtype=D, requires_grad=True)
    b = torch.randn(5, dtype=D, requires_grad=True)
    F.conv2d(x, w, b).sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    assert torch.equal(b.grad, torch.zeros(5, dtype=D))


def test_batch0_mixed_dtype_backward_matches_torch():
    for fn, tfn, wshape in ((F.conv2d, TF.conv2d, (3, 2, 3, 3)), (F.conv_transpose2d, TF.conv_transpose2d, (2, 3, 3, 3))):
        grads = []
        for f in (fn, tfn):
            x = torch.randn(0, 2, 5, 5, requires_grad=True)
            w = torch.randn(*wshape, dtype=D, requires_grad=True)
            f(x, w).sum().backward()
            grads.append((x.grad, w.grad))
        for ours, ref in zip(grads[0], grads[1]):
            assert ours.dtype == ref.dtype and ours.shape == ref.shape and torch.equal(ours, ref)


INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=str)
def test_integer_max_pooling_matches_torch(dtype):
    """torch's max_pool accepts integer tensors (values and int64 indices): fastconv's CPU path too."""
    info = torch.iinfo(dtype)
    g = torch.Generator().manual_seed(0)
    x2 = torch.randint(info.min, info.max, (2, 3, 9, 11), generator=g, dtype=torch.int64).to(dtype)
    x2[0, 0, :3, :3] = info.min   # a window of the dtype's lowest value: the first index wins, as in torch
    x2[1, 1, 2:5, 2:5] = 7        # ties
    cases = [(TF.max_pool2d, F.max_pool2d, x2, dict(kernel_size=3, stride=2, padding=1)),
             (TF.max_pool2d, F.max_pool2d, x2, dict(kernel_size=2, dilation=2, ceil_mode=True)),
             (TF.max_pool1d, F.max_pool1d, x2[0], dict(kernel_size=3, stride=1, padding=1)),
             (TF.max_pool3d, F.max_pool3d, x2.reshape(1, 2, 3, 9, 11), dict(kernel_size=2, stride=(1, 2, 2)))]
    for tfn, fn, x, kw in cases:
        ref_y, ref_i = tfn(x, return_indices=True, **kw)
        y, i = fn(x, return_indices=True, **kw)
        assert y.dtype == dtype and torch.equal(y, ref_y), (tfn.__name__, kw)
        assert torch.equal(i, ref_i), (tfn.__name__, kw)
        assert torch.equal(fn(x, **kw), ref_y)


@pytest.mark.parametrize("dtype", (torch.uint8, torch.int64), ids=str)
def test_integer_min_pooling_is_exact(dtype):
    """torch has no min pooling; fastconv's is exact on integers (no negation: uint8 would wrap)."""
    x = torch.randint(0, 200, (2, 3, 8, 8), dtype=torch.int64).to(dtype)
    y, i = F.min_pool2d(x, 3, 2, 1, return_indices=True)
    ref_y, ref_i = TF.max_pool2d(-(x.to(torch.int64)), 3, 2, 1, return_indices=True)
    assert y.dtype == dtype and torch.equal(y.to(torch.int64), -ref_y) and torch.equal(i, ref_i)


# ------------------------------------------------------------------------------------------------
# property-based fuzz of the registered ops' arguments (in a child: a crash fails the test)
# ------------------------------------------------------------------------------------------------
# CI runs a fixed, derandomized set; FASTCONV_FUZZ_EXAMPLES / FASTCONV_FUZZ_RANDOM=1 explore further by hand.
FUZZ_EXAMPLES = int(os.environ.get("FASTCONV_FUZZ_EXAMPLES", "200"))
FUZZ_RANDOM = os.environ.get("FASTCONV_FUZZ_RANDOM") == "1"
ALLOWED_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)
BAD_INTS = (-(2 ** 63), -2, -1, 0, 2 ** 31, 2 ** 62, 2 ** 63 - 1, 2 ** 63)


def _fuzz() -> None:
    """Mostly well-formed calls of every op, each argument spoiled with probability 1/8 (a bad int, a wrong
    list length, a zero or mismatched size, another dtype): accepted calls are compared with torch."""
    import math
    import resource

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    import fastconv  # noqa: F401

    # A bug that allocates a huge output must fail as an error here, not push the machine into swap.
    resource.setrlimit(resource.RLIMIT_AS, (16 * 2 ** 30, resource.RLIM_INFINITY))
    torch.set_num_threads(1)
    outcomes = {"ok": 0, "refused": 0, "compared": 0}

    def spoil(draw, good, bad):
        return draw(bad) if draw(st.integers(0, 7)) == 0 else good

    def ints(draw, nd, lo, hi):
        values = [spoil(draw, draw(st.integers(lo, hi)), st.sampled_from(BAD_INTS)) for _ in range(nd)]
        return spoil(draw, values, st.sampled_from([[], values + [1], values[:1] * (nd + 1)]))

    def dims(draw, sizes):
        return [spoil(draw, v, st.sampled_from([0, 1, 7])) for v in sizes]

    def tensor(draw, sizes, dtype=D):
        return torch.randn(*dims(draw, sizes), dtype=D).mul(4).to(dtype)

    def index(draw, sizes, high):
        dtype = spoil(draw, torch.int64, st.just(torch.int32))
        return torch.randint(0, max(high, 1), tuple(dims(draw, sizes)), dtype=torch.int64).to(dtype)

    OPS = ["conv1d", "conv2d", "conv3d", "conv2d_grad_input", "conv2d_grad_weight", "conv_transpose1d",
           "conv_transpose2d", "depthwise_separable_conv2d", "max_pool", "avg_pool", "adaptive_avg_pool",
           "adaptive_max_pool", "max_unpool", "max_pool_backward", "max_unpool_backward", "avg_pool_backward",
           "adaptive_avg_pool_backward"]

    @st.composite
    def calls(draw):
        op = draw(st.sampled_from(OPS))
        nd = 2 if op.startswith(("conv2d", "depthwise")) else int(op[-2]) if op[-2].isdigit() else \
            draw(st.integers(1, 3))
        dtype = spoil(draw, D, st.sampled_from([torch.float32, torch.int64, torch.float16]))
        lead = [draw(st.integers(0, 2)), draw(st.integers(1, 3))]
        S = [draw(st.integers(3, 6)) for _ in range(nd)]
        rank_extra = spoil(draw, [], st.sampled_from([[1], None]))
        if rank_extra is None:           # one dim fewer
            S = S[1:] if nd > 1 else S
        else:
            S = S + rank_extra
        a = dict(op=op, nd=nd)
        if op.startswith("conv") or op.startswith("depthwise"):
            g = spoil(draw, draw(st.sampled_from([1, 1, 2])), st.sampled_from([0, -1, 3]))
            cpg, kpg = draw(st.integers(1, 2)), draw(st.integers(1, 2))
            k = [draw(st.integers(1, 3)) for _ in range(nd)]
            C, K = cpg * max(g, 1), kpg * max(g, 1)
            a.update(groups=g, stride=ints(draw, nd, 1, 2), padding=ints(draw, nd, 0, 1),
                     padding_end=ints(draw, nd, 0, 1), dilation=ints(draw, nd, 1, 2),
                     output_padding=ints(draw, nd, 0, 1))
            if op.startswith("conv_transpose"):
                a["x"] = tensor(draw, [lead[0], C, *S], dtype)
                a["w"] = tensor(draw, [C, kpg, *k], spoil(draw, dtype, st.just(torch.float32)))
                a["bias"] = spoil(draw, None, st.sampled_from([torch.randn(K, dtype=D), torch.randn(K + 1, dtype=D)]))
            elif op.startswith("depthwise"):
                a["x"] = tensor(draw, [lead[0], C, *S], dtype)
                a["dw"] = tensor(draw, [C * kpg, 1, *k], dtype)
                a["pw"] = tensor(draw, [3, C * kpg, 1, 1], dtype)
                a["bias"] = spoil(draw, None, st.sampled_from([torch.randn(3, dtype=D), torch.randn(4, dtype=D)]))
            else:
                a["x"] = tensor(draw, [lead[0], C, *S], dtype)
                a["w"] = tensor(draw, [K, cpg, *k], spoil(draw, dtype, st.just(torch.float32)))
                a["bias"] = spoil(draw, None, st.sampled_from([torch.randn(K, dtype=D), torch.randn(K + 1, dtype=D)]))
                if op.endswith(("grad_input", "grad_weight")):
                    # grad_output of the real geometry when it has one (else any shape), then maybe spoiled
                    s_, p_, d_ = (a["stride"], a["padding"], a["dilation"])
                    try:
                        O = [(i + 2 * p - d * (kk - 1) - 1) // st_ + 1 for i, kk, st_, p, d in zip(S, k, s_, p_, d_)]
                        assert all(0 < o < 64 for o in O) and len(O) == nd
                    except Exception:  # noqa: BLE001
                        O = [2] * nd
                    a["padding_end"] = a["padding"]
                    a["gy"] = tensor(draw, [lead[0], K, *O], dtype)
                    a["size"] = dims(draw, S) if op.endswith("grad_input") else dims(draw, k)
            return a
        kernel = ints(draw, nd, 1, 3)
        kk = [v if 1 <= v <= 3 else 1 for v in (kernel + [1] * nd)[:nd]]
        a.update(kernel=kernel, stride=ints(draw, nd, 1, 2), padding=ints(draw, nd, 0, min(kk) // 2),
                 dilation=ints(draw, nd, 1, 2), ceil=draw(st.booleans()), minimum=draw(st.booleans()),
                 count_include_pad=draw(st.booleans()),
                 divisor=spoil(draw, 0, st.sampled_from([1, 3, -2])) if nd > 1 else 0,
                 out=ints(draw, nd, 0, 4))
        a["x"] = tensor(draw, [*lead, *S], dtype)
        if op == "max_unpool":
            out = [2 * v for v in S]
            a["out"] = spoil(draw, out, st.sampled_from([[], [1] * nd, out + [2]]))
            a["idx"] = index(draw, [*lead, *S], math.prod(out))
        elif op == "max_pool_backward":
            a["size"] = ints(draw, nd, 3, 6)
            high = math.prod(a["size"]) if all(0 < v < 64 for v in a["size"]) else 8
            a["idx"] = index(draw, [*lead, *S], high)
        elif op == "max_unpool_backward":
            T = [draw(st.integers(1, 3)) for _ in range(nd)]
            a["idx"] = index(draw, [*lead, *T], math.prod(S))
        elif op == "avg_pool_backward":
            size = [draw(st.integers(3, 6)) for _ in range(nd)]
            s_, p_ = a["stride"], a["padding"]
            try:
                O = [(i + 2 * p - kv) // sv + 1 for i, kv, sv, p in zip(size, kk, s_, p_)]
                assert all(0 < o < 64 for o in O) and len(O) == nd
            except Exception:  # noqa: BLE001
                O = [2] * nd
            a["kernel"] = spoil(draw, kk, st.sampled_from([[0] * nd, kk + [1]]))
            a["ceil"] = False
            a["x"] = tensor(draw, [*lead, *O], dtype)
            a["size"] = dims(draw, size)
        elif op == "adaptive_avg_pool_backward":
            a["size"] = ints(draw, nd, 1, 6)
        return a

    def run(a):
        op, f = a["op"], getattr(torch.ops.fastconv, a["op"])
        if op in ("conv1d", "conv2d", "conv3d"):
            return f(a["x"], a["w"], a["bias"], a["stride"], a["padding"], a["padding_end"], a["dilation"],
                     a["groups"], "auto")
        if op.endswith("grad_input"):
            return f(a["gy"], a["w"], a["size"], a["stride"], a["padding"], a["padding_end"], a["dilation"],
                     a["groups"], "auto")
        if op.endswith("grad_weight"):
            return f(a["gy"], a["x"], a["size"], a["stride"], a["padding"], a["padding_end"], a["dilation"],
                     a["groups"], "auto")
        if op.startswith("conv_transpose"):
            return f(a["x"], a["w"], a["bias"], a["stride"], a["padding"], a["output_padding"], a["dilation"],
                     a["groups"], "auto")
        if op.startswith("depthwise"):
            return f(a["x"], a["dw"], a["pw"], None, a["bias"], a["stride"], a["padding"], a["padding_end"],
                     a["dilation"], "auto")
        if op == "max_pool":
            return f(a["x"], a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil"], a["minimum"])
        if op == "avg_pool":
            return f(a["x"], a["kernel"], a["stride"], a["padding"], a["ceil"], a["count_include_pad"], a["divisor"])
        if op in ("adaptive_avg_pool", "adaptive_max_pool"):
            return f(a["x"], a["out"])
        if op in ("max_unpool", "max_pool_backward"):
            return f(a["x"], a["idx"], a["out"] if op == "max_unpool" else a["size"])
        if op == "max_unpool_backward":
            return f(a["x"], a["idx"])
        if op == "avg_pool_backward":
            return f(a["x"], a["size"], a["kernel"], a["stride"], a["padding"], a["ceil"], a["count_include_pad"],
                     a["divisor"])
        return f(a["x"], a["size"])

    def pad(x, before, after):
        return TF.pad(x, [v for pair in zip(reversed(before), reversed(after)) for v in pair])

    def reference(a):
        """torch's result for a call fastconv accepted (raises where torch refuses it)."""
        op, nd, x = a["op"], a["nd"], a["x"]
        # a pooling op's spatial rank is the length of its window/size argument, whatever was generated
        rank_arg = {"max_pool": "kernel", "avg_pool": "kernel", "avg_pool_backward": "kernel",
                    "adaptive_avg_pool": "out", "adaptive_max_pool": "out", "max_pool_backward": "size",
                    "adaptive_avg_pool_backward": "size"}.get(op)
        if rank_arg is not None:
            nd = len(a[rank_arg])
        zeros = [0] * nd
        if op in ("conv1d", "conv2d", "conv3d"):
            return aten.convolution(pad(x, a["padding"], a["padding_end"]), a["w"], a["bias"], a["stride"], zeros,
                                    a["dilation"], False, zeros, a["groups"])
        if op.startswith("conv_transpose"):
            return aten.convolution(x, a["w"], a["bias"], a["stride"], a["padding"], a["dilation"], True,
                                    a["output_padding"], a["groups"])
        if op.startswith("depthwise"):
            z = aten.convolution(pad(x, a["padding"], a["padding_end"]), a["dw"], None, a["stride"], zeros,
                                 a["dilation"], False, zeros, x.shape[1])
            return TF.conv2d(z, a["pw"], a["bias"])
        if op.endswith(("grad_input", "grad_weight")):
            # (the fuzz passes padding_end == padding to the gradient ops: aten's symmetric padding)
            gy, w, x_ = a["gy"], a["w"], x
            if op.endswith("grad_input"):
                x_ = torch.zeros(gy.shape[0], w.shape[1] * a["groups"], *a["size"], dtype=D)
            else:
                w = torch.zeros(gy.shape[1], x.shape[1] // a["groups"], *a["size"], dtype=D)
            mask = [op.endswith("grad_input"), op.endswith("grad_weight"), False]
            grads = aten.convolution_backward(gy, x_, w, None, a["stride"], a["padding"], a["dilation"], False,
                                              zeros, a["groups"], mask)
            return grads[0] if mask[0] else grads[1]
        if op == "max_pool":
            fn = getattr(TF, f"max_pool{nd}d")
            sign = -1 if a["minimum"] else 1
            y, i = fn(sign * x, a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil"], True)
            return sign * y, i
        if op == "avg_pool":
            fn = getattr(TF, f"avg_pool{nd}d")
            extra = (a["divisor"] or None,) if nd > 1 else ()
            return fn(x, a["kernel"], a["stride"], a["padding"], a["ceil"], a["count_include_pad"], *extra)
        if op == "adaptive_avg_pool":
            return getattr(TF, f"adaptive_avg_pool{nd}d")(x, a["out"])
        if op == "adaptive_max_pool":
            return getattr(TF, f"adaptive_max_pool{nd}d")(x, a["out"], True)
        idx = a.get("idx")
        if op == "max_unpool":
            out = torch.zeros(*x.shape[:2], math.prod(a["out"]), dtype=D)
            return out.scatter_(2, idx.flatten(2), x.flatten(2)).reshape(*x.shape[:2], *a["out"])
        if op == "max_pool_backward":
            out = torch.zeros(*x.shape[:2], math.prod(a["size"]), dtype=D)
            return out.scatter_add_(2, idx.flatten(2), x.flatten(2)).reshape(*x.shape[:2], *a["size"])
        if op == "max_unpool_backward":
            return x.flatten(2).gather(2, idx.flatten(2)).reshape(idx.shape)
        inp = torch.zeros(*x.shape[:2], *a["size"], dtype=D, requires_grad=True)
        if op == "avg_pool_backward":
            extra = (a["divisor"] or None,) if nd > 1 else ()
            y = getattr(TF, f"avg_pool{nd}d")(inp, a["kernel"], a["stride"], a["padding"], a["ceil"],
                                              a["count_include_pad"], *extra)
        else:
            y = getattr(TF, f"adaptive_avg_pool{nd}d")(inp, list(x.shape[2:]))
        assert y.shape == x.shape, f"torch's output {tuple(y.shape)} != grad_output {tuple(x.shape)}"
        return torch.autograd.grad(y, inp, x)[0]

    def describe(a):
        return {k: (f"Tensor{list(v.shape)}:{v.dtype}" if isinstance(v, torch.Tensor) else v) for k, v in a.items()}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=not FUZZ_RANDOM,
              suppress_health_check=list(HealthCheck))
    @given(calls())
    def check(a):
        print(f"CALL {describe(a)}", file=sys.stderr, flush=True)
        try:
            out = run(a)
        except ALLOWED_ERRORS:
            outcomes["refused"] += 1
            return
        outcomes["ok"] += 1
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for t in outs:
            assert isinstance(t, torch.Tensor)
        if a["x"].dtype != D or any(isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != D
                                    for v in a.values()):
            return  # mixed dtypes are only accepted on torch's empty paths (checked in-process above)
        try:
            ref = reference(a)
        except Exception as e:  # noqa: BLE001
            huge = any(isinstance(v, list) and any(abs(i) > 2 ** 31 - 2 for i in v) for v in a.values())
            if huge and "int" in str(e) or "greater than zero" in str(e):
                # torch converts some of these int64 arguments to 32-bit int internally and then refuses
                # the wrapped value ("dilation should be greater than zero, but got -2147483648")
                outcomes["torch_overflow"] = outcomes.get("torch_overflow", 0) + 1
                return
            raise AssertionError(f"fastconv accepted a call torch refuses ({type(e).__name__}: {e}): "
                                 f"{describe(a)}") from None
        refs = ref if isinstance(ref, tuple) else (ref,)
        assert len(refs) == len(outs)
        for o, r in zip(outs, refs):
            assert o.shape == r.shape and o.dtype == r.dtype, (describe(a), o.shape, r.shape, o.dtype, r.dtype)
            if o.is_floating_point():
                assert torch.allclose(o, r, rtol=1e-9, atol=1e-9, equal_nan=True), f"values differ: {describe(a)}"
            else:
                # A window with no input element (dilation can step over the whole plane): torch returns an
                # index of some other element or past the plane (its backward then writes out of bounds and
                # crashed our probe: a torch bug); fastconv returns -1, which its backward skips.
                empty = o == -1
                assert bool(outs[0][empty].isinf().all()), f"-1 index for a non-empty window: {describe(a)}"
                assert torch.equal(o[~empty], r[~empty]), f"indices differ: {describe(a)}"
        outcomes["compared"] += 1

    check()
    print(json.dumps(outcomes), flush=True)


def test_fuzz_registered_op_arguments_never_crash():
    """Random ints (negative, zero, huge), shapes (zeros too), list lengths and dtypes for every op: the
    child never dies, every refusal is a RuntimeError/ValueError/TypeError/IndexError, and every accepted
    conv call matches torch (float64)."""
    pytest.importorskip("hypothesis")
    proc = _run_child("fuzz", timeout=300)
    tail = proc.stderr[-4000:]
    assert proc.returncode == 0, f"fuzz child exited with status {proc.returncode}:\n{tail}"
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcomes["ok"] + outcomes["refused"] >= FUZZ_EXAMPLES // 2, outcomes
    # Both kinds of outcome must occur, or the fuzz tests only one side.
    assert outcomes["compared"] >= FUZZ_EXAMPLES // 10 and outcomes["refused"] >= FUZZ_EXAMPLES // 10, outcomes


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        _child(sys.argv[2])
    elif sys.argv[1:2] == ["fuzz"]:
        _fuzz()
    else:
        sys.exit(f"usage: {sys.argv[0]} child <group> | fuzz")
