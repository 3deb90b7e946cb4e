"""C3D (Tran et al. 2015), a 3-D CNN for video clips, from fastconv layers.

Clip (N, in_channels, T, H, W) -> (N, num_classes); 16 x 112 x 112 in the paper. Eight 3x3x3 convs (64, 128,
256, 256, 512, 512, 512, 512) with ReLU, five max pools (1x2x2 first, so early layers keep time, then
2x2x2; the last one pads H and W by 1 to give 512 x 1 x 4 x 4 = 8192 features), two hidden linear layers
with dropout. ``width_multiplier`` and ``hidden`` shrink the model for tests; an adaptive average pool to
(1, 4, 4) (the identity at 16x112x112) lets smaller clips through.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import nn as fnn

__all__ = ["C3D", "c3d"]


class C3D(nn.Module):
    """C3D: ``features`` (3-D convs and pools), ``avgpool``, ``classifier``."""

    def __init__(self, num_classes: int = 487, in_channels: int = 3, width_multiplier: float = 1.0,
                 hidden: int = 4096, dropout: float = 0.5):
        super().__init__()
        w = lambda c: max(1, int(c * width_multiplier))  # noqa: E731
        conv = lambda cin, cout: [fnn.Conv3d(cin, cout, 3, padding=1), nn.ReLU()]  # noqa: E731
        self.features = nn.Sequential(
            *conv(in_channels, w(64)), fnn.MaxPool3d((1, 2, 2), stride=(1, 2, 2)),
            *conv(w(64), w(128)), fnn.MaxPool3d(2, stride=2),
            *conv(w(128), w(256)), *conv(w(256), w(256)), fnn.MaxPool3d(2, stride=2),
            *conv(w(256), w(512)), *conv(w(512), w(512)), fnn.MaxPool3d(2, stride=2),
            *conv(w(512), w(512)), *conv(w(512), w(512)), fnn.MaxPool3d(2, stride=2, padding=(0, 1, 1)),
        )
        self.avgpool = fnn.AdaptiveAvgPool3d((1, 4, 4))
        self.classifier = nn.Sequential(
            nn.Linear(w(512) * 16, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def c3d(num_classes: int = 487, in_channels: int = 3, width_multiplier: float = 1.0, hidden: int = 4096,
        dropout: float = 0.5) -> C3D:
    """C3D video classifier (see :class:`C3D`); 487 classes is Sports-1M."""
    return C3D(num_classes, in_channels, width_multiplier, hidden, dropout)
