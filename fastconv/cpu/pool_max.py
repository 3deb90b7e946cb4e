"""Max and min pooling with argmax indices, and its backward (scatter-add at the indices); also integer
dtypes (forward only). Semantics: :mod:`fastconv.cpu.pool` (torch's ``MaxPoolKernel.cpp`` visiting order:
ties give the first index, a NaN wins).
"""
from __future__ import annotations

from fastconv import config  # first: picks Numba's threading layer before any parallel kernel runs

import numpy as np
from numba import njit, prange

from . import memory, parallel

from .pool_common import (_INT32_PLANE_LIMIT, _JIT, _TAPS, _check_geometry, _first_valid, _out_range, _planes,
                          _split_phases)

# ----------------------------------------------------------------------------------------------------
# max / min pool
# ----------------------------------------------------------------------------------------------------


@parallel.kernel(work_arg=0, pool=True, **_JIT)
def _max_pool_kernel_generic(x, y, ind, kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, want_min, want_idx):
    """Max (or min) pooling of ``x`` (P, D, H, W) into ``y`` (P, OD, OH, OW); indices into ``ind``.

    The plain, any-size version (int64 throughout); used for narrow planes (:data:`VECTOR_MIN_WIDTH`), for
    planes of 2**31 elements or more, and as a cross-check of the row-vectorised kernel in the tests.

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



@njit(inline="always", **_JIT)
def _takes(v, m, want_min):
    """Whether ``v`` replaces the running extreme ``m``: strictly more extreme, or NaN (torch's rule: ties keep
    the first element, the last NaN wins). Loops that must vectorise spell the rule out with ``want_min``
    hoisted out of the loop instead."""
    return ((v < m) if want_min else (v > m)) | (v != v)


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
                if _takes(v, m, want_min):
                    m = v
                    mi = np.int32(base + iw)
        yrow[ow] = m
        if want_idx:
            yi[ow] = mi


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


@parallel.kernel(work_arg=0, pool=True, **_JIT)
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


@parallel.kernel(work_arg=0, pool=True, **_JIT)
def _max_pool_backward_kernel(g, ind, gx, bad):
    """Scatter-add ``g`` (P, M) into ``gx`` (P, S) at ``ind`` (P, M), each plane of ``gx`` zeroed first (by the
    task that then adds into it, while the plane is in its cache); flags other out-of-range indices."""
    P, M = g.shape
    S = gx.shape[1]
    for p in prange(P):
        gp = g[p]
        ip = ind[p]
        gxp = gx[p]
        for s in range(S):
            gxp[s] = 0
        for m in range(M):
            idx = ip[m]
            if idx >= 0 and idx < S:
                gxp[idx] += gp[m]
            elif idx != -1:
                bad[p] = True



@parallel.kernel(work_arg=0, pool=True, **_JIT)
def _max_pool_backward_values_kernel(x, y, g, gx, kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, want_min):
    """Gradient of max (or min) pooling from the pooled values instead of indices: ``g`` (P, OD, OH, OW) is added
    into ``gx`` (P, D, H, W; each plane zeroed here first) at the element of ``x`` (P, D, H, W) that the indexed kernels would have
    picked for the value ``y`` (P, OD, OH, OW): the first element of the window equal to it in (d, h, w) order,
    or the window's last NaN when it is NaN (torch's rule: ties keep the first, the last NaN wins; a window of
    -inf picks its first element, as the indexed kernels' initial argmax does). ``want_min`` changes nothing
    here (the value is found either way); it keeps the forward kernels' signature.

    A plain search that stops at the first equal element. Tried and slower (ResNet's 3x3/2 pool of 8 x 64 x
    64x64, 2 threads): the taps clipped to the plane once per output, 8.5 -> 10 ms; the taps visited last to
    first over whole output rows with a select per output (branch-free), 12.9 ms."""
    P, D, H, W = x.shape
    OD, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    for p in prange(P):
        xp = x[p]
        gxp = gx[p]
        gxp[:, :, :] = 0  # by the task that adds into the plane next, while it is in the task's cache
        for od in range(OD):
            d0 = od * sd - pd
            for oh in range(OH):
                h0 = oh * sh - ph
                for ow in range(OW):
                    w0 = ow * sw - pw
                    target = y[p, od, oh, ow]
                    nan = target != target
                    fd = -1
                    fh = 0
                    fw = 0
                    found = False
                    for i in range(kd):
                        idd = d0 + i * dd
                        if idd < 0 or idd >= D:
                            continue
                        for j in range(kh):
                            ih = h0 + j * dh
                            if ih < 0 or ih >= H:
                                continue
                            xrow = xp[idd, ih]
                            for k in range(kw):
                                iw = w0 + k * dw
                                if iw < 0 or iw >= W:
                                    continue
                                v = xrow[iw]
                                if nan:
                                    if v != v:  # keep looking: the last NaN wins
                                        fd = idd
                                        fh = ih
                                        fw = iw
                                elif v == target:
                                    fd = idd
                                    fh = ih
                                    fw = iw
                                    found = True
                                    break
                            if found:
                                break
                        if found:
                            break
                    if fd >= 0:
                        gxp[fd, fh, fw] += g[p, od, oh, ow]


@njit(inline="always", **_JIT)
def _window_search(xf, plane, H, W, h0, w0, kh, kw, dh, dw, target):
    """Flat offset in ``xf`` of the element of the window at ``(h0, w0)`` (plane offset ``plane``) that the indexed
    kernels pick for the pooled value ``target`` (the rule of :func:`_max_pool_backward_values_kernel`: the first
    equal element in (h, w) order, the last NaN for a NaN), or -1 if none; taps outside the plane are skipped."""
    found = -1
    nan = target != target
    for j in range(kh):
        ih = h0 + j * dh
        if ih < 0 or ih >= H:
            continue
        for k in range(kw):
            iw = w0 + k * dw
            if iw < 0 or iw >= W:
                continue
            off = plane + ih * W + iw
            v = xf[off]
            if nan:
                if v != v:
                    found = off
            elif v == target:
                return off
    return found


def _values_backward_2d(KH: int, KW: int):
    """The 2-D max/min pooling gradient from values (:func:`_max_pool_backward_values_kernel`'s result) for
    ``KH x KW`` windows, the window size a compile-time constant: inside the plane each output's window is
    searched with a select per tap, last to first, so the first equal element wins without a branch per tap;
    a window that crosses the plane's edge, or holds no equal element (a NaN value), takes
    :func:`_window_search`. Why: the general kernel's search loops (sizes known only at run time, a branch per
    tap that the data decides) took 4.2-6.5 ms on ResNet's 3x3/2 pool of 8 x 64 x 64x64 (2 threads), where
    torch's indexed backward takes 0.6-1.1; this form takes 2.1-2.3 (the search alone 1.1; at run-time sizes
    3.5)."""

    @parallel.kernel(work_arg=0, pool=True, **_JIT)
    def kernel(x, y, g, gx, sh, sw, ph, pw, dh, dw):
        """x, gx: (P, H, W) C-contiguous (gx written, each plane zeroed by its task first); y, g: (P, OH, OW)."""
        P, H, W = x.shape
        OH, OW = y.shape[1], y.shape[2]
        S = H * W
        Q = OH * OW
        xf = x.reshape(x.size)
        gf = gx.reshape(gx.size)
        yf = y.reshape(y.size)
        gof = g.reshape(g.size)
        # the output columns whose windows lie inside the plane's columns: [ow_lo, ow_hi)
        last = W - 1 - (KW - 1) * dw + pw  # the largest ow * sw whose window ends inside
        ow_lo = min(OW, (pw + sw - 1) // sw)
        ow_hi = max(ow_lo, min(OW, last // sw + 1) if last >= 0 else 0)
        for p in prange(P):
            plane = p * S
            for i in range(S):
                gf[plane + i] = 0
            for oh in range(OH):
                h0 = oh * sh - ph
                row_in = h0 >= 0 and h0 + (KH - 1) * dh < H
                o = p * Q + oh * OW
                for ow in range(OW):
                    w0 = ow * sw - pw
                    target = yf[o + ow]
                    found = -1
                    if row_in and ow_lo <= ow < ow_hi:
                        corner = plane + h0 * W + w0
                        for j in range(KH - 1, -1, -1):
                            for k in range(KW - 1, -1, -1):
                                off = corner + j * dh * W + k * dw
                                found = off if xf[off] == target else found
                    if found < 0:
                        found = _window_search(xf, plane, H, W, h0, w0, KH, KW, dh, dw, target)
                    if found >= 0:
                        gf[found] += gof[o + ow]

    return kernel


#: The 2-D window sizes with a compiled :func:`_values_backward_2d` kernel (every pool of the classic networks:
#: 3x3 in ResNet, DenseNet, GoogLeNet, ShuffleNet, AlexNet, SqueezeNet; 2x2 in VGG and U-Net).
_VALUES_BACKWARD_2D = {(3, 3): _values_backward_2d(3, 3), (2, 2): _values_backward_2d(2, 2)}


@parallel.kernel(work_arg=0, pool=True, **_JIT)
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


@parallel.kernel(work_arg=0, pool=True, **_JIT)
def _max_pool_separable_kernel(x, y, kh, kw, sh, sw, ph, pw, dh, dw, want_min):
    """Max (or min) pooling of 2-D planes ``x`` (P, H, W) into ``y`` (P, OH, OW) without indices, as two 1-D
    passes: per output row, the extreme over the window's rows of each input column (a vectorised loop over the
    whole input row per tap row), then over the window's columns of that row. The value is the same as over the
    whole window in any order (NaN propagates through both passes; max and min are exact), so it equals the
    indexed kernels' (only a window holding both +0 and -0 may give the other zero). Why: the indexed kernel
    pays a set-up per (output row, tap row) that short rows do not amortise; measured at batch 8, 2 threads, 3x3/2 pooling: SqueezeNet's 96x61x61, 256x30x30 and
    512x15x15 7.3, 10.6 and 5.3 ms with indices against 1.7, 1.3 and 0.8 ms here (torch: 12.4, 8.1, 3.9)."""
    P, H, W = x.shape
    OH, OW = y.shape[1], y.shape[2]
    init = np.inf if want_min else -np.inf
    for p in prange(P):
        col = np.empty(W, x.dtype)
        start = np.full(1, init, x.dtype)  # the initial extreme in x's dtype (float32 compares stay float32)
        xp = x[p]
        for oh in range(OH):
            for w in range(W):
                col[w] = init
            h0 = oh * sh - ph
            for j in range(kh):
                ih = h0 + j * dh
                if ih < 0 or ih >= H:
                    continue
                xr = xp[ih]
                if want_min:
                    for w in range(W):
                        v = xr[w]
                        m = col[w]
                        col[w] = v if (v < m) | (v != v) else m
                else:
                    for w in range(W):
                        v = xr[w]
                        m = col[w]
                        col[w] = v if (v > m) | (v != v) else m
            yr = y[p, oh]
            for ow in range(OW):
                w0 = ow * sw - pw
                m = start[0]
                for t in range(kw):
                    iw = w0 + t * dw
                    if iw >= 0 and iw < W:
                        v = col[iw]
                        if want_min:
                            m = v if (v < m) | (v != v) else m
                        else:
                            m = v if (v > m) | (v != v) else m
                yr[ow] = m


@parallel.kernel(work_arg=0, pool=True, **_JIT)
def _max_pool_separable_indexed_kernel(x, y, ind, kh, kw, sh, sw, ph, pw, dh, dw, want_min):
    """Max (or min) pooling of 2-D planes ``x`` (P, H, W) into ``y`` (P, OH, OW) with int64 indices ``ind``, as
    two 1-D passes over (value, index) pairs: per input row, the extreme over each window's columns and its
    column; then per output row, over the window's rows. Both passes take a candidate when it is strictly
    more extreme or NaN, starting from the first element inside the window: the row pass gives a row's first
    extreme (its last NaN), the column pass the first row holding the window's extreme (the last row holding a
    NaN), which is the first extreme (last NaN) in row-major order, torch's rule, and an all -inf window keeps
    its first element. The loops run over whole rows with selects (no per-window branches). Measured at batch 8,
    2 threads: GoogLeNet's and SqueezeNet's 3x3 pools took 1.3-1.8x torch's time with the row-chunk kernel."""
    P, H, W = x.shape
    OH, OW = y.shape[1], y.shape[2]
    init = np.inf if want_min else -np.inf
    for p in prange(P):
        start = np.full(1, init, x.dtype)
        rv = np.empty((H, OW), x.dtype)      # per input row: each window's extreme over its columns ...
        rc = np.empty((H, OW), np.int64)     # ... and that element's column (-1: no column inside)
        xp = x[p]
        for ih in range(H):
            xr = xp[ih]
            vr = rv[ih]
            cr = rc[ih]
            for ow in range(OW):
                w0 = ow * sw - pw
                m = start[0]
                c = np.int64(-1)
                for t in range(kw):
                    iw = w0 + t * dw
                    if iw >= 0 and iw < W:
                        v = xr[iw]
                        if c < 0:
                            c = iw
                        if _takes(v, m, want_min):
                            m = v
                            c = iw
                vr[ow] = m
                cr[ow] = c
        for oh in range(OH):
            h0 = oh * sh - ph
            yr = y[p, oh]
            ir = ind[p, oh]
            for ow in range(OW):
                yr[ow] = start[0]
                ir[ow] = -1
            for j in range(kh):
                ih = h0 + j * dh
                if ih < 0 or ih >= H:
                    continue
                vr = rv[ih]
                cr = rc[ih]
                base = ih * W
                for ow in range(OW):
                    v = vr[ow]
                    m = yr[ow]
                    first = (ir[ow] < 0) & (cr[ow] >= 0)
                    if _takes(v, m, want_min) | first:
                        yr[ow] = v
                        ir[ow] = base + cr[ow]


