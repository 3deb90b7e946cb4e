"""``fastconv flops``: count a zoo model's work, check textbook claims against the clock, try replacements.

``fastconv flops MODEL [--input 1x3x224x224] [--backward] [--depth N] [--format table|json|csv] [--ops]``
    The module tree of :func:`fastconv.flops.count` for a model of :data:`fastconv.models.MODELS`, with
    subtotals, percentages and activation memory; ``--ops`` adds the per-op table (algorithm, why, executed
    multiplications). The model is built and run on the ``meta`` device (shapes only: no memory, no arithmetic,
    no autotuning), so even VGG-E counts in seconds; algorithms are those ``auto`` would pick on the CPU.
``fastconv flops MODEL --measure [--png roofline.png] [--repeats 5]``
    Claim vs clock: each conv and pooling layer timed with fastconv (auto) and with torch, next to its nominal
    MACs, executed multiplications, algorithm and why, GFLOP/s, arithmetic intensity and roofline bound.
``fastconv flops MODEL --what-if bottleneck|separable [--layer NAME ...] [--reduce R] [--time]``
    MACs, parameters (and, with ``--layer`` or ``--time``, measured time) of replacing 2-D convs by a 1x1
    bottleneck (``C -> R -> K``, R = min(C, K)/2 by default) or a depthwise-separable block.
``fastconv flops --compare inception-bottleneck``
    28x28x192 -> 5x5 conv to 32 channels, directly and after a 1x1 reduction to 16 channels (GoogLeNet's
    bottleneck): MACs, parameters and the measured median forward time of each through fastconv, side by side.
``fastconv flops --compare depthwise-separable``
    A MobileNet block (3x3 depthwise + 1x1 pointwise, 14x14x512 -> 512) against a standard 3x3 conv.
``fastconv flops --list``
    The model names.

Mistakes (unknown model, an input shape the model cannot take, an unknown layer) end with one line on
stderr and exit code 2; ``FASTCONV_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys

COMPARISONS = ("inception-bottleneck", "depthwise-separable")
FORMATS = ("table", "json", "csv")


class UsageError(Exception):
    """A user mistake: reported as one line, exit code 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="zoo model name (see --list)")
    parser.add_argument("--input", help="input shape, e.g. 1x3x224x224 (default: the model's own)")
    parser.add_argument("--backward", action="store_true", help="count the backward pass too")
    parser.add_argument("--depth", type=int, default=None, help="fold the module tree below this depth")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.add_argument("--ops", action="store_true", help="also print one line per counted op")
    parser.add_argument("--measure", action="store_true",
                        help="time each conv/pool layer (auto vs torch) and place it on the roofline")
    parser.add_argument("--png", default="roofline.png", help="roofline plot path for --measure")
    parser.add_argument("--what-if", dest="what_if", choices=("bottleneck", "separable"),
                        help="MACs/params/time of replacing 2-D convs by a 1x1 bottleneck or a separable block")
    parser.add_argument("--layer", action="append", help="module name for --what-if (repeatable)")
    parser.add_argument("--reduce", type=int, help="bottleneck channels for --what-if bottleneck (default min(C, K)/2)")
    parser.add_argument("--time", action="store_true", help="--what-if: time every layer (default: --layer only)")
    parser.add_argument("--compare", choices=COMPARISONS, help="time a design against its alternative")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repetitions per layer (--compare: 20, --measure/--what-if: 5)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (--compare)")
    parser.add_argument("--list", action="store_true", help="list the zoo's model names")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1x3x224x224"`` -> ``(1, 3, 224, 224)``; UsageError for anything else."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--input must look like 1x3x224x224, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise UsageError(f"--input must be positive sizes, got {text!r}")
    return shape


def build(name: str, shape=None, device: str = "meta"):
    """``(model, input)`` of zoo model ``name`` on ``device`` (meta: no memory)."""
    import torch

    from .. import models

    if name not in models.MODELS:
        raise UsageError(f"unknown model {name!r}; expected one of {', '.join(models.MODELS)}")
    builder, default = models.MODELS[name]
    with torch.device(device):
        model = builder()
    if device != "meta":
        model.eval()
    x = torch.zeros(shape or default, device=device) if device == "meta" else torch.randn(shape or default)
    return model, x


def _shape_error(name: str, shape, exc: Exception) -> UsageError:
    from .. import models

    default = "x".join(map(str, models.MODELS[name][1]))
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return UsageError(f"input {'x'.join(map(str, shape))} does not fit {name} (its default is {default}): "
                      f"{type(exc).__name__}: {first}")


def count_model(name: str, shape=None, backward: bool = False):
    """:class:`fastconv.flops.Report` of zoo model ``name`` on the meta device (UsageError on a bad shape)."""
    from .. import flops

    model, x = build(name, shape)
    try:
        return flops.count(model, x, backward=backward)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        if shape is None or os.environ.get("FASTCONV_DEBUG"):
            raise
        raise _shape_error(name, shape, exc) from exc


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
    from ..flops import whatif

    x, layers = comparison(kind, batch)
    rows = []
    for label, module in layers:
        rep = flops.count(module, x)
        rows.append(dict(label=label, output_shape=tuple(module(x).shape), params=rep.params, macs=rep.macs,
                         seconds=whatif.median_forward_seconds(module, x, repeats)))
    return rows


