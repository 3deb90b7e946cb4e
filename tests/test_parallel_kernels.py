"""Kernels compiled parallel and serial (:mod:`fastconv.cpu.parallel`): both variants give torch's results.

Test-sized convs fall below :data:`~fastconv.cpu.parallel.PARALLEL_MIN_ELEMENTS` and would only ever run the
serial variants; the threshold is set to 0 here to run the parallel ones through the same checks.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import fastconv.functional as F
from fastconv.cpu import conv, parallel
from helpers import assert_close

# name -> (x shape, w shape, kwargs, channels_last, algo)
CASES = {
    "3x3 pad 1 (wide rows)": ((2, 4, 9, 8), (4, 4, 3, 3), dict(padding=1), False, "im2col"),
    "3x3 stride 2 (phase split)": ((2, 6, 9, 9), (8, 6, 3, 3), dict(stride=2, padding=1), False, "im2col"),
    "3x3 64 channels (col2im)": ((1, 64, 6, 6), (80, 64, 3, 3), dict(padding=1), False, "im2col"),
    "5x5 groups 2 channels_last": ((2, 4, 9, 8), (6, 2, 5, 5), dict(padding=2, groups=2), True, "im2col"),
    "depthwise 3x3": ((2, 6, 9, 8), (6, 1, 3, 3), dict(padding=1, groups=6), False, "depthwise"),
    "depthwise 5x5 stride 2 multiplier 2": ((2, 3, 11, 9), (6, 1, 5, 5), dict(stride=2, padding=2, groups=3), False,
                                            "depthwise"),
    "depthwise 3-d": ((1, 4, 5, 6, 5), (4, 1, 3, 3, 3), dict(padding=1, groups=4), False, "depthwise"),
}


@pytest.mark.parametrize("threshold", [0, 1 << 40], ids=["parallel", "serial"])
@pytest.mark.parametrize("case", list(CASES))
def test_both_variants_match_torch(case, threshold, monkeypatch):
    monkeypatch.setattr(parallel, "PARALLEL_MIN_ELEMENTS", threshold)
    monkeypatch.setattr(parallel, "COMPUTE_PARALLEL_MIN_ELEMENTS", threshold)
    xs, ws, kw, cl, algo = CASES[case]
    conv_fn, torch_fn = (F.conv3d, TF.conv3d) if len(xs) == 5 else (F.conv2d, TF.conv2d)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(xs, dtype=torch.float64, generator=gen)
    w = torch.randn(ws, dtype=torch.float64, generator=gen)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    xa, wa, xb, wb = (t.detach().clone().requires_grad_() for t in (x, w, x, w))
    y = conv_fn(xa, wa, algo=algo, **kw)
    ref = torch_fn(xb, wb, **kw)
    assert_close(y, ref, what=f"{case} forward")
    g = torch.randn(ref.shape, dtype=torch.float64, generator=gen)
    for name, a, e in zip(("grad_input", "grad_weight"), torch.autograd.grad(y, (xa, wa), g),
                          torch.autograd.grad(ref, (xb, wb), g)):
        assert_close(a, e, what=f"{case} {name}")


def test_variant_chosen_by_size(monkeypatch):
    calls = []
    kernel = conv._im2col
    monkeypatch.setattr(kernel, "parallel", lambda *a: calls.append("parallel"))
    monkeypatch.setattr(kernel, "serial", lambda *a: calls.append("serial"))
    small = torch.zeros(4).numpy()
    kernel(small)
    monkeypatch.setattr(parallel, "PARALLEL_MIN_ELEMENTS", 4)
    kernel(small)
    assert calls == ["serial", "parallel"]


POOLS = {
    "max_pool2d with indices": (lambda F_: F_.max_pool2d, dict(kernel_size=3, stride=2, padding=1, return_indices=True)),
    "avg_pool2d": (lambda F_: F_.avg_pool2d, dict(kernel_size=3, stride=2, padding=1)),
    "adaptive_avg_pool2d": (lambda F_: F_.adaptive_avg_pool2d, dict(output_size=(3, 2))),
    "adaptive_avg_pool2d global": (lambda F_: F_.adaptive_avg_pool2d, dict(output_size=1)),
    "adaptive_max_pool2d": (lambda F_: F_.adaptive_max_pool2d, dict(output_size=(3, 2))),
}


@pytest.mark.parametrize("threshold", [0, 1 << 40], ids=["parallel", "serial"])
@pytest.mark.parametrize("case", list(POOLS))
def test_pooling_both_variants_match_torch(case, threshold, monkeypatch):
    monkeypatch.setattr(parallel, "POOL_PARALLEL_MIN_ELEMENTS", threshold)
    pick, kw = POOLS[case]
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = pick(F)(xa, **kw), pick(TF)(xb, **kw)
    got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
    assert_close(got, want, what=f"{case} forward")
    g = torch.randn(want.shape, dtype=torch.float64)
    assert_close(torch.autograd.grad(got, xa, g)[0], torch.autograd.grad(want, xb, g)[0], what=f"{case} backward")
