"""What-if replacements (1x1 bottleneck, depthwise-separable) and claim-vs-clock measuring.

Seed numbers (copied from the seeds: the project must run without ../shared): the Inception 5x5 layer
28x28x192 -> 32 costs 120,422,400 MACs, 12,443,648 behind a 1x1 reduction to 16 channels; the MobileNet
block 14x14x512 -> 512, 3x3: 462,422,016 MACs standard, 52,283,392 depthwise-separable.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fastconv
from fastconv import flops
from fastconv.flops import whatif

fnn = fastconv.nn


def _seed_model(device="meta"):
    with torch.device(device):
        return nn.Sequential(fnn.Conv2d(192, 32, 5, padding=2))


def test_bottleneck_reproduces_the_inception_seed():
    (item,) = flops.what_if(_seed_model(), torch.zeros(1, 192, 28, 28, device="meta"), "bottleneck")
    assert item.layer == "0" and item.macs == 120_422_400
    assert item.new_macs == 12_443_648
    assert list(item.parts.values()) == [2_408_448, 10_035_200]
    assert round(item.mac_ratio, 2) == 9.68
    assert item.params == 192 * 32 * 25 + 32
    assert item.new_params == 192 * 16 + 16 + 16 * 32 * 25 + 32


def test_separable_reproduces_the_mobilenet_comparison():
    with torch.device("meta"):
        model = nn.Sequential(fnn.Conv2d(512, 512, 3, padding=1))
    (item,) = flops.what_if(model, torch.zeros(1, 512, 14, 14, device="meta"), "separable")
    assert item.macs == 14 * 14 * 512 * 512 * 9 == 462_422_016
    assert item.new_macs == 14 * 14 * 512 * 9 + 14 * 14 * 512 * 512 == 52_283_392
    assert item.new_params == 512 * 9 + 512 + 512 * 512 + 512


@pytest.mark.parametrize("kind", whatif.KINDS)
def test_replacement_counts_equal_counting_the_replacement(kind):
    """The what-if formulas against fastconv.flops.count of the very modules a user would build."""
    C, K, k, s = 24, 40, 3, 2
    model = nn.Sequential(fnn.Conv2d(C, K, k, stride=s, padding=1, device="meta"))
    x = torch.zeros(2, C, 17, 15, device="meta")
    (item,) = flops.what_if(model, x, kind, reduce=12)
    g = whatif._geometry(model[0], tuple(x.shape), tuple(model(x).shape))
    new, parts, params, _ = whatif._replacement(kind, g, 12)
    rep = flops.count(new, torch.zeros(2, C, 17, 15))
    assert item.new_macs == rep.macs == sum(parts.values())
    assert item.new_params == rep.params == params


def test_every_eligible_layer_of_a_zoo_model():
    from fastconv import models

    with torch.device("meta"):
        model = models.googlenet()
    items = flops.what_if(model, torch.zeros(1, 3, 224, 224, device="meta"), "bottleneck")
    modules = dict(model.named_modules())
    assert items and all(i.kernel != (1, 1) and modules[i.layer].groups == 1 for i in items)
    # with r = min(C, K)/2 the bottleneck costs r/(K k^2) + r/C <= 1/(2k^2) + 1/2 of the layer at stride 1
    for i in items:
        m = modules[i.layer]
        if m.stride == (1, 1):
            assert i.new_macs < i.macs, i.layer


def test_unknown_layer_is_a_named_error():
    with pytest.raises(ValueError, match="'nope' is not a 2-D conv layer"):
        flops.what_if(_seed_model(), torch.zeros(1, 192, 28, 28, device="meta"), "bottleneck", ["nope"])
    with pytest.raises(ValueError, match="kind must be one of bottleneck, separable"):
        flops.what_if(_seed_model(), torch.zeros(1, 192, 28, 28, device="meta"), "pruned")


def test_what_if_seed_layer_is_timed():
    items = flops.what_if(_seed_model(), torch.zeros(1, 192, 28, 28, device="meta"), "bottleneck",
                          measure=True, repeats=1)
    assert items[0].seconds > 0 and items[0].new_seconds > 0


def test_cli_what_if_on_a_zoo_model(capsys):
    from fastconv.cli import main

    assert main(["flops", "lenet5", "--what-if", "separable"]) == 0
    out = capsys.readouterr().out
    assert "features.0" in out and "features.3" in out and "total over" in out
    # LeNet-5 C3: 10x10x16 from 6 channels, 5x5: 240,000 -> 10*10*6*25 + 10*10*16*6 = 24,600
    assert "240,000" in out and "24,600" in out


# --------------------------------------------------------------------------------------------------
# claim vs clock
# --------------------------------------------------------------------------------------------------
def test_measure_layers_fields_and_roofline(tmp_path):
    from fastconv.flops import roofline

    torch.manual_seed(0)
    model = nn.Sequential(fnn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), fnn.MaxPool2d(2),
                          fnn.Conv2d(8, 16, 3, padding=1, algo="direct"))
    machine = roofline.Machine(sgemm_gflops=100.0, bandwidth_gbs=10.0, threads=1)  # ridge 10 FLOP/B
    layers, machine, note = flops.measure(model, torch.randn(1, 3, 16, 16), repeats=1, machine=machine)
    assert [t.layer for t in layers] == ["0", "2", "3"]
    conv = layers[2]
    assert conv.algorithm == "direct" and conv.reason == "requested algo='direct'"
    assert conv.macs == 8 * 8 * 16 * 8 * 9 and conv.executed > 0
    assert conv.bytes == 4 * (8 * 8 * 8 + 16 * 8 * 9 + 16 + 16 * 8 * 8)
    assert conv.intensity == pytest.approx(2 * conv.macs / conv.bytes)
    for t in layers:
        assert t.seconds > 0 and t.torch_seconds and t.torch_seconds > 0
        assert t.bound == ("memory" if t.intensity < 10 else "compute")
    assert layers[1].pool_ops == 8 * 8 * 8 * 4 and layers[1].macs == 0
    assert "torch timed" in note
    text = roofline.format_measure(layers, machine, note)
    assert "algorithm choices" in text and max(map(len, text.splitlines()[:6])) <= 100
    why_not = roofline.plot_roofline(layers, machine, str(tmp_path / "r.png"))
    if why_not is None:
        assert (tmp_path / "r.png").stat().st_size > 0
    else:
        assert "pip install matplotlib" in why_not


def test_measure_refuses_meta():
    with pytest.raises(ValueError, match="real CPU tensors"):
        flops.measure(_seed_model(), torch.zeros(1, 192, 28, 28, device="meta"))


def test_cli_measure_json_and_png(tmp_path, capsys):
    from fastconv.cli import main

    png = tmp_path / "lenet.png"
    assert main(["flops", "lenet5", "--measure", "--repeats", "1", "--format", "json", "--png", str(png)]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert [t["layer"] for t in data["layers"]] == ["features.0", "features.2", "features.3", "features.5",
                                                     "features.6"]
    assert data["layers"][0]["macs"] == 28 * 28 * 6 * 25 and data["machine"]["sgemm_gflops"] > 0
    assert png.exists() or "pip install matplotlib" in captured.err


def test_cli_what_if_json(capsys):
    from fastconv.cli import main

    assert main(["flops", "lenet5", "--what-if", "bottleneck", "--format", "json"]) == 0
    items = json.loads(capsys.readouterr().out)
    c3 = next(i for i in items if i["layer"] == "features.3")
    # C3 6 -> 16, 5x5 at 10x10 from 14x14; r = min(6, 16) // 2 = 3
    assert c3["macs"] == 240_000 and c3["new_macs"] == 14 * 14 * 3 * 6 + 10 * 10 * 16 * 3 * 25
