"""Numba CPU kernels for N-d convolution: forward, input gradient and weight gradient.

Two algorithms behind one semantics (torch's cross-correlation):

* ``direct_*``  -- loop nests with the output row as the innermost, vectorised loop, register
  blocking over 4 output (or, for the input gradient, input) channels and 3 kernel taps per pass.
* ``im2col_*`` -- column buffer (bounded by :data:`COL_BUFFER_BYTES`) plus BLAS GEMM (:mod:`.blas`); the
  columns of every group are made in one fill and multiplied in one batched GEMM per chunk.

Every kernel works on 5-D arrays ``(N, C, D, H, W)``: 1-D and 2-D convolutions pass size-1 leading
spatial dims. Arguments ``stride``, ``padding`` (padding *before* each dim) and ``dilation`` are
3-tuples of ints; the output (or input / kernel) spatial size is always given explicitly, so the
padding *after* a dim is implied (torch's ``padding='same'`` with an even kernel is asymmetric).

Layout trick shared by all kernels: along W the input row is zero-padded and split by stride
phase (``row[ph * Wq + m] = x[m * stride + ph - pad]``). Each kernel tap ``kw`` is then a
unit-stride slice starting at ``(a % s) * Wq + a // s`` with ``a = kw * dilation``, so every inner
loop is a contiguous, bounds-check-free, vectorisable loop whatever the stride, padding or dilation.
The input gradient is the same row-correlation applied to the zero-padded output gradient, one
segment per stride phase, then un-phased.

Stride-1 1-D/2-D im2col instead pads the image in H and W and flattens (H, W): every column row of
an image is then one contiguous slice, at the price of computing (and dropping) the padded columns
of each output row (``_im2col_wide``, used where that is cheaper). A stride-1 input gradient with
few output channels per group is computed as a forward conv of the output gradient with flipped,
transposed weights; a 1x1 weight gradient is one GEMM per image, accumulated in place.
"""
from __future__ import annotations

import functools
import math

from fastconv import config

import numpy as np
from numba import njit, prange

from . import blas, im2col_fused, memory, parallel, thin_input
from .arguments import int_tuple

__all__ = [
    "direct_forward", "direct_grad_input", "direct_grad_weight",
    "im2col_forward", "im2col_grad_input", "im2col_grad_weight",
    "COL_BUFFER_BYTES",
]

#: Upper bound, in bytes, on the im2col column buffer of one chunk (batch x output rows).
COL_BUFFER_BYTES = 32 << 20

#: im2col forward: with at most this many output channels per group the GEMM is computed as
#: ``col.T @ w.T`` (tall-skinny result, transposed on store). Only for numpy's OpenBLAS
#: (``FASTCONV_GEMM=numpy``), which is several times slower on the short-and-wide ``w @ col``
#: orientation when M is this small (measured: Inception 5x5). torch's BLAS (the default) is not: there
#: ``w @ col`` and no transposed store took 0.74-0.93x the time on all 18 small-K layers measured
#: (DenseNet's 128 -> 32 3x3 at 32/16/8, Inception's 16 -> 32 5x5, LeNet, 1 and 2 threads).
GEMM_TRANSPOSED_MAX_K = 32 if blas.GEMM_LIBRARY == "numpy" else 0

#: im2col forward over chunks of several whole images: with at least this many output positions per image the
#: GEMM is one batched call writing each image's (K, P) block of the result in place, instead of one GEMM into a
#: (K, images x P) buffer and a transposing copy of it. Measured (2 threads, batch 8, minimum of 25, ms, copy vs
#: batched): ResNet's 7x7 stem (64 x 147, P 4096) 2.8 / 2.0, SqueezeNet's (96 x 147, 3721) 3.7 / 2.8, 64 x 576
#: at 32x32 2.6 / 2.1, 128 x 288 at 30x30 2.1 / 1.7-2.3; at 7x7 (P 49) the copy was faster (0.44 / 0.50).
BATCHED_OUT_MIN_Q = 256

#: Output (or input) channels accumulated per pass by the direct kernels (register blocking).
_BLOCK = 4

_JIT = dict(cache=config.CACHE, fastmath=set(config.FASTMATH), nogil=True)


# --------------------------------------------------------------------------------------------
# Geometry helpers (plain Python / numpy, tiny)
# --------------------------------------------------------------------------------------------

def _pairs_forward(n_out, n_in, k, s, p, d):
    """For each output index ``o``: the (tap, input index) pairs that are in range.

    Returns ``start`` (n_out + 1), ``taps``, ``src`` as int64 arrays (CSR layout).
    """
    start = np.zeros(n_out + 1, np.int64)
    taps, src = [], []
    for o in range(n_out):
        for t in range(k):
            i = o * s - p + t * d
            if 0 <= i < n_in:
                taps.append(t)
                src.append(i)
        start[o + 1] = len(taps)
    return start, np.array(taps, np.int64), np.array(src, np.int64)


