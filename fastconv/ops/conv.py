"""Registered convolution ops: ``fastconv::conv{1,2,3}d`` and their gradient ops.

For each spatial rank d in 1, 2, 3 this module registers three ``torch.library.custom_op`` ops:

``fastconv::conv{d}d(input, weight, bias, stride, padding, padding_end, dilation, groups, algo)``
    input (N, C, *S), weight (K, C/groups, *R), bias (K,) or None -> (N, K, *O)
``fastconv::conv{d}d_grad_input(grad_output, weight, input_size, stride, ..., algo)``
    grad_output (N, K, *O) -> (N, C, *input_size)
``fastconv::conv{d}d_grad_weight(grad_output, input, weight_size, stride, ..., algo)``
    grad_output (N, K, *O), input (N, C, *S) -> (K, C/groups, *weight_size)

All arguments arrive normalised by :mod:`fastconv.functional` (lists of d ints; ``padding`` before and
``padding_end`` after each spatial dim). Each op has a fake (shape) implementation, a FLOP formula, and
autograd whose backward is made of the other two ops, so double backward works too: the three ops are
the bilinear forms of one convolution and each one's derivatives are the other two.

The transposed convolutions (:mod:`fastconv.ops.transposed`) reuse these ops: a transposed conv's
forward is ``conv_grad_input``.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import backends, registry
from ..spec import CONTIGUOUS_ROUTE
from . import eager, precision, validation
from ._layout import empty_result, op_result, result_format
from ._output import fresh
from .validation import SUPPORTED_DTYPES, conv_output_size  # noqa: F401  (re-exported: one definition each)

DIMS = (1, 2, 3)


# --------------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------------
def _triple(values: Sequence[int], fill: int) -> tuple[int, int, int]:
    """Left-fill a list of 1-3 spatial values to 3 (a 2-D conv is a 3-D conv of depth 1)."""
    values = tuple(int(v) for v in values)
    return (fill,) * (3 - len(values)) + values


def make_geometry(ndim: int, batch: int, in_channels: int, out_channels: int, groups: int,
                  in_spatial: Sequence[int], kernel: Sequence[int], out_spatial: Optional[Sequence[int]],
                  stride, padding, padding_end, dilation, dtype: torch.dtype, target: str
                  ) -> registry.ConvGeometry:
    """Build the normalised :class:`~fastconv.registry.ConvGeometry` (out_spatial computed if None).

    Memoised: a model calls each layer's geometry again and again, and building it costs about 10 µs
    of a call's host time (a GPU layer's whole budget is 60 µs).
    """
    return _geometry(int(ndim), int(batch), int(in_channels), int(out_channels), int(groups),
                     tuple(int(v) for v in in_spatial), tuple(int(v) for v in kernel),
                     None if out_spatial is None else tuple(int(v) for v in out_spatial),
                     tuple(int(v) for v in stride), tuple(int(v) for v in padding),
                     tuple(int(v) for v in padding_end), tuple(int(v) for v in dilation), dtype, target)


@functools.lru_cache(maxsize=4096)
def _geometry(ndim, batch, in_channels, out_channels, groups, in_spatial, kernel, out_spatial, stride, padding,
              padding_end, dilation, dtype, target) -> registry.ConvGeometry:
    if out_spatial is None:
        out_spatial = [conv_output_size(i, k, s, pb, pe, d) for i, k, s, pb, pe, d
                       in zip(in_spatial, kernel, stride, padding, padding_end, dilation)]
    return registry.ConvGeometry(
        ndim=ndim, batch=batch, in_channels=in_channels, out_channels=out_channels, groups=groups,
        in_spatial=_triple(in_spatial, 1), kernel=_triple(kernel, 1), out_spatial=_triple(out_spatial, 1),
        stride=_triple(stride, 1), padding=_triple(padding, 0), padding_end=_triple(padding_end, 0),
        dilation=_triple(dilation, 1), dtype=dtype, target=target)


def _as_5d(t: Tensor, any_strides: bool = False) -> Tensor:
    """(N, C, *S) with 1-3 spatial dims -> contiguous (N, C, D, H, W) (a view when ``t`` is contiguous).

    ``any_strides``: the algorithm reads any layout itself (it declares ``"channels_last"`` in its
    ``layouts``), so a channels_last tensor is handed over as it is instead of copied to NCDHW."""
    if not (any_strides or t.is_contiguous()):
        t = t.contiguous()
    dim = t.dim()
    if dim == 4:  # unsqueeze: the cheapest view (no shape tuple to build)
        return t.unsqueeze(2)
    while dim < 5:
        t = t.unsqueeze(2)
        dim += 1
    return t


# --------------------------------------------------------------------------------------------------
# contiguous routes
# --------------------------------------------------------------------------------------------------
#: Operand dtypes an algorithm's contiguous route takes (a pass's ``contiguous_route``, see ``ConvAlgorithm``).
#: Why the ops take the route when every operand is contiguous: the tensor pass's way costs a small call 30 µs
#: more (5-D views of the operands, the result's reshape and ``detach``, the layout check), a third of a batch-1
#: depthwise conv's host time. Contiguous operands need none of it: their result is contiguous, in the format the
#: op promises (:func:`result_format` suggests nothing for contiguous tensors).
_ROUTE_DTYPES = (torch.float32, torch.float64)


def _routed(tensor_pass, geom: registry.ConvGeometry, out_shape: tuple, operands: tuple) -> Optional[Tensor]:
    """The op's result by ``tensor_pass``'s contiguous route, or None when the pass itself must run: no route
    for ``geom``, an operand (None skipped) not contiguous or of another dtype, or a call the route leaves."""
    select = getattr(tensor_pass, CONTIGUOUS_ROUTE, None)
    route = None if select is None else select(geom)
    if route is None or operands[0].dtype not in _ROUTE_DTYPES:
        return None
    for t in operands:
        if t is not None and not t.is_contiguous():
            return None
    return route(*operands, geom, out_shape)


# --------------------------------------------------------------------------------------------------
# per-call plans
# --------------------------------------------------------------------------------------------------
#: call signature -> (geometry, algorithm or None, result shape, registry generation). A model calls each
#: layer with the same shapes, dtypes, devices and arguments again and again; validating them, building
#: the geometry and resolving a named algorithm cost most of a small call's host time (the GPU budget is
#: 60 µs per call). The key holds everything those steps read, so a hit is exactly the call that was
#: checked before. ``algo="auto"`` keeps asking :func:`registry.choose` (the autotuner may re-measure).
_PLANS: dict = {}
#: Entries kept; when full the table starts over (a model has tens to hundreds of distinct calls).
PLANS_MAX = 4096


def _remember(key, plan: tuple) -> None:
    if len(_PLANS) >= PLANS_MAX:
        _PLANS.clear()
    _PLANS[key] = plan


def forward_key(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, padding_end, dilation,
                groups: int, algo: str) -> tuple:
    """The :data:`_PLANS` key of a forward call (any rank): everything its validation and plan read."""
    return (0, input.shape, weight.shape, input.dtype, weight.dtype, input.device, weight.device,
            None if bias is None else (bias.shape, bias.dtype, bias.device), tuple(stride), tuple(padding),
            tuple(padding_end), tuple(dilation), groups, algo, backends.target_for(input))


def forward_plan_of(key: tuple) -> Optional[tuple]:
    """The current plan stored under :func:`forward_key`'s ``key`` (None: none, or one from an older registry)."""
    plan = _PLANS.get(key)
    return plan if plan is not None and plan[3] == registry.generation() else None


