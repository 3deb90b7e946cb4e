"""``fastconv flops``: count a zoo model's work, or check a textbook saving against the clock.

``fastconv flops MODEL [--input 1x3x224x224] [--backward]``
    The per-layer table of :func:`fastconv.flops.count` for a model of :data:`fastconv.models.MODELS`. The model
    is built and run on the ``meta`` device (shapes only: no memory, no arithmetic), so even VGG-E counts in a
    second; algorithms are those the CPU would pick.
``fastconv flops --compare inception-bottleneck``
    28x28x192 -> 5x5 conv to 32 channels, directly and after a 1x1 reduction to 16 channels (GoogLeNet's
    bottleneck): MACs, parameters and the measured median forward time of each through fastconv, side by side.
``fastconv flops --compare depthwise-separable``
    A MobileNet block (3x3 depthwise + 1x1 pointwise, 14x14x512 -> 512) against a standard 3x3 conv.
``fastconv flops --list``
    The model names.
"""
from __future__ import annotations

import argparse
import statistics
import time

COMPARISONS = ("inception-bottleneck", "depthwise-separable")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="zoo model name (see --list)")
    parser.add_argument("--input", help="input shape, e.g. 1x3x224x224 (default: the model's own)")
    parser.add_argument("--backward", action="store_true", help="count the backward pass too")
    parser.add_argument("--compare", choices=COMPARISONS, help="time a design against its alternative")
    parser.add_argument("--repeats", type=int, default=20, help="timed forward passes per layer (--compare)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (--compare)")
    parser.add_argument("--list", action="store_true", help="list the zoo's model names")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1x3x224x224"`` -> ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"fastconv flops: --input must look like 1x3x224x224, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise SystemExit(f"fastconv flops: --input must be positive sizes, got {text!r}")
    return shape


def count_model(name: str, shape=None, backward: bool = False):
    """:class:`fastconv.flops.Report` of zoo model ``name`` on the meta device."""
    import torch

    from .. import flops, models

    if name not in models.MODELS:
        raise SystemExit(f"fastconv flops: unknown model {name!r}; expected one of {', '.join(models.MODELS)}")
    build, default = models.MODELS[name]
    with torch.device("meta"):
        model = build()
    x = torch.zeros(shape or default, device="meta", requires_grad=False)
    return flops.count(model, x, backward=backward)


def median_forward_seconds(module, x, repeats: int) -> float:
    """Median wall time of ``module(x)`` without autograd, after two warm-up calls (Numba compilation,
    autotuning and first-touch allocation stay out of the measurement)."""
    import torch

    with torch.no_grad():
        for _ in range(2):
            module(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def comparison(kind: str, batch: int = 1):
    """``(input, [(label, module), ...])`` of a comparison; the first module is the baseline."""
    import torch
    from torch import nn

    from .. import nn as fnn

    torch.manual_seed(0)
    if kind == "inception-bottleneck":
        x = torch.randn(batch, 192, 28, 28)
        return x, [("5x5 conv 192->32", fnn.Conv2d(192, 32, 5, padding=2)),
                   ("1x1 192->16, 5x5 16->32", nn.Sequential(fnn.Conv2d(192, 16, 1), fnn.Conv2d(16, 32, 5, padding=2)))]
    if kind == "depthwise-separable":
        x = torch.randn(batch, 512, 14, 14)
        return x, [("3x3 conv 512->512", fnn.Conv2d(512, 512, 3, padding=1)),
                   ("3x3 depthwise + 1x1 512->512", fnn.DepthwiseSeparableConv2d(512, 512, 3, padding=1))]
    raise ValueError(f"unknown comparison {kind!r}; expected one of {', '.join(COMPARISONS)}")


def compare(kind: str, repeats: int = 20, batch: int = 1) -> list[dict]:
    """Rows (label, output_shape, params, macs, seconds) of a comparison, measured on this machine."""
    from .. import flops

    x, layers = comparison(kind, batch)
    rows = []
    for label, module in layers:
        rep = flops.count(module, x)
        rows.append(dict(label=label, output_shape=tuple(module(x).shape), params=rep.params, macs=rep.macs,
                         seconds=median_forward_seconds(module, x, repeats)))
    return rows


def _print_comparison(kind: str, rows: list[dict], batch: int, repeats: int) -> None:
    import torch

    base = rows[0]
    print(f"{kind}: batch {batch}, float32, median of {repeats} forward passes through fastconv, "
          f"{torch.get_num_threads()} threads")
    head = f"{'layer':<32} {'output':<14} {'params':>10} {'MACs':>14} {'MAC ratio':>10} {'time ms':>9} {'time ratio':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        shape = "x".join(map(str, r["output_shape"]))
        print(f"{r['label']:<32} {shape:<14} {r['params']:>10,} {r['macs']:>14,} "
              f"{base['macs'] / r['macs']:>9.2f}x {1e3 * r['seconds']:>9.2f} {base['seconds'] / r['seconds']:>9.2f}x")
    print("MACs = multiply-accumulates (bias adds not included); ratios are baseline / row (higher = cheaper).")


def run(args: argparse.Namespace) -> int:
    from .. import models

    if args.list:
        print("\n".join(models.MODELS))
        return 0
    if args.compare:
        rows = compare(args.compare, args.repeats, args.batch)
        _print_comparison(args.compare, rows, args.batch, args.repeats)
        return 0
    if not args.model:
        raise SystemExit("fastconv flops: name a model (see --list) or use --compare")
    report = count_model(args.model, parse_shape(args.input) if args.input else None, args.backward)
    print(f"{args.model}  input {args.input or 'x'.join(map(str, models.MODELS[args.model][1]))}")
    print(report)
    return 0
