"""Registered op ``fastconv::depthwise_separable_conv2d``: depthwise k x k, then 1x1 pointwise (MobileNet).

``fastconv::depthwise_separable_conv2d(input, depthwise_weight, pointwise_weight, depthwise_bias,
pointwise_bias, stride, padding, padding_end, dilation, algo)``
    input (N, C, H, W), depthwise_weight (M, 1, KH, KW) with M = m*C, pointwise_weight (K, M, 1, 1),
    depthwise_bias (M,) or None, pointwise_bias (K,) or None -> (N, K, OH, OW)

Equal to ``conv2d(conv2d(input, depthwise_weight, depthwise_bias, groups=C), pointwise_weight,
pointwise_bias)``. Arguments arrive normalised by :mod:`fastconv.functional` (2 ints each; ``padding``
before and ``padding_end`` after each spatial dim).

``algo`` (family ``"separable"`` of :mod:`fastconv.registry`; ``registry.decide(..., family="separable")``
says which runs without running it):

* ``"fused"`` (CPU/Numba only, declared in :mod:`fastconv.cpu.algorithms`): depthwise output produced a
  cache-sized block at a time and consumed by the pointwise GEMM straight away
  (:func:`fastconv.cpu.depthwise.separable_forward_fused`); the intermediate ``(N, M, OH, OW)`` tensor is
  never written to memory.
* ``"unfused"`` (declared here: :data:`UNFUSED`): the two registered conv ops one after the other (any target).
* ``"auto"``: the first declared implementation that runs the call -- ``fused`` on the Numba target,
  ``unfused`` elsewhere (the measurements behind the rule are beside ``SEPARABLE_FUSED``).

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

from .. import backends, registry
from ..spec import OpImplementation, SeparableGeometry
from . import conv as conv_ops  # noqa: F401  (registers the conv ops the unfused path calls)
from . import precision, validation
from .conv import make_geometry

OP = "depthwise_separable_conv2d"
FAMILY = "separable"
_POINTWISE = ([1, 1], [0, 0], [0, 0], [1, 1])  # stride, padding, padding_end, dilation of the 1x1 conv


def algo_names() -> list[str]:
    """Every ``algo`` the op accepts: ``"auto"`` and the registered ``separable`` implementations."""
    return registry.names(FAMILY)


def depthwise_algo(target: str) -> str:
    """The conv algorithm used for the depthwise half: the dedicated Numba kernels on the CPU."""
    return "depthwise" if target == "numba" else "auto"


def geometry(input_shape, depthwise_weight_shape, pointwise_weight_shape, out_hw, stride, padding, padding_end,
             dilation, dtype: torch.dtype, target: str) -> SeparableGeometry:
    """The call as the ``separable`` family's implementations and the counter see it."""
    c = input_shape[1]
    depthwise = make_geometry(2, input_shape[0], c, depthwise_weight_shape[0], c, input_shape[2:],
                              depthwise_weight_shape[2:], out_hw, stride, padding, padding_end, dilation, dtype,
                              target)
    return SeparableGeometry(depthwise, int(pointwise_weight_shape[0]))


def _unfused(x: Tensor, dw: Tensor, pw: Tensor, db: Optional[Tensor], pb: Optional[Tensor],
             g: SeparableGeometry) -> Tensor:
    d = g.depthwise
    spatial = slice(1, 3)  # the 2-D conv's (H, W) of the 3-D normalised geometry
    z = torch.ops.fastconv.conv2d(x, dw, db, list(d.stride[spatial]), list(d.padding[spatial]),
                                  list(d.padding_end[spatial]), list(d.dilation[spatial]), d.groups,
                                  depthwise_algo(d.target))
    return torch.ops.fastconv.conv2d(z, pw, pb, *_POINTWISE, 1, "auto")


#: ``unfused``: the depthwise then the pointwise ``fastconv::conv2d`` op, on every target (a composition of
#: registered ops, so it is declared here in the op layer; :mod:`fastconv.ops.catalog` registers it after
#: the kernel modules' ``fused``, which ``algo='auto'`` therefore prefers where it runs).
UNFUSED = OpImplementation(
    "unfused", FAMILY, frozenset({"numba", "cuda", "cuda-emu"}),
    "depthwise-separable conv as the depthwise fastconv::conv2d, then the 1x1 one (intermediate written whole)",
    _unfused)
#: The op layer's declarations (registered by :mod:`fastconv.ops.catalog`).
ALGORITHMS = [UNFUSED]


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
    geom = geometry(input.shape, depthwise_weight.shape, pointwise_weight.shape, out_hw, stride, padding,
                    padding_end, dilation, input.dtype, target)
    impl = registry.choose(algo, geom, "forward", f"fastconv.{OP}", FAMILY)
    # Both implementations return a tensor of its own (not a view), shaped (N, K, OH, OW).
    return impl.run(input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias, geom)


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