#: (3-D windows; 1-D and 2-D ones take the separable kernels above.) Planes narrower than this go to the scalar
#: kernel (:func:`_max_pool_kernel_generic`): the row-vectorised
#: kernel's per-row set-up (row views, edge and interior passes) outweighs its short rows. Measured on one core,
#: 3x3 pooling with indices: 832 planes of 4x4 at stride 1 took 0.63 ms scalar against 2.08 ms vectorised, 480
#: of 8x8 1.57 against 2.79 ms (stride 2: 0.30 against 1.06), 192 of 16x16 at stride 2 0.56 against 1.00 ms;
#: from 64x64 on the vectorised kernel is 2-3x faster. (GoogLeNet's inception branches pool 4x4 to 16x16 planes.)
VECTOR_MIN_WIDTH = 17


@config.parallel_entry
def _pool_extreme(name, x, kernel, stride, padding, dilation, out_spatial, return_indices, want_min):
    config.sync_threads()
    _check_geometry(name, x, kernel, stride, padding, dilation, out_spatial, integers=True)
    n, c = x.shape[:2]
    od, oh, ow = (int(v) for v in out_spatial)
    y = memory.empty_aligned((n * c, od, oh, ow), x.dtype)
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
        elif not return_indices and kd == 1 and x.shape[2] == 1:
            _max_pool_separable_kernel(xp[:, 0], y[:, 0], kh, kw, sh, sw, ph, pw, dh, dw, bool(want_min))
        elif kd == 1 and x.shape[2] == 1:
            _max_pool_separable_indexed_kernel(xp[:, 0], y[:, 0], ind[:, 0], kh, kw, sh, sw, ph, pw, dh, dw,
                                               bool(want_min))
        elif x.shape[2] * x.shape[3] * x.shape[4] >= _INT32_PLANE_LIMIT or x.shape[4] < VECTOR_MIN_WIDTH:
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
    gx = memory.empty_aligned((n * c, d * h * w), grad_out.dtype)  # each plane zeroed by the kernel
    if not grad_out.size:
        gx.fill(0)
    elif gx.size:
        bad = np.zeros(n * c, dtype=np.bool_)
        _max_pool_backward_kernel(np.ascontiguousarray(grad_out).reshape(n * c, -1),
                                  np.ascontiguousarray(indices, dtype=np.int64).reshape(n * c, -1),
                                  gx, bad)
        if bad.any():
            raise RuntimeError(f"max_pool_backward: found an index outside [0, {d * h * w}) "
                               f"(input plane {d}x{h}x{w})")
    return gx.reshape(n, c, d, h, w)


