"""The layer suite of :mod:`fastconv.benchmark` as pytest-benchmark cases: layer x pass x algorithm.

Each case first checks its result against torch in float64 (the same check and tolerance as
``fastconv bench``), then times the call. ``extra_info`` carries GFLOP/s, percent of the GEMM rate,
MACs and the error, so ``--benchmark-json`` holds everything ``fastconv bench`` reports except the
ratio to torch: each layer and pass is its own benchmark group, so torch's row sits beside the
algorithms' rows and the ratio is the ratio of their medians (``fastconv bench`` prints it directly).

    python -m pytest bench/ --benchmark-only
    python -m pytest bench/ --benchmark-only --bench-layers resnet50 -k forward
"""
from __future__ import annotations

import torch

from fastconv import benchmark as suite

from conftest import reference


def test_layer(benchmark, case, gemm_gflops, references):
    """Check one layer x pass x algorithm against torch (float64), then time it (5 rounds after a warm-up)."""
    layer, pass_, algo, dtype = case
    impl = layer.passes[pass_]
    inputs = impl.inputs(dtype, torch.Generator().manual_seed(0))
    got = suite._call(impl, algo, inputs)
    err = suite.relative_error(got, reference(references, layer, pass_, dtype, inputs))
    tol = suite.tolerance(dtype, algo)
    assert err <= tol, f"{layer.name} {pass_} {algo}: error {err:.2e} exceeds tolerance {tol:.0e}"

    benchmark.group = f"{layer.name} {pass_}"
    benchmark.extra_info.update(layer=layer.name, arch=layer.arch, op=layer.op, pass_=pass_, algo=algo,
                                macs=layer.macs, error=err)
    benchmark.pedantic(suite._call, args=(impl, algo, inputs), rounds=5, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the check above still ran
        return
    median = benchmark.stats.stats.median
    gflops = 2 * layer.macs / median / 1e9
    benchmark.extra_info.update(gflops=gflops, pct_gemm=100 * gflops / gemm_gflops)
