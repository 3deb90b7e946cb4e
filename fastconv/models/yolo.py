"""A YOLO (v1-style) detection head: fully convolutional, feature map -> S x S x (B*5 + classes) grid.

Input: a backbone feature map (N, in_channels, S, S) (YOLO v1: 1024 x 7 x 7 from a 448 x 448 image).
Output: (N, S, S, B*5 + num_classes): per grid cell, B boxes of (x, y, w, h, confidence) followed by the
class scores, as YOLO v1 lays them out. The paper's head ends in two fully connected layers; this one keeps
the paper's two 3x3 convs (BN, LeakyReLU 0.1) and replaces the dense layers by a 1x1 conv, so it works on
any S: the grid is the feature map (as in YOLO v2 onwards).
"""
from __future__ import annotations

from torch import Tensor, nn

from .. import nn as fnn

__all__ = ["YOLOHead", "yolo_head"]


class YOLOHead(nn.Module):
    """(N, in_channels, S, S) -> (N, S, S, num_boxes * 5 + num_classes)."""

    def __init__(self, in_channels: int = 1024, num_classes: int = 20, num_boxes: int = 2, hidden: int = 1024):
        super().__init__()
        self.num_classes, self.num_boxes = num_classes, num_boxes
        self.body = nn.Sequential(
            fnn.Conv2d(in_channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
            nn.LeakyReLU(0.1),
            fnn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
            nn.LeakyReLU(0.1),
        )
        self.predict = fnn.Conv2d(hidden, num_boxes * 5 + num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.predict(self.body(x)).permute(0, 2, 3, 1)


def yolo_head(in_channels: int = 1024, num_classes: int = 20, num_boxes: int = 2, hidden: int = 1024) -> YOLOHead:
    """YOLO v1-style head; 20 classes, 2 boxes gives the paper's 7 x 7 x 30 grid on a 7 x 7 map."""
    return YOLOHead(in_channels, num_classes, num_boxes, hidden)
