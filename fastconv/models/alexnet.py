"""AlexNet in torchvision's variant (the "one weird trick" single-tower net), built from fastconv layers.

Module and parameter names are torchvision's (``features.0.weight`` ... ``classifier.6.bias``), so a
torchvision ``state_dict`` loads. Input (N, 3, H, W) with H, W >= 63 (224 in the paper) -> (N, num_classes);
61,100,840 parameters for 1000 classes.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import nn as fnn

__all__ = ["AlexNet", "alexnet"]


class AlexNet(nn.Module):
    """torchvision's AlexNet: five convs (64, 192, 384, 256, 256), 3x3/2 max pools, 6x6 adaptive average pool,
    three linear layers with dropout. (N, 3, H, W) -> (N, num_classes)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            fnn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),
            fnn.MaxPool2d(kernel_size=3, stride=2),
            fnn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),
            fnn.MaxPool2d(kernel_size=3, stride=2),
            fnn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
            fnn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
            fnn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),
            fnn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = fnn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(),
            nn.Dropout(p=dropout), nn.Linear(4096, 4096), nn.ReLU(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def alexnet(num_classes: int = 1000, dropout: float = 0.5) -> AlexNet:
    """torchvision-compatible AlexNet (see :class:`AlexNet`)."""
    return AlexNet(num_classes, dropout)
