"""fastconv's own per-call host overhead on the CPU path (issue 12: at most 25 us per conv call).

For each case the bare kernel entry (the Numba function on numpy arrays) is timed against every layer
above it, all in one process, interleaved call by call-block, so a burst of load on the shared machine
hits every layer alike:

    kernel      the Numba kernel entry on numpy arrays (``fastconv.cpu.conv.<algo>_forward`` ...)
    alg         the ConvAlgorithm wrapper (``fastconv.cpu.algorithms._wrap``: tensor <-> numpy seam)
    op          ``torch.ops.fastconv.conv2d(..., algo=<algo>)`` (the custom op: dispatch, plan, checks)
    op_auto     the same with ``algo='auto'`` (adds the autotuner's lookup)
    functional  ``fastconv.functional.conv2d`` (argument normalisation, layout)
    module      a converted ``nn.Conv2d`` (``fastconv.convert``), called as a model calls it

``overhead = layer - kernel`` (medians); ``own`` subtracts the dispatch floor (below) as well. With ``--mode
stubbed`` (part of the default ``both``) the kernels only allocate their results and the base row is the
algorithm wrapper around that stub: the rows are then fastconv's host code alone, without the kernel's own
time, which moves with the caches the host code leaves behind (the real-kernel rows mix both). The backward
rows time one training step's gradient ops (grad_input + grad_weight) the same way; the ``train`` row is
forward + backward of a converted one-conv module through autograd, against the three kernels. Pooling rows do
the same for max_pool2d and adaptive_avg_pool2d. ``floor`` rows are a trivial ``torch.library.custom_op``
(returns ``empty_like``), without and with a registered autograd formula: what torch's dispatch costs any
custom op; ``floor_conv_schema`` is the same with ``fastconv::conv2d``'s nine-argument schema and fastconv's
own Autograd kernel: the floor under every conv op call (the dispatcher converts each argument at each step).

Results depend on the machine's load (printed with them); compare rows of one run, not runs.

    PYTHONPATH=. python tools/overhead.py [--mode both|kernels|stubbed] [--samples 600] [--threads 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

from typing import Optional

import torch
from torch import Tensor


def _noop_ops():
    """A trivial custom op, without and with an autograd formula: the dispatch floor."""
    @torch.library.custom_op("fastconv_overhead::noop", mutates_args=())
    def noop(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    @noop.register_fake
    def _(x):
        return torch.empty_like(x)

    @torch.library.custom_op("fastconv_overhead::noop_ag", mutates_args=())
    def noop_ag(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    @noop_ag.register_fake
    def _(x):
        return torch.empty_like(x)

    noop_ag.register_autograd(lambda ctx, g: g)
    return noop, noop_ag


def _noop_conv_op():
    """A custom op with ``fastconv::conv2d``'s schema and fastconv's own Autograd kernel
    (:mod:`fastconv.ops.func`) that returns ``empty_like(input)``: the floor under a fastconv conv call
    (nine arguments, four of them lists, converted at each dispatcher step)."""
    import warnings

    from torch._library.custom_ops import OPDEFS

    from fastconv.ops import func

    @torch.library.custom_op("fastconv_overhead::conv2d", mutates_args=())
    def conv(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
             padding_end: list[int], dilation: list[int], groups: int, algo: str) -> Tensor:
        return torch.empty_like(input)

    @conv.register_fake
    def _(input, weight, bias, stride, padding, padding_end, dilation, groups, algo):
        return torch.empty_like(input)

    conv.register_autograd(lambda ctx, g: (g,) + (None,) * 8)
    opdef = OPDEFS["fastconv_overhead::conv2d"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opdef._lib.impl(opdef._name, func._make_autograd_kernel(opdef), "Autograd", with_keyset=True)
    return conv


class _StubPoolKernels:
    """Pooling kernels that only allocate their results (the ``"numba"`` entry while host code is timed)."""

    def max_pool(self, x, kernel, stride, padding, dilation, out_spatial, minimum):
        shape = (*x.shape[:2], *out_spatial)
        return torch.empty(shape, dtype=x.dtype), torch.empty(shape, dtype=torch.int64)

    def max_pool_backward(self, grad_out, indices, in_spatial):
        return torch.empty((*grad_out.shape[:2], *in_spatial), dtype=grad_out.dtype)

    def adaptive_avg_pool(self, x, out_spatial):
        return torch.empty((*x.shape[:2], *out_spatial), dtype=x.dtype)

    def adaptive_avg_pool_backward(self, grad_out, in_spatial):
        return torch.empty((*grad_out.shape[:2], *in_spatial), dtype=grad_out.dtype)


@contextlib.contextmanager
def stubbed_kernels(algo: str):
    """Inside the block the Numba conv algorithm ``algo`` and the Numba pooling kernels only allocate their
    results: every layer above still runs all its host code, so the rows show fastconv's per-call host
    cost without the kernel (whose own timing moves with the caches the host code leaves behind)."""
    import dataclasses

    from fastconv import registry
    from fastconv.ops import pool as pool_ops

    real = registry._REGISTRY[(algo, "numba")]

    def fwd(x, w, bias, g):
        return torch.empty((g.batch, g.out_channels, *g.out_spatial), dtype=x.dtype)

    def gin(gy, w, g):
        return torch.empty((g.batch, g.in_channels, *g.in_spatial), dtype=gy.dtype)

    def gwt(gy, x, g):
        return torch.empty((g.out_channels, g.in_channels // g.groups, *g.kernel), dtype=gy.dtype)

    real_pool = pool_ops.KERNELS["numba"]
    registry.register(dataclasses.replace(real, forward=fwd, grad_input=gin, grad_weight=gwt))
    pool_ops.register_kernels("numba", _StubPoolKernels())
    try:
        yield
    finally:
        registry.register(real)
        pool_ops.register_kernels("numba", real_pool)


def measure(cases: dict, samples: int, block: int) -> dict:
    """name -> (median us, min us) of per-call times, the cases interleaved block by block."""
    times = {name: [] for name in cases}
    for fn in cases.values():  # warm up (first calls build plans, compile, tune)
        for _ in range(5):
            fn()
    clock = time.perf_counter_ns
    for _ in range(max(1, samples // block)):
        for name, fn in cases.items():
            out = times[name]
            for _ in range(block):
                t0 = clock()
                fn()
                out.append(clock() - t0)
    return {name: (statistics.median(v) / 1e3, min(v) / 1e3) for name, v in times.items()}


def _settle_auto(fn, calls: int = 200) -> None:
    """Call an ``algo='auto'`` case until the autotuner has explored and chosen (bounded)."""
    for _ in range(calls):
        fn()


def conv_cases(x, w, padding: int, algo: str) -> tuple[dict, dict, dict]:
    """(forward cases, backward cases, train-step cases) for one conv shape, algo ``algo`` at the bottom."""
    import fastconv
    import fastconv.functional as F
    from fastconv import registry
    from fastconv.cpu import conv as kernels
    from fastconv.ops.conv import make_geometry

    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    geom = make_geometry(2, n, c, k, 1, (h, wd), (r, s), None, (1, 1), (padding, padding), (padding, padding),
                         (1, 1), x.dtype, "numba")
    alg = registry._REGISTRY[(algo, "numba")]  # what the ops run (the stub inside stubbed_kernels)
    fwd, gin, gwt = (getattr(kernels, f"{algo}_{p}") for p in ("forward", "grad_input", "grad_weight"))
    x5, w5 = x.unsqueeze(2), w.unsqueeze(2)
    xn, wn = x5.numpy(), w5.numpy()
    gy = torch.randn(n, k, *geom.out_spatial[1:])
    gy5 = gy.unsqueeze(2)
    gyn = gy5.numpy()
    st, pd, dl, g = geom.stride, geom.padding, geom.dilation, geom.groups
    pl = [padding, padding]
    ops = torch.ops.fastconv

    def kern_fwd():
        return fwd(xn, wn, None, st, pd, dl, g, geom.out_spatial)

    def kern_bwd():
        gin(gyn, wn, st, pd, dl, g, geom.in_spatial)
        return gwt(gyn, xn, st, pd, dl, g, geom.kernel)

    module = torch.nn.Conv2d(c, k, (r, s), padding=padding, bias=False)
    with torch.no_grad():
        module.weight.copy_(w)
    module = fastconv.convert(module)
    xg = x.clone()
    forward = {
        "kernel": kern_fwd,
        "alg": lambda: alg.forward(x5, w5, None, geom),
        "op": lambda: ops.conv2d(x, w, None, [1, 1], pl, pl, [1, 1], 1, algo),
        "op_auto": lambda: ops.conv2d(x, w, None, [1, 1], pl, pl, [1, 1], 1, "auto"),
        "functional": lambda: F.conv2d(x, w, padding=padding, algo=algo),
        "functional_auto": lambda: F.conv2d(x, w, padding=padding),
        "module_auto": lambda: module(x),
    }
    backward = {
        "kernel": kern_bwd,
        "alg": lambda: (alg.grad_input(gy5, w5, geom), alg.grad_weight(gy5, x5, geom)),
        "op": lambda: (ops.conv2d_grad_input(gy, w, [h, wd], [1, 1], pl, pl, [1, 1], 1, algo),
                       ops.conv2d_grad_weight(gy, x, [r, s], [1, 1], pl, pl, [1, 1], 1, algo)),
        "op_auto": lambda: (ops.conv2d_grad_input(gy, w, [h, wd], [1, 1], pl, pl, [1, 1], 1, "auto"),
                            ops.conv2d_grad_weight(gy, x, [r, s], [1, 1], pl, pl, [1, 1], 1, "auto")),
    }
    xg.requires_grad_(True)

    def train_step():
        module.weight.grad = None
        xg.grad = None
        module(xg).backward(gy)

    train = {
        "kernel": lambda: (kern_fwd(), kern_bwd()),
        "module_auto": train_step,
    }
    with torch.no_grad():
        _settle_auto(forward["op_auto"])
    _settle_auto(backward["op_auto"])
    _settle_auto(train_step)
    return forward, backward, train


def pool_cases(x, stub: bool = False) -> dict:
    """Pooling forward and backward cases on ``x``: max_pool2d 3x3/2 pad 1, adaptive_avg_pool2d to 1x1."""
    import fastconv.functional as F
    from fastconv.cpu import pool_adaptive_avg, pool_max
    from fastconv.ops import pool as pool_ops

    x5 = x.unsqueeze(2)
    xn = x5.numpy()
    n, c, h, w = x.shape
    oh, ow = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
    kern = pool_ops.KERNELS["numba"]
    y, idx = kern.max_pool(x5, (1, 3, 3), (1, 2, 2), (0, 1, 1), (1, 1, 1), (1, oh, ow), False)
    gy, idxn = torch.randn(y.shape), idx.numpy()
    gyn = gy.numpy()
    ga = torch.randn(n, c, 1, 1)
    gan = ga.unsqueeze(2).numpy()
    ops = torch.ops.fastconv
    xg = x.clone().requires_grad_(True)
    gy4 = gy.squeeze(2)
    cases = {
        ("max_pool", "kernel"): lambda: pool_max.max_pool_forward(xn, (1, 3, 3), (1, 2, 2), (0, 1, 1), (1, 1, 1),
                                                                 (1, oh, ow), True),
        ("max_pool", "op"): lambda: ops.max_pool(x, [3, 3], [2, 2], [1, 1], [1, 1], False, False),
        ("max_pool", "functional"): lambda: F.max_pool2d(x, 3, 2, 1),
        ("max_pool_backward", "kernel"): lambda: pool_max.max_pool_backward(gyn, idxn, (1, h, w)),
        ("max_pool_backward", "op"): lambda: ops.max_pool_backward(gy4, idx.squeeze(2), [h, w]),
        ("max_pool_train", "kernel"): lambda: (
            pool_max.max_pool_forward(xn, (1, 3, 3), (1, 2, 2), (0, 1, 1), (1, 1, 1), (1, oh, ow), True),
            pool_max.max_pool_backward(gyn, idxn, (1, h, w))),
        ("max_pool_train", "functional"): lambda: torch.autograd.grad(F.max_pool2d(xg, 3, 2, 1), xg, gy4),
        ("adaptive_avg_pool", "kernel"): lambda: pool_adaptive_avg.adaptive_avg_pool_forward(xn, (1, 1, 1)),
        ("adaptive_avg_pool", "op"): lambda: ops.adaptive_avg_pool(x, [1, 1]),
        ("adaptive_avg_pool", "functional"): lambda: F.adaptive_avg_pool2d(x, 1),
        ("adaptive_avg_pool_backward", "kernel"): lambda: pool_adaptive_avg.adaptive_avg_pool_backward(
            gan, (1, h, w)),
        ("adaptive_avg_pool_backward", "op"): lambda: ops.adaptive_avg_pool_backward(ga, [h, w]),
        ("adaptive_avg_pool_train", "kernel"): lambda: (
            pool_adaptive_avg.adaptive_avg_pool_forward(xn, (1, 1, 1)),
            pool_adaptive_avg.adaptive_avg_pool_backward(gan, (1, h, w))),
        ("adaptive_avg_pool_train", "functional"): lambda: torch.autograd.grad(F.adaptive_avg_pool2d(xg, 1), xg,
                                                                                ga),
    }
    if stub:  # the kernel rows: the stub kernels on the 5-D tensors the ops hand them
        k = _StubPoolKernels()
        gy5, ga5, idx5 = gy, ga.unsqueeze(2), idx
        cases[("max_pool", "kernel")] = lambda: k.max_pool(x5, (1, 3, 3), (1, 2, 2), (0, 1, 1), (1, 1, 1),
                                                           (1, oh, ow), False)
        cases[("max_pool_backward", "kernel")] = lambda: k.max_pool_backward(gy5, idx5, (1, h, w))
        cases[("max_pool_train", "kernel")] = lambda: (cases[("max_pool", "kernel")](),
                                                       cases[("max_pool_backward", "kernel")]())
        cases[("adaptive_avg_pool", "kernel")] = lambda: k.adaptive_avg_pool(x5, (1, 1, 1))
        cases[("adaptive_avg_pool_backward", "kernel")] = lambda: k.adaptive_avg_pool_backward(ga5, (1, h, w))
        cases[("adaptive_avg_pool_train", "kernel")] = lambda: (cases[("adaptive_avg_pool", "kernel")](),
                                                                cases[("adaptive_avg_pool_backward", "kernel")]())
    return cases


def _rows(title: str, result: dict, base: str = "kernel") -> list[str]:
    """One table: median and min per row, ``overhead`` = row - base row; in the forward tables also ``own`` =
    overhead - (floor_conv_schema - its own body): what fastconv adds above torch's dispatch of such an op."""
    med0 = result[base][0]
    floor = result.get("floor_conv_schema")
    lines = [f"  {title}"]
    for name, (med, mn) in result.items():
        extra = "" if name == base else f"   overhead {med - med0:7.1f}"
        if floor is not None and name != base and not name.startswith("floor"):
            extra += f"   own {med - med0 - floor[0]:7.1f}"
        lines.append(f"    {name:<17} median {med:8.1f}  min {mn:8.1f}{extra}")
    return lines


