"""Argument validation for every registered ``torch.ops.fastconv.*`` op, and the checks the public API shares.

One implementation: the ops call the ``*_op`` validators below at the top of their implementation (and of
their fake implementation), before any kernel of any target runs, so a direct ``torch.ops.fastconv.*`` call,
the CPU path, the CUDA path and the CUDA-on-CPU harness all get the same refusals. The functional layer
(:mod:`fastconv.functional`) imports the argument-normalising helpers from here (``check_tensor``,
``int_tuple``, ...) and leaves the shape checks to the op, so each check is written once and runs once.

Rules:

* Messages start ``fastconv.<op>: `` and name the argument, what was expected and what came.
* Exception types are torch's for the same condition: RuntimeError where ``aten.convolution`` / the aten
  pooling ops raise it (``NotImplementedError``, a RuntimeError subclass, where torch says "not implemented
  for <dtype>"), TypeError for a wrong Python type, ValueError where torch's functional raises it.
* Pure Python on shapes, dtypes and devices: no tensor data is read, so a check costs microseconds and never
  synchronises a GPU. Data-dependent checks (a max-unpool index outside the plane) stay in the kernels.
* Zero-size inputs follow torch exactly (see :func:`conv_op` and :func:`pool_input_op`): the op returns the
  empty (or zero) result itself and runs no kernel.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

#: The floating dtypes every op accepts (the one list: the ops, the functional layer and the kernels' error
#: messages all read it). float16 and bfloat16 are computed in float32 and rounded once to the input dtype, as
#: torch's CPU ops do (:mod:`fastconv.ops.precision`); the kernels themselves see float32 and float64 only.
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: Extra dtypes max/min pooling accepts on the CPU (Numba) target, forward only, as torch's max_pool does.
INTEGER_POOL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
#: Targets whose max-pooling kernels accept :data:`INTEGER_POOL_DTYPES`.
INTEGER_POOL_TARGETS = ("numba",)

#: No 64-bit machine maps more than 2**48 bytes of user address space: an output larger than that can never
#: be allocated, and its sizes may already overflow the kernels' int64 index arithmetic.
MAX_OUTPUT_BYTES = 2 ** 48
#: torch's pooling ops take their window arguments as C ``int``.
INT32_MAX = 2 ** 31 - 1

IntOrSeq = Union[int, Sequence[int]]


def allocation_errors(op: str):
    """Decorator for an op's implementation: an allocation the machine cannot satisfy raises RuntimeError, as
    torch's allocator does ("can't allocate memory"), not numpy's MemoryError, which no caller expects."""
    def wrap(fn):
        @functools.wraps(fn)
        def impl(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except MemoryError as e:
                raise RuntimeError(f"{_name(op)}: out of memory: {e}") from e
            except SystemError as e:
                # a Numba kernel whose own allocation failed reports SystemError("... returned a result with
                # an exception set") chained to the MemoryError
                if isinstance(e.__context__, MemoryError):
                    raise RuntimeError(f"{_name(op)}: out of memory: {e.__context__}") from e
                raise
        return impl
    return wrap


def _name(op: str) -> str:
    return op if op.startswith("fastconv.") else f"fastconv.{op}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _supported_list() -> str:
    return " or ".join(str(d) for d in SUPPORTED_DTYPES)


# ------------------------------------------------------------------------------------------------
# building blocks (also used by fastconv.functional)
# ------------------------------------------------------------------------------------------------
def check_type(op: str, arg: str, t, *, optional: bool = False) -> Optional[Tensor]:
    """``t`` must be a Tensor (or None when ``optional``): TypeError otherwise."""
    if t is None and optional:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{_name(op)}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_dtype(op: str, arg: str, t: Tensor, allowed: Sequence[torch.dtype] = SUPPORTED_DTYPES) -> None:
    """``t.dtype`` must be in ``allowed`` (default :data:`SUPPORTED_DTYPES`)."""
    if t.dtype in allowed:
        return
    names = " or ".join(str(d) for d in allowed)
    if t.dtype == torch.bool or t.is_complex():
        # torch: `"max_pool2d" not implemented for 'Bool'` etc. (NotImplementedError is a RuntimeError)
        raise NotImplementedError(f"{_name(op)}: {arg} has dtype {t.dtype}, which is not implemented "
                                  f"(expected {names})")
    if t.is_floating_point():
        raise RuntimeError(f"{_name(op)}: {arg} has dtype {t.dtype}, which fastconv does not support "
                           f"(expected {names}); cast with {arg}.float()")
    raise RuntimeError(f"{_name(op)}: {arg} has dtype {t.dtype}; expected a floating tensor ({names}); "
                       f"this op is not implemented for integer tensors")


def check_tensor(op: str, arg: str, t, *, optional: bool = False,
                 allowed: Sequence[torch.dtype] = SUPPORTED_DTYPES) -> Optional[Tensor]:
    """``t`` must be a Tensor of a dtype fastconv computes in (float32 or float64 unless ``allowed``)."""
    if check_type(op, arg, t, optional=optional) is None:
        return None
    check_dtype(op, arg, t, allowed)
    return t


def check_same(op: str, ref_name: str, ref: Tensor, *, dtype: bool = True, **others: Optional[Tensor]) -> None:
    """Other tensors must share ``ref``'s device (and dtype unless ``dtype=False``): RuntimeError as torch."""
    for name, t in others.items():
        if t is None:
            continue
        if dtype and t.dtype != ref.dtype:
            raise RuntimeError(
                f"{_name(op)}: {ref_name} has dtype {ref.dtype} but {name} has dtype {t.dtype}; "
                f"they must be the same (cast {name} with .to({ref_name}.dtype))")
        if t.device != ref.device:
            raise RuntimeError(
                f"{_name(op)}: {ref_name} is on {ref.device} but {name} is on {t.device}; "
                f"they must be on the same device")


def int_tuple(op: str, arg: str, value, ndim: int, *, minimum: int) -> tuple[int, ...]:
    """Normalise an int or a sequence of 1 or ``ndim`` ints, each >= ``minimum`` (the functional API's form)."""
    if isinstance(value, bool):
        raise TypeError(f"{_name(op)}: {arg} must be an int or a tuple of {ndim} ints, got {value!r}")
    if isinstance(value, int):
        values = (value,) * ndim
    elif isinstance(value, (tuple, list, torch.Size)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        values = tuple(value)
        if len(values) == 1:
            values = values * ndim
        if len(values) != ndim:
            raise RuntimeError(f"{_name(op)}: expected {arg} to be a single int or a tuple of {ndim} ints, "
                               f"got {len(values)} values {tuple(value)}")
    else:
        raise TypeError(f"{_name(op)}: {arg} must be an int or a tuple of {ndim} ints, got {value!r}")
    _check_minimum(op, arg, values, minimum)
    return values


def _check_minimum(op: str, arg: str, values, minimum: int) -> None:
    for v in values:
        if v < minimum:
            what = "positive" if minimum == 1 else "non-negative"
            sign = "non-positive" if minimum == 1 else "negative"
            raise RuntimeError(f"{_name(op)}: {sign} {arg} is not supported: got {arg}={tuple(values)}; each "
                               f"value must be {what}")


def op_ints(op: str, arg: str, values, ndim: int, minimum: int) -> None:
    """A registered op's list argument: exactly ``ndim`` ints, each >= ``minimum`` (RuntimeError, as aten)."""
    if len(values) != ndim:
        raise RuntimeError(f"{_name(op)}: expected {arg} to be a list of {ndim} ints to match the {ndim} "
                           f"spatial dims, got {len(values)} values {list(values)}")
    for v in values:
        if v < minimum:
            _check_minimum(op, arg, values, minimum)


def check_groups(op: str, groups) -> int:
    # A SymInt is an int under torch.compile's symbolic shapes (the separable op's backward passes C).
    if isinstance(groups, bool) or not isinstance(groups, (int, torch.SymInt)):
        raise TypeError(f"{_name(op)}: groups must be an int, got {groups!r}")
    if groups <= 0:
        raise RuntimeError(f"{_name(op)}: non-positive groups is not supported: got groups={groups}")
    return groups


def batched(op: str, arg: str, t: Tensor, ndim: int) -> tuple[Tensor, bool]:
    """Accept (C, *S) unbatched or (N, C, *S) batched input with ``ndim`` spatial dims.

    Returns the batched tensor and whether the caller must drop the batch dim again.
    """
    if t.dim() == ndim + 2:
        return t, False
    if t.dim() == ndim + 1:
        return t.unsqueeze(0), True
    raise RuntimeError(
        f"{_name(op)}: expected {arg} to be {ndim + 1}-D (unbatched) or {ndim + 2}-D (batched), "
        f"got {t.dim()}-D {arg} of size {list(t.shape)}")


def _rank(op: str, arg: str, t: Tensor, dims: int, layout: str) -> None:
    if t.dim() != dims:
        raise RuntimeError(f"{_name(op)}: expected {arg} to be {dims}-D {layout}, got {t.dim()}-D {arg} "
                           f"of size {list(t.shape)}")


def _spatial_rank(op: str, arg: str, values) -> int:
    """The spatial rank a pooling op reads from the length of ``arg`` (1, 2 or 3)."""
    n = len(values)
    if n not in (1, 2, 3):
        raise RuntimeError(f"{_name(op)}: expected {arg} to have 1, 2 or 3 values (one per spatial dim), "
                           f"got {n} values {list(values)}")
    return n


def check_output_bytes(op: str, shape: Sequence[int], dtype: torch.dtype) -> None:
    """Refuse an output no machine can allocate (and whose sizes may overflow int64 index arithmetic).

    Zero sizes count as one: an empty batch does not make a 2**62-long spatial dim any more sensible, and torch
    overflows on such sizes too."""
    numel = math.prod(max(v, 1) for v in shape)
    itemsize = torch.empty((), dtype=dtype).element_size() if dtype not in _ITEMSIZE else _ITEMSIZE[dtype]
    if numel * itemsize > MAX_OUTPUT_BYTES:
        raise RuntimeError(f"{_name(op)}: the output of size {list(shape)} would need {numel * itemsize} bytes, "
                           f"more than any machine can address ({MAX_OUTPUT_BYTES}); check the padding/size "
                           f"arguments")


def check_padded_input(op: str, in_spatial, padding, padding_end, arg: str = "input") -> None:
    """Refuse padding that makes one padded input plane larger than any machine can hold: kernels may build
    the padded plane, and its sizes would overflow their int64 index arithmetic (torch refuses padding of
    2**62 and more for the same reason)."""
    numel = math.prod(max(i + pb + pe, 1) for i, pb, pe in zip(in_spatial, padding, padding_end))
    if numel * 8 > MAX_OUTPUT_BYTES:
        raise RuntimeError(f"{_name(op)}: padding={list(padding)} (and {list(padding_end)} after) makes a padded "
                           f"{arg} plane of {numel} elements, more than any machine can address; check the padding")


_ITEMSIZE = {torch.float32: 4, torch.float64: 8, torch.float16: 2, torch.bfloat16: 2, torch.int64: 8,
             torch.int32: 4, torch.int16: 2, torch.int8: 1, torch.uint8: 1}


# ------------------------------------------------------------------------------------------------
# strides the kernels can take
# ------------------------------------------------------------------------------------------------
def single_window_stride(stride, out, smallest) -> list:
    """``stride`` with every dim that has one output position (or one transposed-conv input position) set to
    ``smallest[i]`` when larger: there the stride selects nothing, and the smallest stride that still gives
    the same size keeps the geometry consistent. torch accepts any int64 stride; some kernels loop over the
    stride phases, so a stride of 2**62 would otherwise run for ever."""
    if 1 not in out:
        return stride
    return [min(s, m) if o == 1 else s for s, o, m in zip(stride, out, smallest)]


def kernel_dilation(dilation, kernel) -> list:
    """``dilation`` with 1 wherever the kernel has one tap: there it selects nothing (torch accepts any int64),
    and a huge value would overflow the kernels' index arithmetic."""
    if 1 not in kernel:
        return dilation
    return [1 if k == 1 else d for d, k in zip(dilation, kernel)]


def conv_kernel_stride(stride, out, in_spatial, kernel, padding, padding_end, dilation) -> list:
    """:func:`single_window_stride` for a convolution: one output position needs stride > padded - effective."""
    if 1 not in out:
        return stride
    smallest = [max(1, i + pb + pe - d * (k - 1)) for i, k, pb, pe, d
                in zip(in_spatial, kernel, padding, padding_end, dilation)]
    return single_window_stride(stride, out, smallest)


def pool_kernel_stride(stride, out, in_spatial, padding) -> list:
    """:func:`single_window_stride` for pooling: stride ``in + 2*padding`` gives one window with or without
    ceil_mode (the ceil rule drops a second window that would start at or past ``in + padding``)."""
    if 1 not in out:
        return stride
    return single_window_stride(stride, out, [max(1, i + 2 * p) for i, p in zip(in_spatial, padding)])


# ------------------------------------------------------------------------------------------------
# convolution
# ------------------------------------------------------------------------------------------------
def conv_output_size(in_size: int, kernel: int, stride: int, pad_before: int, pad_after: int,
                     dilation: int) -> int:
    """Output length of a convolution along one dim (torch's formula)."""
    return (in_size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def transposed_output_size(in_size: int, kernel: int, stride: int, padding: int, output_padding: int,
                           dilation: int) -> int:
    """Output length of a transposed convolution along one dim (torch's formula)."""
    return (in_size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def _conv_lists(op, ndim, stride, padding, padding_end, dilation, groups) -> None:
    op_ints(op, "stride", stride, ndim, 1)
    op_ints(op, "padding", padding, ndim, 0)
    op_ints(op, "padding_end", padding_end, ndim, 0)
    op_ints(op, "dilation", dilation, ndim, 1)
    check_groups(op, groups)


def _conv_weight(op: str, weight_shape, groups: int, *, what: str = "weight") -> None:
    """weight (K, C/groups, *k): K >= 1 and divisible by groups, every kernel size >= 1."""
    out_channels = weight_shape[0]
    if out_channels < 1:
        raise RuntimeError(f"{_name(op)}: expected {what} to be at least 1 at dimension 0 (out_channels), got "
                           f"{what} of size {list(weight_shape)}")
    if out_channels % groups != 0:
        raise RuntimeError(f"{_name(op)}: groups={groups} must divide out_channels, but {what} has {out_channels} "
                           f"output channels ({what}.shape[0] % groups == {out_channels % groups})")
    kernel = weight_shape[2:]
    if any(k < 1 for k in kernel):
        raise RuntimeError(f"{_name(op)}: kernel size should be greater than zero, but got {what} of size "
                           f"{list(weight_shape)} (kernel {tuple(kernel)})")


def _conv_fits(op: str, in_spatial, kernel, dilation, padding, padding_end, *, arg: str = "input") -> None:
    for i, (size, k, d, pb, pe) in enumerate(zip(in_spatial, kernel, dilation, padding, padding_end)):
        if size + pb + pe < d * (k - 1) + 1:
            raise RuntimeError(
                f"{_name(op)}: kernel size can't be greater than the padded input size: spatial dim {i} of "
                f"{arg} is {size} (+{pb + pe} padding) but the effective kernel is {d * (k - 1) + 1} "
                f"(kernel {k}, dilation {d})")


def _zero_spatial(op: str, arg: str, shape) -> None:
    # aten.convolution: an empty input must be empty through its batch or channel dim.
    raise RuntimeError(f"{_name(op)}: only zero batch or zero channel inputs are supported, but got {arg} of "
                       f"size {list(shape)} (a spatial size of 0)")


def _bias(op: str, bias: Optional[Tensor], channels: int, rule: str) -> None:
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != channels):
        raise RuntimeError(f"{_name(op)}: expected bias of shape ({channels},) to match {rule}, "
                           f"got {list(bias.shape)}")


def _empty_dtype(op: str, input: Tensor) -> None:
    """An empty conv still needs a floating input (its dtype is the result's)."""
    if not input.is_floating_point():
        check_dtype(op, "input", input)


def Result(shape, empty_dtype=None, spatial=None) -> tuple:
    """What a validator hands the op, a plain tuple ``(shape, empty_dtype, spatial)`` (a class instance
    costs more than the whole fast check): the output shape; for a zero-size case the dtype of the result
    the op returns without running a kernel (None when a kernel runs); the output's spatial sizes."""
    return shape, empty_dtype, spatial


def conv_op(op: str, ndim: int, input, weight, bias, stride, padding, padding_end, dilation, groups) -> tuple:
    """``fastconv::conv{d}d``: input (N, C, *S), weight (K, C/groups, *k), bias (K,) or None.

    Zero sizes, as ``aten.convolution``: N == 0 gives (0, K, *O) in the input's dtype; C == 0 gives
    (N, 0, *O) in ``promote_types(input, weight)`` (torch's empty-path quirk: its channel dim is 0, not K);
    a zero spatial size with N, C > 0 is refused. On those empty paths torch compares only the bias dtype
    with the input's (so a float32 input with a float64 weight and batch 0 is accepted), and so does this.

    Every op call runs this, so it is written as one fast pass over plain tuples that only falls into
    :func:`_conv_op_error` (which finds and words the first problem) when something is wrong.
    """
    if not (isinstance(input, Tensor) and isinstance(weight, Tensor) and (bias is None or isinstance(bias, Tensor))):
        _conv_op_error(op, ndim, input, weight, bias, stride, padding, padding_end, dilation, groups)
    xs, ws = tuple(input.shape), tuple(weight.shape)
    n = ndim + 2
    if (len(xs) != n or len(ws) != n or len(stride) != ndim or len(padding) != ndim or len(padding_end) != ndim
            or len(dilation) != ndim or min(stride + dilation) < 1 or min(padding + padding_end) < 0
            or not isinstance(groups, (int, torch.SymInt)) or isinstance(groups, bool) or groups < 1):
        _conv_op_error(op, ndim, input, weight, bias, stride, padding, padding_end, dilation, groups)
    K = ws[0]
    if K < 1 or K % groups or xs[1] != ws[1] * groups or (bias is not None and bias.shape != (K,)):
        _conv_op_error(op, ndim, input, weight, bias, stride, padding, padding_end, dilation, groups)
    out = []
    padded = 1
    for i in range(ndim):
        k, d = ws[2 + i], dilation[i]
        eff = d * (k - 1) + 1
        size = xs[2 + i] + padding[i] + padding_end[i]
        if k < 1 or size < eff:
            _conv_op_error(op, ndim, input, weight, bias, stride, padding, padding_end, dilation, groups)
        out.append((size - eff) // stride[i] + 1)
        padded *= size
    if padded > MAX_OUTPUT_BYTES // 8:
        check_padded_input(op, xs[2:], padding, padding_end)
    dev = input.device  # (get_device() is cheaper but cannot tell cpu from meta)
    if weight.device != dev or (bias is not None and bias.device != dev):
        check_same(op, "input", input, dtype=False, weight=weight, bias=bias)
    dt = input.dtype
    N, C = xs[0], xs[1]
    if N == 0 or C == 0:
        _empty_dtype(op, input)
        if bias is not None and bias.dtype != dt:
            raise RuntimeError(f"{_name(op)}: input has dtype {dt} but bias has dtype {bias.dtype}; "
                               f"they must be the same")
        # an empty result still may not have sizes no sample of it could ever be allocated with
        check_output_bytes(op, (1, K, *out), dt)
        if C == 0:
            return (N, 0, *out), torch.promote_types(dt, weight.dtype), out
        return (N, K, *out), dt, out
    if dt not in SUPPORTED_DTYPES or weight.dtype != dt or (bias is not None and bias.dtype != dt):
        check_dtype(op, "input", input)
        check_same(op, "input", input, weight=weight, bias=bias)
    if 0 in xs:
        _zero_spatial(op, "input", xs)
    shape = (N, K, *out)
    if N * K * math.prod(out) > MAX_OUTPUT_BYTES // 8:
        check_output_bytes(op, shape, dt)
    return shape, None, out


def _conv_op_error(op: str, ndim: int, input, weight, bias, stride, padding, padding_end, dilation, groups):
    """Raise the error :func:`conv_op`'s fast pass detected, checking in aten's order and wording it."""
    check_type(op, "input", input)
    check_type(op, "weight", weight)
    check_type(op, "bias", bias, optional=True)
    lay = "(N, C, " + ", ".join("DHW"[3 - ndim:]) + ")"
    _rank(op, "input", input, ndim + 2, lay + " (the registered op takes batched input)")
    _rank(op, "weight", weight, ndim + 2, "(out_channels, in_channels/groups, " + "x".join("k" * ndim) + ")")
    _conv_lists(op, ndim, stride, padding, padding_end, dilation, groups)
    ws, xs = weight.shape, input.shape
    _conv_weight(op, ws, groups)
    in_per_group = ws[1]
    if xs[1] != in_per_group * groups:
        raise RuntimeError(
            f"{_name(op)}: weight has {in_per_group} input channels per group but input has {xs[1]} channels "
            f"with groups={groups} (expected input.shape[1] == weight.shape[1] * groups == {in_per_group * groups})")
    _bias(op, bias, ws[0], "weight.shape[0]")
    _conv_fits(op, xs[2:], ws[2:], dilation, padding, padding_end)
    raise AssertionError(f"{_name(op)}: validation found no error in a call its fast pass refused")  # unreachable


def conv_grad_input_op(op: str, ndim: int, grad_output, weight, input_size, stride, padding, padding_end,
                       dilation, groups) -> tuple:
    """``fastconv::conv{d}d_grad_input``: grad_output (N, K, *O), weight (K, C/groups, *k) -> (N, C, *input_size).

    ``O`` must be what the convolution of an ``input_size`` input gives (torch's convolution_backward
    checks the same). N == 0 or C == 0: zeros, no kernel.
    """
    check_type(op, "grad_output", grad_output)
    check_type(op, "weight", weight)
    _rank(op, "grad_output", grad_output, ndim + 2, "(N, K, *output spatial)")
    _rank(op, "weight", weight, ndim + 2, "(out_channels, in_channels/groups, " + "x".join("k" * ndim) + ")")
    op_ints(op, "input_size", input_size, ndim, 0)
    _conv_lists(op, ndim, stride, padding, padding_end, dilation, groups)
    ws, gs = weight.shape, grad_output.shape
    _conv_weight(op, ws, groups)
    if gs[1] != ws[0]:
        raise RuntimeError(f"{_name(op)}: grad_output has {gs[1]} channels but weight has {ws[0]} output "
                           f"channels (expected grad_output.shape[1] == weight.shape[0])")
    _conv_fits(op, input_size, ws[2:], dilation, padding, padding_end, arg="input_size")
    check_padded_input(op, input_size, padding, padding_end, arg="input_size")
    expected = [conv_output_size(i, k, s, pb, pe, d) for i, k, s, pb, pe, d
                in zip(input_size, ws[2:], stride, padding, padding_end, dilation)]
    if list(gs[2:]) != expected:
        raise RuntimeError(f"{_name(op)}: expected grad_output of spatial size {tuple(expected)} (the convolution "
                           f"output of input_size={list(input_size)} with this kernel, stride, padding and "
                           f"dilation), got grad_output of size {list(gs)}")
    check_same(op, "grad_output", grad_output, dtype=False, weight=weight)
    channels = ws[1] * groups
    shape = (gs[0], channels, *input_size)
    if gs[0] == 0 or channels == 0:
        _empty_dtype(op, grad_output)
        return Result(shape, grad_output.dtype)
    if 0 in input_size:
        _zero_spatial(op, "input_size", input_size)
    check_dtype(op, "grad_output", grad_output)
    check_same(op, "grad_output", grad_output, weight=weight)
    check_output_bytes(op, shape, grad_output.dtype)
    return Result(shape)


def conv_grad_weight_op(op: str, ndim: int, grad_output, input, weight_size, stride, padding, padding_end,
                        dilation, groups) -> tuple:
    """``fastconv::conv{d}d_grad_weight``: grad_output (N, K, *O), input (N, C, *S) -> (K, C/groups, *weight_size).

    N == 0 gives zeros and C == 0 an empty weight gradient, without a kernel.
    """
    check_type(op, "grad_output", grad_output)
    check_type(op, "input", input)
    _rank(op, "grad_output", grad_output, ndim + 2, "(N, K, *output spatial)")
    _rank(op, "input", input, ndim + 2, "(N, C, *spatial)")
    op_ints(op, "weight_size", weight_size, ndim, 1)
    _conv_lists(op, ndim, stride, padding, padding_end, dilation, groups)
    gs, xs = grad_output.shape, input.shape
    if gs[0] != xs[0]:
        raise RuntimeError(f"{_name(op)}: grad_output has batch size {gs[0]} but input has {xs[0]} "
                           f"(expected grad_output.shape[0] == input.shape[0])")
    _conv_weight(op, (gs[1], 1, *weight_size), groups, what="grad_output (as the weight's out_channels)")
    if xs[1] % groups != 0:
        raise RuntimeError(f"{_name(op)}: groups={groups} must divide in_channels, but input has {xs[1]} "
                           f"channels (input.shape[1] % groups == {xs[1] % groups})")
    _conv_fits(op, xs[2:], weight_size, dilation, padding, padding_end)
    check_padded_input(op, xs[2:], padding, padding_end)
    expected = [conv_output_size(i, k, s, pb, pe, d) for i, k, s, pb, pe, d
                in zip(xs[2:], weight_size, stride, padding, padding_end, dilation)]
    if list(gs[2:]) != expected:
        raise RuntimeError(f"{_name(op)}: expected grad_output of spatial size {tuple(expected)} (the convolution "
                           f"output of input {list(xs)} with weight_size={list(weight_size)}, stride, padding and "
                           f"dilation), got grad_output of size {list(gs)}")
    check_same(op, "input", input, dtype=False, grad_output=grad_output)
    shape = (gs[1], xs[1] // groups, *weight_size)
    if xs[0] == 0 or xs[1] == 0:
        _empty_dtype(op, input)
        return Result(shape, input.dtype)
    if 0 in xs[2:]:
        _zero_spatial(op, "input", xs)
    check_dtype(op, "input", input)
    check_same(op, "input", input, grad_output=grad_output)
    return Result(shape)


def conv_transpose_op(op: str, ndim: int, input, weight, bias, stride, padding, output_padding, dilation,
                      groups) -> tuple:
    """``fastconv::conv_transpose{d}d``: input (N, C_in, *I), weight (C_in, C_out/groups, *k), bias (C_out,).

    As ``aten.convolution(transposed=True)``: C_in >= 1, C_out/groups >= 1, output_padding smaller than
    stride or dilation, every output size positive; N == 0 gives (0, C_out, *O) in the input's dtype with
    no dtype check of weight or bias (torch's empty path); a zero spatial size with N > 0 is refused.
    """
    check_type(op, "input", input)
    check_type(op, "weight", weight)
    check_type(op, "bias", bias, optional=True)
    lay = "(N, C_in, " + ", ".join("DHW"[3 - ndim:]) + ")"
    _rank(op, "input", input, ndim + 2, lay + " (the registered op takes batched input)")
    _rank(op, "weight", weight, ndim + 2, "(in_channels, out_channels/groups, " + "x".join("k" * ndim) + ")")
    op_ints(op, "stride", stride, ndim, 1)
    op_ints(op, "padding", padding, ndim, 0)
    op_ints(op, "output_padding", output_padding, ndim, 0)
    op_ints(op, "dilation", dilation, ndim, 1)
    check_groups(op, groups)
    ws, xs = weight.shape, input.shape
    if ws[0] < 1:
        raise RuntimeError(f"{_name(op)}: expected weight to be at least 1 at dimension 0 (in_channels), got "
                           f"weight of size {list(ws)}")
    if ws[0] % groups != 0:
        raise RuntimeError(f"{_name(op)}: groups={groups} must divide in_channels, but weight has {ws[0]} input "
                           f"channels (weight.shape[0] % groups == {ws[0] % groups})")
    if xs[1] != ws[0]:
        raise RuntimeError(
            f"{_name(op)}: weight has {ws[0]} input channels (weight.shape[0]; the layout is (in_channels, "
            f"out_channels/groups, *kernel)) but input has {xs[1]} channels "
            f"(expected input.shape[1] == weight.shape[0] == {ws[0]})")
    if ws[1] < 1:
        raise RuntimeError(f"{_name(op)}: expected a non-empty weight, got weight of size {list(ws)} "
                           f"(out_channels/groups == 0)")
    if any(k < 1 for k in ws[2:]):
        raise RuntimeError(f"{_name(op)}: kernel size should be greater than zero, but got weight of size "
                           f"{list(ws)} (kernel {tuple(ws[2:])})")
    for i, (o, s, d) in enumerate(zip(output_padding, stride, dilation)):
        if o >= s and o >= d:
            raise RuntimeError(
                f"{_name(op)}: output padding must be smaller than either stride or dilation, but got "
                f"output_padding={tuple(output_padding)}, stride={tuple(stride)}, dilation={tuple(dilation)} "
                f"(spatial dim {i}: {o} >= {s} and {o} >= {d})")
    out_channels = ws[1] * groups
    _bias(op, bias, out_channels, f"weight.shape[1] * groups = {ws[1]} * {groups}")
    out = [transposed_output_size(i, k, s, p, o, d) for i, k, s, p, o, d
           in zip(xs[2:], ws[2:], stride, padding, output_padding, dilation)]
    if any(o <= 0 for o in out):
        raise RuntimeError(
            f"{_name(op)}: computed output size {tuple(out)} is too small: each must be positive. "
            f"Output size = (input - 1)*stride - 2*padding + dilation*(kernel - 1) + output_padding + 1 "
            f"with input {tuple(xs[2:])}, kernel {tuple(ws[2:])}, stride {tuple(stride)}, padding "
            f"{tuple(padding)}, dilation {tuple(dilation)}, output_padding {tuple(output_padding)}; reduce the "
            f"padding")
    check_same(op, "input", input, dtype=False, weight=weight, bias=bias)
    shape = (xs[0], out_channels, *out)
    if xs[0] == 0:
        _empty_dtype(op, input)
        check_output_bytes(op, (1, *shape[1:]), input.dtype)
        return Result(shape, input.dtype, out)
    if 0 in xs[2:]:
        _zero_spatial(op, "input", xs)
    check_dtype(op, "input", input)
    check_same(op, "input", input, weight=weight, bias=bias)
    check_output_bytes(op, shape, input.dtype)
    return Result(shape, None, out)


def separable_op(op: str, input, dw, pw, db, pb, stride, padding, padding_end, dilation) -> tuple:
    """``fastconv::depthwise_separable_conv2d``: input (N, C, H, W), dw (M, 1, kh, kw) with M = m*C,
    pw (K, M, 1, 1), db (M,), pb (K,). N == 0 gives (0, K, OH, OW) as the two torch convs would."""
    for arg, t in (("input", input), ("depthwise_weight", dw), ("pointwise_weight", pw)):
        check_type(op, arg, t)
    check_type(op, "depthwise_bias", db, optional=True)
    check_type(op, "pointwise_bias", pb, optional=True)
    _rank(op, "input", input, 4, "(N, C, H, W) (the registered op takes batched input)")
    _rank(op, "depthwise_weight", dw, 4, "(in_channels * depth_multiplier, 1, kh, kw)")
    _rank(op, "pointwise_weight", pw, 4, "(out_channels, in_channels * depth_multiplier, 1, 1)")
    _conv_lists(op, 2, stride, padding, padding_end, dilation, 1)
    C, M = input.shape[1], dw.shape[0]
    if dw.shape[1] != 1:
        raise RuntimeError(f"{_name(op)}: depthwise_weight must have 1 input channel per group (shape (M, 1, kh, "
                           f"kw)), got depthwise_weight of size {list(dw.shape)}")
    if C == 0 or M == 0 or M % C != 0:
        raise RuntimeError(f"{_name(op)}: depthwise_weight has {M} output channels, which is not a positive "
                           f"multiple of the input's {C} channels (expected depthwise_weight.shape[0] == "
                           f"input.shape[1] * depth_multiplier)")
    if any(k < 1 for k in dw.shape[2:]):
        raise RuntimeError(f"{_name(op)}: kernel size should be greater than zero, but got depthwise_weight of "
                           f"size {list(dw.shape)}")
    if pw.shape[0] < 1:
        raise RuntimeError(f"{_name(op)}: expected pointwise_weight to be at least 1 at dimension 0, got "
                           f"pointwise_weight of size {list(pw.shape)}")
    if pw.shape[1] != M:
        raise RuntimeError(f"{_name(op)}: pointwise_weight has {pw.shape[1]} input channels but depthwise_weight "
                           f"has {M} output channels (expected pointwise_weight.shape[1] == "
                           f"depthwise_weight.shape[0])")
    if tuple(pw.shape[2:]) != (1, 1):
        raise RuntimeError(f"{_name(op)}: pointwise_weight must be 1x1 (shape (out_channels, {M}, 1, 1)), "
                           f"got kernel {tuple(pw.shape[2:])}")
    if db is not None and tuple(db.shape) != (M,):
        raise RuntimeError(f"{_name(op)}: expected depthwise_bias of shape ({M},) to match "
                           f"depthwise_weight.shape[0], got {list(db.shape)}")
    if pb is not None and tuple(pb.shape) != (pw.shape[0],):
        raise RuntimeError(f"{_name(op)}: expected pointwise_bias of shape ({pw.shape[0]},) to match "
                           f"pointwise_weight.shape[0], got {list(pb.shape)}")
    _conv_fits(op, input.shape[2:], dw.shape[2:], dilation, padding, padding_end)
    check_padded_input(op, input.shape[2:], padding, padding_end)
    out = [conv_output_size(i, k, s, b, e, d) for i, k, s, b, e, d
           in zip(input.shape[2:], dw.shape[2:], stride, padding, padding_end, dilation)]
    check_same(op, "input", input, dtype=False, depthwise_weight=dw, pointwise_weight=pw, depthwise_bias=db,
               pointwise_bias=pb)
    shape = (input.shape[0], pw.shape[0], *out)
    if input.shape[0] == 0:
        _empty_dtype(op, input)
        for arg, b in (("depthwise_bias", db), ("pointwise_bias", pb)):
            if b is not None and b.dtype != input.dtype:
                raise RuntimeError(f"{_name(op)}: input has dtype {input.dtype} but {arg} has dtype {b.dtype}; "
                                   f"they must be the same")
        return Result(shape, input.dtype, out)
    if 0 in input.shape[2:]:
        _zero_spatial(op, "input", input.shape)
    check_dtype(op, "input", input)
    check_same(op, "input", input, depthwise_weight=dw, pointwise_weight=pw, depthwise_bias=db, pointwise_bias=pb)
    check_output_bytes(op, shape, input.dtype)
    return Result(shape, None, out)


# ------------------------------------------------------------------------------------------------
# pooling
# ------------------------------------------------------------------------------------------------
def pool_output_size(in_size: int, kernel: int, stride: int, padding: int, dilation: int,
                     ceil_mode: bool) -> int:
    """torch's pooling output length; with ceil_mode a window starting in the right padding is dropped."""
    numerator = in_size + 2 * padding - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = numerator // stride + 1
    if ceil_mode and (out - 1) * stride >= in_size + padding:
        out -= 1
    return out


def pool_input_op(op: str, input, ndim: int, *, allow_zero_channels: bool = False,
                  allowed: Sequence[torch.dtype] = SUPPORTED_DTYPES) -> bool:
    """A pooling op's (N, C, *S) input. Returns True when N == 0 (or C == 0 where allowed): an empty result.

    torch's pooling accepts a zero batch only; adaptive average pooling also a zero channel count. A zero
    spatial size is always refused (RuntimeError, as torch).
    """
    check_type(op, "input", input)
    lay = "(N, C, " + ", ".join("DHW"[3 - ndim:]) + ")"
    _rank(op, "input", input, ndim + 2, lay + " (the registered op takes batched input)")
    check_dtype(op, "input", input, allowed)
    shape = input.shape
    for d in range(1, ndim + 2):
        if shape[d] == 0 and not (d == 1 and allow_zero_channels):
            raise RuntimeError(f"{_name(op)}: expected input with non-zero size in every dim but the batch dim"
                               f"{' and the channel dim' if allow_zero_channels else ''}, got input of size "
                               f"{list(shape)}")
    return shape[0] == 0 or shape[1] == 0


def pool_window_op(op: str, ndim: int, kernel_size, stride, padding, dilation=None) -> None:
    """Registered-op window lists: ndim values each; kernel, stride, dilation >= 1; 0 <= padding <= kernel // 2."""
    op_ints(op, "kernel_size", kernel_size, ndim, 1)
    op_ints(op, "stride", stride, ndim, 1)
    op_ints(op, "padding", padding, ndim, 0)
    if dilation is not None:
        op_ints(op, "dilation", dilation, ndim, 1)
    for arg, values in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation or ())):
        # torch's pooling takes these as C int: larger values are refused there too (and would make the
        # kernels' per-stride scratch buffers impossible to allocate)
        if max(values, default=0) > INT32_MAX:
            raise RuntimeError(f"{_name(op)}: {arg}={list(values)} cannot be converted to a 32-bit int without "
                               f"overflow (each value must be at most {INT32_MAX})")
    check_pool_padding(op, padding, kernel_size)


def check_pool_padding(op: str, padding, kernel) -> None:
    for p, k in zip(padding, kernel):
        if p > k // 2:
            raise RuntimeError(f"{_name(op)}: pad should be at most half of kernel size, but got "
                               f"padding={tuple(padding)} and kernel_size={tuple(kernel)}")


def check_pool_output(op: str, in_spatial, out) -> None:
    if any(o < 1 for o in out):
        raise RuntimeError(f"{_name(op)}: output size is too small: input spatial size {tuple(in_spatial)} gives "
                           f"output size {tuple(out)}; use a smaller kernel/stride or more padding")


def max_pool_dtypes(target: Optional[str]) -> Sequence[torch.dtype]:
    """What ``max_pool`` accepts on ``target``: the float dtypes, plus integers on the CPU. ``target=None``
    (a fake tensor, a meta device: no kernel runs) accepts what any target does."""
    if target is None or target in INTEGER_POOL_TARGETS:
        return SUPPORTED_DTYPES + INTEGER_POOL_DTYPES
    return SUPPORTED_DTYPES


def max_pool_op(op: str, input, kernel_size, stride, padding, dilation, ceil_mode, target: Optional[str]) -> tuple:
    """``fastconv::max_pool``: (N, C, *S) with len(kernel_size) spatial dims -> (N, C, *O) values and indices."""
    ndim = _spatial_rank(op, "kernel_size", kernel_size)
    empty = pool_input_op(op, input, ndim, allowed=max_pool_dtypes(target))
    pool_window_op(op, ndim, kernel_size, stride, padding, dilation)
    out = [pool_output_size(i, k, s, p, d, ceil_mode)
           for i, k, s, p, d in zip(input.shape[2:], kernel_size, stride, padding, dilation)]
    check_pool_output(op, input.shape[2:], out)
    shape = (*input.shape[:2], *out)
    check_output_bytes(op, shape, torch.int64)
    return Result(shape, input.dtype if empty else None, out)


def avg_pool_op(op: str, input, kernel_size, stride, padding, ceil_mode, divisor_override) -> tuple:
    """``fastconv::avg_pool``: (N, C, *S) -> (N, C, *O); ``divisor_override`` 0 means none."""
    ndim = _spatial_rank(op, "kernel_size", kernel_size)
    empty = pool_input_op(op, input, ndim)
    pool_window_op(op, ndim, kernel_size, stride, padding)
    if ndim == 3 and any(i < k for i, k in zip(input.shape[2:], kernel_size)):
        # torch's avg_pool3d (only) compares the kernel with the unpadded input
        raise RuntimeError(f"{_name(op)}: input image {tuple(input.shape[2:])} is smaller than kernel size "
                           f"{tuple(kernel_size)} (3-D average pooling needs the kernel to fit the unpadded input)")
    out = [pool_output_size(i, k, s, p, 1, ceil_mode)
           for i, k, s, p in zip(input.shape[2:], kernel_size, stride, padding)]
    check_pool_output(op, input.shape[2:], out)
    shape = (*input.shape[:2], *out)
    check_output_bytes(op, shape, input.dtype)
    return Result(shape, input.dtype if empty else None, out)


def _grad_output(op: str, grad_output, ndim: int, *, allow_zero_channels: bool = True) -> None:
    check_type(op, "grad_output", grad_output)
    _rank(op, "grad_output", grad_output, ndim + 2, "(N, C, *output spatial)")
    check_dtype(op, "grad_output", grad_output)
    if not allow_zero_channels and grad_output.shape[1] == 0:
        # the forward refuses zero channels, and torch's backward ops do too
        raise RuntimeError(f"{_name(op)}: expected grad_output with non-zero size in every dim but the batch dim, "
                           f"got grad_output of size {list(grad_output.shape)}")


def avg_pool_backward_op(op: str, grad_output, input_size, kernel_size, stride, padding, ceil_mode) -> tuple:
    """``fastconv::avg_pool_backward``: grad_output (N, C, *O) -> (N, C, *input_size); O must be avg_pool's."""
    ndim = _spatial_rank(op, "kernel_size", kernel_size)
    _grad_output(op, grad_output, ndim, allow_zero_channels=False)
    op_ints(op, "input_size", input_size, ndim, 1)
    pool_window_op(op, ndim, kernel_size, stride, padding)
    expected = [pool_output_size(i, k, s, p, 1, ceil_mode)
                for i, k, s, p in zip(input_size, kernel_size, stride, padding)]
    check_pool_output(op, input_size, expected)
    if list(grad_output.shape[2:]) != expected:
        raise RuntimeError(f"{_name(op)}: expected grad_output of spatial size {tuple(expected)} (avg_pool's output "
                           f"for input_size={list(input_size)}), got grad_output of size {list(grad_output.shape)}")
    shape = (*grad_output.shape[:2], *input_size)
    check_output_bytes(op, shape, grad_output.dtype)
    return Result(shape, grad_output.dtype if grad_output.numel() == 0 else None)


def _indices(op: str, indices, ref_name: str, ref: Tensor, *, full_shape: bool = True) -> None:
    check_type(op, "indices", indices)
    if indices.dtype != torch.int64:
        raise RuntimeError(f"{_name(op)}: expected indices of dtype torch.int64 (as returned by max_pool with "
                           f"return_indices=True), got {indices.dtype}")
    if indices.device != ref.device:
        raise RuntimeError(f"{_name(op)}: {ref_name} is on {ref.device} but indices are on {indices.device}")
    if full_shape and indices.shape != ref.shape:
        raise RuntimeError(f"{_name(op)}: expected indices to have the same shape as {ref_name}, got {ref_name} "
                           f"{list(ref.shape)} and indices {list(indices.shape)}")


def max_pool_backward_op(op: str, grad_output, indices, input_size) -> tuple:
    """``fastconv::max_pool_backward``: scatter-add grad_output (N, C, *O) at int64 indices (N, C, *O)
    into zeros (N, C, *input_size)."""
    check_type(op, "grad_output", grad_output)
    ndim = _spatial_rank(op, "input_size", input_size)
    _grad_output(op, grad_output, ndim, allow_zero_channels=False)
    op_ints(op, "input_size", input_size, ndim, 1)
    _indices(op, indices, "grad_output", grad_output)
    shape = (*grad_output.shape[:2], *input_size)
    check_output_bytes(op, shape, grad_output.dtype)
    return Result(shape, grad_output.dtype if grad_output.numel() == 0 else None)


def max_unpool_op(op: str, input, indices, output_size) -> tuple:
    """``fastconv::max_unpool``: scatter input (N, C, *S) at indices (N, C, *S) into zeros (N, C, *output_size)."""
    check_type(op, "input", input)
    ndim = _spatial_rank(op, "output_size", output_size)
    empty = pool_input_op(op, input, ndim)
    op_ints(op, "output_size", output_size, ndim, 0)
    _indices(op, indices, "input", input)
    shape = (*input.shape[:2], *output_size)
    check_output_bytes(op, shape, input.dtype)
    return Result(shape, input.dtype if empty else None)


def max_unpool_backward_op(op: str, grad_output, indices) -> tuple:
    """``fastconv::max_unpool_backward``: gather grad_output (N, C, *O) at indices (N, C, *S) -> (N, C, *S)."""
    check_type(op, "grad_output", grad_output)
    check_type(op, "indices", indices)
    ndim = grad_output.dim() - 2
    if ndim not in (1, 2, 3):
        raise RuntimeError(f"{_name(op)}: expected grad_output to be 3-D, 4-D or 5-D (N, C, *spatial), got "
                           f"{grad_output.dim()}-D grad_output of size {list(grad_output.shape)}")
    _grad_output(op, grad_output, ndim)
    _rank(op, "indices", indices, ndim + 2, "(N, C, *input spatial), like grad_output")
    _indices(op, indices, "grad_output", grad_output, full_shape=False)
    if indices.shape[:2] != grad_output.shape[:2]:
        raise RuntimeError(f"{_name(op)}: expected indices and grad_output to share (N, C), got indices "
                           f"{list(indices.shape)} and grad_output {list(grad_output.shape)}")
    if grad_output.numel() == 0 and indices.numel() != 0:
        raise RuntimeError(f"{_name(op)}: indices {list(indices.shape)} point into an empty grad_output "
                           f"{list(grad_output.shape)}")
    return Result(tuple(indices.shape), grad_output.dtype if indices.numel() == 0 else None)


def adaptive_pool_op(op: str, input, output_size, *, allow_zero_channels: bool) -> tuple:
    """``fastconv::adaptive_{avg,max}_pool``: (N, C, *S) -> (N, C, *output_size), each output size >= 0."""
    ndim = _spatial_rank(op, "output_size", output_size)
    empty = pool_input_op(op, input, ndim, allow_zero_channels=allow_zero_channels)
    op_ints(op, "output_size", output_size, ndim, 0)
    shape = (*input.shape[:2], *output_size)
    check_output_bytes(op, shape, torch.int64)
    return Result(shape, input.dtype if empty or 0 in output_size else None)


def adaptive_avg_pool_backward_op(op: str, grad_output, input_size) -> tuple:
    """``fastconv::adaptive_avg_pool_backward``: grad_output (N, C, *O) -> (N, C, *input_size)."""
    check_type(op, "grad_output", grad_output)
    ndim = _spatial_rank(op, "input_size", input_size)
    _grad_output(op, grad_output, ndim)
    op_ints(op, "input_size", input_size, ndim, 1)
    if 0 in grad_output.shape[1:]:
        # torch's adaptive_avg_pool backward refuses these too (so a zero-channel forward has no gradient)
        raise RuntimeError(f"{_name(op)}: expected grad_output to have non-zero size for non-batch dimensions, "
                           f"got grad_output of size {list(grad_output.shape)}")
    shape = (*grad_output.shape[:2], *input_size)
    check_output_bytes(op, shape, grad_output.dtype)
    return Result(shape, grad_output.dtype if grad_output.numel() == 0 else None)
