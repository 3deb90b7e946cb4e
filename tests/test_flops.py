"""fastconv.flops: seeds' worked examples, hand-derived formulas, FlopCounterMode agreement, and the direct
kernel's counting mode (the loop nest's own tally of the multiplications it executes).

Expected numbers are either the seeds' values (copied here: the project must run without ../shared) or
derived in the test from the closed forms written next to them.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as torch_F
from torch.utils.flop_counter import FlopCounterMode

import fastconv
from fastconv import flops
from fastconv.cpu.counting import direct_forward_counted, in_range_pairs
from helpers import assert_close

fnn = fastconv.nn
F = fastconv.functional

# Seed values (DESIGN.md §10 / seed_cases.json "counts").
SEED_5X5_MACS = 120_422_400
SEED_1X1_REDUCE_MACS = 2_408_448
SEED_5X5_AFTER_REDUCE_MACS = 10_035_200
SEED_BOTTLENECK_TOTAL = 12_443_648


def _flop_counter_total(fn, backward=False) -> int:
    with FlopCounterMode(display=False) as fc:
        out = fn()
        if backward:
            out.sum().backward()
    return fc.get_total_flops()


# --------------------------------------------------------------------------------------------------
# seeds
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_cls", [fnn.Conv2d, nn.Conv2d], ids=["fastconv", "torch"])
def test_inception_5x5_seed_and_the_anchor_readings(layer_cls):
    x = torch.zeros(1, 192, 28, 28)
    layer = layer_cls(192, 32, 5, padding="same")
    rep = flops.count(layer, x)
    # hand formula: H * W * K * C * kh * kw
    assert rep.macs == 28 * 28 * 32 * 192 * 5 * 5 == SEED_5X5_MACS           # fvcore, thop
    assert rep.flops == 2 * SEED_5X5_MACS                                      # FlopCounterMode: 240.8M
    assert rep.flops == _flop_counter_total(lambda: layer(x))
    assert rep.bias_adds == 28 * 28 * 32                                       # one per output element
    assert round((rep.macs + rep.bias_adds) / 1e6, 2) == 120.45                # ptflops adds the bias
    assert rep.params == 32 * 192 * 25 + 32
    assert rep.rows[0].output_shape == (1, 32, 28, 28)


def test_inception_bottleneck_seed():
    x = torch.zeros(1, 192, 28, 28)
    reduce = fnn.Conv2d(192, 16, 1)
    conv = fnn.Conv2d(16, 32, 5, padding=2)
    rep = flops.count(nn.Sequential(reduce, conv), x)
    by = rep.by_module()
    assert by["0"] == 28 * 28 * 16 * 192 == SEED_1X1_REDUCE_MACS
    assert by["1"] == 28 * 28 * 32 * 16 * 25 == SEED_5X5_AFTER_REDUCE_MACS
    assert rep.macs == SEED_BOTTLENECK_TOTAL
    assert round(SEED_5X5_MACS / rep.macs, 2) == 9.68


def test_conv_5x5x3_six_filters_params_and_shape():
    x = torch.zeros(1, 3, 28, 28)
    with_bias = flops.count(fnn.Conv2d(3, 6, 5), x)
    without = flops.count(fnn.Conv2d(3, 6, 5, bias=False), x)
    assert with_bias.params == 5 * 5 * 3 * 6 + 6 == 456
    assert without.params == 450
    assert with_bias.rows[0].output_shape == (1, 6, 24, 24)
    assert without.bias_adds == 0 and with_bias.bias_adds == 24 * 24 * 6


@pytest.mark.parametrize("pool", ["fastconv", "torch"])
def test_keras_example_flatten_9216(pool):
    pool_cls = fnn.MaxPool2d if pool == "fastconv" else nn.MaxPool2d
    model = nn.Sequential(fnn.Conv2d(1, 32, 3), nn.ReLU(), fnn.Conv2d(32, 64, 3), nn.ReLU(), pool_cls(2),
                          nn.Flatten())
    rep = flops.count(model, torch.zeros(1, 1, 28, 28))
    pool_row = next(r for r in rep.rows if r.op == "max_pool2d")
    assert pool_row.output_shape == (1, 64, 12, 12)
    assert pool_row.pool_ops == 12 * 12 * 64 * 2 * 2  # one comparison per window element
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 9216)
    # 26x26x32 (3x3x1 taps) + 24x24x64 (3x3x32 taps)
    assert rep.macs == 26 * 26 * 32 * 9 + 24 * 24 * 64 * 9 * 32
    assert rep.params == (9 * 1 * 32 + 32) + (9 * 32 * 64 + 64)


@pytest.mark.parametrize("side,expected", [(64, 1_234_460), (256, 19_666_460), (1024, 314_578_460)])
def test_dense_model_params_seed(side, expected):
    d = side * side * 3
    # built on the meta device: 314 M parameters need no memory there, the counter still runs the model
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 100, device="meta"), nn.ReLU(),
                          nn.Linear(100, 50, device="meta"), nn.ReLU(), nn.Linear(50, 10, device="meta"))
    rep = flops.count(model, torch.zeros(1, 3, side, side, device="meta"))
    assert rep.params == 100 * d + 5660 == expected
    assert rep.macs == d * 100 + 100 * 50 + 50 * 10
    assert rep.bias_adds == 100 + 50 + 10


@pytest.mark.parametrize("pool_cls", [fnn.MaxPool2d, nn.MaxPool2d], ids=["fastconv", "torch"])
def test_pool_224_64_seed(pool_cls):
    rep = flops.count(pool_cls(2, stride=2), torch.zeros(1, 64, 224, 224))
    (row,) = rep.rows
    assert row.output_shape[1:] == (64, 112, 112)
    assert row.pool_ops == 112 * 112 * 64 * 4 and rep.macs == 0


# --------------------------------------------------------------------------------------------------
# formulas: grouped, depthwise, dilated, transposed (every counter has miscounted some of these)
# --------------------------------------------------------------------------------------------------
CONV_CASES = {
    # name: (C, K, kernel, stride, padding, dilation, groups, input spatial)
    "grouped": (8, 12, 3, 1, 1, 1, 4, (10, 9)),
    "depthwise": (8, 8, 3, 2, 1, 1, 8, (11, 12)),
    "depthwise_multiplier": (6, 12, 5, 1, 2, 1, 6, (9, 9)),
    "dilated": (4, 6, 3, 1, 2, 2, 1, (12, 10)),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("impl", ["fastconv", "torch"])
def test_conv_formula(case, impl):
    C, K, k, s, p, d, g, (H, W) = CONV_CASES[case]
    cls = fnn.Conv2d if impl == "fastconv" else nn.Conv2d
    layer = cls(C, K, k, stride=s, padding=p, dilation=d, groups=g).double()
    x = torch.randn(2, C, H, W, dtype=torch.float64, requires_grad=True)
    rep = flops.count(layer, x, backward=True)
    # out size: (n + 2p - d(k-1) - 1) // s + 1; dilation only changes the output size, not the per-output work
    OH, OW = ((n + 2 * p - d * (k - 1) - 1) // s + 1 for n in (H, W))
    forward = 2 * K * OH * OW * (C // g) * k * k
    assert rep.forward_macs == forward
    # backward: grad_input and grad_weight each cost the forward's MACs (groups divide both)
    assert rep.backward_macs == 2 * forward
    assert rep.params == K * (C // g) * k * k + K
    # torch's FlopCounterMode agrees on the forward
    assert 2 * rep.forward_macs == _flop_counter_total(lambda: layer(x))


def test_flop_counter_mode_overcounts_grouped_weight_gradient():
    """torch's conv_backward_flop ignores groups in the weight gradient (it reads the weight as if dense):
    for a depthwise conv it counts ``groups`` times the grad_weight work. fastconv.flops divides by groups."""
    C, k, H = 8, 3, 10
    layer = nn.Conv2d(C, C, k, groups=C, bias=False)
    x = torch.randn(1, C, H, H)  # input needs no grad: backward is grad_weight alone
    rep = flops.count(layer, x, backward=True)
    O = H - k + 1
    assert rep.backward_macs == C * O * O * k * k
    torch_backward = _flop_counter_total(lambda: layer(x), backward=True) - 2 * rep.forward_macs
    assert torch_backward in (2 * rep.backward_macs, 2 * rep.backward_macs * C)


@pytest.mark.parametrize("ndim,stride,padding,output_padding,groups", [
    (2, 2, 1, 1, 1), (2, 1, 0, 0, 2), (1, 3, 1, 2, 1), (3, 2, 0, 0, 1)])
@pytest.mark.parametrize("impl", ["fastconv", "torch"])
def test_transposed_conv_work_follows_input(ndim, stride, padding, output_padding, groups, impl):
    cin, cout, k = 4, 6, 3
    cls = getattr(fnn if impl == "fastconv" else nn, f"ConvTranspose{ndim}d")
    layer = cls(cin, cout, k, stride=stride, padding=padding, output_padding=output_padding, groups=groups)
    spatial = (5, 4, 3)[:ndim]
    x = torch.randn(2, cin, *spatial, requires_grad=True)
    rep = flops.count(layer, x, backward=True)
    # every input element meets (cout/groups) * k^ndim weights -- independent of stride and output size
    expected = 2 * cin * math.prod(spatial) * (cout // groups) * k ** ndim
    assert rep.forward_macs == expected
    assert rep.backward_macs == 2 * expected
    out_spatial = [(n - 1) * stride - 2 * padding + (k - 1) + output_padding + 1 for n in spatial]
    assert rep.rows[0].output_shape == (2, cout, *out_spatial)
    assert rep.bias_adds == 2 * cout * math.prod(out_spatial)
    assert 2 * rep.forward_macs == _flop_counter_total(lambda: layer(x))


@pytest.mark.parametrize("impl", ["fastconv", "torch"])
def test_pooling_counts(impl):
    lib = fnn if impl == "fastconv" else nn
    x = torch.randn(2, 3, 13, 11, requires_grad=True)
    model = nn.Sequential(lib.AvgPool2d(3, stride=2, padding=1), lib.AdaptiveMaxPool2d((4, 3)),
                          lib.AdaptiveAvgPool2d((3, 2)))
    rep = flops.count(model, x, backward=True)
    fwd = [r for r in rep.rows if r.pass_ == "forward"]
    # avg 3x3/2 pad 1: 7x6 outputs, 9 window elements each (padding taps included, as for convs)
    assert fwd[0].pool_ops == 2 * 3 * 7 * 6 * 9
    # adaptive windows: start = floor(i*In/Out), end = ceil((i+1)*In/Out); 7->4: 2,3,3,2 ; 6->3: 2,2,2
    assert fwd[1].pool_ops == 2 * 3 * (2 + 3 + 3 + 2) * (2 + 2 + 2)
    # 4->3: 2,2,2 ; 3->2: 2,2
    assert fwd[2].pool_ops == 2 * 3 * (2 + 2 + 2) * (2 + 2)
    bwd = {r.name: r.pool_ops for r in rep.rows if r.pass_ == "backward"}
    assert bwd["1"] == 2 * 3 * 4 * 3  # max: one scatter-add per output gradient
    assert bwd["0"] == fwd[0].pool_ops  # avg: the window again
    assert rep.macs == 0 and rep.flops == 0


# --------------------------------------------------------------------------------------------------
# FlopCounterMode agreement on whole models, functional calls, attribution, the table
# --------------------------------------------------------------------------------------------------
def _mixed_model():
    return nn.Sequential(
        fnn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), fnn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()),
        fnn.Conv2d(16, 16, 1), fnn.ConvTranspose2d(16, 8, 2, stride=2), fnn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 5))


def test_agrees_with_flop_counter_mode_forward_and_backward():
    model = _mixed_model()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    rep = flops.count(model, x, backward=True)
    model.zero_grad()
    assert rep.flops == _flop_counter_total(lambda: model(x), backward=True)
    assert rep.flops == 2 * rep.macs
    assert rep.params == sum(p.numel() for p in model.parameters())
    # every parameter sits in its module's row of the tree (BatchNorm's too, which runs no counted op)
    assert sum(n.self_.params for n in rep.modules()) == rep.params
    assert rep.module("1").self_.params == 16


def test_attribution_to_innermost_module_forward_and_backward():
    model = _mixed_model()
    rep = flops.count(model, torch.randn(1, 3, 8, 8), backward=True)
    fwd = {r.name: r for r in rep.rows if r.pass_ == "forward" and r.macs}
    assert set(fwd) == {"0", "4.0", "5", "6", "9"}
    assert fwd["4.0"].type == "Conv2d" and fwd["9"].type == "Linear" and fwd["6"].type == "ConvTranspose2d"
    # 8x8 -> pool 4x4: conv 4.0 is 4*4*16 outputs of 8*9 taps
    assert fwd["4.0"].macs == 4 * 4 * 16 * 8 * 9
    bwd = {}
    for r in rep.rows:
        if r.pass_ == "backward":
            bwd[r.name] = bwd.get(r.name, 0) + r.macs
    # the first conv's input needs no grad: its backward is the weight gradient only
    assert bwd["0"] == fwd["0"].macs
    assert bwd["4.0"] == 2 * fwd["4.0"].macs
    assert bwd["9"] == 2 * fwd["9"].macs


def test_functional_calls_are_counted_outside_modules():
    w = torch.randn(4, 3, 3, 3)
    b = torch.randn(4)

    def fn(x):
        y = torch_F.conv2d(x, w, b, padding=1) + F.conv2d(x, w, b, padding=1, algo="direct")
        y = F.max_pool2d(y, 2) + torch_F.max_pool2d(y, 2)
        return F.conv_transpose2d(y, w, stride=2)  # weight (in=4, out=3, 3, 3)

    rep = flops.count(fn, torch.randn(1, 3, 8, 8))
    per_conv = 8 * 8 * 4 * 3 * 9
    assert [r.op for r in rep.rows] == ["conv2d", "conv2d", "max_pool2d", "max_pool2d", "conv_transpose2d"]
    assert all(r.name == "(functional)" for r in rep.rows)
    assert rep.rows[1].algorithm == "direct" and rep.rows[0].algorithm == "torch"
    # transposed: 4x4x4 inputs, each to 3 channels x 9 taps
    assert rep.macs == 2 * per_conv + 4 * 4 * 4 * 3 * 9
    assert rep.bias_adds == 2 * 8 * 8 * 4
    assert rep.params == 4 * 3 * 9 + 4  # w and b counted once however often they are used


def test_algorithm_columns_come_from_the_registry(monkeypatch):
    x = torch.randn(2, 16, 12, 12)
    for name in ("direct", "im2col"):
        layer = fnn.Conv2d(16, 8, 3, padding=1, algo=name)
        (row,) = flops.count(layer, x).rows
        from fastconv.ops.conv import make_geometry
        geom = make_geometry(2, 2, 16, 8, 1, (12, 12), (3, 3), None, (1, 1), (1, 1), (1, 1), (1, 1),
                             torch.float32, "numba")
        alg = fastconv.registry.choose(name, geom, "forward")
        assert row.algorithm == name
        # the multiplications it executes (fastconv.flops.executed; direct skips the padding rows' taps)
        assert row.algorithm_mults == flops.executed_multiplications(name, geom)
        assert row.workspace_bytes == alg.workspace_bytes(geom)
    assert flops.executed_multiplications("direct", geom) == 2 * 8 * 16 * (12 * 3 - 2) * 3 * 12
    from fastconv.cpu import im2col_fused

    if im2col_fused.gather_applies((1, 3, 3), 1, (1, 12, 12), (1, 12, 12),
                                   im2col_fused.small_for_own(8, 16 * 9, (3, 3), (1, 1), 4)):
        # im2col's workspace on the gather kernel (the own GEMM): the padded input (2 x 16 x 14 x 14), the weights
        # packed in one panel of the micro-kernel's columns (32 float32 with AVX-512, 16 with AVX2; 8 used) and one
        # task's result for all 288 positions (a conv this small runs on the calling thread), float32
        from fastconv.cpu import micro_gemm

        panel = micro_gemm.NV * micro_gemm.VECTOR_BYTES // 4
        (row,) = flops.count(fnn.Conv2d(16, 8, 3, padding=1, algo="im2col"), x).rows
        assert row.workspace_bytes == (2 * 16 * 14 * 14 + 16 * 9 * panel + 288 * 8) * 4
    monkeypatch.setattr(im2col_fused, "GATHER", False)
    # im2col's workspace on its fused path (dense, 2-D): one task (a conv this small runs on the
    # calling thread), whose chunk of columns (C*k*k rows) and GEMM result (K rows) hold both images' 24 output
    # rows of 12, float32
    (row,) = flops.count(fnn.Conv2d(16, 8, 3, padding=1, algo="im2col"), x).rows
    assert row.workspace_bytes == (16 * 9 + 8) * 2 * 12 * 12 * 4
    # ... and on the plain stride-1 wide-row path (the fused one switched off): both images' rows as wide as the
    # padded row (12 + 2)

    monkeypatch.setattr(im2col_fused, "ENABLED", False)
    (row,) = flops.count(fnn.Conv2d(8, 8, 3, padding=1, algo="im2col"), x[:, :8]).rows
    assert row.workspace_bytes == (8 * 9 + 8) * 2 * 12 * 14 * 4


def test_report_table_has_units_and_totals():
    rep = flops.count(_mixed_model(), torch.randn(1, 3, 8, 8))
    text = str(rep)
    assert "MACs = multiply-accumulates" in text and "FLOPs = 2 x MACs" in text
    total_line = next(line for line in text.splitlines() if line.startswith("total"))
    assert f"{rep.macs:,}" in total_line and f"{rep.params:,}" in total_line
    assert f"FLOPs {rep.flops:,}" in text


# --------------------------------------------------------------------------------------------------
# counting mode: the direct kernel's loop nest tallies what it executes
# --------------------------------------------------------------------------------------------------
def _pairs_by_hand(n_out, n_in, k, s, p, d):
    """(output, tap) pairs landing inside the input, enumerated independently of the kernel's helper."""
    return sum(1 for o in range(n_out) for t in range(k) if 0 <= o * s - p + t * d < n_in)


