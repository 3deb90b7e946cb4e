"""Registered pooling ops (``torch.ops.fastconv.*``), one op per family for 1-, 2- and 3-D.

The spatial rank of a call is ``len(kernel_size)`` (or of ``output_size``); inputs are batched
``(N, C, *S)`` (the functional layer adds and removes the batch dim). Ops and their derivatives:

=========================  ===================================  ====================================
op                         computes                             derivative
=========================  ===================================  ====================================
``max_pool``               max (or min) + argmax indices        ``max_pool_backward`` (scatter-add)
``adaptive_max_pool``      adaptive max + indices               ``max_pool_backward``
``max_pool_backward``      scatter-add grad at indices          ``max_unpool_backward`` (gather)
``max_unpool``             scatter (assign) at indices          ``max_unpool_backward``
``max_unpool_backward``    gather at indices                    ``max_pool_backward``
``avg_pool``               windowed mean                        ``avg_pool_backward``
``avg_pool_backward``      its adjoint                          ``avg_pool``
``adaptive_avg_pool``      adaptive mean                        ``adaptive_avg_pool_backward``
``adaptive_avg_pool_backward``  its adjoint                     ``adaptive_avg_pool``
=========================  ===================================  ====================================

Every linear op's derivative is its adjoint, which is another op here, so double backward works.
Kernels come from a per-target table (:data:`KERNELS`) that :mod:`fastconv.ops.catalog` fills from
``fastconv.cpu.pool_impls.POOL_IMPLS`` and ``fastconv.cuda.pool.POOL_IMPLS``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backends
from ..spec import PoolKernels, Triple  # noqa: F401  (re-exported: the protocol a target implements)
from . import eager, precision, validation
from ._output import fresh
from .validation import pool_output_size  # noqa: F401  (re-exported: one definition)

#: target name -> kernels. Filled by :mod:`fastconv.ops.catalog` from the kernel modules' ``POOL_IMPLS``.
KERNELS: dict[str, PoolKernels] = {}


def register_kernels(target: str, kernels: PoolKernels) -> None:
    """Install the pooling kernels of ``target`` ("numba", "cuda", "cuda-emu")."""
    KERNELS[target] = kernels


def _kernels(t: Tensor, op: str) -> PoolKernels:
    return _kernels_for(backends.target_for(t), op)


def _kernels_for(target: str, op: str) -> PoolKernels:
    kernels = KERNELS.get(target)
    if kernels is None:
        raise RuntimeError(f"fastconv.{op}: no pooling kernels are registered for target {target!r} "
                           f"(registered: {', '.join(sorted(KERNELS)) or 'none'})")
    return kernels


def _t3(values, fill: int) -> Triple:
    values = tuple(int(v) for v in values)
    return (fill,) * (3 - len(values)) + values


def _as_5d(t: Tensor) -> Tensor:
    """(N, C, *S) -> contiguous (N, C, D, H, W), a view when ``t`` is contiguous."""
    t = t.contiguous()
    dim = t.dim()
    if dim == 4:  # the common case: one unsqueeze, the cheapest view
        return t.unsqueeze(2)
    return t.reshape(tuple(t.shape[:2]) + (1,) * (5 - dim) + tuple(t.shape[2:]))


# ------------------------------------------------------------------------------------------------
# per-call plans
# ------------------------------------------------------------------------------------------------
#: call signature -> what the kernel call needs (3-D window arguments, the result's shape). A model pools
#: with the same shapes and arguments on every call; validating them is most of a small pooling call's
#: host time. The key holds everything validation reads (shapes, dtypes, devices, the arguments, the
#: target), so a hit is exactly a call that was checked before. Empty results are not planned.
_PLANS: dict = {}
#: op name -> the op's implementation, undecorated by torch.library, for the calls that
#: :func:`fastconv.ops.eager.direct_ok` lets skip the dispatcher (max_pool, avg_pool and the adaptive pools, and
#: the gradient ops their backward formulas run).
IMPLEMENTATIONS: dict = {}
#: op name -> ``apply`` of an autograd Function around the implementation with the op's own formula, for the
#: training calls that :func:`fastconv.ops.eager.direct_grad_ok` accepts (filled below the formulas).
GRAD_DIRECT: dict = {}
#: Entries kept; when full the table starts over.
PLANS_MAX = 4096


def _remember(key, plan: tuple) -> tuple:
    if len(_PLANS) >= PLANS_MAX:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def _spatial(t: Tensor) -> list[int]:
    return list(t.shape[2:])


def _unflatten(t5: Tensor, lead: tuple, spatial) -> Tensor:
    return fresh(t5, tuple(lead) + tuple(spatial))


# ------------------------------------------------------------------------------------------------
# max / min pooling with indices, and the scatter/gather ops around them
# ------------------------------------------------------------------------------------------------
def _max_pool_key(input, target, kernel_size, stride, padding, dilation, ceil_mode) -> tuple:
    """The plan-table key of a max/min pooling call (shared by the op and its values-only entry)."""
    return ("max_pool", input.shape, input.dtype, input.device, target, tuple(kernel_size), tuple(stride),
            tuple(padding), tuple(dilation), ceil_mode)


@torch.library.custom_op("fastconv::max_pool", mutates_args=(), device_types=("cpu", "cuda"))
@eager.keep_implementation(IMPLEMENTATIONS, "max_pool")
@validation.allocation_errors("max_pool")
@precision.compute_in_float32("max_pool")
def max_pool(input: Tensor, kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
             ceil_mode: bool, minimum: bool) -> tuple[Tensor, Tensor]:
    """Max (``minimum=False``) or min pooling; returns (values, int64 flat indices into each plane).

    Float32/float64 on every target; also integer dtypes on the CPU (as torch's max_pool), forward only.
    """
    target = backends.target_for(input)
    key = _max_pool_key(input, target, kernel_size, stride, padding, dilation, ceil_mode)
    plan = _PLANS.get(key)
    if plan is None:
        shape, empty_dtype, out = validation.max_pool_op("max_pool", input, kernel_size, stride, padding, dilation,
                                                         ceil_mode, target)
        if empty_dtype is not None:
            return input.new_zeros(shape), input.new_zeros(shape, dtype=torch.int64)
        stride = validation.pool_kernel_stride(stride, out, input.shape[2:], padding)
        dilation = validation.kernel_dilation(dilation, kernel_size)
        plan = _remember(key, (_t3(kernel_size, 1), _t3(stride, 1), _t3(padding, 0), _t3(dilation, 1), _t3(out, 1),
                               tuple(input.shape[:2]) + tuple(out)))
    kernel3, stride3, padding3, dilation3, out3, out_shape = plan
    y, idx = _kernels_for(target, "max_pool").max_pool(_as_5d(input), kernel3, stride3, padding3, dilation3, out3,
                                                       minimum)
    return fresh(y, out_shape), fresh(idx, out_shape)


def max_pool_values(input: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                    dilation: list[int], ceil_mode: bool, minimum: bool) -> Tensor:
    """:func:`max_pool`'s values without its indices, for direct calls that discard them (inference: nothing
    will need the indices for a gradient). Same checks and plan; a target whose kernels have a values-only
    pass (``max_pool_values``: the CPU's separable kernel, 4-8x faster than the indexed one) runs it on float32
    and float64; anything else (a first call, half precision, integers) runs :func:`max_pool` and drops the
    indices."""
    target = backends.target_for(input)
    values_only = getattr(_kernels_for(target, "max_pool"), "max_pool_values", None)
    plan = _PLANS.get(_max_pool_key(input, target, kernel_size, stride, padding, dilation, ceil_mode))
    if values_only is None or plan is None or input.dtype not in (torch.float32, torch.float64):
        return IMPLEMENTATIONS["max_pool"](input, kernel_size, stride, padding, dilation, ceil_mode, minimum)[0]
    kernel3, stride3, padding3, dilation3, out3, out_shape = plan
    return fresh(values_only(_as_5d(input), kernel3, stride3, padding3, dilation3, out3, minimum), out_shape)


IMPLEMENTATIONS["max_pool_values"] = max_pool_values


@max_pool.register_fake
def _(input, kernel_size, stride, padding, dilation, ceil_mode, minimum):
    shape = validation.max_pool_op("max_pool", input, kernel_size, stride, padding, dilation, ceil_mode,
                                   None)[0]
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("fastconv::max_pool_backward", mutates_args=(), device_types=("cpu", "cuda"))
@eager.keep_implementation(IMPLEMENTATIONS, "max_pool_backward")
@validation.allocation_errors("max_pool_backward")
@precision.compute_in_float32("max_pool_backward")
def max_pool_backward(grad_output: Tensor, indices: Tensor, input_size: list[int]) -> Tensor:
    """Scatter-add ``grad_output`` (N, C, *O) into zeros (N, C, *input_size) at ``indices``."""
    target = backends.target_for(grad_output)
    key = ("max_pool_backward", grad_output.shape, grad_output.dtype, grad_output.device, indices.shape,
           indices.dtype, indices.device, target, tuple(input_size))
    plan = _PLANS.get(key)
    if plan is None:
        shape, empty_dtype, _ = validation.max_pool_backward_op("max_pool_backward", grad_output, indices,
                                                                input_size)
        if empty_dtype is not None:
            return grad_output.new_zeros(shape)
        plan = _remember(key, (_t3(input_size, 1), tuple(grad_output.shape[:2]) + tuple(input_size)))
    in3, out_shape = plan
    g = _kernels_for(target, "max_pool_backward").max_pool_backward(_as_5d(grad_output), _as_5d(indices), in3)
    return fresh(g, out_shape)


@max_pool_backward.register_fake
def _(grad_output, indices, input_size):
    return grad_output.new_empty(validation.max_pool_backward_op("max_pool_backward", grad_output, indices,
                                                                 input_size)[0])


@torch.library.custom_op("fastconv::max_unpool", mutates_args=(), device_types=("cpu", "cuda"))
@validation.allocation_errors("max_unpool")
@precision.compute_in_float32("max_unpool")
def max_unpool(input: Tensor, indices: Tensor, output_size: list[int]) -> Tensor:
    """Scatter ``input`` (N, C, *S) into zeros (N, C, *output_size) at ``indices`` (later ones win)."""
    shape, empty_dtype, _ = validation.max_unpool_op("max_unpool", input, indices, output_size)
    if empty_dtype is not None:
        return input.new_zeros(shape)
    y = _kernels(input, "max_unpool").max_unpool(_as_5d(input), _as_5d(indices), _t3(output_size, 1))
    return _unflatten(y, input.shape[:2], output_size)


@max_unpool.register_fake
def _(input, indices, output_size):
    return input.new_empty(validation.max_unpool_op("max_unpool", input, indices, output_size)[0])


@torch.library.custom_op("fastconv::max_unpool_backward", mutates_args=(), device_types=("cpu", "cuda"))
@validation.allocation_errors("max_unpool_backward")
@precision.compute_in_float32("max_unpool_backward")
def max_unpool_backward(grad_output: Tensor, indices: Tensor) -> Tensor:
    """Gather ``grad_output`` (N, C, *O) at ``indices`` (N, C, *S) -> (N, C, *S)."""
    shape, empty_dtype, _ = validation.max_unpool_backward_op("max_unpool_backward", grad_output, indices)
    if empty_dtype is not None:
        return grad_output.new_zeros(shape)
    g = _kernels(grad_output, "max_unpool_backward").max_unpool_backward(_as_5d(grad_output), _as_5d(indices))
    return _unflatten(g, indices.shape[:2], indices.shape[2:])


@max_unpool_backward.register_fake
def _(grad_output, indices):
    return grad_output.new_empty(validation.max_unpool_backward_op("max_unpool_backward", grad_output,
                                                                   indices)[0])


@torch.library.custom_op("fastconv::adaptive_max_pool", mutates_args=(), device_types=("cpu", "cuda"))
@eager.keep_implementation(IMPLEMENTATIONS, "adaptive_max_pool")
@validation.allocation_errors("adaptive_max_pool")
@precision.compute_in_float32("adaptive_max_pool")
def adaptive_max_pool(input: Tensor, output_size: list[int]) -> tuple[Tensor, Tensor]:
    """Adaptive max pooling to ``output_size``; returns (values, indices) like ``max_pool``."""
    shape, empty_dtype, _ = validation.adaptive_pool_op("adaptive_max_pool", input, output_size,
                                                        allow_zero_channels=False)
    if empty_dtype is not None:
        return input.new_zeros(shape), input.new_zeros(shape, dtype=torch.int64)
    y, idx = _kernels(input, "adaptive_max_pool").adaptive_max_pool(_as_5d(input), _t3(output_size, 1))
    return _unflatten(y, input.shape[:2], output_size), _unflatten(idx, input.shape[:2], output_size)


@adaptive_max_pool.register_fake
def _(input, output_size):
    shape = validation.adaptive_pool_op("adaptive_max_pool", input, output_size, allow_zero_channels=False)[0]
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int64)


def _indices_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.input_size = _spatial(inputs[0])


def _backward_op(name: str, op, *tensors):
    """A formula's gradient op: its implementation where the backward records nothing (a plain ``backward()``;
    see :func:`fastconv.ops.eager.direct_ok`), else the registered op (``create_graph=True`` records it)."""
    return IMPLEMENTATIONS[name] if eager.direct_ok(*tensors) else op


def _indices_backward(ctx, grad, _grad_indices):
    (indices,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    g = _backward_op("max_pool_backward", max_pool_backward, grad)(grad, indices, ctx.input_size)
    return (g,) + (None,) * 6


def _adaptive_max_backward(ctx, grad, _grad_indices):
    (indices,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    return _backward_op("max_pool_backward", max_pool_backward, grad)(grad, indices, ctx.input_size), None


def _save_indices(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.output_size = list(inputs[2]) if len(inputs) > 2 else None


def _scatter_backward(ctx, gg):  # d/d grad_output of a scatter-add is a gather
    (indices,) = ctx.saved_tensors
    return max_unpool_backward(gg, indices), None, None


def _unpool_backward(ctx, gg):
    (indices,) = ctx.saved_tensors
    return max_unpool_backward(gg, indices), None, None


def _gather_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.source_size = _spatial(inputs[0])


def _gather_backward(ctx, gg):  # d/d source of a gather is a scatter-add
    (indices,) = ctx.saved_tensors
    return max_pool_backward(gg, indices, ctx.source_size), None


max_pool.register_autograd(_indices_backward, setup_context=_indices_setup)
adaptive_max_pool.register_autograd(_adaptive_max_backward, setup_context=_indices_setup)
max_pool_backward.register_autograd(_scatter_backward, setup_context=_save_indices)
max_unpool.register_autograd(_unpool_backward, setup_context=_save_indices)
max_unpool_backward.register_autograd(_gather_backward, setup_context=_gather_setup)
GRAD_DIRECT["max_pool"] = eager.autograd_entry("max_pool", IMPLEMENTATIONS["max_pool"], _indices_setup,
                                               _indices_backward)
GRAD_DIRECT["adaptive_max_pool"] = eager.autograd_entry("adaptive_max_pool", IMPLEMENTATIONS["adaptive_max_pool"],
                                                        _indices_setup, _adaptive_max_backward)


# Training calls that do not return the indices (every model's ``nn.MaxPool2d``): the values-only forward (3-5x
# faster than the indexed one) saves the input and keeps the values, and the backward finds each window's element
# again (:meth:`PoolKernels.max_pool_backward_from_values`). Only where the target's kernels have both passes
# and every stride is at least 2 (:func:`values_training_ok`). The values are kept as a detached alias with their
# version: modified in place after the forward (which torch allows, its max_pool saving no output), they are
# computed again. Measured, 2 threads, forward + backward, indexed -> values (torch): ResNet's 3x3/2 pool of 8 x
# 64 x 64x64 11.3 -> 8.5 ms (10.7; 4.7 against torch's 11.2 since the 3x3 and 2x2 backward kernels compile their
# window, pool_max._values_backward_2d), AlexNet's 8 x 64 x 31x31 2.95 -> 1.91 (2.39) and 8 x 192 x 15x15 2.55 -> 1.49
# (1.62), VGG's 2x2/2 of 8 x 64 x 128x128 34.9 -> 29.7 (39.0); GoogLeNet's stride-1 3x3 branch pools lost (8 x 192
# x 16x16 4.48 -> 4.63, 8 x 480 x 8x8 2.93 -> 3.33): overlapping windows visit each element up to 9 times in the
# search, where the indexed forward's separable passes visit it 3 times.
VALUES_TRAINING_MIN_STRIDE = 2


def values_training_ok(input: Tensor, stride) -> bool:
    """Whether a max/min pooling training call on ``input`` with ``stride`` (its normalised list) can take
    :data:`GRAD_DIRECT` ``["max_pool_values"]``."""
    kernels = KERNELS.get(backends.target_for(input))
    return (min(stride) >= VALUES_TRAINING_MIN_STRIDE and input.dtype in (torch.float32, torch.float64)
            and getattr(kernels, "max_pool_backward_from_values", None) is not None
            and getattr(kernels, "max_pool_values", None) is not None)


class _MaxPoolValues(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, kernel_size, stride, padding, dilation, ceil_mode, minimum):
        y = max_pool_values(input, kernel_size, stride, padding, dilation, ceil_mode, minimum)
        ctx.args = (kernel_size, stride, padding, dilation, ceil_mode, minimum)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(input)
            ctx.values = y.detach()
            ctx.values_version = ctx.values._version
        return y

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        (input,) = ctx.saved_tensors
        kernel_size, stride, padding, dilation, ceil_mode, minimum = ctx.args
        if not eager.direct_ok(grad, input):
            # a backward that records (create_graph=True): the registered scatter op, so double backward works
            idx = IMPLEMENTATIONS["max_pool"](input.detach(), kernel_size, stride, padding, dilation, ceil_mode,
                                              minimum)[1]
            return (max_pool_backward(grad, idx, _spatial(input)),) + (None,) * 6
        values = ctx.values
        if values._version != ctx.values_version:
            values = max_pool_values(input.detach(), kernel_size, stride, padding, dilation, ceil_mode, minimum)
        kernels = _kernels(input, "max_pool_backward")
        g = kernels.max_pool_backward_from_values(_as_5d(grad.to(input.dtype)), _as_5d(input.detach()),
                                                  _as_5d(values), _t3(kernel_size, 1), _t3(stride, 1),
                                                  _t3(padding, 0), _t3(dilation, 1), minimum)
        return (g.view(input.shape),) + (None,) * 6


_MaxPoolValues.__name__ = _MaxPoolValues.__qualname__ = "FastconvDirect_max_pool_values"
GRAD_DIRECT["max_pool_values"] = _MaxPoolValues.apply



# ------------------------------------------------------------------------------------------------
# average pooling
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastconv::avg_pool", mutates_args=(), device_types=("cpu", "cuda"))
@eager.keep_implementation(IMPLEMENTATIONS, "avg_pool")
@validation.allocation_errors("avg_pool")
@precision.compute_in_float32("avg_pool")
def avg_pool(input: Tensor, kernel_size: list[int], stride: list[int], padding: list[int], ceil_mode: bool,
             count_include_pad: bool, divisor_override: int) -> Tensor:
    """Average pooling, torch's divisor rule; ``divisor_override == 0`` means none."""
    target = backends.target_for(input)
    key = ("avg_pool", input.shape, input.dtype, input.device, target, tuple(kernel_size), tuple(stride),
           tuple(padding), ceil_mode, divisor_override)
    plan = _PLANS.get(key)
    if plan is None:
        shape, empty_dtype, out = validation.avg_pool_op("avg_pool", input, kernel_size, stride, padding, ceil_mode,
                                                         divisor_override)
        if empty_dtype is not None:
            return input.new_zeros(shape)
        stride = validation.pool_kernel_stride(stride, out, input.shape[2:], padding)
        plan = _remember(key, (_t3(kernel_size, 1), _t3(stride, 1), _t3(padding, 0), _t3(out, 1),
                               tuple(input.shape[:2]) + tuple(out)))
    kernel3, stride3, padding3, out3, out_shape = plan
    y = _kernels_for(target, "avg_pool").avg_pool(_as_5d(input), kernel3, stride3, padding3, out3, ceil_mode,
                                                  count_include_pad, divisor_override)
    return fresh(y, out_shape)


