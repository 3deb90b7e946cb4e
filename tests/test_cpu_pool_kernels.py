"""Numba pooling kernels (fastconv/cpu/pool.py) against torch.nn.functional, numpy in / numpy out.

Reference: torch's own CPU ops in float64 (values, indices and autograd gradients). Max/min pooling and
index results must be exact; sums and averages agree to 1e-12.
"""
from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastconv.cpu import pool, pool_max
from helpers import assert_close

#: Stricter than the float64 table (helpers.TOLERANCES): these kernels follow torch's summation order, so they
#: match torch's CPU kernels to the last bits; EXACT for max/argmax/unpool, which only move values.
RTOL = ATOL = 1e-12
EXACT = dict(rtol=0.0, atol=0.0)


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def _rng(seed=0):
    return np.random.default_rng(seed)


def _to5d(a, nd):
    """(N, C, *spatial[nd]) -> (N, C, D, H, W) view."""
    n, c = a.shape[:2]
    return a.reshape((n, c) + (1,) * (3 - nd) + a.shape[2:])


def _from5d(a, nd):
    return a.reshape(a.shape[:2] + a.shape[5 - nd:])


def _geom(v, nd, fill):
    """nd-tuple for torch -> 3-tuple for the kernels, leading dims filled."""
    v = (v,) * nd if isinstance(v, int) else tuple(v)
    return (fill,) * (3 - nd) + v