@config.parallel_entry
def max_pool_backward_from_values(grad_out, x, y, kernel, stride, padding, dilation, want_min):
    """Gradient of max (``want_min`` False) or min pooling from the input and the pooled values, no indices: the
    same result as :func:`max_pool_backward` at the indices :func:`max_pool_forward` would return.

    Why: a training forward that keeps its indices runs the indexed kernels, 3-5x slower than the values-only
    ones (ResNet's 3x3/2 pool of 8 x 64 x 64x64: 8.8 against 2.0 ms on 2 threads); finding each window's element
    again in the backward costs less than the difference.

    Parameters
    ----------
    grad_out, y : ndarray (N, C, OD, OH, OW), one float dtype
    x : ndarray (N, C, D, H, W), the pooled input, ``grad_out``'s dtype
    kernel, stride, padding, dilation : 3-tuples of int, as given to the forward

    Returns
    -------
    grad_x : ndarray (N, C, D, H, W), ``grad_out``'s dtype.
    """
    config.sync_threads()
    _check_geometry("max_pool_backward_from_values", x, kernel, stride, padding, dilation, y.shape[2:])
    if grad_out.shape != y.shape or x.shape[:2] != y.shape[:2]:
        raise ValueError(f"max_pool_backward_from_values: grad_out {grad_out.shape}, values {y.shape} and input "
                         f"{x.shape} do not match")
    n, c = x.shape[:2]
    # each plane is zeroed by the kernel's task for it, in parallel, right before its gradient is added in (a
    # whole-array fill first ran on one thread and left the planes out of cache: 8 x 64 x 64x64 after a torch
    # BatchNorm and ReLU, 1.08 -> 0.88 ms; 8 x 96 x 61x61 0.95 -> 0.87)
    gx = memory.empty_aligned((n * c,) + tuple(x.shape[2:]), grad_out.dtype)
    if not grad_out.size:
        gx.fill(0)
    elif gx.size:
        fast = _VALUES_BACKWARD_2D.get((int(kernel[1]), int(kernel[2])))
        if fast is not None and int(kernel[0]) == 1 and x.shape[2] == 1 and y.shape[2] == 1:
            in_planes, out_planes = (n * c,) + tuple(x.shape[3:]), (n * c,) + tuple(y.shape[3:])
            fast(_planes(x).reshape(in_planes), _planes(y).reshape(out_planes), _planes(grad_out).reshape(out_planes),
                 gx.reshape(in_planes), *(int(v) for v in stride[1:]), *(int(v) for v in padding[1:]),
                 *(int(v) for v in dilation[1:]))
            return gx.reshape(x.shape)
        _max_pool_backward_values_kernel(_planes(x), _planes(y), _planes(grad_out), gx,
                                         *(int(v) for v in kernel), *(int(v) for v in stride),
                                         *(int(v) for v in padding), *(int(v) for v in dilation), bool(want_min))
    return gx.reshape(x.shape)
