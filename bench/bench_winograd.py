"""Winograd F(2x2,3x3) / F(4x4,3x3) against torch (oneDNN) and im2col on 3x3 stride-1 layers, float32.

Run as a pytest-benchmark suite::

    pytest bench/bench_winograd.py --benchmark-columns=median,iqr,rounds --benchmark-sort=name

or as a script that prints one table (median ms, ratio to torch measured in the same run)::

    python bench/bench_winograd.py [--passes forward,grad_input,grad_weight] [--repeat 7]

Every case checks its result against torch before it is timed. Threads: ``torch.set_num_threads(2)``
(fastconv's Numba kernels follow torch's count). The machine is shared and noisy: compare ratios taken
in the same run, not absolute times across runs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch
import torch.nn.functional as TF

import fastconv  # noqa: F401  (registers the ops)
from fastconv.tolerances import tolerance

THREADS = 2
ALGOS = ("torch", "im2col", "winograd2", "winograd4")
PASSES = ("forward", "grad_input", "grad_weight")
# name: (N, C, K, H, W), all 3x3, stride 1, padding 1
LAYERS = {
    "resnet50_3x3_56": (8, 64, 64, 56, 56),
    "vgg16_conv1_2": (2, 64, 64, 224, 224),
    "vgg16_conv3": (8, 256, 256, 56, 56),
    "resnet_3x3_14": (8, 256, 256, 14, 14),
}
# float32 vs torch float32: the tests' per-algorithm table (fastconv.tolerances), loosened for the weight
# gradient's long reductions (N*H*W terms) where torch and BLAS sum in different orders.
RTOL = {algo: tolerance(torch.float32, algo)["rtol"] for algo in ("torch", "im2col", "winograd2", "winograd4")}


def _inputs(layer):
    N, C, K, H, W = LAYERS[layer]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, W, generator=g)
    w = torch.randn(K, C, 3, 3, generator=g) * (2.0 / (9 * C)) ** 0.5  # He init: outputs of unit scale
    gy = torch.randn(N, K, H, W, generator=g)
    return x, w, gy


def _runner(algo, pass_, x, w, gy):
    """A no-argument callable computing ``pass_`` with ``algo`` (torch: aten's own kernels)."""
    geometry = [[1, 1], [1, 1], [1, 1], [1, 1], 1, algo]
    if algo == "torch":
        if pass_ == "forward":
            return lambda: TF.conv2d(x, w, padding=1)
        mask = [pass_ == "grad_input", pass_ == "grad_weight", False]
        idx = 0 if pass_ == "grad_input" else 1
        return lambda: torch.ops.aten.convolution_backward(
            gy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)[idx]
    if pass_ == "forward":
        return lambda: torch.ops.fastconv.conv2d(x, w, None, *geometry)
    if pass_ == "grad_input":
        return lambda: torch.ops.fastconv.conv2d_grad_input(gy, w, list(x.shape[2:]), *geometry)
    return lambda: torch.ops.fastconv.conv2d_grad_weight(gy, x, list(w.shape[2:]), *geometry)


def _check(algo, pass_, got, want):
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    rtol = RTOL[algo] * (10 if pass_ == "grad_weight" else 1)
    if err > rtol * max(scale, 1.0):
        raise AssertionError(f"{algo} {pass_}: max error {err:.3g} vs output scale {scale:.3g}")
    return err / max(scale, 1e-30)


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_winograd_layer(benchmark, layer, pass_, algo):
    x, w, gy = _inputs(layer)
    fn = _runner(algo, pass_, x, w, gy)
    want = _runner("torch", pass_, x, w, gy)()
    benchmark.extra_info["scaled_error"] = _check(algo, pass_, fn(), want)
    N, C, K, H, W = LAYERS[layer]
    benchmark.extra_info["gflop"] = 2 * N * K * C * 9 * H * W / 1e9
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)


def _median_ms(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passes", default="forward")
    parser.add_argument("--layers", default=",".join(LAYERS))
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    print(f"{'layer':18} {'pass':11} " + " ".join(f"{a:>22}" for a in ALGOS) + "   (median ms, x vs torch)")
    for layer in args.layers.split(","):
        x, w, gy = _inputs(layer)
        N, C, K, H, W = LAYERS[layer]
        gflop = 2 * N * K * C * 9 * H * W / 1e9
        for pass_ in args.passes.split(","):
            want = _runner("torch", pass_, x, w, gy)()
            cells, t_torch = [], None
            # interleave the algorithms round by round so load changes hit all of them alike
            fns = {a: _runner(a, pass_, x, w, gy) for a in ALGOS}
            errs = {a: _check(a, pass_, fns[a](), want) for a in ALGOS}
            samples = {a: [] for a in ALGOS}
            for _ in range(args.repeat):
                for a in ALGOS:
                    samples[a].append(_median_ms(fns[a], 1))
            for a in ALGOS:
                ms = statistics.median(samples[a])
                t_torch = ms if a == "torch" else t_torch
                cells.append(f"{ms:8.1f} ({t_torch / ms:4.2f}x) e{errs[a]:.0e}")
            print(f"{layer:18} {pass_:11} " + " ".join(f"{c:>22}" for c in cells)
                  + f"   {gflop:.2f} GFLOP, torch {gflop / t_torch * 1e3:.0f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