def _measure_all(args, stub: bool, noop, noop_ag, noop_conv, lines: list) -> dict:
    """Every table once (real or stubbed kernels); appends the printed rows to ``lines``."""
    from fastconv import registry
    from fastconv.ops.conv import make_geometry

    tables: dict = {}
    base = "alg" if stub else "kernel"
    floor_x = torch.randn(1, 8, 8, 8)
    floor_xg = floor_x.clone().requires_grad_(True)
    shapes = {
        "1x256x8x8 * 512x256x1x1": (torch.randn(1, 256, 8, 8), torch.randn(512, 256, 1, 1), 0),
        "1x8x8x8 * 8x8x3x3 pad 1": (torch.randn(1, 8, 8, 8), torch.randn(8, 8, 3, 3), 1),
    }
    for label, (x, w, p) in shapes.items():
        fwd, bwd, train = conv_cases(x, w, p, args.algo)
        if stub:
            for table in (fwd, bwd):
                del table["kernel"]
            del train["kernel"]
            train = {"alg": lambda fwd=fwd, bwd=bwd: (fwd["alg"](), bwd["alg"]()), **train}
        g = make_geometry(2, *x.shape[:2], w.shape[0], 1, x.shape[2:], w.shape[2:], None, (1, 1), (p, p), (p, p),
                          (1, 1), x.dtype, "numba")
        chosen = {pass_: registry.decide("auto", g, pass_).algorithm.name
                  for pass_ in ("forward", "grad_input", "grad_weight")}
        floor = {"floor": lambda: noop(floor_x), "floor_autograd": lambda: noop_ag(floor_x),
                 "floor_conv_schema": lambda: noop_conv(x, w, None, [1, 1], [p, p], [p, p], [1, 1], 1, "im2col")}
        with torch.no_grad():
            res_f = measure({**fwd, **floor}, args.samples, args.block)
        res_b = measure(bwd, args.samples, args.block)
        res_t = measure({**train, "floor_autograd_grad": lambda: noop_ag(floor_xg).sum().backward()},
                        args.samples // 2, args.block)
        tables[label] = {"auto_chose": chosen, "forward": res_f, "backward": res_b, "train": res_t}
        lines.append(f"conv2d {label}  (algo={args.algo}; auto chose {chosen})")
        lines += _rows("forward, no_grad (us per call)", res_f, base)
        lines += _rows("backward: grad_input + grad_weight ops (us per pair)", res_b, base)
        lines += _rows("train step: forward + backward through autograd (us)", res_t, base)
    x = torch.randn(1, 64, 16, 16)
    cases = pool_cases(x, stub)
    with torch.no_grad():  # the training rows need autograd; the others run as inference does
        pool = measure({k: v for k, v in cases.items() if not k[0].endswith("_train")}, args.samples, args.block)
    pool.update(measure({k: v for k, v in cases.items() if k[0].endswith("_train")}, args.samples, args.block))
    tables["pool 1x64x16x16"] = {" / ".join(k): v for k, v in pool.items()}
    lines.append("pooling on 1x64x16x16 (max_pool2d 3x3/2 pad 1; adaptive_avg_pool2d -> 1x1)")
    for op in dict.fromkeys(k[0] for k in pool):
        lines += _rows(op, {layer: v for (o, layer), v in pool.items() if o == op})
    return tables


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=600, help="timed calls per case (default 600)")
    parser.add_argument("--block", type=int, default=20, help="calls per case in a row before the next case")
    parser.add_argument("--algo", default="im2col", help="the named algorithm at the bottom (default im2col)")
    parser.add_argument("--keep-cache", action="store_true",
                        help="use the user's autotune cache (default: a fresh temporary one)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and Numba threads (default 1: multi-threaded GEMMs on a shared machine make the "
                             "kernel rows noisy; the overhead does not depend on it); 0 keeps the defaults")
    parser.add_argument("--mode", choices=("both", "kernels", "stubbed"), default="both",
                        help="real kernels, kernels stubbed (host code only), or both (default)")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    if not args.keep_cache:
        os.environ["FASTCONV_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastconv-overhead-")

    torch.manual_seed(0)
    if args.threads:  # fastconv's kernels follow torch's setting (fastconv.config.sync_threads)
        torch.set_num_threads(args.threads)
    noop, noop_ag = _noop_ops()
    noop_conv = _noop_conv_op()
    report: dict = {"load_before": os.getloadavg(), "threads": torch.get_num_threads(), "tables": {}}
    lines = []
    modes = {"kernels": False, "stubbed": True} if args.mode == "both" else {args.mode: args.mode == "stubbed"}
    for mode, stub in modes.items():
        with stubbed_kernels(args.algo) if stub else contextlib.nullcontext():
            lines.append("=" * 20 + (" kernels stubbed: fastconv's host code only, base row 'alg' = the stub"
                                     if stub else " real kernels, base row 'kernel' = the bare Numba kernel"))
            report["tables"][mode] = _measure_all(args, stub, noop, noop_ag, noop_conv, lines)
    report["load_after"] = os.getloadavg()
    print(f"load average before {report['load_before'][0]:.2f}, after {report['load_after'][0]:.2f}; "
          f"torch threads {report['threads']}; medians and minima of {args.samples} calls per case (us)")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
