"""Numba CPU kernels for depthwise convolution (``groups == in_channels``), declared as ``algo="depthwise"`` in :mod:`fastconv.cpu.algorithms`.

A depthwise convolution has one input channel per group and ``m`` output channels per input channel
(channel multiplier, ``K = m * C``): output channel ``k`` reads input channel ``k // m`` only. The work
per output element is just ``KD*KH*KW`` multiply-adds, so the pass is memory-bound and the generic
grouped loop (4-channel register blocks of a 1-channel reduction, short rows) wastes most of the
machine. These kernels are written for that shape instead:

* **One plane per task.** ``prange`` runs over ``(n, c)`` input planes (forward, input gradient) or over
  ``c`` (weight gradient, which then reduces over the batch inside the task: no races, deterministic).
  The ``m`` output channels of an input channel share the task, so the input plane is read once.
* **Padded, phase-split plane in cache.** The task copies its input plane once into a thread-local
  buffer, zero-padded and split by stride phase in H and W
  (``B[ph_h, ph_w, qh, qw] = x[qh*sh + ph_h - pad_h, qw*sw + ph_w - pad_w]``). Every kernel tap
  ``(kh, kw)`` is then one constant offset into that buffer, whatever stride, padding or dilation.
* **Flat rows.** Output rows are computed with the buffer's row pitch ``Wq = OW + ((KW-1)*dw)//sw``,
  so one output plane is a single contiguous loop of ``OH * Wq`` elements,
  ``O[i] = sum_t w_t * B[off_t + i]``, instead of ``OH`` loops of ``OW`` elements: long loops vectorise
  fully (a 14- or 28-wide row would mostly run in the scalar remainder of a 16-lane loop). The
  ``Lw = Wq - OW`` extra columns per row are computed and dropped (7% for 3x3 on 28x28).
* **Input gradient as a gather.** The input gradient is computed per stride phase of the input, as a
  correlation of the zero-padded output gradient with the taps of that phase (no scatter, no atomics),
  then un-phased into place.
* **Weight gradient as long dot products.** ``gw[k, tap] = sum_i G[i] * B[off_tap + i]`` with the output
  gradient ``G`` laid out at the same pitch ``Wq`` and zero in the dropped columns. Where the
  input plane holds Inf/NaN, ``0 * Inf`` in a dropped column would poison the sum, so such planes take
  an exact row-by-row loop instead (the flat loop would otherwise differ from torch).

**Fast 2-D path** (``D == OD == KD == 1``, any stride, padding, dilation; see ``_fast2d_layout``). The
padded plane above has a row pitch wider than the output, so its extra columns are computed, dropped
and copied out row by row, and the per-row copies into it cost about as much as the convolution on
small planes. The 2-D path instead keeps one copy of the plane per tap column ``kw``, shifted by that
column's offset (deinterleaved for a stride in W), at row pitch exactly ``OW`` and zero where the tap
reads padding, so every output plane is one flat, exact loop written or read in place:

* forward: for ``W == sw*OW`` (MobileNet layers) the copies are whole-plane loops (a contiguous copy,
  or one deinterleaving pass for stride 2) plus a few zeroed wrap-around columns, and a tap column
  that never reads padding reads the phase copy directly; a stride in H is handled by computing
  every row and keeping each ``sh``-th (twice the arithmetic for stride 2, cheaper than row copies);
* input gradient (multiplier 1): the same forward, on the output gradient with the flipped kernel;
  for a stride, on the output gradient scattered into a zero plane (``sh*sw`` times the arithmetic);
* weight gradient: dot products of the output gradient, read in place, with the tap copies; for a
  stride in H the gradient is spread to every ``sh``-th row of a zero plane, except on planes holding
  Inf/NaN, which take exact row-by-row sums (``0 * Inf`` would poison the flat ones).

**Channel-blocked path** (multiplier 1, 2-D; forwards with output planes of at most 16x16, weight gradients
up to 14x14, strided input gradients on input planes up to 32x32; see :func:`_forward2d_cb`): on 7x7 planes
the flat loops above are mostly scalar remainders, so blocks of 64 channels are packed channels-innermost
(register transposes, :func:`.micro_gemm.transpose_to_rows`) and each tile of up to eight output positions by
one vector of channels is summed over every tap in registers (:func:`.fir.channel_rows`). Measured against
the flat path in one process (batch 8, float32, shared machine): 1.3-4x faster on the 7x7-plane layers of
MobileNetV2, ShuffleNetV2, EfficientNet-B0 and ConvNeXt (with the Numba row loops the register tiles
replaced); with the packing in registers also 1.4-2x on 14x14 and 16x16 planes (see :data:`CB_MAX_PLANE`).

All arrays are 5-D ``(N, C, D, H, W)`` (1-D and 2-D convolutions pass size-1 leading dims), weights
``(K, 1, KD, KH, KW)``; ``stride``, ``padding`` (before each dim) and ``dilation`` are 3-tuples; the
output (or input) spatial size is passed explicitly, so the padding after each dim is implied.

Measured (N=8, 3x3 pad 1, float32, one thread, shared and loaded machine, medians interleaved with
torch): the 2-D path is 1.2-2.7x faster than the padded-plane path on 14x14 planes and stride 2, and
about level with torch (oneDNN) there; still 1.2-1.4x slower than torch on 14x14 stride 2 (512 ch)
and for the 14x14 weight gradient, where the per-plane fixed costs dominate.
"""
from __future__ import annotations

from fastconv import config

import numpy as np
from numba import njit, prange

from . import blas, fir, memory, micro_gemm, parallel, task_queue
from .arguments import int_tuple

__all__ = ["depthwise_forward", "depthwise_grad_input", "depthwise_grad_weight", "depthwise_forward_into",
           "separable_forward_fused", "FUSED_BLOCK_BYTES"]

#: Bytes of depthwise output the fused separable path keeps per block (about half of one core's L2
#: here: 1 MiB L2 per core, and the GEMM also streams its output block through L2).
FUSED_BLOCK_BYTES = 512 << 10
#: Chunks of (image, channel) planes per thread in a region, claimed one at a time (:func:`_chunks`).
CHUNKS_PER_THREAD = 8

_JIT = dict(cache=config.CACHE, fastmath=set(config.FASTMATH), nogil=True)


# --------------------------------------------------------------------------------------------------
# Geometry helpers (plain Python, tiny)
# --------------------------------------------------------------------------------------------------

_tup = int_tuple  # geometry arguments as int tuples, memoised


def _flat(a):
    """C-contiguous 1-D view (or copy) of ``a``: the kernels index flat arrays."""
    return np.ascontiguousarray(a).reshape(-1)


def _chunks(ntask):
    """The chunk plan of a region: ``[counter, chunks, workers]`` (int64): ``ntask`` tasks cut into a few runs
    per thread, which ``workers`` threads claim one at a time (:mod:`.task_queue`), so uneven chunks, and a
    thread that shares its core with another process, still balance. (The thread count is read here, not in
    the kernel: ``numba.get_num_threads()`` inside a kernel keeps Numba from caching it.)"""
    threads = config.sync_threads()
    plan = _CHUNK_PLANS.get((ntask, threads))
    if plan is None:
        chunks = max(1, min(ntask, CHUNKS_PER_THREAD * threads))
        plan = np.array([0, chunks, min(chunks, threads)], np.int64)
        if len(_CHUNK_PLANS) >= 1024:
            _CHUNK_PLANS.clear()
        _CHUNK_PLANS[(ntask, threads)] = plan
    return plan.copy()  # the kernel counts in its copy's first entry


_CHUNK_PLANS: dict = {}  # (tasks, threads) -> the plan _chunks copies (a copy costs a third of building one)


def _pairs(n_dst, n_src, k, s, p, d, backward):
    """For each destination index: its (tap, source index) pairs, CSR layout (start, tap, src).

    Forward: output ``o`` reads input ``o*s - p + t*d``. Backward: input ``i`` is read by output
    ``(i + p - t*d) / s`` when that divides exactly and lies in range.
    """
    start = np.zeros(n_dst + 1, np.int64)
    taps, src = [], []
    for o in range(n_dst):
        for t in range(k):
            if backward:
                q = o + p - t * d
                ok = q >= 0 and q % s == 0 and q // s < n_src
                q //= s
            else:
                q = o * s - p + t * d
                ok = 0 <= q < n_src
            if ok:
                taps.append(t)
                src.append(q)
        start[o + 1] = len(taps)
    return start, np.array(taps, np.int64), np.array(src, np.int64)


