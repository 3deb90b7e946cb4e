"""fastconv.flops' report: the module tree (own counts, subtotals, percentages, depth folding), JSON and CSV,
activation memory, meta-device counting (right parameters, no kernel, no autotuner) and the CLI's errors."""
from __future__ import annotations

import csv
import dataclasses
import io
import json

import pytest
import torch
from torch import nn

import fastconv
from fastconv import autotune, flops, models, registry

fnn = fastconv.nn


def _model():
    return nn.Sequential(
        fnn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), fnn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Sequential(fnn.Conv2d(16, 16, 1))),
        fnn.ConvTranspose2d(16, 8, 2, stride=2), fnn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


FIELDS = [f.name for f in dataclasses.fields(flops.Counts)]


def _check_subtotals(node):
    expected = flops.Counts()
    expected.add(node.self_)
    for c in node.children:
        _check_subtotals(c)
        expected.add(c.total)
    assert node.total == expected, node.name


@pytest.mark.parametrize("backward", [False, True])
def test_subtotals_add_up_to_the_totals(backward):
    model = _model()
    x = torch.randn(2, 3, 8, 8, requires_grad=backward)
    rep = flops.count(model, x, backward=backward)
    _check_subtotals(rep.root)
    for f in FIELDS:
        assert getattr(rep, f) == sum(getattr(n.self_, f) for n in rep.modules()), f
    assert rep.macs == sum(r.macs for r in rep.rows)
    assert rep.params == sum(p.numel() for p in model.parameters())
    assert rep.module("1").self_.params == 16  # BatchNorm's weight and bias, in its own row of the tree
    assert rep.module("4").total.macs == rep.module("4.0").total.macs + rep.module("4.2.0").total.macs
    assert (rep.backward_macs > 0) == backward


def test_percentages_sum_to_100():
    rep = flops.count(_model(), torch.randn(1, 3, 8, 8))
    assert rep.root.percent == pytest.approx(100)
    leaves = [n for n in rep.modules() if not n.children]
    assert sum(n.percent for n in leaves) + 100 * rep.root.self_.macs / rep.macs == pytest.approx(100)
    for node in rep.modules():
        own = 100 * node.self_.macs / rep.macs
        assert node.percent == pytest.approx(own + sum(c.percent for c in node.children))


def test_depth_folding():
    rep = flops.count(_model(), torch.randn(1, 3, 8, 8))
    assert [n.name for n in rep.modules(0)] == [""]
    depth1 = rep.modules(1)
    assert [n.name for n in depth1] == ["", *map(str, range(9))]
    assert sum(n.total.macs for n in depth1[1:]) + rep.root.self_.macs == rep.macs
    assert "4.2.0" in [n.name for n in rep.modules()] and "4.2.0" not in [n.name for n in rep.modules(2)]
    table1, table_all = rep.table(depth=1), rep.table()
    assert "4.2.0" in table_all and "4.2.0" not in table1 and "4.2" not in table1
    assert max(map(len, table_all.splitlines())) <= 100


def test_frozen_parameters_are_reported_apart():
    model = _model()
    model[0].weight.requires_grad_(False)
    rep = flops.count(model, torch.randn(1, 3, 8, 8))
    assert rep.frozen_params == model[0].weight.numel()
    assert rep.trainable_params == rep.params - rep.frozen_params
    assert "frozen" in rep.table().splitlines()[0]