@avg_pool.register_fake
def _(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    return input.new_empty(validation.avg_pool_op("avg_pool", input, kernel_size, stride, padding, ceil_mode,
                                                  divisor_override)[0])


@torch.library.custom_op("fastconv::avg_pool_backward", mutates_args=(), device_types=("cpu", "cuda"))
@eager.keep_implementation(IMPLEMENTATIONS, "avg_pool_backward")
@validation.allocation_errors("avg_pool_backward")
@precision.compute_in_float32("avg_pool_backward")
def avg_pool_backward(grad_output: Tensor, input_size: list[int], kernel_size: list[int], stride: list[int],
                      padding: list[int], ceil_mode: bool, count_include_pad: bool,
                      divisor_override: int) -> Tensor:
    """The adjoint of ``avg_pool``: (N, C, *O) -> (N, C, *input_size)."""
    target = backends.target_for(grad_output)
    key = ("avg_pool_backward", grad_output.shape, grad_output.dtype, grad_output.device, target, tuple(input_size),
           tuple(kernel_size), tuple(stride), tuple(padding), ceil_mode)
    plan = _PLANS.get(key)
    if plan is None:
        shape, empty_dtype, _ = validation.avg_pool_backward_op("avg_pool_backward", grad_output, input_size,
                                                                kernel_size, stride, padding, ceil_mode)
        if empty_dtype is not None:
            return grad_output.new_zeros(shape)
        stride = validation.pool_kernel_stride(stride, grad_output.shape[2:], input_size, padding)
        plan = _remember(key, (_t3(kernel_size, 1), _t3(stride, 1), _t3(padding, 0), _t3(input_size, 1),
                               tuple(grad_output.shape[:2]) + tuple(input_size)))
    kernel3, stride3, padding3, in3, out_shape = plan
    g = _kernels_for(target, "avg_pool_backward").avg_pool_backward(
        _as_5d(grad_output), kernel3, stride3, padding3, in3, ceil_mode, count_include_pad, divisor_override)
    return fresh(g, out_shape)


@avg_pool_backward.register_fake
def _(grad_output, input_size, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    return grad_output.new_empty(validation.avg_pool_backward_op(
        "avg_pool_backward", grad_output, input_size, kernel_size, stride, padding, ceil_mode)[0])


def _avg_setup(ctx, inputs, output):
    ctx.input_size = _spatial(inputs[0])
    ctx.args = tuple(inputs[1:])


def _avg_backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    g = _backward_op("avg_pool_backward", avg_pool_backward, grad)(grad, ctx.input_size, *ctx.args)
    return (g,) + (None,) * 6


def _avg_bw_setup(ctx, inputs, output):
    ctx.args = tuple(inputs[2:])


def _avg_bw_backward(ctx, gg):
    return avg_pool(gg, *ctx.args), None, None, None, None, None, None, None


avg_pool.register_autograd(_avg_backward, setup_context=_avg_setup)
avg_pool_backward.register_autograd(_avg_bw_backward, setup_context=_avg_bw_setup)
GRAD_DIRECT["avg_pool"] = eager.autograd_entry("avg_pool", IMPLEMENTATIONS["avg_pool"], _avg_setup, _avg_backward)


@torch.library.custom_op("fastconv::adaptive_avg_pool", mutates_args=(), device_types=("cpu", "cuda"))
@eager.keep_implementation(IMPLEMENTATIONS, "adaptive_avg_pool")
@validation.allocation_errors("adaptive_avg_pool")
@precision.compute_in_float32("adaptive_avg_pool")
def adaptive_avg_pool(input: Tensor, output_size: list[int]) -> Tensor:
    """Adaptive average pooling (N, C, *S) -> (N, C, *output_size); C == 0 gives an empty result, as torch."""
    target = backends.target_for(input)
    key = ("adaptive_avg_pool", input.shape, input.dtype, input.device, target, tuple(output_size))
    plan = _PLANS.get(key)
    if plan is None:
        # torch's 1-D and 2-D adaptive average pooling accept zero channels, its 3-D one does not
        shape, empty_dtype, _ = validation.adaptive_pool_op("adaptive_avg_pool", input, output_size,
                                                            allow_zero_channels=len(output_size) < 3)
        if empty_dtype is not None:
            return input.new_zeros(shape)
        plan = _remember(key, (_t3(output_size, 1), tuple(input.shape[:2]) + tuple(output_size)))
    out3, out_shape = plan
    kernels = _kernels_for(target, "adaptive_avg_pool")
    if getattr(kernels, "reads_contiguous_any_rank", False) and input.is_contiguous():
        return kernels.adaptive_avg_pool(input, out3, out_shape)  # no 5-D view, no result reshape or detach
    return fresh(kernels.adaptive_avg_pool(_as_5d(input), out3), out_shape)


@adaptive_avg_pool.register_fake
def _(input, output_size):
    return input.new_empty(validation.adaptive_pool_op("adaptive_avg_pool", input, output_size,
                                                       allow_zero_channels=len(output_size) < 3)[0])


@torch.library.custom_op("fastconv::adaptive_avg_pool_backward", mutates_args=(), device_types=("cpu", "cuda"))
@eager.keep_implementation(IMPLEMENTATIONS, "adaptive_avg_pool_backward")
@validation.allocation_errors("adaptive_avg_pool_backward")
@precision.compute_in_float32("adaptive_avg_pool_backward")
def adaptive_avg_pool_backward(grad_output: Tensor, input_size: list[int]) -> Tensor:
    """The adjoint of ``adaptive_avg_pool``: (N, C, *O) -> (N, C, *input_size)."""
    target = backends.target_for(grad_output)
    key = ("adaptive_avg_pool_backward", grad_output.shape, grad_output.dtype, grad_output.device, target,
           tuple(input_size))
    plan = _PLANS.get(key)
    if plan is None:
        shape, empty_dtype, _ = validation.adaptive_avg_pool_backward_op("adaptive_avg_pool_backward", grad_output,
                                                                         input_size)
        if empty_dtype is not None:
            return grad_output.new_zeros(shape)
        plan = _remember(key, (_t3(input_size, 1), tuple(grad_output.shape[:2]) + tuple(input_size)))
    in3, out_shape = plan
    g = _kernels_for(target, "adaptive_avg_pool_backward").adaptive_avg_pool_backward(_as_5d(grad_output), in3)
    return fresh(g, out_shape)


@adaptive_avg_pool_backward.register_fake
def _(grad_output, input_size):
    return grad_output.new_empty(validation.adaptive_avg_pool_backward_op("adaptive_avg_pool_backward",
                                                                          grad_output, input_size)[0])


def _adaptive_avg_setup(ctx, inputs, output):
    ctx.input_size = _spatial(inputs[0])


def _adaptive_avg_backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return None, None
    run = _backward_op("adaptive_avg_pool_backward", adaptive_avg_pool_backward, grad)
    return run(grad, ctx.input_size), None


def _adaptive_avg_bw_setup(ctx, inputs, output):
    ctx.output_size = _spatial(inputs[0])


def _adaptive_avg_bw_backward(ctx, gg):
    return adaptive_avg_pool(gg, ctx.output_size), None


adaptive_avg_pool.register_autograd(_adaptive_avg_backward, setup_context=_adaptive_avg_setup)
adaptive_avg_pool_backward.register_autograd(_adaptive_avg_bw_backward, setup_context=_adaptive_avg_bw_setup)
GRAD_DIRECT["adaptive_avg_pool"] = eager.autograd_entry("adaptive_avg_pool", IMPLEMENTATIONS["adaptive_avg_pool"],
                                                        _adaptive_avg_setup, _adaptive_avg_backward)


# ------------------------------------------------------------------------------------------------
# No FLOP formulas: pooling does no multiplications, and FlopCounterMode counts torch's pooling as 0
# too. fastconv.flops counts pooling comparisons/adds separately (one per window element).
# ------------------------------------------------------------------------------------------------
def window_ops(output_numel: int, kernel_size) -> int:
    """Comparisons (max/min) or additions (avg) a pooling layer performs: one per window element."""
    return output_numel * math.prod(kernel_size)
