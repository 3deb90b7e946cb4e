"""Pooling ops against torch in float64: values, indices, gradients, gradcheck, opcheck, NaN, ceil_mode."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import fastconv
import fastconv.functional as F
from helpers import assert_close

SIZES = {1: (11,), 2: (9, 8), 3: (5, 7, 6)}

# kernel, stride, padding, dilation, ceil_mode — spans ceil_mode's dropped last window (k=2,s=2,p=1 on odd
# sizes), padding == kernel // 2, dilation, stride > kernel, kernel == input size.
MAX_CASES = [
    (2, None, 0, 1, False), (3, 2, 1, 1, False), (3, 2, 1, 1, True), (2, 2, 1, 1, True), (3, 1, 1, 2, False),
    (2, 3, 0, 1, True), (3, 2, 0, 2, True), (4, 3, 2, 1, True),
]


def _x(ndim, n=2, c=3, dtype=torch.float64, requires_grad=True):
    return torch.randn(n, c, *SIZES[ndim], dtype=dtype, requires_grad=requires_grad)


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("case", MAX_CASES, ids=[str(c) for c in MAX_CASES])
def test_max_and_min_pool_match_torch_values_indices_gradients(ndim, case):
    k, s, p, d, ceil = case
    x = _x(ndim)
    ours, theirs = getattr(F, f"max_pool{ndim}d"), getattr(TF, f"max_pool{ndim}d")
    y, i = ours(x, k, s, p, d, ceil, return_indices=True)
    r, ri = theirs(x, k, s, p, d, ceil, return_indices=True)
    assert_close(y, r)
    assert torch.equal(i, ri)
    g = torch.randn_like(r)
    assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(r, x, g)[0])
    # min pooling is -max_pool(-x), values and indices
    m, mi = getattr(F, f"min_pool{ndim}d")(x, k, s, p, d, ceil, return_indices=True)
    r2, ri2 = theirs(-x, k, s, p, d, ceil, return_indices=True)
    assert_close(m, -r2)
    assert torch.equal(mi, ri2)


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("case", [(2, None, 0, False, True, None), (3, 2, 1, False, True, None),
                                  (3, 2, 1, True, False, None), (3, 2, 1, True, True, None),
                                  (2, 2, 1, True, True, None), (3, 1, 1, False, False, 5)])
def test_avg_pool_matches_torch(ndim, case):
    k, s, p, ceil, include_pad, divisor = case
    if ndim == 1 and divisor is not None:
        pytest.skip("avg_pool1d has no divisor_override (as torch)")
    x = _x(ndim)
    extra = {} if ndim == 1 else dict(divisor_override=divisor)
    y = getattr(F, f"avg_pool{ndim}d")(x, k, s, p, ceil, include_pad, **extra)
    r = getattr(TF, f"avg_pool{ndim}d")(x, k, s, p, ceil, include_pad, **extra)
    assert_close(y, r)
    g = torch.randn_like(r)
    assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(r, x, g)[0])


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("size", [1, 3, 4, "partial"])
def test_adaptive_pools_match_torch(ndim, size):
    x = _x(ndim)
    out = (2, None, 3)[3 - ndim:] if size == "partial" else size
    y = getattr(F, f"adaptive_avg_pool{ndim}d")(x, out)
    r = getattr(TF, f"adaptive_avg_pool{ndim}d")(x, out)
    assert_close(y, r)
    g = torch.randn_like(r)
    assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(r, x, g)[0])
    y, i = getattr(F, f"adaptive_max_pool{ndim}d")(x, out, return_indices=True)
    r, ri = getattr(TF, f"adaptive_max_pool{ndim}d")(x, out, return_indices=True)
    assert_close(y, r)
    assert torch.equal(i, ri)
    assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(r, x, g)[0])


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_max_unpool_accepts_indices_from_either_library(ndim):
    x = _x(ndim, requires_grad=False)
    y, i = getattr(F, f"max_pool{ndim}d")(x, 2, return_indices=True)
    r, ri = getattr(TF, f"max_pool{ndim}d")(x, 2, return_indices=True)
    y.requires_grad_()
    r.requires_grad_()
    ours = getattr(F, f"max_unpool{ndim}d")(y, i, 2, output_size=x.shape[2:])
    theirs = getattr(TF, f"max_unpool{ndim}d")(r, ri, 2, output_size=x.shape[2:])
    assert_close(ours, theirs)
    assert_close(getattr(F, f"max_unpool{ndim}d")(r, ri, 2, output_size=x.shape[2:]), theirs)
    g = torch.randn_like(theirs)
    assert_close(torch.autograd.grad(ours, y, g)[0], torch.autograd.grad(theirs, r, g)[0])


def test_overlapping_windows_scatter_add_in_backward():
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: F.max_pool2d(x, 3, 1, 1), (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda x: F.max_pool2d(x, 3, 1, 1), (x,), fast_mode=True)


@pytest.mark.parametrize("fn", [
    lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True), lambda x: F.min_pool2d(x, 2),
    lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
    lambda x: F.avg_pool2d(x, 2, divisor_override=3), lambda x: F.adaptive_avg_pool2d(x, (3, 2)),
    lambda x: F.adaptive_max_pool2d(x, 3), lambda x: F.lp_pool2d(x.abs() + 0.5, 2, 2),
    lambda x: F.max_unpool2d(*F.max_pool2d(x, 2, return_indices=True), 2, output_size=x.shape[2:]),
], ids=["max", "min", "avg", "avg_divisor", "adaptive_avg", "adaptive_max", "lp", "unpool"])
def test_gradcheck_and_gradgradcheck(fn):
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


def test_opcheck_every_pooling_op():
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    y, idx = torch.ops.fastconv.max_pool(x, [3, 3], [2, 2], [1, 1], [1, 1], True, False)
    g = torch.randn_like(y, requires_grad=True)
    cases = [
        (torch.ops.fastconv.max_pool.default, (x, [3, 3], [2, 2], [1, 1], [1, 1], True, False)),
        (torch.ops.fastconv.max_pool.default, (x, [2, 2], [2, 2], [0, 0], [1, 1], False, True)),
        (torch.ops.fastconv.max_pool_backward.default, (g, idx, [7, 6])),
        (torch.ops.fastconv.max_unpool.default, (y.detach().requires_grad_(), idx, [7, 6])),
        (torch.ops.fastconv.max_unpool_backward.default, (torch.randn(2, 3, 7, 6, dtype=torch.float64,
                                                                      requires_grad=True), idx)),
        (torch.ops.fastconv.adaptive_max_pool.default, (x, [3, 2])),
        (torch.ops.fastconv.avg_pool.default, (x, [3, 3], [2, 2], [1, 1], True, False, 0)),
        (torch.ops.fastconv.avg_pool_backward.default, (g, [7, 6], [3, 3], [2, 2], [1, 1], True, False, 0)),
        (torch.ops.fastconv.adaptive_avg_pool.default, (x, [3, 2])),
        (torch.ops.fastconv.adaptive_avg_pool_backward.default, (torch.randn(2, 3, 3, 2, dtype=torch.float64,
                                                                             requires_grad=True), [7, 6])),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_nan_propagates_like_torch(ndim):
    x = _x(ndim, requires_grad=False)
    flat = x.view(-1)
    flat[::7] = float("nan")
    flat[3] = float("nan")
    y, i = getattr(F, f"max_pool{ndim}d")(x, 3, 2, 1, return_indices=True)
    r, ri = getattr(TF, f"max_pool{ndim}d")(x, 3, 2, 1, return_indices=True)
    assert_close(y, r)
    assert torch.equal(i, ri)
    assert_close(getattr(F, f"avg_pool{ndim}d")(x, 2), getattr(TF, f"avg_pool{ndim}d")(x, 2))
    assert_close(getattr(F, f"adaptive_max_pool{ndim}d")(x, 2), getattr(TF, f"adaptive_max_pool{ndim}d")(x, 2))


def test_unbatched_batch_zero_noncontiguous_float32():
    x = torch.randn(3, 9, 8, dtype=torch.float64)
    assert_close(F.max_pool2d(x, 2), TF.max_pool2d(x, 2))
    assert_close(F.avg_pool1d(x[0], 3), TF.avg_pool1d(x[0], 3))
    empty = torch.randn(0, 3, 8, 8)
    assert F.max_pool2d(empty, 2).shape == (0, 3, 4, 4)
    assert F.adaptive_avg_pool2d(empty, 1).shape == (0, 3, 1, 1)
    nc = torch.randn(2, 8, 9, 3, dtype=torch.float64).permute(0, 3, 1, 2)
    assert_close(F.avg_pool2d(nc, 3, 2, 1), TF.avg_pool2d(nc, 3, 2, 1))
    x32 = torch.randn(2, 4, 10, 10)
    assert_close(F.avg_pool2d(x32, 2), TF.avg_pool2d(x32, 2))
    assert_close(F.max_pool2d(x32, 3, 2, 1), TF.max_pool2d(x32, 3, 2, 1))


def test_lp_pool_matches_torch():
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    for p in (1, 2, 3.0):
        assert_close(F.lp_pool2d(x, p, (3, 2), stride=2, ceil_mode=True), TF.lp_pool2d(x, p, (3, 2), 2, True))
        assert_close(F.lp_pool1d(x[0], p, 3), TF.lp_pool1d(x[0], p, 3))


MODULES = [
    (nn.MaxPool2d(3, 2, 1, ceil_mode=True), (2, 3, 9, 8)), (nn.MaxPool1d(2), (2, 3, 9)),
    (nn.MaxPool3d(2, return_indices=True), (1, 2, 4, 6, 6)), (nn.AvgPool2d(3, 2, 1, count_include_pad=False), (2, 3, 9, 8)),
    (nn.AvgPool1d(3), (2, 3, 9)), (nn.AvgPool3d(2, divisor_override=3), (1, 2, 4, 6, 6)),
    (nn.AdaptiveAvgPool2d((1, 1)), (2, 3, 7, 7)), (nn.AdaptiveAvgPool1d(4), (2, 3, 9)),
    (nn.AdaptiveAvgPool3d(2), (1, 2, 4, 5, 6)), (nn.AdaptiveMaxPool2d(3), (2, 3, 7, 7)),
    (nn.AdaptiveMaxPool1d(2), (2, 3, 9)), (nn.LPPool2d(2, 2), (2, 3, 8, 8)),
]


@pytest.mark.parametrize("torch_module, shape", MODULES, ids=[type(m).__name__ for m, _ in MODULES])
def test_modules_are_drop_in_and_convert(torch_module, shape):
    converted = fastconv.convert(nn.Sequential(torch_module))[0]
    assert type(converted).__name__ == type(torch_module).__name__
    assert type(converted).__module__ == "fastconv.nn.pool"
    assert repr(converted) == repr(torch_module)
    x = torch.randn(*shape, dtype=torch.float64).abs() + 0.1
    out, ref = converted(x), torch_module(x)
    if isinstance(ref, tuple):
        assert_close(out[0], ref[0])
        assert torch.equal(out[1], ref[1])
    else:
        assert_close(out, ref)


def test_unpool_and_min_pool_modules():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    pool, unpool = fastconv.nn.MaxPool2d(2, return_indices=True), fastconv.nn.MaxUnpool2d(2)
    y, i = pool(x)
    assert_close(unpool(y, i, output_size=x.shape), TF.max_unpool2d(y, i, 2, output_size=x.shape))
    assert isinstance(fastconv.convert(nn.MaxUnpool2d(2)), fastconv.nn.MaxUnpool2d)
    mp = fastconv.nn.MinPool2d(3, stride=2, padding=1)
    assert "kernel_size=3" in repr(mp)
    assert_close(mp(x), -TF.max_pool2d(-x, 3, 2, 1))


def test_seed_max_pool_examples_exactly():
    a = torch.tensor([[1, 3, 1, 2], [6, 1, 5, 4], [5, 4, 2, 5], [3, 3, 1, 2]], dtype=torch.float64)
    assert torch.equal(F.max_pool2d(a[None], 2, stride=1)[0],
                       torch.tensor([[6, 5, 5], [6, 5, 5], [5, 4, 5]], dtype=torch.float64))
    b = torch.tensor([[2, 7, 4, -7], [13, 17, -3, -6], [13, 14, -5, -5], [12, 8, -5, -1]], dtype=torch.float64)
    assert torch.equal(F.max_pool2d(b[None], 2, stride=2)[0], torch.tensor([[17, 4], [14, -1]], dtype=torch.float64))
    # seed count: 224x224x64 max pooled 2x2 stride 2 -> 112x112x64
    assert F.max_pool2d(torch.zeros(1, 64, 224, 224), 2, 2).shape == (1, 64, 112, 112)
