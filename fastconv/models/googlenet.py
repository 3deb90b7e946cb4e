"""GoogLeNet / Inception v1 (Szegedy et al. 2014) in torchvision's structure, from fastconv layers.

Each conv is torchvision's ``BasicConv2d`` (conv without bias, BatchNorm eps 1e-3, ReLU) and the module names
are torchvision's, so a torchvision ``state_dict`` loads. Inception modules have the paper's 1x1 reductions
before the 3x3 and 5x5 branches and a 1x1 projection after the 3x3 max pool; inception 3a turns 28x28x192
into 28x28x256 (64 + 128 + 32 + 32).

One deliberate difference from the paper, kept for torchvision compatibility: torchvision's "5x5" branch uses
a 3x3 kernel (a known quirk of its port; its weights are trained with it). ``five_by_five=True`` builds the
paper's 5x5 kernels instead (more parameters; torchvision weights then do not load).

Without auxiliary heads: 6,624,904 parameters (1000 classes); the two aux heads (``aux_logits=True``) add
6,379,984 (3,189,992 each). Input (N, 3, H, W), 224 in the paper -> (N, num_classes); in training mode with
aux heads, a :class:`GoogLeNetOutputs` (logits, aux_logits2, aux_logits1).
"""
from __future__ import annotations

from collections import namedtuple
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as torch_F

from .. import functional as F
from .. import nn as fnn

__all__ = ["GoogLeNet", "Inception", "InceptionAux", "BasicConv2d", "GoogLeNetOutputs", "googlenet"]

GoogLeNetOutputs = namedtuple("GoogLeNetOutputs", ["logits", "aux_logits2", "aux_logits1"])


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = fnn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return torch_F.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    """Four branches concatenated on channels: 1x1 | 1x1 -> 3x3 | 1x1 -> "5x5" | 3x3 max pool -> 1x1.
    (N, in_channels, H, W) -> (N, ch1x1 + ch3x3 + ch5x5 + pool_proj, H, W)."""

    def __init__(self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int,
                 pool_proj: int, five_by_five: bool = False):
        super().__init__()
        k5 = 5 if five_by_five else 3
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(in_channels, ch3x3red, kernel_size=1),
                                     BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(in_channels, ch5x5red, kernel_size=1),
                                     BasicConv2d(ch5x5red, ch5x5, kernel_size=k5, padding=k5 // 2))
        self.branch4 = nn.Sequential(fnn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
                                     BasicConv2d(in_channels, pool_proj, kernel_size=1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier: 4x4 adaptive average pool, 1x1 conv to 128, fc 2048 -> 1024, dropout, fc."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.7):
        super().__init__()
        self.conv = BasicConv2d(in_channels, 128, kernel_size=1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(F.adaptive_avg_pool2d(x, (4, 4)))
        x = torch_F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(self.dropout(x))


class GoogLeNet(nn.Module):
    """Inception v1. ``aux_logits`` adds the two auxiliary heads (off by default); ``transform_input``
    re-normalises ImageNet-normalised input as torchvision's pretrained weights expect."""

    def __init__(self, num_classes: int = 1000, aux_logits: bool = False, transform_input: bool = False,
                 dropout: float = 0.2, dropout_aux: float = 0.7, five_by_five: bool = False,
                 init_weights: bool = True):
        super().__init__()
        self.aux_logits = aux_logits
        self.transform_input = transform_input
        inc = lambda *a: Inception(*a, five_by_five=five_by_five)  # noqa: E731
        self.conv1 = BasicConv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = fnn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = fnn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = inc(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = inc(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = fnn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = inc(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = inc(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = inc(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = inc(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = inc(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = fnn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.inception5a = inc(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = inc(832, 384, 192, 384, 48, 128, 128)
        self.aux1: Optional[InceptionAux] = InceptionAux(512, num_classes, dropout_aux) if aux_logits else None
        self.aux2: Optional[InceptionAux] = InceptionAux(528, num_classes, dropout_aux) if aux_logits else None
        self.avgpool = fnn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(1024, num_classes)
        if init_weights:  # torchvision's initialisation
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

    def _transform_input(self, x: Tensor) -> Tensor:
        if not self.transform_input:
            return x
        # ImageNet-normalised -> the (x - 0.5) / 0.5 normalisation the original weights were trained on
        x0 = torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
        x1 = torch.unsqueeze(x[:, 1], 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
        x2 = torch.unsqueeze(x[:, 2], 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
        return torch.cat((x0, x1, x2), 1)

    def forward(self, x: Tensor):
        x = self._transform_input(x)
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        x = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        if self.training and self.aux_logits:
            return GoogLeNetOutputs(x, aux2, aux1)
        return x


def googlenet(num_classes: int = 1000, aux_logits: bool = False, **kwargs) -> GoogLeNet:
    """torchvision-compatible GoogLeNet (see :class:`GoogLeNet`); 6,624,904 parameters without aux heads."""
    return GoogLeNet(num_classes, aux_logits, **kwargs)
