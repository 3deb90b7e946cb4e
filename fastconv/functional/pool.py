"""Pooling: torch.nn.functional's max/avg/adaptive/unpool/lp pooling, plus ``min_pool{1,2,3}d``.

Same names, signatures and semantics as torch (``ceil_mode``'s dropped last window, padding at most
half the kernel, NaN propagation in max pooling, torch's flat indices), checked before any kernel runs.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..ops import pool as pool_ops
from ..ops import validation
from ._checks import IntOrSeq, batched, check_pool_output, check_pool_padding, check_type, int_tuple, plain
from ..ops._layout import laid_out, suggested_format
from ..ops.eager import direct_grad_ok, direct_ok

OptSize = Union[None, int, Sequence[Optional[int]]]


def _input(op: str, input, ndim: int, *, allowed=validation.SUPPORTED_DTYPES,
           allow_zero_channels: bool = False) -> tuple[Tensor, bool]:
    """(N, C, *S) or unbatched (C, *S) -> batched; dtype and zero sizes as the op will check them."""
    check_type(op, "input", input)
    x, unbatched = batched(op, "input", input, ndim)
    # The op checks these too; here the message names the functional op and the caller's shape.
    validation.pool_input_op(op, x, ndim, allowed=allowed, allow_zero_channels=allow_zero_channels)
    return x, unbatched


def _window(op: str, ndim: int, kernel_size, stride, padding, dilation=1):
    kernel = int_tuple(op, "kernel_size", kernel_size, ndim, minimum=1)
    if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0):
        stride = kernel  # torch: stride defaults to kernel_size
    stride = int_tuple(op, "stride", stride, ndim, minimum=1)
    padding = int_tuple(op, "padding", padding, ndim, minimum=0)
    dilation = int_tuple(op, "dilation", dilation, ndim, minimum=1)
    check_pool_padding(op, padding, kernel)
    return kernel, stride, padding, dilation


def _check_output(op: str, x: Tensor, out: Sequence[int]) -> None:
    check_pool_output(op, x.shape[2:], out)


def _finish(t: Tensor, unbatched: bool, like: Optional[Tensor] = None) -> Tensor:
    """Drop the batch dim of an unbatched call; otherwise lay ``t`` out as ``like`` (the input) suggests
    (channels_last in, channels_last out, as torch's pooling)."""
    return t.squeeze(0) if unbatched else laid_out(t, suggested_format(like))


#: (op, input shape, dtype, the caller's arguments) -> the op's normalised arguments, for batched calls whose
#: arguments are plain ints or tuples of them (what ``nn`` layers pass): a model repeats each layer's call, and
#: normalising and checking the arguments again costs about as much as the op's own host code. The key holds
#: everything those checks read, so a hit is a call that passed them before.
_NORMALISED: dict = {}


def _memo(key, value):
    if len(_NORMALISED) >= 4096:
        _NORMALISED.clear()
    _NORMALISED[key] = value


def _entry(name: str, direct: bool, input):
    """The entry of pooling op ``name`` for a call with normalised arguments: its implementation (``direct``:
    nothing records or watches), its autograd Function (a training call with nothing watching), else the
    registered op through torch's dispatcher (see :mod:`fastconv.ops.eager`)."""
    if direct:
        return pool_ops.IMPLEMENTATIONS[name]
    if direct_grad_ok(input):
        return pool_ops.GRAD_DIRECT[name]
    return getattr(pool_ops, name)


def _batched_plain(input, ndim: int, *args) -> bool:
    return isinstance(input, Tensor) and input.dim() == ndim + 2 and all(plain(a) for a in args)


def _extreme_pool(op, ndim, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, minimum):
    key = None
    if _batched_plain(input, ndim, kernel_size, stride, padding, dilation):
        key = (op, input.shape, input.dtype, kernel_size, stride, padding, dilation, bool(ceil_mode))
        lists = _NORMALISED.get(key)
        if lists is not None:
            direct = direct_ok(input)
            if direct and not return_indices:  # no gradient will ask for the indices: values only
                y = pool_ops.IMPLEMENTATIONS["max_pool_values"](input, *lists, bool(ceil_mode), minimum)
                return laid_out(y, suggested_format(input))
            if not (direct or return_indices) and direct_grad_ok(input) and pool_ops.values_training_ok(input, lists[1]):
                # a training call that discards the indices: values-only forward, indices found in the backward
                y = pool_ops.GRAD_DIRECT["max_pool_values"](input, *lists, bool(ceil_mode), minimum)
                return laid_out(y, suggested_format(input))
            run = _entry("max_pool", direct, input)
            y, idx = run(input, *lists, bool(ceil_mode), minimum)
            fmt = suggested_format(input)
            y, idx = laid_out(y, fmt), laid_out(idx, fmt)
            return (y, idx) if return_indices else y
    # Integer inputs too, as torch's max_pool (forward only: integers carry no gradient); the op refuses them
    # on targets without integer kernels (it knows the target; torch.compile cannot trace that look-up here).
    x, unbatched = _input(op, input, ndim, allowed=validation.SUPPORTED_DTYPES + validation.INTEGER_POOL_DTYPES)
    kernel, stride, padding, dilation = _window(op, ndim, kernel_size, stride, padding, dilation)
    out = [pool_ops.pool_output_size(i, k, s, p, d, bool(ceil_mode))
           for i, k, s, p, d in zip(x.shape[2:], kernel, stride, padding, dilation)]
    _check_output(op, x, out)
    lists = (list(kernel), list(stride), list(padding), list(dilation))
    if key is not None:
        _memo(key, lists)
    y, idx = pool_ops.max_pool(x, *lists, bool(ceil_mode), minimum)
    y, idx = _finish(y, unbatched, x), _finish(idx, unbatched, x)
    return (y, idx) if return_indices else y


def _make_extreme(ndim: int, minimum: bool):
    kind = "min" if minimum else "max"
    op = f"{kind}_pool{ndim}d"

    def pool(input: Tensor, kernel_size: IntOrSeq, stride: Optional[IntOrSeq] = None, padding: IntOrSeq = 0,
             dilation: IntOrSeq = 1, ceil_mode: bool = False, return_indices: bool = False):
        return _extreme_pool(op, ndim, input, kernel_size, stride, padding, dilation, ceil_mode, return_indices,
                             minimum)

    pool.__name__ = pool.__qualname__ = op
    spatial = ", ".join("DHW"[3 - ndim:])
    pool.__doc__ = (
        f"{kind.capitalize()} pooling over {ndim} spatial dim(s), as torch.nn.functional.max_pool{ndim}d"
        + (" (torch has no min pooling: this equals ``-max_pool(-x)``, values and indices)" if minimum else "")
        + f".\n\n    input (N, C, {spatial}) or unbatched -> (N, C, *out); with ``return_indices`` also the int64 "
        "flat index of each chosen element within its input plane (torch's indices, accepted by max_unpool)."
        " NaN propagates: a window holding NaN yields NaN. Integer inputs (uint8, int8-int64) work on the CPU, "
        "forward only, as torch's max_pool (values keep the dtype; indices are int64).\n")
    return pool


max_pool1d, max_pool2d, max_pool3d = (_make_extreme(d, False) for d in (1, 2, 3))
min_pool1d, min_pool2d, min_pool3d = (_make_extreme(d, True) for d in (1, 2, 3))


def _avg_pool(op, ndim, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    key = None
    # torch's avg_pool3d returns a contiguous result whatever its input's layout
    if _batched_plain(input, ndim, kernel_size, stride, padding, divisor_override):
        key = (op, input.shape, input.dtype, kernel_size, stride, padding, bool(ceil_mode), bool(count_include_pad),
               divisor_override)
        args = _NORMALISED.get(key)
        if args is not None:
            run = _entry("avg_pool", direct_ok(input), input)
            return laid_out(run(input, *args), suggested_format(input if ndim < 3 else None))
    x, unbatched = _input(op, input, ndim)
    kernel, stride, padding, _ = _window(op, ndim, kernel_size, stride, padding)
    if divisor_override is not None:
        if isinstance(divisor_override, bool) or not isinstance(divisor_override, int) or divisor_override == 0:
            raise RuntimeError(f"fastconv.{op}: divisor must be not zero: got divisor_override={divisor_override!r} "
                               f"(use None for the default divisor)")
    out = [pool_ops.pool_output_size(i, k, s, p, 1, bool(ceil_mode))
           for i, k, s, p in zip(x.shape[2:], kernel, stride, padding)]
    _check_output(op, x, out)
    args = (list(kernel), list(stride), list(padding), bool(ceil_mode), bool(count_include_pad),
            int(divisor_override or 0))
    if key is not None:
        _memo(key, args)
    y = pool_ops.avg_pool(x, *args)
    return _finish(y, unbatched, x if ndim < 3 else None)


def avg_pool1d(input: Tensor, kernel_size: IntOrSeq, stride: Optional[IntOrSeq] = None, padding: IntOrSeq = 0,
               ceil_mode: bool = False, count_include_pad: bool = True) -> Tensor:
    """Average pooling, as torch.nn.functional.avg_pool1d: (N, C, L) or (C, L) -> (N, C, L_out)."""
    return _avg_pool("avg_pool1d", 1, input, kernel_size, stride, padding, ceil_mode, count_include_pad, None)


def avg_pool2d(input: Tensor, kernel_size: IntOrSeq, stride: Optional[IntOrSeq] = None, padding: IntOrSeq = 0,
               ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: Optional[int] = None) -> Tensor:
    """Average pooling, as torch.nn.functional.avg_pool2d: (N, C, H, W) or (C, H, W) -> (N, C, H_out, W_out)."""
    return _avg_pool("avg_pool2d", 2, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override)


def avg_pool3d(input: Tensor, kernel_size: IntOrSeq, stride: Optional[IntOrSeq] = None, padding: IntOrSeq = 0,
               ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: Optional[int] = None) -> Tensor:
    """Average pooling, as torch.nn.functional.avg_pool3d: (N, C, D, H, W) -> (N, C, D_out, H_out, W_out)."""
    return _avg_pool("avg_pool3d", 3, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override)


def _adaptive_size(op: str, ndim: int, x: Tensor, output_size: OptSize) -> list[int]:
    if isinstance(output_size, int) and not isinstance(output_size, bool):
        sizes = [output_size] * ndim
    elif isinstance(output_size, (tuple, list, torch.Size)) and len(output_size) in (1, ndim):
        sizes = list(output_size) * (ndim if len(output_size) == 1 else 1)
    else:
        raise RuntimeError(f"fastconv.{op}: output_size must be an int or a tuple of {ndim} ints (None keeps that input "
                           f"size), got {output_size!r}")
    out = []
    for s, i in zip(sizes, x.shape[2:]):
        if s is None:
            s = i
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise RuntimeError(f"fastconv.{op}: elements of output_size must be non-negative ints or None, "
                               f"got output_size={output_size!r}")
        out.append(s)
    return out


def _adaptive(op, ndim, input, output_size, kind, return_indices=False):
    key = None
    if _batched_plain(input, ndim, output_size):
        key = (op, input.shape, input.dtype, output_size)
        out = _NORMALISED.get(key)
        if out is not None:
            fmt = suggested_format(input if ndim < 3 else None)
            direct = direct_ok(input)  # skips torch's dispatcher where nothing records or watches (ops.eager)
            if kind == "avg":
                return laid_out(_entry("adaptive_avg_pool", direct, input)(input, out), fmt)
            run = _entry("adaptive_max_pool", direct, input)
            y, idx = run(input, out)
            y, idx = laid_out(y, fmt), laid_out(idx, fmt)
            return (y, idx) if return_indices else y
    check_type(op, "input", input)
    if input.dim() == ndim + 1 and input.shape[0] == 0 and 0 not in input.shape[1:]:
        # torch reads an unbatched input with no channels as a batch of none: an empty result, for
        # adaptive max pooling too (which refuses C == 0 in a batched input).
        x, unbatched = input.unsqueeze(1), False
        empty = True
    else:
        # torch's 1-D and 2-D adaptive average pooling accept zero channels, its 3-D one does not
        x, unbatched = _input(op, input, ndim, allow_zero_channels=kind == "avg" and ndim < 3)
        empty = False
    out = _adaptive_size(op, ndim, x, output_size)
    if empty:
        shape = (0, *out)
        y = input.new_zeros(shape)
        return (y, input.new_zeros(shape, dtype=torch.int64)) if return_indices else y
    if key is not None and not unbatched:
        _memo(key, out)
    # torch's 3-D adaptive pooling returns a contiguous result whatever its input's layout
    like = x if ndim < 3 else None
    if kind == "avg":
        return _finish(pool_ops.adaptive_avg_pool(x, out), unbatched, like)
    y, idx = pool_ops.adaptive_max_pool(x, out)
    y, idx = _finish(y, unbatched, like), _finish(idx, unbatched, like)
    return (y, idx) if return_indices else y


def adaptive_avg_pool1d(input: Tensor, output_size: OptSize) -> Tensor:
    """Adaptive average pooling: (N, C, L) -> (N, C, output_size); windows [floor(i*L/O), ceil((i+1)*L/O))."""
    return _adaptive("adaptive_avg_pool1d", 1, input, output_size, "avg")


def adaptive_avg_pool2d(input: Tensor, output_size: OptSize) -> Tensor:
    """Adaptive average pooling: (N, C, H, W) -> (N, C, *output_size); ``None`` keeps that input size."""
    return _adaptive("adaptive_avg_pool2d", 2, input, output_size, "avg")


def adaptive_avg_pool3d(input: Tensor, output_size: OptSize) -> Tensor:
    """Adaptive average pooling: (N, C, D, H, W) -> (N, C, *output_size)."""
    return _adaptive("adaptive_avg_pool3d", 3, input, output_size, "avg")


def adaptive_max_pool1d(input: Tensor, output_size: OptSize, return_indices: bool = False):
    """Adaptive max pooling: (N, C, L) -> (N, C, output_size) [, int64 indices]."""
    return _adaptive("adaptive_max_pool1d", 1, input, output_size, "max", return_indices)


def adaptive_max_pool2d(input: Tensor, output_size: OptSize, return_indices: bool = False):
    """Adaptive max pooling: (N, C, H, W) -> (N, C, *output_size) [, int64 indices]."""
    return _adaptive("adaptive_max_pool2d", 2, input, output_size, "max", return_indices)


def adaptive_max_pool3d(input: Tensor, output_size: OptSize, return_indices: bool = False):
    """Adaptive max pooling: (N, C, D, H, W) -> (N, C, *output_size) [, int64 indices]."""
    return _adaptive("adaptive_max_pool3d", 3, input, output_size, "max", return_indices)


def unpool_output_size(op: str, x: Tensor, kernel, stride, padding, output_size) -> list[int]:
    """torch's rule: default (in-1)*stride - 2*pad + kernel; a given size must lie within one stride of it."""
    ndim = len(kernel)
    default = [(i - 1) * s - 2 * p + k for i, s, p, k in zip(x.shape[2:], stride, padding, kernel)]
    if output_size is None:
        return default
    sizes = list(output_size)
    if len(sizes) == ndim + 2:
        sizes = sizes[2:]
    if len(sizes) != ndim:
        raise ValueError(f"fastconv.{op}: output_size should have {ndim} or {ndim + 2} elements, got {len(sizes)} "
                         f"({tuple(output_size)})")
    for d, (size, base, s) in enumerate(zip(sizes, default, stride)):
        if not base - s < size < base + s:
            raise ValueError(f"fastconv.{op}: invalid output_size {tuple(output_size)}: dim {d} must lie between "
                             f"{base - s + 1} and {base + s - 1} (from kernel_size, stride and padding), got {size}")
    return [int(s) for s in sizes]


def _max_unpool(op, ndim, input, indices, kernel_size, stride, padding, output_size):
    x, unbatched = _input(op, input, ndim)
    check_type(op, "indices", indices)
    idx = indices.unsqueeze(0) if unbatched and indices.dim() == ndim + 1 else indices
    # dtype, device and shape of the indices: checked by the op (fastconv.ops.validation.max_unpool_op)
    kernel, stride, padding, _ = _window(op, ndim, kernel_size, stride, padding)
    out = unpool_output_size(op, x, kernel, stride, padding, output_size)
    return _finish(pool_ops.max_unpool(x, idx, out), unbatched, x)


def max_unpool1d(input: Tensor, indices: Tensor, kernel_size: IntOrSeq, stride: Optional[IntOrSeq] = None,
                 padding: IntOrSeq = 0, output_size: Optional[Sequence[int]] = None) -> Tensor:
    """Partial inverse of max_pool1d: scatter (N, C, L) into zeros at ``indices``."""
    return _max_unpool("max_unpool1d", 1, input, indices, kernel_size, stride, padding, output_size)


def max_unpool2d(input: Tensor, indices: Tensor, kernel_size: IntOrSeq, stride: Optional[IntOrSeq] = None,
                 padding: IntOrSeq = 0, output_size: Optional[Sequence[int]] = None) -> Tensor:
    """Partial inverse of max_pool2d: scatter (N, C, H, W) into zeros (N, C, H_out, W_out) at ``indices``."""
    return _max_unpool("max_unpool2d", 2, input, indices, kernel_size, stride, padding, output_size)


def max_unpool3d(input: Tensor, indices: Tensor, kernel_size: IntOrSeq, stride: Optional[IntOrSeq] = None,
                 padding: IntOrSeq = 0, output_size: Optional[Sequence[int]] = None) -> Tensor:
    """Partial inverse of max_pool3d: scatter (N, C, D, H, W) into zeros at ``indices``."""
    return _max_unpool("max_unpool3d", 3, input, indices, kernel_size, stride, padding, output_size)


def _lp_pool(op, ndim, input, norm_type, kernel_size, stride, ceil_mode):
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or norm_type == 0:
        raise RuntimeError(f"fastconv.{op}: norm_type must be a non-zero number, got {norm_type!r}")
    kernel = int_tuple(op, "kernel_size", kernel_size, ndim, minimum=1)
    # torch's definition: (sum over the window of x^p)^(1/p), via the average times the window size.
    powered = input.pow(norm_type)
    out = _avg_pool(op, ndim, powered, kernel, stride, 0, ceil_mode, True, None)
    return (torch.sign(out) * torch.relu(torch.abs(out))).mul(int(torch.tensor(kernel).prod())).pow(1.0 / norm_type)


def lp_pool1d(input: Tensor, norm_type: float, kernel_size: int, stride: Optional[IntOrSeq] = None,
              ceil_mode: bool = False) -> Tensor:
    """Power-average pooling, as torch.nn.functional.lp_pool1d: (N, C, L) -> (N, C, L_out)."""
    return _lp_pool("lp_pool1d", 1, input, norm_type, kernel_size, stride, ceil_mode)


def lp_pool2d(input: Tensor, norm_type: float, kernel_size: IntOrSeq, stride: Optional[IntOrSeq] = None,
              ceil_mode: bool = False) -> Tensor:
    """Power-average pooling, as torch.nn.functional.lp_pool2d: (N, C, H, W) -> (N, C, H_out, W_out)."""
    return _lp_pool("lp_pool2d", 2, input, norm_type, kernel_size, stride, ceil_mode)


__all__ = [
    "max_pool1d", "max_pool2d", "max_pool3d", "min_pool1d", "min_pool2d", "min_pool3d",
    "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "max_unpool1d", "max_unpool2d", "max_unpool3d", "lp_pool1d", "lp_pool2d",
]
