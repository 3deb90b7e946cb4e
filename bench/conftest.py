"""Shared pieces of the pytest-benchmark suite (``python -m pytest bench/ --benchmark-only``).

Options: ``--bench-layers`` (comma-separated names or substrings, as ``fastconv bench --layers``),
``--bench-slow`` (include layers marked slow, e.g. the 3-D convolution), ``--bench-dtype``.
"""
from __future__ import annotations

import pytest
import torch

from fastconv import benchmark


def pytest_addoption(parser):
    group = parser.getgroup("fastconv")
    group.addoption("--bench-layers", default=None, help="layers to run (names or substrings; default: all "
                                                         "but the slow ones)")
    group.addoption("--bench-slow", action="store_true", help="also run layers marked slow")
    group.addoption("--bench-dtype", default="float32", help="float32 or float64")


def selected_layers(config) -> list:
    spec = config.getoption("--bench-layers")
    layers = benchmark.select_layers(spec)
    if config.getoption("--bench-slow") and not spec:
        layers += [l for l in benchmark.SUITE if l.slow and l not in layers]
    return layers


def pytest_generate_tests(metafunc):
    """Parametrize ``case`` as layer x pass x algorithm (torch, each accepting algorithm, auto)."""
    if "case" not in metafunc.fixturenames:
        return
    dtype = benchmark.parse_dtype(metafunc.config.getoption("--bench-dtype"))
    params, ids = [], []
    for layer in selected_layers(metafunc.config):
        for pass_ in layer.passes:
            for algo in benchmark.algos_for(layer, dtype, None):
                params.append((layer, pass_, algo, dtype))
                ids.append(f"{layer.name}-{pass_}-{algo}")
    metafunc.parametrize("case", params, ids=ids)


@pytest.fixture(scope="session")
def gemm_gflops(request) -> float:
    """The machine's GEMM rate (2048^3 torch.mm) in the bench dtype, measured once per session."""
    return benchmark.measure_gemm(benchmark.parse_dtype(request.config.getoption("--bench-dtype")))


@pytest.fixture(scope="session")
def references() -> dict:
    """torch's float64 result per (layer, pass, dtype), computed once and shared by the algorithms."""
    return {}


def reference(references: dict, layer, pass_: str, dtype: torch.dtype, inputs: tuple) -> torch.Tensor:
    key = (layer.name, pass_, dtype)
    if key not in references:
        inputs64 = tuple(t.to(torch.float64) if isinstance(t, torch.Tensor) else t for t in inputs)
        with torch.no_grad():
            references[key] = layer.passes[pass_].torch(inputs64)
    return references[key]
