"""Registered op ``fastconv::depthwise_separable_conv2d``: depthwise k x k, then 1x1 pointwise (MobileNet).

``fastconv::depthwise_separable_conv2d(input, depthwise_weight, pointwise_weight, depthwise_bias,
pointwise_bias, stride, padding, padding_end, dilation, algo)``
    input (N, C, H, W), depthwise_weight (M, 1, KH, KW) with M = m*C, pointwise_weight (K, M, 1, 1),
    depthwise_bias (M,) or None, pointwise_bias (K,) or None -> (N, K, OH, OW)

Equal to ``conv2d(conv2d(input, depthwise_weight, depthwise_bias, groups=C), pointwise_weight,
pointwise_bias)``. Arguments arrive normalised by :mod:`fastconv.functional` (2 ints each; ``padding``
before and ``padding_end`` after each spatial dim).

``algo``:

* ``"fused"`` (CPU/Numba only): depthwise output produced a cache-sized block at a time and consumed by
  the pointwise GEMM straight away (:func:`fastconv.cpu.depthwise.separable_forward_fused`); the
  intermediate ``(N, M, OH, OW)`` tensor is never written to memory.
* ``"unfused"``: the two registered conv ops one after the other (any target).
* ``"auto"``: see :func:`choose_algo` (the rule and the measurements behind it).

Backward does not store the intermediate: it recomputes it with the depthwise ``fastconv::conv2d``
when the pointwise weight needs a gradient (one depthwise pass, the cheap half), and is made
entirely of ``fastconv::conv2d`` / ``conv2d_grad_input`` / ``conv2d_grad_weight`` ops, so double
backward (``gradgradcheck``) works through their own autograd.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import backends
from . import conv as conv_ops  # noqa: F401  (registers the conv ops the unfused path calls)
from . import precision, validation
from ._output import fresh

OP = "depthwise_separable_conv2d"
ALGOS = ("auto", "fused", "unfused")
_POINTWISE = ([1, 1], [0, 0], [0, 0], [1, 1])  # stride, padding, padding_end, dilation of the 1x1 conv

def depthwise_algo(target: str) -> str:
    """The conv algorithm used for the depthwise half: the dedicated Numba kernels on the CPU."""
    return "depthwise" if target == "numba" else "auto"


def choose_algo(algo: str, target: str) -> str:
    """Resolve ``algo`` ("auto", "fused" or "unfused") for this call.

    Rule for ``"auto"``: "fused" on the Numba (CPU) target, "unfused" elsewhere (the fused path has
    no CUDA kernel). Measured on the 2-core dev machine, one thread, minimum of 11 interleaved runs
    (the machine is shared; medians were 1.5-5x the minima), N=8, 3x3 pad 1, C -> K channels:

    =================  =========  =========  =========
    layer              torch      fused      unfused
    =================  =========  =========  =========
    256 -> 256, 28x28  44.5 ms    24.1 ms    60.7 ms
    32 -> 64, 112x112  26.4 ms    19.0 ms    71.9 ms
    512 -> 512, 14x14  23.0 ms    30.1 ms    23.5 ms
    =================  =========  =========  =========

    Fused won clearly on the two larger planes and lost on 512x14x14 (small intermediate, both GEMM
    bound). The evidence is weak: in a later pytest-benchmark run (median of 21) unfused was faster
    on 256 -> 256 28x28 (10.9 vs 13.4 ms); the unfused 1x1 conv runs through numpy's OpenBLAS, whose
    own thread pool makes it noisy on this shared machine. Re-measure on a quiet machine before
    refining the rule (for example a minimum intermediate size per image).
    """
    if algo == "fused" and target != "numba":
        raise ValueError(f"fastconv.{OP}: algo='fused' runs on CPU tensors with the numba backend only, not on "
                         f"target {target!r}; use algo='unfused' or 'auto'")
    if algo == "auto":
        return "fused" if target == "numba" else "unfused"
    if algo not in ALGOS:
        raise ValueError(f"fastconv.{OP}: unknown algo {algo!r}; expected one of {', '.join(ALGOS)}")
    return algo


@torch.library.custom_op(f"fastconv::{OP}", mutates_args=(), device_types=("cpu", "cuda"))
@validation.allocation_errors(OP)
@precision.compute_in_float32(OP)
def depthwise_separable_conv2d(input: Tensor, depthwise_weight: Tensor, pointwise_weight: Tensor,
                               depthwise_bias: Optional[Tensor], pointwise_bias: Optional[Tensor],
                               stride: list[int], padding: list[int], padding_end: list[int],
                               dilation: list[int], algo: str) -> Tensor:
    shape, empty_dtype, out_sp = validation.separable_op(OP, input, depthwise_weight, pointwise_weight,
                                                         depthwise_bias, pointwise_bias, stride, padding,
                                                         padding_end, dilation)
    if empty_dtype is not None:
        return input.new_zeros(shape, dtype=empty_dtype)
    target = backends.target_for(input)
    out_hw = out_sp
    stride = validation.conv_kernel_stride(stride, out_hw, input.shape[2:], depthwise_weight.shape[2:], padding,
                                           padding_end, dilation)
    dilation = validation.kernel_dilation(dilation, depthwise_weight.shape[2:])
    chosen = choose_algo(algo, target)
    C = input.shape[1]
    if chosen == "fused":
        from ..cpu import depthwise as kernels

        K, M = pointwise_weight.shape[:2]
        as_np = lambda t: None if t is None else t.detach().contiguous().numpy()  # noqa: E731
        y = kernels.separable_forward_fused(
            as_np(input).reshape(input.shape[0], C, 1, *input.shape[2:]),
            as_np(depthwise_weight).reshape(M, 1, 1, *depthwise_weight.shape[2:]),
            as_np(depthwise_bias), as_np(pointwise_weight).reshape(K, M), as_np(pointwise_bias),
            (1, *stride), (0, *padding), (1, *dilation), (1, *out_hw))
        return fresh(torch.from_numpy(y), (input.shape[0], K, *out_hw))
    z = torch.ops.fastconv.conv2d(input, depthwise_weight, depthwise_bias, stride, padding, padding_end,
                                  dilation, C, depthwise_algo(target))
    return torch.ops.fastconv.conv2d(z, pointwise_weight, pointwise_bias, *_POINTWISE, 1, "auto")


@depthwise_separable_conv2d.register_fake
def _(input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias, stride, padding,
      padding_end, dilation, algo):
    shape, empty_dtype, _ = validation.separable_op(OP, input, depthwise_weight, pointwise_weight, depthwise_bias,
                                                    pointwise_bias, stride, padding, padding_end, dilation)
    return input.new_empty(shape, dtype=empty_dtype or input.dtype)


def _setup(ctx, inputs, output):
    input, dw, pw, db, pb, stride, padding, padding_end, dilation, algo = inputs
    need_x, need_dw, need_pw, need_db, need_pb = ctx.needs_input_grad[:5]
    need_gz = need_x or need_dw or need_db
    # Saved: input (depthwise weight grad, or recomputing z for the pointwise weight grad), the depthwise
    # weight/bias (input grad, recomputation), the pointwise weight (gradient through the 1x1 conv).
    ctx.save_for_backward(input if (need_dw or need_pw) else None,
                          dw if (need_x or need_pw) else None,
                          db if need_pw else None,
                          pw if need_gz else None)
    ctx.geometry = (list(stride), list(padding), list(padding_end), list(dilation))
    ctx.channels = input.shape[1]
    ctx.input_size = list(input.shape[2:])
    ctx.kernel = list(dw.shape[2:])
    ctx.pointwise_size = [1, 1]
    ctx.target = backends.target_for(input)


def _backward(ctx, grad):
    input, dw, db, pw = ctx.saved_tensors
    need_x, need_dw, need_pw, need_db, need_pb = ctx.needs_input_grad[:5]
    geom, C = ctx.geometry, ctx.channels
    dalgo = depthwise_algo(ctx.target)
    gx = gdw = gpw = gdb = gpb = None
    if need_pb:
        gpb = grad.sum(dim=(0, 2, 3))
    if need_pw:
        # Recompute the intermediate instead of keeping it alive between forward and backward.
        z = torch.ops.fastconv.conv2d(input, dw, db, *geom, C, dalgo)
        gpw = torch.ops.fastconv.conv2d_grad_weight(grad, z, ctx.pointwise_size, *_POINTWISE, 1, "auto")
    if need_x or need_dw or need_db:
        gz = torch.ops.fastconv.conv2d_grad_input(grad, pw, list(grad.shape[2:]), *_POINTWISE, 1, "auto")
        if need_db:
            gdb = gz.sum(dim=(0, 2, 3))
        if need_x:
            gx = torch.ops.fastconv.conv2d_grad_input(gz, dw, ctx.input_size, *geom, C, dalgo)
        if need_dw:
            gdw = torch.ops.fastconv.conv2d_grad_weight(gz, input, ctx.kernel, *geom, C, dalgo)
    return gx, gdw, gpw, gdb, gpb, None, None, None, None, None


depthwise_separable_conv2d.register_autograd(_backward, setup_context=_setup)


@register_flop_formula(torch.ops.fastconv.depthwise_separable_conv2d)
def _(input_shape, depthwise_weight_shape, pointwise_weight_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs = 2 x MACs of the two convolutions, bias adds not counted (as torch's conv formula):
    depthwise N*M*OH*OW*KH*KW plus pointwise N*K*OH*OW*M."""
    n, k = out_shape[0], out_shape[1]
    positions = math.prod(out_shape[2:])
    m = depthwise_weight_shape[0]
    depthwise = n * m * positions * math.prod(depthwise_weight_shape[2:])
    pointwise = n * k * positions * m
    return 2 * (depthwise + pointwise)
