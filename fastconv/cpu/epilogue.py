"""Numba epilogue of a convolution's output: ``y = act(y + bias[k])`` in place, in one parallel pass.

A conv followed by its bias add and a ReLU costs three passes over the activations when each runs on
its own (the bias add inside im2col's GEMM path is a numpy broadcast, ``torch.relu`` another pass). Here
both happen while each output element is touched once, by :func:`bias_act_`.

Layouts: ``y`` is ``(N, K, *S)`` (any number of spatial dims). NCHW-contiguous outputs are processed plane
by plane (``N * K`` planes of ``prod(S)`` elements, each with one bias value); channels_last outputs as
``N * prod(S)`` rows of ``K`` channels; any other strides through a contiguous copy.

Activations (:data:`ACTIVATIONS`), with torch's NaN rule (``torch.relu(nan) == nan``, ``relu6`` clamps
like ``torch.nn.functional.hardtanh(x, 0, 6)``, which keeps NaN):

* ``"none"``: ``y + bias`` (identity)
* ``"relu"``: ``max(y + bias, 0)``
* ``"relu6"``: ``min(max(y + bias, 0), 6)``

The comparisons are written ``v < 0`` / ``v > 6`` so a NaN fails them and passes through; the jit flags
are the library's narrow fastmath set (no ``nnan``), so the compiler may not assume otherwise.
"""
from __future__ import annotations

from fastconv import config  # first: picks Numba's threading layer before any parallel kernel runs

import numpy as np
from numba import njit, prange

from . import parallel

# Numba accepts a set (not a frozenset) for fastmath flags.
_JIT = dict(cache=config.CACHE, fastmath=set(config.FASTMATH))

#: Activation name -> the code the kernels branch on (once per task, outside the vectorised loop).
ACTIVATIONS = {"none": 0, "relu": 1, "relu6": 2}

#: Outputs of at most this many elements (1 MiB of float32) are processed on the calling thread. Measured on
#: 2 shared cores at load 6 (float32, relu): 8K elements 6 us serial vs 32 us through a parallel launch, 64K
#: 13 vs 28 us, 256K 39 vs 66 us; the pass is memory-bound and the launch (TBB waking its workers) dominates.
SERIAL_MAX = 1 << 18

#: Elements per parallel task when a plane is split: large enough that a task's start-up (about a
#: microsecond) is noise, small enough that a single big plane (N = 1, few channels) still spreads over
#: the threads.
CHUNK = 1 << 14


@njit(inline="always", **_JIT)
def _apply(row, b, act):
    """``row[:] = act(row + b)``; ``act`` is a per-call constant, so each branch is one vectorised loop."""
    n = row.shape[0]
    if act == 1:
        for i in range(n):
            v = row[i] + b
            row[i] = 0 if v < 0 else v
    elif act == 2:
        for i in range(n):
            v = row[i] + b
            row[i] = 0 if v < 0 else (6 if v > 6 else v)
    else:
        for i in range(n):
            row[i] = row[i] + b


@parallel.kernel(always=True, **_JIT)
def _planes(y, bias, act, chunks):
    """y: (P, L) C-contiguous, P = N * K planes; bias: (K,) (all zeros when the conv has none).

    Parallel over ``P * chunks`` tasks, each a ``ceil(L / chunks)`` slice of one plane."""
    P, L = y.shape
    K = bias.shape[0]
    step = (L + chunks - 1) // chunks
    for t in prange(P * chunks):
        p = t // chunks
        lo = (t - p * chunks) * step
        hi = min(lo + step, L)
        if lo < hi:
            _apply(y[p, lo:hi], bias[p % K], act)


@njit(**_JIT)
def _planes_serial(y, bias, act):
    """:func:`_planes` on the calling thread, for outputs too small to pay a parallel launch."""
    P = y.shape[0]
    K = bias.shape[0]
    for p in range(P):
        _apply(y[p], bias[p % K], act)


@parallel.kernel(always=True, **_JIT)
def _rows(y, bias, act):
    """y: (R, K) C-contiguous rows of K channels (channels_last); bias: (K,). Parallel over rows."""
    R, K = y.shape
    for r in prange(R):
        row = y[r]
        if act == 1:
            for k in range(K):
                v = row[k] + bias[k]
                row[k] = 0 if v < 0 else v
        elif act == 2:
            for k in range(K):
                v = row[k] + bias[k]
                row[k] = 0 if v < 0 else (6 if v > 6 else v)
        else:
            for k in range(K):
                row[k] = row[k] + bias[k]


def _channels_last(y: np.ndarray) -> bool:
    """(N, K, *S) whose memory is (N, *S, K) row-major."""
    order = (0, *range(2, y.ndim), 1)
    return y.transpose(order).flags.c_contiguous


@config.parallel_entry
def bias_act_(y: np.ndarray, bias: np.ndarray | None, activation: str) -> np.ndarray:
    """In place: ``y[n, k, ...] = act(y[n, k, ...] + bias[k])``; returns ``y``.

    Parameters
    ----------
    y : float32 or float64 array (N, K, *S), written in place (any strides; NCHW-contiguous and
        channels_last are processed without a copy).
    bias : array (K,) of ``y``'s dtype, or None (no bias: the activation alone).
    activation : one of :data:`ACTIVATIONS`.
    """
    act = ACTIVATIONS[activation]
    if y.size == 0:
        return y
    if y.ndim < 2:
        raise ValueError(f"bias_act_: y must be (N, K, *S), got shape {y.shape}")
    K = y.shape[1]
    if bias is None:
        if act == 0:
            return y
        b = np.zeros(K, y.dtype)
    else:
        b = np.ascontiguousarray(bias, dtype=y.dtype)
    if y.flags.c_contiguous and y.size <= SERIAL_MAX:
        _planes_serial(y.reshape(y.shape[0] * K, -1), b, act)
        return y
    threads = config.sync_threads()
    if y.flags.c_contiguous:
        planes = y.reshape(y.shape[0] * K, -1)
        L = planes.shape[1]
        # split planes only when there are too few of them to keep every thread busy
        chunks = 1 if planes.shape[0] >= 4 * threads else max(1, min(L // CHUNK, 4 * threads))
        _planes(planes, b, act, chunks)
    elif _channels_last(y):
        order = (0, *range(2, y.ndim), 1)
        _rows(y.transpose(order).reshape(-1, K), b, act)
    else:  # odd strides: a contiguous copy, processed and written back
        tmp = np.ascontiguousarray(y)
        bias_act_(tmp, b, activation)
        y[...] = tmp
    return y
