"""Adaptive average pooling forward and backward (``start = floor(i*In/Out)``, ``end = ceil((i+1)*In/Out)``;
torch's ``AdaptiveAvgPoolKernel.cpp``). Semantics: :mod:`fastconv.cpu.pool`.
"""
from __future__ import annotations

from fastconv import config  # first: picks Numba's threading layer before any parallel kernel runs

import numpy as np
from numba import prange

from . import memory, parallel

from .pool_common import _JIT, _adaptive_start, _adaptive_end, _check_geometry, _planes, _check_adaptive

# ----------------------------------------------------------------------------------------------------
# adaptive pools
# ----------------------------------------------------------------------------------------------------


@parallel.kernel(work_arg=0, pool=True, **_JIT)
def _adaptive_avg_global_kernel(x, y):
    """Output 1x1x1: one sum per plane (contiguous, vectorised); divided as torch divides (see below)."""
    P, D, H, W = x.shape
    M = D * H * W
    xf = x.reshape(P, M)
    for p in prange(P):
        xp = xf[p]
        s = xp[0]  # M >= 1 (checked by the caller); keeps the accumulator in x's dtype, like torch
        for m in range(1, M):
            s += xp[m]
        if D == 1:
            y[p] = s / M  # torch computes a 1x1 adaptive_avg_pool{1,2}d as mean(): one division
        else:
            y[p] = s / D / H / W


@parallel.kernel(work_arg=0, pool=True, **_JIT)
def _adaptive_avg_global_backward_kernel(g, gx):
    """Output 1x1x1: broadcast ``g / size`` over each plane (written, not accumulated: no zero fill)."""
    P, D, H, W = gx.shape
    M = D * H * W
    gxf = gx.reshape(P, M)
    for p in prange(P):
        if D == 1:
            dv = g[p] / M  # mean()'s backward, as torch uses for 1x1 adaptive_avg_pool{1,2}d
        else:
            dv = g[p] / D / H / W
        gxp = gxf[p]
        for m in range(M):
            gxp[m] = dv


@parallel.kernel(work_arg=0, pool=True, **_JIT)
def _adaptive_avg_kernel(x, y):
    P, D, H, W = x.shape
    OD, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    for p in prange(P):
        xp = x[p]
        for od in range(OD):
            d0 = _adaptive_start(od, D, OD)
            d1 = _adaptive_end(od, D, OD)
            for oh in range(OH):
                h0 = _adaptive_start(oh, H, OH)
                h1 = _adaptive_end(oh, H, OH)
                yrow = y[p, od, oh]
                for ow in range(OW):
                    yrow[ow] = 0
                for idd in range(d0, d1):
                    for ih in range(h0, h1):
                        xrow = xp[idd, ih]
                        for ow in range(OW):
                            w0 = _adaptive_start(ow, W, OW)
                            w1 = _adaptive_end(ow, W, OW)
                            s = yrow[ow]
                            for iw in range(w0, w1):
                                s += xrow[iw]
                            yrow[ow] = s
                for ow in range(OW):
                    w0 = _adaptive_start(ow, W, OW)
                    w1 = _adaptive_end(ow, W, OW)
                    yrow[ow] = yrow[ow] / (d1 - d0) / (h1 - h0) / (w1 - w0)


@parallel.kernel(work_arg=0, pool=True, **_JIT)
def _adaptive_avg_backward_kernel(g, gx):
    P, D, H, W = gx.shape
    OD, OH, OW = g.shape[1], g.shape[2], g.shape[3]
    for p in prange(P):
        gxp = gx[p]
        delta = np.empty(OW, dtype=g.dtype)
        for od in range(OD):
            d0 = _adaptive_start(od, D, OD)
            d1 = _adaptive_end(od, D, OD)
            for oh in range(OH):
                h0 = _adaptive_start(oh, H, OH)
                h1 = _adaptive_end(oh, H, OH)
                grow = g[p, od, oh]
                for ow in range(OW):
                    w0 = _adaptive_start(ow, W, OW)
                    w1 = _adaptive_end(ow, W, OW)
                    delta[ow] = grow[ow] / (d1 - d0) / (h1 - h0) / (w1 - w0)
                for idd in range(d0, d1):
                    for ih in range(h0, h1):
                        gxrow = gxp[idd, ih]
                        for ow in range(OW):
                            w0 = _adaptive_start(ow, W, OW)
                            w1 = _adaptive_end(ow, W, OW)
                            dv = delta[ow]
                            for iw in range(w0, w1):
                                gxrow[iw] += dv


@config.parallel_entry
def adaptive_avg_pool_forward(x, out_spatial):
    """Adaptive average pooling, torch's ``adaptive_avg_pool{1,2,3}d`` semantics.

    Parameters
    ----------
    x : ndarray (N, C, D, H, W), float32 or float64
    out_spatial : 3-tuple (OD, OH, OW), each >= 1 (or the input is empty)

    Returns
    -------
    y : ndarray (N, C, OD, OH, OW); window ``[floor(i*In/Out), ceil((i+1)*In/Out))`` per dim,
        averaged as ``sum / kd / kh / kw`` like torch.
    """
    config.sync_threads()
    _check_geometry("adaptive_avg_pool_forward", x, out_spatial)
    n, c = x.shape[:2]
    od, oh, ow = (int(v) for v in out_spatial)
    _check_adaptive("adaptive_avg_pool_forward", x, out_spatial)
    y = memory.empty_aligned((n * c, od, oh, ow), x.dtype)
    if y.size:
        xp = _planes(x)
        if od == oh == ow == 1:
            _adaptive_avg_global_kernel(xp, y.reshape(n * c))
        else:
            _adaptive_avg_kernel(xp, y)
    return y.reshape(n, c, od, oh, ow)


@config.parallel_entry
def adaptive_avg_pool_backward(grad_out, in_spatial):
    """Gradient of :func:`adaptive_avg_pool_forward`.

    Parameters
    ----------
    grad_out : ndarray (N, C, OD, OH, OW)
    in_spatial : 3-tuple (D, H, W) of the forward input

    Returns
    -------
    grad_x : ndarray (N, C, D, H, W)
    """
    config.sync_threads()
    _check_geometry("adaptive_avg_pool_backward", grad_out, in_spatial)
    n, c = grad_out.shape[:2]
    d, h, w = (int(v) for v in in_spatial)
    if grad_out.shape[2:] == (1, 1, 1):
        gx = memory.empty_aligned((n * c, d, h, w), grad_out.dtype)
        if gx.size:
            _adaptive_avg_global_backward_kernel(np.ascontiguousarray(grad_out).reshape(n * c), gx)
        return gx.reshape(n, c, d, h, w)
    gx = memory.zeros((n * c, d, h, w), dtype=grad_out.dtype)
    if gx.size and grad_out.size:
        _adaptive_avg_backward_kernel(_planes(grad_out), gx)
    return gx.reshape(n, c, d, h, w)