@contextlib.contextmanager
def _one_torch_thread():
    """torch's max_unpool splits a plane over threads: with duplicate indices only one thread is
    deterministic (sequential, last element wins), which is fastconv's rule."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_ADA_AVG = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_ADA_MAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}
_UNPOOL = {1: F.max_unpool1d, 2: F.max_unpool2d, 3: F.max_unpool3d}

_SPATIAL = {1: (11,), 2: (9, 10), 3: (5, 6, 7)}


def _input(nd, n=2, c=3, spatial=None, dtype=np.float64, seed=0, ints=False):
    shape = (n, c) + (spatial or _SPATIAL[nd])
    r = _rng(seed)
    if ints:  # small integers: many ties
        return r.integers(-2, 3, size=shape).astype(dtype)
    return r.standard_normal(shape).astype(dtype)


def _run_max(x, nd, k, s, p, d, ceil_mode, fn=pool.max_pool_forward, torch_fn=None):
    """Compare values, indices and the backward of one max-pool case against torch."""
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    torch_fn = torch_fn or _MAX_POOL[nd]
    yt, it = torch_fn(xt, k, s, p, d, ceil_mode=ceil_mode, return_indices=True)
    out = yt.shape[2:]
    y5, i5 = fn(_to5d(x, nd), _geom(k, nd, 1), _geom(s, nd, 1), _geom(p, nd, 0), _geom(d, nd, 1),
                _geom(tuple(out), nd, 1), True)
    assert_close(_from5d(y5, nd), yt, **EXACT)
    assert_close(_from5d(i5, nd), it, **EXACT)
    # value-only path gives the same values
    y5b, none = fn(_to5d(x, nd), _geom(k, nd, 1), _geom(s, nd, 1), _geom(p, nd, 0), _geom(d, nd, 1),
                   _geom(tuple(out), nd, 1), False)
    assert none is None
    assert_close(y5b, y5, **EXACT)
    return xt, yt, y5, i5


# ----------------------------------------------------------------------------------------------------
# max pool
# ----------------------------------------------------------------------------------------------------

_MAX_CASES = [
    # k, s, p, d, ceil_mode
    (2, 2, 0, 1, False),
    (3, 2, 1, 1, False),
    (3, 2, 1, 1, True),
    (3, 1, 1, 1, False),
    (2, 3, 1, 1, True),
    (3, 2, 1, 2, False),
    (3, 3, 1, 2, True),
    (1, 1, 0, 1, False),
    (4, 3, 2, 1, True),
]


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("case", _MAX_CASES)
def test_max_pool_matches_torch(nd, case):
    k, s, p, d, ceil_mode = case
    x = _input(nd)
    xt, yt, y5, i5 = _run_max(x, nd, k, s, p, d, ceil_mode)
    g = _rng(1).standard_normal(yt.shape)
    (gt,) = torch.autograd.grad(yt, xt, torch.from_numpy(g))
    gx = pool.max_pool_backward(_to5d(g, nd), i5, _to5d(x, nd).shape[2:])
    assert_close(_from5d(gx, nd), gt, rtol=RTOL, atol=ATOL)


def test_max_pool_anisotropic_2d_and_3d():
    x = _input(2, spatial=(13, 8))
    _run_max(x, 2, (3, 2), (2, 1), (1, 0), (1, 2), True)
    x = _input(3, spatial=(6, 9, 7))
    _run_max(x, 3, (2, 3, 2), (1, 2, 3), (1, 0, 1), (2, 1, 1), False)
    _run_max(x, 3, (2, 3, 2), (1, 2, 3), (1, 0, 1), (2, 1, 1), True)


def test_max_pool_kernel_equals_input():
    x = _input(2, spatial=(5, 7))
    _run_max(x, 2, (5, 7), 1, 0, 1, False)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_max_pool_ties_give_first_index(nd):
    x = _input(nd, ints=True, seed=3)
    for k, s, p, d, ceil_mode in _MAX_CASES[:5]:
        _run_max(x, nd, k, s, p, d, ceil_mode)
    # all-equal input: every index is the window's first in-bounds element
    _run_max(np.ones_like(x), nd, 3, 2, 1, 1, True)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_max_pool_nan_matches_torch(nd):
    x = _input(nd, seed=5)
    m = _rng(6).random(x.shape) < 0.15
    x[m] = np.nan
    x.reshape(-1)[:4] = np.nan  # a window with several NaNs: torch reports the last one
    for k, s, p, d, ceil_mode in _MAX_CASES:
        _run_max(x, nd, k, s, p, d, ceil_mode)
    y5, i5 = pool.max_pool_forward(_to5d(x, nd), _geom(3, nd, 1), _geom(2, nd, 1), _geom(1, nd, 0),
                                   _geom(1, nd, 1), _geom(2, nd, 1), True)
    assert np.isnan(y5).any()


def test_max_pool_all_minus_inf_index_is_first_in_window():
    x = np.full((1, 2, 7, 6), -np.inf)
    x[0, 1, 3, 3] = np.nan
    _run_max(x, 2, 3, 2, 1, 1, True)
    _run_max(x, 2, 3, 2, 1, 2, False)


def test_max_pool_float32_exact():
    x = _input(2, dtype=np.float32, seed=7)
    _run_max(x, 2, 3, 2, 1, 1, False)
    x = _input(3, dtype=np.float32, seed=7)
    _run_max(x, 3, 2, 2, 1, 1, True)


def test_max_pool_empty_window_guard():
    # Output size beyond torch's rule: the last window lies wholly in the right padding.
    x = _input(2, spatial=(4, 4))
    yt = F.max_pool2d(torch.from_numpy(x), 2, 2, 1)  # 3x3
    y5, i5 = pool.max_pool_forward(_to5d(x, 2), (1, 2, 2), (1, 2, 2), (0, 1, 1), (1, 1, 1), (1, 3, 4), True)
    assert_close(y5[..., :3], _to5d(yt.numpy(), 2), **EXACT)
    assert np.all(y5[..., 3] == -np.inf) and np.all(i5[..., 3] == pool.EMPTY_WINDOW_INDEX)
    y5m, i5m = pool.min_pool_forward(_to5d(x, 2), (1, 2, 2), (1, 2, 2), (0, 1, 1), (1, 1, 1), (1, 3, 4), True)
    assert np.all(y5m[..., 3] == np.inf) and np.all(i5m[..., 3] == -1)
    g = np.ones_like(y5)
    gx = pool.max_pool_backward(g, i5, (1, 4, 4))  # the -1 entries are skipped
    assert gx.sum() == 2 * 3 * 3 * 3


def test_max_pool_backward_rejects_bad_index():
    g = np.ones((1, 1, 1, 1, 2))
    ind = np.array([0, 7], dtype=np.int64).reshape(g.shape)
    with pytest.raises(RuntimeError, match="outside"):
        pool.max_pool_backward(g, ind, (1, 1, 4))


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_min_pool_is_negated_max_pool_of_negated_input(nd):
    for seed, ints, nan in [(0, False, False), (1, True, False), (2, False, True)]:
        x = _input(nd, seed=seed, ints=ints)
        if nan:
            x[_rng(9).random(x.shape) < 0.2] = np.nan
        for k, s, p, d, ceil_mode in _MAX_CASES:
            xt = torch.from_numpy(-x)
            yt, it = _MAX_POOL[nd](xt, k, s, p, d, ceil_mode=ceil_mode, return_indices=True)
            args = (_geom(k, nd, 1), _geom(s, nd, 1), _geom(p, nd, 0), _geom(d, nd, 1),
                    _geom(tuple(yt.shape[2:]), nd, 1))
            y5, i5 = pool.min_pool_forward(_to5d(x, nd), *args, True)
            ym, im = pool.max_pool_forward(_to5d(-x, nd), *args, True)
            assert_close(y5, -ym, **EXACT)
            assert_close(_from5d(y5, nd), -yt.numpy(), **EXACT)
            assert_close(_from5d(i5, nd), it, **EXACT)
            assert_close(pool.min_pool_forward(_to5d(x, nd), *args, False)[0], y5, **EXACT)


@pytest.mark.parametrize("fn", [pool.max_pool_forward, pool.min_pool_forward])
def test_max_pool_zero_planes(fn):
    for shape in [(0, 3, 1, 6, 6), (2, 0, 1, 6, 6)]:
        x = np.zeros(shape)
        y, i = fn(x, (1, 2, 2), (1, 2, 2), (0, 0, 0), (1, 1, 1), (1, 3, 3), True)
        assert y.shape == shape[:2] + (1, 3, 3) and i.shape == y.shape and i.dtype == np.int64
        gx = pool.max_pool_backward(np.zeros(y.shape), i, (1, 6, 6))
        assert gx.shape == shape



def test_max_pool_random_geometries_match_torch():
    # Tap chunks of 1-3 (kernel widths 1..7), strides 1..4 (phase split), dilations 1..3, odd rows.
    r = _rng(40)
    for trial in range(40):
        k = tuple(int(v) for v in r.integers(1, 8, size=2))
        s = tuple(int(v) for v in r.integers(1, 5, size=2))
        d = tuple(int(v) for v in r.integers(1, 4, size=2))
        p = tuple(int(r.integers(0, kk // 2 + 1)) for kk in k)
        spatial = tuple(int((kk - 1) * dd + 1 + r.integers(0, 12)) for kk, dd in zip(k, d))
        x = _input(2, n=1, c=2, spatial=spatial, seed=trial, ints=trial % 3 == 0)
        if trial % 4 == 1:
            x[r.random(x.shape) < 0.1] = np.nan
        _run_max(x, 2, k, s, p, d, bool(trial % 2))
        _run_max(x, 2, k, s, p, d, bool(trial % 2), fn=pool.min_pool_forward,
                 torch_fn=lambda xt, *a, **kw: tuple(v if i else -v for i, v in
                                                   enumerate(F.max_pool2d(-xt, *a, **kw))))


def _random_planar_window(r, trial):
    """A random 1-D (even trials) or 2-D (odd trials) pooling geometry as 3-tuples: kernel 1-5, stride 1-3, dilation
    1-2, padding up to half the kernel, an input a few elements past the window, ceil mode on 2 trials of 3;
    returns (kernel, stride, padding, dilation, input spatial, output spatial)."""
    nd = 1 + trial % 2
    lead = (1,) * (3 - nd)
    k = lead + tuple(int(v) for v in r.integers(1, 6, size=nd))
    s = lead + tuple(int(v) for v in r.integers(1, 4, size=nd))
    d = lead + tuple(int(v) for v in r.integers(1, 3, size=nd))
    p = tuple(int(r.integers(0, kk // 2 + 1)) for kk in k)
    spatial = lead + tuple(int((kk - 1) * dd + 1 + r.integers(0, 9)) for kk, dd in zip(k[3 - nd:], d[3 - nd:]))
    out = tuple(pool.output_size(n, kk, ss, pp, dd, bool(trial % 3)) for n, kk, ss, pp, dd in zip(spatial, k, s, p, d))
    return k, s, p, d, spatial, out


@pytest.mark.parametrize("want_min", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_max_pool_values_only_equal_the_indexed_values(want_min, dtype, monkeypatch):
    # Without indices 1-D and 2-D windows take the separable kernel (rows, then columns); its values must be the
    # indexed kernels' exactly: NaN propagates, -inf/+inf windows, ceil-mode windows over the edge.
    ran = []
    real = pool_max._max_pool_separable_kernel
    monkeypatch.setattr(pool_max, "_max_pool_separable_kernel", lambda *a: ran.append(1) or real(*a))
    r = _rng(42)
    for trial in range(30):
        k, s, p, d, spatial, out = _random_planar_window(r, trial)
        x = _input(3, n=2, c=3, spatial=spatial, seed=trial).astype(dtype)
        x[r.random(x.shape) < 0.05] = np.nan
        x[r.random(x.shape) < 0.05] = -np.inf if trial % 2 else np.inf
        before = len(ran)
        values, none = pool._pool_extreme("t", x, k, s, p, d, out, False, want_min)
        indexed, _ = pool._pool_extreme("t", x, k, s, p, d, out, True, want_min)
        assert none is None and len(ran) == before + 1
        assert values.dtype == x.dtype
        assert_close(values, indexed, **EXACT)


@pytest.mark.parametrize("want_min", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_max_pool_separable_indexed_kernel_equals_generic_kernel(want_min, dtype, monkeypatch):
    # 1-D and 2-D windows with indices take the separable (value, index) kernel: values and indices must be the
    # generic kernel's exactly (torch's visiting order): ties (small integers), NaN (the last one), all -inf
    # windows (their first element), ceil-mode windows over the edge, dilation, padding.
    ran = []
    real = pool_max._max_pool_separable_indexed_kernel
    monkeypatch.setattr(pool_max, "_max_pool_separable_indexed_kernel", lambda *a: ran.append(1) or real(*a))
    r = _rng(43)
    for trial in range(40):
        k, s, p, d, spatial, out = _random_planar_window(r, trial)
        x = _input(3, n=2, c=3, spatial=spatial, seed=trial, ints=trial % 2 == 0).astype(dtype)
        x[r.random(x.shape) < 0.05] = np.nan
        x[r.random(x.shape) < 0.2] = np.inf if want_min else -np.inf
        before = len(ran)
        y, i = pool._pool_extreme("t", x, k, s, p, d, out, True, want_min)
        assert len(ran) == before + 1
        y_gen = np.empty((6,) + out, dtype)
        i_gen = np.empty(y_gen.shape, np.int64)
        pool._max_pool_kernel_generic(x.reshape((6,) + spatial), y_gen, i_gen, *k, *s, *p, *d, want_min, True)
        assert_close(y.reshape(y_gen.shape), y_gen, **EXACT)
        assert_close(i.reshape(i_gen.shape), i_gen, **EXACT)


@pytest.mark.parametrize("want_min", [False, True])
def test_max_pool_fast_kernel_equals_generic_kernel(want_min, monkeypatch):
    # The generic kernel (int64 indices) serves narrow planes and planes of 2**31+ elements; keep it equal to
    # the row-vectorised one, which these small planes reach only with the width threshold lowered.
    monkeypatch.setattr(pool_max, "VECTOR_MIN_WIDTH", 0)
    r = _rng(41)
    for trial in range(25):
        k = tuple(int(v) for v in r.integers(1, 6, size=3))
        s = tuple(int(v) for v in r.integers(1, 4, size=3))
        d = tuple(int(v) for v in r.integers(1, 3, size=3))
        p = tuple(int(r.integers(0, kk // 2 + 1)) for kk in k)
        spatial = tuple(int((kk - 1) * dd + 1 + r.integers(0, 6)) for kk, dd in zip(k, d))
        out = tuple(pool.output_size(n, kk, ss, pp, dd, bool(trial % 2))
                    for n, kk, ss, pp, dd in zip(spatial, k, s, p, d))
        x = _input(3, n=1, c=2, spatial=spatial, seed=trial, ints=trial % 2 == 0)
        x[r.random(x.shape) < 0.05] = np.nan
        y_fast, i_fast = pool._pool_extreme("t", x, k, s, p, d, out, True, want_min)
        y_gen = np.empty_like(y_fast).reshape((2,) + out)
        i_gen = np.empty(y_gen.shape, np.int64)
        pool._max_pool_kernel_generic(x.reshape((2,) + spatial), y_gen, i_gen, *k, *s, *p, *d, want_min, True)
        assert_close(y_fast.reshape(y_gen.shape), y_gen, **EXACT)
        assert_close(i_fast.reshape(i_gen.shape), i_gen, **EXACT)


def test_max_pool_rejects_bad_arguments():
    with pytest.raises(ValueError, match="5-D"):
        pool.max_pool_forward(np.zeros((1, 1, 4, 4)), (1, 2, 2), (1, 2, 2), (0, 0, 0), (1, 1, 1),
                              (1, 2, 2), False)
    # integer dtypes are max-pooled (as torch's max_pool); float16 is not
    with pytest.raises(TypeError, match="float32, float64 or an integer dtype"):
        pool.max_pool_forward(np.zeros((1, 1, 1, 4, 4), np.float16), (1, 2, 2), (1, 2, 2), (0, 0, 0),
                              (1, 1, 1), (1, 2, 2), False)


# ----------------------------------------------------------------------------------------------------
# output size rule
# ----------------------------------------------------------------------------------------------------


def test_output_size_matches_torch_including_dropped_last_window():
    for n_in, k, s, p, d, ceil_mode in itertools.product([4, 5, 6, 7, 11], [1, 2, 3], [1, 2, 3], [0, 1],
                                                         [1, 2], [False, True]):
        if p > k // 2 or (k - 1) * d + 1 > n_in + 2 * p:
            continue
        x = torch.zeros(1, 1, n_in)
        expected = F.max_pool1d(x, k, s, p, d, ceil_mode=ceil_mode).shape[-1]
        assert pool.output_size(n_in, k, s, p, d, ceil_mode) == expected
        expected = F.avg_pool1d(x, k, s, p, ceil_mode=ceil_mode).shape[-1]
        assert pool.output_size(n_in, k, s, p, 1, ceil_mode) == expected
    # in 5, k 2, s 2, p 1, ceil: the 4th window would start in the right padding -> dropped
    assert pool.output_size(5, 2, 2, 1, 1, True) == 3 == F.avg_pool1d(torch.zeros(1, 1, 5), 2, 2, 1,
                                                                      ceil_mode=True).shape[-1]


# ----------------------------------------------------------------------------------------------------
# avg pool
# ----------------------------------------------------------------------------------------------------

_AVG_CASES = [
    # k, s, p, ceil_mode
    (2, 2, 0, False),
    (3, 2, 1, False),
    (3, 2, 1, True),
    (2, 2, 1, True),  # last window would start in the right padding: dropped by torch
    (3, 1, 1, False),
    (4, 3, 2, True),
    (2, 3, 1, True),
    (1, 1, 0, False),
]


def _run_avg(x, nd, k, s, p, ceil_mode, cip, div, rtol=RTOL, atol=ATOL):
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    kw = dict(ceil_mode=ceil_mode, count_include_pad=cip)
    if nd > 1:
        kw["divisor_override"] = div
    yt = _AVG_POOL[nd](xt, k, s, p, **kw)
    geo = (_geom(k, nd, 1), _geom(s, nd, 1), _geom(p, nd, 0))
    y5 = pool.avg_pool_forward(_to5d(x, nd), *geo, _geom(tuple(yt.shape[2:]), nd, 1), ceil_mode, cip, div)
    assert_close(_from5d(y5, nd), yt, rtol=rtol, atol=atol)
    g = _rng(2).standard_normal(yt.shape).astype(x.dtype)
    (gt,) = torch.autograd.grad(yt, xt, torch.from_numpy(g))
    gx = pool.avg_pool_backward(_to5d(g, nd), *geo, _to5d(x, nd).shape[2:], ceil_mode, cip, div)
    assert_close(_from5d(gx, nd), gt, rtol=rtol, atol=atol)


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("case", _AVG_CASES)
@pytest.mark.parametrize("cip", [True, False])
def test_avg_pool_matches_torch(nd, case, cip):
    k, s, p, ceil_mode = case
    x = _input(nd, seed=11)
    _run_avg(x, nd, k, s, p, ceil_mode, cip, None)


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("div", [1, 3, 7])
def test_avg_pool_divisor_override(nd, div):
    x = _input(nd, seed=12)
    for k, s, p, ceil_mode in _AVG_CASES[:4]:
        _run_avg(x, nd, k, s, p, ceil_mode, True, div)
        _run_avg(x, nd, k, s, p, ceil_mode, False, div)


def test_avg_pool_divisor_override_zero_means_none():
    x = _input(2, seed=13)
    geo = ((1, 3, 3), (1, 2, 2), (0, 1, 1), (1, 5, 5))
    assert_close(pool.avg_pool_forward(_to5d(x, 2), *geo, False, False, 0),
                 pool.avg_pool_forward(_to5d(x, 2), *geo, False, False, None), **EXACT)


def test_avg_pool_anisotropic():
    x = _input(2, spatial=(13, 8), seed=14)
    _run_avg(x, 2, (3, 2), (2, 1), (1, 0), True, False, None)
    x = _input(3, spatial=(6, 9, 7), seed=14)
    _run_avg(x, 3, (2, 3, 2), (1, 2, 3), (1, 0, 1), True, True, None)
    _run_avg(x, 3, (2, 3, 2), (1, 2, 3), (1, 0, 1), False, False, 5)


def test_avg_pool_float32():
    x = _input(2, dtype=np.float32, seed=15)
    _run_avg(x, 2, 3, 2, 1, True, False, None, rtol=1e-6, atol=1e-6)


def test_avg_pool_nan_propagates():
    x = _input(2, seed=16)
    x[0, 0, 4, 4] = np.nan
    _run_avg(x, 2, 3, 2, 1, False, True, None)


def test_avg_pool_empty_window_guard_gives_zero():
    x = _input(2, spatial=(4, 4), seed=17)
    y5 = pool.avg_pool_forward(_to5d(x, 2), (1, 2, 2), (1, 2, 2), (0, 1, 1), (1, 3, 4), False, False, None)
    assert np.all(y5[..., 3] == 0)


def test_avg_pool_zero_planes():
    x = np.zeros((0, 4, 1, 6, 6), np.float32)
    y = pool.avg_pool_forward(x, (1, 2, 2), (1, 2, 2), (0, 0, 0), (1, 3, 3), False, True, None)
    assert y.shape == (0, 4, 1, 3, 3) and y.dtype == np.float32
    gx = pool.avg_pool_backward(y, (1, 2, 2), (1, 2, 2), (0, 0, 0), (1, 6, 6), False, True, None)
    assert gx.shape == x.shape


# ----------------------------------------------------------------------------------------------------
# adaptive pools
# ----------------------------------------------------------------------------------------------------

_ADA_CASES = {
    1: [((11,), (1,)), ((11,), (4,)), ((11,), (11,)), ((5,), (8,)), ((12,), (3,))],
    2: [((9, 10), (1, 1)), ((9, 10), (4, 3)), ((7, 7), (7, 7)), ((5, 4), (8, 6)), ((12, 13), (5, 1))],
    3: [((5, 6, 7), (1, 1, 1)), ((5, 6, 7), (2, 3, 4)), ((4, 3, 5), (6, 4, 2)), ((3, 4, 5), (3, 4, 5))],
}


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_adaptive_avg_pool_matches_torch(nd):
    for spatial, out in _ADA_CASES[nd]:
        x = _input(nd, spatial=spatial, seed=21)
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        yt = _ADA_AVG[nd](xt, out)
        y5 = pool.adaptive_avg_pool_forward(_to5d(x, nd), _geom(out, nd, 1))
        assert_close(_from5d(y5, nd), yt, rtol=RTOL, atol=ATOL)
        g = _rng(3).standard_normal(yt.shape)
        (gt,) = torch.autograd.grad(yt, xt, torch.from_numpy(g))
        gx = pool.adaptive_avg_pool_backward(_to5d(g, nd), _geom(spatial, nd, 1))
        assert_close(_from5d(gx, nd), gt, rtol=RTOL, atol=ATOL)


def test_adaptive_avg_pool_float32_global():
    x = _input(2, n=3, c=5, spatial=(7, 7), dtype=np.float32, seed=22)
    yt = F.adaptive_avg_pool2d(torch.from_numpy(x), 1)
    y5 = pool.adaptive_avg_pool_forward(_to5d(x, 2), (1, 1, 1))
    assert y5.dtype == np.float32
    assert_close(_from5d(y5, 2), yt, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_adaptive_max_pool_matches_torch(nd):
    for seed, (spatial, out) in enumerate(_ADA_CASES[nd]):
        for kind in ["normal", "ints", "nan"]:
            x = _input(nd, spatial=spatial, seed=seed, ints=kind == "ints")
            if kind == "nan":
                x[_rng(seed).random(x.shape) < 0.2] = np.nan
            xt = torch.from_numpy(x.copy()).requires_grad_(True)
            yt, it = _ADA_MAX[nd](xt, out, return_indices=True)
            y5, i5 = pool.adaptive_max_pool_forward(_to5d(x, nd), _geom(out, nd, 1))
            assert_close(_from5d(y5, nd), yt, **EXACT)
            assert_close(_from5d(i5, nd), it, **EXACT)
            g = _rng(4).standard_normal(yt.shape)
            (gt,) = torch.autograd.grad(yt, xt, torch.from_numpy(g))
            gx = pool.max_pool_backward(_to5d(g, nd), i5, _geom(spatial, nd, 1))
            assert_close(_from5d(gx, nd), gt, rtol=RTOL, atol=ATOL)


def test_adaptive_zero_planes_and_bad_input():
    y = pool.adaptive_avg_pool_forward(np.zeros((0, 3, 1, 5, 5)), (1, 2, 2))
    assert y.shape == (0, 3, 1, 2, 2)
    y, i = pool.adaptive_max_pool_forward(np.zeros((2, 0, 1, 5, 5)), (1, 2, 2))
    assert y.shape == i.shape == (2, 0, 1, 2, 2)
    assert pool.adaptive_avg_pool_backward(np.zeros((0, 3, 1, 2, 2)), (1, 5, 5)).shape == (0, 3, 1, 5, 5)
    with pytest.raises(ValueError, match="zero dimension"):
        pool.adaptive_avg_pool_forward(np.zeros((1, 1, 1, 0, 5)), (1, 1, 1))
    with pytest.raises(ValueError, match="zero dimension"):
        pool.adaptive_max_pool_forward(np.zeros((1, 1, 1, 0, 5)), (1, 1, 1))


# ----------------------------------------------------------------------------------------------------
# max_unpool
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("case", [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
def test_max_unpool_matches_torch(nd, case):
    k, s, p = case
    x = _input(nd, seed=31)
    yp, ip = _MAX_POOL[nd](torch.from_numpy(x), k, s, p, return_indices=True)
    v = torch.from_numpy(_rng(32).standard_normal(yp.shape)).requires_grad_(True)
    with _one_torch_thread():  # overlapping windows repeat indices: see the duplicate-index test
        ut = _UNPOOL[nd](v, ip, k, s, p, output_size=x.shape[2:])
    u5 = pool.max_unpool_forward(_to5d(v.detach().numpy(), nd), _to5d(ip.numpy(), nd),
                                 _geom(x.shape[2:], nd, 1))
    assert_close(_from5d(u5, nd), ut, **EXACT)
    g = _rng(33).standard_normal(ut.shape)
    (gt,) = torch.autograd.grad(ut, v, torch.from_numpy(g))
    gv = pool.max_unpool_backward(_to5d(g, nd), _to5d(ip.numpy(), nd))
    assert_close(_from5d(gv, nd), gt, **EXACT)


def test_max_unpool_duplicate_indices_last_wins_like_sequential_torch():
    # torch splits the elements of a plane over threads, so with duplicate indices its result depends
    # on timing; on one thread it is sequential and the last element wins. fastconv always does that.
    v = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]], dtype=torch.float64)
    idx = torch.tensor([[[[5, 1, 5, 0]]]])
    with _one_torch_thread():
        ut = F.max_unpool2d(v, idx, (2, 1), output_size=(2, 4))
    u5 = pool.max_unpool_forward(_to5d(v.numpy(), 2), _to5d(idx.numpy(), 2), (1, 2, 4))
    assert_close(_from5d(u5, 2), ut, **EXACT)
    assert u5.reshape(-1)[5] == 3.0


def test_max_unpool_rejects_invalid_index():
    v = np.ones((1, 2, 1, 1, 3))
    idx = np.array([0, 1, 2, 0, 8, 1], dtype=np.int64).reshape(v.shape)
    with pytest.raises(RuntimeError, match="invalid max index: 8"):
        pool.max_unpool_forward(v, idx, (1, 2, 4))
    with pytest.raises(RuntimeError, match="invalid max index: 8"):
        pool.max_unpool_backward(np.ones((1, 2, 1, 2, 4)), idx)
    with pytest.raises(RuntimeError, match="invalid max index: -1"):
        pool.max_unpool_forward(v, -np.ones_like(idx), (1, 2, 4))


def test_max_unpool_zero_planes():
    u = pool.max_unpool_forward(np.zeros((0, 2, 1, 3, 3)), np.zeros((0, 2, 1, 3, 3), np.int64), (1, 6, 6))
    assert u.shape == (0, 2, 1, 6, 6)
    g = pool.max_unpool_backward(u, np.zeros((0, 2, 1, 3, 3), np.int64))
    assert g.shape == (0, 2, 1, 3, 3)


# ---- average pooling: the kernel for windows inside the input ----------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_avg_pool_inside_kernel_equals_general_kernel_and_torch_bit_for_bit(monkeypatch, dtype):
    """Windows that all lie inside the input (no padding, no clipped ceil_mode window) take their own kernel
    (forward; backward when windows do not overlap). Both passes equal the general kernel's bit for bit, and the
    forward equals torch's (same summation order), over 1-D to 3-D windows, strides below, at and above the
    kernel, and divisor_override; a spy makes sure the fast kernels ran."""
    from fastconv.cpu import pool_avg
    rng = np.random.default_rng(0)
    calls = []
    for name in ("_avg_pool_inside_kernel", "_avg_pool_tiling_backward_kernel"):
        kern = getattr(pool_avg, name)
        monkeypatch.setattr(pool_avg, name, lambda *a, _k=kern, _n=name: calls.append(_n) or _k(*a))
    cases = [((1, 8, 8), (1, 2, 2), (1, 2, 2)), ((1, 7, 9), (1, 3, 2), (1, 2, 3)), ((1, 6, 6), (1, 3, 3), (1, 1, 1)),
             ((1, 1, 10), (1, 1, 4), (1, 1, 4)), ((4, 6, 5), (2, 2, 2), (2, 2, 1)), ((5, 5, 5), (2, 3, 2), (3, 2, 2))]
    for sp, k, s in cases:
        for override in (0, 3):
            x = rng.standard_normal((2, 3) + sp).astype(dtype)
            out = tuple((n - kk) // ss + 1 for n, kk, ss in zip(sp, k, s))
            fwd = (k, s, (0, 0, 0), out, False, True, override)
            bwd = (k, s, (0, 0, 0), sp, False, True, override)
            g = rng.standard_normal((2, 3) + out).astype(dtype)
            got = pool_avg.avg_pool_forward(x, *fwd), pool_avg.avg_pool_backward(g, *bwd)
            monkeypatch.setattr(pool_avg, "INSIDE_FAST_PATH", False)
            want = pool_avg.avg_pool_forward(x, *fwd), pool_avg.avg_pool_backward(g, *bwd)
            monkeypatch.setattr(pool_avg, "INSIDE_FAST_PATH", True)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), (sp, k, s, override)
            t = F.avg_pool3d(torch.from_numpy(x), k, s, divisor_override=override or None)
            assert np.array_equal(got[0], t.numpy()), (sp, k, s, override, "torch")
    assert "_avg_pool_inside_kernel" in calls and "_avg_pool_tiling_backward_kernel" in calls


@pytest.mark.parametrize("want_min", [False, True], ids=["max", "min"])
@pytest.mark.parametrize("nd,kernel,stride,padding,dilation", [
    (1, (1, 1, 4), (1, 1, 3), (0, 0, 2), (1, 1, 1)),
    (2, (1, 3, 3), (1, 2, 2), (0, 1, 1), (1, 1, 1)),
    (2, (1, 3, 2), (1, 1, 2), (0, 1, 0), (1, 2, 1)),
    (3, (2, 3, 3), (2, 2, 1), (1, 1, 1), (1, 1, 2)),
])
@pytest.mark.parametrize("values", ["random", "ties", "nan", "-inf"])
def test_max_pool_backward_from_values_equals_the_scatter_at_the_indices(want_min, nd, kernel, stride, padding,
                                                                         dilation, values):
    """The gradient found again from the values is the scatter at the indexed kernels' indices, exactly."""
    rng = _rng(3)
    shape = (2, 3, 5 if nd == 3 else 1, 7 if nd >= 2 else 1, 9)
    x = {"random": rng.standard_normal(shape), "ties": rng.integers(0, 3, shape).astype(np.float64),
         "nan": np.where(rng.random(shape) < 0.2, np.nan, rng.standard_normal(shape)),
         "-inf": np.where(rng.random(shape) < 0.7, -np.inf, rng.standard_normal(shape))}[values]
    if want_min and values == "-inf":
        x = -x
    out = tuple((i + 2 * p - d * (k - 1) - 1) // s + 1
                for i, k, s, p, d in zip(shape[2:], kernel, stride, padding, dilation))
    run = pool_max.min_pool_forward if want_min else pool_max.max_pool_forward
    y, idx = run(x, kernel, stride, padding, dilation, out, True)
    g = rng.standard_normal(y.shape)
    expected = pool_max.max_pool_backward(g, idx, shape[2:])
    got = pool_max.max_pool_backward_from_values(g, x, y, kernel, stride, padding, dilation, want_min)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("want_min", [False, True], ids=["max", "min"])
