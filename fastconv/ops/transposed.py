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

One extra CPU algorithm lives here, for transposed convs only: ``"patch_gemm"``
(:mod:`fastconv.cpu.transposed_gemm`), for kernel == stride, no padding, dilation 1 (U-Net's
2x2/stride-2 up-convolution): the output windows do not overlap, so the forward is one GEMM plus a
scatter with no accumulation. ``algo="auto"`` takes it on the ``"numba"`` target when it applies
(before the registry's heuristic or autotuner is asked: 1.25-1.8x faster than torch in our runs).
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

#: Algorithm names only the transposed ops accept (not in the shared conv registry, because they
#: implement no convolution pass of their own: see :mod:`fastconv.cpu.transposed_gemm`).
TRANSPOSED_ONLY_ALGOS = ("patch_gemm",)


def algo_names() -> list[str]:
    """Every ``algo`` the transposed ops accept: the registry's names plus the transposed-only ones."""
    return registry.names() + list(TRANSPOSED_ONLY_ALGOS)


def patch_gemm_refusal(kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                       dilation: Sequence[int], target: str) -> Optional[str]:
    """Why ``patch_gemm`` cannot run a transposed conv, or None when it can."""
    if target != "numba":
        return f"runs on numba, not {target}"
    if tuple(kernel) != tuple(stride):
        return f"needs kernel == stride (non-overlapping windows), got kernel={tuple(kernel)}, stride={tuple(stride)}"
    if any(p != 0 for p in padding):
        return f"needs padding=0, got {tuple(padding)}"
    if any(d != 1 for d in dilation):
        return f"needs dilation=1, got {tuple(dilation)}"
    return None


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
    # The backward passes run through the conv ops, which know only the registry's names.
    return "auto" if algo in TRANSPOSED_ONLY_ALGOS else algo


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
        # The adjoint convolution: input (N, C_out, *O) -> output (N, C_in, *I), weight (C_in, C_out/g, *k).
        geom = make_geometry(ndim, input.shape[0], weight.shape[1] * groups, weight.shape[0], groups,
                             out_spatial, weight.shape[spatial], input.shape[spatial], stride, padding, padding,
                             dilation, input.dtype, target)
        x5, w5 = _as_5d(input), _as_5d(weight)
        use_gemm = algo == "patch_gemm" or (algo == "auto" and patch_gemm_refusal(
            weight.shape[spatial], stride, padding, dilation, target) is None)
        if use_gemm:
            reason = patch_gemm_refusal(weight.shape[spatial], stride, padding, dilation, target)
            if reason is not None:
                raise ValueError(f"fastconv.{name}: algo='patch_gemm' cannot run this transposed convolution ({reason}). "
                                 f"Use algo='auto', which picks a registry algorithm (see fastconv.algorithms())")
            from ..cpu import transposed_gemm

            out = transposed_gemm.forward(x5, w5, bias, geom)
            # The scatter added the bias already.
            return fresh(out, (geom.batch, geom.in_channels, *out_spatial))
        try:
            alg = registry.choose(algo, geom, "grad_input", name)
        except ValueError as e:
            # The registry describes the adjoint convolution; say so, or "in_channels" reads wrong.
            raise ValueError(f"{e} (for a transposed convolution the registry sees the adjoint convolution: "
                             f"its in_channels are this op's out_channels and its input is this op's "
                             f"output)") from None
        out = alg.grad_input(x5, w5, geom)
        out = fresh(out, (geom.batch, geom.in_channels, *out_spatial))
        if bias is not None:
            # In place on a freshly allocated result: no second output-sized buffer.
            out.add_(bias.reshape((1, -1) + (1,) * ndim))
        return out

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
