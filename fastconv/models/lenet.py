"""LeNet-5 (LeCun et al. 1998), built from fastconv layers.

Input (N, in_channels, 32, 32) -> logits (N, num_classes). Layers as in the paper: C1 5x5 conv to 6 maps
(28x28), S2 2x2 average pooling (14x14), C3 5x5 conv to 16 (10x10), S4 pooling (5x5), C5 5x5 conv to 120
(1x1), F6 fully connected 84, output layer. Two simplifications everyone makes: C3 connects every S2 map
(the paper's sparse connection table saves 1,000 weights), S2/S4 are plain average pools without the paper's
trainable coefficient, and the output is a linear layer instead of RBF units. 61,706 parameters for 10
classes ("about 60 thousand").
"""
from __future__ import annotations

from torch import Tensor, nn

from .. import nn as fnn

__all__ = ["LeNet5", "lenet5"]


class LeNet5(nn.Module):
    """LeNet-5: (N, in_channels, 32, 32) -> (N, num_classes).

    ``activation``: ``"tanh"`` (the paper) or ``"relu"``; ``pool``: ``"avg"`` (the paper) or ``"max"``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, activation: str = "tanh", pool: str = "avg"):
        super().__init__()
        act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
        pool_cls = {"avg": fnn.AvgPool2d, "max": fnn.MaxPool2d}[pool]
        self.features = nn.Sequential(
            fnn.Conv2d(in_channels, 6, 5), act(), pool_cls(2),      # C1, S2: 28x28x6 -> 14x14x6
            fnn.Conv2d(6, 16, 5), act(), pool_cls(2),               # C3, S4: 10x10x16 -> 5x5x16
            fnn.Conv2d(16, 120, 5), act(),                          # C5: 1x1x120
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(120, 84), act(), nn.Linear(84, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def lenet5(num_classes: int = 10, in_channels: int = 1, activation: str = "tanh", pool: str = "avg") -> LeNet5:
    """LeNet-5 for 32x32 inputs (see :class:`LeNet5`)."""
    return LeNet5(num_classes, in_channels, activation, pool)
