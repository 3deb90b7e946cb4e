"""Numba CPU kernels for the pooling ops (max, min, avg, adaptive avg/max, max_unpool), forward and backward.

numpy in, numpy out. Every kernel works on 5-D arrays ``(N, C, D, H, W)`` so one kernel serves 1-D, 2-D
and 3-D pooling: callers reshape (1-D: ``D = H = 1``; 2-D: ``D = 1``). Internally the ``N * C`` planes are
flattened into one axis and split over threads with ``prange``; each plane is processed one output row
at a time with the output row (``W``) as the innermost, vectorisable loop.

Semantics follow torch's CPU kernels exactly, including the visiting order inside a window (so ties give
the first index, a NaN wins and the *last* NaN in a window gives the index, and float sums are added in
the same order):

* max pool: ``if val > maxval or isnan(val)`` with ``maxval = -inf`` and ``maxindex`` = first in-bounds
  element of the window (``aten/src/ATen/native/cpu/MaxPoolKernel.cpp``);
* avg pool: ``divide_factor`` = ``divisor_override``, else the window clipped to input + padding
  (``count_include_pad``), else clipped to the input; a window with no input element gives 0
  (``AvgPoolKernel.cpp``);
* adaptive pools: ``start = floor(i * In / Out)``, ``end = ceil((i + 1) * In / Out)``; the average is
  ``sum / kd / kh / kw`` (``AdaptiveAvgPoolKernel.cpp``, ``AdaptiveMaxPoolKernel.cpp``);
* max_unpool: scatter into zeros, later elements of a plane overwrite earlier ones, an index outside
  the output plane is an error (``MaxUnpoolKernel.cpp``).

Geometry arguments are 3-tuples of ints ``(d, h, w)``. Indices are int64 flat offsets into one
``(D, H, W)`` plane, ``d * H * W + h * W + w``, as torch returns them.
"""
from __future__ import annotations

from fastconv import config  # first: picks Numba's threading layer before any parallel kernel runs

import numpy as np
from numba import njit, prange

__all__ = [
    "output_size",
    "max_pool_forward",
    "max_pool_backward",
    "min_pool_forward",
    "avg_pool_forward",
    "avg_pool_backward",
    "adaptive_avg_pool_forward",
    "adaptive_avg_pool_backward",
    "adaptive_max_pool_forward",
    "max_unpool_forward",
    "max_unpool_backward",
]

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


# ----------------------------------------------------------------------------------------------------
# max / min pool
# ----------------------------------------------------------------------------------------------------


