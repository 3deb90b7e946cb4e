"""max_unpool forward (scatter into zeros, later elements overwrite earlier ones) and backward (gather at
the indices); an index outside the output plane is an error (torch's ``MaxUnpoolKernel.cpp``).
"""
from __future__ import annotations

from fastconv import config  # first: picks Numba's threading layer before any parallel kernel runs

import numpy as np
from numba import prange

from . import memory, parallel

from .pool_common import _JIT, _check_geometry

# ----------------------------------------------------------------------------------------------------
# max_unpool
# ----------------------------------------------------------------------------------------------------


@parallel.kernel(work_arg=0, pool=True, **_JIT)
def _max_unpool_kernel(x, ind, y, bad):
    """Scatter ``x`` (P, M) into zeroed ``y`` (P, S) at ``ind``; ``bad[p]`` = first bad position + 1."""
    P, M = x.shape
    S = y.shape[1]
    for p in prange(P):
        xp = x[p]
        ip = ind[p]
        yp = y[p]
        for m in range(M):
            idx = ip[m]
            if idx < 0 or idx >= S:
                bad[p] = m + 1
                break
            yp[idx] = xp[m]


@parallel.kernel(work_arg=0, pool=True, **_JIT)
def _max_unpool_backward_kernel(g, ind, gx, bad):
    """Gather ``gx[p, m] = g[p, ind[p, m]]``; ``bad[p]`` = first bad position + 1."""
    P, M = gx.shape
    S = g.shape[1]
    for p in prange(P):
        gp = g[p]
        ip = ind[p]
        gxp = gx[p]
        for m in range(M):
            idx = ip[m]
            if idx < 0 or idx >= S:
                bad[p] = m + 1
                gxp[m] = 0
            else:
                gxp[m] = gp[idx]


def _unpool_error(name, bad, ind2, size):
    p = int(np.flatnonzero(bad)[0])
    m = int(bad[p]) - 1
    raise RuntimeError(f"{name}: found an invalid max index: {int(ind2[p, m])} (output volume is "
                       f"of size {size}, expected 0 <= index < {size})")


@config.parallel_entry
def max_unpool_forward(x, indices, out_spatial):
    """Partial inverse of max pooling, torch's ``max_unpool{1,2,3}d`` semantics.

    Parameters
    ----------
    x : ndarray (N, C, D, H, W)
    indices : int64 ndarray, same shape, flat offsets into an output plane
    out_spatial : 3-tuple (OD, OH, OW)

    Returns
    -------
    y : ndarray (N, C, OD, OH, OW): zeros with ``x`` scattered at ``indices``. On duplicate indices
        the later element of a plane wins, always (torch's own CPU kernel splits a plane over threads,
        so its result then depends on timing; on one thread it is the same as ours). An index outside
        the output plane raises ``RuntimeError``.
    """
    config.sync_threads()
    _check_geometry("max_unpool_forward", x, out_spatial)
    if indices.shape != x.shape:
        raise ValueError(f"max_unpool_forward: indices shape {indices.shape} != input shape {x.shape}")
    n, c = x.shape[:2]
    od, oh, ow = (int(v) for v in out_spatial)
    size = od * oh * ow
    y = memory.zeros((n * c, size), dtype=x.dtype)
    if x.size:
        bad = np.zeros(n * c, dtype=np.int64)
        ind2 = np.ascontiguousarray(indices, dtype=np.int64).reshape(n * c, -1)
        _max_unpool_kernel(np.ascontiguousarray(x).reshape(n * c, -1), ind2, y, bad)
        if bad.any():
            _unpool_error("max_unpool_forward", bad, ind2, size)
    return y.reshape(n, c, od, oh, ow)


@config.parallel_entry
def max_unpool_backward(grad_out, indices):
    """Gradient of :func:`max_unpool_forward` w.r.t. its input: gather ``grad_out`` at ``indices``.

    Parameters
    ----------
    grad_out : ndarray (N, C, OD, OH, OW)
    indices : int64 ndarray (N, C, D, H, W), as passed to the forward

    Returns
    -------
    grad_x : ndarray (N, C, D, H, W), same dtype as ``grad_out``
    """
    config.sync_threads()
    _check_geometry("max_unpool_backward", grad_out)
    if indices.ndim != 5 or indices.shape[:2] != grad_out.shape[:2]:
        raise ValueError(f"max_unpool_backward: indices shape {indices.shape} does not match "
                         f"grad_out shape {grad_out.shape} in (N, C)")
    n, c = grad_out.shape[:2]
    gx = np.empty(indices.shape, dtype=grad_out.dtype)
    if gx.size:
        size = int(np.prod(grad_out.shape[2:]))
        bad = np.zeros(n * c, dtype=np.int64)
        ind2 = np.ascontiguousarray(indices, dtype=np.int64).reshape(n * c, -1)
        _max_unpool_backward_kernel(np.ascontiguousarray(grad_out).reshape(n * c, size), ind2,
                                    gx.reshape(n * c, -1), bad)
        if bad.any():
            _unpool_error("max_unpool_backward", bad, ind2, size)
    return gx
