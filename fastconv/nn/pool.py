"""Drop-in pooling modules running fastconv's kernels.

Each subclasses torch's module (same constructor, attributes, ``repr``) and replaces only
``forward``; ``MinPool{1,2,3}d`` (no torch counterpart) takes max pooling's arguments.
"""
from __future__ import annotations

import copy

from torch import Tensor, nn
from torch.nn.modules import pooling as torch_pooling

from .. import functional as F
from .convert import replaces


class _FromTorch:
    """Pooling modules carry no parameters: converting is re-classing a shallow copy."""

    @classmethod
    def from_torch(cls, module: nn.Module):
        new = copy.copy(module)
        new.__class__ = cls
        return new


def _max_forward(fn):
    def forward(self, input: Tensor):
        return fn(input, self.kernel_size, self.stride, self.padding, self.dilation,
                  ceil_mode=self.ceil_mode, return_indices=self.return_indices)
    return forward


@replaces(nn.MaxPool1d)
class MaxPool1d(_FromTorch, nn.MaxPool1d):
    """Drop-in :class:`torch.nn.MaxPool1d`: (N, C, L) -> (N, C, L_out)."""
    forward = _max_forward(F.max_pool1d)


@replaces(nn.MaxPool2d)
class MaxPool2d(_FromTorch, nn.MaxPool2d):
    """Drop-in :class:`torch.nn.MaxPool2d`: (N, C, H, W) -> (N, C, H_out, W_out)."""
    forward = _max_forward(F.max_pool2d)


@replaces(nn.MaxPool3d)
class MaxPool3d(_FromTorch, nn.MaxPool3d):
    """Drop-in :class:`torch.nn.MaxPool3d`: (N, C, D, H, W) -> (N, C, D_out, H_out, W_out)."""
    forward = _max_forward(F.max_pool3d)


class MinPool1d(torch_pooling._MaxPoolNd):
    """Min pooling (torch has none), max pooling's arguments: (N, C, L) -> (N, C, L_out)."""
    forward = _max_forward(F.min_pool1d)


class MinPool2d(torch_pooling._MaxPoolNd):
    """Min pooling (torch has none), max pooling's arguments: (N, C, H, W) -> (N, C, H_out, W_out)."""
    forward = _max_forward(F.min_pool2d)


class MinPool3d(torch_pooling._MaxPoolNd):
    """Min pooling (torch has none), max pooling's arguments: (N, C, D, H, W) -> (N, C, *out)."""
    forward = _max_forward(F.min_pool3d)


@replaces(nn.AvgPool1d)
class AvgPool1d(_FromTorch, nn.AvgPool1d):
    """Drop-in :class:`torch.nn.AvgPool1d`: (N, C, L) -> (N, C, L_out)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.avg_pool1d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad)


@replaces(nn.AvgPool2d)
class AvgPool2d(_FromTorch, nn.AvgPool2d):
    """Drop-in :class:`torch.nn.AvgPool2d`: (N, C, H, W) -> (N, C, H_out, W_out)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override)


@replaces(nn.AvgPool3d)
class AvgPool3d(_FromTorch, nn.AvgPool3d):
    """Drop-in :class:`torch.nn.AvgPool3d`: (N, C, D, H, W) -> (N, C, D_out, H_out, W_out)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.avg_pool3d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override)


def _adaptive_avg_forward(fn):
    def forward(self, input: Tensor) -> Tensor:
        return fn(input, self.output_size)
    return forward


def _adaptive_max_forward(fn):
    def forward(self, input: Tensor):
        return fn(input, self.output_size, self.return_indices)
    return forward


@replaces(nn.AdaptiveAvgPool1d)
class AdaptiveAvgPool1d(_FromTorch, nn.AdaptiveAvgPool1d):
    """Drop-in :class:`torch.nn.AdaptiveAvgPool1d`."""
    forward = _adaptive_avg_forward(F.adaptive_avg_pool1d)


@replaces(nn.AdaptiveAvgPool2d)
class AdaptiveAvgPool2d(_FromTorch, nn.AdaptiveAvgPool2d):
    """Drop-in :class:`torch.nn.AdaptiveAvgPool2d` (``(1, 1)`` is global average pooling)."""
    forward = _adaptive_avg_forward(F.adaptive_avg_pool2d)


@replaces(nn.AdaptiveAvgPool3d)
class AdaptiveAvgPool3d(_FromTorch, nn.AdaptiveAvgPool3d):
    """Drop-in :class:`torch.nn.AdaptiveAvgPool3d`."""
    forward = _adaptive_avg_forward(F.adaptive_avg_pool3d)


@replaces(nn.AdaptiveMaxPool1d)
class AdaptiveMaxPool1d(_FromTorch, nn.AdaptiveMaxPool1d):
    """Drop-in :class:`torch.nn.AdaptiveMaxPool1d`."""
    forward = _adaptive_max_forward(F.adaptive_max_pool1d)


@replaces(nn.AdaptiveMaxPool2d)
class AdaptiveMaxPool2d(_FromTorch, nn.AdaptiveMaxPool2d):
    """Drop-in :class:`torch.nn.AdaptiveMaxPool2d`."""
    forward = _adaptive_max_forward(F.adaptive_max_pool2d)


@replaces(nn.AdaptiveMaxPool3d)
class AdaptiveMaxPool3d(_FromTorch, nn.AdaptiveMaxPool3d):
    """Drop-in :class:`torch.nn.AdaptiveMaxPool3d`."""
    forward = _adaptive_max_forward(F.adaptive_max_pool3d)


def _unpool_forward(fn):
    def forward(self, input: Tensor, indices: Tensor, output_size=None) -> Tensor:
        return fn(input, indices, self.kernel_size, self.stride, self.padding, output_size)
    return forward


@replaces(nn.MaxUnpool1d)
class MaxUnpool1d(_FromTorch, nn.MaxUnpool1d):
    """Drop-in :class:`torch.nn.MaxUnpool1d`: ``forward(input, indices, output_size=None)``."""
    forward = _unpool_forward(F.max_unpool1d)


@replaces(nn.MaxUnpool2d)
class MaxUnpool2d(_FromTorch, nn.MaxUnpool2d):
    """Drop-in :class:`torch.nn.MaxUnpool2d`: ``forward(input, indices, output_size=None)``."""
    forward = _unpool_forward(F.max_unpool2d)


@replaces(nn.MaxUnpool3d)
class MaxUnpool3d(_FromTorch, nn.MaxUnpool3d):
    """Drop-in :class:`torch.nn.MaxUnpool3d`: ``forward(input, indices, output_size=None)``."""
    forward = _unpool_forward(F.max_unpool3d)


@replaces(nn.LPPool1d)
class LPPool1d(_FromTorch, nn.LPPool1d):
    """Drop-in :class:`torch.nn.LPPool1d`."""

    def forward(self, input: Tensor) -> Tensor:
        return F.lp_pool1d(input, float(self.norm_type), self.kernel_size, self.stride, self.ceil_mode)


@replaces(nn.LPPool2d)
class LPPool2d(_FromTorch, nn.LPPool2d):
    """Drop-in :class:`torch.nn.LPPool2d`."""

    def forward(self, input: Tensor) -> Tensor:
        return F.lp_pool2d(input, float(self.norm_type), self.kernel_size, self.stride, self.ceil_mode)


__all__ = [
    "MaxPool1d", "MaxPool2d", "MaxPool3d", "MinPool1d", "MinPool2d", "MinPool3d",
    "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
    "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d", "MaxUnpool1d", "MaxUnpool2d", "MaxUnpool3d",
    "LPPool1d", "LPPool2d",
]
