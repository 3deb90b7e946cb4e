"""M5 (Dai et al. 2017, "Very deep convolutional neural networks for raw waveforms"), a 1-D audio CNN.

Raw waveform (N, in_channels, L), 32,000 samples (4 s at 8 kHz) in the paper -> (N, num_classes) logits.
Conv1d 80-tap stride 4 -> BN -> ReLU -> MaxPool 4, then three 3-tap convs (channels c, 2c, 4c) each with BN,
ReLU, MaxPool 4, global average pool, linear. With 128 base channels (the paper) and 10 classes: 559,114
parameters ("0.5M"). ``L`` must leave at least one sample after the four pools (L >= about 1,100).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import nn as fnn

__all__ = ["M5", "m5"]


class M5(nn.Module):
    """M5: four conv blocks and a linear classifier over the time-averaged features."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, n_channel: int = 128, stride: int = 4):
        super().__init__()
        c = n_channel
        widths = [(in_channels, c, 80, stride), (c, c, 3, 1), (c, 2 * c, 3, 1), (2 * c, 4 * c, 3, 1)]
        blocks = []
        for cin, cout, k, s in widths:
            blocks += [fnn.Conv1d(cin, cout, k, stride=s), nn.BatchNorm1d(cout), nn.ReLU(),
                       fnn.MaxPool1d(4)]
        self.features = nn.Sequential(*blocks)
        self.avgpool = fnn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(4 * c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def m5(num_classes: int = 10, in_channels: int = 1, n_channel: int = 128, stride: int = 4) -> M5:
    """M5 raw-waveform classifier (see :class:`M5`)."""
    return M5(num_classes, in_channels, n_channel, stride)