@njit(parallel=True, **_JIT)
def _max_pool_kernel_generic(x, y, ind, kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, want_min, want_idx):
    """Max (or min) pooling of ``x`` (P, D, H, W) into ``y`` (P, OD, OH, OW); indices into ``ind``.

    The plain, any-size version (int64 throughout); used for planes of 2**31 elements or more, and
    as a cross-check of the fast kernels in the tests.

    ``ind`` is only touched when ``want_idx``. For every output the window is visited in
    (kd, kh, kw) row-major order, as torch does, so ties and NaNs pick the same element.
    """
    P, D, H, W = x.shape
    OD, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    HW = H * W
    init = np.inf if want_min else -np.inf
    for p in prange(P):
        xp = x[p]
        for od in range(OD):
            d_start = od * sd - pd
            d_first = _first_valid(d_start, dd)
            for oh in range(OH):
                h_start = oh * sh - ph
                h_first = _first_valid(h_start, dh)
                yrow = y[p, od, oh]
                for ow in range(OW):
                    yrow[ow] = init
                if want_idx:
                    irow = ind[p, od, oh]
                    row_ok = d_first < D and d_first < d_start + (kd - 1) * dd + 1 and \
                        h_first < H and h_first < h_start + (kh - 1) * dh + 1
                    for ow in range(OW):
                        w_start = ow * sw - pw
                        w_first = _first_valid(w_start, dw)
                        if row_ok and w_first < W and w_first < w_start + (kw - 1) * dw + 1:
                            irow[ow] = d_first * HW + h_first * W + w_first
                        else:
                            irow[ow] = -1
                for i in range(kd):
                    idd = d_start + i * dd
                    if idd < 0 or idd >= D:
                        continue
                    for j in range(kh):
                        ih = h_start + j * dh
                        if ih < 0 or ih >= H:
                            continue
                        xrow = xp[idd, ih]
                        base = idd * HW + ih * W
                        for k in range(kw):
                            off = k * dw - pw
                            lo, hi = _out_range(off, sw, W, OW)
                            if want_idx:
                                irow = ind[p, od, oh]
                                if want_min:
                                    for ow in range(lo, hi):
                                        # branch-free select: random data would mispredict
                                        iw = ow * sw + off
                                        v = xrow[iw]
                                        m = yrow[ow]
                                        take = (v < m) | (v != v)
                                        yrow[ow] = v if take else m
                                        irow[ow] = base + iw if take else irow[ow]
                                else:
                                    for ow in range(lo, hi):
                                        # branch-free select: random data would mispredict
                                        iw = ow * sw + off
                                        v = xrow[iw]
                                        m = yrow[ow]
                                        take = (v > m) | (v != v)
                                        yrow[ow] = v if take else m
                                        irow[ow] = base + iw if take else irow[ow]
                            else:
                                if want_min:
                                    for ow in range(lo, hi):
                                        v = xrow[ow * sw + off]
                                        m = yrow[ow]
                                        yrow[ow] = v if (v < m) | (v != v) else m
                                else:
                                    for ow in range(lo, hi):
                                        v = xrow[ow * sw + off]
                                        m = yrow[ow]
                                        yrow[ow] = v if (v > m) | (v != v) else m


# The fast path, about 10x faster than the generic kernel on 3x3/2 pooling. Three ideas:
# (1) up to three taps of one kernel row are applied per pass over the output row, with the running
#     max/argmax in registers;
# (2) a strided input row is first split into its `stride` phases (x[s*i + r] -> phase r), so every
#     tap becomes a unit-stride load at a runtime offset and LLVM vectorises along the output row for
#     any stride and dilation (with a runtime stride it does not, measured 12x slower);
# (3) the argmax is built as int32 (half the blend width of int64) and widened once per row.
# Planes of 2**31 elements or more take the generic kernel. A chunk with fewer than three taps repeats
# its last tap: applying the same element twice changes neither the max nor the argmax (NaN too).

_TAPS = 3


@njit(**_JIT)
def _ext_interior(a0, q0, c0, a1, q1, c1, a2, q2, c2, sw, yrow, yi, lo, hi, want_min, want_idx):
    """Outputs ``[lo, hi)``: tap t reads ``a_t[ow + q_t]``, flat input index ``c_t + sw * ow``.

    Everything is sliced to start at ``lo`` first: with provably non-negative subscripts Numba's
    negative-index wraparound disappears and LLVM vectorises the loop (it did not with ``ow + q``).
    """
    n = hi - lo
    b0 = a0[lo + q0:lo + q0 + n]
    b1 = a1[lo + q1:lo + q1 + n]
    b2 = a2[lo + q2:lo + q2 + n]
    ys = yrow[lo:hi]
    c0 += sw * lo
    c1 += sw * lo
    c2 += sw * lo
    if want_idx:
        yis = yi[lo:hi]
        if want_min:
            for i in range(n):
                m = ys[i]
                mi = yis[i]
                v = b0[i]
                t = (v < m) | (v != v)
                m = v if t else m
                mi = np.int32(c0 + sw * i) if t else mi
                v = b1[i]
                t = (v < m) | (v != v)
                m = v if t else m
                mi = np.int32(c1 + sw * i) if t else mi
                v = b2[i]
                t = (v < m) | (v != v)
                m = v if t else m
                mi = np.int32(c2 + sw * i) if t else mi
                ys[i] = m
                yis[i] = mi
        else:
            for i in range(n):
                m = ys[i]
                mi = yis[i]
                v = b0[i]
                t = (v > m) | (v != v)
                m = v if t else m
                mi = np.int32(c0 + sw * i) if t else mi
                v = b1[i]
                t = (v > m) | (v != v)
                m = v if t else m
                mi = np.int32(c1 + sw * i) if t else mi
                v = b2[i]
                t = (v > m) | (v != v)
                m = v if t else m
                mi = np.int32(c2 + sw * i) if t else mi
                ys[i] = m
                yis[i] = mi
    else:
        if want_min:
            for i in range(n):
                m = ys[i]
                v = b0[i]
                m = v if (v < m) | (v != v) else m
                v = b1[i]
                m = v if (v < m) | (v != v) else m
                v = b2[i]
                m = v if (v < m) | (v != v) else m
                ys[i] = m
        else:
            for i in range(n):
                m = ys[i]
                v = b0[i]
                m = v if (v > m) | (v != v) else m
                v = b1[i]
                m = v if (v > m) | (v != v) else m
                v = b2[i]
                m = v if (v > m) | (v != v) else m
                ys[i] = m


