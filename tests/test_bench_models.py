"""``fastconv bench --models``: the whole-model mode on small zoo models. Outputs of the converted and the
torch model must agree; times are recorded, never asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import fastconv
from fastconv import bench_models, cli
from helpers import assert_close


def test_to_torch_is_the_inverse_of_convert():
    model = fastconv.models.lenet5().double()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    expected = model(x)
    twin = fastconv.nn.to_torch(model)
    assert not any(type(m).__module__.startswith("fastconv.nn") for m in twin.modules())
    assert_close(twin(x), expected)
    fastconv.convert(twin)
    assert any(isinstance(m, fastconv.nn.Conv2d) for m in twin.modules())


def test_models_mode_checks_outputs_and_times_a_clean_baseline(tmp_path, capsys):
    code = cli.main(["bench", "--models", "lenet5", "--reps", "1", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "lenet5 (zoo)" in out and "fastconv/torch infer8" in out and "one forward:" in out
    data = json.loads((tmp_path / "fastconv-bench-models.json").read_text())
    assert "imported neither fastconv nor Numba (checked)" in data["environment"]["torch_baseline"]
    rows = data["rows"]
    assert [r["mode"] for r in rows] == list(bench_models.MODES)
    for r in rows:
        assert r["ok"] is True and r["error"] <= bench_models.MODEL_TOLERANCE, r
        assert r["torch_baseline"] == "separate process" and r["fastconv_ms"] > 0 and r["torch_ms"] > 0
        assert r["ratio"] == pytest.approx(r["fastconv_ms"] / r["torch_ms"])
        # one round (--reps 1): each side times STEPS_PER_ROUND steps after an untimed one, the worker too
        assert len(r["fastconv_times_ms"]) == len(r["torch_times_ms"]) == bench_models.STEPS_PER_ROUND, r
    for r in rows:  # the inference modes also time fastconv.optimize(converted model), checked like it
        if r["mode"].startswith("infer"):
            assert r["optimized_error"] <= bench_models.MODEL_TOLERANCE and r["optimized_ms"] > 0, r
            assert r["optimized_ratio"] == pytest.approx(r["optimized_ms"] / r["torch_ms"])
        else:
            assert "optimized_ms" not in r
    assert "fastconv.optimize/torch infer1" in out and "fastconv.optimize (BatchNorm folded" in out
    b = rows[0]["breakdown"]
    assert b["fastconv_calls"] >= 4  # LeNet-5: 2 convs and 2 pools run on fastconv's ops
    assert (tmp_path / "fastconv-bench-models.txt").exists()


def test_unknown_model_is_refused(tmp_path, capsys):
    assert cli.main(["bench", "--models", "no_such_net", "--out", str(tmp_path)]) == 2
    assert "unknown model 'no_such_net'" in capsys.readouterr().err


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_alternate_baseline_and_busy_neighbour(tmp_path, capsys):
    code = cli.main(["bench", "--models", "lenet5", "--reps", "1", "--baseline", "alternate", "--busy-neighbour",
                     "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "[alternating in one process]" in out and "busy neighbour:" in out
    assert "torch here (alternating) / torch clean infer8" in out and "busy neighbour slowdown train8" in out
    data = json.loads((tmp_path / "fastconv-bench-models.json").read_text())
    env = data["environment"]
    assert env["baseline"] == "alternate" and "stepped in turn with fastconv" in env["torch_baseline"]
    assert "imported neither fastconv nor Numba (checked)" in env["torch_baseline"]
    assert _gone(env["busy_neighbour"]["pid"]), "the busy neighbour outlived the run"
    rows = data["rows"]
    assert [r["mode"] for r in rows] == list(bench_models.MODES)
    for r in rows:
        assert r["ok"] is True and r["error"] <= bench_models.MODEL_TOLERANCE, r
        a = r["alternate"]
        assert r["torch_baseline"] == "this process, alternating"
        assert a["ratio"] == r["ratio"] == pytest.approx(r["fastconv_ms"] / r["torch_inprocess_ms"])
        assert a["torch_here_vs_clean"] == pytest.approx(a["torch_here_ms"] / a["torch_clean_ms"])
        assert a["fastconv_vs_clean"] == pytest.approx(r["fastconv_ms"] / a["torch_clean_ms"])
        n = r["busy_neighbour"]
        assert n["torch_timed_in"] == "separate process"
        for side in ("fastconv", "torch"):
            steps = bench_models.STEPS_PER_ROUND  # one round (--reps 1) of back-to-back steps per state
            assert len(n[f"{side}_quiet_times_ms"]) == len(n[f"{side}_busy_times_ms"]) == steps
            assert n[f"{side}_slowdown"] == pytest.approx(n[f"{side}_busy_ms"] / n[f"{side}_quiet_ms"])
        assert n["fastconv_no_worse"] == (n["fastconv_slowdown"] <= n["torch_slowdown"])
    s = data["summary"]
    assert set(s["alternate"]) == set(s["busy_neighbour"]) == set(bench_models.MODES)
    assert s["busy_neighbour"]["infer1"]["models"] == 1 and not s["failures"]
    text = (tmp_path / "fastconv-bench-models.txt").read_text()
    assert "busy neighbour slowdown infer1" in text and "torch here (alternating) / torch clean infer1" in text


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the neighbour's state from Linux /proc")
def test_busy_neighbour_is_stopped_when_quiet_and_killed_on_close():
    def state(pid):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    neighbour = bench_models.BusyNeighbour()
    try:
        assert state(neighbour.pid) == "T"  # stopped until asked to be busy
        neighbour.busy()
        assert state(neighbour.pid) != "T"
        neighbour.quiet()
        assert state(neighbour.pid) == "T"
    finally:
        neighbour.close()
    assert _gone(neighbour.pid)


def test_busy_neighbour_is_killed_on_ctrl_c(monkeypatch):
    started = []
    init = bench_models.BusyNeighbour.__init__

    def recording_init(self):
        init(self)
        started.append(self)

    def interrupt(case, rows):
        assert started[0].alive()
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_models.BusyNeighbour, "__init__", recording_init)
    with pytest.raises(KeyboardInterrupt):
        bench_models.run_models(bench_models.select_models("lenet5"), ("infer1",), reps=1, baseline="inprocess",
                                busy_neighbour=True, on_model=interrupt)
    assert len(started) == 1 and _gone(started[0].pid)


def test_whole_model_modes_are_refused_for_the_layer_suite(tmp_path, capsys):
    assert cli.main(["bench", "--baseline", "alternate", "--out", str(tmp_path)]) == 2
    assert "use them with --models" in capsys.readouterr().err
    assert cli.main(["bench", "--busy-neighbour", "--out", str(tmp_path)]) == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_busy_neighbour_dies_with_a_killed_parent():
    # SIGKILL runs no finally and no atexit hook: the neighbour must go by itself, stopped or running.
    script = ("import os, sys\nfrom fastconv import bench_models\nn = bench_models.BusyNeighbour()\n"
              "if sys.argv[1] == 'busy':\n    n.busy()\nprint(n.pid, flush=True)\nos.kill(os.getpid(), 9)\n")
    for state in ("quiet", "busy"):
        done = subprocess.run([sys.executable, "-c", script, state], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        pid = int(done.stdout.split()[0])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _dead(pid):
            time.sleep(0.05)
        assert _dead(pid), f"the {state} neighbour {pid} outlived its SIGKILLed parent"


def _dead(pid: int) -> bool:
    """Gone, or a zombie nobody has reaped yet (its parent was killed)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_a_model_with_a_named_tuple_result_is_timed_in_the_clean_worker(tmp_path):
    """torchvision's GoogLeNet returns a named tuple in training mode, which ``torch.export`` cannot save: the
    baseline exports the model with a plain tuple instead, so its training step is timed in the clean worker."""
    import collections

    from fastconv.bench_runner import TorchBaseline

    Outputs = collections.namedtuple("Outputs", ["logits", "aux"])

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return Outputs(y.mean((2, 3)), y.amax((2, 3)))

    model = TwoHeads().train()
    with TorchBaseline(threads=1) as worker:
        key = worker.load_model(model, torch.randn(2, 3, 8, 8), tmp_path / "two-heads-train8.pt2")
        times = worker.time_model(key, "train8", 2)
        assert len(times) == 2 and all(t > 0 for t in times)
        assert worker.is_clean()
    assert model.training  # exporting left the caller's model as it was
