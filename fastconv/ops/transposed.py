"""Registered transposed-convolution ops: ``fastconv::conv_transpose{1,2,3}d``.

``fastconv::conv_transpose{d}d(input, weight, bias, stride, padding, output_padding, dilation, groups, algo)``
    input (N, C_in, *I), weight (C_in, C_out/groups, *k), bias (C_out,) or None -> (N, C_out, *O)
    with O = (I - 1)*stride - 2*padding + dilation*(k - 1) + output_padding + 1 per spatial dim.

The general path has no kernel of its own: a transposed convolution is the adjoint of the convolution that maps a
(N, C_out, *O) tensor back to (N, C_in, *I) with the same stride, padding, dilation and groups, and
with the transposed conv's weight as its (K = C_in, C_out/groups, *k) weight. Its forward is
therefore that convolution's input gradient, run by the registry's ``grad_input`` pass of the chosen
algorithm (``output_padding`` only makes O longer; the extra positions get whatever taps reach them).
Its derivatives are the other two passes of the same convolution, taken from the registered ops of
:mod:`fastconv.ops.conv`:

* d/d input  = ``conv{d}d(grad_output, weight)``                (the adjoint conv's forward)
* d/d weight = ``conv{d}d_grad_weight(grad_output=input, input=grad_output)``
* d/d bias   = sum of grad_output over batch and space

Those ops carry their own autograd, so double backward works.

The forward asks the registry for family ``"conv_transpose"`` (:func:`fastconv.registry.choose`): every conv
algorithm, run as the adjoint's ``grad_input``, plus the declared transposed-only implementations -- on the
CPU ``"patch_gemm"`` (:mod:`fastconv.cpu.transposed_gemm`), for kernel == stride, no padding, dilation 1
(U-Net's 2x2/stride-2 up-convolution): the output windows do not overlap, so the forward is one GEMM plus
a scatter with no accumulation. ``algo="auto"`` takes a declared implementation wherever it runs (before the
conv registry's heuristic or autotuner is asked), else the conv choice for the adjoint's ``grad_input``;
``registry.decide(..., family="conv_transpose")`` says which without running it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import backends, registry
from . import conv as conv_ops
from . import precision, validation
from ._output import fresh
from .conv import DIMS, _as_5d, make_geometry
from .validation import transposed_output_size  # noqa: F401  (re-exported: one definition)

FAMILY = "conv_transpose"


def algo_names() -> list[str]:
    """Every ``algo`` the transposed ops accept: the conv registry's names plus the transposed-only ones."""
    return registry.names(FAMILY)


def geometry(ndim: int, input_shape, weight_shape, out_spatial, groups: int, stride, padding, dilation,
             dtype: torch.dtype, target: str) -> registry.ConvGeometry:
    """The adjoint convolution of a transposed conv -- input (N, C_out, *O) -> output (N, C_in, *I), weight
    (C_in, C_out/groups, *k) -- what the ``conv_transpose`` family's implementations and the counter see."""
    return make_geometry(ndim, input_shape[0], weight_shape[1] * groups, weight_shape[0], groups, out_spatial,
                         weight_shape[2:], input_shape[2:], stride, padding, padding, dilation, dtype, target)


def adjoint_padding_end(padding: Sequence[int], output_padding: Sequence[int], stride: Sequence[int]
                        ) -> tuple[list[int], list[int]]:
    """Padding after each dim of the adjoint conv, and how many trailing output positions to crop first.

    The backward passes run the adjoint conv (O -> I) through the conv ops, whose shapes follow the
    conv size formula. With output_padding < stride, symmetric padding gives exactly I. torch also
    allows output_padding >= stride when it is < dilation; then the formula would give more than I
    windows, so the padding after is reduced by ``output_padding - stride + 1``, and where that would
    go negative the trailing output positions are cropped instead: they are beyond every window
    (the last ``output_padding - padding`` positions are), so no gradient is lost.
    """
    ends, crops = [], []
    for p, op, s in zip(padding, output_padding, stride):
        end = p - max(0, op - s + 1)
        ends.append(max(end, 0))
        crops.append(max(-end, 0))
    return ends, crops


def _conv_algo(algo: str) -> str:
    # The backward passes run through the conv ops, which know only the conv registry's names.
    return "auto" if algo in registry.declared_names(FAMILY) else algo


