"""Registered ops ``fastconv::conv{1,2,3}d_bias_act``: a convolution with its bias add and activation fused.

``fastconv::conv{d}d_bias_act(input, weight, bias, stride, padding, padding_end, dilation, groups, algo,
activation)``
    input (N, C, *S), weight (K, C/groups, *R), bias (K,) or None -> (N, K, *O),
    equal to ``act(conv{d}d(input, weight, bias, ...))`` with ``act`` one of :data:`ACTIVATIONS`:
    ``"none"`` (identity), ``"relu"`` (``torch.relu``), ``"relu6"`` (``torch.nn.functional.relu6``).

The arguments are those of ``fastconv::conv{d}d`` (normalised by :mod:`fastconv.functional`) plus
``activation``, and are validated by the same checks (:func:`fastconv.ops.validation.conv_op`), so an error
names the argument with torch's exception type; an unknown activation is a ValueError listing the valid ones.

Where it runs:

* Numba target (CPU tensors): the chosen conv algorithm computes the convolution *without* bias, then
  :func:`fastconv.cpu.epilogue.bias_act_` adds the bias and applies the activation in one parallel pass over
  the output buffer, in place (one pass instead of the bias broadcast plus ``torch.relu``'s read and write).
* CUDA and the CUDA harness (``cuda``, ``cuda-emu``): the conv kernels add the bias themselves, then torch's
  in-place activation (``relu_`` / ``clamp_(0, 6)``) runs on the output; no CUDA epilogue kernel exists yet.

float16/bfloat16 are computed in float32 and rounded once (:mod:`fastconv.ops.precision`), on every target.

Autograd: with ``y`` the op's output, the gradient reaching the convolution is ``g`` where the activation
passes its input (relu: ``y > 0``; relu6: ``0 < y < 6``; none: everywhere; a NaN output passes the gradient,
as torch's ``threshold_backward``/``hardtanh_backward`` do), then the conv's own gradient ops
(``fastconv::conv{d}d_grad_input`` / ``_grad_weight``; bias: a sum). Those ops have autograd of their own,
so double backward works (the activation's mask is piecewise constant: its derivative is zero).
vmap uses the conv's batching rule; forward-mode AD is refused by name (:mod:`fastconv.ops.func`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import backends, registry
from ..cpu import epilogue
from . import conv as conv_ops  # the gradient ops the backward calls
from . import eager, precision, validation
from ._layout import empty_result, op_result, result_format
from ._output import fresh
from .conv import DIMS, _as_5d, make_geometry

#: The activations the fused ops apply, in the order error messages list them.
ACTIVATIONS = tuple(epilogue.ACTIVATIONS)


def check_activation(op: str, activation) -> str:
    """``activation`` must be one of :data:`ACTIVATIONS`: ValueError naming it and listing them otherwise."""
    if not isinstance(activation, str) or activation not in epilogue.ACTIVATIONS:
        raise ValueError(f"fastconv.{op}: unknown activation {activation!r}; expected one of "
                         f"{', '.join(repr(a) for a in ACTIVATIONS)}")
    return activation


def _torch_activation_(out: Tensor, activation: str) -> None:
    """The activation in place with torch's own ops (the CUDA targets): NaN passes through both."""
    if activation == "relu":
        out.relu_()
    elif activation == "relu6":
        out.clamp_(0, 6)


#: call signature -> (geometry, algorithm or None, result shape, registry generation): validation, the
#: geometry and a named algorithm are resolved once per distinct call (a model repeats its layers' calls).
_PLANS: dict = {}
PLANS_MAX = 4096


