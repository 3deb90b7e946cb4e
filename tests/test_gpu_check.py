"""``fastconv gpu-check`` and ``fastconv bench --device cuda`` without a GPU: the emulated check runs
end to end and writes its JSON and log; the GPU modes refuse clearly when no GPU is visible."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastconv
from fastconv import bench_gpu, benchmark

ROOT = Path(__file__).resolve().parents[1]
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU harness needs g++")


def _fastconv(*args, timeout=1200):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "fastconv", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@needs_gxx
def test_gpu_check_emulate_writes_json_and_log(tmp_path):
    p = _fastconv("gpu-check", "--emulate", "--out", str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["status"] == "passed"
    assert report["environment"]["emulate"] is True
    assert report["tests"]["status"] == "passed" and report["tests"]["counts"]["passed"] > 50
    assert not report["tests"]["failed"]
    # the CUDA-only checks are skipped with their reason, not silently passed
    assert any("CUDA-graph capture needs a real GPU" in r for r in report["tests"]["skip_reasons"])
    rows = report["bench"]["rows"]
    assert {r["layer"] for r in rows} == {l.name for l in bench_gpu.emulated_suite()}
    assert all(r["status"] in ("ok", "refused") for r in rows)
    assert any(r["algo"] == "implicit-gemm" and r["status"] == "ok" and r["ms"] > 0 for r in rows)
    assert set(report["host_overhead_us"]) >= {"conv2d_forward_public_api", "conv2d_forward_cuda_layer"}
    log = (tmp_path / "gpu-check.log").read_text()
    assert "passed" in log and "emu_conv3x3" in log


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_modes_refuse_clearly_without_a_gpu(tmp_path):
    p = _fastconv("gpu-check", "--out", str(tmp_path), timeout=300)
    assert p.returncode == 2
    assert "no CUDA GPU is visible" in p.stderr and "--emulate" in p.stderr
    assert json.loads((tmp_path / "gpu-check.json").read_text())["status"] == "no-gpu"
    p = _fastconv("bench", "--device", "cuda", "--quick", "--out", str(tmp_path), timeout=300)
    assert p.returncode == 2
    assert "fastconv bench --device cuda: error: no CUDA GPU is visible" in p.stderr
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        bench_gpu.run_gpu_suite(bench_gpu.emulated_suite(), ["forward"])


@needs_gxx
def test_half_precision_rows_run_and_match_torch():
    """Under the autocast + channels_last mode fastconv's rows are measured like torch's: float16 inputs
    run (the SIMT kernels compute in float32 and round once; the tensor-core conv natively), and the
    result agrees with torch's under the same autocast."""
    layer = bench_gpu.emulated_suite()[0]
    impl = layer.passes["forward"]
    inputs = bench_gpu._prepare(impl.inputs(torch.float64, torch.Generator().manual_seed(0)), "amp_cl", "cpu")
    assert inputs[0].dtype == torch.float16
    with fastconv.backend("cuda-emu"):
        ours = bench_gpu._call(impl, "implicit-gemm", inputs, "amp_cl", "cpu")
    ref = bench_gpu._call(impl, "torch", inputs, "amp_cl", "cpu")
    assert ours.dtype == ref.dtype
    scale = ref.float().abs().max().item() + 1e-6
    assert (ours.float() - ref.float()).abs().max().item() <= 2e-2 * scale


def test_select_layers_quick_subset_exists():
    names = {l.name for l in benchmark.SUITE}
    assert set(bench_gpu.QUICK_LAYERS) <= names
    assert [l.name for l in bench_gpu.select_layers(None, quick=True)] == [
        l.name for l in benchmark.SUITE if l.name in bench_gpu.QUICK_LAYERS]
