"""U-Net (Ronneberger et al. 2015) from fastconv layers.

Encoder: ``depth`` stages of two 3x3 convs (+BN) + ReLU, each followed by a 2x2 max pool; a bottleneck
double conv; decoder: per stage a 2x2 stride-2 **transposed convolution** halving the channels, concatenation
with the encoder's skip connection, two 3x3 convs; a final 1x1 conv to ``num_classes``. The convs are padded
(``padding=1``), so the output has the input's size and skips need no cropping (the paper's unpadded convs
shrink every stage and crop the skips). Input (N, in_channels, H, W) with H, W multiples of ``2**depth`` ->
(N, num_classes, H, W). With base_channels 64, depth 4, no BN, 1 -> 2 channels: 31,030,658 parameters.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import nn as fnn

__all__ = ["UNet", "unet"]


class DoubleConv(nn.Sequential):
    """(3x3 conv [+ BN] + ReLU) x 2: (N, cin, H, W) -> (N, cout, H, W)."""

    def __init__(self, cin: int, cout: int, batch_norm: bool):
        layers: list[nn.Module] = []
        for c in (cin, cout):
            layers.append(fnn.Conv2d(c, cout, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU())
        super().__init__(*layers)


class UNet(nn.Module):
    """U-Net with ``depth`` down/up stages; widths ``base_channels * 2**i``."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_channels: int = 64, depth: int = 4,
                 batch_norm: bool = False):
        super().__init__()
        widths = [base_channels * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths[:-1]:
            self.down.append(DoubleConv(cin, w, batch_norm))
            cin = w
        self.pool = fnn.MaxPool2d(2)
        self.bottleneck = DoubleConv(widths[-2], widths[-1], batch_norm)
        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        for w_in, w_out in zip(widths[:0:-1], widths[-2::-1]):
            self.upsample.append(fnn.ConvTranspose2d(w_in, w_out, kernel_size=2, stride=2))
            self.up.append(DoubleConv(2 * w_out, w_out, batch_norm))  # skip (w_out) + upsampled (w_out)
        self.head = fnn.Conv2d(widths[0], num_classes, 1)
        self.depth = depth

    def forward(self, x: Tensor) -> Tensor:
        factor = 2 ** self.depth
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"UNet: input height and width must be multiples of 2**depth = {factor}, "
                             f"got {tuple(x.shape[-2:])}")
        skips = []
        for stage in self.down:
            x = stage(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for upsample, stage, skip in zip(self.upsample, self.up, reversed(skips)):
            x = stage(torch.cat([skip, upsample(x)], dim=1))
        return self.head(x)


def unet(in_channels: int = 1, num_classes: int = 2, base_channels: int = 64, depth: int = 4,
         batch_norm: bool = False) -> UNet:
    """U-Net (see :class:`UNet`)."""
    return UNet(in_channels, num_classes, base_channels, depth, batch_norm)
