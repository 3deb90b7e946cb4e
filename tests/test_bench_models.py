"""``fastconv bench --models``: the whole-model mode on small zoo models. Outputs of the converted and the
torch model must agree; times are recorded, never asserted."""
from __future__ import annotations

import json

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
    b = rows[0]["breakdown"]
    assert b["fastconv_calls"] >= 4  # LeNet-5: 2 convs and 2 pools run on fastconv's ops
    assert (tmp_path / "fastconv-bench-models.txt").exists()


def test_unknown_model_is_refused(tmp_path, capsys):
    assert cli.main(["bench", "--models", "no_such_net", "--out", str(tmp_path)]) == 2
    assert "unknown model 'no_such_net'" in capsys.readouterr().err
