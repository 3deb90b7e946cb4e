"""Depthwise kernels against a clean torch, per shape and pass (issue 12's depthwise target).

torch is timed in :class:`fastconv.bench_runner.TorchBaseline`'s worker (a process that never imports
fastconv or Numba), fastconv here; the two alternate shape by shape, round by round, so a burst of load
hits both. Per (shape, pass): median over rounds of each round's median of ``--reps`` calls, the
spread (min-max of the per-round ratios), the load average at each round, and ``best``: the fastest
fastconv round over the fastest torch round (what each side does when the machine lets it).

fastconv is timed twice: ``kern`` is the Numba kernel entry (numpy in, numpy out: what this file's
kernels control) and ``op`` is ``torch.ops.fastconv.conv2d*`` with ``algo="depthwise"`` (adds the
per-call overhead of the op path).

    PYTHONPATH=. python tools/dw_measure.py --rounds 5 --reps 5 [--layers dw3x3_c512] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np
import torch

from fastconv import bench_suite
from fastconv.bench_runner import TorchBaseline
from fastconv.cpu import depthwise as dw


def _kernel_call(layer, pass_, t):
    stride = layer.kwargs.get("stride", 1)
    pad = layer.kwargs.get("padding", 0)
    st, pd, dl = (1, stride, stride), (0, pad, pad), (1, 1, 1)
    C = layer.shapes["input"][1]
    x5 = lambda a: a.numpy()[:, :, None]  # noqa: E731
    if pass_ == "forward":
        x, w = x5(t[0]), x5(t[1])
        osp = (1,) + tuple(layer.shapes["output"][2:])
        return lambda: dw.depthwise_forward(x, w, None, st, pd, dl, C, osp)
    if pass_ == "grad_input":
        go, w = x5(t[0]), x5(t[1])
        isp = (1,) + tuple(layer.shapes["input"][2:])
        return lambda: dw.depthwise_grad_input(go, w, st, pd, dl, C, isp)
    go, x = x5(t[0]), x5(t[1])
    ksp = (1,) + tuple(layer.shapes["weight"][2:])
    return lambda: dw.depthwise_grad_weight(go, x, st, pd, dl, C, ksp)


def _median_ms(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="depthwise")
    ap.add_argument("--passes", default="all")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-op", action="store_true", help="skip the op-path timing")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    layers = bench_suite.select_layers(a.layers)
    passes = bench_suite.parse_passes(a.passes)
    gen = torch.Generator().manual_seed(0)
    cases = []
    for layer in layers:
        for p in passes:
            impl = layer.passes[p]
            t = impl.inputs(torch.float32, gen)
            kern = _kernel_call(layer, p, t)
            ref = impl.torch(t)
            got = torch.from_numpy(np.asarray(kern())).reshape(ref.shape)
            err = float((got - ref).abs().max() / ref.abs().max())
            assert err < 1e-4, (layer.name, p, err)
            impl.fastconv(t, "depthwise")
            cases.append(dict(layer=layer, name=layer.name, p=p, t=t, kern=kern, impl=impl, err=err,
                              torch=[], kern_ms=[], op=[], load=[]))
    with TorchBaseline(2) as base:
        assert base.is_clean()
        for r in range(a.rounds):
            for c in cases:
                c["load"].append(float(open("/proc/loadavg").read().split()[0]))
                c["torch"].append(statistics.median(base.time(c["name"], c["p"], torch.float32, n=a.reps)))
                c["kern"]()
                c["kern_ms"].append(_median_ms(c["kern"], a.reps))
                if not a.no_op:
                    impl, t = c["impl"], c["t"]
                    c["op"].append(_median_ms(lambda: impl.fastconv(t, "depthwise"), a.reps))
    rows = []
    print(f"{'shape':28s} {'pass':11s} {'torch ms':>9s} {'kern ms':>9s} {'kern/t':>7s} {'spread':>13s} "
          f"{'op/t':>6s} {'best':>5s} load")
    for c in cases:
        tm, km = statistics.median(c["torch"]), statistics.median(c["kern_ms"])
        ratios = [k / t for k, t in zip(c["kern_ms"], c["torch"])]
        om = statistics.median(c["op"]) if c["op"] else float("nan")
        best = min(c["kern_ms"]) / min(c["torch"])
        row = dict(shape=c["name"], pass_=c["p"], torch_ms=tm, kern_ms=km, kern_ratio=km / tm, best_ratio=best,
                   ratio_lo=min(ratios), ratio_hi=max(ratios), op_ms=om, op_ratio=om / tm,
                   load=[min(c["load"]), max(c["load"])], err=c["err"])
        rows.append(row)
        print(f"{c['name']:28s} {c['p']:11s} {tm:9.3f} {km:9.3f} {km / tm:7.2f} "
              f"{min(ratios):6.2f}-{max(ratios):5.2f} {om / tm:6.2f} {best:5.2f} {row['load'][0]:.1f}-{row['load'][1]:.1f}")
    for p in passes:
        sel = [r for r in rows if r["pass_"] == p]
        gk = math.exp(statistics.fmean(math.log(r["kern_ratio"]) for r in sel))
        go = math.exp(statistics.fmean(math.log(r["op_ratio"]) for r in sel)) if not a.no_op else float("nan")
        gb = math.exp(statistics.fmean(math.log(r["best_ratio"]) for r in sel))
        print(f"geomean {p:11s} kern/torch {gk:.3f}  op/torch {go:.3f}  best/best {gb:.3f}  ({len(sel)} shapes)")
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