@njit(**_JIT)
def _ext_edge(xrow, yrow, yi, lo, hi, sw, off, dw, ntap, base, want_min, want_idx):
    """Outputs ``[lo, hi)`` near the row ends: each tap bounds-checked, still in tap order."""
    W = xrow.shape[0]
    for ow in range(lo, hi):
        m = yrow[ow]
        mi = yi[ow] if want_idx else np.int32(0)
        for t in range(ntap):
            iw = ow * sw + off + t * dw
            if iw >= 0 and iw < W:
                v = xrow[iw]
                if want_min:
                    take = (v < m) | (v != v)
                else:
                    take = (v > m) | (v != v)
                if take:
                    m = v
                    mi = np.int32(base + iw)
        yrow[ow] = m
        if want_idx:
            yi[ow] = mi


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


@njit(**_JIT)
def _ext_plane(xp, yp, ip, yi, phases, kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw,
               want_min, want_idx):
    """One (D, H, W) plane of max/min pooling. ``yi``: int32 row scratch; ``phases``: (sw, ceil(W/sw))."""
    D, H, W = xp.shape
    OD, OH, OW = yp.shape
    HW = H * W
    init = np.inf if want_min else -np.inf
    for od in range(OD):
        d_start = od * sd - pd
        d_first = _first_valid(d_start, dd)
        for oh in range(OH):
            h_start = oh * sh - ph
            h_first = _first_valid(h_start, dh)
            yrow = yp[od, oh]
            for ow in range(OW):
                yrow[ow] = init
            if want_idx:
                # torch's initial argmax: the window's first in-bounds element (-1: empty window)
                row_ok = d_first < D and d_first < d_start + (kd - 1) * dd + 1 and \
                    h_first < H and h_first < h_start + (kh - 1) * dh + 1
                for ow in range(OW):
                    w_start = ow * sw - pw
                    w_first = _first_valid(w_start, dw)
                    if row_ok and w_first < W and w_first < w_start + (kw - 1) * dw + 1:
                        yi[ow] = np.int32(d_first * HW + h_first * W + w_first)
                    else:
                        yi[ow] = np.int32(-1)
            for i in range(kd):
                idd = d_start + i * dd
                if idd < 0 or idd >= D:
                    continue
                for j in range(kh):
                    ih = h_start + j * dh
                    if ih < 0 or ih >= H:
                        continue
                    xrow = xp[idd, ih]
                    base = idd * HW + ih * W
                    if sw > 1:
                        _split_phases(xrow, phases, sw)
                    for k0 in range(0, kw, _TAPS):
                        ntap = min(_TAPS, kw - k0)
                        off = k0 * dw - pw
                        last = off + (ntap - 1) * dw
                        lo, _ = _out_range(off, sw, W, OW)    # first tap binds the left end
                        _, hi = _out_range(last, sw, W, OW)   # last tap binds the right end
                        if lo > OW:
                            lo = OW
                        if hi < lo:
                            hi = lo
                        _ext_edge(xrow, yrow, yi, 0, lo, sw, off, dw, ntap, base, want_min, want_idx)
                        if hi > lo:
                            o1 = off + dw if ntap > 1 else last
                            o2 = off + 2 * dw if ntap > 2 else last
                            if sw == 1:
                                a0 = a1 = a2 = xrow
                            else:
                                a0 = phases[off % sw]
                                a1 = phases[o1 % sw]
                                a2 = phases[o2 % sw]
                            _ext_interior(a0, off // sw, base + off, a1, o1 // sw, base + o1,
                                          a2, o2 // sw, base + o2, sw, yrow, yi, lo, hi,
                                          want_min, want_idx)
                        _ext_edge(xrow, yrow, yi, hi, OW, sw, off, dw, ntap, base, want_min, want_idx)
            if want_idx:
                irow = ip[od, oh]
                for ow in range(OW):
                    irow[ow] = yi[ow]


