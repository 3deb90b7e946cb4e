"""The worked examples of the course material (../shared/seed_cases.json), as exact-value tests.

Copied into the project so it runs without ../shared. ``expected`` is the correct value even where a slide
misprinted it (the note says where).
"""
from __future__ import annotations

import pytest
import torch

import fastconv.functional as F
from fastconv import registry


CONV2D_SEEDS = {
    'vertical_edge_6x6': dict(
        input=[[0, 0, 5, 2, 1, 4], [3, 4, 1, 1, 1, 3], [6, 7, 1, 1, 1, 4], [8, 9, 2, 1, 5, 2], [2, 0, 0, 0, 2, 1], [6, 2, 2, 2, 2, 1]],
        weight=[[1, 0, -1], [1, 0, -1], [1, 0, -1]],
        kwargs={},
        expected=[[2.0, 7.0, 4.0, -7.0], [13.0, 17.0, -3.0, -6.0], [13.0, 14.0, -5.0, -5.0], [12.0, 8.0, -5.0, -1.0]],
    ),
    'vertical_edge_step_8x8': dict(
        input=[[9, 9, 9, 9, 0, 0, 0, 0], [9, 9, 9, 9, 0, 0, 0, 0], [9, 9, 9, 9, 0, 0, 0, 0], [9, 9, 9, 9, 0, 0, 0, 0], [9, 9, 9, 9, 0, 0, 0, 0], [9, 9, 9, 9, 0, 0, 0, 0], [9, 9, 9, 9, 0, 0, 0, 0], [9, 9, 9, 9, 0, 0, 0, 0]],
        weight=[[1, 0, -1], [1, 0, -1], [1, 0, -1]],
        kwargs={},
        expected=[[0.0, 0.0, 27.0, 27.0, 0.0, 0.0], [0.0, 0.0, 27.0, 27.0, 0.0, 0.0], [0.0, 0.0, 27.0, 27.0, 0.0, 0.0], [0.0, 0.0, 27.0, 27.0, 0.0, 0.0], [0.0, 0.0, 27.0, 27.0, 0.0, 0.0], [0.0, 0.0, 27.0, 27.0, 0.0, 0.0]],
    ),
    'padding_1_edge': dict(
        input=[[2, 4, 2, 4], [1, 1, 2, 1], [1, 4, 3, 3], [3, 2, 1, 2]],
        weight=[[1, 0, -1], [1, 0, -1], [1, 0, -1]],
        kwargs={'padding': 1},
        expected=[[-5.0, -1.0, 0.0, 4.0], [-9.0, -3.0, 1.0, 7.0], [-7.0, -1.0, 1.0, 6.0], [-6.0, 0.0, 1.0, 4.0]],
    ),
    'conv_2x2_4x4': dict(
        input=[[1, 3, 1, 2], [6, 1, 5, 4], [5, 4, 2, 5], [3, 3, 1, 2]],
        weight=[[1, 2], [2, 1]],
        kwargs={},
        expected=[[20.0, 12.0, 19.0], [22.0, 21.0, 22.0], [22.0, 15.0, 16.0]],
    ),
    'conv_2x2_3x3': dict(
        input=[[0, 1, 2], [3, 4, 5], [6, 7, 8]],
        weight=[[0, 1], [2, 3]],
        kwargs={},
        expected=[[19.0, 25.0], [37.0, 43.0]],
    ),
    'conv_2x2_3x3_padding_1': dict(
        input=[[0, 1, 2], [3, 4, 5], [6, 7, 8]],
        weight=[[0, 1], [2, 3]],
        kwargs={'padding': 1},
        expected=[[0.0, 3.0, 8.0, 4.0], [9.0, 19.0, 25.0, 10.0], [21.0, 37.0, 43.0, 16.0], [6.0, 7.0, 8.0, 0.0]],
    ),
}


@pytest.mark.parametrize("algo", registry.names())
@pytest.mark.parametrize("name", list(CONV2D_SEEDS))
def test_conv2d_seed_examples_exactly(name, algo):
    case = CONV2D_SEEDS[name]
    for dtype in (torch.float64, torch.float32):
        x = torch.tensor(case["input"], dtype=dtype)[None, None]
        w = torch.tensor(case["weight"], dtype=dtype)[None, None]
        try:
            y = F.conv2d(x, w, algo=algo, **case["kwargs"])
        except ValueError as e:  # an algorithm that refuses this geometry says so; others must run it
            assert "cannot run this convolution" in str(e)
            continue
        # Small integers: every algorithm must reproduce them exactly (Winograd to rounding).
        expected = torch.tensor(case["expected"], dtype=dtype)
        assert torch.allclose(y[0, 0], expected, rtol=0, atol=1e-4 if "winograd" in algo else 0), (y[0, 0], expected)
