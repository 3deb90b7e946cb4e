"""Average pooling forward and backward (torch's ``AvgPoolKernel.cpp`` divisor rules and summation order).
Semantics: :mod:`fastconv.cpu.pool`.
"""
from __future__ import annotations

from fastconv import config  # first: picks Numba's threading layer before any parallel kernel runs

import numpy as np
from numba import njit, prange

from . import memory, parallel

from .pool_common import _JIT, _TAPS, _split_phases, _out_range, _check_geometry, _planes

# ----------------------------------------------------------------------------------------------------
# avg pool
# ----------------------------------------------------------------------------------------------------

#: Windows that all lie inside the input take :func:`_avg_pool_inside_kernel` (tests switch it off to compare).
INSIDE_FAST_PATH = True


@njit(inline="always", **_JIT)
def _avg_window(o, k, s, p, size):
    """torch's window arithmetic: (clipped start, clipped end, size within input+padding)."""
    start = o * s - p
    end = start + k
    if end > size + p:
        end = size + p
    pool = end - start
    if start < 0:
        start = 0
    if end > size:
        end = size
    return start, end, pool


# Sums keep torch's order exactly (no reassociation), so float32 results match torch's bit for bit
# where torch sums the same way; the loops vectorise along the output row, not across a sum.
_JIT_ORDERED = dict(cache=config.CACHE, fastmath=set())


@njit(**_JIT_ORDERED)
def _sum_interior(a0, q0, a1, q1, a2, q2, ntap, yrow, lo, hi):
    """``yrow[ow] += a0[ow+q0] (+ a1[ow+q1] (+ a2[ow+q2]))`` for ow in [lo, hi), in that order."""
    n = hi - lo
    ys = yrow[lo:hi]  # sliced so subscripts are provably >= 0: no wraparound, the loop vectorises
    b0 = a0[lo + q0:lo + q0 + n]
    if ntap == 1:
        for i in range(n):
            ys[i] = ys[i] + b0[i]
    elif ntap == 2:
        b1 = a1[lo + q1:lo + q1 + n]
        for i in range(n):
            ys[i] = (ys[i] + b0[i]) + b1[i]
    else:
        b1 = a1[lo + q1:lo + q1 + n]
        b2 = a2[lo + q2:lo + q2 + n]
        for i in range(n):
            ys[i] = ((ys[i] + b0[i]) + b1[i]) + b2[i]