def _print_comparison(kind: str, rows: list[dict], batch: int, repeats: int) -> None:
    import torch

    base = rows[0]
    print(f"{kind}: batch {batch}, float32, median of {repeats} forward passes through fastconv, "
          f"{torch.get_num_threads()} threads")
    head = f"{'layer':<28} {'output':<12} {'params':>8} {'MACs':>13} {'MAC ratio':>9} {'time ms':>9} {'time ratio':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        shape = "x".join(map(str, r["output_shape"]))
        print(f"{r['label']:<28} {shape:<12} {r['params']:>8,} {r['macs']:>13,} "
              f"{base['macs'] / r['macs']:>8.2f}x {1e3 * r['seconds']:>9.2f} {base['seconds'] / r['seconds']:>9.2f}x")
    print("MACs = multiply-accumulates (bias adds not included); ratios are baseline / row (higher = cheaper).")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UsageError as exc:
        if os.environ.get("FASTCONV_DEBUG"):
            raise
        print(f"fastconv flops: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from .. import flops, models

    if args.list:
        print("\n".join(models.MODELS))
        return 0
    if args.compare:
        repeats = args.repeats or 20
        rows = compare(args.compare, repeats, args.batch)
        _print_comparison(args.compare, rows, args.batch, repeats)
        return 0
    if not args.model:
        raise UsageError("name a model (see --list) or use --compare")
    if args.model not in models.MODELS:
        raise UsageError(f"unknown model {args.model!r}; expected one of {', '.join(models.MODELS)}")
    if args.depth is not None and args.depth < 0:
        raise UsageError(f"--depth must be >= 0, got {args.depth}")
    shape = parse_shape(args.input) if args.input else None
    title = f"{args.model}  input {'x'.join(map(str, shape or models.MODELS[args.model][1]))}"
    if args.what_if:
        return _what_if(args, shape, title)
    if args.measure:
        return _measure(args, shape, title)
    report = count_model(args.model, shape, args.backward)
    report.title = title
    if args.format == "json":
        print(report.to_json(args.depth))
    elif args.format == "csv":
        print(report.to_csv(args.depth), end="")
    else:
        print(report.table(args.depth))
        if args.ops:
            print()
            print(report.ops_table())
    return 0


def _what_if(args, shape, title) -> int:
    from ..flops.report import human
    from ..flops.whatif import what_if

    model, x = build(args.model, shape)
    timed = bool(args.layer) or args.time
    try:
        # the model stays on meta: timing builds each layer and its replacement on the CPU by itself
        items = what_if(model, x, args.what_if, args.layer, args.reduce, measure=timed,
                        repeats=args.repeats or 5)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    except (RuntimeError, TypeError, IndexError) as exc:
        if shape is None or os.environ.get("FASTCONV_DEBUG"):
            raise
        raise _shape_error(args.model, shape, exc) from exc
    if args.format == "json":
        import json

        print(json.dumps([vars(i) for i in items], indent=1, default=list))
        return 0
    print(f"{title}  what-if: {args.what_if}")
    rest = 6 + 5 + 13 + 13 + 7 + 7 + 7 + (16 if timed else 0)
    lw = max([5] + [len(i.layer) for i in items])
    lw = min(lw, max(12, 100 - rest))
    head = f"{'layer':<{lw}} {'k':>5} {'MACs':>13} {'new MACs':>13} {'ratio':>7} {'params':>7} {'new':>7}"
    if timed:
        head += f" {'ms':>7} {'new ms':>7}"
    print(head)
    print("-" * len(head))
    for i in items:
        name = i.layer if len(i.layer) <= lw else i.layer[:lw - 1] + "~"
        line = (f"{name:<{lw}} {'x'.join(map(str, i.kernel)):>5} {i.macs:>13,} {i.new_macs:>13,} "
                f"{i.mac_ratio:>6.2f}x {human(i.params):>7} {human(i.new_params):>7}")
        if timed:
            line += f" {1e3 * i.seconds:>7.2f} {1e3 * i.new_seconds:>7.2f}"
        print(line)
    total, new = sum(i.macs for i in items), sum(i.new_macs for i in items)
    change = (f"{total / new:.2f}x fewer" if new <= total else f"{new / total:.2f}x more") if new else "-"
    print(f"total over {len(items)} layers: {total:,} -> {new:,} MACs ({change}); ratio = MACs / new MACs")
    import textwrap

    notes = []
    if items:
        notes.append("parts of the first: " + ", ".join(f"{k} {v:,}" for k, v in items[0].parts.items())
                     + f" ({items[0].detail})")
    notes.append("MACs = multiply-accumulates (bias adds not included); params include biases"
                 + ("; ms: median forward through fastconv (algo=auto), random weights" if timed else
                    "; add --layer NAME or --time to measure"))
    for n in notes:
        print("\n".join(textwrap.wrap(n, 100, subsequent_indent="  ")))
    return 0


def _measure(args, shape, title) -> int:
    import json

    from ..flops import roofline

    model, x = build(args.model, shape, "cpu")
    try:
        layers, machine, note = roofline.measure(model, x, repeats=args.repeats or 5)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        if shape is None or os.environ.get("FASTCONV_DEBUG"):
            raise
        raise _shape_error(args.model, shape, exc) from exc
    if args.format == "json":
        print(json.dumps({"machine": vars(machine), "note": note, "layers": [t.as_dict() for t in layers]},
                         indent=1))
    else:
        print(title)
        print(roofline.format_measure(layers, machine, note))
    why_not = roofline.plot_roofline(layers, machine, args.png)
    print(why_not or f"roofline plot: {args.png}", file=sys.stderr if args.format == "json" else sys.stdout)
    return 0