def _register(ndim: int):
    name = f"conv_transpose{ndim}d"
    spatial = slice(2, 2 + ndim)
    conv_fwd, conv_grad_input, conv_grad_weight = conv_ops.OPS[ndim]

    @torch.library.custom_op(f"fastconv::{name}", mutates_args=(), device_types=("cpu", "cuda"))
    @validation.allocation_errors(name)
    @precision.compute_in_float32(name)
    def conv_transpose(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
                       padding: list[int], output_padding: list[int], dilation: list[int], groups: int,
                       algo: str) -> Tensor:
        shape, empty_dtype, out_sp = validation.conv_transpose_op(name, ndim, input, weight, bias, stride, padding,
                                                                  output_padding, dilation, groups)
        if empty_dtype is not None:
            return input.new_zeros(shape, dtype=empty_dtype)
        out_spatial = out_sp
        target = backends.target_for(input)
        # One input position: the stride selects nothing (torch accepts any int64; kernels loop over phases).
        stride = validation.single_window_stride(stride, input.shape[spatial],
                                                 [max(o + 1, k) for o, k in zip(output_padding, weight.shape[spatial])])
        dilation = validation.kernel_dilation(dilation, weight.shape[spatial])
        geom = geometry(ndim, input.shape, weight.shape, out_spatial, groups, stride, padding, dilation,
                        input.dtype, target)
        impl = registry.choose(algo, geom, "forward", f"fastconv.{name}", FAMILY)
        # patch_gemm's scatter or the adjoint's grad_input plus the bias: (N, C_out, *O), bias included.
        out = impl.run(_as_5d(input), _as_5d(weight), bias, geom)
        return fresh(out, (geom.batch, geom.in_channels, *out_spatial))

    @conv_transpose.register_fake
    def _(input, weight, bias, stride, padding, output_padding, dilation, groups, algo):
        shape, empty_dtype, _ = validation.conv_transpose_op(name, ndim, input, weight, bias, stride, padding,
                                                             output_padding, dilation, groups)
        return input.new_empty(shape, dtype=empty_dtype or input.dtype)

    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, output_padding, dilation, groups, algo = inputs
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Save only what the requested gradients need: a frozen weight keeps no input alive.
        ctx.save_for_backward(input if need_weight else None, weight if need_input else None)
        padding_end, ctx.crop = adjoint_padding_end(padding, output_padding, stride)
        ctx.geometry = (list(stride), list(padding), padding_end, list(dilation), groups, _conv_algo(algo))
        ctx.weight_size = list(weight.shape[spatial])
        ctx.has_bias = bias is not None
        # Batch 0: every gradient is zero; the adjoint ops may not even take these shapes (an empty input
        # plane gives an output shorter than the kernel) or dtypes (torch's empty path mixes them).
        ctx.empty = input.shape[0] == 0
        if ctx.empty:
            ctx.meta = [(t.shape, t.dtype, t.device) if t is not None else None for t in (input, weight, bias)]

    def backward(ctx, grad):
        if ctx.empty:
            zeros = [None if m is None or not need else torch.zeros(m[0], dtype=m[1], device=m[2])
                     for m, need in zip(ctx.meta, ctx.needs_input_grad[:3])]
            return (*zeros, None, None, None, None, None, None)
        input, weight = ctx.saved_tensors
        gi = gw = gb = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            # Before any crop: the bias reaches every output position, window or not.
            gb = grad.sum(dim=[0, *range(2, grad.dim())])
        if any(ctx.crop):
            # Trailing output positions no window reaches (their gradient is ignored anyway).
            grad = grad[(slice(None), slice(None)) + tuple(slice(0, n - c) for n, c in zip(grad.shape[2:], ctx.crop))]
        if ctx.needs_input_grad[0]:
            gi = conv_fwd(grad, weight, None, *ctx.geometry)
        if ctx.needs_input_grad[1]:
            gw = conv_grad_weight(input, grad, ctx.weight_size, *ctx.geometry)
        return gi, gw, gb, None, None, None, None, None, None

    conv_transpose.register_autograd(backward, setup_context=setup_context)

    # torch's FlopCounterMode rule for transposed convs: the work follows the INPUT's spatial size,
    # 2 * N * prod(I) * C_in * (C_out/groups) * prod(k); bias adds not counted.
    @register_flop_formula(getattr(torch.ops.fastconv, name))
    def _(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * input_shape[0] * math.prod(input_shape[2:]) * math.prod(weight_shape)

    return conv_transpose


OPS = {ndim: _register(ndim) for ndim in DIMS}