@njit(parallel=True, **_JIT)
def _max_pool_kernel(x, y, ind, kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, want_min, want_idx):
    """Max (or min) pooling of ``x`` (P, D, H, W) into ``y`` (P, OD, OH, OW), int64 indices into
    ``ind`` (P, OD, OH, OW) when ``want_idx`` (else ``ind`` is a dummy (1, 1, 1, 1))."""
    W = x.shape[3]
    for p in prange(x.shape[0]):
        yi = np.empty(y.shape[3], dtype=np.int32)
        phases = np.empty((sw, (W + sw - 1) // sw), dtype=x.dtype)
        ip = ind[p] if want_idx else ind[0]
        _ext_plane(x[p], y[p], ip, yi, phases, kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw,
                   want_min, want_idx)


@njit(parallel=True, **_JIT)
def _max_pool_backward_kernel(g, ind, gx, bad):
    """Scatter-add ``g`` (P, M) into ``gx`` (P, S) at ``ind`` (P, M); flags other out-of-range indices."""
    P, M = g.shape
    S = gx.shape[1]
    for p in prange(P):
        gp = g[p]
        ip = ind[p]
        gxp = gx[p]
        for m in range(M):
            idx = ip[m]
            if idx >= 0 and idx < S:
                gxp[idx] += gp[m]
            elif idx != -1:
                bad[p] = True


#: Integer dtypes max/min pooling accepts (torch's max_pool does; forward only, no NaN rule needed).
_INTEGER_DTYPES = (np.uint8, np.int8, np.int16, np.int32, np.int64)


@njit(parallel=True, **_JIT)
def _extreme_pool_int_kernel(x, y, ind, kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, init, want_min, want_idx):
    """Max (or min) pooling of an integer ``x`` (P, D, H, W) into ``y`` (P, OD, OH, OW), indices into ``ind``.

    torch's integer rule: the window's first in-bounds element starts the running max (so ties and a
    window full of the dtype's lowest value give the first index), then strictly larger values replace it.
    A plain loop nest: integer pooling is for masks and label maps, not the hot path.
    """
    P, D, H, W = x.shape
    OD, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    HW = H * W
    for p in prange(P):
        for od in range(OD):
            d0 = od * sd - pd
            for oh in range(OH):
                h0 = oh * sh - ph
                for ow in range(OW):
                    w0 = ow * sw - pw
                    m = init
                    mi = -1
                    for i in range(kd):
                        idd = d0 + i * dd
                        if idd < 0 or idd >= D:
                            continue
                        for j in range(kh):
                            ih = h0 + j * dh
                            if ih < 0 or ih >= H:
                                continue
                            for k in range(kw):
                                iw = w0 + k * dw
                                if iw < 0 or iw >= W:
                                    continue
                                v = x[p, idd, ih, iw]
                                if mi < 0 or ((v < m) if want_min else (v > m)):
                                    m = v
                                    mi = idd * HW + ih * W + iw
                    y[p, od, oh, ow] = m
                    if want_idx:
                        ind[p, od, oh, ow] = mi


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


@config.parallel_entry
def _pool_extreme(name, x, kernel, stride, padding, dilation, out_spatial, return_indices, want_min):
    config.sync_threads()
    _check_geometry(name, x, kernel, stride, padding, dilation, out_spatial, integers=True)
    n, c = x.shape[:2]
    od, oh, ow = (int(v) for v in out_spatial)
    y = np.empty((n * c, od, oh, ow), dtype=x.dtype)
    ind = np.empty((n * c, od, oh, ow) if return_indices else (1, 1, 1, 1), dtype=np.int64)
    if y.size:
        kd, kh, kw = (int(v) for v in kernel)
        sd, sh, sw = (int(v) for v in stride)
        pd, ph, pw = (int(v) for v in padding)
        dd, dh, dw = (int(v) for v in dilation)
        xp = _planes(x)
        geo = (kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw)
        if x.dtype.kind in "iu":
            info = np.iinfo(x.dtype)
            init = x.dtype.type(info.max if want_min else info.min)
            _extreme_pool_int_kernel(xp, y, ind, *geo, init, bool(want_min), bool(return_indices))
        elif x.shape[2] * x.shape[3] * x.shape[4] >= _INT32_PLANE_LIMIT:
            _max_pool_kernel_generic(xp, y, ind, *geo, bool(want_min), bool(return_indices))
        else:
            _max_pool_kernel(xp, y, ind, *geo, bool(want_min), bool(return_indices))
    y = y.reshape(n, c, od, oh, ow)
    return y, (ind.reshape(n, c, od, oh, ow) if return_indices else None)


def max_pool_forward(x, kernel, stride, padding, dilation, out_spatial, return_indices):
    """Max pooling, torch's ``max_pool{1,2,3}d`` semantics.

    Parameters
    ----------
    x : ndarray (N, C, D, H, W), float32 or float64, or an integer dtype (uint8, int8-int64)
    kernel, stride, padding, dilation : 3-tuples of int (``padding`` = implicit -inf before and after)
    out_spatial : 3-tuple (OD, OH, OW), computed by the caller (ceil_mode applied there)
    return_indices : bool

    Returns
    -------
    y : ndarray (N, C, OD, OH, OW), same dtype as ``x``
    indices : int64 ndarray (N, C, OD, OH, OW) of flat offsets ``d*H*W + h*W + w`` into the input
        plane, or None when ``return_indices`` is false. NaN is treated as the maximum (the last NaN
        of a window gives the index); ties give the first element in (d, h, w) order.
    """
    return _pool_extreme("max_pool_forward", x, kernel, stride, padding, dilation, out_spatial,
                         return_indices, False)


def min_pool_forward(x, kernel, stride, padding, dilation, out_spatial, return_indices):
    """Min pooling: equal to ``-max_pool_forward(-x)`` (values and indices), without negating copies.

    Same parameters and returns as :func:`max_pool_forward`.
    """
    return _pool_extreme("min_pool_forward", x, kernel, stride, padding, dilation, out_spatial,
                         return_indices, True)


@config.parallel_entry
def max_pool_backward(grad_out, indices, in_spatial):
    """Gradient of max/min/adaptive-max pooling: scatter-add ``grad_out`` at ``indices``.

    Parameters
    ----------
    grad_out : ndarray (N, C, OD, OH, OW)
    indices : int64 ndarray, same shape, flat offsets into an input plane
    in_spatial : 3-tuple (D, H, W) of the input

    Returns
    -------
    grad_x : ndarray (N, C, D, H, W), same dtype as ``grad_out``. Index -1 (empty-window guard) is
        skipped; any other index outside the plane raises ``RuntimeError``.
    """
    config.sync_threads()
    _check_geometry("max_pool_backward", grad_out, in_spatial)
    if indices.shape != grad_out.shape:
        raise ValueError(f"max_pool_backward: indices shape {indices.shape} != grad_out shape "
                         f"{grad_out.shape}")
    n, c = grad_out.shape[:2]
    d, h, w = (int(v) for v in in_spatial)
    gx = np.zeros((n * c, d * h * w), dtype=grad_out.dtype)
    if gx.size and grad_out.size:
        bad = np.zeros(n * c, dtype=np.bool_)
        _max_pool_backward_kernel(np.ascontiguousarray(grad_out).reshape(n * c, -1),
                                  np.ascontiguousarray(indices, dtype=np.int64).reshape(n * c, -1),
                                  gx, bad)
        if bad.any():
            raise RuntimeError(f"max_pool_backward: found an index outside [0, {d * h * w}) "
                               f"(input plane {d}x{h}x{w})")
    return gx.reshape(n, c, d, h, w)


# ----------------------------------------------------------------------------------------------------
# avg pool
# ----------------------------------------------------------------------------------------------------


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


@njit(parallel=True, **_JIT)
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


@njit(parallel=True, **_JIT)
def _avg_pool_backward_kernel(g, gx, kd, kh, kw, sd, sh, sw, pd, ph, pw, count_include_pad,
                              divisor_override):
    P, D, H, W = gx.shape
    OD, OH, OW = g.shape[1], g.shape[2], g.shape[3]
    for p in prange(P):
        gxp = gx[p]
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
    y = np.empty((n * c, od, oh, ow), dtype=x.dtype)
    if y.size:
        kd, kh, kw = (int(v) for v in kernel)
        sd, sh, sw = (int(v) for v in stride)
        pd, ph, pw = (int(v) for v in padding)
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
    gx = np.zeros((n * c, d, h, w), dtype=grad_out.dtype)
    if gx.size and grad_out.size:
        kd, kh, kw = (int(v) for v in kernel)
        sd, sh, sw = (int(v) for v in stride)
        pd, ph, pw = (int(v) for v in padding)
        _avg_pool_backward_kernel(_planes(grad_out), gx, kd, kh, kw, sd, sh, sw, pd, ph, pw,
                                  bool(count_include_pad), int(divisor_override or 0))
    return gx.reshape(n, c, d, h, w)


# ----------------------------------------------------------------------------------------------------
# adaptive pools
# ----------------------------------------------------------------------------------------------------


@njit(parallel=True, **_JIT)
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


@njit(parallel=True, **_JIT)
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


@njit(parallel=True, **_JIT)
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


@njit(parallel=True, **_JIT)
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


@njit(parallel=True, **_JIT)
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


def _check_adaptive(name, x, out_spatial):
    if any(int(v) < 0 for v in out_spatial):
        raise ValueError(f"{name}: out_spatial must be >= 0, got {tuple(out_spatial)}")
    if x.shape[0] * x.shape[1] and any(int(v) > 0 for v in out_spatial) and \
            any(s == 0 for s in x.shape[2:]):
        raise ValueError(f"{name}: input spatial size {x.shape[2:]} has a zero dimension; "
                         f"expected every spatial dimension >= 1")


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
    y = np.empty((n * c, od, oh, ow), dtype=x.dtype)
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
        gx = np.empty((n * c, d, h, w), dtype=grad_out.dtype)
        if gx.size:
            _adaptive_avg_global_backward_kernel(np.ascontiguousarray(grad_out).reshape(n * c), gx)
        return gx.reshape(n, c, d, h, w)
    gx = np.zeros((n * c, d, h, w), dtype=grad_out.dtype)
    if gx.size and grad_out.size:
        _adaptive_avg_backward_kernel(_planes(grad_out), gx)
    return gx.reshape(n, c, d, h, w)


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
    y = np.empty((n * c, od, oh, ow), dtype=x.dtype)
    _check_adaptive("adaptive_max_pool_forward", x, out_spatial)
    ind = np.empty((n * c, od, oh, ow), dtype=np.int64)
    if y.size:
        _adaptive_max_kernel(_planes(x), y, ind)
    return y.reshape(n, c, od, oh, ow), ind.reshape(n, c, od, oh, ow)


# ----------------------------------------------------------------------------------------------------
# max_unpool
# ----------------------------------------------------------------------------------------------------


@njit(parallel=True, **_JIT)
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


@njit(parallel=True, **_JIT)
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
    y = np.zeros((n * c, size), dtype=x.dtype)
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
