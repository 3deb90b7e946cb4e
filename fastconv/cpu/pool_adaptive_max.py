"""Adaptive max pooling with indices (torch's ``AdaptiveMaxPoolKernel.cpp``: a NaN wins, ties give the
first index). Its backward is max_pool_backward (:mod:`.pool_max`). Semantics: :mod:`fastconv.cpu.pool`.
"""
from __future__ import annotations

from fastconv import config  # first: picks Numba's threading layer before any parallel kernel runs

import numpy as np
from numba import prange

from . import memory, parallel

from .pool_common import _JIT, _adaptive_start, _adaptive_end, _check_geometry, _planes, _check_adaptive

@parallel.kernel(work_arg=0, pool=True, **_JIT)
def _adaptive_max_kernel(x, y, ind):
    P, D, H, W = x.shape
    OD, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    HW = H * W
    for p in prange(P):
        xp = x[p]
        for od in range(OD):
            d0 = _adaptive_start(od, D, OD)
            d1 = _adaptive_end(od, D, OD)
            for oh in range(OH):
                h0 = _adaptive_start(oh, H, OH)
                h1 = _adaptive_end(oh, H, OH)
                yrow = y[p, od, oh]
                irow = ind[p, od, oh]
                for ow in range(OW):
                    yrow[ow] = -np.inf
                    irow[ow] = d0 * HW + h0 * W + _adaptive_start(ow, W, OW)
                for idd in range(d0, d1):
                    for ih in range(h0, h1):
                        xrow = xp[idd, ih]
                        base = idd * HW + ih * W
                        for ow in range(OW):
                            w0 = _adaptive_start(ow, W, OW)
                            w1 = _adaptive_end(ow, W, OW)
                            m = yrow[ow]
                            mi = irow[ow]
                            for iw in range(w0, w1):
                                v = xrow[iw]
                                if (v > m) | (v != v):
                                    m = v
                                    mi = base + iw
                            yrow[ow] = m
                            irow[ow] = mi


@config.parallel_entry
def adaptive_max_pool_forward(x, out_spatial):
    """Adaptive max pooling, torch's ``adaptive_max_pool{1,2,3}d(..., return_indices=True)``.

    Parameters
    ----------
    x : ndarray (N, C, D, H, W), float32 or float64
    out_spatial : 3-tuple (OD, OH, OW)

    Returns
    -------
    y : ndarray (N, C, OD, OH, OW)
    indices : int64 ndarray (N, C, OD, OH, OW), flat offsets into the input plane; the backward is
        :func:`max_pool_backward`.
    """
    config.sync_threads()
    _check_geometry("adaptive_max_pool_forward", x, out_spatial)
    n, c = x.shape[:2]
    od, oh, ow = (int(v) for v in out_spatial)
    y = memory.empty_aligned((n * c, od, oh, ow), x.dtype)
    _check_adaptive("adaptive_max_pool_forward", x, out_spatial)
    ind = np.empty((n * c, od, oh, ow), dtype=np.int64)
    if y.size:
        _adaptive_max_kernel(_planes(x), y, ind)
    return y.reshape(n, c, od, oh, ow), ind.reshape(n, c, od, oh, ow)