COUNT_CASES = [
    # (N, C, K, groups, in (H, W), kernel (kh, kw), stride, padding, dilation)
    (1, 4, 6, 1, (7, 9), (3, 3), (1, 1), (0, 0), (1, 1)),       # no padding: all counts equal
    (2, 6, 4, 2, (9, 10), (3, 3), (2, 1), (1, 2), (1, 2)),      # grouped, strided, dilated, padded
    (1, 5, 5, 5, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1)),       # depthwise
    (1, 3, 2, 1, (6, 11), (2, 5), (1, 3), (1, 2), (2, 1)),      # even kernel, stride 3 along W
]


@pytest.mark.parametrize("case", COUNT_CASES)
def test_counting_mode_tally_matches_formulas(case):
    N, C, K, g, (H, W), (kh, kw), s, p, d = case
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    w = torch.randn(K, C // g, kh, kw, dtype=torch.float64)
    b = torch.randn(K, dtype=torch.float64)
    ref = torch_F.conv2d(x, w, b, stride=s, padding=p, dilation=d, groups=g)
    OH, OW = ref.shape[2:]
    y, executed, in_range = direct_forward_counted(
        x.numpy()[:, :, None], w.numpy()[:, :, None], b.numpy(), (1, *s), (0, *p), (1, *d), g, (1, OH, OW))
    assert_close(torch.from_numpy(y[:, :, 0]), ref, what="counting loop nest computes the convolution")
    analytic = flops.count(lambda t: F.conv2d(t, w, b, s, p, d, g, algo="direct"), x).macs
    per_pair = N * K * (C // g)
    assert analytic == per_pair * OH * kh * OW * kw                        # padding taps included
    ph, pw = _pairs_by_hand(OH, H, kh, s[0], p[0], d[0]), _pairs_by_hand(OW, W, kw, s[1], p[1], d[1])
    assert in_range_pairs(OH, H, kh, s[0], p[0], d[0]) == ph
    # H taps over padding are skipped, W taps over padding run as multiplications by zero
    assert executed == per_pair * ph * kw * OW
    assert in_range == per_pair * ph * pw
    if p == (0, 0):
        assert analytic == executed == in_range


def test_counting_mode_on_the_inception_seed_layer():
    """28x28x192 -> 5x5 'same' -> 32: 120,422,400 MACs counted; the kernel executes fewer."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 192, 1, 28, 28)).astype(np.float32)
    w = rng.standard_normal((32, 192, 1, 5, 5)).astype(np.float32)
    _, executed, in_range = direct_forward_counted(x, w, None, (1, 1, 1), (0, 2, 2), (1, 1, 1), 1, (1, 28, 28))
    # along a 28-long dim with 5 taps and padding 2: 28*5 pairs minus the 2+1 that fall off each edge
    pairs = 28 * 5 - 2 * (2 + 1)
    assert pairs == 134
    assert 32 * 192 * 28 * 5 * 28 * 5 == SEED_5X5_MACS
    assert executed == 32 * 192 * pairs * 5 * 28 == 115_261_440
    assert in_range == 32 * 192 * pairs * pairs == 110_321_664


# --------------------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------------------
def test_cli_model_table(capsys):
    from fastconv.cli import main

    assert main(["flops", "lenet5"]) == 0
    out = capsys.readouterr().out
    total_line = next(line for line in out.splitlines() if line.startswith("total"))
    lenet_params = (25 * 6 + 6) + (25 * 6 * 16 + 16) + (25 * 16 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    # C1 28x28x6 (25 taps), C3 10x10x16 (150 taps), C5 120 (400 taps), F6 120x84, output 84x10
    lenet_macs = 28 * 28 * 6 * 25 + 10 * 10 * 16 * 150 + 120 * 400 + 120 * 84 + 84 * 10
    assert f"{lenet_params:,}" in total_line and f"{lenet_macs:,}" in total_line
    assert main(["flops", "resnet18", "--input", "1x3x64x64"]) == 0
    assert "1x64x32x32" in capsys.readouterr().out  # conv1's output at the requested size


@pytest.mark.parametrize("kind,expected_macs", [
    ("inception-bottleneck", [SEED_5X5_MACS, SEED_BOTTLENECK_TOTAL]),
    # standard 3x3 at 14x14x512 -> 512; depthwise 14*14*512*9 + pointwise 14*14*512*512
    ("depthwise-separable", [14 * 14 * 512 * 512 * 9, 14 * 14 * 512 * 9 + 14 * 14 * 512 * 512]),
])
def test_cli_compare_counts_and_times_both_designs(kind, expected_macs, capsys):
    from fastconv.commands import flops as flops_command

    rows = flops_command.compare(kind, repeats=1)
    assert [r["macs"] for r in rows] == expected_macs
    assert rows[0]["output_shape"] == rows[1]["output_shape"]
    assert all(r["seconds"] > 0 for r in rows)
    flops_command._print_comparison(kind, rows, 1, 1)
    out = capsys.readouterr().out
    assert f"{expected_macs[0] / expected_macs[1]:.2f}x" in out
