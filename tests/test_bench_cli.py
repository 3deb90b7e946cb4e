"""``fastconv bench``: runs a tiny layer end to end, writes its JSON and PNG, rejects unknown names.

No timing is asserted (timings belong to the benchmark itself); the tests check structure, the
correctness check against torch, and the error paths.
"""
from __future__ import annotations

import json
import sys

import pytest

from fastconv import benchmark, cli

ROW_FIELDS = {"layer", "arch", "op", "pass", "algo", "dtype", "macs", "ms", "times_ms", "reps", "calls_per_round",
              "gflops", "pct_gemm", "ratio", "error", "tolerance", "ok", "first_call_ms"}


def test_quick_run_writes_json_and_png(tmp_path, capsys):
    code = cli.main(["bench", "--quick", "--layers", "lenet5_conv1", "--algo", "direct,im2col,auto",
                     "--reps", "1", "--out", str(tmp_path), "--no-progress", "--no-first-call"])
    assert code == 0
    out = capsys.readouterr().out
    assert "lenet5_conv1 [LeNet-5] forward" in out and "grad_weight" in out and "geomean" in out
    data = json.loads((tmp_path / "fastconv-bench.json").read_text())
    png = (tmp_path / "fastconv-bench.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000

    assert {"environment", "layers", "rows", "summary", "first_call", "arguments"} <= set(data)
    assert data["environment"]["gemm_gflops"] > 0
    assert [l["name"] for l in data["layers"]] == ["lenet5_conv1"]
    rows = data["rows"]
    assert {(r["pass"], r["algo"]) for r in rows} == {(p, a) for p in ("forward", "grad_input", "grad_weight")
                                                      for a in ("torch", "direct", "im2col", "auto")}
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["ok"] is True and 0 <= r["error"] <= r["tolerance"]
        assert r["ms"] > 0 and r["macs"] == 64 * 6 * 28 * 28 * 25
        assert r["gflops"] == pytest.approx(2 * r["macs"] / (r["ms"] * 1e-3) / 1e9)
    torch_rows = [r for r in rows if r["algo"] == "torch"]
    assert all(r["ratio"] == 1.0 for r in torch_rows)
    assert all(r["auto_choice"] in benchmark.select_layers("lenet5_conv1")[0].algorithms(benchmark.parse_dtype("float32"))
               for r in rows if r["algo"] == "auto")
    summary = data["summary"]
    assert set(summary["auto_vs_torch_geomean"]) == {"forward", "grad_input", "grad_weight"}
    assert summary["worst_layer"]["forward"]["layer"] == "lenet5_conv1"
    assert summary["fwd_bwd_auto_vs_torch_geomean"] > 0 and summary["failures"] == []
    assert data["first_call"] is None  # --no-first-call


@pytest.mark.slow
def test_first_call_is_timed_in_a_fresh_process():
    fc = benchmark.first_call()
    assert "failure" not in fc, fc
    assert fc["import_fastconv_s"] > 0 and fc["first_conv2d_s"] > 0 and fc["second_conv2d_ms"] > 0


def test_wrong_result_is_reported_not_timed(monkeypatch):
    layer = benchmark.select_layers("lenet5_conv2")[0]
    real = layer.passes["forward"]
    broken = benchmark.PassImpl(real.inputs, lambda t, algo: real.fastconv(t, algo) * 1.01, real.torch)
    monkeypatch.setitem(layer.passes, "forward", broken)
    rows = benchmark.run_case(layer, "forward", ["torch", "direct"], benchmark.parse_dtype("float32"), 1, 100.0)
    bad = rows[1]
    assert bad["ok"] is False and "exceeds tolerance" in bad["failure"] and "ms" not in bad
    assert rows[0]["ok"] is True and "ms" in rows[0]


@pytest.mark.parametrize("args, message", [
    (["--layers", "no_such_layer"], "unknown layer 'no_such_layer'"),
    (["--algo", "fft9"], "unknown algorithm 'fft9'"),
    (["--pass", "sideways"], "unknown pass 'sideways'"),
    (["--dtype", "float16"], "unsupported dtype 'float16'"),
    (["--reps", "0"], "--reps must be at least 1"),
])
def test_bad_arguments_are_refused(tmp_path, capsys, args, message):
    assert cli.main(["bench", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "fastconv-bench.json").exists()


def test_layer_selection():
    assert [l.name for l in benchmark.select_layers("resnet50_3x3")] == ["resnet50_3x3"]
    assert {l.name for l in benchmark.select_layers("lenet5")} == {"lenet5_conv1", "lenet5_conv2"}
    quick = benchmark.select_layers(None, quick=True)
    full = benchmark.select_layers(None)
    assert quick and set(l.name for l in quick) < set(l.name for l in full)
    assert "c3d_conv3d" not in {l.name for l in full} | {l.name for l in quick}
    assert [l.name for l in benchmark.select_layers("c3d")] == ["c3d_conv3d"]
    assert benchmark.parse_passes("bwd") == ["grad_input", "grad_weight"]
    # the held-out layers (the suite's networks, layers the suite does not hold) run only when asked for
    held_out = benchmark.select_layers("held-out")
    assert len(held_out) >= 20 and not {l.name for l in held_out} & {l.name for l in full}
    assert len({l.name for l in benchmark.SUITE}) == len(benchmark.SUITE)


def test_suite_layers_have_issue_shapes():
    by_name = {l.name: l for l in benchmark.SUITE}
    assert by_name["resnet50_3x3"].shapes["output"] == (8, 64, 56, 56)
    assert by_name["alexnet_conv1"].shapes["output"] == (8, 96, 55, 55)
    assert by_name["audio_conv1d"].shapes["output"] == (16, 128, 1981)
    # DESIGN.md §10's anchor: 28x28x192 -> 28x28x32 with 5x5 is 120,422,400 MACs per image.
    assert by_name["inception_5x5"].macs == 8 * 120_422_400


def test_torch_baseline_worker_never_imports_fastconv_or_numba():
    # The baseline must be what a user who chose torch sees: a process without fastconv's thread pools.
    layer = benchmark.select_layers("lenet5_conv1")[0]
    with benchmark.TorchBaseline(threads=1) as worker:
        times = worker.time(layer.name, "forward", benchmark.parse_dtype("float32"), n=2)
        assert len(times) == 2 and all(t > 0 for t in times)
        assert worker.is_clean()
    rows = benchmark.run_case(layer, "forward", ["torch", "direct"], benchmark.parse_dtype("float32"), 1, 100.0,
                              baseline=benchmark.TorchBaseline(threads=1))
    torch_row = rows[0]
    assert torch_row["baseline"] == "separate process" and torch_row["inprocess_ms"] > 0
    assert torch_row["ratio"] == 1.0 and rows[1]["ratio"] == pytest.approx(rows[1]["ms"] / torch_row["ms"])


def test_each_timed_call_gets_what_the_worker_gets(monkeypatch):
    # The clean worker's call comes after this process idled (QUIESCE_S) and after one untimed call; the
    # in-process calls must get the same, or they run on cores the worker's OpenMP threads still spin on.
    from fastconv import bench_runner

    layer = benchmark.select_layers("lenet5_conv1")[0]
    real = layer.passes["forward"]
    events = []

    def fastconv_side(t, algo):
        events.append("call")
        return real.fastconv(t, algo)

    monkeypatch.setitem(layer.passes, "forward", benchmark.PassImpl(real.inputs, fastconv_side, real.torch))

    class FakeWorker:
        def time(self, *args, **kwargs):
            events.append("worker")
            return [1.0]

    monkeypatch.setattr(bench_runner.time, "sleep", lambda s: events.append(f"sleep {s}"))
    rows = bench_runner.run_case(layer, "forward", ["torch", "direct"], benchmark.parse_dtype("float32"), 3, 100.0,
                                 baseline=FakeWorker())
    assert rows[1]["reps"] == 3 and rows[0]["ms"] == 1.0
    calls = rows[1]["calls_per_round"]
    assert calls == rows[0]["calls_per_round"] and len(rows[1]["times_ms"]) == 3 * calls
    # first call + warm-up, the worker's warm-up, then per round: settle, untimed call, timed calls, worker
    rounds = events[events.index("worker") + 1:]
    assert rounds == ([f"sleep {bench_runner.QUIESCE_S}", "call"] + ["call"] * calls + ["worker"]) * 3


def test_sub_millisecond_rows_get_several_calls_per_round():
    # A 0.1 ms row timed once per round rested on a handful of single calls: one stalled torch call in a few
    # moved the held-out geomean by 0.1. Rows of the round's minimum or slower keep one call.
    from fastconv import bench_runner

    assert bench_runner.calls_per_round(0.1) == 20 and bench_runner.calls_per_round(0.5) == 4
    assert bench_runner.calls_per_round(bench_runner.MIN_ROUND_MS) == 1 and bench_runner.calls_per_round(40.0) == 1
    assert bench_runner.calls_per_round(0.0) == bench_runner.MAX_CALLS_PER_ROUND


def test_results_are_kept_not_overwritten_and_png_is_optional(tmp_path, monkeypatch):
    result = {"environment": {"gemm_dtype": "float32", "gemm_gflops": 1.0, "torch_threads": 1,
                              "numba_threads": 1},
              "rows": [], "summary": benchmark.summarize([]), "first_call": None}
    first = benchmark.write_results(result, tmp_path, text="table one")
    assert first["kept"] == [] and "table one" in first["txt"].read_text()
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    second = benchmark.write_results(result, tmp_path, text="table two")
    assert {p.suffix for p in second["kept"]} == {".json", ".txt", ".png"}
    assert all(p.exists() and p.name.startswith("fastconv-bench-") for p in second["kept"])
    assert "table two" in second["txt"].read_text() and second["json"].exists()
    assert isinstance(second["png"], str) and "pip install matplotlib" in second["png"]
    assert not (tmp_path / "fastconv-bench.png").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mmap threshold: Linux only")
def test_settled_heap_reuses_pages_for_large_results():
    # Both sides of the benchmark settle the heap first, so neither is timed on fresh pages the other is spared.
    # In a fresh torch process this conv's 6 MB result faulted in about 3,400 pages on every call (dev VM,
    # torch 2.13); after settle_heap, none.
    script = (
        "import resource, torch\n"
        "from fastconv.bench_torch_worker import settle_heap\n"
        "settle_heap()\n"
        "x = torch.randn(8, 16, 55, 55); w = torch.randn(64, 16, 3, 3)\n"
        "conv = lambda: torch.nn.functional.conv2d(x, w, padding=1)\n"
        "conv()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(3):\n"
        "    conv()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    import os
    import subprocess

    import fastconv

    if "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or "").lower():
        pytest.skip("glibc's mmap threshold: another C library here")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fastconv.__file__)))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    faults = int(out.stdout.split()[-1])
    result_pages = 8 * 64 * 55 * 55 * 4 // 4096
    assert faults < 3 * result_pages // 10, f"{faults} page faults in 3 calls: the result's pages are not reused"
