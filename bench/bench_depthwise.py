"""Depthwise and depthwise-separable convolution: fastconv vs torch, float32, in one run.

    pytest bench/bench_depthwise.py --benchmark-columns=median,iqr,rounds -s
    BENCH_THREADS=1 BENCH_ROUNDS=21 pytest bench/bench_depthwise.py -s     # one thread, more rounds

Every case checks its result against torch before it is timed. Passes: forward, grad_input and
grad_weight for the depthwise layers (MobileNet shapes, 3x3 pad 1, stride 1 and 2); forward and
forward+backward for the depthwise-separable block (fused, unfused, torch's two convs). At the end
the medians are printed as a table with the ratio torch / fastconv (> 1: fastconv faster) and written
to bench/results/depthwise.json. The machine is shared and noisy: compare ratios from one run.
"""
from __future__ import annotations

import json
import os
import statistics

import pytest
import torch
import torch.nn.functional as TF

import fastconv.functional as F

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "15"))
# BENCH_THREADS sets torch's thread count, which fastconv's Numba kernels follow (fastconv.config).
if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))

# name: (N, C, H=W, stride)
DEPTHWISE = {
    "mbv1_256x28": (8, 256, 28, 1),
    "mbv1_32x112": (8, 32, 112, 1),
    "mbv1_512x14": (8, 512, 14, 1),
    "mbv1_256x28_s2": (8, 256, 28, 2),
    "mbv1_64x112_s2": (8, 64, 112, 2),
}
# name: (N, C, K, H=W)
SEPARABLE = {"block_256x28": (8, 256, 256, 28)}

_RESULTS: dict[tuple[str, str, str], float] = {}


def _check(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    # float32 sums of up to ~1e5 terms: compare relative to the result's scale
    err = (got - want).abs().max().item() if want.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 1.0
    assert err <= 1e-4 * max(scale, 1.0), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def _time(benchmark, key, fn):
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    _RESULTS[key] = statistics.median(benchmark.stats.stats.data) * 1e3


def _depthwise_setup(case):
    n, c, hw, s = DEPTHWISE[case]
    x = torch.randn(n, c, hw, hw)
    w = torch.randn(c, 1, 3, 3)
    y = TF.conv2d(x, w, stride=s, padding=1, groups=c)
    gy = torch.randn_like(y)
    return x, w, y, gy, s, c


@pytest.mark.parametrize("impl", ["fastconv", "torch"])
@pytest.mark.parametrize("pass_", ["forward", "grad_input", "grad_weight"])
@pytest.mark.parametrize("layer", list(DEPTHWISE))
def test_depthwise(benchmark, layer, pass_, impl):
    x, w, y, gy, s, c = _depthwise_setup(layer)
    benchmark.group = f"depthwise {layer} {pass_}"
    geometry = ([s, s], [1, 1], [1, 1], [1, 1], c, "depthwise")
    mask = {"grad_input": [True, False, False], "grad_weight": [False, True, False]}

    def torch_fn():
        if pass_ == "forward":
            return TF.conv2d(x, w, stride=s, padding=1, groups=c)
        out = torch.ops.aten.convolution_backward(gy, x, w, None, [s, s], [1, 1], [1, 1], False, [0, 0], c,
                                                  mask[pass_])
        return out[0] if pass_ == "grad_input" else out[1]

    def ours_fn():
        if pass_ == "forward":
            return F.conv2d(x, w, stride=s, padding=1, groups=c, algo="depthwise")
        if pass_ == "grad_input":
            return torch.ops.fastconv.conv2d_grad_input(gy, w, list(x.shape[2:]), *geometry)
        return torch.ops.fastconv.conv2d_grad_weight(gy, x, [3, 3], *geometry)

    _check(ours_fn(), torch_fn(), f"{layer} {pass_}")
    _time(benchmark, (layer, pass_, impl), ours_fn if impl == "fastconv" else torch_fn)


@pytest.mark.parametrize("impl", ["fused", "unfused", "torch"])
@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
@pytest.mark.parametrize("layer", list(SEPARABLE))
def test_separable(benchmark, layer, pass_, impl):
    n, c, k, hw = SEPARABLE[layer]
    x = torch.randn(n, c, hw, hw)
    params = [torch.randn(c, 1, 3, 3) * 0.3, torch.randn(k, c, 1, 1) * c ** -0.5, torch.randn(c), torch.randn(k)]
    for p in params:
        p.requires_grad_(pass_ != "forward")
    benchmark.group = f"separable {layer} {pass_}"

    def run(ps):
        if impl == "torch":
            return TF.conv2d(TF.conv2d(x, ps[0], ps[2], padding=1, groups=c), ps[1], ps[3])
        return F.depthwise_separable_conv2d(x, ps[0], ps[1], ps[2], ps[3], padding=1, algo=impl)

    def fn():
        y = run(params)
        if pass_ == "forward":
            return y
        return torch.autograd.grad(y, params, gy)

    gy = torch.randn(n, k, hw, hw)
    ref = [TF.conv2d(TF.conv2d(x, params[0], params[2], padding=1, groups=c), params[1], params[3])]
    if pass_ != "forward":
        ref = torch.autograd.grad(ref[0], params, gy)
    got = fn()
    for i, (a, b) in enumerate(zip([got] if pass_ == "forward" else got, ref)):
        _check(a.detach(), b.detach(), f"{layer} {pass_} output {i}")
    _time(benchmark, (layer, pass_, impl), fn)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if not _RESULTS:
        return
    rows = []
    for (case, pass_, impl), ms in sorted(_RESULTS.items()):
        if impl == "torch":
            continue
        base = _RESULTS.get((case, pass_, "torch"))
        rows.append(dict(case=case, pass_=pass_, impl=impl, median_ms=ms, torch_ms=base,
                         speedup_vs_torch=None if base is None else base / ms))
    print(f"\n{'case':<18}{'pass':<18}{'impl':<10}{'median ms':>10}{'torch ms':>10}{'torch/ours':>11}")
    for r in rows:
        ratio = "" if r["speedup_vs_torch"] is None else f"{r['speedup_vs_torch']:.2f}x"
        print(f"{r['case']:<18}{r['pass_']:<18}{r['impl']:<10}{r['median_ms']:>10.3f}"
              f"{(r['torch_ms'] or 0):>10.3f}{ratio:>11}")
    out = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "depthwise.json"), "w") as f:
        json.dump(dict(threads=torch.get_num_threads(), rows=rows), f, indent=1)
