"""fastconv.flops.executed: the multiplications each algorithm really executes, against instrumented counts
(the direct kernel's counting mode), the registry's own hooks (Winograd's mult_ratio), and analytic tile
counts on small layers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastconv
from fastconv import flops, registry
from fastconv.flops import executed
from fastconv.ops.conv import make_geometry


def geom(C, K, hw, k, stride=1, padding=0, dilation=1, groups=1, batch=1, ndim=2):
    s, p, d = (stride,) * ndim, (padding,) * ndim, (dilation,) * ndim
    return make_geometry(ndim, batch, C, K, groups, hw, (k,) * ndim, None, s, p, p, d, torch.float32, "numba")


def test_every_registered_algorithm_has_an_entry():
    # every implementation whose geometry is a convolution's (the conv passes and the transposed forward)
    names = {row["name"] for row in fastconv.algorithms() if row["family"] in ("conv", "conv_transpose")}
    assert names <= set(executed.EXECUTED), names - set(executed.EXECUTED)
    assert "patch_gemm" in executed.EXECUTED


@pytest.mark.parametrize("n_out,n_in,k,s,p,d", [(7, 7, 3, 1, 1, 1), (5, 10, 3, 2, 1, 1), (8, 12, 3, 1, 2, 2),
                                                 (4, 6, 5, 1, 1, 1), (2, 11, 2, 3, 0, 4)])
def test_in_range_pairs_matches_enumeration_and_the_kernel_helper(n_out, n_in, k, s, p, d):
    from fastconv.cpu.counting import in_range_pairs as kernel_pairs

    by_hand = sum(1 for o in range(n_out) for t in range(k) if 0 <= o * s - p + t * d < n_in)
    assert executed.in_range_pairs(n_out, n_in, k, s, p, d) == by_hand == kernel_pairs(n_out, n_in, k, s, p, d)


@pytest.mark.parametrize("case", [
    # (N, C, K, groups, (H, W), k, stride, padding, dilation)
    (1, 4, 6, 1, (7, 9), 3, 1, 0, 1),
    (2, 6, 4, 2, (9, 10), 3, 2, 1, 1),
    (1, 5, 5, 5, (8, 8), 3, 1, 1, 1),
    (1, 3, 2, 1, (6, 11), 5, 1, 2, 2),
])
def test_direct_matches_the_kernels_instrumented_tally(case):
    from fastconv.cpu.counting import direct_forward_counted

    N, C, K, G, (H, W), k, s, p, d = case
    g = make_geometry(2, N, C, K, G, (H, W), (k, k), None, (s, s), (p, p), (p, p), (d, d), torch.float64,
                      "numba")
    x = np.random.default_rng(0).standard_normal((N, C, 1, H, W))
    w = np.random.default_rng(1).standard_normal((K, C // G, 1, k, k))
    _, tally, _ = direct_forward_counted(x, w, None, (1, s, s), (0, p, p), (1, d, d), G, g.out_spatial)
    assert executed.executed_multiplications("direct", g) == tally
    if p == 0:
        assert tally == g.macs


@pytest.mark.parametrize("m,fewer", [(2, 2.25), (4, 4.0)])
def test_winograd_interior_tiles_do_the_textbook_saving(m, fewer):
    # output 8x8 / 16x16: whole tiles only (no border tiles)
    for out in (8, 16):
        g = geom(16, 8, (out, out), 3, padding=1)
        mults = executed.executed_multiplications(f"winograd{m}", g)
        assert g.macs / mults == pytest.approx(fewer)
        assert mults == 16 * 8 * (out // m) ** 2 * (m + 2) ** 2


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_border_tiles_are_counted_whole(m):
    g = geom(3, 5, (7, 10), 3, batch=2)  # valid conv: 5x8 outputs, partial tiles on both edges for m=2, 4
    OH, OW = g.out_spatial[1:]
    tiles = math.ceil(OH / m) * math.ceil(OW / m)
    mults = executed.executed_multiplications(f"winograd{m}", g)
    assert mults == 2 * 5 * 3 * tiles * (m + 2) ** 2
    # more than the interior saving promises, and what the registry's own hook says
    assert mults > g.macs * (m + 2) ** 2 / (9 * m * m)
    alg = registry.choose(f"winograd{m}", g, "forward")
    assert mults == round(alg.mult_ratio(g) * g.macs)


def test_im2col_wide_rows_pointwise_and_plain(monkeypatch):
    from fastconv.cpu import im2col_fused
    from fastconv.cpu.conv import _wide_ok

    g = geom(1, 6, (32, 32), 5)  # LeNet-5 conv1
    # on the fused path (thin inputs take it too) the columns are the output positions: exact
    assert im2col_fused.applies(g.kernel, g.groups, g.in_channels, g.out_channels, g.in_spatial, g.out_spatial, 4)
    assert executed.executed_multiplications("im2col", g) == g.macs
    # on the plain path: stride-1 wide rows of 28 + 4 columns
    monkeypatch.setattr(im2col_fused, "ENABLED", False)
    assert _wide_ok(g.kernel, g.stride, g.padding, g.dilation, g.in_spatial, g.out_spatial, 6)
    assert executed.executed_multiplications("im2col", g) == 6 * 25 * 28 * 32
    assert executed.executed_multiplications("im2col", geom(64, 32, (14, 14), 1)) == 14 * 14 * 64 * 32
    strided = geom(8, 8, (12, 12), 3, stride=2, padding=1)
    assert executed.executed_multiplications("im2col", strided) == strided.macs


def test_depthwise_computes_every_input_row_for_a_stride_in_h():
    g = geom(32, 32, (14, 14), 3, padding=1, groups=32)
    assert executed.executed_multiplications("depthwise", g) == g.macs  # stride 1: exact
    s2 = geom(32, 32, (14, 14), 3, stride=2, padding=1, groups=32)
    OH, OW = s2.out_spatial[1:]
    assert executed.executed_multiplications("depthwise", s2) == 32 * 9 * OW * ((OH - 1) * 2 + 1)


def test_shift_computes_the_whole_plane_grid():
    # stride 1, pad 1: planes of (OH + 1) x (OW + 1) per image (consecutive rows and images share their zero
    # padding); every output channel x Cg x taps over them
    g = geom(8, 8, (6, 5), 3, padding=1, groups=2)
    assert executed.executed_multiplications("shift", g) == 8 * (7 * 6) * 4 * 9 > g.macs
    # negative padding has no zeros to share: (O + 2) x (O + 2)
    crop = geom(8, 8, (9, 9), 3, padding=-1, groups=2)
    OH, OW = crop.out_spatial[1:]
    assert executed.executed_multiplications("shift", crop) == 8 * ((OH + 2) * (OW + 2)) * 4 * 9
    # stride 2: the phase planes are ceil(((O - 1) * 2 + 3) / 2) = O + 1 wide and high
    s2 = geom(8, 8, (8, 8), 3, stride=2, padding=1, groups=2)
    OH, OW = s2.out_spatial[1:]
    assert executed.executed_multiplications("shift", s2) == 8 * ((OH + 1) * (OW + 1)) * 4 * 9


def test_implicit_gemm_rounds_to_whole_tiles():
    g = geom(3, 10, (9, 9), 3, padding=1)  # M = 81, N = 10, K = 27 -> 128 x 64 x 32
    assert executed.executed_multiplications("implicit-gemm", g) == 128 * 64 * 32
    big = geom(64, 128, (16, 16), 3, padding=1, batch=4)  # every dimension a tile multiple
    assert executed.executed_multiplications("implicit-gemm", big) == big.macs


def test_report_rows_carry_the_executed_count():
    layer = fastconv.nn.Conv2d(16, 16, 3, padding=1, algo="winograd4", device="meta")
    (row,) = flops.count(layer, torch.zeros(1, 16, 16, 16, device="meta")).rows
    assert row.algorithm == "winograd4" and row.reason == "requested algo='winograd4'"
    assert row.algorithm_mults * 4 == row.macs