def _pairs_backward(n_in, n_out, k, s, p, d):
    """For each input index ``i``: the (tap, output index) pairs whose window covers it."""
    start = np.zeros(n_in + 1, np.int64)
    taps, src = [], []
    for i in range(n_in):
        for t in range(k):
            q = i + p - t * d
            if q >= 0 and q % s == 0 and q // s < n_out:
                taps.append(t)
                src.append(q // s)
        start[i + 1] = len(taps)
    return start, np.array(taps, np.int64), np.array(src, np.int64)


def _row_layout(kw_size, sw, pw, dw, ow):
    """Phase-split padded row layout: phase length ``Wq`` and each tap's start offset."""
    wq = max(1, ((kw_size - 1) * dw) // sw + ow)
    a = np.arange(kw_size, dtype=np.int64) * dw
    offs = (a % sw) * wq + a // sw
    return wq, offs


def _c(a):
    return np.ascontiguousarray(a)


# --------------------------------------------------------------------------------------------
# Numba kernels
# --------------------------------------------------------------------------------------------

@parallel.kernel(**_JIT)
def _phase_pad(x, pad, s, wq, out):
    """``out[n, c, d, h, ph * wq + m] = x[n, c, d, h, m * s + ph - pad]`` (0 outside)."""
    N, C, D, H, W = x.shape
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for d in range(D):
            for h in range(H):
                xr = x[n, c, d, h]
                orow = out[n, c, d, h]
                if s == 1:
                    lo = min(pad, wq)
                    for m in range(lo):
                        orow[m] = 0
                    cnt = max(0, min(W, wq - pad))
                    dst = orow[pad:pad + cnt]
                    for m in range(cnt):
                        dst[m] = xr[m]
                    for m in range(pad + cnt, wq):
                        orow[m] = 0
                else:
                    for ph in range(s):
                        # phase ph holds x[m*s + ph - pad] for m in [lo, hi) and zeros around: the interior
                        # is a branch-free strided copy (a per-element bounds test made this split 4x slower)
                        base = ph * wq
                        lo = min(wq, max(0, (pad - ph + s - 1) // s))
                        hi = max(lo, min(wq, (W - 1 + pad - ph) // s + 1))
                        for m in range(lo):
                            orow[base + m] = 0
                        src = xr[lo * s + ph - pad:]
                        dst = orow[base + lo:base + hi]
                        for m in range(hi - lo):
                            dst[m] = src[m * s]
                        for m in range(hi, wq):
                            orow[base + m] = 0


@parallel.kernel(**_JIT)
def _unphase(src, perm, out):
    """``out[..., i] = src[..., perm[i]]`` (0 where ``perm[i] < 0``)."""
    N, C, D, H, W = out.shape
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for d in range(D):
            for h in range(H):
                sr = src[n, c, d, h]
                orow = out[n, c, d, h]
                for i in range(W):
                    p = perm[i]
                    if p >= 0:
                        orow[i] = sr[p]
                    else:
                        orow[i] = 0


@parallel.kernel(always=True, **_JIT)
def _rowconv(src, wt, bias, groups, dstart, dtap, dsrc, hstart, htap, hsrc,
             seg_dst, seg_len, seg_t0, tap_kw, tap_off, perm, lacc, out):
    """Row correlation used by the direct forward and input-gradient kernels.

    ``out[n, co, a, b, i] = bias[co] + sum_{cs, (kd, sa) in D-pairs(a), (kh, sb) in H-pairs(b),
    taps t of a segment} wt[co, cs, kd, kh, kw_t] * src[n, g*Cs + cs, sa, sb, off_t + m]``
    accumulated in a row buffer at ``seg_dst + m`` and read out through ``perm``.
    Parallel over (batch, group, block of 4 destination channels).
    """
    N, Cd, Dd, Hd, Wd = out.shape
    Cs = wt.shape[1]
    Cdg = Cd // groups
    nblk = (Cdg + 3) // 4
    nseg = seg_len.shape[0]
    ntask = N * groups * nblk
    for task in prange(ntask):
        n = task // (groups * nblk)
        rem = task - n * (groups * nblk)
        g = rem // nblk
        b = rem - g * nblk
        c0 = g * Cdg + b * 4
        nr = min(4, Cdg - b * 4)
        acc = np.empty((4, lacc), dtype=out.dtype)
        for a in range(Dd):
            for bb in range(Hd):
                acc[:, :] = 0
                for cs in range(Cs):
                    csrc = g * Cs + cs
                    for pd_ in range(dstart[a], dstart[a + 1]):
                        kd = dtap[pd_]
                        sd_ = dsrc[pd_]
                        for ph_ in range(hstart[bb], hstart[bb + 1]):
                            kh = htap[ph_]
                            srow = src[n, csrc, sd_, hsrc[ph_]]
                            for sg in range(nseg):
                                d0 = seg_dst[sg]
                                L = seg_len[sg]
                                t = seg_t0[sg]
                                t1 = seg_t0[sg + 1]
                                if nr == 4:
                                    a0 = acc[0, d0:d0 + L]
                                    a1 = acc[1, d0:d0 + L]
                                    a2 = acc[2, d0:d0 + L]
                                    a3 = acc[3, d0:d0 + L]
                                    w0 = wt[c0, cs, kd, kh]
                                    w1 = wt[c0 + 1, cs, kd, kh]
                                    w2 = wt[c0 + 2, cs, kd, kh]
                                    w3 = wt[c0 + 3, cs, kd, kh]
                                    while t + 3 <= t1:
                                        ka = tap_kw[t]
                                        kb = tap_kw[t + 1]
                                        kc = tap_kw[t + 2]
                                        oa = tap_off[t]
                                        ob = tap_off[t + 1]
                                        oc = tap_off[t + 2]
                                        xa_ = srow[oa:oa + L]
                                        xb_ = srow[ob:ob + L]
                                        xc_ = srow[oc:oc + L]
                                        w0a = w0[ka]
                                        w0b = w0[kb]
                                        w0c = w0[kc]
                                        w1a = w1[ka]
                                        w1b = w1[kb]
                                        w1c = w1[kc]
                                        w2a = w2[ka]
                                        w2b = w2[kb]
                                        w2c = w2[kc]
                                        w3a = w3[ka]
                                        w3b = w3[kb]
                                        w3c = w3[kc]
                                        for m in range(L):
                                            xa = xa_[m]
                                            xb = xb_[m]
                                            xc = xc_[m]
                                            a0[m] += w0a * xa + w0b * xb + w0c * xc
                                            a1[m] += w1a * xa + w1b * xb + w1c * xc
                                            a2[m] += w2a * xa + w2b * xb + w2c * xc
                                            a3[m] += w3a * xa + w3b * xb + w3c * xc
                                        t += 3
                                    if t1 - t == 2:
                                        ka = tap_kw[t]
                                        kb = tap_kw[t + 1]
                                        oa = tap_off[t]
                                        ob = tap_off[t + 1]
                                        xa_ = srow[oa:oa + L]
                                        xb_ = srow[ob:ob + L]
                                        w0a = w0[ka]
                                        w0b = w0[kb]
                                        w1a = w1[ka]
                                        w1b = w1[kb]
                                        w2a = w2[ka]
                                        w2b = w2[kb]
                                        w3a = w3[ka]
                                        w3b = w3[kb]
                                        for m in range(L):
                                            xa = xa_[m]
                                            xb = xb_[m]
                                            a0[m] += w0a * xa + w0b * xb
                                            a1[m] += w1a * xa + w1b * xb
                                            a2[m] += w2a * xa + w2b * xb
                                            a3[m] += w3a * xa + w3b * xb
                                    elif t1 - t == 1:
                                        ka = tap_kw[t]
                                        oa = tap_off[t]
                                        xa_ = srow[oa:oa + L]
                                        w0a = w0[ka]
                                        w1a = w1[ka]
                                        w2a = w2[ka]
                                        w3a = w3[ka]
                                        for m in range(L):
                                            xa = xa_[m]
                                            a0[m] += w0a * xa
                                            a1[m] += w1a * xa
                                            a2[m] += w2a * xa
                                            a3[m] += w3a * xa
                                else:
                                    for j in range(nr):
                                        aj = acc[j, d0:d0 + L]
                                        wj = wt[c0 + j, cs, kd, kh]
                                        tt = t
                                        while tt + 3 <= t1:
                                            oa = tap_off[tt]
                                            ob = tap_off[tt + 1]
                                            oc = tap_off[tt + 2]
                                            xa_ = srow[oa:oa + L]
                                            xb_ = srow[ob:ob + L]
                                            xc_ = srow[oc:oc + L]
                                            wa = wj[tap_kw[tt]]
                                            wb = wj[tap_kw[tt + 1]]
                                            wc = wj[tap_kw[tt + 2]]
                                            for m in range(L):
                                                aj[m] += wa * xa_[m] + wb * xb_[m] + wc * xc_[m]
                                            tt += 3
                                        while tt < t1:
                                            oa = tap_off[tt]
                                            xa_ = srow[oa:oa + L]
                                            wa = wj[tap_kw[tt]]
                                            for m in range(L):
                                                aj[m] += wa * xa_[m]
                                            tt += 1
                for j in range(nr):
                    bv = bias[c0 + j]
                    orow = out[n, c0 + j, a, bb]
                    aj = acc[j]
                    for i in range(Wd):
                        p = perm[i]
                        if p >= 0:
                            orow[i] = aj[p] + bv
                        else:
                            orow[i] = bv


@parallel.kernel(always=True, **_JIT)
def _gw_direct(go, xq, groups, dstart, dtap, dsrc, hstart, htap, hsrc, tap_off, gw):
    """Weight gradient: ``gw[k, c, kd, kh, kw] = sum_{n, od, oh, ow} go[n, k, od, oh, ow] *
    xq[n, g*Cg + c, id, ih, off_kw + ow]``. Parallel over (group, block of 4 k, c); each task
    reduces over the whole batch (no races, deterministic)."""
    K, Cg, KD, KH, KW = gw.shape
    N, _, OD, OH, OW = go.shape
    Kg = K // groups
    nblk = (Kg + 3) // 4
    ntask = groups * nblk * Cg
    for task in prange(ntask):
        g = task // (nblk * Cg)
        rem = task - g * (nblk * Cg)
        b = rem // Cg
        c = rem - b * Cg
        k0 = g * Kg + b * 4
        nr = min(4, Kg - b * 4)
        cx = g * Cg + c
        acc = np.zeros((4, KD, KH, KW), dtype=gw.dtype)
        for n in range(N):
            for od in range(OD):
                for pd_ in range(dstart[od], dstart[od + 1]):
                    kd = dtap[pd_]
                    id_ = dsrc[pd_]
                    for oh in range(OH):
                        if nr == 4:
                            g0 = go[n, k0, od, oh]
                            g1 = go[n, k0 + 1, od, oh]
                            g2 = go[n, k0 + 2, od, oh]
                            g3 = go[n, k0 + 3, od, oh]
                        for ph_ in range(hstart[oh], hstart[oh + 1]):
                            kh = htap[ph_]
                            xr = xq[n, cx, id_, hsrc[ph_]]
                            if nr == 4:
                                kw = 0
                                while kw + 3 <= KW:
                                    oa = tap_off[kw]
                                    ob = tap_off[kw + 1]
                                    oc = tap_off[kw + 2]
                                    xa_ = xr[oa:oa + OW]
                                    xb_ = xr[ob:ob + OW]
                                    xc_ = xr[oc:oc + OW]
                                    s0a = s0b = s0c = s1a = s1b = s1c = g0[0] * 0
                                    s2a = s2b = s2c = s3a = s3b = s3c = g0[0] * 0
                                    for m in range(OW):
                                        xa = xa_[m]
                                        xb = xb_[m]
                                        xc = xc_[m]
                                        v0 = g0[m]
                                        v1 = g1[m]
                                        v2 = g2[m]
                                        v3 = g3[m]
                                        s0a += v0 * xa
                                        s0b += v0 * xb
                                        s0c += v0 * xc
                                        s1a += v1 * xa
                                        s1b += v1 * xb
                                        s1c += v1 * xc
                                        s2a += v2 * xa
                                        s2b += v2 * xb
                                        s2c += v2 * xc
                                        s3a += v3 * xa
                                        s3b += v3 * xb
                                        s3c += v3 * xc
                                    acc[0, kd, kh, kw] += s0a
                                    acc[0, kd, kh, kw + 1] += s0b
                                    acc[0, kd, kh, kw + 2] += s0c
                                    acc[1, kd, kh, kw] += s1a
                                    acc[1, kd, kh, kw + 1] += s1b
                                    acc[1, kd, kh, kw + 2] += s1c
                                    acc[2, kd, kh, kw] += s2a
                                    acc[2, kd, kh, kw + 1] += s2b
                                    acc[2, kd, kh, kw + 2] += s2c
                                    acc[3, kd, kh, kw] += s3a
                                    acc[3, kd, kh, kw + 1] += s3b
                                    acc[3, kd, kh, kw + 2] += s3c
                                    kw += 3
                                while kw < KW:
                                    oa = tap_off[kw]
                                    xa_ = xr[oa:oa + OW]
                                    s0a = s1a = s2a = s3a = g0[0] * 0
                                    for m in range(OW):
                                        xa = xa_[m]
                                        s0a += g0[m] * xa
                                        s1a += g1[m] * xa
                                        s2a += g2[m] * xa
                                        s3a += g3[m] * xa
                                    acc[0, kd, kh, kw] += s0a
                                    acc[1, kd, kh, kw] += s1a
                                    acc[2, kd, kh, kw] += s2a
                                    acc[3, kd, kh, kw] += s3a
                                    kw += 1
                            else:
                                for j in range(nr):
                                    gj = go[n, k0 + j, od, oh]
                                    kw = 0
                                    while kw + 3 <= KW:
                                        oa = tap_off[kw]
                                        ob = tap_off[kw + 1]
                                        oc = tap_off[kw + 2]
                                        xa_ = xr[oa:oa + OW]
                                        xb_ = xr[ob:ob + OW]
                                        xc_ = xr[oc:oc + OW]
                                        sa = sb = sc = gj[0] * 0
                                        for m in range(OW):
                                            v = gj[m]
                                            sa += v * xa_[m]
                                            sb += v * xb_[m]
                                            sc += v * xc_[m]
                                        acc[j, kd, kh, kw] += sa
                                        acc[j, kd, kh, kw + 1] += sb
                                        acc[j, kd, kh, kw + 2] += sc
                                        kw += 3
                                    while kw < KW:
                                        oa = tap_off[kw]
                                        xa_ = xr[oa:oa + OW]
                                        sa = gj[0] * 0
                                        for m in range(OW):
                                            sa += gj[m] * xa_[m]
                                        acc[j, kd, kh, kw] += sa
                                        kw += 1
        for j in range(nr):
            gw[k0 + j, c] = acc[j]


@parallel.kernel(**_JIT)
def _im2col(xq, n0, c0, r0, r1, osz, ksz, stride, padding, dilation, tap_off, col):
    """Columns of images ``n0 .. n0+nb`` and output rows ``r0 .. r1`` (rows = (od, oh) flattened).

    ``col[((c*KD + kd)*KH + kh)*KW + kw, i*Q + (r - r0)*OW + ow]``, ``Q = (r1 - r0) * OW``.

    Flat buffers and unsigned offsets, no row views: a segment is one output row (7 to 56 values), and two
    array views per segment (each an atomic reference count increment and decrement) cost as much as the
    copy itself -- DenseNet's and SqueezeNet's 15x15 and 30x30 layers filled at 2.6 GB/s.
    """
    OD, OH, OW = osz
    KD, KH, KW = ksz
    N, C, D, H, WQ = xq.shape
    Q = (r1 - r0) * OW
    ncol = col.shape[1]
    nb = ncol // Q
    xf = xq.reshape(xq.size)
    cf = col.reshape(col.size)
    for row in prange(col.shape[0]):
        kw = row % KW
        t = row // KW
        kh = t % KH
        t = t // KH
        kd = t % KD
        c = t // KD
        off = tap_off[kw]
        od0 = r0 // OH
        for i in range(nb):
            plane = ((n0 + i) * C + c0 + c) * D
            # (od, oh) of row r, stepped instead of divided per segment (a signed division is tens of cycles)
            od = od0
            oh = r0 - od0 * OH
            d0 = np.uint64(row * ncol + i * Q)
            for r in range(r0, r1):
                id_ = od * stride[0] - padding[0] + kd * dilation[0]
                ih = oh * stride[1] - padding[1] + kh * dilation[1]
                if id_ >= 0 and id_ < D and ih >= 0 and ih < H:
                    s0 = np.uint64(((plane + id_) * H + ih) * WQ + off)
                    for m in range(OW):
                        u = np.uint64(m)
                        cf[d0 + u] = xf[s0 + u]
                else:
                    for m in range(OW):
                        cf[d0 + np.uint64(m)] = 0
                d0 += np.uint64(OW)
                oh += 1
                if oh == OH:
                    oh = 0
                    od += 1


@parallel.kernel(**_JIT)
def _pad_box(x, pd, ph, pw, out):
    """``out[n, c, d, h, w] = x[n, c, d - pd, h - ph, w - pw]`` (0 outside ``x``): the zero-padded box that every
    window of a narrow conv reads inside (:func:`_narrow_source`). ``out`` may be smaller than ``x`` plus its
    padding (windows that never reach the last rows or columns); a negative padding crops. x and out C-contiguous.

    Each plane zeroed in one loop, then its rows inside ``x`` copied, on flat unsigned indices. Why: with a view of
    every row of ``out`` and ``x`` (Numba builds each) the views cost more than the 4-8 elements a row of these
    narrow layers copies: measured, one thread, ResNet's 512 x 4x4 input at batch 8 0.19-0.26 -> 0.055 ms, 256 x
    8x8 0.24-0.28 -> 0.032 ms, of a forward of about 4 ms."""
    N, C, D, H, W = x.shape
    Dp, Hp, Wp = out.shape[2], out.shape[3], out.shape[4]
    w0 = min(Wp, max(0, pw))  # box columns before the first input column
    n = max(0, min(Wp, W + pw) - w0)  # input columns in a box row
    plane = Dp * Hp * Wp
    xf = x.reshape(x.size)
    of = out.reshape(out.size)
    for t in prange(N * C):
        ob = np.uint64(t * plane)
        for m in range(plane):
            of[ob + np.uint64(m)] = 0
        for d in range(min(max(0, pd), Dp), min(Dp, D + pd)):
            for h in range(min(max(0, ph), Hp), min(Hp, H + ph)):
                o = np.uint64(((t * Dp + d) * Hp + h) * Wp + w0)
                src = np.uint64(((t * D + d - pd) * H + h - ph) * W + w0 - pw)
                for m in range(n):
                    of[o + np.uint64(m)] = xf[src + np.uint64(m)]


@parallel.kernel(**_JIT)
def _im2col_gather(xp, n0, c0, tap_off, pos, col):
    """``col[(c*KD + kd)*KH + kh)*KW + kw, i*Q + q] = xp[n0 + i, c0 + c].flat[tap_off[tap] + pos[q]]``.

    Columns of a narrow conv as one gather per (row, image): ``pos[q]`` is output position ``q``'s window
    corner in the padded box ``xp`` (:func:`_pad_box`), ``tap_off`` each tap's offset from it. One loop of
    ``Q`` elements, where the row-segment copy of :func:`_im2col` runs ``Q / OW`` loops of ``OW`` (4 or 8
    elements on ResNet's last stages, each paying a loop's set-up)."""
    T = tap_off.shape[0]
    Q = pos.shape[0]
    nb = col.shape[1] // Q
    plane = xp.shape[2] * xp.shape[3] * xp.shape[4]
    xf = xp.reshape(xp.size)
    for row in prange(col.shape[0]):
        c = row // T
        off = tap_off[row - c * T]
        crow = col[row]
        for i in range(nb):
            base = ((n0 + i) * xp.shape[1] + c0 + c) * plane + off
            dst = crow[i * Q:(i + 1) * Q]
            for q in range(Q):
                dst[q] = xf[base + pos[q]]


@parallel.kernel(**_JIT)
def _pad_wide(x, ph, pw, wq, out):
    """``out[n, c, r * wq + m] = x[n, c, 0, r - ph, m - pw]`` (0 outside, and in the tail).

    The zero-padded image flattened over (H, W) with row length ``wq``: for a stride-1 conv each
    im2col column row of one image is then one contiguous slice (see :func:`_im2col_wide`)."""
    N, C, _, H, W = x.shape
    L = out.shape[2]
    Hp = L // wq
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        orow = out[n, c]
        for r in range(Hp):
            ih = r - ph
            dst = orow[r * wq:(r + 1) * wq]
            if ih < 0 or ih >= H:
                for m in range(wq):
                    dst[m] = 0
            else:
                xr = x[n, c, 0, ih]
                lo = min(pw, wq)
                for m in range(lo):
                    dst[m] = 0
                cnt = max(0, min(W, wq - pw))
                seg = dst[pw:pw + cnt]
                for m in range(cnt):
                    seg[m] = xr[m]
                for m in range(pw + cnt, wq):
                    dst[m] = 0
        for m in range(Hp * wq, L):
            orow[m] = 0


@parallel.kernel(**_JIT)
def _im2col_wide(xp, n0, c0, q0, Q, KH, KW, sh, sw, col):
    """``col[(c*KH + kh)*KW + kw, i*Q + q] = xp[n0 + i, c0 + c, q0 + kh*sh + kw*sw + q]``.

    Stride-1 columns over whole padded rows (``Q`` = output rows x ``wq``; the columns past the
    output width are computed by the GEMM and dropped): one contiguous copy per (row, image),
    parallel over column rows."""
    KK = KH * KW
    nb = col.shape[1] // Q
    for row in prange(col.shape[0]):
        c = row // KK
        t = row - c * KK
        kh = t // KW
        kw = t - kh * KW
        off = q0 + kh * sh + kw * sw
        crow = col[row]
        for i in range(nb):
            src = xp[n0 + i, c0 + c, off:off + Q]
            dst = crow[i * Q:(i + 1) * Q]
            for m in range(Q):
                dst[m] = src[m]


@parallel.kernel(work_arg=0, **_JIT)
def _col2im_wide(col, n0, c0, q0, Q, KH, KW, sh, sw, gxp):
    """Inverse of :func:`_im2col_wide`: ``gxp[n0 + i, c0 + c, q0 + kh*sh + kw*sw + q] +=
    col[(c*KH + kh)*KW + kw, i*Q + q]``. Contiguous adds; parallel over channels (no races)."""
    KK = KH * KW
    nb = col.shape[1] // Q
    for c in prange(col.shape[0] // KK):
        for i in range(nb):
            grow = gxp[n0 + i, c0 + c]
            for t in range(KK):
                kh = t // KW
                kw = t - kh * KW
                off = q0 + kh * sh + kw * sw
                dst = grow[off:off + Q]
                src = col[c * KK + t, i * Q:(i + 1) * Q]
                for m in range(Q):
                    dst[m] += src[m]


@parallel.kernel(**_JIT)
def _unpad_wide(gxp, ph, pw, wq, Hp, out):
    """``out[n, c, 0, ih, iw] = gxp[n, c, (ih + ph) * wq + iw + pw]`` (0 beyond the buffer)."""
    N, C, _, H, W = out.shape
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        grow = gxp[n, c]
        for ih in range(H):
            orow = out[n, c, 0, ih]
            r = ih + ph
            if r >= Hp:
                for iw in range(W):
                    orow[iw] = 0
            else:
                cnt = max(0, min(W, wq - pw))
                src = grow[r * wq + pw:r * wq + pw + cnt]
                for iw in range(cnt):
                    orow[iw] = src[iw]
                for iw in range(cnt, W):
                    orow[iw] = 0


@parallel.kernel(work_arg=0, **_JIT)
def _col2im(col, n0, c0, r0, r1, osz, ksz, stride, padding, dilation, tap_off, gxq):
    """Scatter-add columns back into the phase-split padded input-gradient buffer.
    Parallel over input channels (each task owns its channel: no races). Flat indices and ``(od, oh)``
    stepped per row, as in :func:`_im2col` (no views or divisions per segment)."""
    OD, OH, OW = osz
    KD, KH, KW = ksz
    C = gxq.shape[1]
    D = gxq.shape[2]
    H = gxq.shape[3]
    WQ = gxq.shape[4]
    Q = (r1 - r0) * OW
    ncol = col.shape[1]
    nb = ncol // Q
    Cg = col.shape[0] // (KD * KH * KW)
    cf = col.reshape(col.size)
    gf = gxq.reshape(gxq.size)
    od0 = r0 // OH
    for c in prange(Cg):
        for i in range(nb):
            plane = ((n0 + i) * C + c0 + c) * D
            od = od0
            oh = r0 - od0 * OH
            base = i * Q
            for r in range(r0, r1):
                for kd in range(KD):
                    id_ = od * stride[0] - padding[0] + kd * dilation[0]
                    if id_ < 0 or id_ >= D:
                        continue
                    for kh in range(KH):
                        ih = oh * stride[1] - padding[1] + kh * dilation[1]
                        if ih < 0 or ih >= H:
                            continue
                        rowbase = ((plane + id_) * H + ih) * WQ
                        for kw in range(KW):
                            s0 = np.uint64((((c * KD + kd) * KH + kh) * KW + kw) * ncol + base)
                            d0 = np.uint64(rowbase + tap_off[kw])
                            for m in range(OW):
                                u = np.uint64(m)
                                gf[d0 + u] += cf[s0 + u]
                base += OW
                oh += 1
                if oh == OH:
                    oh = 0
                    od += 1


@parallel.kernel(work_arg=0, **_JIT)
def _col2im_gather(col, n0, c0, tap_off, pos, gbox):
    """The inverse of :func:`_im2col_gather`: ``gbox[n0 + i, c0 + c].flat[tap_off[tap] + pos[q]] += col[c*T + tap,
    i*Q + q]``, into the zero-padded box of a narrow conv's input gradient (:func:`_crop_box` takes the input's
    part out). One loop of ``Q`` positions per (row, image), where :func:`_col2im` runs one loop of ``OW`` (4 or 8)
    per output row and tap, each paying its set-up: ResNet's 512-channel 4x4 layer at batch 8 spent 0.74 ms of a
    4.5 ms input gradient there. Parallel over channels (a task owns its channel's planes: no races)."""
    T = tap_off.shape[0]
    Q = pos.shape[0]
    nb = col.shape[1] // Q
    C = gbox.shape[1]
    plane = gbox.shape[2] * gbox.shape[3] * gbox.shape[4]
    gf = gbox.reshape(gbox.size)
    cf = col.reshape(col.size)
    ncol = col.shape[1]
    for c in prange(col.shape[0] // T):
        for t in range(T):
            off = tap_off[t]
            for i in range(nb):
                base = ((n0 + i) * C + c0 + c) * plane + off
                src = np.uint64((c * T + t) * ncol + i * Q)
                for q in range(Q):
                    gf[np.uint64(base + pos[q])] += cf[src + np.uint64(q)]


@parallel.kernel(work_arg=0, **_JIT)
def _col2im_gather_rows(colt, n0, tap_off, pos, gbox):
    """:func:`_col2im_gather` from transposed columns, one row per output position: ``gbox[n0 + i, c].flat[tap_off[t]
    + pos[q]] += colt[i*Q + q, c*T + t]`` (``colt``: (nb*Q, C*T), C-contiguous), the result of ``go^T @ W`` (see
    :data:`GRAD_INPUT_POSITION_ROWS`). Parallel over channels (a task owns its channel's planes: no races); a
    channel reads ``T`` adjacent values of each row, and the next channel the values beside them (in L1)."""
    T = tap_off.shape[0]
    Q = pos.shape[0]
    nb = colt.shape[0] // Q
    C = gbox.shape[1]
    plane = gbox.shape[2] * gbox.shape[3] * gbox.shape[4]
    gf = gbox.reshape(gbox.size)
    cf = colt.reshape(colt.size)
    ncol = colt.shape[1]
    for c in prange(ncol // T):
        for i in range(nb):
            base = ((n0 + i) * C + c) * plane
            for q in range(Q):
                src = np.uint64((i * Q + q) * ncol + c * T)
                corner = base + pos[q]
                for t in range(T):
                    gf[np.uint64(corner + tap_off[t])] += cf[src + np.uint64(t)]


@parallel.kernel(**_JIT)
def _crop_box(gbox, pd, ph, pw, gx):
    """``gx[n, c, d, h, w] = gbox[n, c, d + pd, h + ph, w + pw]``, 0 where that lies outside the box (input the
    windows never reach): the input gradient out of :func:`_col2im_gather`'s padded box (the inverse of
    :func:`_pad_box`). Flat indices, no row views (rows of 4-8 elements)."""
    N, C, D, H, W = gx.shape
    Db, Hb, Wb = gbox.shape[2], gbox.shape[3], gbox.shape[4]
    w_lo = min(W, max(0, -pw))  # input columns before the box
    w_hi = max(w_lo, min(W, Wb - pw))  # input columns up to the box's last
    gf = gbox.reshape(gbox.size)
    xf = gx.reshape(gx.size)
    for t in prange(N * C):
        for d in range(D):
            bd = d + pd
            for h in range(H):
                bh = h + ph
                o = np.uint64(((t * D + d) * H + h) * W)
                if bd < 0 or bd >= Db or bh < 0 or bh >= Hb:
                    for w in range(W):
                        xf[o + np.uint64(w)] = 0
                    continue
                src = ((t * Db + bd) * Hb + bh) * Wb + pw
                for w in range(w_lo):
                    xf[o + np.uint64(w)] = 0
                for w in range(w_lo, w_hi):
                    xf[o + np.uint64(w)] = gf[np.uint64(src + w)]
                for w in range(w_hi, W):
                    xf[o + np.uint64(w)] = 0


@njit(**_JIT)
def _flip_taps_into(w4, out):
    """``out[g, c, k, t] = w4[g, k, c, T - 1 - t]`` for ``w4`` (G, Kg, Cg, T) and ``out`` (G, Cg, Kg, T), both
    C-contiguous: the weights of a stride-1 input gradient run as a forward conv (kernel flipped, in and out
    channels swapped per group). Why not numpy's copy of the reversed, transposed view: it copies nine-element
    runs backwards one at a time, 1.3 ms for ResNet's 256 -> 256 3x3 weights (a fifth of that input gradient)."""
    G, Kg, Cg, T = w4.shape
    wf = w4.reshape(w4.size)
    of = out.reshape(out.size)
    for g in range(G):
        for c in range(Cg):
            o = np.uint64(((g * Cg + c) * Kg) * T)
            for k in range(Kg):
                src = np.uint64(((g * Kg + k) * Cg + c) * T + T - 1)
                for t in range(T):
                    of[o + np.uint64(t)] = wf[src - np.uint64(t)]
                o += np.uint64(T)


def _flipped_weights(w, G):
    """``w`` (K, Cg, 1, KH, KW) C-contiguous -> (G*Cg, Kg, 1, KH, KW): each group's kernels flipped in H and W with
    the channels swapped (:func:`_flip_taps_into`). A workspace (:func:`.memory.scratch`): valid until the next
    call on this thread, never returned to the op's caller."""
    K, Cg, KD, KH, KW = w.shape
    Kg = K // G
    out = memory.scratch("conv.flipped_weights", (G * Cg, Kg, KD, KH, KW), w.dtype)  # (see memory.scratch)
    _flip_taps_into(w.reshape(G, Kg, Cg, KD * KH * KW), out.reshape(G, Cg, Kg, KD * KH * KW))
    return out


# --------------------------------------------------------------------------------------------
# Shared preparation
# --------------------------------------------------------------------------------------------

def _phase_split(x, kw_size, sw, pw, dw, ow):
    """Zero-padded, stride-phase-split copy of ``x`` along W, plus each tap's row offset."""
    wq, offs = _row_layout(kw_size, sw, pw, dw, ow)
    N, C, D, H, _ = x.shape
    xq = np.empty((N, C, D, H, sw * wq), x.dtype)
    _phase_pad(x, pw, sw, wq, xq)
    return xq, wq, offs


#: Output rows narrower than this count as short for the wide layout's rule (:data:`WIDE_SHORT_ROW_OW`).
NARROW_OW = 8
#: Output rows of at most this many columns build their columns by :func:`_im2col_gather` from a padded box
#: instead of row segments (:func:`_im2col`), wherever columns come from :class:`_ColumnSource` (strided
#: forwards, weight gradients, stride-1 layers outside the wide layout). Measured (whole im2col forward /
#: weight gradient, gather against segments): 1 thread, ResNet's 4x4-output layers 0.80-0.88x / 0.82-0.91x
#: (512 channels, batch 1 and 8; the 8x8 -> 4x4 stride-2 layer at batch 8 0.78x / 0.78x). 2 threads, 8-wide
#: rows, interleaved: ResNet-18's 128 -> 256 stride-2 layer 0.78x / 0.80x at batch 8 and 0.78x / 0.83x at
#: batch 1, its 256-channel 8x8 weight gradient 0.88x (batch 1 and 8), DenseNet's 128 -> 32 at 8x8 0.73x
#: (batch 1). 16-wide rows were mixed (0.89-0.94x stride 2, a stride-1 forward 1.27x), so they keep the segments.
GATHER_MAX_OW = 8


@functools.lru_cache(maxsize=512)
def _narrow_offsets(ksz, stride, dilation, out_spatial, box):
    """Each tap's offset from a window's corner and each output position's window corner, as flat indices
    into the zero-padded box ``box`` (D, H, W) of a narrow conv (:func:`_im2col_gather`). Built once per
    geometry and shared read-only: the two meshgrids cost about 20-40 µs a call, a fifth of a batch-1
    DenseNet 3x3 layer at 4x4 (measured here)."""
    KD, KH, KW = ksz
    OD, OH, OW = out_spatial
    _, Hp, Wp = box
    kd, kh, kw = np.meshgrid(np.arange(KD), np.arange(KH), np.arange(KW), indexing="ij")
    tap_off = ((kd * dilation[0] * Hp + kh * dilation[1]) * Wp + kw * dilation[2]).reshape(-1).astype(np.int64)
    od, oh, ow = np.meshgrid(np.arange(OD), np.arange(OH), np.arange(OW), indexing="ij")
    pos = ((od * stride[0] * Hp + oh * stride[1]) * Wp + ow * stride[2]).reshape(-1).astype(np.int64)
    return tap_off, pos  # shared by every call of the geometry, so read only (not flagged: Numba would
    # compile the gather again for read-only arrays)


def _narrow_extent(out_spatial, stride, ksz, dilation) -> tuple:
    """(D, H, W) of the zero-padded box a narrow conv's windows lie in: from the first window's corner to the last
    window's far edge (it may end before the input plus its padding)."""
    return tuple((o - 1) * s_ + (k - 1) * d + 1 for o, s_, k, d in zip(out_spatial, stride, ksz, dilation))


class _ColumnSource:
    """Where the columns of one conv's input come from: ``fill(n0, c0, r0, r1, col)`` writes the columns of
    images ``n0 ..`` (as many as ``col`` holds), channels from ``c0``, output rows ``r0 .. r1`` (rows =
    (od, oh) flattened), in :func:`_im2col`'s layout. Narrow outputs (``OW <= GATHER_MAX_OW``) gather from a
    zero-padded box, the others copy row segments of a stride-phase-split copy."""

    def __init__(self, x, ksz, stride, padding, dilation, out_spatial):
        KW = ksz[2]
        OW = out_spatial[2]
        self.args = (out_spatial, ksz, stride, padding, dilation)
        self.narrow = OW <= GATHER_MAX_OW
        if self.narrow:
            N, C = x.shape[:2]
            ext = _narrow_extent(out_spatial, stride, ksz, dilation)
            self.box = np.empty((N, C, *ext), x.dtype)
            _pad_box(x, padding[0], padding[1], padding[2], self.box)
            self.tap_off, self.pos = _narrow_offsets(tuple(ksz), tuple(stride), tuple(dilation),
                                                     tuple(out_spatial), tuple(ext))
            self.OW = OW
        else:
            self.xq, _, self.offs = _phase_split(x, KW, stride[2], padding[2], dilation[2], OW)

    def fill(self, n0, c0, r0, r1, col):
        if self.narrow:
            _im2col_gather(self.box, n0, c0, self.tap_off, self.pos[r0 * self.OW:r1 * self.OW], col)
        else:
            _im2col(self.xq, n0, c0, r0, r1, *self.args, self.offs, col)


def _unphase_perm(W, sw, pw, wq):
    """Index of input column ``iw`` in a phase-split row (-1 when no tap reaches it)."""
    j = np.arange(W, dtype=np.int64) + pw
    m = j // sw
    return np.where(m < wq, (j % sw) * wq + m, -1).astype(np.int64)


def _is_pointwise(ksz, stride, padding, in_sp, out_sp):
    return (tuple(ksz) == (1, 1, 1) and tuple(stride) == (1, 1, 1)
            and tuple(padding) == (0, 0, 0) and tuple(in_sp) == tuple(out_sp))


def _chunks(N, R, OW, ck, itemsize):
    """Yield (n0, nb, r0, r1) chunks whose column buffer (ck x nb*(r1-r0)*OW) fits the cap."""
    cap = max(1, COL_BUFFER_BYTES // itemsize)
    per_row = max(1, ck * OW)
    if per_row * R <= cap:
        nb = max(1, min(N, cap // (per_row * R)))
        for n0 in range(0, N, nb):
            yield n0, min(nb, N - n0), 0, R
    else:
        rows = max(1, cap // per_row)
        for n0 in range(N):
            for r0 in range(0, R, rows):
                yield n0, 1, r0, min(R, r0 + rows)


_tup = int_tuple  # geometry arguments as int tuples, memoised


def _group_gemm(a, b, out):
    """``out[g] = a[g] @ b[g]`` for every group ``g`` of stacked ``(G, m, k)`` / ``(G, k, n)`` operands, in
    one batched GEMM call (a plain 2-D GEMM when ``G == 1``). Why batched: a grouped conv with narrow
    groups (RegNet's 8 channels per group, 6 to 55 groups) spent its time in one column fill, one GEMM and
    one copy *per group and chunk* (Python and dispatch overhead, tiny GEMMs); one fill of all channels and
    one batched GEMM per chunk took 0.2-0.4x the time (measured, RegNet-Y-400MF's grouped 3x3 layers)."""
    if a.shape[0] == 1:
        blas.matmul(a[0], b[0], out=out[0])
    else:
        blas.matmul(a, b, out=out)
    return out


def _group_gemm_add(a, b, acc):
    """``acc[g] += a[g] @ b[g]`` for every group, in place (the GEMM's own accumulation, beta = 1)."""
    if a.shape[0] == 1:
        blas.matmul_add(a[0], b[0], acc[0])
    else:
        blas.matmul_add(a, b, acc)
    return acc


#: Stride-1 im2col over whole padded rows (:func:`_im2col_wide`): the padded row (``wq``) may be at
#: most this many times the output row (the extra columns are computed by the GEMM and dropped) ...
WIDE_MAX_OVERCOMPUTE = 2.0
#: ... and ``(wq - OW) * Kg`` at most this: per output row the wide layout saves a fixed copy
#: overhead per column row and costs ``(wq - OW) * Kg`` extra multiply-adds per column row
#: (measured, 1 thread: LeNet-5 conv2 (64) forward 1.45x and LeNet-5 conv1 (24) 1.15x faster;
#: Inception 5x5 and ResNet-50 3x3 (128) 4-5% slower).
WIDE_MAX_EXTRA_MACS = 96
#: ... or, whatever ``kg``, output rows of ``NARROW_OW`` to this many columns: the segment copy's fixed cost
#: per (column row, output row) dominates such short rows, and one contiguous copy per column row beats it
#: despite the extra multiply-adds (measured, 2 threads, forward / input gradient: ResNet-18's 3x3 layers of
#: 64-128 channels at 8x8 and 16x16 0.68-0.87x the time at batch 1 and 8, 256 channels at 8x8 0.84-0.94x;
#: 4x4 rows went 1.1-1.25x slower, they keep the gather)
WIDE_SHORT_ROW_OW = 16


#: Stride-1 dense input gradients over at least this many output positions (batch x map) run as the fused
#: im2col forward of the output gradient with the flipped kernel (:mod:`.im2col_fused`). Measured against the
#: paths below, 2 threads, 3x3, float32, time ratio: 8x128->32 at 16x16 0.33 and 8x8 0.74, 64->64 at 32x32
#: batch 1 0.72 and batch 8 0.73, 8x128->128 at 16x16 0.93, 8x256->256 at 8x8 1.03; below 512 positions
#: 1.03-1.82 (batch 1 at 8x8 and 16x16: the flipped weights' copy and a short GEMM outweigh the gain).
FUSED_GRAD_INPUT_MIN_POSITIONS = 512
#: ... and only where the conv does not expand its channels (out_channels <= in_channels): the flipped conv
#: fills ``out_channels * KH * KW`` column entries per position for a GEMM giving ``in_channels`` outputs, so an
#: expanding layer's fill outweighs its GEMM. Measured, batch 8, fused / plain time: SqueezeNet's expand 3x3s
#: 16 -> 64 at 30x30 1.66, 32 -> 128 2.0, 48 -> 192 at 15x15 2.3, 64 -> 256 1.54 (4x expansions); 96 -> 128
#: 1.16; 64 -> 64 0.9, DenseNet's 128 -> 32 0.78.
FUSED_GRAD_INPUT_MAX_EXPANSION = 1

#: Dense input gradients on the GEMM + col2im path with narrow output rows (:data:`GATHER_MAX_OW`) make their columns
#: as ``go^T @ W`` (a row per output position, :func:`_col2im_gather_rows`) rather than ``W^T @ go``: the GEMM then
#: reads the weights as stored, where the transposed operand cost MKL up to 1.7x the time on thin products; with
#: at most :data:`GRAD_INPUT_POSITION_ROWS_MAX_POSITIONS` output positions in the batch (beyond, the product is no
#: longer thin and the scatter from rows cost more). Measured, 2 threads, same process alternating, input gradient
#: ms W^T @ go / go^T @ W (float64 results equal to torch's within 1e-13): batch 1, ResNet's 512 -> 512 3x3 at 4x4
#: 0.99-1.02 / 0.51-0.52, 256 -> 512 stride 2 0.57-0.58 / 0.34-0.35, 512 -> 512 at 7x7 1.56 / 1.11, AlexNet's 384 ->
#: 256 at 7x7 0.72 / 0.51-0.52, 192 -> 384 0.61 / 0.39; batch 4: 512 -> 512 at 4x4 1.79 / 1.46, 192 -> 384 at 4x4
#: 0.67 / 0.53; batch 8 (128 positions): 512 -> 512 at 4x4 2.47-2.56 / 2.20-2.29, 256 -> 512 stride 2 1.50-1.54 /
#: 1.37-1.39, 192 -> 384 at 4x4 1.04-1.09 / 0.90-0.97. Beyond 128 positions slower: batch 4, 384 -> 256 at 7x7
#: (196) 1.64 / 1.78, 128 -> 256 stride 2 at 16x16 (256) 0.92 / 0.99; batch 8 at 7x7 (392) 1.03-1.07x.
GRAD_INPUT_POSITION_ROWS = True
GRAD_INPUT_POSITION_ROWS_MAX_POSITIONS = 128

#: Stride-1 input gradient as a forward conv of the zero-padded output gradient: used while that
#: conv's multiply-adds (over the padded rows) are at most this many times the real ones. Small
#: images with large kernels (LeNet-5 5x5 on 10x10: 2.5x) keep the GEMM + col2im path.
FLIP_MAX_OVERCOMPUTE = 1.5
#: ... and only with fewer than this many output channels per group (the GEMM + col2im path's
#: reduction dimension; Inception 5x5 with 32: 2.2x faster flipped; ResNet 3x3 with 256: 12% slower)
FLIP_MAX_KG = 64
#: ... and at least this many input channels per group (the flipped conv's output channels; with
#: LeNet-5 conv1's single input channel its GEMM degenerates to a matrix-vector product)
FLIP_MIN_CG = 16


#: Grouped convs of at most this many groups, each at least :data:`PER_GROUP_MIN_OUT` output channels wide and of at
#: least :data:`PER_GROUP_MIN_REDUCTION` taps x input channels, run as one dense conv per group (:func:`_per_group`):
#: the dense routes (fused columns, the gather and taps kernels on fastconv's own GEMM) then take each group,
#: where the grouped path builds every group's columns in memory and runs a batched BLAS GEMM. Measured, 2
#: threads, batch 8, ms forward / input gradient / weight gradient, grouped path against the groups run as
#: separate convs (torch's grouped conv): AlexNet's 2-group 96 -> 256 5x5 at 27x27 16.9 / 16.0 / 16.2 against
#: 14.9 / 15.7 / 13.6 (11.7 / 12.2 / 11.5), 2-group 128 -> 128 3x3 at 28x28 6.9 / 8.3 / 7.6 against 4.9 / 4.9 / 5.2
#: (3.3 / 3.6 / 4.1), 4-group 64 -> 64 3x3 at 32x32 3.7 / 3.2 / 4.3 against 2.2 / 2.2 / 2.3 (0.9 / 1.1 / 1.0).
#: Narrow groups (ResNeXt's 32 of 4 channels, RegNet's 8-wide) keep the grouped path: their dense convs are too
#: small for a call each (and ``shift`` / ``group_lanes`` run them anyway).
PER_GROUP_MAX_GROUPS = 8
PER_GROUP_MIN_OUT = 16
PER_GROUP_MIN_REDUCTION = 64


def _per_group(G, Cg, Kg, ksz) -> bool:
    """Whether a grouped conv (not 1x1) runs as one dense conv per group (see :data:`PER_GROUP_MAX_GROUPS`)."""
    return (1 < G <= PER_GROUP_MAX_GROUPS and Kg >= PER_GROUP_MIN_OUT and math.prod(ksz) > 1
            and Cg * math.prod(ksz) >= PER_GROUP_MIN_REDUCTION)


def _wide_ok(ksz, stride, padding, dilation, in_sp, out_sp, kg):
    """Geometry the wide-row stride-1 im2col handles (1-D/2-D, stride 1, padding before >= 0)
    and is worth it for (``kg``: the GEMM dimension each column element is used for)."""
    KD, KH, KW = ksz
    if tuple(stride) != (1, 1, 1) or KD != 1 or in_sp[0] != 1 or out_sp[0] != 1 or padding[0] != 0:
        return False
    if padding[1] < 0 or padding[2] < 0 or out_sp[2] < 1:
        return False
    extra = (KW - 1) * dilation[2]
    return (out_sp[2] + extra <= WIDE_MAX_OVERCOMPUTE * out_sp[2]
            and (extra * kg <= WIDE_MAX_EXTRA_MACS or NARROW_OW <= out_sp[2] <= WIDE_SHORT_ROW_OW))


def _forward_wide(x, w, G, padding, dilation, out_spatial, y):
    """Stride-1 (1-D/2-D) forward into ``y`` (N, K, 1, OH, OW) without bias: columns are
    contiguous slices of the zero-padded, (H, W)-flattened input; one (batched over groups) GEMM per
    chunk of images."""
    N, C, _, H, W = x.shape
    K, Cg, _, KH, KW = w.shape
    Kg = K // G
    _, OH, OW = out_spatial
    dh, dw = dilation[1], dilation[2]
    wq = OW + (KW - 1) * dw
    Hp = OH + (KH - 1) * dh
    xp = np.empty((N, C, Hp * wq + (KW - 1) * dw), x.dtype)
    _pad_wide(x, padding[1], padding[2], wq, xp)
    ck = Cg * KH * KW
    ckt = G * ck
    w3 = w.reshape(G, Kg, ck)
    y5 = y.reshape(N, G, Kg, OH, OW)
    chunks = list(_chunks(N, OH, wq, ckt, x.itemsize))
    qmax = max(nb * (r1 - r0) * wq for _, nb, r0, r1 in chunks)
    colbuf = np.empty(ckt * qmax, x.dtype)
    tmpbuf = np.empty(K * qmax, x.dtype)
    for n0, nb, r0, r1 in chunks:
        nr = r1 - r0
        Q = nr * wq
        col = colbuf[:ckt * nb * Q].reshape(G, ck, nb * Q)
        _im2col_wide(xp, n0, 0, r0 * wq, Q, KH, KW, dh * wq, dw, col.reshape(ckt, nb * Q))
        dst = y5[n0:n0 + nb, :, :, r0:r1]
        if Kg <= GEMM_TRANSPOSED_MAX_K:
            tmp = _group_gemm(col.transpose(0, 2, 1), w3.transpose(0, 2, 1),
                              tmpbuf[:K * nb * Q].reshape(G, nb * Q, Kg))
            dst[...] = tmp.reshape(G, nb, nr, wq, Kg)[:, :, :, :OW].transpose(1, 0, 4, 2, 3)
        else:
            tmp = _group_gemm(w3, col, tmpbuf[:K * nb * Q].reshape(G, Kg, nb * Q))
            dst[...] = tmp.reshape(G, Kg, nb, nr, wq)[..., :OW].transpose(2, 0, 1, 3, 4)
    return y


def _grad_input_wide(go, w, G, padding, dilation, in_spatial, gx):
    """Stride-1 (1-D/2-D) input gradient: one (batched over groups) GEMM per chunk into
    whole-padded-row columns (the output gradient is zero-extended to the padded row length),
    contiguous col2im adds."""
    N, K, _, OH, OW = go.shape
    _, Cg, _, KH, KW = w.shape
    Kg = K // G
    dh, dw = dilation[1], dilation[2]
    wq = OW + (KW - 1) * dw
    Hp = OH + (KH - 1) * dh
    gxp = memory.zeros((N, Cg * G, Hp * wq + (KW - 1) * dw), go.dtype)
    ck = Cg * KH * KW
    ckt = G * ck
    w3T = w.reshape(G, Kg, ck).transpose(0, 2, 1)
    go5 = go.reshape(N, G, Kg, OH, OW)
    chunks = list(_chunks(N, OH, wq, ckt, go.itemsize))
    qmax = max(nb * (r1 - r0) * wq for _, nb, r0, r1 in chunks)
    colbuf = np.empty(ckt * qmax, go.dtype)
    gobuf = np.empty(K * qmax, go.dtype)
    for n0, nb, r0, r1 in chunks:
        nr = r1 - r0
        Q = nr * wq
        gq = gobuf[:K * nb * Q].reshape(G, Kg, nb, nr, wq)
        gq[..., OW:] = 0
        gq[..., :OW] = go5[n0:n0 + nb, :, :, r0:r1].transpose(1, 2, 0, 3, 4)
        col = _group_gemm(w3T, gq.reshape(G, Kg, nb * Q), colbuf[:ckt * nb * Q].reshape(G, ck, nb * Q))
        _col2im_wide(col.reshape(ckt, nb * Q), n0, 0, r0 * wq, Q, KH, KW, dh * wq, dw, gxp)
    _unpad_wide(gxp, padding[1], padding[2], wq, Hp, gx)
    return gx


# --------------------------------------------------------------------------------------------
# Public API: direct
# --------------------------------------------------------------------------------------------

@config.parallel_entry
def direct_forward(x, w, bias, stride, padding, dilation, groups, out_spatial):
    """Direct convolution forward.

    x: (N, C, D, H, W); w: (K, C // groups, KD, KH, KW); bias: (K,) or None.
    Returns y: (N, K, *out_spatial), same dtype as x.
    """
    config.sync_threads()
    x = _c(x)
    w = _c(w)
    stride, padding, dilation, out_spatial = map(_tup, (stride, padding, dilation, out_spatial))
    N, C, D, H, W = x.shape
    K, Cg, KD, KH, KW = w.shape
    OD, OH, OW = out_spatial
    y = memory.empty_aligned((N, K) + out_spatial, x.dtype)
    if y.size == 0:
        return y
    b = np.zeros(K, x.dtype) if bias is None else _c(np.asarray(bias, x.dtype))
    xq, wq, offs = _phase_split(x, KW, stride[2], padding[2], dilation[2], OW)
    dt = _pairs_forward(OD, D, KD, stride[0], padding[0], dilation[0])
    ht = _pairs_forward(OH, H, KH, stride[1], padding[1], dilation[1])
    _rowconv(xq, w, b, int(groups), *dt, *ht,
             np.zeros(1, np.int64), np.full(1, OW, np.int64), np.array([0, KW], np.int64),
             np.arange(KW, dtype=np.int64), offs, np.arange(OW, dtype=np.int64), OW, y)
    return y


@config.parallel_entry
def direct_grad_input(grad_out, w, stride, padding, dilation, groups, in_spatial):
    """Direct convolution input gradient.

    grad_out: (N, K, OD, OH, OW); w: (K, C // groups, KD, KH, KW).
    Returns grad_x: (N, C, *in_spatial); zeros where no output window reaches.
    """
    config.sync_threads()
    go = _c(grad_out)
    w = _c(w)
    stride, padding, dilation, in_spatial = map(_tup, (stride, padding, dilation, in_spatial))
    N, K, OD, OH, OW = go.shape
    _, Cg, KD, KH, KW = w.shape
    G = int(groups)
    Kg = K // G
    C = Cg * G
    D, H, W = in_spatial
    gx = memory.empty_aligned((N, C) + in_spatial, go.dtype)
    if gx.size == 0:
        return gx
    if go.size == 0:
        gx[...] = 0
        return gx
    sw, pw, dw = stride[2], padding[2], dilation[2]
    # weights seen from the input side: wt[g*Cg + c, k] = w[g*Kg + k, c]
    wt = _c(w.reshape(G, Kg, Cg, KD, KH, KW).transpose(0, 2, 1, 3, 4, 5).reshape(C, Kg, KD, KH, KW))
    lp = ((KW - 1) * dw) // sw
    mq = max(1, -(-(pw + W) // sw))
    lsrc = lp + max(mq, OW)
    gop = np.empty((N, K, OD, OH, lsrc), go.dtype)
    _phase_pad(go, lp, 1, lsrc, gop)
    a = np.arange(KW, dtype=np.int64) * dw
    seg_dst, seg_len, seg_t0, tap_kw, tap_off = [], [], [0], [], []
    for ph in range(sw):
        for kw in range(KW):
            if a[kw] % sw == ph:
                tap_kw.append(kw)
                tap_off.append(lp - a[kw] // sw)
        seg_dst.append(ph * mq)
        seg_len.append(mq)
        seg_t0.append(len(tap_kw))
    j = np.arange(W, dtype=np.int64) + pw
    perm = (j % sw) * mq + j // sw
    dt = _pairs_backward(D, OD, KD, stride[0], padding[0], dilation[0])
    ht = _pairs_backward(H, OH, KH, stride[1], padding[1], dilation[1])
    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    _rowconv(gop, wt, np.zeros(C, go.dtype), G, *dt, *ht,
             i64(seg_dst), i64(seg_len), i64(seg_t0), i64(tap_kw), i64(tap_off),
             perm, sw * mq, gx)
    return gx


@config.parallel_entry
def direct_grad_weight(grad_out, x, stride, padding, dilation, groups, kernel_spatial):
    """Direct convolution weight gradient.

    grad_out: (N, K, OD, OH, OW); x: (N, C, D, H, W).
    Returns grad_w: (K, C // groups, *kernel_spatial).
    """
    config.sync_threads()
    go = _c(grad_out)
    x = _c(x)
    stride, padding, dilation, kernel_spatial = map(
        _tup, (stride, padding, dilation, kernel_spatial))
    N, K, OD, OH, OW = go.shape
    _, C, D, H, W = x.shape
    G = int(groups)
    KD, KH, KW = kernel_spatial
    gw = memory.zeros((K, C // G) + kernel_spatial, go.dtype)
    if go.size == 0 or gw.size == 0 or x.size == 0:
        return gw
    xq, wq, offs = _phase_split(x, KW, stride[2], padding[2], dilation[2], OW)
    dt = _pairs_forward(OD, D, KD, stride[0], padding[0], dilation[0])
    ht = _pairs_forward(OH, H, KH, stride[1], padding[1], dilation[1])
    _gw_direct(go, xq, G, *dt, *ht, offs, gw)
    return gw


# --------------------------------------------------------------------------------------------
# Public API: im2col + GEMM
# --------------------------------------------------------------------------------------------

@config.parallel_entry
def im2col_forward(x, w, bias, stride, padding, dilation, groups, out_spatial):
    """im2col + GEMM forward. Same arguments and result as :func:`direct_forward`."""
    config.sync_threads()
    x = _c(x)
    w = _c(w)
    stride, padding, dilation, out_spatial = map(_tup, (stride, padding, dilation, out_spatial))
    N, C, D, H, W = x.shape
    K, Cg, KD, KH, KW = w.shape
    G = int(groups)
    Kg = K // G
    OD, OH, OW = out_spatial
    y = memory.empty_aligned((N, K) + out_spatial, x.dtype)
    if y.size == 0:
        return y
    if _per_group(G, Cg, Kg, (KD, KH, KW)):
        for g in range(G):
            y[:, g * Kg:(g + 1) * Kg] = im2col_forward(
                x[:, g * Cg:(g + 1) * Cg], w[g * Kg:(g + 1) * Kg], None if bias is None else bias[g * Kg:(g + 1) * Kg],
                stride, padding, dilation, 1, out_spatial)
        return y
    R = OD * OH
    P = R * OW
    ck = Cg * KD * KH * KW
    w2 = w.reshape(K, ck)
    y3 = y.reshape(N, K, P)
    if _is_pointwise((KD, KH, KW), stride, padding, (D, H, W), out_spatial):
        x3 = x.reshape(N, C, P)
        if G == 1:
            blas.matmul(w2, x3, out=y3)
        else:
            w3 = w2.reshape(G, Kg, Cg)
            y4 = y3.reshape(N, G, Kg, P)
            for n in range(N):
                _group_gemm(w3, x3[n].reshape(G, Cg, P), y4[n])
    elif thin_input.applies(G, C, (KD, KH, KW), stride, dilation, (D, H, W), out_spatial, padding, x.itemsize):
        # few input channels (an RGB stem): a bank of FIRs over the input's stride phases, no columns
        thin_input.forward(x.reshape(N, C, H, W), w.reshape(K, C, KH, KW), bias, stride[1:], padding[1:], (OH, OW),
                           y.reshape(N, K, OH, OW))
        return y
    elif (im2col_fused.gather_applies((KD, KH, KW), G, (D, H, W), out_spatial,
                                      im2col_fused.small_for_own(K, ck, (KH, KW), stride[1:], x.itemsize,
                                                                 N * OH * OW))
          and im2col_fused.takes_gather_forward((KH, KW), stride[1:], C, K, OW, x.itemsize, N * OH * OW)):
        # no columns: the own GEMM reads the padded input through offset tables, the bias added on the way out
        im2col_fused.forward_gather(x.reshape(N, C, H, W), w2, bias, (KH, KW), stride[1:], padding[1:],
                                    dilation[1:], (OH, OW), y3)
        return y
    elif im2col_fused.applies((KD, KH, KW), G, C, K, (D, H, W), out_spatial, x.itemsize):
        # columns made and multiplied a cache-sized chunk at a time per task, the bias added on the way out
        im2col_fused.forward(x.reshape(N, C, H, W), w2, bias, (KH, KW), stride[1:], padding[1:], dilation[1:],
                             (OH, OW), y3)
        return y
    elif _wide_ok((KD, KH, KW), stride, padding, dilation, (D, H, W), out_spatial, Kg):
        _forward_wide(x, w, G, padding, dilation, out_spatial, y)
    else:
        # every group's columns in one fill and one batched GEMM per chunk (see _group_gemm)
        source = _ColumnSource(x, (KD, KH, KW), stride, padding, dilation, out_spatial)
        ckt = G * ck
        chunks = list(_chunks(N, R, OW, ckt, x.itemsize))
        qmax = max(nb * (r1 - r0) * OW for _, nb, r0, r1 in chunks)
        colbuf = np.empty(ckt * qmax, x.dtype)
        tmpbuf = np.empty(K * qmax, x.dtype)
        w3 = w2.reshape(G, Kg, ck)
        y4 = y3.reshape(N, G, Kg, P)
        for n0, nb, r0, r1 in chunks:
            Q = (r1 - r0) * OW
            col = colbuf[:ckt * nb * Q].reshape(G, ck, nb * Q)
            source.fill(n0, 0, r0, r1, col.reshape(ckt, nb * Q))
            dst = y4[n0:n0 + nb, :, :, r0 * OW:r1 * OW]
            if Kg <= GEMM_TRANSPOSED_MAX_K:
                tmp = _group_gemm(col.transpose(0, 2, 1), w3.transpose(0, 2, 1),
                                  tmpbuf[:K * nb * Q].reshape(G, nb * Q, Kg))
                dst[...] = tmp.reshape(G, nb, Q, Kg).transpose(1, 0, 3, 2)
            elif nb == 1 and r0 == 0 and r1 == R:
                _group_gemm(w3, col, y4[n0])
            elif G == 1 and r0 == 0 and r1 == R and Q >= BATCHED_OUT_MIN_Q:
                # one batched GEMM whose result rows land in each image's place in y: no (K, nb, Q) ->
                # (nb, K, Q) copy of the whole output afterwards
                blas.matmul(w2, col[0].reshape(ck, nb, Q).transpose(1, 0, 2), out=y3[n0:n0 + nb])
            else:
                tmp = _group_gemm(w3, col, tmpbuf[:K * nb * Q].reshape(G, Kg, nb * Q))
                dst[...] = tmp.reshape(G, Kg, nb, Q).transpose(2, 0, 1, 3)
    if bias is not None:
        y3 += np.asarray(bias, x.dtype).reshape(1, K, 1)
    return y


def _go_chunk(go3, n0, nb, k0, k1, r0, r1, OW):
    """Output-gradient chunk as a contiguous (Kg, nb*Q) matrix."""
    v = go3[n0:n0 + nb, k0:k1, r0 * OW:r1 * OW]
    if nb == 1:
        return _c(v[0])
    return _c(v.transpose(1, 0, 2)).reshape(k1 - k0, -1)


@config.parallel_entry
def im2col_grad_input(grad_out, w, stride, padding, dilation, groups, in_spatial):
    """GEMM to columns + col2im input gradient. Same arguments/result as :func:`direct_grad_input`."""
    config.sync_threads()
    go = _c(grad_out)
    w = _c(w)
    stride, padding, dilation, in_spatial = map(_tup, (stride, padding, dilation, in_spatial))
    N, K, OD, OH, OW = go.shape
    _, Cg, KD, KH, KW = w.shape
    G = int(groups)
    Kg = K // G
    C = Cg * G
    D, H, W = in_spatial
    out_spatial = (OD, OH, OW)
    gx = memory.empty_aligned((N, C) + in_spatial, go.dtype)
    if gx.size == 0:
        return gx
    if go.size == 0:
        gx[...] = 0
        return gx
    if _per_group(G, Cg, Kg, (KD, KH, KW)):
        for g in range(G):
            gx[:, g * Cg:(g + 1) * Cg] = im2col_grad_input(go[:, g * Kg:(g + 1) * Kg], w[g * Kg:(g + 1) * Kg], stride,
                                                           padding, dilation, 1, in_spatial)
        return gx
    R = OD * OH
    P = R * OW
    ck = Cg * KD * KH * KW
    w2 = w.reshape(K, ck)
    go3 = go.reshape(N, K, P)
    if _is_pointwise((KD, KH, KW), stride, padding, in_spatial, out_spatial):
        if G == 1:
            blas.matmul(w2.T, go3, out=gx.reshape(N, C, P))
        else:
            w3T = w2.reshape(G, Kg, Cg).transpose(0, 2, 1)
            gx4 = gx.reshape(N, G, Cg, P)
            for n in range(N):
                _group_gemm(w3T, go3[n].reshape(G, Kg, P), gx4[n])
        return gx
    # stride 1: the input gradient is a forward conv of the output gradient with the flipped,
    # transposed weights and padding (k - 1) * d - p (one well-shaped GEMM, no col2im scatter)
    tpad = (0, (KH - 1) * dilation[1] - padding[1], (KW - 1) * dilation[2] - padding[2])
    small = im2col_fused.small_for_own(C, K * KD * KH * KW, (KH, KW), (1, 1), go.itemsize,  # the flipped conv's
                                       grad_input=True)
    if (stride == (1, 1, 1) and im2col_fused.gather_applies((KD, KH, KW), G, out_spatial, in_spatial, small)
            and im2col_fused.takes_gather_forward((KH, KW), (1, 1), K, C, W, go.itemsize, N * H * W, True)):
        # dense: that forward on the gather kernel, whatever the batch and the expansion (no columns to fill).
        # Measured after other work as in a model, 2 threads, gather / previous path: DenseNet's 128 -> 32 at 4x4
        # 0.75 (batch 1 at 8x8 0.74), 8x8 to 32x32 0.84-0.95, 32 -> 128 0.87, 96 -> 128 0.88, GoogLeNet's 5x5
        # 0.74-0.82; 256 -> 256 and 160 -> 320 at 8x8 level.
        im2col_fused.grad_input_gather(go.reshape(N, K, OH, OW), w.reshape(K, C, KH * KW), tpad[1:], dilation[1:],
                                       (H, W), (KH, KW), gx.reshape(N, C, H * W))
        return gx
    if (stride == (1, 1, 1) and N * P >= FUSED_GRAD_INPUT_MIN_POSITIONS
            and (K <= FUSED_GRAD_INPUT_MAX_EXPANSION * C
                 or im2col_fused.takes_narrow_taps((KH, KW), (1, 1), K, C, W, small))
            and im2col_fused.applies((KD, KH, KW), G, K, C, out_spatial, in_spatial, go.itemsize)):
        # dense: that forward with the columns made in cache, or on the taps kernel into few input channels
        # (negative padding, a crop, is read as such)
        wt = _flipped_weights(w, 1).reshape(C, K * KH * KW)
        im2col_fused.forward(go.reshape(N, K, OH, OW), wt, None, (KH, KW), (1, 1), tpad[1:], dilation[1:], (H, W),
                             gx.reshape(N, C, H * W), grad_input=True)
        return gx
    # (worth it when the GEMM + col2im path is thin: few output channels per group to reduce over,
    # a tall column matrix to scatter; its own GEMM needs enough input channels per group)
    flip_macs = H * (W + (KW - 1) * dilation[2])  # per (image, channel pair, tap), vs OH * OW
    if (Kg < FLIP_MAX_KG and Cg >= FLIP_MIN_CG and _wide_ok((KD, KH, KW), stride, tpad, dilation, out_spatial, in_spatial, 0)
            and flip_macs <= FLIP_MAX_OVERCOMPUTE * OH * OW):
        wt = _flipped_weights(w, G)
        return _forward_wide(go, wt, G, tpad, dilation, in_spatial, gx)
    if _wide_ok((KD, KH, KW), stride, padding, dilation, in_spatial, out_spatial, Kg):
        return _grad_input_wide(go, w, G, padding, dilation, in_spatial, gx)
    sw, pw, dw = stride[2], padding[2], dilation[2]
    ksz = (KD, KH, KW)
    narrow = OW <= GATHER_MAX_OW
    if narrow:
        # the columns added into a zero-padded box through the narrow forward's offset tables, then cropped
        ext = _narrow_extent(out_spatial, stride, ksz, dilation)
        gbox = memory.zeros((N, C) + ext, go.dtype)
        tap_off, pos = _narrow_offsets(ksz, tuple(stride), tuple(dilation), tuple(out_spatial), ext)
    else:
        wq, offs = _row_layout(KW, sw, pw, dw, OW)
        gxq = memory.zeros((N, C, D, H, sw * wq), go.dtype)
    ckt = G * ck
    chunks = list(_chunks(N, R, OW, ckt, go.itemsize))
    qmax = max(nb * (r1 - r0) * OW for _, nb, r0, r1 in chunks)
    colbuf = np.empty(ckt * qmax, go.dtype)
    w3T = w2.reshape(G, Kg, ck).transpose(0, 2, 1)
    if narrow and G == 1 and GRAD_INPUT_POSITION_ROWS and N * P <= GRAD_INPUT_POSITION_ROWS_MAX_POSITIONS:
        # the columns with positions as rows, go^T @ W: the GEMM reads the weights as stored
        for n0, nb, r0, r1 in chunks:
            Q = (r1 - r0) * OW
            got = np.ascontiguousarray(go3[n0:n0 + nb, :, r0 * OW:r1 * OW].transpose(0, 2, 1)).reshape(nb * Q, K)
            colt = blas.matmul(got, w2, out=colbuf[:nb * Q * ck].reshape(nb * Q, ck))
            _col2im_gather_rows(colt, n0, tap_off, pos[r0 * OW:r1 * OW], gbox)
        _crop_box(gbox, padding[0], padding[1], padding[2], gx)
        return gx
    for n0, nb, r0, r1 in chunks:
        Q = (r1 - r0) * OW
        goc = _go_chunk(go3, n0, nb, 0, K, r0, r1, OW).reshape(G, Kg, nb * Q)
        col = _group_gemm(w3T, goc, colbuf[:ckt * nb * Q].reshape(G, ck, nb * Q))
        if narrow:
            _col2im_gather(col.reshape(ckt, nb * Q), n0, 0, tap_off, pos[r0 * OW:r1 * OW], gbox)
        else:
            _col2im(col.reshape(ckt, nb * Q), n0, 0, r0, r1, out_spatial, ksz, stride, padding, dilation,
                    offs, gxq)
    if narrow:
        _crop_box(gbox, padding[0], padding[1], padding[2], gx)
    else:
        _unphase(gxq, _unphase_perm(W, sw, pw, wq), gx)
    return gx


@config.parallel_entry
def im2col_grad_weight(grad_out, x, stride, padding, dilation, groups, kernel_spatial):
    """Columns + GEMM weight gradient. Same arguments/result as :func:`direct_grad_weight`."""
    config.sync_threads()
    go = _c(grad_out)
    x = _c(x)
    stride, padding, dilation, kernel_spatial = map(
        _tup, (stride, padding, dilation, kernel_spatial))
    N, K, OD, OH, OW = go.shape
    _, C, D, H, W = x.shape
    G = int(groups)
    Kg = K // G
    Cg = C // G
    KD, KH, KW = kernel_spatial
    out_spatial = (OD, OH, OW)
    if go.size == 0 or K * Cg * KD * KH * KW == 0 or x.size == 0:
        return memory.zeros((K, Cg) + kernel_spatial, go.dtype)
    gw = np.empty((K, Cg) + kernel_spatial, go.dtype)  # every path below writes all of it (its first GEMM: beta 0)
    if _per_group(G, Cg, Kg, kernel_spatial):
        for g in range(G):
            gw[g * Kg:(g + 1) * Kg] = im2col_grad_weight(go[:, g * Kg:(g + 1) * Kg], x[:, g * Cg:(g + 1) * Cg], stride,
                                                         padding, dilation, 1, kernel_spatial)
        return gw
    R = OD * OH
    P = R * OW
    ck = Cg * KD * KH * KW
    gw2 = gw.reshape(K, ck)
    go3 = go.reshape(N, K, P)
    if _is_pointwise(kernel_spatial, stride, padding, (D, H, W), out_spatial):
        # one GEMM per image, accumulated by the GEMM itself (beta = 1) into gw: measured against moving the
        # batch inside each row first (two copies, then one GEMM over the whole batch), 2 threads, batch 8:
        # 0.34-0.84x the time on SqueezeNet's and ResNet-50's 1x1 layers (512 -> 64 at 15x15 1.08 -> 0.60 ms)
        x4 = x.reshape(N, G, Cg, P)
        go4 = go3.reshape(N, G, Kg, P)
        gw3 = gw2.reshape(G, Kg, Cg)
        _group_gemm(go4[0], x4[0].transpose(0, 2, 1), gw3)
        for n in range(1, N):
            _group_gemm_add(go4[n], x4[n].transpose(0, 2, 1), gw3)
        return gw
    if thin_input.GRAD_WEIGHT and thin_input.applies(G, C, kernel_spatial, stride, dilation, (D, H, W), out_spatial,
                                                     padding, x.itemsize, "grad_weight"):
        # few input channels (an RGB stem): register-tile dot products over the input's stride phases, no columns
        thin_input.grad_weight(go.reshape(N, K, OH, OW), x.reshape(N, C, H, W), (KH, KW), stride[1:], padding[1:],
                               gw.reshape(K, C, KH, KW))
        return gw
    if (im2col_fused.gather_applies(kernel_spatial, G, (D, H, W), out_spatial,
                                    im2col_fused.small_for_own(K, ck, (KH, KW), stride[1:], x.itemsize,
                                                               weight_gradient=True))
            and im2col_fused.takes_gather_grad_weight(C, K, KH * KW, x.itemsize)):
        # no columns: the own GEMM reads the padded input through offset tables (dW^T = A @ gy^T)
        im2col_fused.grad_weight_gather(go3, x.reshape(N, C, H, W), (KH, KW), stride[1:], padding[1:],
                                        dilation[1:], (OH, OW), gw2)
        return gw
    if (im2col_fused.GRAD_WEIGHT
            and im2col_fused.applies(kernel_spatial, G, C, K, (D, H, W), out_spatial, x.itemsize,
                                     im2col_fused.MIN_GRAD_WEIGHT_CHUNK_COLUMNS)):
        # columns made in cache per task, each task's GEMM adding into its own accumulator
        im2col_fused.grad_weight(go3, x.reshape(N, C, H, W), (KH, KW), stride[1:], padding[1:], dilation[1:],
                                 (OH, OW), gw2)
        return gw
    source = _ColumnSource(x, kernel_spatial, stride, padding, dilation, out_spatial)
    ckt = G * ck
    chunks = list(_chunks(N, R, OW, ckt, x.itemsize))
    qmax = max(nb * (r1 - r0) * OW for _, nb, r0, r1 in chunks)
    colbuf = np.empty(ckt * qmax, x.dtype)
    # go @ col^T, written straight into the groups' rows of gw (C-contiguous): the other orientation,
    # col @ go^T, needs its (ck, Kg) result added transposed, and that strided add cost more than the GEMM
    # (measured, 2 threads: ResNet-18's 512-channel 4x4 layer at batch 8, 12.2 ms of add after a 2.3 ms GEMM)
    gw3 = gw2.reshape(G, Kg, ck)
    for i, (n0, nb, r0, r1) in enumerate(chunks):
        Q = (r1 - r0) * OW
        col = colbuf[:ckt * nb * Q].reshape(G, ck, nb * Q)
        source.fill(n0, 0, r0, r1, col.reshape(ckt, nb * Q))
        goc = _go_chunk(go3, n0, nb, 0, K, r0, r1, OW).reshape(G, Kg, nb * Q)
        if i == 0:
            _group_gemm(goc, col.transpose(0, 2, 1), gw3)
        else:
            _group_gemm_add(goc, col.transpose(0, 2, 1), gw3)
    return gw


# --------------------------------------------------------------------------------------------
# Non-finite operands: exact IEEE results (padding never multiplies a NaN/Inf into an output that
# does not depend on it; see fastconv.cpu.nonfinite). The only pairs torch does not form are padding zeros times
# weights, so a finite weight proves the forward and the input gradient exact (finite_b_suffices: they read the
# weight or their result, whichever is smaller); the weight gradient pays one read of its result.
# --------------------------------------------------------------------------------------------
from . import nonfinite as _nonfinite  # noqa: E402

direct_forward = _nonfinite.exact(direct_forward, bias=True, finite_b_suffices=True)
direct_grad_input = _nonfinite.exact(direct_grad_input, finite_b_suffices=True)
direct_grad_weight = _nonfinite.exact(direct_grad_weight)
im2col_forward = _nonfinite.exact(im2col_forward, bias=True, finite_b_suffices=True)
im2col_grad_input = _nonfinite.exact(im2col_grad_input, finite_b_suffices=True)
im2col_grad_weight = _nonfinite.exact(im2col_grad_weight)
