"""VGG (Simonyan & Zisserman 2014), all six configurations of the paper's Table 1, from fastconv layers.

Configurations (numbers are 3x3 conv widths, ``"M"`` a 2x2/2 max pool, ``"LRN"`` local response
normalisation, ``(c, 1)`` a 1x1 conv of width c):

====== ============================================================= ==========
A      1-1-2-2-2 convs per block (11 weight layers)                  132.9 M
A-LRN  A with LRN after the first conv                               132.9 M
B      2-2-2-2-2 (13 weight layers)                                  133.0 M
C      B plus a 1x1 conv at the end of blocks 3, 4, 5 (16 layers)    133.6 M
D      2-2-3-3-3 3x3 convs (16 layers; "VGG-16")                     138.4 M
E      2-2-4-4-4 (19 layers; "VGG-19")                               143.7 M
====== ============================================================= ==========

(224x224 input, 1000 classes.) Module names are torchvision's (``features.<i>``, ``avgpool``,
``classifier.<i>``), so torchvision's ``vgg11/13/16/19`` and ``*_bn`` state_dicts load into
``vgg("A"/"B"/"D"/"E", batch_norm=...)``. Configurations A-LRN and C are not in torchvision.

Input (N, in_channels, H, W), H and W multiples of 32 (at least 32) -> (N, num_classes).
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor, nn

from .. import nn as fnn

__all__ = ["VGG", "vgg", "CONFIGS", "vgg11", "vgg13", "vgg16", "vgg19",
           "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]

Layer = Union[int, str, tuple]

CONFIGS: dict[str, list[Layer]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "A-LRN": [64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "C": [64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M", 512, 512, (512, 1), "M",
          512, 512, (512, 1), "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"],
}


def make_layers(config: list[Layer], batch_norm: bool = False, in_channels: int = 3,
                width_multiplier: float = 1.0) -> nn.Sequential:
    """The convolutional trunk: conv (+BN) + ReLU per width entry, max pools, LRN where configured."""
    layers: list[nn.Module] = []
    for v in config:
        if v == "M":
            layers.append(fnn.MaxPool2d(kernel_size=2, stride=2))
        elif v == "LRN":
            # Krizhevsky et al.'s constants, which the VGG paper reuses
            layers.append(nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0))
        else:
            width, kernel = (v, 3) if isinstance(v, int) else v
            width = max(1, int(round(width * width_multiplier)))
            conv = fnn.Conv2d(in_channels, width, kernel_size=kernel, padding=kernel // 2)
            layers += [conv, nn.BatchNorm2d(width), nn.ReLU()] if batch_norm \
                else [conv, nn.ReLU()]
            in_channels = width
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG: ``features`` (conv trunk), ``avgpool`` (adaptive, to ``pool_size``), ``classifier`` (three linear
    layers with ReLU and dropout). (N, in_channels, H, W) -> (N, num_classes).

    ``width_multiplier`` scales the conv widths and ``hidden`` the classifier's width (4096 in the paper): small
    values give a fast model with the same structure for tests.
    """

    def __init__(self, features: nn.Sequential, num_classes: int = 1000, dropout: float = 0.5,
                 hidden: int = 4096, pool_size: int = 7, init_weights: bool = True) -> None:
        super().__init__()
        self.features = features
        channels = [m.out_channels for m in features if isinstance(m, nn.Conv2d)][-1]
        self.avgpool = fnn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.classifier = nn.Sequential(
            nn.Linear(channels * pool_size * pool_size, hidden), nn.ReLU(), nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        if init_weights:
            # torchvision's initialisation
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.constant_(m.bias, 0)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg(config: str = "D", batch_norm: bool = False, num_classes: int = 1000, in_channels: int = 3,
        width_multiplier: float = 1.0, hidden: int = 4096, pool_size: int = 7, dropout: float = 0.5,
        init_weights: bool = True) -> VGG:
    """VGG of one of the paper's configurations ``"A"``, ``"A-LRN"``, ``"B"``, ``"C"``, ``"D"``, ``"E"``."""
    if config not in CONFIGS:
        raise ValueError(f"vgg: unknown config {config!r}; expected one of {', '.join(CONFIGS)}")
    features = make_layers(CONFIGS[config], batch_norm, in_channels, width_multiplier)
    return VGG(features, num_classes, dropout, hidden, pool_size, init_weights)


def vgg11(**kwargs) -> VGG:
    """Configuration A (torchvision ``vgg11``)."""
    return vgg("A", **kwargs)


def vgg13(**kwargs) -> VGG:
    """Configuration B (torchvision ``vgg13``)."""
    return vgg("B", **kwargs)


def vgg16(**kwargs) -> VGG:
    """Configuration D (torchvision ``vgg16``)."""
    return vgg("D", **kwargs)


def vgg19(**kwargs) -> VGG:
    """Configuration E (torchvision ``vgg19``)."""
    return vgg("E", **kwargs)


def vgg11_bn(**kwargs) -> VGG:
    return vgg("A", batch_norm=True, **kwargs)


def vgg13_bn(**kwargs) -> VGG:
    return vgg("B", batch_norm=True, **kwargs)


def vgg16_bn(**kwargs) -> VGG:
    return vgg("D", batch_norm=True, **kwargs)


def vgg19_bn(**kwargs) -> VGG:
    return vgg("E", batch_norm=True, **kwargs)