def test_activation_and_saved_bytes():
    conv = fnn.Conv2d(3, 8, 3, padding=1, bias=False)
    model = nn.Sequential(conv, nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    rep = flops.count(model, x)
    out_bytes = 2 * 8 * 8 * 8 * 4
    assert rep.module("0").self_.activation_bytes == out_bytes
    assert rep.module("1").self_.activation_bytes == out_bytes  # ReLU (not in place): a new tensor
    # a training step keeps the conv's input (for the weight gradient) and ReLU's output (for its mask)
    assert rep.module("0").self_.saved_bytes == x.numel() * 4
    assert rep.module("1").self_.saved_bytes == out_bytes
    with torch.no_grad():
        assert flops.count(model, x).saved_bytes == 0


def test_json_tree_and_csv_carry_exact_integers():
    rep = flops.count(_model(), torch.randn(1, 3, 8, 8))
    data = json.loads(rep.to_json())
    tree = data["tree"]
    assert tree["macs"] == rep.macs and tree["params"] == rep.params and data["totals"]["flops"] == rep.flops
    assert [c["name"] for c in tree["children"]] == list(map(str, range(9)))
    inner = tree["children"][4]
    assert {"name", "children", "params", "macs", "flops", "activation_bytes", "self"} <= set(inner)
    assert inner["macs"] == inner["self"]["macs"] + sum(c["macs"] for c in inner["children"])
    assert len(data["ops"]) == len(rep.rows)
    assert json.loads(rep.to_json(depth=1))["tree"]["children"][4]["children"] == []
    rows = list(csv.DictReader(io.StringIO(rep.to_csv())))
    assert int(rows[0]["macs"]) == rep.macs and rows[0]["name"] == ""
    assert len(rows) == len(rep.modules())


def test_functional_callable_has_a_root_only_tree():
    w = torch.randn(4, 3, 3, 3)
    rep = flops.count(lambda t: fastconv.functional.conv2d(t, w, padding=1), torch.randn(1, 3, 8, 8))
    assert rep.root.children == [] and rep.macs == rep.root.self_.macs == 8 * 8 * 4 * 27
    assert rep.params == w.numel()


# --------------------------------------------------------------------------------------------------
# the meta device: shapes only
# --------------------------------------------------------------------------------------------------
def test_resnet50_parameters_on_meta():
    """Equal-sized meta parameters used to be merged (data_ptr is 0 on meta): 9.4M instead of 25.6M."""
    model, x = _meta("resnet50")
    rep = flops.count(model, x)
    assert rep.params == 25_557_032
    assert sum(n.self_.params for n in rep.modules()) == 25_557_032
    assert sum(r.params for r in rep.rows) == 25_557_032 - sum(  # op rows: the weights the ops multiply by
        p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())


def _meta(name):
    builder, shape = models.MODELS[name]
    with torch.device("meta"):
        model = builder()
    return model, torch.zeros(shape, device="meta")


def test_meta_counting_runs_no_kernel_and_no_autotuner(monkeypatch, tmp_path):
    def boom(*args, **kwargs):
        raise AssertionError("a kernel or the autotuner ran while counting on meta")

    # the autotuner's measuring and its real-memory inputs (lookup itself may be asked, and must say None)
    for name in ("_measure", "_synthetic_inputs", "_time_candidate"):
        monkeypatch.setattr(autotune, name, boom)
    for key, alg in list(registry._REGISTRY.items()):
        monkeypatch.setitem(registry._REGISTRY, key,
                            dataclasses.replace(alg, forward=boom, grad_input=boom, grad_weight=boom))
    monkeypatch.setenv("FASTCONV_AUTOTUNE", "1")
    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(tmp_path))  # an empty tuning cache: every layer a miss
    model, x = _meta("resnet18")
    rep = flops.count(model, x, backward=True)
    convs = [r for r in rep.rows if r.op.startswith("conv")]
    assert convs and all(r.algorithm and r.reason for r in convs)
    assert rep.backward_macs > 0 and rep.params == 11_689_512


# --------------------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["lenet5", "--input", "1x1x28x28"], "input 1x1x28x28 does not fit lenet5"),
    (["lenet5", "--input", "1x28x28"], "does not fit lenet5"),
    (["resnet18", "--input", "1x1x224x224"], "does not fit resnet18"),
    (["lenet5", "--input", "1xax28"], "--input must look like"),
    (["lenet5", "--input", "0x1x32x32"], "--input must be positive"),
    (["nosuchnet"], "unknown model 'nosuchnet'"),
    (["lenet5", "--what-if", "bottleneck", "--layer", "nope"], "'nope' is not a 2-D conv layer"),
    (["lenet5", "--depth", "-1"], "--depth must be >= 0"),
])
def test_cli_mistakes_give_one_line_and_exit_code_2(argv, message, capsys, monkeypatch):
    from fastconv.cli import main

    monkeypatch.delenv("FASTCONV_DEBUG", raising=False)
    assert main(["flops", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastconv flops: error: ") and message in lines[0], lines
    assert "Traceback" not in captured.err


def test_cli_depth_json_csv(capsys):
    from fastconv.cli import main

    assert main(["flops", "resnet18", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "layer1" in out and "layer1.0" not in out
    assert max(map(len, out.splitlines())) <= 100
    assert main(["flops", "lenet5", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tree"]["params"] == 61_706 and data["tree"]["children"][0]["name"] == "features"
    assert main(["flops", "lenet5", "--format", "csv", "--depth", "1"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["name"] for r in rows] == ["", "features", "classifier"]


def test_cli_ops_table_names_algorithm_and_reason(capsys):
    from fastconv.cli import main

    assert main(["flops", "lenet5", "--ops"]) == 0
    out = capsys.readouterr().out
    assert "algorithm" in out and "why" in out and "features.0" in out


def test_backward_attribution_in_parallel_branches():
    """Inception's four branches end in one cat: in backward all of them are 'running' for torch's
    ModuleTracker; the autograd-node tags attribute each gradient op to its own branch."""
    with torch.device("meta"):
        block = models.Inception(192, 64, 96, 128, 16, 32, 32, five_by_five=True)
    x = torch.zeros(1, 192, 28, 28, device="meta", requires_grad=True)
    rep = flops.count(block, x, backward=True)
    convs = [n for n in rep.modules() if n.type == "Conv2d"]
    assert len(convs) == 6
    for n in convs:
        assert n.self_.forward_macs > 0
        assert n.self_.backward_macs == 2 * n.self_.forward_macs, n.name  # grad_input + grad_weight