def _plan(geom: registry.ConvGeometry, algo: str, pass_: str, op: str, out_shape: tuple) -> tuple:
    """A plan for ``geom``: a named algorithm is resolved (and refused, if it must be) now, once.

    (geometry, algorithm or None for ``auto``, result shape, registry generation, the algorithm reads
    channels_last tensors as they are)."""
    alg = None if algo == "auto" else registry.choose(algo, geom, pass_, op)
    return geom, alg, tuple(out_shape), registry.generation(), alg is not None and "channels_last" in alg.layouts


# --------------------------------------------------------------------------------------------------
# op factory
# --------------------------------------------------------------------------------------------------
def _register(ndim: int):
    name = f"conv{ndim}d"
    spatial = slice(2, 2 + ndim)

    def forward_plan(input, weight, bias, stride, padding, padding_end, dilation, groups, algo):
        """Validate a forward call and build its plan, or return its (kernel-free) empty result."""
        shape, empty_dtype, out_sp = validation.conv_op(name, ndim, input, weight, bias, stride, padding,
                                                        padding_end, dilation, groups)
        if empty_dtype is not None:
            if algo != "auto" and input.shape[1] > 0 and input.dtype == weight.dtype:
                # no kernel runs, but an algorithm that cannot run this geometry is still refused by name
                registry.choose(algo, make_geometry(ndim, 0, input.shape[1], shape[1], groups, input.shape[spatial],
                                                    weight.shape[spatial], out_sp, stride, padding, padding_end,
                                                    dilation, input.dtype, backends.target_for(input)),
                                "forward", name)
            return op_result(input.new_zeros(shape, dtype=empty_dtype), result_format(input, weight))
        xs, ks = input.shape, weight.shape[spatial]
        stride = validation.conv_kernel_stride(stride, out_sp, xs[spatial], ks, padding, padding_end, dilation)
        dilation = validation.kernel_dilation(dilation, ks)
        geom = make_geometry(ndim, xs[0], xs[1], shape[1], groups, xs[spatial], ks, out_sp,
                             stride, padding, padding_end, dilation, input.dtype, backends.target_for(input))
        return _plan(geom, algo, "forward", name, (geom.batch, geom.out_channels) + geom.out_spatial[3 - ndim:])

    @torch.library.custom_op(f"fastconv::{name}", mutates_args=(), device_types=("cpu", "cuda"))
    @eager.keep_implementation(IMPLEMENTATIONS, ndim)
    @validation.allocation_errors(name)
    @precision.compute_in_float32(name)
    def conv(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
             padding_end: list[int], dilation: list[int], groups: int, algo: str) -> Tensor:
        # The hot path of every conv call: one key lookup, then the kernel (see _PLANS).
        key = forward_key(input, weight, bias, stride, padding, padding_end, dilation, groups, algo)
        plan = _PLANS.get(key)
        if plan is None or plan[3] != registry.generation():
            plan = forward_plan(input, weight, bias, stride, padding, padding_end, dilation, groups, algo)
            if isinstance(plan, Tensor):
                return plan
            _remember(key, plan)
        geom, alg, out_shape, _, keep = plan
        if alg is None:
            alg = registry.choose(algo, geom, "forward", name)
            keep = "channels_last" in alg.layouts
        out = _routed(alg.forward, geom, out_shape, (input, weight, bias))
        if out is not None:
            return out
        if bias is not None and not bias.is_contiguous():
            bias = bias.contiguous()
        out = alg.forward(_as_5d(input, keep), _as_5d(weight, keep), bias, geom)
        return op_result(fresh(out, out_shape), result_format(input, weight))

    @conv.register_fake
    def _(input, weight, bias, stride, padding, padding_end, dilation, groups, algo):
        shape, empty_dtype, _ = validation.conv_op(name, ndim, input, weight, bias, stride, padding, padding_end,
                                                   dilation, groups)
        return empty_result(input, shape, empty_dtype or input.dtype, result_format(input, weight))

    def grad_input_plan(grad_output, weight, input_size, stride, padding, padding_end, dilation, groups, algo):
        shape, empty_dtype, _ = validation.conv_grad_input_op(f"{name}_grad_input", ndim, grad_output, weight,
                                                              input_size, stride, padding, padding_end, dilation,
                                                              groups)
        if empty_dtype is not None:
            return op_result(grad_output.new_zeros(shape, dtype=empty_dtype), result_format(grad_output, weight))
        ks, out_sp = weight.shape[spatial], grad_output.shape[spatial]
        stride = validation.conv_kernel_stride(stride, out_sp, input_size, ks, padding, padding_end, dilation)
        dilation = validation.kernel_dilation(dilation, ks)
        geom = make_geometry(ndim, grad_output.shape[0], weight.shape[1] * groups, weight.shape[0], groups,
                             input_size, ks, out_sp, stride, padding, padding_end, dilation, grad_output.dtype,
                             backends.target_for(grad_output))
        return _plan(geom, algo, "grad_input", f"{name}_grad_input",
                     (geom.batch, geom.in_channels) + tuple(input_size))

    @torch.library.custom_op(f"fastconv::{name}_grad_input", mutates_args=(), device_types=("cpu", "cuda"))
    @eager.keep_implementation(GRAD_INPUT_IMPLEMENTATIONS, ndim)
    @validation.allocation_errors(f"{name}_grad_input")
    @precision.compute_in_float32(f"{name}_grad_input")
    def grad_input(grad_output: Tensor, weight: Tensor, input_size: list[int], stride: list[int],
                   padding: list[int], padding_end: list[int], dilation: list[int], groups: int,
                   algo: str) -> Tensor:
        key = (1, grad_output.shape, weight.shape, grad_output.dtype, weight.dtype, grad_output.device,
               weight.device, tuple(input_size), tuple(stride), tuple(padding), tuple(padding_end),
               tuple(dilation), groups, algo, backends.target_for(grad_output))
        plan = _PLANS.get(key)
        if plan is None or plan[3] != registry.generation():
            plan = grad_input_plan(grad_output, weight, input_size, stride, padding, padding_end, dilation,
                                   groups, algo)
            if isinstance(plan, Tensor):
                return plan
            _remember(key, plan)
        geom, alg, out_shape, _, keep = plan
        if alg is None:
            alg = registry.choose(algo, geom, "grad_input", f"{name}_grad_input")
            keep = "channels_last" in alg.layouts
        out = _routed(alg.grad_input, geom, out_shape, (grad_output, weight))
        if out is not None:
            return out
        return op_result(fresh(alg.grad_input(_as_5d(grad_output, keep), _as_5d(weight, keep), geom), out_shape),
                         result_format(grad_output, weight))

    @grad_input.register_fake
    def _(grad_output, weight, input_size, stride, padding, padding_end, dilation, groups, algo):
        shape, _, _ = validation.conv_grad_input_op(f"{name}_grad_input", ndim, grad_output, weight, input_size,
                                                    stride, padding, padding_end, dilation, groups)
        return empty_result(grad_output, shape, grad_output.dtype, result_format(grad_output, weight))

    def grad_weight_plan(grad_output, input, weight_size, stride, padding, padding_end, dilation, groups, algo):
        shape, empty_dtype, _ = validation.conv_grad_weight_op(f"{name}_grad_weight", ndim, grad_output, input,
                                                               weight_size, stride, padding, padding_end, dilation,
                                                               groups)
        if empty_dtype is not None:
            return input.new_zeros(shape, dtype=empty_dtype)
        in_sp, out_sp = input.shape[spatial], grad_output.shape[spatial]
        stride = validation.conv_kernel_stride(stride, out_sp, in_sp, weight_size, padding, padding_end, dilation)
        dilation = validation.kernel_dilation(dilation, weight_size)
        geom = make_geometry(ndim, input.shape[0], input.shape[1], grad_output.shape[1], groups,
                             in_sp, weight_size, out_sp, stride, padding, padding_end, dilation, input.dtype,
                             backends.target_for(input))
        return _plan(geom, algo, "grad_weight", f"{name}_grad_weight",
                     (geom.out_channels, geom.in_channels // groups) + tuple(weight_size))

    @torch.library.custom_op(f"fastconv::{name}_grad_weight", mutates_args=(), device_types=("cpu", "cuda"))
    @eager.keep_implementation(GRAD_WEIGHT_IMPLEMENTATIONS, ndim)
    @validation.allocation_errors(f"{name}_grad_weight")
    @precision.compute_in_float32(f"{name}_grad_weight")
    def grad_weight(grad_output: Tensor, input: Tensor, weight_size: list[int], stride: list[int],
                    padding: list[int], padding_end: list[int], dilation: list[int], groups: int,
                    algo: str) -> Tensor:
        key = (2, grad_output.shape, input.shape, grad_output.dtype, input.dtype, grad_output.device,
               input.device, tuple(weight_size), tuple(stride), tuple(padding), tuple(padding_end),
               tuple(dilation), groups, algo, backends.target_for(input))
        plan = _PLANS.get(key)
        if plan is None or plan[3] != registry.generation():
            plan = grad_weight_plan(grad_output, input, weight_size, stride, padding, padding_end, dilation,
                                    groups, algo)
            if isinstance(plan, Tensor):
                return plan
            _remember(key, plan)
        geom, alg, out_shape, _, keep = plan
        if alg is None:
            alg = registry.choose(algo, geom, "grad_weight", f"{name}_grad_weight")
            keep = "channels_last" in alg.layouts
        out = _routed(alg.grad_weight, geom, out_shape, (grad_output, input))
        if out is not None:
            return out
        return op_result(fresh(alg.grad_weight(_as_5d(grad_output, keep), _as_5d(input, keep), geom), out_shape),
                         None)

    @grad_weight.register_fake
    def _(grad_output, input, weight_size, stride, padding, padding_end, dilation, groups, algo):
        shape, _, _ = validation.conv_grad_weight_op(f"{name}_grad_weight", ndim, grad_output, input, weight_size,
                                                     stride, padding, padding_end, dilation, groups)
        return input.new_empty(shape)

    # ---- autograd: each op's derivatives are the other two ops ---------------------------------
    def conv_setup(ctx, inputs, output):
        input, weight, bias, stride, padding, padding_end, dilation, groups, algo = inputs
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Save only what the requested gradients need: a frozen weight means no input is kept.
        ctx.save_for_backward(input if need_weight else None, weight if need_input else None)
        ctx.geometry = (stride, padding, padding_end, dilation, groups, algo)
        ctx.input_size = list(input.shape[spatial])
        ctx.weight_size = list(weight.shape[spatial])
        ctx.has_bias = bias is not None
        # aten's zero-channel result is (N, 0, *O) whatever K is: no op below can take that gradient, and
        # every gradient is zero anyway (nothing was summed).
        ctx.zero_channels = input.shape[1] == 0
        if ctx.zero_channels:
            ctx.meta = [(t.shape, t.dtype, t.device) if t is not None else None for t in (input, weight, bias)]

    def conv_backward(ctx, grad):
        if ctx.zero_channels:
            zeros = [None if m is None or not need else torch.zeros(m[0], dtype=m[1], device=m[2])
                     for m, need in zip(ctx.meta, ctx.needs_input_grad[:3])]
            return (*zeros, None, None, None, None, None, None)
        input, weight = ctx.saved_tensors
        g = ctx.geometry
        gi = gw = gb = None
        # A plain backward() records nothing: the gradient ops' implementations run without the dispatcher
        # (see ops.eager); under create_graph=True (or a profiler, a mode) they keep it and record their nodes.
        direct = eager.direct_ok(grad, weight, input)
        if ctx.needs_input_grad[0]:
            run = GRAD_INPUT_IMPLEMENTATIONS[ndim] if direct else grad_input_op
            gi = run(grad, weight, ctx.input_size, *g)
        if ctx.needs_input_grad[1]:
            run = GRAD_WEIGHT_IMPLEMENTATIONS[ndim] if direct else grad_weight_op
            gw = run(grad, input, ctx.weight_size, *g)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(dim=[0, *range(2, grad.dim())])
        return gi, gw, gb, None, None, None, None, None, None

    def grad_input_setup(ctx, inputs, output):
        grad_output, weight, input_size, *g = inputs
        ctx.save_for_backward(grad_output if ctx.needs_input_grad[1] else None,
                              weight if ctx.needs_input_grad[0] else None)
        ctx.geometry = tuple(g)
        ctx.weight_size = list(weight.shape[spatial])

    def grad_input_backward(ctx, gg):
        # grad_input(gy, w) = d<gy, conv(x, w)>/dx, so d/d(gy) = conv(gg, w), d/dw = grad_weight(gy, gg)
        grad_output, weight = ctx.saved_tensors
        stride, padding, padding_end, dilation, groups, algo = ctx.geometry
        d_gy = d_w = None
        if ctx.needs_input_grad[0]:
            d_gy = conv_op(gg, weight, None, stride, padding, padding_end, dilation, groups, algo)
        if ctx.needs_input_grad[1]:
            d_w = grad_weight_op(grad_output, gg, ctx.weight_size, *ctx.geometry)
        return d_gy, d_w, None, None, None, None, None, None, None

    def grad_weight_setup(ctx, inputs, output):
        grad_output, input, weight_size, *g = inputs
        ctx.save_for_backward(grad_output if ctx.needs_input_grad[1] else None,
                              input if ctx.needs_input_grad[0] else None)
        ctx.geometry = tuple(g)
        ctx.input_size = list(input.shape[spatial])

    def grad_weight_backward(ctx, gg):
        # grad_weight(gy, x) = d<gy, conv(x, w)>/dw, so d/d(gy) = conv(x, gg), d/dx = grad_input(gy, gg)
        grad_output, input = ctx.saved_tensors
        stride, padding, padding_end, dilation, groups, algo = ctx.geometry
        d_gy = d_x = None
        if ctx.needs_input_grad[0]:
            d_gy = conv_op(input, gg, None, stride, padding, padding_end, dilation, groups, algo)
        if ctx.needs_input_grad[1]:
            d_x = grad_input_op(grad_output, gg, ctx.input_size, *ctx.geometry)
        return d_gy, d_x, None, None, None, None, None, None, None

    conv_op, grad_input_op, grad_weight_op = conv, grad_input, grad_weight
    conv.register_autograd(conv_backward, setup_context=conv_setup)
    FORWARD_GRAD_DIRECT[ndim] = eager.autograd_entry(name, IMPLEMENTATIONS[ndim], conv_setup, conv_backward)
    SETUP[ndim], BACKWARD[ndim] = conv_setup, conv_backward
    grad_input.register_autograd(grad_input_backward, setup_context=grad_input_setup)
    grad_weight.register_autograd(grad_weight_backward, setup_context=grad_weight_setup)

    # ---- FLOP formulas (FlopCounterMode counts unregistered custom ops as zero) -------------------
    # FLOPs = 2 x MACs, bias adds not counted, as torch's own conv formula.
    @register_flop_formula(getattr(torch.ops.fastconv, name))
    def _(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(out_shape) * math.prod(weight_shape[1:])

    @register_flop_formula(getattr(torch.ops.fastconv, f"{name}_grad_input"))
    def _(grad_output_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(grad_output_shape) * math.prod(weight_shape[1:])

    @register_flop_formula(getattr(torch.ops.fastconv, f"{name}_grad_weight"))
    def _(grad_output_shape, input_shape, weight_size, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(grad_output_shape) * math.prod(out_shape[1:])

    return conv, grad_input, grad_weight


#: ndim -> the forward op's implementation, undecorated by torch.library (filled by ``_register``).
IMPLEMENTATIONS: dict = {}
#: ndim -> the gradient ops' implementations (filled by ``_register``): what a plain backward calls.
GRAD_INPUT_IMPLEMENTATIONS: dict = {}
GRAD_WEIGHT_IMPLEMENTATIONS: dict = {}
#: ndim -> the forward op's autograd setup and backward (``conv_setup``, ``conv_backward``; filled by
#: ``_register``): the one formula, also recorded by a layer's planned training calls (:mod:`.repeat_call`).
SETUP: dict = {}
BACKWARD: dict = {}
#: ndim -> ``apply`` of an autograd Function around the forward implementation (filled by ``_register``): only
#: for calls that :func:`fastconv.ops.eager.direct_grad_ok` accepts.
FORWARD_GRAD_DIRECT: dict = {}

OPS = {ndim: _register(ndim) for ndim in DIMS}


def _entry(opdef):
    """The op's ``OpOverload``: what ``opdef(...)`` calls (``CustomOpDef.__call__`` is one Python frame more).
    Not the dispatcher's builtin beneath it: torch.compile traces an OpOverload, not that builtin."""
    return getattr(opdef, "_opoverload", None) or opdef


#: ndim -> the forward op's direct entry (same arguments and behaviour as ``OPS[ndim][0]``).
FORWARD = {ndim: _entry(ops[0]) for ndim, ops in OPS.items()}
#: ndim -> the forward op's implementation, called without the dispatcher: only for calls that
#: :func:`fastconv.ops.eager.direct_ok` accepts (no gradient recorded, nothing tracing or watching).
FORWARD_DIRECT = IMPLEMENTATIONS
