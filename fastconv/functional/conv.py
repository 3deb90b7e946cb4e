"""``conv1d``, ``conv2d``, ``conv3d``: torch.nn.functional's signatures and semantics, plus ``algo=``."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import registry
from ..ops import conv as conv_ops
from ._checks import IntOrSeq, batched, check_groups, check_same, check_type, int_tuple, plain
from ..ops._layout import laid_out, result_format
from ..ops.eager import direct_grad_ok, direct_ok
from ..ops.repeat_call import conv_repeat_call

Padding = Union[str, IntOrSeq]


class ConvArgs:
    """Normalised arguments of one N-d convolution call (all tuples have ``ndim`` ints).

    Only what the registered op cannot see is checked here (Python types, unbatched input, padding
    strings, ``algo``); shapes, dtypes and devices are checked by the op itself
    (:func:`fastconv.ops.validation.conv_op`), once, before any kernel runs.
    """

    def __init__(self, op: str, ndim: int, input, weight, bias, stride, padding, dilation, groups, algo):
        self.op, self.ndim = op, ndim
        check_type(op, "input", input)
        check_type(op, "weight", weight)
        check_type(op, "bias", bias, optional=True)
        check_same(op, "input", input, dtype=False, weight=weight, bias=bias)
        self.input, self.unbatched = batched(op, "input", input, ndim)
        self.weight, self.bias = weight, bias
        self.groups = check_groups(op, groups)
        self.stride = int_tuple(op, "stride", stride, ndim, minimum=1)
        self.dilation = int_tuple(op, "dilation", dilation, ndim, minimum=1)
        self.padding, self.padding_end = self._padding(padding)
        if not isinstance(algo, str) or algo not in registry.names():
            raise ValueError(f"fastconv.{op}: unknown algo {algo!r}; expected one of {', '.join(registry.names())}")
        self.algo = algo

    def _padding(self, padding) -> tuple[tuple[int, ...], tuple[int, ...]]:
        op, ndim = self.op, self.ndim
        if isinstance(padding, str):
            if padding == "valid":
                zero = (0,) * ndim
                return zero, zero
            if padding == "same":
                if any(s != 1 for s in self.stride):
                    raise RuntimeError(f"fastconv.{op}: padding='same' is not supported for strided convolutions "
                                       f"(got stride={self.stride}); use an explicit padding instead")
                # torch: total = dilation*(k-1); the extra odd element goes after (at the end).
                total = [d * (k - 1) for d, k in zip(self.dilation, self.weight.shape[2:])]
                before = tuple(t // 2 for t in total)
                return before, tuple(t - b for t, b in zip(total, before))
            raise RuntimeError(f"fastconv.{op}: invalid padding string {padding!r}; expected 'same', 'valid', "
                               f"an int or a tuple of {ndim} ints")
        pad = int_tuple(op, "padding", padding, ndim, minimum=0)
        return pad, pad

    def lists(self) -> tuple[list[int], list[int], list[int], list[int]]:
        return list(self.stride), list(self.padding), list(self.padding_end), list(self.dilation)


#: (ndim, weight's spatial shape, stride, padding, dilation, groups, algo) -> the op's normalised argument
#: lists, for batched calls with hashable arguments (what ``nn`` layers pass): a model repeats each layer's
#: arguments on every call, and normalising them is a fifth of a small call's host time.
_NORMALISED: dict = {}


def _conv(ndim: int, input, weight, bias, stride, padding, dilation, groups, algo) -> Tensor:
    key = None
    if (isinstance(input, Tensor) and isinstance(weight, Tensor) and (bias is None or isinstance(bias, Tensor))
            and input.dim() == ndim + 2 and weight.dim() == ndim + 2 and plain(stride) and plain(padding)
            and plain(dilation) and plain(groups) and type(algo) is str):
        # lists (unhashable), floats and bools (equal to ints as keys) take the full path below
        key = (ndim, weight.shape[2:], stride, padding, dilation, groups, algo)
        args = _NORMALISED.get(key)
        if args is not None:
            dev = input.device
            if weight.device == dev and (bias is None or bias.device == dev):
                # an inference call on plain tensors skips torch's dispatcher (40-150 µs a call; see ops.eager)
                if direct_ok(input, weight, bias):
                    entry = conv_ops.FORWARD_DIRECT
                elif direct_grad_ok(input, weight, bias):  # a training call: autograd without the dispatcher
                    entry = conv_ops.FORWARD_GRAD_DIRECT
                else:
                    entry = conv_ops.FORWARD
                return laid_out(entry[ndim](input, weight, bias, *args), result_format(input, weight))
    op = f"conv{ndim}d"
    a = ConvArgs(op, ndim, input, weight, bias, stride, padding, dilation, groups, algo)
    args = (*a.lists(), a.groups, a.algo)
    if not a.unbatched and key is not None and len(_NORMALISED) < 4096:
        _NORMALISED[key] = args
    out = conv_ops.OPS[ndim][0](a.input, a.weight, a.bias, *args)
    return out.squeeze(0) if a.unbatched else laid_out(out, result_format(a.input, a.weight))


def repeat_call(ndim: int, input, weight, bias, stride, padding, dilation, groups, algo):
    """For a layer that has just made this call through :func:`_conv`: a
    :class:`~fastconv.ops.repeat_call.ConvRepeatCall` that makes calls like it again with less host work (what
    ``fastconv.nn``'s conv layers keep), or None when such calls keep the full path."""
    if not (plain(stride) and plain(padding) and plain(dilation) and plain(groups) and type(algo) is str
            and isinstance(weight, Tensor) and weight.dim() == ndim + 2 and isinstance(input, Tensor)
            and input.dim() == ndim + 2):
        return None
    args = _NORMALISED.get((ndim, weight.shape[2:], stride, padding, dilation, groups, algo))
    return None if args is None else conv_repeat_call(ndim, input, weight, bias, *args)


def conv1d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntOrSeq = 1,
           padding: Padding = 0, dilation: IntOrSeq = 1, groups: int = 1, *, algo: str = "auto") -> Tensor:
    """1-D convolution (cross-correlation), as :func:`torch.nn.functional.conv1d`.

    input (N, C, L) or (C, L); weight (K, C/groups, R); bias (K,) -> (N, K, L_out) or (K, L_out).
    ``algo`` picks the algorithm (see :func:`fastconv.algorithms`); ``"auto"`` chooses.
    """
    return _conv(1, input, weight, bias, stride, padding, dilation, groups, algo)


