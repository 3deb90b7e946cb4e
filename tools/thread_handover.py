"""Thread handover: is a torch op slower right after a fastconv op than right after a torch op?

In a process that mixes torch and fastconv, the op after a fastconv convolution starts while Numba's
threads (TBB or OpenMP workqueue) may still spin or hold the cores, and torch's OpenMP pool may have
gone to sleep meanwhile; the same op after a torch convolution finds torch's pool awake. This script
times one torch op (the "next" op) right after each kind of predecessor, in one process, interleaved
round by round in a rotating order, and prints medians:

- after fastconv: ``fastconv.functional.conv2d`` (8x64x32x32, 3x3, 64 -> 64), then the next op;
- after torch: ``torch.nn.functional.conv2d`` on the same tensors, then the next op;
- after idle: a 0.2 s sleep (every pool asleep), then the next op.

Next ops: BatchNorm (eval) + ReLU on the 8x64x32x32 output (small, memory-bound: mostly thread wake-up),
and a torch 3x3 conv of the same shape (a larger parallel region).

    PYTHONPATH=$PWD python tools/thread_handover.py [--rounds 200] [--threads N]

Only medians of many interleaved rounds mean anything on a shared machine; quote ``uptime``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import fastconv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, help="torch (and so Numba) threads; default: torch's")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, 32, 32, generator=gen)
    w = torch.randn(64, 64, 3, 3, generator=gen) * 0.05
    mean, var = torch.zeros(64), torch.ones(64)
    gamma, beta = torch.ones(64), torch.zeros(64)
    y = F.conv2d(x, w, padding=1)

    def bn_relu():
        return F.relu(F.batch_norm(y, mean, var, gamma, beta, training=False))

    def torch_conv():
        return F.conv2d(y, w, padding=1)

    befores = {
        "fastconv conv": lambda: fastconv.functional.conv2d(x, w, padding=1),
        "torch conv": lambda: F.conv2d(x, w, padding=1),
        "idle 0.2 s": lambda: time.sleep(0.2),
    }
    nexts = {"bn+relu": bn_relu, "torch conv": torch_conv}
    torch.testing.assert_close(befores["fastconv conv"](), befores["torch conv"](), rtol=1e-4, atol=1e-4)
    for _ in range(20):  # compile, tune (the autotuner measures on real calls), wake every pool
        for before in befores.values():
            if before is not befores["idle 0.2 s"]:
                before()
        for op in nexts.values():
            op()
    times = {(b, n): [] for b in befores for n in nexts}
    order = list(befores)
    with torch.no_grad():
        for i in range(args.rounds):
            order = order[1:] + order[:1]  # rotate: no predecessor always comes first in a round
            for b in order:
                for n, op in nexts.items():
                    befores[b]()
                    start = time.perf_counter()
                    op()
                    times[(b, n)].append((time.perf_counter() - start) * 1e6)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, rounds {args.rounds}, "
          f"load average {os.getloadavg()}")
    print(f"{'next op':<12}" + "".join(f"{'after ' + b:>22}" for b in befores) + "   (median us; q1-q3)")
    for n in nexts:
        cells = []
        for b in befores:
            t = sorted(times[(b, n)])
            q1, q3 = t[len(t) // 4], t[(3 * len(t)) // 4]
            cells.append(f"{statistics.median(t):8.1f} ({q1:.0f}-{q3:.0f})")
        print(f"{n:<12}" + "".join(f"{c:>22}" for c in cells))
    for n in nexts:
        ratio = statistics.median(times[("fastconv conv", n)]) / statistics.median(times[("torch conv", n)])
        print(f"{n}: after fastconv / after torch = {ratio:.2f}")


if __name__ == "__main__":
    main()
