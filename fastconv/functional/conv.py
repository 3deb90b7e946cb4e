"""``conv1d``, ``conv2d``, ``conv3d``: torch.nn.functional's signatures and semantics, plus ``algo=``."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import registry
from ..ops import conv as conv_ops
from ._checks import IntOrSeq, batched, check_groups, check_same, check_tensor, int_tuple

Padding = Union[str, IntOrSeq]


class ConvArgs:
    """Validated, normalised arguments of one N-d convolution call (all tuples have ``ndim`` ints)."""

    def __init__(self, op: str, ndim: int, input, weight, bias, stride, padding, dilation, groups, algo):
        self.op, self.ndim = op, ndim
        check_tensor(op, "input", input)
        check_tensor(op, "weight", weight)
        check_tensor(op, "bias", bias, optional=True)
        check_same(op, "input", input, weight=weight, bias=bias)
        if weight.dim() != ndim + 2:
            raise RuntimeError(f"{op}: expected weight to be {ndim + 2}-D (out_channels, in_channels/groups, "
                               f"{'x'.join('k' * ndim)}), got {weight.dim()}-D weight of size {list(weight.shape)}")
        self.input, self.unbatched = batched(op, "input", input, ndim)
        self.weight, self.bias = weight, bias
        self.groups = check_groups(op, groups)
        self.stride = int_tuple(op, "stride", stride, ndim, minimum=1)
        self.dilation = int_tuple(op, "dilation", dilation, ndim, minimum=1)
        self._check_channels()
        self.padding, self.padding_end = self._padding(padding)
        self._check_fits()
        if not isinstance(algo, str) or algo not in registry.names():
            raise ValueError(f"{op}: unknown algo {algo!r}; expected one of {', '.join(registry.names())}")
        self.algo = algo

    def _check_channels(self) -> None:
        op, x, w, g = self.op, self.input, self.weight, self.groups
        out_channels, in_per_group = w.shape[0], w.shape[1]
        if out_channels % g != 0:
            raise RuntimeError(f"{op}: groups={g} must divide out_channels, but weight has {out_channels} "
                               f"output channels (weight.shape[0] % groups == {out_channels % g})")
        if x.shape[1] != in_per_group * g:
            raise RuntimeError(
                f"{op}: weight has {in_per_group} input channels per group but input has {x.shape[1]} channels "
                f"with groups={g} (expected input.shape[1] == weight.shape[1] * groups == {in_per_group * g})")
        if self.bias is not None and tuple(self.bias.shape) != (out_channels,):
            raise RuntimeError(f"{op}: expected bias of shape ({out_channels},) to match weight.shape[0], "
                               f"got {list(self.bias.shape)}")

    def _padding(self, padding) -> tuple[tuple[int, ...], tuple[int, ...]]:
        op, ndim = self.op, self.ndim
        if isinstance(padding, str):
            if padding == "valid":
                zero = (0,) * ndim
                return zero, zero
            if padding == "same":
                if any(s != 1 for s in self.stride):
                    raise RuntimeError(f"{op}: padding='same' is not supported for strided convolutions "
                                       f"(got stride={self.stride}); use an explicit padding instead")
                # torch: total = dilation*(k-1); the extra odd element goes after (at the end).
                total = [d * (k - 1) for d, k in zip(self.dilation, self.weight.shape[2:])]
                before = tuple(t // 2 for t in total)
                return before, tuple(t - b for t, b in zip(total, before))
            raise RuntimeError(f"{op}: invalid padding string {padding!r}; expected 'same', 'valid', "
                               f"an int or a tuple of {ndim} ints")
        pad = int_tuple(op, "padding", padding, ndim, minimum=0)
        return pad, pad

    def _check_fits(self) -> None:
        for i, (size, k, d, pb, pe) in enumerate(zip(self.input.shape[2:], self.weight.shape[2:], self.dilation,
                                                     self.padding, self.padding_end)):
            if size + pb + pe < d * (k - 1) + 1:
                raise RuntimeError(
                    f"{self.op}: kernel size can't be greater than the padded input size: spatial dim {i} of "
                    f"input is {size} (+{pb + pe} padding) but the effective kernel is {d * (k - 1) + 1} "
                    f"(kernel {k}, dilation {d})")

    def lists(self) -> tuple[list[int], list[int], list[int], list[int]]:
        return list(self.stride), list(self.padding), list(self.padding_end), list(self.dilation)


def _conv(ndim: int, input, weight, bias, stride, padding, dilation, groups, algo) -> Tensor:
    op = f"conv{ndim}d"
    a = ConvArgs(op, ndim, input, weight, bias, stride, padding, dilation, groups, algo)
    out = conv_ops.OPS[ndim][0](a.input, a.weight, a.bias, *a.lists(), a.groups, a.algo)
    return out.squeeze(0) if a.unbatched else out


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