class _PlaneLayout:
    """The padded, phase-split plane buffer of one input channel (see the module docstring).

    ``Hq x Wq`` per (phase_h, phase_w) sub-plane; ``offsets[kh*KW + kw]`` is tap (kh, kw)'s start.
    """

    def __init__(self, kernel, out_hw, stride, dilation):
        (KH, KW), (OH, OW), (sh, sw), (dh, dw) = kernel, out_hw, stride, dilation
        self.Lh, self.Lw = ((KH - 1) * dh) // sh, ((KW - 1) * dw) // sw
        self.Hq, self.Wq = OH + self.Lh, OW + self.Lw
        self.sub = self.Hq * self.Wq
        self.plane = sh * sw * self.sub
        offs = np.empty(KH * KW, np.int64)
        for kh in range(KH):
            for kw in range(KW):
                ah, aw = kh * dh, kw * dw
                offs[kh * KW + kw] = ((ah % sh) * sw + aw % sw) * self.sub + (ah // sh) * self.Wq + aw // sw
        self.offsets = offs


# --------------------------------------------------------------------------------------------------
# Numba kernels. Arrays arrive flattened (1-D) with explicit index arithmetic: a slice or row view in
# an inner loop costs a reference-count update on the shared parent array, which measured as a large
# share of the time on small (14x14) planes. Tasks are processed in chunks so each thread allocates its
# plane buffers once, not once per plane.
# --------------------------------------------------------------------------------------------------

@njit(**_JIT)
def _fill_plane(x, xbase, D, H, W, sh, sw, ph, pw, Hq, Wq, sub, buf, zero, track):
    """Copy the input plane starting at ``x[xbase]`` (D, H, W) into ``buf`` padded and phase-split.

    With ``track``, returns ``sum(0 * x)`` over the plane: NaN when it holds Inf/NaN, so the weight
    gradient can switch such planes to its exact path (a separate contiguous pass that vectorises; in
    the strided copy loop the serial sum was the bottleneck).
    Works on 2-D views (one per sub-plane); only the contiguous stride-1 row copy takes row views, which
    lets it vectorise (measured: per-row views cost more than they save for the strided copy).
    """
    plane = sh * sw * sub
    probe = zero
    if track:
        xs = x[xbase:xbase + D * H * W]
        for i in range(D * H * W):
            probe += xs[i] * 0
    for d in range(D):
        xp = x[xbase + d * H * W:xbase + (d + 1) * H * W].reshape((H, W))
        for a in range(sh):
            # rows qh with 0 <= qh*sh + a - ph < H
            hlo = min(Hq, max(0, -((a - ph) // sh)))
            hhi = max(hlo, min(Hq, (H + ph - a + sh - 1) // sh))
            for b in range(sw):
                bp = buf[d * plane + (a * sw + b) * sub:d * plane + (a * sw + b + 1) * sub].reshape((Hq, Wq))
                qlo = min(Wq, max(0, -((b - pw) // sw)))
                qhi = max(qlo, min(Wq, (W + pw - b + sw - 1) // sw))
                shift = b - pw
                for qh in range(Hq):
                    if qh < hlo or qh >= hhi:
                        for q in range(Wq):
                            bp[qh, q] = zero
                        continue
                    ih = qh * sh + a - ph
                    for q in range(qlo):
                        bp[qh, q] = zero
                    if sw == 1:
                        # contiguous: row views let the copy vectorise
                        dst = bp[qh, qlo:qhi]
                        src = xp[ih, qlo + shift:qhi + shift]
                        for q in range(qhi - qlo):
                            dst[q] = src[q]
                    else:
                        for q in range(qlo, qhi):
                            bp[qh, q] = xp[ih, q * sw + shift]
                    for q in range(qhi, Wq):
                        bp[qh, q] = zero
    return probe


@njit(**_JIT)
def _taps(src, offs, wts, T, out, L, zero):
    """``out[i] = sum_{t < T} wts[t] * src[offs[t] + i]`` for ``i < L`` (src and out contiguous): :func:`.fir.fir`,
    every tap summed in registers over a tile of outputs and stored once. (The Numba loops it replaced made one
    pass over ``out`` per three taps; per 32x32 plane with ConvNeXt's 49 taps, one thread: 1.41 against 0.95 µs.)
    ``zero`` is unused (kept for the callers' signature)."""
    fir.fir(src, offs, wts, T, out, L)


@njit(**_JIT)
def _fill_flat(x, xb, H, W, sw, ph, pw, dw, KW, Hq, OW, kstride, M, B):
    """The ``flat`` fill (no H split, ``W == sw*OW``; see :func:`_fast2d_layout`). The plane is first
    split into its ``sw`` column phases, each one contiguous (stride 1) or deinterleaving (stride 2)
    loop over the whole plane into slot ``KW + b``, where row ``qh`` holds input row ``qh - ph`` and
    the rows around stay zero. A tap column whose shifted read stays inside the input rows reads that
    slot directly; the others get a shifted contiguous copy in slot ``kw`` with the columns that
    wrapped into the neighbouring row zeroed."""
    qn = min(H * OW, (Hq - ph) * OW + M)
    if sw == 2:
        src = x[xb:xb + 2 * qn]
        p0 = (KW * kstride) + M + ph * OW
        p1 = p0 + kstride
        d0 = B[p0:p0 + qn]
        d1 = B[p1:p1 + qn]
        for q in range(qn):
            d0[q] = src[2 * q]
            d1[q] = src[2 * q + 1]
    else:
        for b in range(sw):
            pb = (KW + b) * kstride + M + ph * OW
            dst = B[pb:pb + qn]
            src = x[xb + b:xb + b + sw * (qn - 1) + 1]
            if sw == 1:
                for q in range(qn):
                    dst[q] = src[q]
            else:
                for q in range(qn):
                    dst[q] = src[sw * q]
    L = Hq * OW
    for kw in range(KW):
        s = kw * dw - pw
        zlo = (-s + sw - 1) // sw if s < 0 else 0
        zhi = min(OW, (W - s + sw - 1) // sw) if W - s > 0 else 0
        if zlo == 0 and zhi == OW:
            continue
        bph = s % sw
        e = (s - bph) // sw
        base = M + kw * kstride
        src = B[(KW + bph) * kstride + M + e:(KW + bph) * kstride + M + e + L]
        dst = B[base:base + L]
        for i in range(L):
            dst[i] = src[i]
        for qh in range(Hq):
            r = base + qh * OW
            for ow in range(zlo):
                B[r + ow] = 0
            for ow in range(zhi, OW):
                B[r + ow] = 0


@njit(**_JIT)
def _fill_kw(x, xb, H, W, sh, sw, ph, pw, dw, KW, Hq, OW, kstride, M, flat, B):
    """Fill the fast 2-D path's plane buffers (see :func:`_fast2d_layout`) from the (H, W) plane at
    ``x[xb]``: for each tap column ``kw``, ``B[M + kw*kstride + (a*Hq + qh)*OW + ow]`` =
    ``x[qh*sh + a - ph, ow*sw + kw*dw - pw]``, zero outside the input. Positions outside the input
    are never written by the row fill, so they keep the zeros of the fresh buffer; the ``flat`` fill
    (stride 1, ``OW == W``) instead copies the whole plane contiguously, shifted, and then zeroes the
    ``|s|`` columns per row that wrapped around from the neighbouring row."""
    if flat:
        _fill_flat(x, xb, H, W, sw, ph, pw, dw, KW, Hq, OW, kstride, M, B)
        return
    for kw in range(KW):
        base = M + kw * kstride
        s = kw * dw - pw
        lo = (-s + sw - 1) // sw if s < 0 else 0
        hi = min(OW, (W - 1 - s) // sw + 1) if W - 1 - s >= 0 else 0
        if hi <= lo:
            continue
        cnt = hi - lo
        for a in range(sh):
            for qh in range(Hq):
                ih = qh * sh + a - ph
                if ih < 0 or ih >= H:
                    continue
                r = base + (a * Hq + qh) * OW + lo
                dst = B[r:r + cnt]
                s1 = xb + ih * W + lo * sw + s
                src = x[s1:s1 + (cnt - 1) * sw + 1]
                if sw == 1:
                    for q in range(cnt):
                        dst[q] = src[q]
                elif sw == 2:
                    for q in range(cnt):
                        dst[q] = src[2 * q]
                else:
                    for q in range(cnt):
                        dst[q] = src[sw * q]


@parallel.kernel(work_arg=0, compute=True, **_JIT)
def _forward2d(x, N, C, H, W, w, KH, KW, bias, m, sh, sw, ph, pw, dw, Hq, kstride, M, blen, flat, offs, shb,
               y, OH, OW, y_chan0, y_nstride, chunks):
    """Depthwise 2-D forward at output row pitch ``OW`` (see :func:`_fast2d_layout`): one flat,
    exact, vectorised loop over the whole output plane, written straight into ``y``. With a stride
    in H (``shb == 1 < sh``), the loop computes every padded-input row and the output keeps each
    ``sh``-th (one contiguous row copy per output row): twice the arithmetic for stride 2, which is
    cheaper than the per-row copies a phase-split buffer costs."""
    P = OH * OW
    T = KH * KW
    Lz = ((OH - 1) * sh + 1) * OW if shb < sh else 1
    ntask = N * C
    zero = np.zeros(1, y.dtype)[0]
    nchunks = chunks[1]
    workers = chunks[2]
    for _ in prange(workers):  # one iteration per thread, which claims chunks
        B = np.zeros(blen, y.dtype)
        Z = np.empty(Lz, y.dtype)
        wts = np.empty(T, y.dtype)
        while True:
            chunk = task_queue.claim(chunks)
            if chunk >= nchunks:
                break
            for task in range(chunk * ntask // nchunks, (chunk + 1) * ntask // nchunks):
                n = task // C
                c = task - n * C
                _fill_kw(x, task * H * W, H, W, shb, sw, ph, pw, dw, KW, Hq, OW, kstride, M, flat, B)
                for j in range(m):
                    k = c * m + j
                    for t in range(T):
                        wts[t] = w[k * T + t]
                    bv = bias[k]
                    ybase = (n * y_nstride + y_chan0 + k) * P
                    yv = y[ybase:ybase + P]
                    if shb == sh:
                        _taps(B, offs, wts, T, yv, P, zero)
                        for i in range(P):
                            yv[i] += bv
                    else:
                        _taps(B, offs, wts, T, Z, Lz, zero)
                        for oh in range(OH):
                            yr = yv[oh * OW:(oh + 1) * OW]
                            zr = Z[oh * sh * OW:(oh * sh + 1) * OW]
                            for ow in range(OW):
                                yr[ow] = zr[ow] + bv


@njit(**_JIT)
def _dots(G, B, offs, T, L, acc, a0, zero):
    """``acc[a0 + t] += sum_{i < L} G[i] * B[offs[t] + i]``, three taps per pass over ``G``."""
    t = 0
    while t + 3 <= T:
        oa, ob, oc = offs[t], offs[t + 1], offs[t + 2]
        sa = sb = sc = zero
        xa, xb, xc = B[oa:oa + L], B[ob:ob + L], B[oc:oc + L]
        for i in range(L):
            g = G[i]
            sa += g * xa[i]
            sb += g * xb[i]
            sc += g * xc[i]
        acc[a0 + t] += sa
        acc[a0 + t + 1] += sb
        acc[a0 + t + 2] += sc
        t += 3
    while t < T:
        oa = offs[t]
        sa = zero
        xa = B[oa:oa + L]
        for i in range(L):
            sa += G[i] * xa[i]
        acc[a0 + t] += sa
        t += 1


@parallel.kernel(work_arg=0, compute=True, **_JIT)
def _grad_weight2d(go, N, K, OH, OW, x, C, H, W, KH, KW, m, sh, sw, ph, pw, dw, Hq, kstride, M, blen, flat,
                   offs, shb, gw):
    """Depthwise 2-D weight gradient on the fast path's buffers: ``gw[k, t] = sum_n sum_i
    go[n, k, i] * B[offs[t] + i]``, the output gradient read in place (same pitch ``OW``). Parallel
    over input channels, each reducing over the batch itself (deterministic for any thread count).
    Exact: the buffer holds zeros only where the input is padding, so no ``0 * Inf`` terms appear,
    except with a stride in H (``shb < sh``), where the gradient is spread over every ``sh``-th row of
    ``Gz`` and planes holding Inf/NaN take exact row-by-row sums instead."""
    P = OH * OW
    T = KH * KW
    zero = np.zeros(1, gw.dtype)[0]
    L = ((OH - 1) * sh + 1) * OW if shb < sh else P
    for c in prange(C):
        B = np.zeros(blen, gw.dtype)
        Gz = np.zeros(L, gw.dtype)  # shb < sh: the output gradient at every sh-th row, zero rows between
        acc = np.zeros(m * T, gw.dtype)
        for n in range(N):
            xb = (n * C + c) * H * W
            _fill_kw(x, xb, H, W, shb, sw, ph, pw, dw, KW, Hq, OW, kstride, M, flat, B)
            finite = True
            if shb < sh:
                probe = zero
                xs = x[xb:xb + H * W]
                for i in range(H * W):
                    probe += xs[i] * 0
                finite = probe == 0
            for j in range(m):
                k = c * m + j
                G = go[(n * K + k) * P:(n * K + k + 1) * P]
                if shb < sh and not finite:
                    # the zero rows of Gz would meet Inf/NaN input rows (0 * Inf): exact row-by-row sums
                    for t in range(T):
                        sa = zero
                        for oh in range(OH):
                            xo = offs[t] + oh * sh * OW
                            xr = B[xo:xo + OW]
                            gr = G[oh * OW:(oh + 1) * OW]
                            for ow in range(OW):
                                sa += gr[ow] * xr[ow]
                        acc[j * T + t] += sa
                elif shb < sh:
                    for oh in range(OH):
                        gd = Gz[oh * sh * OW:(oh * sh + 1) * OW]
                        gs = G[oh * OW:(oh + 1) * OW]
                        for ow in range(OW):
                            gd[ow] = gs[ow]
                    _dots(Gz, B, offs, T, L, acc, j * T, zero)
                else:
                    _dots(G, B, offs, T, L, acc, j * T, zero)
        for i in range(m * T):
            gw[c * m * T + i] = acc[i]


@parallel.kernel(work_arg=0, compute=True, **_JIT)
def _grad_input2d_up(go, N, C, OH, OW, wf, KH, KW, sh, sw, H, W, Hu, ph, pw, dw, Hq, kstride, M, blen, flat,
                     offs, shb, gx, chunks):
    """Strided depthwise 2-D input gradient (multiplier 1) as a stride-1 forward: each output-gradient
    plane is scattered into a thread-local plane ``U`` (``Hu x W``, zero between the strided
    positions, which are never written), which is then correlated with the flipped kernel ``wf``
    (padding ``ph, pw``) by the fast forward's flat fill and tap loop, straight into ``gx``. The tap
    loop does ``sh*sw`` times the useful arithmetic, which measured cheaper than the phase-gathered
    path's per-row copies."""
    P = H * W
    T = KH * KW
    ntask = N * C
    zero = np.zeros(1, gx.dtype)[0]
    nchunks = chunks[1]
    workers = chunks[2]
    for _ in prange(workers):  # one iteration per thread, which claims chunks
        B = np.zeros(blen, gx.dtype)
        U = np.zeros(Hu * W, gx.dtype)
        wts = np.empty(T, gx.dtype)
        while True:
            chunk = task_queue.claim(chunks)
            if chunk >= nchunks:
                break
            for task in range(chunk * ntask // nchunks, (chunk + 1) * ntask // nchunks):
                c = task % C
                g = go[task * OH * OW:(task + 1) * OH * OW]
                for oh in range(OH):
                    ur = U[oh * sh * W:oh * sh * W + (OW - 1) * sw + 1]
                    gr = g[oh * OW:(oh + 1) * OW]
                    for ow in range(OW):
                        ur[ow * sw] = gr[ow]
                _fill_kw(U, 0, Hu, W, 1, 1, ph, pw, dw, KW, Hq, W, kstride, M, flat, B)
                for t in range(T):
                    wts[t] = wf[c * T + t]
                _taps(B, offs, wts, T, gx[task * P:(task + 1) * P], P, zero)


def _fast2d_layout(in_hw, out_hw, kernel, stride, padding, dilation, split_h=True):
    """Geometry of the fast 2-D path (``D == OD == KD == 1``), or None where it does not apply.

    Instead of one padded plane read with a row pitch wider than the output (whose extra columns
    must be computed, dropped and copied out row by row), the buffer holds one copy of the plane per
    tap column ``kw``, already shifted by that column's offset (and deinterleaved for a stride in W)
    at row pitch exactly ``OW``, zero where the tap falls in the padding: output ``i = oh*OW + ow``
    reads tap ``(kh, kw)`` at ``offs[t] + i``. The whole output plane is then one flat, exact loop,
    written (or, for the weight gradient, read) in place. With ``split_h`` the copies are also split
    by stride phase in H; without it (the forward) each padded input row is kept once and the
    forward computes all rows and keeps every ``sh``-th. ``flat``: no H split and ``W == sw*OW``:
    each copy is one contiguous (or stride-``sw``) loop over the whole plane, then the few wrapped
    columns are zeroed. The copies cost ``KW`` planes of stores, in cache.
    Returns (Hq, kstride, M, blen, flat, offs, shb): ``shb`` is the H stride the buffer is split by.
    """
    (H, W), (OH, OW), (KH, KW), (sh, sw), (ph, pw), (dh, dw) = in_hw, out_hw, kernel, stride, padding, dilation
    if OH * OW == 0 or min(ph, pw) < 0:
        return None
    shb = sh if split_h else 1
    if shb == sh:
        Hq = OH + ((KH - 1) * dh) // sh
    else:
        Hq = (OH - 1) * sh + 1 + (KH - 1) * dh
    smax = max(abs(kw * dw - pw) for kw in range(KW))
    flat = shb == 1 and W == sw * OW and smax < W
    M = smax + 1
    kstride = shb * Hq * OW + 2 * M + W
    blen = (KW + (sw if flat else 0)) * kstride
    offs = np.empty(KH * KW, np.int64)
    for kw in range(KW):
        s = kw * dw - pw
        base = M + kw * kstride
        if flat and 0 <= s and (W - 1 - s) // sw + 1 >= OW:
            # every output column reads inside the input: read the phase slot directly
            base = (KW + s % sw) * kstride + M + s // sw
        for kh in range(KH):
            ah = kh * dh
            offs[kh * KW + kw] = base + ((ah % shb) * Hq + ah // shb) * OW
    return Hq, kstride, M, blen, flat, offs, shb


@parallel.kernel(work_arg=0, compute=True, **_JIT)
def _forward(x, N, C, D, H, W, w, KD, KHW, bias, m, sh, sw, ph, pw, Hq, Wq, sub, toff,
             dstart, dtap, dsrc, y, OD, OH, OW, y_chan0, y_nstride, chunks):
    """Depthwise forward. x (N, C, D, H, W) flat; w (C*m, KD, KH*KW) flat; bias (C*m,).

    Output channel ``k`` of image ``n`` goes to plane ``n * y_nstride + y_chan0 + k`` of ``y``
    (planes of OD*OH*OW, flat): the plain forward has ``y_nstride = C*m``; the fused separable path
    passes a per-block buffer.
    """
    plane = sh * sw * sub
    L = OH * Wq
    ntask = N * C
    zero = np.zeros(1, y.dtype)[0]
    nchunks = chunks[1]
    workers = chunks[2]
    for _ in prange(workers):  # one iteration per thread, which claims chunks
        # + Wq slack: the dropped columns of the last row read up to Lw < Wq past the sub-plane.
        buf = np.zeros(D * plane + Wq, y.dtype)
        obuf = np.empty(L, y.dtype)
        offs = np.empty(KD * KHW, np.int64)
        wts = np.empty(KD * KHW, y.dtype)
        while True:
            chunk = task_queue.claim(chunks)
            if chunk >= nchunks:
                break
            for task in range(chunk * ntask // nchunks, (chunk + 1) * ntask // nchunks):
                n = task // C
                c = task - n * C
                _fill_plane(x, task * D * H * W, D, H, W, sh, sw, ph, pw, Hq, Wq, sub, buf, zero, False)
                for j in range(m):
                    k = c * m + j
                    bv = bias[k]
                    for od in range(OD):
                        T = 0
                        for p in range(dstart[od], dstart[od + 1]):
                            kd = dtap[p]
                            base = dsrc[p] * plane
                            for t in range(KHW):
                                offs[T] = base + toff[t]
                                wts[T] = w[(k * KD + kd) * KHW + t]
                                T += 1
                        _taps(buf, offs, wts, T, obuf, L, zero)
                        ybase = ((n * y_nstride + y_chan0 + k) * OD + od) * OH * OW
                        for oh in range(OH):
                            yrow = y[ybase + oh * OW:ybase + (oh + 1) * OW]
                            orow = obuf[oh * Wq:oh * Wq + OW]
                            for ow in range(OW):
                                yrow[ow] = orow[ow] + bv


@parallel.kernel(work_arg=0, compute=True, **_JIT)
def _grad_input(go, N, K, OD, OH, OW, w, KD, KHW, m, sh, sw, ph, pw, Lh, Lw, q0h, q0w, Qh, Wg,
                dstart, dtap, dsrc, tkhw, toff, pstart, gx, C, D, H, W, chunks):
    """Depthwise input gradient, gathered per stride phase. go (N, C*m, OD, OH, OW) -> gx (N, C, D, H, W),
    all flat; w (C*m, KD, KH*KW) flat.

    For input phase ``P = (ph_h, ph_w)`` the padded input position ``(qh*sh + ph_h, qw*sw + ph_w)`` gets
    ``sum w[k, kd, kh, kw] * go[k, od, qh - a_h, qw - a_w]`` over the taps with ``kh*dh % sh == ph_h``
    (``a_h = (kh*dh - ph_h) // sh``, same in W). ``G`` is ``go`` zero-padded by (Lh, Lw) before and
    shifted by (q0h, q0w), so each tap is one offset; phase ``P``'s taps are ``pstart[P]:pstart[P+1]``
    of (tkhw, toff).
    """
    Gr = Qh + Lh
    Gs = Gr * Wg
    Sn = Qh * Wg
    nph = sh * sw
    ntask = N * C
    zero = np.zeros(1, gx.dtype)[0]
    nchunks = chunks[1]
    workers = chunks[2]
    for _ in prange(workers):  # one iteration per thread, which claims chunks
        G = np.zeros(m * OD * Gs + Lw + 1, gx.dtype)
        S = np.empty(Sn, gx.dtype)
        ntap = m * KD * KHW
        offs = np.empty(ntap, np.int64)
        wts = np.empty(ntap, gx.dtype)
        while True:
            chunk = task_queue.claim(chunks)
            if chunk >= nchunks:
                break
            for task in range(chunk * ntask // nchunks, (chunk + 1) * ntask // nchunks):
                n = task // C
                c = task - n * C
                for j in range(m):
                    for od in range(OD):
                        gsrc = ((n * K + c * m + j) * OD + od) * OH * OW
                        base = (j * OD + od) * Gs
                        for g in range(Gr):
                            r0 = base + g * Wg
                            oh = g + q0h - Lh
                            if oh < 0 or oh >= OH:
                                for gc in range(Wg):
                                    G[r0 + gc] = zero
                                continue
                            srow = gsrc + oh * OW
                            # columns gc map to ow = gc + q0w - Lw; zero outside [0, OW)
                            lo = min(Wg, max(0, Lw - q0w))
                            hi = max(lo, min(Wg, OW + Lw - q0w))
                            for gc in range(lo):
                                G[r0 + gc] = zero
                            shift = srow + q0w - Lw
                            gdst = G[r0 + lo:r0 + hi]
                            gsrc_ = go[shift + lo:shift + hi]
                            for gc in range(hi - lo):
                                gdst[gc] = gsrc_[gc]
                            for gc in range(hi, Wg):
                                G[r0 + gc] = zero
                for id_ in range(D):
                    for P in range(nph):
                        T = 0
                        for j in range(m):
                            k = c * m + j
                            for p in range(dstart[id_], dstart[id_ + 1]):
                                kd = dtap[p]
                                base = (j * OD + dsrc[p]) * Gs
                                for t in range(pstart[P], pstart[P + 1]):
                                    offs[T] = base + toff[t]
                                    wts[T] = w[(k * KD + kd) * KHW + tkhw[t]]
                                    T += 1
                        _taps(G, offs, wts, T, S, Sn, zero)
                        a = P // sw
                        b = P - a * sw
                        # un-phase: input (ih, iw) of this phase is S[(ih+ph)//sh - q0h, (iw+pw)//sw - q0w]
                        ih0 = (a - ph) % sh
                        iw0 = (b - pw) % sw
                        gbase = ((n * C + c) * D + id_) * H * W
                        for ih in range(ih0, H, sh):
                            srow = ((ih + ph) // sh - q0h) * Wg
                            grow = gbase + ih * W
                            if sw == 1:
                                s0 = srow + pw - q0w
                                gdst = gx[grow:grow + W]
                                ssrc = S[s0:s0 + W]
                                for iw in range(W):
                                    gdst[iw] = ssrc[iw]
                            elif W > iw0:
                                cnt = (W - iw0 + sw - 1) // sw
                                s0 = srow + (iw0 + pw) // sw - q0w
                                gdst = gx[grow + iw0:grow + W:sw]
                                ssrc = S[s0:s0 + cnt]
                                for t in range(cnt):
                                    gdst[t] = ssrc[t]


@parallel.kernel(work_arg=0, compute=True, **_JIT)
def _grad_weight(go, N, K, OD, OH, OW, x, C, D, H, W, m, sh, sw, ph, pw, Hq, Wq, sub, toff,
                 dstart, dtap, dsrc, gw, KD, KHW):
    """Depthwise weight gradient. go (N, C*m, OD, OH, OW), x (N, C, D, H, W) flat -> gw (C*m, KD, KH*KW).

    Parallel over input channels; each task owns the ``m`` weights of its channel and reduces over
    the whole batch itself (no races, the same result for any thread count).
    """
    plane = sh * sw * sub
    L = OH * Wq
    zero = np.zeros(1, gw.dtype)[0]
    for c in prange(C):
        buf = np.zeros(D * plane + Wq, gw.dtype)
        G = np.zeros(L, gw.dtype)  # the dropped columns (ow >= OW) stay zero
        acc = np.zeros((m, KD, KHW), gw.dtype)
        for n in range(N):
            probe = _fill_plane(x, (n * C + c) * D * H * W, D, H, W, sh, sw, ph, pw, Hq, Wq, sub, buf, zero, True)
            exact = probe != 0 or np.isnan(probe)
            for j in range(m):
                k = c * m + j
                for od in range(OD):
                    gsrc = ((n * K + k) * OD + od) * OH * OW
                    if exact:
                        for p in range(dstart[od], dstart[od + 1]):
                            kd = dtap[p]
                            base = dsrc[p] * plane
                            for t in range(KHW):
                                s = zero
                                for oh in range(OH):
                                    xo = base + toff[t] + oh * Wq
                                    xr = buf[xo:xo + OW]
                                    gr = go[gsrc + oh * OW:gsrc + (oh + 1) * OW]
                                    for ow in range(OW):
                                        s += gr[ow] * xr[ow]
                                acc[j, kd, t] += s
                        continue
                    for oh in range(OH):
                        gdst = G[oh * Wq:oh * Wq + OW]
                        gr = go[gsrc + oh * OW:gsrc + (oh + 1) * OW]
                        for ow in range(OW):
                            gdst[ow] = gr[ow]
                    for p in range(dstart[od], dstart[od + 1]):
                        kd = dtap[p]
                        base = dsrc[p] * plane
                        t = 0
                        while t + 3 <= KHW:
                            oa, ob, oc = base + toff[t], base + toff[t + 1], base + toff[t + 2]
                            sa = sb = sc = zero
                            xa, xb, xc = buf[oa:oa + L], buf[ob:ob + L], buf[oc:oc + L]
                            for i in range(L):
                                g = G[i]
                                sa += g * xa[i]
                                sb += g * xb[i]
                                sc += g * xc[i]
                            acc[j, kd, t] += sa
                            acc[j, kd, t + 1] += sb
                            acc[j, kd, t + 2] += sc
                            t += 3
                        while t < KHW:
                            oa = base + toff[t]
                            sa = zero
                            xa = buf[oa:oa + L]
                            for i in range(L):
                                sa += G[i] * xa[i]
                            acc[j, kd, t] += sa
                            t += 1
        for j in range(m):
            for kd in range(KD):
                for t in range(KHW):
                    gw[((c * m + j) * KD + kd) * KHW + t] = acc[j, kd, t]



# --------------------------------------------------------------------------------------------------
# Channel-blocked path for small planes (multiplier 1, 2-D). On planes of 7x7 or 14x14 the flat
# per-plane loops above are short (49 or 196 elements: mostly the scalar remainder of a 16-lane,
# 4-way interleaved loop) and carry per-plane fixed costs, so 5x5 and 7x7 kernels ran 5-20x slower
# than torch there. This path vectorises across channels instead: a task packs one image's block of
# ``_CB`` channels channels-innermost (``Xp[hp, phase_w, wq, c]``, zero-padded, split by stride phase
# in W) and sums each tile of up to eight output positions by one vector of channels over every tap in
# registers (:func:`.fir.channel_rows`: per tap one weight vector ``Wt[t, c]``, rebuilt only when the
# channel block changes, tasks running block-major). Each output element sums its taps in the same order
# whatever the thread count (deterministic).
# --------------------------------------------------------------------------------------------------

#: Channels per block of the channel-blocked path: one 64-lane row segment per output position
#: (4 AVX-512 float32 vectors), so the row loop has no remainder and the packed block of a 14x14
#: plane (16*16*64 floats) stays in L2.
_CB = 64
#: Largest output plane (OH * OW) whose weight gradient takes the channel-blocked path; larger planes
#: vectorise well along the plane itself. Measured with the register-transposed packing (2 threads, batch 8,
#: 3x3, ms channel-blocked / flat, two runs): 384 x 14x14 0.37-0.41 / 0.57-0.58; 192 x 16x16 0.32-0.44 /
#: 0.37-0.39 (mixed); 144 x 32x32 1.5-1.7 / 0.5-0.8.
CB_MAX_PLANE = 14 * 14
#: ... for forwards (and stride-1 input gradients, which run as forwards), any kernel: same measurements,
#: 192 x 16x16 0.25-0.28 / 0.41-0.57, 384 x 14x14 0.49-0.57 / 0.77-0.96, 240 x 16x16 5x5 0.52-0.60 / 0.67-0.81,
#: 144 x 32x32 mixed (0.71-1.24 / 0.95-1.02) and stays flat, as do ConvNeXt's 96 x 32x32 7x7 (4.2 / 2.0 ms
#: before the packing was rewritten).
CB_MAX_FORWARD_PLANE = 16 * 16
#: ... and up to this plane for kernels of at least :data:`CB_WIDE_KERNEL_TAPS` taps (5x5, 7x7) when the call has at
#: least :data:`CB_WIDE_MIN_PLANES` channel planes (batch x channels): each output position's 25-49 taps then
#: run on whole 64-lane rows, where the flat path's per-plane loops fill one shifted copy of the plane per tap
#: column. Measured (2 threads, float32, same process alternating, ms flat / channel-blocked, forward and
#: stride-1 input gradient alike): batch 8, 7x7: ConvNeXt's 192 x 28x28 1.76-2.00 / 1.11-1.16, 96 x 32x32
#: 1.15-1.32 / 0.96-1.10, 240 x 28x28 2.36-2.70 / 1.56-1.70; 5x5: 240 x 28x28 1.66-1.71 / 1.06-1.08, 120 x 32x32
#: 0.98-1.06 / 0.76-0.83, 48 x 32x32 0.34-0.36 / 0.30-0.32; batch 1: 240 x 28x28 7x7 0.29-0.31 / 0.20, 192 x
#: 28x28 5x5 0.15 / 0.12-0.14. Left flat: a single image of fewer channels (one or two blocks, one of them part
#: empty: 96 x 32x32 5x5 0.10 / 0.11, 48 x 32x32 0.06 / 0.08-0.09), and 56x56 and larger planes (0.89-1.12, 64x64
#: up to 1.48 at batch 1).
CB_MAX_WIDE_KERNEL_PLANE = 32 * 32
CB_WIDE_KERNEL_TAPS = 25
CB_WIDE_MIN_PLANES = 2 * _CB
#: Largest input plane whose strided input gradient takes the channel-blocked path (output gradient spread into
#: a zero plane), same measurements: 192 x 16x16 stride 2 0.17-0.20 / 0.36-0.47, 144 x 32x32 0.54-0.75 /
#: 0.86-0.91 (576 x 14x14 with the old packing: 2.4 -> 1.4 ms); 96 x 64x64 level, left flat.
CB_MAX_SPREAD_PLANE = 32 * 32


@parallel.kernel(work_arg=0, compute=True, **_JIT)
def _forward2d_cb(x, N, C, H, W, w, KH, KW, bias, sh, sw, ph, pw, dh, dw, OH, OW, y, y_chan0, y_nstride,
                  chunks, uh=1, uw=1, window=False):
    """Depthwise 2-D forward, multiplier 1, channel-blocked (see the section comment above).

    x (N, C, H, W) flat; w (C, KH*KW) flat; bias (C,); output channel ``c`` of image ``n`` goes to
    plane ``n * y_nstride + y_chan0 + c`` of ``y`` (planes of OH*OW, flat). Padding before is
    ``ph, pw`` (>= 0); the padding after is implied by ``OH, OW``. With ``uh, uw > 1`` (stride 1
    only) the input is first spread to every ``uh``-th row and ``uw``-th column of a zero plane: the
    strided input gradient as a stride-1 correlation of the spread output gradient. ``window``
    (:func:`_cb_window`): each row's taps are adjacent and run on :func:`.fir.channel_rows_by_window`.
    """
    nb = (C + _CB - 1) // _CB
    Hp = (OH - 1) * sh + (KH - 1) * dh + 1
    Wq = OW + ((KW - 1) * dw) // sw
    T = KH * KW
    P = OH * OW
    HW = H * W
    ntask = N * nb
    ihi = min(H, Hp - ph)
    nchunks = chunks[1]
    workers = chunks[2]
    for _ in prange(workers):  # one iteration per thread, which claims chunks
        # never-written positions are the zero padding; lanes past the last block's channels hold
        # stale (finite) values whose outputs are never stored
        # one spare vector of channels at the end: where :func:`channel_block_places` sends unread input positions
        Xp = np.zeros((Hp * sw * Wq + 1) * _CB, y.dtype)
        places = channel_block_places(H, W, Hp, ihi, ph, pw, sw, Wq, uh, uw, _CB)
        Y = np.empty(P * _CB, y.dtype)
        Wt = np.zeros((T + 1) * _CB, y.dtype)
        toff = np.empty(T, np.int64)
        row_offs = np.empty(KH, np.int64)
        for kh in range(KH):
            row_offs[kh] = kh * dh * sw * Wq * _CB
            for kw in range(KW):
                a = kw * dw
                toff[kh * KW + kw] = ((kh * dh * sw + a % sw) * Wq + a // sw) * _CB
        last = -1
        while True:
            chunk = task_queue.claim(chunks)
            if chunk >= nchunks:
                break
            for task in range(chunk * ntask // nchunks, (chunk + 1) * ntask // nchunks):
                cbi = task // N
                n = task - cbi * N
                c0 = cbi * _CB
                cnt = min(_CB, C - c0)
                if cbi != last:
                    # transpose the block's weights once: T weight vectors of _CB channels, then the bias
                    last = cbi
                    for v in range(cnt):
                        wsrc = w[(c0 + v) * T:(c0 + v + 1) * T]
                        for t in range(T):
                            Wt[t * _CB + v] = wsrc[t]
                        Wt[T * _CB + v] = bias[c0 + v]
                # pack: the block's planes transposed channels-innermost in registers, each input position's
                # vector of channels stored straight to its place in the padded, phase-split plane (element by
                # element, gathering across planes, this cost 2.5x the taps: 8 x 384 channels at 8x8, 3x3)
                micro_gemm.transpose_to_rows(x, (n * C + c0) * HW, HW, Xp, places, 0, cnt, HW)
                # every output row: its (column, channel) tiles summed over all taps in registers
                if window:
                    fir.channel_rows_by_window(Xp, 0, sh * sw * Wq * _CB, row_offs, KH, KW, toff, Wt, T, OH, OW,
                                               _CB, Y)
                else:
                    fir.channel_rows(Xp, 0, sh * sw * Wq * _CB, toff, Wt, T, OH, OW, _CB, Y)
                # unpack: the block's planes are consecutive rows of y, so (positions x channels) -> (channels x
                # positions) is one transpose, by blocks in registers (element by element it cost twice the
                # taps: 8 x 384 channels at 8x8, 3x3 kernel)
                micro_gemm.transpose_flat(Y, 0, _CB, y, (n * y_nstride + y_chan0 + c0) * P, P, P, cnt)


@njit(**_JIT)
def channel_block_places(H, W, Hp, ihi, ph, pw, sw, Wq, uh, uw, step):
    """Where each input position ``ih * W + iw`` goes in a channel-blocked plane of ``step`` elements per position
    (the offset of its first element; :func:`_forward2d_cb`, and the lane-blocked grouped convs of
    :mod:`.group_lanes`): row ``ih + ph``, column phase ``b``, column ``q`` with ``iw = q * sw + b - pw``; spread
    by ``uh, uw`` (stride 1): row ``ih * uh + ph``, column ``pw + iw * uw``. Positions no window reads go to the
    spare position after the last row (``Hp`` rows of ``sw * Wq`` positions)."""
    Wrow = sw * Wq
    places = np.full(H * W, Hp * Wrow * step, np.int64)
    if uh * uw > 1:
        ncol = min(W, (Wq - pw + uw - 1) // uw)
        for ih in range(min(H, (Hp - ph + uh - 1) // uh)):
            for iw in range(ncol):
                places[ih * W + iw] = ((ih * uh + ph) * Wq + pw + iw * uw) * step
        return places
    for ih in range(ihi):
        for b in range(sw):
            qlo = (pw - b + sw - 1) // sw if pw > b else 0
            qhi = min(Wq, (W - 1 + pw - b) // sw + 1)
            for q in range(qlo, qhi):
                places[ih * W + q * sw + b - pw] = (((ih + ph) * sw + b) * Wq + q) * step
    return places


@parallel.kernel(work_arg=0, compute=True, **_JIT)
def _grad_weight2d_cb(go, N, C, OH, OW, x, H, W, KH, KW, sh, sw, ph, pw, dh, dw, gw):
    """Depthwise 2-D weight gradient, multiplier 1, channel-blocked (see :func:`_forward2d_cb`).

    One task per block of ``_CB`` channels, reducing over the whole batch itself (no races, the same
    result for any thread count): the input block is packed as in the forward, the output-gradient
    block channels-innermost at row pitch ``OW * _CB``, and per output row and tap
    ``Acc[t, ow, c] += G[oh, ow, c] * Xp[tap(oh, ow), c]``; the ``OW`` partial sums of each weight are
    added in a fixed order at the end.
    """
    nb = (C + _CB - 1) // _CB
    Hp = (OH - 1) * sh + (KH - 1) * dh + 1
    Wq = OW + ((KW - 1) * dw) // sw
    T = KH * KW
    P = OH * OW
    R = OW * _CB
    HW = H * W
    ihi = min(H, Hp - ph)
    for cbi in prange(nb):
        Xp = np.zeros((Hp * sw * Wq + 1) * _CB, gw.dtype)
        places = channel_block_places(H, W, Hp, ihi, ph, pw, sw, Wq, 1, 1, _CB)
        G = np.zeros(P * _CB, gw.dtype)
        Acc = np.zeros(T * R, gw.dtype)
        toff = np.empty(T, np.int64)
        for kh in range(KH):
            for kw in range(KW):
                a = kw * dw
                toff[kh * KW + kw] = ((kh * dh * sw + a % sw) * Wq + a // sw) * _CB
        c0 = cbi * _CB
        cnt = min(_CB, C - c0)
        for n in range(N):
            micro_gemm.transpose_to_rows(x, (n * C + c0) * HW, HW, Xp, places, 0, cnt, HW)
            micro_gemm.transpose_flat(go, (n * C + c0) * P, P, G, 0, _CB, cnt, P)
            for oh in range(OH):
                gr = G[oh * R:(oh + 1) * R]
                base = oh * sh * sw * Wq * _CB
                t = 0
                while t + 3 <= T:
                    oa, ob, oc = base + toff[t], base + toff[t + 1], base + toff[t + 2]
                    xa, xb, xc = Xp[oa:oa + R], Xp[ob:ob + R], Xp[oc:oc + R]
                    aa, ab, ac = Acc[t * R:(t + 1) * R], Acc[(t + 1) * R:(t + 2) * R], Acc[(t + 2) * R:(t + 3) * R]
                    for i in range(R):
                        g = gr[i]
                        aa[i] += g * xa[i]
                        ab[i] += g * xb[i]
                        ac[i] += g * xc[i]
                    t += 3
                while t < T:
                    oa = base + toff[t]
                    xa = Xp[oa:oa + R]
                    aa = Acc[t * R:(t + 1) * R]
                    for i in range(R):
                        aa[i] += gr[i] * xa[i]
                    t += 1
        for v in range(cnt):
            for t in range(T):
                s = Acc[t * R + v]
                for ow in range(1, OW):
                    s += Acc[t * R + ow * _CB + v]
                gw[(c0 + v) * T + t] = s



def _use_cb(C, K, out_hw, padding, limit=None):
    """The channel-blocked path takes multiplier-1 2-D layers with small output planes."""
    limit = CB_MAX_PLANE if limit is None else limit
    return K == C and out_hw[0] * out_hw[1] <= limit and min(padding) >= 0


#: Whether the channel-blocked path runs rows of adjacent taps (stride 1 and no dilation in W, 3/5/7 wide) on the
#: tiles that load each input vector once per row, not once per tap (:func:`.fir.channel_rows_by_window`; AVX-512
#: hosts: the tile's sums and a 7-wide row's inputs take 22 of the 32 vector registers). Tests and A/Bs switch it.
#: Measured on a 2-core Intel Xeon, float32, batch 8, forward, tap-by-tap / window tiles, ms: 192 x 16x16 7x7
#: 0.41 / 0.35, 240 x 28x28 5x5 1.31 / 1.15, 240 x 16x16 5x5 0.41 / 0.38, 672 x 8x8 5x5 0.28 / 0.26, 3x3 level
#: to 0.94x (576 x 8x8 0.205 / 0.193). Converted MobileNet v2/v3, EfficientNet-B0, ShuffleNet v2 and RegNet at
#: batch 8 did not move (tap / window 0.99-1.02, same process).
CB_WINDOW = True


def _cb_window(sw: int, dw: int, KW: int) -> bool:
    """Whether a channel-blocked pass with these W stride, W dilation and kernel width takes the window tiles."""
    return CB_WINDOW and micro_gemm.HOST_HAS_AVX512 and sw == 1 and dw == 1 and KW in fir.WINDOW_WIDTHS


def _use_cb_forward(C, K, out_hw, padding, kernel=(1, 1), batch=1):
    """:func:`_use_cb` for a forward pass (or a stride-1 input gradient, which runs as one): output planes up to
    :data:`CB_MAX_FORWARD_PLANE`, or :data:`CB_MAX_WIDE_KERNEL_PLANE` for a ``kernel`` (KH, KW) of at least
    :data:`CB_WIDE_KERNEL_TAPS` taps over at least :data:`CB_WIDE_MIN_PLANES` planes (``batch * C``)."""
    limit = CB_MAX_FORWARD_PLANE
    if kernel[0] * kernel[1] >= CB_WIDE_KERNEL_TAPS and batch * C >= CB_WIDE_MIN_PLANES:
        limit = max(limit, CB_MAX_WIDE_KERNEL_PLANE)
    return _use_cb(C, K, out_hw, padding, limit)


# --------------------------------------------------------------------------------------------------
# Public API (numpy in, numpy out; same conventions as fastconv.cpu.conv)
# --------------------------------------------------------------------------------------------------

def _check_depthwise(C, K, wshape1):
    if wshape1 != 1 or K % C != 0:
        raise ValueError(f"depthwise kernels need weight (m*C, 1, ...) for C={C} input channels, "
                         f"got {K} output channels with {wshape1} input channels per group")


@config.parallel_entry
def depthwise_forward_into(x, w, bias, stride, padding, dilation, out_spatial, y, chan0=0, nstride=None):
    """Depthwise forward written into ``y`` (rows, OD, OH, OW): output channel ``k`` of image ``n``
    goes to row ``n * nstride + chan0 + k`` (``nstride`` defaults to ``K``). Used by the fused
    depthwise-separable path to write one image's intermediate into a cache-sized block."""
    config.sync_threads()
    stride, padding, dilation, out_spatial = map(_tup, (stride, padding, dilation, out_spatial))
    N, C, D, H, W = x.shape
    K, Cg, KD, KH, KW = w.shape
    _check_depthwise(C, K, Cg)
    OD, OH, OW = out_spatial
    if N == 0 or K == 0 or OD * OH * OW == 0:
        return y
    b = np.zeros(K, x.dtype) if bias is None else np.ascontiguousarray(bias, x.dtype)
    if not y.flags.c_contiguous:
        raise ValueError("depthwise_forward_into: y must be C-contiguous")
    fast = None
    if D == 1 and OD == 1 and KD == 1 and _use_cb_forward(C, K, (OH, OW), padding[1:], (KH, KW), N):
        _forward2d_cb(_flat(x), N, C, H, W, _flat(w), KH, KW, b, stride[1], stride[2], padding[1], padding[2],
                      dilation[1], dilation[2], OH, OW, y.reshape(-1), int(chan0),
                      int(K if nstride is None else nstride), _chunks(N * ((C + _CB - 1) // _CB)), 1, 1,
                      _cb_window(stride[2], dilation[2], KW))
        return y
    if D == 1 and OD == 1 and KD == 1:
        fast = _fast2d_layout((H, W), (OH, OW), (KH, KW), stride[1:], padding[1:], dilation[1:], False)
    if fast is not None:
        _forward2d(_flat(x), N, C, H, W, _flat(w), KH, KW, b, K // C, stride[1], stride[2], padding[1],
                   padding[2], dilation[2], *fast, y.reshape(-1), OH, OW, int(chan0),
                   int(K if nstride is None else nstride), _chunks(N * C))
        return y
    lay = _PlaneLayout((KH, KW), (OH, OW), stride[1:], dilation[1:])
    dt = _pairs(OD, D, KD, stride[0], padding[0], dilation[0], False)
    _forward(_flat(x), N, C, D, H, W, _flat(w), KD, KH * KW, b, K // C, stride[1], stride[2],
             padding[1], padding[2], lay.Hq, lay.Wq, lay.sub, lay.offsets, *dt, y.reshape(-1), OD, OH, OW,
             int(chan0), int(K if nstride is None else nstride), _chunks(N * C))
    return y


def depthwise_forward(x, w, bias, stride, padding, dilation, groups, out_spatial):
    """Depthwise convolution forward.

    x: (N, C, D, H, W); w: (m*C, 1, KD, KH, KW); bias: (m*C,) or None; ``groups`` must equal C.
    Returns y: (N, m*C, *out_spatial), same dtype as x.
    """
    N, C = x.shape[:2]
    K = w.shape[0]
    if int(groups) != C:
        raise ValueError(f"depthwise kernels need groups == in_channels, got groups={groups} with {C} channels")
    y = memory.empty_aligned((N, K) + _tup(out_spatial), x.dtype)
    depthwise_forward_into(x, w, bias, stride, padding, dilation, out_spatial,
                           y.reshape((N * K,) + _tup(out_spatial)))
    return y


@config.parallel_entry
def depthwise_grad_input(grad_out, w, stride, padding, dilation, groups, in_spatial):
    """Depthwise convolution input gradient.

    grad_out: (N, m*C, OD, OH, OW); w: (m*C, 1, KD, KH, KW); ``groups`` = C.
    Returns grad_x: (N, C, *in_spatial); zeros where no output window reaches.
    """
    config.sync_threads()
    go = np.ascontiguousarray(grad_out)
    w = np.ascontiguousarray(w)
    stride, padding, dilation, in_spatial = map(_tup, (stride, padding, dilation, in_spatial))
    N, K, OD, OH, OW = go.shape
    C = int(groups)
    _check_depthwise(C, K, w.shape[1])
    KD, KH, KW = w.shape[2:]
    D, H, W = in_spatial
    gx = memory.empty_aligned((N, C) + in_spatial, go.dtype)
    if gx.size == 0:
        return gx
    if go.size == 0:
        gx[...] = 0
        return gx
    (sd, sh, sw), (pd, ph, pw), (dd, dh, dw) = stride, padding, dilation
    if D == 1 and OD == 1 and KD == 1 and sh == 1 and sw == 1 and K == C:
        # stride 1, multiplier 1: the input gradient is the forward correlation of the output gradient
        # with the flipped kernel, padded by (KH-1)*dh - ph before: the fast forward path runs it.
        pad = ((KH - 1) * dh - ph, (KW - 1) * dw - pw)
        if _use_cb_forward(C, K, (H, W), pad, (KH, KW), N):
            wf = np.ascontiguousarray(w[:, 0, 0, ::-1, ::-1]).reshape(-1)
            _forward2d_cb(go.reshape(-1), N, C, OH, OW, wf, KH, KW, np.zeros(C, go.dtype), 1, 1, pad[0], pad[1],
                          dh, dw, H, W, gx.reshape(-1), 0, C, _chunks(N * ((C + _CB - 1) // _CB)), 1, 1,
                          _cb_window(1, dw, KW))
            return gx
        fast = _fast2d_layout((OH, OW), (H, W), (KH, KW), (1, 1), pad, (dh, dw), False)
        if fast is not None:
            wf = np.ascontiguousarray(w[:, 0, 0, ::-1, ::-1]).reshape(-1)
            _forward2d(go.reshape(-1), N, C, OH, OW, wf, KH, KW, np.zeros(C, go.dtype), 1, 1, 1, pad[0], pad[1],
                       dw, *fast, gx.reshape(-1), H, W, 0, C, _chunks(N * C))
            return gx
    Hu = (OH - 1) * sh + 1
    if D == 1 and OD == 1 and KD == 1 and (sh > 1 or sw > 1):
        pad = ((KH - 1) * dh - ph, (KW - 1) * dw - pw)
        if _use_cb(C, K, (H, W), pad, CB_MAX_SPREAD_PLANE):
            wf = np.ascontiguousarray(w[:, 0, 0, ::-1, ::-1]).reshape(-1)
            _forward2d_cb(go.reshape(-1), N, C, OH, OW, wf, KH, KW, np.zeros(C, go.dtype), 1, 1, pad[0], pad[1],
                          dh, dw, H, W, gx.reshape(-1), 0, C, _chunks(N * ((C + _CB - 1) // _CB)), sh, sw,
                          _cb_window(1, dw, KW))
            return gx
    if D == 1 and OD == 1 and KD == 1 and K == C and (sh > 1 or sw > 1) and (OW - 1) * sw < W:
        pad = ((KH - 1) * dh - ph, (KW - 1) * dw - pw)
        fast = _fast2d_layout((Hu, W), (H, W), (KH, KW), (1, 1), pad, (dh, dw), False)
        if fast is not None and fast[4]:
            wf = np.ascontiguousarray(w[:, 0, 0, ::-1, ::-1]).reshape(-1)
            _grad_input2d_up(go.reshape(-1), N, C, OH, OW, wf, KH, KW, sh, sw, H, W, Hu, pad[0], pad[1], dw,
                             *fast, gx.reshape(-1), _chunks(N * C))
            return gx
    Lh, Lw = ((KH - 1) * dh) // sh, ((KW - 1) * dw) // sw
    q0h, q0w = ph // sh, pw // sw
    Qh = (H - 1 + ph) // sh + 1 - q0h
    Qw = (W - 1 + pw) // sw + 1 - q0w
    Wg = Qw + Lw
    # taps grouped by input phase (ph_h, ph_w); offset into the padded output-gradient plane
    tkhw, toff, pstart = [], [], [0]
    for a in range(sh):
        for b in range(sw):
            for kh in range(KH):
                if (kh * dh) % sh != a:
                    continue
                for kw in range(KW):
                    if (kw * dw) % sw != b:
                        continue
                    tkhw.append(kh * KW + kw)
                    toff.append((Lh - (kh * dh - a) // sh) * Wg + Lw - (kw * dw - b) // sw)
            pstart.append(len(toff))
    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    dt = _pairs(D, OD, KD, sd, pd, dd, True)
    _grad_input(_flat(go), N, K, OD, OH, OW, _flat(w), KD, KH * KW, K // C, sh, sw, ph, pw, Lh, Lw, q0h, q0w,
                Qh, Wg, *dt, i64(tkhw), i64(toff), i64(pstart), gx.reshape(-1), C, D, H, W, _chunks(N * C))
    return gx


@config.parallel_entry
def depthwise_grad_weight(grad_out, x, stride, padding, dilation, groups, kernel_spatial):
    """Depthwise convolution weight gradient.

    grad_out: (N, m*C, OD, OH, OW); x: (N, C, D, H, W); ``groups`` = C.
    Returns grad_w: (m*C, 1, *kernel_spatial).
    """
    config.sync_threads()
    go = np.ascontiguousarray(grad_out)
    x = np.ascontiguousarray(x)
    stride, padding, dilation, kernel_spatial = map(_tup, (stride, padding, dilation, kernel_spatial))
    N, K, OD, OH, OW = go.shape
    C = x.shape[1]
    if int(groups) != C or K % max(C, 1) != 0:
        raise ValueError(f"depthwise kernels need groups == in_channels and out_channels % in_channels == 0, "
                         f"got groups={groups}, {C} input and {K} output channels")
    KD, KH, KW = kernel_spatial
    gw = memory.zeros((K, 1) + kernel_spatial, go.dtype)
    if go.size == 0 or gw.size == 0 or x.size == 0:
        return gw
    D, H, W = x.shape[2:]
    if D == 1 and OD == 1 and KD == 1 and _use_cb(C, K, (OH, OW), padding[1:]):
        _grad_weight2d_cb(_flat(go), N, C, OH, OW, _flat(x), H, W, KH, KW, stride[1], stride[2], padding[1],
                          padding[2], dilation[1], dilation[2], gw.reshape(-1))
        return gw
    # Large stride-1 planes (112x112) measured faster on the padded-plane path below (1.25x): its one
    # padded copy and the output gradient fit in L2 better than the KW shifted copies; equal at 56x56.
    if D == 1 and OD == 1 and KD == 1 and (stride[1] > 1 or OH * OW <= 64 * 64):
        fast = _fast2d_layout((H, W), (OH, OW), (KH, KW), stride[1:], padding[1:], dilation[1:], False)
        if fast is not None:
            _grad_weight2d(_flat(go), N, K, OH, OW, _flat(x), C, H, W, KH, KW, K // C, stride[1], stride[2],
                           padding[1], padding[2], dilation[2], *fast, gw.reshape(-1))
            return gw
    lay = _PlaneLayout((KH, KW), (OH, OW), stride[1:], dilation[1:])
    dt = _pairs(OD, x.shape[2], KD, stride[0], padding[0], dilation[0], False)
    _grad_weight(_flat(go), N, K, OD, OH, OW, _flat(x), C, x.shape[2], x.shape[3], x.shape[4], K // C,
                 stride[1], stride[2], padding[1], padding[2], lay.Hq, lay.Wq, lay.sub, lay.offsets, *dt,
                 gw.reshape(-1), KD, KH * KW)
    return gw


@config.parallel_entry
def separable_forward_fused(x, wd, bd, wp, bp, stride, padding, dilation, out_spatial):
    """Depthwise-separable forward (depthwise ``wd``, then 1x1 pointwise ``wp``) without materialising
    the whole intermediate tensor.

    x: (N, C, D, H, W); wd: (M, 1, KD, KH, KW) with M = m*C; bd: (M,) or None; wp: (K, M); bp: (K,) or None.
    Returns y: (N, K, *out_spatial).

    Images are processed in blocks whose depthwise output (``nb x M x OD*OH*OW``) stays within
    :data:`FUSED_BLOCK_BYTES` (about half of one core's L2): the depthwise kernel writes the block,
    the GEMM ``wp @ z`` (torch.mm) reads it back from cache and the pointwise bias is added while the
    output block is still in cache. The unfused path instead writes the whole intermediate to memory
    and reads it back.
    """
    config.sync_threads()
    stride, padding, dilation, out_spatial = map(_tup, (stride, padding, dilation, out_spatial))
    x = np.ascontiguousarray(x)
    wd = np.ascontiguousarray(wd)
    wp = np.ascontiguousarray(wp)
    N, C, D, H, W = x.shape
    M, _, KD, KH, KW = wd.shape
    K = wp.shape[0]
    P = out_spatial[0] * out_spatial[1] * out_spatial[2]
    y = memory.empty_aligned((N, K) + out_spatial, x.dtype)
    if y.size == 0:
        return y
    y3 = y.reshape(N, K, P)
    if M == 0:
        y3[...] = 0 if bp is None else np.asarray(bp, x.dtype).reshape(1, K, 1)
        return y
    lay = _PlaneLayout((KH, KW), out_spatial[1:], stride[1:], dilation[1:])
    b = np.zeros(M, x.dtype) if bd is None else np.ascontiguousarray(bd, x.dtype)
    bpc = None if bp is None else np.asarray(bp, x.dtype).reshape(K, 1)
    dt = _pairs(out_spatial[0], D, KD, stride[0], padding[0], dilation[0], False)
    nb = int(max(1, min(N, FUSED_BLOCK_BYTES // max(1, M * P * x.itemsize))))
    z = np.empty((nb * M,) + out_spatial, x.dtype)
    z3 = z.reshape(nb, M, P)
    # The GEMM goes through torch (same memory, no copies): numpy's OpenBLAS keeps its own thread pool,
    # which ignores torch.set_num_threads and, on this 2-core machine, oversubscribed it (measured:
    # medians 5x the minimum under load); torch's GEMM follows the one thread knob.
    import torch

    wp_t, z_t, y_t = torch.from_numpy(wp), torch.from_numpy(z3), torch.from_numpy(y3)
    bp_t = None if bpc is None else torch.from_numpy(np.ascontiguousarray(bpc))
    zflat = z.reshape(-1)
    wflat = _flat(wd)
    for n0 in range(0, N, nb):
        cnt = min(nb, N - n0)
        _forward(_flat(x[n0:n0 + cnt]), cnt, C, D, H, W, wflat, KD, KH * KW, b, M // C, stride[1], stride[2],
                 padding[1], padding[2], lay.Hq, lay.Wq, lay.sub, lay.offsets, *dt, zflat, *out_spatial, 0, M,
                 _chunks(cnt * C))
        for i in range(cnt):
            out = y_t[n0 + i]
            blas.torch_mm(wp_t, z_t[i], out=out)
            if bp_t is not None:
                out.add_(bp_t)
    return y


# Non-finite operands: exact IEEE results (the kernels read padding as stored zeros, and 0 * NaN would
# put NaN where no term is NaN; see fastconv.cpu.nonfinite). Those padding pairs are the only ones torch does not
# form, so a finite weight proves the forward and the input gradient exact (finite_b_suffices: they read the weight,
# not their result); the weight gradient pays one read of its (weight-sized) result.
from . import nonfinite as _nonfinite  # noqa: E402

depthwise_forward = _nonfinite.exact(depthwise_forward, bias=True, finite_b_suffices=True)
depthwise_grad_input = _nonfinite.exact(depthwise_grad_input, finite_b_suffices=True)
depthwise_grad_weight = _nonfinite.exact(depthwise_grad_weight)