def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntOrSeq = 1,
           padding: Padding = 0, dilation: IntOrSeq = 1, groups: int = 1, *, algo: str = "auto") -> Tensor:
    """2-D convolution (cross-correlation), as :func:`torch.nn.functional.conv2d`.

    input (N, C, H, W) or (C, H, W); weight (K, C/groups, R, S); bias (K,) -> (N, K, H_out, W_out)
    with H_out = (H + 2*padding - dilation*(R-1) - 1) // stride + 1. ``padding`` is an int, a pair,
    ``'valid'`` or ``'same'`` (stride 1 only; an even kernel pads one more at the end, like torch).
    ``algo`` picks the algorithm (see :func:`fastconv.algorithms`); ``"auto"`` chooses.
    """
    return _conv(2, input, weight, bias, stride, padding, dilation, groups, algo)


def conv3d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntOrSeq = 1,
           padding: Padding = 0, dilation: IntOrSeq = 1, groups: int = 1, *, algo: str = "auto") -> Tensor:
    """3-D convolution (cross-correlation), as :func:`torch.nn.functional.conv3d`.

    input (N, C, D, H, W) or (C, D, H, W); weight (K, C/groups, T, R, S) -> (N, K, D_out, H_out, W_out).
    """
    return _conv(3, input, weight, bias, stride, padding, dilation, groups, algo)