def _register(ndim: int):
    name = f"conv{ndim}d_bias_act"
    conv_name = f"conv{ndim}d"
    spatial = slice(2, 2 + ndim)
    _, grad_input_op, grad_weight_op = conv_ops.OPS[ndim]

    def forward_plan(input, weight, bias, stride, padding, padding_end, dilation, groups, algo, activation):
        """Validate a call and build its plan, or return its (kernel-free, empty) result."""
        check_activation(name, activation)
        shape, empty_dtype, out_sp = validation.conv_op(name, ndim, input, weight, bias, stride, padding,
                                                        padding_end, dilation, groups)
        if empty_dtype is not None:
            # N == 0 or C == 0: the result is empty ((0, K, *O) or aten's (N, 0, *O)): nothing to activate
            return op_result(input.new_zeros(shape, dtype=empty_dtype), result_format(input, weight))
        xs, ks = input.shape, weight.shape[spatial]
        stride = validation.conv_kernel_stride(stride, out_sp, xs[spatial], ks, padding, padding_end, dilation)
        dilation = validation.kernel_dilation(dilation, ks)
        geom = make_geometry(ndim, xs[0], xs[1], shape[1], groups, xs[spatial], ks, out_sp, stride, padding,
                             padding_end, dilation, input.dtype, backends.target_for(input))
        # the conv's algorithm choice (and its refusal by name) is the plain conv's: same geometry, same op name
        alg = None if algo == "auto" else registry.choose(algo, geom, "forward", conv_name)
        return geom, alg, tuple(shape), registry.generation()

    @torch.library.custom_op(f"fastconv::{name}", mutates_args=(), device_types=("cpu", "cuda"))
    @eager.keep_implementation(IMPLEMENTATIONS, ndim)
    @validation.allocation_errors(name)
    @precision.compute_in_float32(name)
    def conv_bias_act(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
                      padding: list[int], padding_end: list[int], dilation: list[int], groups: int, algo: str,
                      activation: str) -> Tensor:
        key = (input.shape, weight.shape, input.dtype, weight.dtype, input.device, weight.device,
               None if bias is None else (bias.shape, bias.dtype, bias.device), tuple(stride), tuple(padding),
               tuple(padding_end), tuple(dilation), groups, algo, activation, backends.target_for(input))
        plan = _PLANS.get(key)
        if plan is None or plan[3] != registry.generation():
            plan = forward_plan(input, weight, bias, stride, padding, padding_end, dilation, groups, algo,
                                activation)
            if isinstance(plan, Tensor):
                return plan
            if len(_PLANS) >= PLANS_MAX:
                _PLANS.clear()
            _PLANS[key] = plan
        geom, alg, out_shape, _ = plan
        if alg is None:
            alg = registry.choose(algo, geom, "forward", conv_name)
        keep = "channels_last" in alg.layouts
        x, w = _as_5d(input, keep), _as_5d(weight, keep)
        if geom.target == "numba":
            out = alg.forward(x, w, None, geom)
            epilogue.bias_act_(out.detach().numpy(), None if bias is None else bias.detach().numpy(), activation)
        else:
            out = alg.forward(x, w, None if bias is None else bias.contiguous(), geom)
            _torch_activation_(out, activation)
        return op_result(fresh(out, out_shape), result_format(input, weight))

    @conv_bias_act.register_fake
    def _(input, weight, bias, stride, padding, padding_end, dilation, groups, algo, activation):
        check_activation(name, activation)
        shape, empty_dtype, _ = validation.conv_op(name, ndim, input, weight, bias, stride, padding, padding_end,
                                                   dilation, groups)
        return empty_result(input, shape, empty_dtype or input.dtype, result_format(input, weight))

    def setup(ctx, inputs, output):
        input, weight, bias, stride, padding, padding_end, dilation, groups, algo, activation = inputs
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # the output is kept only for the activation's mask; the input only for the weight's gradient
        ctx.save_for_backward(input if need_weight else None, weight if need_input else None,
                              output if activation != "none" else None)
        ctx.geometry = (stride, padding, padding_end, dilation, groups, algo)
        ctx.activation = activation
        ctx.input_size = list(input.shape[spatial])
        ctx.weight_size = list(weight.shape[spatial])
        ctx.has_bias = bias is not None
        # aten's zero-channel result is (N, 0, *O): no gradient op takes it, and every gradient is zero
        ctx.zero_channels = input.shape[1] == 0
        if ctx.zero_channels:
            ctx.meta = [(t.shape, t.dtype, t.device) if t is not None else None for t in (input, weight, bias)]

    def backward(ctx, grad):
        if ctx.zero_channels:
            zeros = [None if m is None or not need else torch.zeros(m[0], dtype=m[1], device=m[2])
                     for m, need in zip(ctx.meta, ctx.needs_input_grad[:3])]
            return (*zeros, None, None, None, None, None, None, None)
        input, weight, out = ctx.saved_tensors
        if ctx.activation != "none":
            y = out.detach()
            # torch's threshold_backward / hardtanh_backward zero the gradient where y <= 0 (and y >= 6):
            # written as "not blocked" so a NaN output passes the gradient, as theirs does
            blocked = y <= 0 if ctx.activation == "relu" else (y <= 0) | (y >= 6)
            grad = grad.masked_fill(blocked, 0)
        g = ctx.geometry
        gi = gw = gb = None
        if ctx.needs_input_grad[0]:
            gi = grad_input_op(grad, weight, ctx.input_size, *g)
        if ctx.needs_input_grad[1]:
            gw = grad_weight_op(grad, input, ctx.weight_size, *g)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(dim=[0, *range(2, grad.dim())])
        return gi, gw, gb, None, None, None, None, None, None, None

    conv_bias_act.register_autograd(backward, setup_context=setup)

    # FLOPs = 2 x MACs, bias adds and the activation not counted (as the plain conv's formula)
    @register_flop_formula(getattr(torch.ops.fastconv, name))
    def _(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(out_shape) * math.prod(weight_shape[1:])

    return conv_bias_act


#: ndim -> the op's implementation, undecorated by torch.library: what the op runs on CPU and CUDA tensors,
#: called directly only where :func:`fastconv.ops.eager.direct_ok` allows (filled by ``_register``).
IMPLEMENTATIONS: dict = {}

OPS = {ndim: _register(ndim) for ndim in DIMS}


def _register_vmap() -> None:
    """vmap: the conv's rule (:mod:`fastconv.ops.batching`: fold the vmap dim into N, or into groups when the
    weights are batched); the activation is elementwise, so it commutes with either fold."""
    from . import batching

    for ndim in DIMS:
        op = getattr(torch.ops.fastconv, f"conv{ndim}d_bias_act").default

        def rule(info, in_dims, input, weight, bias, stride, padding, padding_end, dilation, groups, algo,
                 activation, op=op):
            conv_rule = batching._conv_rule(lambda *args: op(*args, activation))
            return conv_rule(info, in_dims[:-1], input, weight, bias, stride, padding, padding_end, dilation, groups,
                             algo)

        torch.library.register_vmap(op, rule)


_register_vmap()