@pytest.mark.parametrize("window", [(3, 3), (2, 2)])
@pytest.mark.parametrize("values", ["random", "ties", "nan", "-inf"])
def test_max_pool_backward_from_values_fast_2d_kernels_equal_the_general_kernel(want_min, window, values,
                                                                                monkeypatch):
    """The compiled-window kernels (pool_max._VALUES_BACKWARD_2D) give the general kernel's gradient bit for bit:
    inside the plane, across its edges (padding, and last windows that end outside, as ceil_mode makes them),
    strides 1-3, dilation 1-2, NaN and -inf windows, ties; and they are the ones that ran."""
    rng = _rng(11)
    ran = []
    for key, kernel in dict(pool_max._VALUES_BACKWARD_2D).items():
        monkeypatch.setitem(pool_max._VALUES_BACKWARD_2D, key,
                            lambda *args, kernel=kernel, key=key: (ran.append(key), kernel(*args))[1])
    KH, KW = window
    for H, W in ((7, 9), (8, 8), (5, 13)):
        shape = (2, 3, 1, H, W)
        x = {"random": rng.standard_normal(shape), "ties": rng.integers(0, 3, shape).astype(np.float64),
             "nan": np.where(rng.random(shape) < 0.2, np.nan, rng.standard_normal(shape)),
             "-inf": np.where(rng.random(shape) < 0.7, -np.inf, rng.standard_normal(shape))}[values]
        if want_min and values == "-inf":
            x = -x
        for s, p, d in ((1, 0, 1), (2, 1, 1), (2, 0, 1), (3, 1, 1), (1, 1, 2), (2, 1, 2)):
            if p > KH // 2:
                continue
            for extra in (0, 1):  # 1: one more output than fits (ceil_mode's last window, ending outside)
                out = tuple((i + 2 * p - d * (k - 1) - 1) // s + 1 + extra for i, k in zip((H, W), window))
                run = pool_max.min_pool_forward if want_min else pool_max.max_pool_forward
                geometry = ((1, KH, KW), (1, s, s), (0, p, p), (1, d, d))
                y, _ = run(x, *geometry, (1,) + out, False)
                g = rng.standard_normal(y.shape)
                got = pool_max.max_pool_backward_from_values(g, x, y, *geometry, want_min)
                with monkeypatch.context() as general:
                    general.setattr(pool_max, "_VALUES_BACKWARD_2D", {})
                    want = pool_max.max_pool_backward_from_values(g, x, y, *geometry, want_min)
                np.testing.assert_array_equal(got, want, err_msg=str((H, W, s, p, d, extra)))
    assert ran and set(ran) == {window}