@njit(**_JIT_ORDERED)
def _sum_taps_row(xrow, yrow, phases, sw, pw, kw):
    """Add taps ``k = 0..kw-1`` of one input row: ``yrow[ow] += xrow[ow*sw + k - pw]`` where in bounds."""
    W = xrow.shape[0]
    OW = yrow.shape[0]
    if sw > 1:
        _split_phases(xrow, phases, sw)
    for k0 in range(0, kw, _TAPS):
        ntap = min(_TAPS, kw - k0)
        off = k0 - pw
        last = off + ntap - 1
        lo, _ = _out_range(off, sw, W, OW)
        _, hi = _out_range(last, sw, W, OW)
        if lo > OW:
            lo = OW
        if hi < lo:
            hi = lo
        for ow in range(0, lo):
            for t in range(ntap):
                iw = ow * sw + off + t
                if iw >= 0 and iw < W:
                    yrow[ow] += xrow[iw]
        if hi > lo:
            if sw == 1:
                _sum_interior(xrow, off, xrow, off + 1, xrow, off + 2, ntap, yrow, lo, hi)
            else:
                _sum_interior(phases[off % sw], off // sw, phases[(off + 1) % sw], (off + 1) // sw,
                              phases[(off + 2) % sw], (off + 2) // sw, ntap, yrow, lo, hi)
        for ow in range(hi, OW):
            for t in range(ntap):
                iw = ow * sw + off + t
                if iw >= 0 and iw < W:
                    yrow[ow] += xrow[iw]


@parallel.kernel(work_arg=0, pool=True, **_JIT_ORDERED)
def _avg_pool_inside_kernel(x, y, kd, kh, kw, sd, sh, sw, div):
    """Average pooling whose windows all lie inside the input (no padding, no clipped ``ceil_mode`` window):
    ``y = (sum of the window, in torch's (d, h, w) row-major order from 0) / div``.

    Why a kernel of its own: the general one works a row of input at a time through helper calls, which a
    window of 2 columns cannot pay for (DenseNet's 2x2 stride-2 transitions at batch 8: 512 planes of 8x8
    took 4.3 ms against torch's 0.7)."""
    P = x.shape[0]
    OD, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    for p in prange(P):
        xp = x[p]
        acc = np.empty(OW, y.dtype)
        for od in range(OD):
            for oh in range(OH):
                # taps outermost, output columns innermost: each output still adds its window in (d, h, w)
                # order from 0, and the column loop vectorises
                for ow in range(OW):
                    acc[ow] = 0
                for a in range(kd):
                    for b in range(kh):
                        xr = xp[od * sd + a, oh * sh + b]
                        for c in range(kw):
                            for ow in range(OW):
                                acc[ow] += xr[ow * sw + c]
                yrow = y[p, od, oh]
                for ow in range(OW):
                    yrow[ow] = acc[ow] / div


@parallel.kernel(work_arg=0, pool=True, **_JIT_ORDERED)
def _avg_pool_tiling_backward_kernel(g, gx, kd, kh, kw, sd, sh, sw, div):
    """Input gradient of :func:`_avg_pool_inside_kernel` when the windows do not overlap (stride >= kernel in
    every dim): each input element gets at most one window's ``g / div``; each plane of ``gx`` is zeroed here
    first (the elements no window covers keep the zero)."""
    P = g.shape[0]
    OD, OH, OW = g.shape[1], g.shape[2], g.shape[3]
    for p in prange(P):
        gxp = gx[p]
        gxp[:, :, :] = 0  # by the task that writes the plane next, while it is in the task's cache
        for od in range(OD):
            for oh in range(OH):
                grow = g[p, od, oh]
                for ow in range(OW):
                    delta = grow[ow] / div
                    for a in range(kd):
                        for b in range(kh):
                            gxr = gxp[od * sd + a, oh * sh + b]
                            for c in range(kw):
                                gxr[ow * sw + c] = delta


def _inside_divisor(x_spatial, out_spatial, kernel, stride, padding, divisor_override):
    """The divisor when every window lies inside the input (then :func:`_avg_pool_inside_kernel` applies),
    else None. With no padding and no clipped window, torch divides by the window size whatever
    ``count_include_pad`` says."""
    if any(padding):
        return None
    if any((o - 1) * s + k > n for o, s, k, n in zip(out_spatial, stride, kernel, x_spatial)):
        return None
    return int(divisor_override) if divisor_override else int(np.prod(kernel))


@parallel.kernel(work_arg=0, pool=True, **_JIT)
def _avg_pool_kernel(x, y, kd, kh, kw, sd, sh, sw, pd, ph, pw, count_include_pad, divisor_override):
    P, D, H, W = x.shape
    OD, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    wcnt = np.empty(OW, dtype=np.int64)  # input columns in each window
    wfac = np.empty(OW, dtype=np.int64)  # the column factor of the divisor
    for ow in range(OW):
        w0, w1, pool_w = _avg_window(ow, kw, sw, pw, W)
        wcnt[ow] = w1 - w0
        wfac[ow] = pool_w if count_include_pad else w1 - w0
    for p in prange(P):
        xp = x[p]
        phases = np.empty((sw, (W + sw - 1) // sw), dtype=x.dtype)
        for od in range(OD):
            d0, d1, pool_d = _avg_window(od, kd, sd, pd, D)
            for oh in range(OH):
                h0, h1, pool_h = _avg_window(oh, kh, sh, ph, H)
                yrow = y[p, od, oh]
                for ow in range(OW):
                    yrow[ow] = 0
                if d0 >= d1 or h0 >= h1:
                    continue
                # same per-output summation order as torch: (d, h, w) row-major
                for idd in range(d0, d1):
                    for ih in range(h0, h1):
                        _sum_taps_row(xp[idd, ih], yrow, phases, sw, pw, kw)
                # the divisor is (row factor) * (per-column factor); a column with no input gives 0
                if divisor_override != 0:
                    for ow in range(OW):
                        yrow[ow] = yrow[ow] / divisor_override if wcnt[ow] > 0 else 0
                else:
                    rowf = pool_d * pool_h if count_include_pad else (d1 - d0) * (h1 - h0)
                    for ow in range(OW):
                        yrow[ow] = yrow[ow] / (rowf * wfac[ow]) if wcnt[ow] > 0 else 0


@parallel.kernel(work_arg=0, pool=True, **_JIT)
def _avg_pool_backward_kernel(g, gx, kd, kh, kw, sd, sh, sw, pd, ph, pw, count_include_pad,
                              divisor_override):
    P, D, H, W = gx.shape
    OD, OH, OW = g.shape[1], g.shape[2], g.shape[3]
    for p in prange(P):
        gxp = gx[p]
        gxp[:, :, :] = 0  # by the task that adds into the plane next, while it is in the task's cache
        delta = np.empty(OW, dtype=g.dtype)
        for od in range(OD):
            d0, d1, pool_d = _avg_window(od, kd, sd, pd, D)
            for oh in range(OH):
                h0, h1, pool_h = _avg_window(oh, kh, sh, ph, H)
                if d0 >= d1 or h0 >= h1:
                    continue
                grow = g[p, od, oh]
                for ow in range(OW):
                    w0, w1, pool_w = _avg_window(ow, kw, sw, pw, W)
                    if divisor_override != 0:
                        div = divisor_override
                    elif count_include_pad:
                        div = pool_d * pool_h * pool_w
                    else:
                        div = (d1 - d0) * (h1 - h0) * (w1 - w0)
                    if w0 >= w1:
                        delta[ow] = 0
                    else:
                        delta[ow] = grow[ow] / div
                for idd in range(d0, d1):
                    for ih in range(h0, h1):
                        gxrow = gxp[idd, ih]
                        # kw descending = ow ascending for any one input element: torch's order
                        for k in range(kw - 1, -1, -1):
                            off = k - pw
                            lo, hi = _out_range(off, sw, W, OW)
                            for ow in range(lo, hi):
                                gxrow[ow * sw + off] += delta[ow]


@config.parallel_entry
def avg_pool_forward(x, kernel, stride, padding, out_spatial, ceil_mode, count_include_pad,
                     divisor_override):
    """Average pooling, torch's ``avg_pool{1,2,3}d`` semantics.

    Parameters
    ----------
    x : ndarray (N, C, D, H, W), float32 or float64
    kernel, stride, padding : 3-tuples of int
    out_spatial : 3-tuple (OD, OH, OW), computed by the caller with torch's ceil_mode rule
    ceil_mode : bool. Accepted for symmetry with torch; the divisor rule needs no flag because torch
        clips every window to input + padding, which already covers ceil_mode's extra windows.
    count_include_pad : bool
    divisor_override : int or None; 0 means None

    Returns
    -------
    y : ndarray (N, C, OD, OH, OW)
    """
    del ceil_mode
    config.sync_threads()
    _check_geometry("avg_pool_forward", x, kernel, stride, padding, out_spatial)
    n, c = x.shape[:2]
    od, oh, ow = (int(v) for v in out_spatial)
    y = memory.empty_aligned((n * c, od, oh, ow), x.dtype)
    if y.size:
        kd, kh, kw = (int(v) for v in kernel)
        sd, sh, sw = (int(v) for v in stride)
        pd, ph, pw = (int(v) for v in padding)
        div = _inside_divisor(x.shape[2:], (od, oh, ow), (kd, kh, kw), (sd, sh, sw), (pd, ph, pw),
                              divisor_override)
        if div is not None and INSIDE_FAST_PATH:
            _avg_pool_inside_kernel(_planes(x), y, kd, kh, kw, sd, sh, sw, div)
        else:
            _avg_pool_kernel(_planes(x), y, kd, kh, kw, sd, sh, sw, pd, ph, pw, bool(count_include_pad),
                             int(divisor_override or 0))
    return y.reshape(n, c, od, oh, ow)


@config.parallel_entry
def avg_pool_backward(grad_out, kernel, stride, padding, in_spatial, ceil_mode, count_include_pad,
                      divisor_override):
    """Gradient of :func:`avg_pool_forward` w.r.t. its input.

    Parameters
    ----------
    grad_out : ndarray (N, C, OD, OH, OW)
    kernel, stride, padding : 3-tuples of int
    in_spatial : 3-tuple (D, H, W) of the forward input
    ceil_mode, count_include_pad, divisor_override : as in :func:`avg_pool_forward`

    Returns
    -------
    grad_x : ndarray (N, C, D, H, W)
    """
    del ceil_mode
    config.sync_threads()
    _check_geometry("avg_pool_backward", grad_out, kernel, stride, padding, in_spatial)
    n, c = grad_out.shape[:2]
    d, h, w = (int(v) for v in in_spatial)
    # each plane is zeroed by the kernel's task for it, right before its gradient goes in (see
    # pool_max.max_pool_backward_from_values)
    gx = memory.empty_aligned((n * c, d, h, w), grad_out.dtype)
    if not grad_out.size:
        gx.fill(0)
    elif gx.size:
        kd, kh, kw = (int(v) for v in kernel)
        sd, sh, sw = (int(v) for v in stride)
        pd, ph, pw = (int(v) for v in padding)
        div = _inside_divisor((d, h, w), grad_out.shape[2:], (kd, kh, kw), (sd, sh, sw), (pd, ph, pw),
                              divisor_override)
        if div is not None and INSIDE_FAST_PATH and sd >= kd and sh >= kh and sw >= kw:
            _avg_pool_tiling_backward_kernel(_planes(grad_out), gx, kd, kh, kw, sd, sh, sw, div)
        else:
            _avg_pool_backward_kernel(_planes(grad_out), gx, kd, kh, kw, sd, sh, sw, pd, ph, pw,
                                      bool(count_include_pad), int(divisor_override or 0))
    return gx.reshape(n, c, d, h, w)
