"""Shared pieces of the Numba pooling kernels: jit options, torch's output-size rule, window arithmetic
and argument checks -- what every pooling family in ``fastconv.cpu.pool_*`` needs.

See :mod:`fastconv.cpu.pool` for the layout (5-D ``(N, C, D, H, W)`` arrays, planes over threads) and the
torch semantics each family follows.
"""
from __future__ import annotations

from fastconv import config  # first: picks Numba's threading layer before any parallel kernel runs

import numpy as np
from numba import njit

# Numba accepts a set (not a frozenset) for fastmath flags.
_JIT = dict(cache=config.CACHE, fastmath=set(config.FASTMATH))

#: Index written for a window that holds no input element. torch's output-size rule never produces
#: such a window; it is a guard, and ``max_pool_backward`` skips it.
EMPTY_WINDOW_INDEX = -1

#: Planes at least this large keep int64 argmax indices throughout (the generic kernel).
_INT32_PLANE_LIMIT = 2**31


def output_size(in_size, kernel, stride, padding, dilation=1, ceil_mode=False):
    """Pooled length along one dimension, torch's ``pooling_output_shape`` rule.

    With ``ceil_mode`` a last window that would start in the right padding is dropped, as torch does.
    Provided for callers computing ``out_spatial``; the kernels take the size as given.
    """
    eff = in_size + 2 * padding - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = eff // stride + 1
    if ceil_mode and (out - 1) * stride >= in_size + padding:
        out -= 1
    return out


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


@njit(inline="always", **_JIT)
def _out_range(off, stride, in_size, out_size):
    """Outputs ``o`` in ``[lo, hi)`` with ``0 <= o * stride + off < in_size`` (``hi >= lo``)."""
    lo = 0
    if off < 0:
        lo = (-off + stride - 1) // stride
    t = in_size - 1 - off
    hi = lo
    if t >= 0:
        hi = t // stride + 1
        if hi > out_size:
            hi = out_size
        if hi < lo:
            hi = lo
    return lo, hi


@njit(inline="always", **_JIT)
def _first_valid(start, dil):
    """First ``start + k * dil`` (k >= 0) that is >= 0 (torch's ``while (i0 < 0) i0 += dilation``)."""
    if start < 0:
        start += ((-start + dil - 1) // dil) * dil
    return start


@njit(inline="always", **_JIT)
def _adaptive_start(i, in_size, out_size):
    return (i * in_size) // out_size


@njit(inline="always", **_JIT)
def _adaptive_end(i, in_size, out_size):
    return ((i + 1) * in_size + out_size - 1) // out_size



#: Integer dtypes max/min pooling accepts (torch's max_pool does; forward only, no NaN rule needed).
_INTEGER_DTYPES = (np.uint8, np.int8, np.int16, np.int32, np.int64)


def _check_geometry(name, x, *tuples, integers=False):
    if x.ndim != 5:
        raise ValueError(f"{name}: expected a 5-D array (N, C, D, H, W), got {x.ndim}-D shape {x.shape}")
    if x.dtype not in (np.float32, np.float64) and not (integers and x.dtype in _INTEGER_DTYPES):
        allowed = "float32, float64 or an integer dtype" if integers else "float32 or float64"
        raise TypeError(f"{name}: expected {allowed}, got {x.dtype}")
    for t in tuples:
        if len(t) != 3:
            raise ValueError(f"{name}: geometry arguments must be 3-tuples (d, h, w), got {t!r}")


def _planes(x):
    """(N, C, D, H, W) -> (N*C, D, H, W) C-contiguous view (copy only if the input is not contiguous)."""
    x = np.ascontiguousarray(x)
    n, c, d, h, w = x.shape
    return x.reshape(n * c, d, h, w)


def _check_adaptive(name, x, out_spatial):
    if any(int(v) < 0 for v in out_spatial):
        raise ValueError(f"{name}: out_spatial must be >= 0, got {tuple(out_spatial)}")
    if x.shape[0] * x.shape[1] and any(int(v) > 0 for v in out_spatial) and \
            any(s == 0 for s in x.shape[2:]):
        raise ValueError(f"{name}: input spatial size {x.shape[2:]} has a zero dimension; "
                         f"expected every spatial dimension >= 1")


#: Taps read per pass over an output row by the max and avg row kernels (why: :mod:`.pool_max`).
_TAPS = 3


@njit(**_JIT)
def _split_phases(xrow, phases, sw):
    """``phases[r, i] = xrow[sw * i + r]``; stride 2 gets a constant-stride (vectorised) loop."""
    W = xrow.shape[0]
    if sw == 2:
        n = W // 2
        p0 = phases[0]
        p1 = phases[1]
        for i in range(n):
            p0[i] = xrow[2 * i]
            p1[i] = xrow[2 * i + 1]
        if W % 2:
            p0[n] = xrow[W - 1]
    else:
        for r in range(sw):
            pr = phases[r]
            for i in range((W - r + sw - 1) // sw):
                pr[i] = xrow[sw * i + r]
