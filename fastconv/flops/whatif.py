"""What-if: the cost of replacing a model's convolutions by a 1x1 bottleneck or a depthwise-separable block.

For a conv ``C -> K`` with a ``k x k`` kernel producing ``OH x OW`` (stride, padding, dilation kept):

``bottleneck`` (GoogLeNet's Inception reduction)
    1x1 conv ``C -> r`` at the input resolution, then the ``k x k`` conv ``r -> K``:
    ``N*H*W*r*C + N*OH*OW*K*r*k*k`` MACs, ``r*C + r + K*r*k*k + K`` parameters (with biases). ``r`` defaults
    to ``min(C, K) // 2`` (the seed layer: 192 -> 16 -> 32, 120,422,400 -> 12,443,648 MACs).
``separable`` (MobileNet)
    ``k x k`` depthwise conv on ``C`` channels, then 1x1 ``C -> K``: ``N*OH*OW*C*k*k + N*OH*OW*K*C`` MACs.

:func:`what_if` counts these for every chosen layer (``--layer``) or every eligible one (a 2-D conv with a
kernel larger than 1x1 and ``groups == 1``) and, when asked, times the original layer and the replacement
through fastconv (``algo="auto"``) on random data of the layer's shape.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

__all__ = ["what_if", "WhatIf", "KINDS", "layer_specs"]

KINDS = ("bottleneck", "separable")


@dataclass
class WhatIf:
    """One layer and its replacement: MACs and parameters exact, seconds measured (None: not timed)."""

    layer: str
    kind: str
    in_shape: tuple
    out_shape: tuple
    kernel: tuple
    macs: int
    params: int
    new_macs: int
    new_params: int
    detail: str = ""
    seconds: Optional[float] = None
    new_seconds: Optional[float] = None
    parts: dict = field(default_factory=dict)

    @property
    def mac_ratio(self) -> float:
        return self.macs / self.new_macs if self.new_macs else math.inf


def layer_specs(report) -> dict:
    """``{module name: (module-like spec)}`` for the 2-D conv modules of a count report's model."""
    specs = {}
    for node in report.root.walk():
        for r in node.ops:
            if r.pass_ == "forward" and r.op == "conv2d" and len(r.input_shape) == 4:
                specs.setdefault(r.name, r)
    return specs


def _geometry(module: nn.Module, in_shape: tuple, out_shape: tuple) -> dict:
    k = tuple(module.kernel_size)
    return dict(C=module.in_channels, K=module.out_channels, k=k, stride=tuple(module.stride),
                padding=module.padding, dilation=tuple(module.dilation), groups=module.groups,
                bias=module.bias is not None, N=in_shape[0], H=in_shape[2], W=in_shape[3], OH=out_shape[2],
                OW=out_shape[3])


def _replacement(kind: str, g: dict, reduce: Optional[int]):
    """(modules, MACs by part, params) of the replacement of geometry ``g``."""
    from .. import nn as fnn

    N, C, K, (kh, kw) = g["N"], g["C"], g["K"], g["k"]
    pos_in, pos_out = N * g["H"] * g["W"], N * g["OH"] * g["OW"]
    b = g["bias"]
    if kind == "bottleneck":
        r = reduce or max(1, min(C, K) // 2)
        parts = {f"1x1 {C}->{r}": pos_in * r * C, f"{kh}x{kw} {r}->{K}": pos_out * K * r * kh * kw}
        params = r * C + (r if b else 0) + K * r * kh * kw + (K if b else 0)
        module = nn.Sequential(fnn.Conv2d(C, r, 1, bias=b),
                               fnn.Conv2d(r, K, g["k"], stride=g["stride"], padding=g["padding"],
                                          dilation=g["dilation"], bias=b))
        return module, parts, params, f"reduce to {r} channels"
    if kind == "separable":
        parts = {f"{kh}x{kw} depthwise {C}": pos_out * C * kh * kw, f"1x1 {C}->{K}": pos_out * K * C}
        params = C * kh * kw + (C if b else 0) + K * C + (K if b else 0)
        module = fnn.DepthwiseSeparableConv2d(C, K, g["k"], stride=g["stride"], padding=g["padding"],
                                              dilation=g["dilation"], bias=b)
        return module, parts, params, "depthwise + pointwise"
    raise ValueError(f"what_if: kind must be one of {', '.join(KINDS)}, got {kind!r}")


def median_forward_seconds(module: nn.Module, x: torch.Tensor, repeats: int, warmups: int = 2) -> float:
    """Median wall time of ``module(x)`` without autograd, after ``warmups`` untimed calls (Numba
    compilation, autotuning and first-touch allocation stay out of the measurement)."""
    with torch.no_grad():
        for _ in range(warmups):
            module(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def what_if(model: nn.Module, x: torch.Tensor, kind: str, layers: Optional[list] = None,
            reduce: Optional[int] = None, measure: bool = False, repeats: int = 5) -> list[WhatIf]:
    """The replacement ``kind`` ("bottleneck" or "separable") of the chosen 2-D conv layers of ``model``.

    ``model`` may live on the meta device (counting only); timing (``measure=True``) builds the original
    layer and the replacement on the CPU with random weights and times each on random input of the layer's
    shape (median of ``repeats`` after a warm-up). ``layers``: module names; None: every 2-D conv with a
    kernel larger than 1x1 and groups == 1. ValueError names an unknown or ineligible layer.
    """
    from .. import nn as fnn
    from .counting import count

    if kind not in KINDS:
        raise ValueError(f"what_if: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    report = count(model, x)
    rows = layer_specs(report)
    modules = dict(model.named_modules())
    if layers:
        for name in layers:
            if name not in rows:
                convs = ", ".join(list(rows)[:8]) + (", ..." if len(rows) > 8 else "")
                raise ValueError(f"what_if: --layer {name!r} is not a 2-D conv layer of this model "
                                 f"(2-D conv layers: {convs})")
        chosen = list(layers)
    else:
        chosen = [n for n in rows if math.prod(modules[n].kernel_size) > 1 and modules[n].groups == 1]
    out = []
    for name in chosen:
        m, r = modules[name], rows[name]
        if m.groups != 1:
            raise ValueError(f"what_if: layer {name!r} is already grouped (groups={m.groups}); "
                             "expected a dense convolution")
        g = _geometry(m, r.input_shape, r.output_shape)
        new, parts, new_params, detail = _replacement(kind, g, reduce)
        params = sum(p.numel() for p in m.parameters(recurse=False))
        item = WhatIf(name, kind, r.input_shape, r.output_shape, g["k"], r.macs, params, sum(parts.values()),
                      new_params, detail, parts=parts)
        if measure:
            torch.manual_seed(0)
            xi = torch.randn(r.input_shape)
            orig = fnn.Conv2d(g["C"], g["K"], g["k"], stride=g["stride"], padding=g["padding"],
                              dilation=g["dilation"], bias=g["bias"])
            if tuple(orig(xi).shape) != tuple(new(xi).shape):  # a replacement must keep the output shape
                raise RuntimeError(f"what_if: replacement of {name} changes the output shape")
            item.seconds = median_forward_seconds(orig, xi, repeats)
            item.new_seconds = median_forward_seconds(new, xi, repeats)
        out.append(item)
    return out
