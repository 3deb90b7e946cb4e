"""MobileNet v1 (Howard et al. 2017) from fastconv layers.

A 3x3/2 standard conv to 32 channels, then 13 depthwise-separable blocks -- a 3x3 depthwise conv
(``groups = channels``) with BatchNorm and ReLU, then a 1x1 pointwise conv with BatchNorm and ReLU -- global
average pooling and a classifier. The paper puts BatchNorm + ReLU *between* the depthwise and pointwise convs,
so each block is two :class:`fastconv.nn.Conv2d` layers rather than one
:class:`fastconv.nn.DepthwiseSeparableConv2d` (which has nothing in between). ``width_multiplier`` (the
paper's alpha) scales every width. 4,231,976 parameters at alpha = 1, 1000 classes.
Input (N, in_channels, H, W), 224 in the paper -> (N, num_classes).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import nn as fnn

__all__ = ["MobileNetV1", "mobilenet_v1", "BLOCKS"]

#: (output channels, stride) of the 13 depthwise-separable blocks (paper, Table 1).
BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(fnn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups,
                                    bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class DepthwiseSeparableBlock(nn.Module):
    """3x3 depthwise (stride) + BN + ReLU, then 1x1 pointwise + BN + ReLU: (N, cin, H, W) -> (N, cout, H/s, W/s)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.depthwise = _conv_bn(cin, cin, 3, stride, groups=cin)
        self.pointwise = _conv_bn(cin, cout, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class MobileNetV1(nn.Module):
    """MobileNet v1: ``stem``, ``blocks`` (13 :class:`DepthwiseSeparableBlock`), ``avgpool``, ``dropout``, ``fc``."""

    def __init__(self, num_classes: int = 1000, width_multiplier: float = 1.0, in_channels: int = 3,
                 dropout: float = 0.0):
        super().__init__()
        width = lambda c: max(1, int(c * width_multiplier))  # noqa: E731
        self.stem = _conv_bn(in_channels, width(32), 3, 2)
        blocks, cin = [], width(32)
        for cout, stride in BLOCKS:
            blocks.append(DepthwiseSeparableBlock(cin, width(cout), stride))
            cin = width(cout)
        self.blocks = nn.Sequential(*blocks)
        self.avgpool = fnn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.blocks(self.stem(x)))
        return self.fc(self.dropout(torch.flatten(x, 1)))


def mobilenet_v1(num_classes: int = 1000, width_multiplier: float = 1.0, in_channels: int = 3,
                 dropout: float = 0.0) -> MobileNetV1:
    """MobileNet v1 with width multiplier alpha (see :class:`MobileNetV1`)."""
    return MobileNetV1(num_classes, width_multiplier, in_channels, dropout)
