"""Winograd F(2x2,3x3) and F(4x4,3x3) convolutions on the CPU (Numba transforms + BLAS GEMMs).

The kernels of ``"winograd2"`` and ``"winograd4"`` (target ``"numba"``, declared in :mod:`.algorithms`) for 2-D convs
with a 3x3 kernel and stride 1: any padding (negative, asymmetric, ``'same'``), any groups; dilated ones
whose padding before each dim is a multiple of its dilation (see below).

How a forward pass runs (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks"), with
``m`` the output tile (2 or 4) and ``a = m + 2`` the input tile:

1. filter transform, once per call: ``U[xi, nu] = (G g G^T)[xi, nu]``, stored ``(a*a, K, C/groups)``;
2. the output is cut into ``m x m`` tiles, each reading an ``a x a`` input patch (patches overlap by 2).
   Tiles are taken in chunks of whole tile rows, sized by :data:`WORKSPACE_BYTES`, so the transformed
   tiles of a chunk stay in the L2/L3 caches. Per chunk:

   * input transform ``V[xi, nu] = (B^T d B)[xi, nu]``, stored ``(a*a, C, tiles)``;
   * ``a*a`` independent GEMMs ``M[xi, nu] = U[xi, nu] @ V[xi, nu]``: ``(K x C) @ (C x tiles)`` per group
     (see :data:`GEMM_MODE`);
   * output transform ``Y = A^T M A``, cropped to the output size, plus the bias; it also notes whether
     any output is non-finite, the one check that decides whether the exact direct kernel must redo
     the call (see the note above ``_check_2d``).

The input gradient of a stride-1 3x3 convolution is itself a stride-1 3x3 convolution of the output
gradient with the filters flipped and transposed (K <-> C), padded ``2 - p`` before: the same forward
runs it. Padding beyond 2 makes that padding negative, which the tile gather handles (it reads with
bounds, so a negative padding simply crops).

The weight gradient is Winograd too: along one dim, ``gw[i] = sum_o go[o] d[o + i]`` over an output tile
of ``m`` positions is the minimal filtering problem F(3, m) with the same ``a = m + 2`` points, whose
input transform is the same ``B^T``. So ``x`` goes through the forward input transform, each ``m x m``
tile of the output gradient through ``G_m (.) G_m^T`` (``G_m`` is ``a x m``), the GEMMs reduce over the
tiles: ``Mw[xi, nu] += GO[xi, nu] @ V[xi, nu]^T`` ``(K x tiles) @ (tiles x C)``, and a final
``A_3^T Mw A_3`` gives the 3x3 result.

A dilated 3x3 conv (stride 1, dilation ``d``) runs as ``dh*dw`` undilated ones, one per phase of the input:
output ``oh = d*u + r`` reads inputs ``oh + d*i - p = d*(u + i - p/d) + r`` (padding ``p`` before, a multiple of
``d``), all in input phase ``r``, so phase ``r`` of the output is the undilated conv of phase ``r`` of the input
with padding ``p/d``. :func:`_to_phases` stacks the phases along the batch (zero-extended to a common size: an
extended input is read only by extended outputs or as padding, an extended output gradient is zero), one undilated
call runs all of them, :func:`_from_phases` interleaves the result back ("space to batch", as TensorFlow's
``atrous_conv2d`` does). Measured on DeepLab's 256 -> 256 3x3 at 32x32, dilation 2, batch 4 (2 threads, one
process, medians of 9, forward / input gradient / weight gradient ms): F(4x4) this way 8.9-9.8 / 9.6-12.1 /
16.8-17.8, im2col on the dilated conv 17.3-17.7 / 18.1-18.3 / 16.8-17.1, torch 13.7-14.1 / 16.8-17.1 / 16.1-17.3;
the two phase copies (:func:`_phase_split`, :func:`_phase_merge`) take 0.42 and 0.45 ms of a forward.

The transform matrices come from the Toom-Cook construction over interpolation points (see
:func:`transform_matrices` and :data:`POINTS`): F(2x2) uses ``0, 1, -1, inf``, F(4x4)
``0, 1, -1, 1/2, -2, inf``, the set with the lowest float32 error among those we measured.

Every transform is a sequence of 6-term combinations (:func:`_comb_flat`) whose loop runs over a
contiguous run of tiles (phase-split input rows make the overlapping patches unit-stride), so it
vectorises and keeps each sum in a register.
"""
from __future__ import annotations

from fastconv import config

import contextlib
import math
import threading
from fractions import Fraction
from functools import lru_cache

import numba
import numpy as np
from numba import njit, prange

from . import blas, jit_gemm, memory, parallel, task_queue
from . import conv as _exact  # the exact kernels for calls Winograd cannot run safely

__all__ = [
    "transform_matrices", "winograd_forward", "winograd_grad_input", "winograd_grad_weight",
    "POINTS", "TILE_SIZES", "WORKSPACE_BYTES", "refuse_reason", "mult_ratio", "workspace_bytes",
]

#: Output tile size -> the finite interpolation points (``inf`` is always added last). F(4x4) uses
#: ``0, 1, -1, 1/2, -2``: measured on a 64-channel layer in float32, its worst error is about half that of
#: Lavin & Gray's ``0, +-1, +-2`` (2.8e-6 vs 5.8e-6 of the output scale; ``0, +-1, +-1/2`` gave 6.3e-6)
#: for 4 more nonzeros in B^T (26 vs 22), as Barabasz et al. (2020) found.
POINTS = {2: (0, 1, -1), 4: (0, 1, -1, Fraction(1, 2), -2)}
TILE_SIZES = tuple(POINTS)

#: Upper bound, in bytes, on the transformed tiles of one chunk (input + output transforms, all
#: channels). Sized to sit in the L2 of the two cores plus a share of L3 (2 x 2 MiB + 32 MiB here), so
#: the GEMMs read what the transform just wrote from cache.
WORKSPACE_BYTES = 4 << 20

#: Fewest tiles (GEMM columns) a chunk gets even when that exceeds :data:`WORKSPACE_BYTES` (wide
#: layers, 256 channels and more): measured, (256 x 256) @ (256 x 45) GEMMs made F(4x4) on VGG conv3
#: barely faster than torch, and 190+ columns about 1.5x faster.
MIN_GEMM_TILES = 192

_JIT = dict(cache=config.CACHE, fastmath=set(config.FASTMATH), nogil=True)


# --------------------------------------------------------------------------------------------
# Transform matrices (Toom-Cook, exact rational arithmetic)
# --------------------------------------------------------------------------------------------

def _evaluation(points, n, cols):
    """Rows: each finite point p -> [p^0 .. p^(cols-1)]; the point at infinity -> [0 .. 0, 1].

    Applied to the ``cols`` coefficients of a polynomial it gives its values at the ``n`` points
    (the last one being the leading coefficient).
    """
    rows = [[Fraction(p) ** j for j in range(cols)] for p in points]
    rows.append([Fraction(0)] * (cols - 1) + [Fraction(1)])
    assert len(rows) == n
    return rows


def _inverse(mat):
    """Exact inverse of a small square matrix of Fractions (Gauss-Jordan)."""
    n = len(mat)
    aug = [list(row) + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(mat)]
    for col in range(n):
        piv = next(r for r in range(col, n) if aug[r][col] != 0)
        aug[col], aug[piv] = aug[piv], aug[col]
        inv = 1 / aug[col][col]
        aug[col] = [v * inv for v in aug[col]]
        for r in range(n):
            if r != col and aug[r][col] != 0:
                f = aug[r][col]
                aug[r] = [v - f * u for v, u in zip(aug[r], aug[col])]
    return [row[n:] for row in aug]


@lru_cache(maxsize=None)
def transform_matrices(m: int, points: tuple = None) -> dict:
    """Winograd matrices for F(m x m, 3x3) and its weight-gradient twin F(3x3, m x m), float64.

    Built from the evaluation matrices ``E_k`` (``a x k``: a polynomial with k coefficients evaluated at
    the ``a = m + 2`` points, the last one ``inf``) and ``V = E_a``. The correlation ``y = g (*) d`` is
    the transpose of polynomial multiplication, so ``y = E_m^T [(E_3 g) . (V^-T d)]``. Each row of
    ``V^-T`` is scaled to coprime integers (``D``) and the filter side divided by the same factor, as in
    Lavin & Gray, so the input transform is exact in floating point.

    Returns a dict of numpy float64 arrays:
    ``AT`` (m x a), ``G`` (a x 3), ``BT`` (a x a) for the forward, and ``AT3`` (3 x a), ``Gm`` (a x m)
    for the weight gradient (which shares ``BT``).
    """
    points = tuple(POINTS[m] if points is None else points)
    a = m + 2
    if len(points) != a - 1 or len(set(points)) != len(points):
        raise ValueError(f"F({m},3) needs {a - 1} distinct finite points, got {points}")
    vinv = _inverse(_evaluation(points, a, a))
    bt = [list(col) for col in zip(*vinv)]  # V^-T
    scale = []
    for row in bt:
        den = math.lcm(*(v.denominator for v in row))
        num = math.gcd(*(int(v * den) for v in row))
        s = Fraction(den, num)
        # keep the first nonzero entry positive: a sign convention only
        first = next(v for v in row if v != 0)
        s = s if first * s > 0 else -s
        scale.append(s)
    bt = [[v * s for v in row] for row, s in zip(bt, scale)]

    def filt(k):
        return [[v / s for v in row] for row, s in zip(_evaluation(points, a, k), scale)]

    def transpose(rows):
        return [list(c) for c in zip(*rows)]

    as_np = lambda rows: np.array([[float(v) for v in row] for row in rows], np.float64)  # noqa: E731
    return {
        "AT": as_np(transpose(_evaluation(points, a, m))), "G": as_np(filt(3)), "BT": as_np(bt),
        "AT3": as_np(transpose(_evaluation(points, a, 3))), "Gm": as_np(filt(m)),
    }


# --------------------------------------------------------------------------------------------
# Numba kernels
# --------------------------------------------------------------------------------------------

@njit(**_JIT)
def _comb_flat(dst, d0, n, b, c, ci, src, o, o0):
    """``dst[d0 + t] = b + sum_j c[ci, j] * src[o0 + o[j] + t]`` for ``t < n``: six terms, unused ones with
    coefficient 0 (``c`` is a transform matrix padded to 6 columns by :func:`_padded`).

    One pass that keeps the sum in a register: accumulating term by term into ``dst`` (the first
    version) loaded and stored it once per nonzero coefficient and ran at about 1 flop/cycle. Flat
    buffers and offsets, no array views: each view costs an atomic reference count increment and
    decrement, as much as one of these short loops. Unsigned indices: Numba then skips its
    negative-index fix-up, which otherwise compiled these loops to gathers and scatters.

    A zero coefficient is multiplied, not skipped: a non-finite operand then gives NaN where a skip
    could have hidden it, which only sends the call to the exact kernel (see the note above ``_check_2d``).
    """
    c0, c1, c2, c3, c4, c5 = c[ci, 0], c[ci, 1], c[ci, 2], c[ci, 3], c[ci, 4], c[ci, 5]
    p0, p1, p2 = np.uint64(o0 + o[0]), np.uint64(o0 + o[1]), np.uint64(o0 + o[2])
    p3, p4, p5 = np.uint64(o0 + o[3]), np.uint64(o0 + o[4]), np.uint64(o0 + o[5])
    q = np.uint64(d0)
    for t in range(n):
        u = np.uint64(t)
        dst[q + u] = (b + c0 * src[p0 + u] + c1 * src[p1 + u] + c2 * src[p2 + u] + c3 * src[p3 + u]
                      + c4 * src[p4 + u] + c5 * src[p5 + u])


def _padded(mat, dtype):
    """``mat`` (rows x k <= 6) as a C-contiguous ``rows x 6`` array of ``dtype``, zero-padded on the right."""
    out = np.zeros((mat.shape[0], 6), dtype)
    out[:, :mat.shape[1]] = mat
    return out


@njit(**_JIT)
def _tile_block(src, L, s, m, pad_h, pad_w, TH, TW, Q, r0, r1, out, c0, c1):
    """Gather overlapping tiles of ``src`` and transform them on both sides with ``L``.

    ``out[xi*a + nu, c, (r - r0)*Q + tw] = sum_ij L[xi, i] L[nu, j] src[n, c, th*m + i - pad_h, tw*m + j - pad_w]``
    for the tile rows ``r = n*TH + th`` in ``[r0, r1)`` and ``tw < TW``; reads outside ``src`` are zeros
    (so any padding, negative included, works). The output holds ``TW`` slots per tile row, one per tile.

    Why ``Q >= TW + (s - 1) // m`` slots per tile row inside: with the input row split by phase (column
    ``q*m + ph`` at ``ph*Q + q``), tap ``j`` of every tile of the chunk is the same unit-stride run shifted
    by ``j // m``, so both passes below are single contiguous loops over the whole chunk (``(r1 - r0) * Q``
    long) and vectorise; a loop per tile row would be only TW (1 to 56) long and mostly scalar remainder.
    The row pass's run, spare slots included, is then copied out without them: the GEMMs and the output
    transform would otherwise multiply zeros in ``1/(TW + 1)`` of their columns (a third at 8x8 with
    F(4x4), a half at 4x4), which cost more than this copy of data still in L1.

    Why flat buffers with unsigned offsets and no views: see :func:`_comb_flat` (together with the
    register-blocked 6-term passes, 2-3x faster than per-coefficient accumulation through slices).

    Parameters
    ----------
    src : (N, C, H, W) array
    L : (a, 6) array -- ``B^T`` (s = a, overlapping patches) or ``G_m`` (s = m, disjoint tiles), zero-padded
    from its ``s`` columns to 6 (:func:`_padded`)
    m : tile step; pad_h, pad_w : padding before each dim (may be negative)
    out : (a*a, C, (r1 - r0)*TW) array, written for the channels ``c0 <= c < c1``
    """
    N, C, H, W = src.shape
    a = L.shape[0]
    R = r1 - r0
    RQ = R * Q
    RT = R * TW
    ext = RQ + (s - 1) // m  # the last row's spare slots read this far
    PL = m * ext  # one tap row i of P (all phases), flat
    poff = np.empty(6, np.int64)  # where tap row i starts in P (rows past s repeat the last one)
    soff = np.empty(6, np.int64)  # where tap j's run starts in S[xi] (taps past s repeat the last one)
    for j in range(6):
        jj = min(j, s - 1)
        poff[j] = jj * PL
        soff[j] = (jj % m) * ext + jj // m
    qrange = np.empty((m, 2), np.int64)  # per phase, the slots q whose column q*m + ph - pad_w is inside
    for ph in range(m):
        base = ph - pad_w
        qlo = min(Q, max(0, -(base // m)))
        qrange[ph, 0] = qlo
        qrange[ph, 1] = min(Q, max(qlo, (W - 1 - base) // m + 1))
    outf = out.reshape(out.size)
    for c in range(c0, c1):
        # P[i*PL + ph*ext + rr*Q + q] = src[n, c, th*m + i - pad_h, q*m + ph - pad_w] (0 outside)
        P = np.zeros(s * PL, src.dtype)
        S = np.empty(a * PL, src.dtype)
        run = np.empty(RQ, src.dtype)
        zero = P[0]  # a 0 of the array's dtype (P is still all zeros)
        for rr in range(R):
            r = r0 + rr
            n = r // TH
            th = r - n * TH
            for i in range(s):
                h = th * m + i - pad_h
                if h < 0 or h >= H:
                    continue  # padding row: stays zero
                for ph in range(m):
                    base = ph - pad_w
                    o = i * PL + ph * ext + rr * Q
                    # unsigned indices and no row view (see _comb_flat)
                    for q in range(qrange[ph, 0], qrange[ph, 1]):
                        P[np.uint64(o + q)] = src[n, c, h, np.uint64(q * m + base)]
        # column pass (along H), all phases and slots as one run: S[xi] = sum_i L[xi, i] P[i]
        for xi in range(a):
            _comb_flat(S, xi * PL, PL, zero, L, xi, P, poff, 0)
        # row pass (along W): tap j of tile t is S[xi, j % m, t + j // m]; the run is copied out without
        # the spare slots
        for xi in range(a):
            for nu in range(a):
                _comb_flat(run, 0, RQ, zero, L, nu, S, soff, xi * m * ext)
                d0 = ((xi * a + nu) * C + c) * RT
                for rr in range(R):
                    dst = np.uint64(d0 + rr * TW)
                    srt = np.uint64(rr * Q)
                    for t in range(TW):
                        outf[dst + np.uint64(t)] = run[srt + np.uint64(t)]


@parallel.kernel(always=True, **_JIT)
def _tile_transform(src, L, s, m, pad_h, pad_w, TH, TW, Q, r0, r1, out):
    """:func:`_tile_block` for every channel, in parallel over the channels."""
    for c in prange(src.shape[1]):
        _tile_block(src, L, s, m, pad_h, pad_w, TH, TW, Q, r0, r1, out, c, c + 1)


@njit(**_JIT)
def _output_block(M, AT, a, bias, m, OH, OW, TH, TW, Q, r0, r1, y, bad, k0, k1):
    """``y[n, k, th*m + p, tw*m + q] = bias[k] + sum AT[p, xi] AT[q, nu] M[xi*a + nu, k, (r - r0)*Q + tw]``.

    Tile rows ``r = n*TH + th`` in ``[r0, r1)``, ``Q >= TW`` slots per row (the GEMMs' layout: ``TW``, see
    :func:`_tile_block`); tiles are cropped to ``OH x OW`` (partial edge tiles).

    ``bad[k]`` gets ``+= v - v`` for every value ``v`` computed (the cropped and spare slots too): it stays 0
    while they are all finite and turns NaN otherwise, the callers' output check (see the note above
    ``_check_2d``), one pass over data still in L1.

    Parameters
    ----------
    M : (a*a, K, (r1 - r0)*Q) array; AT : (m, 6) array (``A^T``, zero-padded: :func:`_padded`); a : its
    columns before the padding; bias : (K,) array (zeros when there is none)
    y : (N, K, OH, OW) array, written; bad : (K,) array, accumulated; both for ``k0 <= k < k1`` only
    """
    K = M.shape[1]
    R = r1 - r0
    RQ = R * Q
    Mf = M.reshape(M.size)
    full = min(TW, OW // m)  # tiles wholly inside an output row
    zoff = np.empty(6, np.int64)  # M[xi*a + nu, k] - M[nu, k] (rows past a repeat the last one)
    ooff = np.empty(6, np.int64)  # Z[p*a + nu] - Z[p*a]
    for j in range(6):
        zoff[j] = min(j, a - 1) * a * K * RQ
        ooff[j] = min(j, a - 1) * RQ
    for k in range(k0, k1):
        # Z[(p*a + nu)*RQ + t] = sum_xi AT[p, xi] M[xi*a + nu, k, t]; O[q*RQ + t]: output (p, q) of tile t
        Z = np.empty(m * a * RQ, M.dtype)
        O = np.empty(m * RQ, M.dtype)
        b = bias[k]
        zero = b - b  # a 0 of the dtype (NaN for a non-finite bias: the call falls back anyway)
        for p in range(m):
            for nu in range(a):
                _comb_flat(Z, (p * a + nu) * RQ, RQ, zero, AT, p, Mf, zoff, (nu * K + k) * RQ)
        chk = zero
        for p in range(m):
            for q in range(m):
                _comb_flat(O, q * RQ, RQ, b, AT, q, Z, ooff, p * a * RQ)
            # the output check over every value computed (cropped and spare slots too: a non-finite one
            # there can only come from a non-finite operand, and then the exact kernel redoes the call);
            # one vectorised pass here instead of a dependency chain in the scatter below
            for t in range(m * RQ):
                chk += O[np.uint64(t)] - O[np.uint64(t)]
            for rr in range(R):
                r = r0 + rr
                n = r // TH
                oh = (r - n * TH) * m + p
                if oh >= OH:
                    continue
                base = rr * Q
                # interleave the m columns of each tile into the output row; m spelled out as a
                # constant where it can be, so the stores are one contiguous run per tile
                if m == 4:
                    for tw in range(full):
                        u = np.uint64(base + tw)
                        col = np.uint64(4 * tw)
                        y[n, k, oh, col] = O[u]
                        y[n, k, oh, col + np.uint64(1)] = O[u + np.uint64(RQ)]
                        y[n, k, oh, col + np.uint64(2)] = O[u + np.uint64(2 * RQ)]
                        y[n, k, oh, col + np.uint64(3)] = O[u + np.uint64(3 * RQ)]
                elif m == 2:
                    for tw in range(full):
                        u = np.uint64(base + tw)
                        col = np.uint64(2 * tw)
                        y[n, k, oh, col] = O[u]
                        y[n, k, oh, col + np.uint64(1)] = O[u + np.uint64(RQ)]
                else:
                    for tw in range(full):
                        for q in range(m):
                            y[n, k, oh, np.uint64(tw * m + q)] = O[np.uint64(q * RQ + base + tw)]
                for tw in range(full, TW):  # the partial last tile
                    for q in range(m):
                        if tw * m + q < OW:
                            y[n, k, oh, np.uint64(tw * m + q)] = O[np.uint64(q * RQ + base + tw)]
        bad[k] += chk


@parallel.kernel(always=True, **_JIT)
def _output_transform(M, AT, a, bias, m, OH, OW, TH, TW, Q, r0, r1, y, bad):
    """:func:`_output_block` for every output channel, in parallel over the channels."""
    for k in prange(M.shape[1]):
        _output_block(M, AT, a, bias, m, OH, OW, TH, TW, Q, r0, r1, y, bad, k, k + 1)


@parallel.kernel(always=True, **_JIT)
def _fused_forward(x, U, BT, AT, a, bias, m, pad_h, pad_w, OH, OW, TH, TW, Q, rpc, G, y, bad, vbuf, mbuf, claimed):
    """The whole forward in one parallel region: each task ``t`` of ``bad.shape[0]`` claims chunks of ``rpc``
    tile rows one at a time (:mod:`.task_queue`) and runs all three stages on each (input transform, the
    ``a*a*G`` GEMMs, one single-threaded BLAS call each, output transform) in its own buffers.

    Why: per chunk, the stage-by-stage path parallelises each stage over channels, three parallel regions
    whose ends wait for the slowest thread; on a shared machine one descheduled thread stalls all of
    them. Here the threads meet once per call, and each chunk's transformed tiles stay in the cache
    of the core that made them.

    x : (N, C, H, W); U : (a*a*G, K/G, C/G); BT, AT : padded (:func:`_padded`); y : (N, K, OH, OW),
    written; bad : (tasks, K), accumulated (see :func:`_output_transform`); vbuf : (tasks, a*a*C*rpc*TW);
    mbuf : (tasks, a*a*K*rpc*TW). ``Q``: the input transform's slots per tile row (:func:`_tile_block`).
    """
    N, C = x.shape[0], x.shape[1]
    K = y.shape[1]
    rows = N * TH
    tasks = bad.shape[0]
    nchunks = -(-rows // rpc)
    for t in prange(tasks):
        while True:
            ci = task_queue.claim(claimed)
            if ci >= nchunks:
                break
            r0 = ci * rpc
            r1 = min(rows, r0 + rpc)
            T = (r1 - r0) * TW
            V = vbuf[t, :a * a * C * T].reshape((a * a * G, C // G, T))
            M = mbuf[t, :a * a * K * T].reshape((a * a * G, K // G, T))
            _tile_block(x, BT, a, m, pad_h, pad_w, TH, TW, Q, r0, r1, V.reshape((a * a, C, T)), 0, C)
            for i in range(a * a * G):
                jit_gemm.gemm(U[i], V[i], M[i], 0.0, False)
            _output_block(M.reshape((a * a, K, T)), AT, a, bias, m, OH, OW, TH, TW, TW, r0, r1, y, bad[t], 0, K)


@parallel.kernel(always=True, **_JIT)
def _fused_grad_weight(x, go, BT, Gm, a, m, pad_h, pad_w, TH, TW, Q, rpc, G, accs, vbuf, gbuf, claimed):
    """The weight gradient's tile stage in one parallel region, as :func:`_fused_forward`: task ``t``
    transforms its chunks of ``x`` (``B^T``) and ``go`` (``G_m``) and adds their GEMMs into ``accs[t]``.

    x : (N, C, H, W); go : (N, K, OH, OW); accs : (tasks, a*a*G, K/G, C/G), accumulated;
    vbuf : (tasks, a*a*C*rpc*TW); gbuf : (tasks, a*a*K*rpc*TW).
    """
    N, C = x.shape[0], x.shape[1]
    K = go.shape[1]
    rows = N * TH
    tasks = accs.shape[0]
    nchunks = -(-rows // rpc)
    for t in prange(tasks):
        while True:
            ci = task_queue.claim(claimed)
            if ci >= nchunks:
                break
            r0 = ci * rpc
            r1 = min(rows, r0 + rpc)
            T = (r1 - r0) * TW
            V = vbuf[t, :a * a * C * T].reshape((a * a * G, C // G, T))
            GO = gbuf[t, :a * a * K * T].reshape((a * a * G, K // G, T))
            _tile_block(x, BT, a, m, pad_h, pad_w, TH, TW, Q, r0, r1, V.reshape((a * a, C, T)), 0, C)
            _tile_block(go, Gm, m, m, 0, 0, TH, TW, Q, r0, r1, GO.reshape((a * a, K, T)), 0, K)
            acc = accs[t]
            for i in range(a * a * G):
                jit_gemm.gemm(GO[i], V[i], acc[i], 1.0, True)


@parallel.kernel(always=True, **_JIT)
def _gemm_forward(U, V, M):
    """``M[i] = U[i] @ V[i]`` for every (position, group) ``i``, one single-threaded BLAS GEMM per task.

    U : (P, Kg, Cg); V : (P, Cg, T); M : (P, Kg, T), all C-contiguous (P = a*a*groups).
    """
    for i in prange(U.shape[0]):
        jit_gemm.gemm(U[i], V[i], M[i], 0.0, False)


@parallel.kernel(always=True, **_JIT)
def _gemm_weight(GO, V, acc):
    """``acc[i] += GO[i] @ V[i]^T`` for every (position, group) ``i``: the tile reduction of the weight gradient.

    GO : (P, Kg, T); V : (P, Cg, T); acc : (P, Kg, Cg).
    """
    for i in prange(GO.shape[0]):
        jit_gemm.gemm(GO[i], V[i], acc[i], 1.0, True)


@parallel.kernel(always=True, **_JIT)
def _filter_transform(w, G, U, flipped):
    """``U[xi*a + nu, k, c] = sum_ij G[xi, i] G[nu, j] f[k, c, i, j]`` for the filters ``f`` of the conv run.

    Not flipped: ``f = w``, (K, C, 3, 3), and U is (a*a, K, C). Flipped (the input gradient's conv, see
    :func:`winograd_grad_input`): ``f[c, k, i, j] = w[g*Kg + k, c - g*Cg, 2 - i, 2 - j]`` for ``c`` of group
    ``g``, with w (K, Cg, 3, 3) of the forward and U (a*a, G*Cg, Kg). w C-contiguous either way.

    Each task first gathers its filter ``f[k]`` into a (3, 3, C) buffer, so every loop after it runs over
    contiguous channels; transposing (and flipping) the whole weight with numpy beforehand cost 0.35 ms for
    256 x 256 filters, a sixth of that layer's forward at batch 8, single-threaded and through memory.
    G : (a, 6) array, ``G`` zero-padded from 3 columns (:func:`_padded`).
    """
    K = U.shape[1]
    C = U.shape[2]
    Cg_fwd = w.shape[1]  # flipped: the forward's input channels per group
    a = G.shape[0]
    Uf = U.reshape(U.size)
    toff = np.empty(6, np.int64)  # tap row i of wk (rows past 3 repeat the last one)
    uoff = np.empty(6, np.int64)  # tap column j of tmp[xi]
    for j in range(6):
        toff[j] = min(j, 2) * 3 * C
        uoff[j] = min(j, 2) * C
    for k in prange(K):
        wk = np.empty(9 * C, U.dtype)  # wk[(i*3 + j)*C + c] = f[k, c, i, j]
        if flipped:
            g = k // Cg_fwd
            for c in range(C):
                for i in range(3):
                    for j in range(3):
                        wk[(i * 3 + j) * C + c] = w[g * C + c, k - g * Cg_fwd, 2 - i, 2 - j]
        else:
            for c in range(C):
                for i in range(3):
                    for j in range(3):
                        wk[(i * 3 + j) * C + c] = w[k, c, i, j]
        tmp = np.empty(a * 3 * C, U.dtype)  # tmp[(xi*3 + j)*C + c] = sum_i G[xi, i] w[k, c, i, j]
        zero = G[0, 5]  # a 0 of the dtype (the padding column)
        for xi in range(a):
            for j in range(3):
                _comb_flat(tmp, (xi * 3 + j) * C, C, zero, G, xi, wk, toff, j * C)
        for xi in range(a):
            for nu in range(a):
                _comb_flat(Uf, ((xi * a + nu) * K + k) * C, C, zero, G, nu, tmp, uoff, xi * 3 * C)


# --------------------------------------------------------------------------------------------
# Drivers (numpy in / numpy out)
# --------------------------------------------------------------------------------------------

def _matrices(m, dtype):
    """The transform matrices in ``dtype``, zero-padded to 6 columns for :func:`_comb_flat`, and each
    one's column count before the padding (``"<name>_cols"``)."""
    dtype = np.dtype(dtype)
    mats = transform_matrices(m)  # cached; tests swap the points and clear that cache
    got = _MATS.get((m, dtype.str))
    if got is None or got["_source"] is not mats:
        got = {k: _padded(v, dtype) for k, v in mats.items()}
        got.update({f"{k}_cols": v.shape[1] for k, v in mats.items()})
        got["_source"] = mats
        _MATS[(m, dtype.str)] = got
    return got


_MATS: dict = {}


#: How the a*a GEMMs of a chunk run: "prange" -- Numba tasks over the positions, each one
#: single-threaded GEMM (:func:`.jit_gemm.gemm`: torch's MKL, or scipy's OpenBLAS where torch has no MKL);
#: "blas" -- one ``matmul`` over the stack, parallel inside BLAS. Measured (2 shared cores, see the report in
#: bench/bench_winograd.py): "blas" is often 10x slower, because the BLAS's worker threads and Numba's TBB
#: workers take the cores from each other between the transforms and the GEMMs; "prange" with one BLAS
#: thread per task has no such fight, and lets the fused kernels keep a chunk in one core's cache.
GEMM_MODE = "prange"


class _SingleThreadedBlas:
    """Context: scipy's OpenBLAS runs one thread per call inside it (:func:`.jit_gemm.gemm` runs on it
    where torch has no MKL).

    That is ``scipy.linalg.cython_blas``'s OpenBLAS (a different copy from numpy's, the one Numba's
    ``np.dot`` calls too); it would otherwise start its own threads inside every prange task. Only that
    library's setting is touched (through threadpoolctl), it is restored when the last concurrent user
    leaves, and where no such library is found this does nothing (``available`` is False). Bound on first use: importing
    scipy.linalg costs about 0.2 s, which ``import fastconv`` should not pay.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._saved: list[int] = []
        self._libs = None

    def _bind(self) -> list:
        if self._libs is None:
            try:
                import scipy.linalg.cython_blas  # noqa: F401  (loads the OpenBLAS that np.dot calls)
                from threadpoolctl import ThreadpoolController

                self._libs = [lib for lib in ThreadpoolController().lib_controllers
                              if lib.user_api == "blas" and "scipy" in lib.filepath]
            except ImportError:
                self._libs = []
        return self._libs

    @property
    def available(self) -> bool:
        return bool(self._bind())

    def __enter__(self):
        with self._lock:
            libs = self._bind()
            if self._users == 0 and libs:
                self._saved = [lib.num_threads for lib in libs]
                for lib in libs:
                    lib.set_num_threads(1)
            self._users += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._users -= 1
            if self._users == 0:
                for lib, n in zip(self._libs, self._saved):
                    lib.set_num_threads(n)
        return False


_BLAS_ONE_THREAD = _SingleThreadedBlas()

#: The prange GEMMs can run: :mod:`.jit_gemm` found a GEMM to call from Numba code.
_JIT_GEMM = jit_gemm.SOURCE is not None


def _one_thread_blas():
    """The context the prange GEMMs run in: scipy's OpenBLAS held at one thread where they run on it; torch's
    MKL needs none (:func:`.jit_gemm.gemm` sets one thread per call, on the calling thread only)."""
    return _BLAS_ONE_THREAD if jit_gemm.SOURCE == "scipy" else contextlib.nullcontext()


def _gemm(U, V, M):
    """``M[i] = U[i] @ V[i]`` over the stack (see :data:`GEMM_MODE`)."""
    # without a GEMM callable from Numba code (neither torch's MKL nor scipy's BLAS found), the stacked GEMM
    # on torch's BLAS runs instead
    if GEMM_MODE == "prange" and _JIT_GEMM:
        with _one_thread_blas():
            _gemm_forward(U, V, M)
    else:
        blas.matmul(U, V, out=M)


def _gemm_accumulate(GO, V, acc):
    """``acc[i] += GO[i] @ V[i]^T`` over the stack (see :data:`GEMM_MODE`)."""
    if GEMM_MODE == "prange" and _JIT_GEMM:
        with _one_thread_blas():
            _gemm_weight(GO, V, acc)
    else:
        acc += blas.matmul(GO, V.transpose(0, 2, 1))


def _rows_per_chunk(per_row_bytes, total_rows, slots_per_row):
    """Tile rows per chunk: as many as :data:`WORKSPACE_BYTES` holds, but at least enough for
    :data:`MIN_GEMM_TILES` tiles, since a GEMM with fewer columns runs far below BLAS's peak."""
    fit = WORKSPACE_BYTES // max(1, per_row_bytes)
    wide = -(-MIN_GEMM_TILES // max(1, slots_per_row))
    return max(1, min(total_rows, max(fit, wide)))


def _plan(per_row_bytes, total_rows, slots_per_row, threads=None):
    """How a pass runs its tile rows: ``(fused, tasks, rows_per_chunk)``.

    ``fused``: one parallel region (:func:`_fused_forward`, :func:`_fused_grad_weight`) with ``tasks``
    threads, each claiming chunks of ``rows_per_chunk`` tile rows; chosen where every thread gets
    full-width chunks (at least :data:`MIN_GEMM_TILES` tiles, within its share of
    :data:`WORKSPACE_BYTES`), the chunk count rounded up to whole rounds over the threads. Otherwise
    (small problems; or no GEMM callable from Numba code, see :data:`GEMM_MODE`) stage by stage, each
    stage parallel over channels, in chunks of :func:`_rows_per_chunk` rows (``tasks`` is then 1).
    """
    threads = numba.get_num_threads() if threads is None else threads
    tasks = max(1, min(threads, total_rows))
    nchunks = -(-total_rows // _rows_per_chunk(per_row_bytes * tasks, total_rows, slots_per_row))
    if GEMM_MODE == "prange" and _JIT_GEMM and nchunks >= tasks:
        nchunks = -(-nchunks // tasks) * tasks
        rpc = -(-total_rows // nchunks)
        return True, min(tasks, -(-total_rows // rpc)), rpc
    return False, 1, _rows_per_chunk(per_row_bytes, total_rows, slots_per_row)


def _conv3x3(x, w, bias, pad_h, pad_w, OH, OW, groups, m, flipped=False):
    """Stride-1, dilation-1 3x3 correlation by Winograd F(m x m, 3x3).

    x: (N, C, H, W); w: (K, C // groups, 3, 3), or with ``flipped`` the forward's (C, K // groups, 3, 3)
    whose flipped transpose is correlated (see :func:`_filter_transform`); bias: (K,) or None;
    ``pad_h``/``pad_w`` the padding before (any sign); the padding after is implied by ``OH``/``OW``.
    Returns (N, K, OH, OW).
    """
    N, C, H, W = x.shape
    G = int(groups)
    K, Cg = (w.shape[1] * G, w.shape[0] // G) if flipped else (w.shape[0], w.shape[1])
    Kg = K // G
    dt = x.dtype
    y = memory.empty_aligned((N, K, OH, OW), dt)
    if y.size == 0:
        return y, True
    b = np.zeros(K, dt) if bias is None else np.ascontiguousarray(bias, dt)
    a = m + 2
    mats = _matrices(m, dt)
    U = memory.scratch("winograd.U", (a * a, K, Cg), dt)
    _filter_transform(np.ascontiguousarray(w), mats["G"], U, flipped)
    TH, TW = -(-OH // m), -(-OW // m)
    Q = TW + 1  # the input transform's slots per tile row, one spare (see _tile_block); the GEMMs get TW
    rows = N * TH
    per_row = a * a * (C + K) * TW * dt.itemsize
    fused, tasks, rpc = _plan(per_row, rows, TW)
    if fused:
        vbuf = memory.scratch("winograd.V", (tasks, a * a * C * TW * rpc), dt)
        mbuf = memory.scratch("winograd.M", (tasks, a * a * K * TW * rpc), dt)
        bad = np.zeros((tasks, K), dt)
        with _one_thread_blas():
            _fused_forward(x, U.reshape(a * a * G, Kg, Cg), mats["BT"], mats["AT"], a, b, m, pad_h, pad_w, OH, OW,
                           TH, TW, Q, rpc, G, y, bad, vbuf, mbuf, task_queue.counter())
        return y, bool(np.isfinite(bad).all())
    vbuf = memory.scratch("winograd.V", (a * a * C * TW * rpc,), dt)
    mbuf = memory.scratch("winograd.M", (a * a * K * TW * rpc,), dt)
    bad = np.zeros(K, dt)
    for r0 in range(0, rows, rpc):
        r1 = min(rows, r0 + rpc)
        T = (r1 - r0) * TW
        V = vbuf[:a * a * C * T].reshape(a * a, C, T)
        M = mbuf[:a * a * K * T].reshape(a * a, K, T)
        _tile_transform(x, mats["BT"], a, m, pad_h, pad_w, TH, TW, Q, r0, r1, V)
        _gemm(U.reshape(a * a * G, Kg, Cg), V.reshape(a * a * G, Cg, T), M.reshape(a * a * G, Kg, T))
        _output_transform(M, mats["AT"], a, b, m, OH, OW, TH, TW, TW, r0, r1, y, bad)
    return y, bool(np.isfinite(bad).all())


# Non-finite and huge operands. Winograd's transforms mix every element of a tile into all its outputs, so
# one Inf or NaN spoils the whole tile (NaN where torch gives +-Inf), and its intermediates overflow for
# operands whose exact result is still finite (from |x| about 1e36 in float32 for F(4x4)). Either way an
# output of that tile turns non-finite: an operand value inside an output's receptive field reaches that
# output through at least one product of nonzero transform coefficients (A^T, G and B^T compose to the
# plain correlation, so for each tap some term of the composition is nonzero), and Inf and NaN never
# vanish in sums and products (0 * Inf is NaN; zero coefficients are multiplied in :func:`_comb_flat`,
# and BLAS skips nothing). So the kernels run first and check what they wrote (``bad`` in
# :func:`_output_transform`, at no extra pass): a non-finite output sends the call to the exact direct
# kernel, which gives torch's result (a non-finite value outside every receptive field may send a call
# there too: slower, never wrong). Checking the operands beforehand, as before, read the input and the
# weights once more per call (0.3-0.7 ms on a 64-channel 32x32 layer, a fifth of the call) and sent
# calls with a huge but harmless operand to the slow path.


def _dilation_2d(dilation) -> tuple:
    return int(dilation[1]), int(dilation[2])


def _phase_size(spatial, d) -> tuple:
    """Rows and columns of the largest phase of a ``spatial`` plane under dilation ``d``: every phase's size."""
    return tuple(-(-int(n) // k) for n, k in zip(spatial, d))


def _phase_padding(padding, d) -> tuple:
    """The paddings before of the undilated conv each phase runs (:func:`refuse_reason` checked they divide)."""
    return 0, int(padding[1]) // d[0], int(padding[2]) // d[1]


def _to_phases(a, d, size):
    """``a`` (N, C, H, W) as (N*dh*dw, C, *size): entry ``n*dh*dw + i*dw + j`` is ``a[n, :, i::dh, j::dw]``,
    zero-extended to ``size`` (the largest phase's), C-contiguous."""
    N, C = a.shape[:2]
    out = memory.empty_aligned((N, d[0], d[1], C) + tuple(size), a.dtype)
    _phase_split(np.ascontiguousarray(a), d[0], d[1], out)
    return out.reshape((N * d[0] * d[1], C) + tuple(size))


def _from_phases(p, d, spatial):
    """The inverse of :func:`_to_phases`: (N*dh*dw, K, h, w) phases into (N, K, *spatial), each phase cropped."""
    N = p.shape[0] // (d[0] * d[1])
    K = p.shape[1]
    out = memory.empty_aligned((N, K) + tuple(spatial), p.dtype)
    _phase_merge(np.ascontiguousarray(p).reshape((N, d[0], d[1], K) + p.shape[2:]), d[0], d[1], out)
    return out


# The phase copies as kernels: numpy's strided copies of the same took 0.9 and 0.7 ms for DeepLab's 4x256x32x32
# (dilation 2; a plain copy of it 0.26), a sixth of the call.
@parallel.kernel(always=True, **_JIT)
def _phase_split(a, dh, dw, out):
    """``out[n, i, j, c, u, v] = a[n, c, u*dh + i, v*dw + j]``, zero past ``a``'s edge; a (N, C, H, W),
    out (N, dh, dw, C, sh, sw)."""
    N, C, H, W = a.shape
    sh, sw = out.shape[4], out.shape[5]
    zero = 0.0
    for task in prange(N * C):
        n = task // C
        c = task - n * C
        for i in range(dh):
            for j in range(dw):
                for u in range(sh):
                    h = u * dh + i
                    if h < H:
                        for v in range(sw):
                            col = v * dw + j
                            out[n, i, j, c, u, v] = a[n, c, h, col] if col < W else zero
                    else:
                        for v in range(sw):
                            out[n, i, j, c, u, v] = zero


@parallel.kernel(always=True, **_JIT)
def _phase_merge(p, dh, dw, out):
    """``out[n, k, u*dh + i, v*dw + j] = p[n, i, j, k, u, v]`` for every position of ``out`` (N, K, H, W);
    p (N, dh, dw, K, sh, sw)."""
    N, K, H, W = out.shape
    for task in prange(N * K):
        n = task // K
        k = task - n * K
        for h in range(H):
            u = h // dh
            i = h - u * dh
            for j in range(dw):
                for v in range((W - j + dw - 1) // dw):
                    out[n, k, h, v * dw + j] = p[n, i, j, k, u, v]


def _check_2d(x5, kernel):
    if x5.shape[2] != 1 or tuple(kernel[-3:]) != (1, 3, 3):
        raise ValueError(f"winograd: needs a 2-D 3x3 convolution, got input depth {x5.shape[2]} "
                         f"and kernel {'x'.join(map(str, kernel))}")


@config.parallel_entry
def winograd_forward(x, w, bias, padding, groups, out_spatial, m, dilation=(1, 1, 1)):
    """Forward of a stride-1 3x3 convolution by Winograd F(m x m, 3x3).

    x: (N, C, 1, H, W); w: (K, C // groups, 1, 3, 3); bias: (K,) or None; ``padding`` the 3 paddings
    before each dim; ``out_spatial`` (1, OH, OW); ``dilation`` (1, dh, dw), the paddings before then multiples
    of it (see the module docstring). Returns y: (N, K, 1, OH, OW), x's dtype.
    """
    config.sync_threads()
    _check_2d(x, w.shape[2:])
    _, OH, OW = (int(v) for v in out_spatial)
    d = _dilation_2d(dilation)
    if d != (1, 1):
        xs = _to_phases(x[:, :, 0], d, _phase_size(x.shape[3:], d))
        ys = winograd_forward(xs[:, :, None], w, bias, _phase_padding(padding, d), groups,
                              (1,) + _phase_size((OH, OW), d), m)
        return _from_phases(ys[:, :, 0], d, (OH, OW))[:, :, None]
    Cg = w.shape[1]
    y, ok = _conv3x3(np.ascontiguousarray(x[:, :, 0]), np.ascontiguousarray(w[:, :, 0]), bias,
                     int(padding[1]), int(padding[2]), OH, OW, groups, m)
    if not ok:
        return _exact.direct_forward(x, w, bias, (1, 1, 1), padding, (1, 1, 1), groups, out_spatial)
    return y[:, :, None]


@config.parallel_entry
def winograd_grad_input(grad_out, w, padding, groups, in_spatial, m, dilation=(1, 1, 1)):
    """Input gradient as the stride-1 3x3 convolution of ``grad_out`` with flipped, transposed filters.

    grad_out: (N, K, 1, OH, OW); w: (K, C // groups, 1, 3, 3); ``in_spatial`` (1, H, W); ``dilation`` as
    :func:`winograd_forward`'s. The gradient convolution's padding before is ``2 - p`` (negative when p > 2:
    a crop). Returns (N, C, 1, H, W).
    """
    config.sync_threads()
    _check_2d(grad_out, w.shape[2:])
    _, H, W = (int(v) for v in in_spatial)
    d = _dilation_2d(dilation)
    if d != (1, 1):
        gos = _to_phases(grad_out[:, :, 0], d, _phase_size(grad_out.shape[3:], d))
        gxs = winograd_grad_input(gos[:, :, None], w, _phase_padding(padding, d), groups,
                                  (1,) + _phase_size((H, W), d), m)
        return _from_phases(gxs[:, :, 0], d, (H, W))[:, :, None]
    gx, ok = _conv3x3(np.ascontiguousarray(grad_out[:, :, 0]), w[:, :, 0], None, 2 - int(padding[1]),
                      2 - int(padding[2]), H, W, groups, m, flipped=True)
    if not ok:
        return _exact.direct_grad_input(grad_out, w, (1, 1, 1), padding, (1, 1, 1), groups, in_spatial)
    return gx[:, :, None]


@config.parallel_entry
def winograd_grad_weight(grad_out, x, padding, groups, m, dilation=(1, 1, 1)):
    """Weight gradient by Winograd F(3x3, m x m), reusing the forward input transform.

    grad_out: (N, K, 1, OH, OW); x: (N, C, 1, H, W); ``dilation`` as :func:`winograd_forward`'s (the phases
    are summed over as the images are). Returns (K, C // groups, 1, 3, 3).
    """
    config.sync_threads()
    _check_2d(x, (1, 3, 3))
    d = _dilation_2d(dilation)
    if d != (1, 1):
        xs = _to_phases(x[:, :, 0], d, _phase_size(x.shape[3:], d))
        gos = _to_phases(grad_out[:, :, 0], d, _phase_size(grad_out.shape[3:], d))
        return winograd_grad_weight(gos[:, :, None], xs[:, :, None], _phase_padding(padding, d), groups, m)
    go = np.ascontiguousarray(grad_out[:, :, 0])
    xx = np.ascontiguousarray(x[:, :, 0])
    N, K, OH, OW = go.shape
    C = xx.shape[1]
    G = int(groups)
    Kg, Cg = K // G, C // G
    dt = xx.dtype
    a = m + 2
    gw = memory.zeros((K, Cg, 3, 3), dt)
    if go.size == 0 or gw.size == 0 or xx.size == 0:
        return gw[:, :, None]
    mats = _matrices(m, dt)
    TH, TW = -(-OH // m), -(-OW // m)
    Q = TW + 1  # the input transform's slots per tile row (see _tile_block); the GEMMs get TW
    rows = N * TH
    per_row = a * a * (C + K) * TW * dt.itemsize
    fused, tasks, rpc = _plan(per_row, rows, TW)
    if fused:
        # as the forward (see _plan); each thread sums into its own accumulator (one more a*a*K*C/G
        # array per thread, summed at the end: under 1% of the GEMMs' work, since every chunk has at
        # least MIN_GEMM_TILES tiles)
        vbuf = memory.scratch("winograd.V", (tasks, a * a * C * TW * rpc), dt)
        gbuf = memory.scratch("winograd.M", (tasks, a * a * K * TW * rpc), dt)
        accs = memory.scratch("winograd.U", (tasks, a * a * G, Kg, Cg), dt)
        accs.fill(0)
        with _one_thread_blas():
            _fused_grad_weight(xx, go, mats["BT"], mats["Gm"], a, m, int(padding[1]), int(padding[2]), TH, TW, Q,
                               rpc, G, accs, vbuf, gbuf, task_queue.counter())
        acc = accs[0] if tasks == 1 else accs.sum(axis=0)
    else:
        vbuf = memory.scratch("winograd.V", (a * a * C * TW * rpc,), dt)
        gbuf = memory.scratch("winograd.M", (a * a * K * TW * rpc,), dt)
        acc = memory.scratch("winograd.U", (a * a * G, Kg, Cg), dt)
        acc.fill(0)
        for r0 in range(0, rows, rpc):
            r1 = min(rows, r0 + rpc)
            T = (r1 - r0) * TW
            V = vbuf[:a * a * C * T].reshape(a * a, C, T)
            GO = gbuf[:a * a * K * T].reshape(a * a, K, T)
            _tile_transform(xx, mats["BT"], a, m, int(padding[1]), int(padding[2]), TH, TW, Q, r0, r1, V)
            _tile_transform(go, mats["Gm"], m, m, 0, 0, TH, TW, Q, r0, r1, GO)
            _gemm_accumulate(GO.reshape(a * a * G, Kg, T), V.reshape(a * a * G, Cg, T), acc)
    # A_3^T Mw A_3 for every (k, c): the forward's output transform with 3 x 3 "tiles", one per input
    # channel (as tile rows of width 1), vectorised over the channels; it writes (Cg, K, 3, 3).
    out = np.empty((Cg, K, 3, 3), dt)
    bad = np.zeros(K, dt)
    _output_transform(acc.reshape(a * a, K, Cg), mats["AT3"], a, np.zeros(K, dt), 3, 3, 3, 1, 1, 1, 0, Cg, out, bad)
    if not np.isfinite(bad).all():
        return _exact.direct_grad_weight(grad_out, x, (1, 1, 1), padding, (1, 1, 1), groups, (1, 3, 3))
    gw[:] = out.transpose(1, 0, 2, 3)
    return gw[:, :, None]


# --------------------------------------------------------------------------------------------
# Registry hooks
# --------------------------------------------------------------------------------------------

def refuse_reason(g) -> str | None:
    """Why Winograd cannot run geometry ``g`` (a ``ConvGeometry``), or None."""
    if g.kernel[0] != 1 or g.in_spatial[0] != 1 or g.out_spatial[0] != 1 or g.padding[0] != 0:
        return (f"needs a 2-D convolution, got a {g.ndim}-D one with input "
                f"{'x'.join(map(str, g.in_spatial[3 - g.ndim:]))} and kernel "
                f"{'x'.join(map(str, g.kernel[3 - g.ndim:]))}")
    if g.kernel[1:] != (3, 3):
        return f"needs a 3x3 kernel, got {g.kernel[1]}x{g.kernel[2]}"
    if g.stride[1:] != (1, 1):
        return f"needs stride 1, got {g.stride[1:]}"
    if g.dilation[1:] != (1, 1) and (g.padding[1] % g.dilation[1] or g.padding[2] % g.dilation[2]):
        return (f"runs a dilated conv over the input's phases, which needs the padding before each dim to be a "
                f"multiple of its dilation; got padding {g.padding[1:]} with dilation {g.dilation[1:]}")
    return None


def mult_ratio(g, m: int) -> float:
    """Multiplications of the element-wise (GEMM) stage relative to a direct convolution.

    Direct: ``9`` per output per input channel. Winograd: ``a*a`` per ``m x m`` tile, i.e. ``(a/m)^2``
    (16/4 = 4 for F(2x2), 36/16 = 2.25 for F(4x4): 1/2.25 and 1/4 of direct), counted over whole tiles, so
    partial edge tiles raise it. The transforms are not counted: they are additions and multiplications
    by small constants, per tile ``O(a^3)`` for each input channel (input transform) and each output
    channel (output transform) plus ``O(a^2 * 3)`` per filter, amortised over K, C and the batch.
    """
    a = m + 2
    OH, OW = g.out_spatial[1], g.out_spatial[2]
    if OH * OW == 0:
        return (a / m) ** 2 / 9
    d = _dilation_2d(g.dilation)
    sub_h, sub_w = _phase_size((OH, OW), d)  # a dilated conv's phases, each tiled whole (module docstring)
    tiles = d[0] * d[1] * -(-sub_h // m) * -(-sub_w // m)
    return tiles * a * a / (OH * OW * 9)


def workspace_bytes(g, m: int) -> int:
    """Extra bytes of the largest pass: transformed filters plus the chunks of transformed tiles in
    flight (one per thread, see :func:`_plan`), and the weight gradient's accumulators (one per thread)."""
    a = m + 2
    item = g.dtype.itemsize
    C, K, G = g.in_channels, g.out_channels, g.groups
    filters = a * a * K * (C // G) * item
    d = _dilation_2d(g.dilation)
    # a dilated conv runs undilated on the phases (module docstring): d*d times the batch, 1/d the size, and the
    # phase copies of the input and the output (or its gradient) besides
    batch = g.batch * d[0] * d[1]
    out_hw = _phase_size(g.out_spatial[1:], d)
    in_hw = _phase_size(g.in_spatial[1:], d)
    phases = 0 if d == (1, 1) else batch * (C * math.prod(in_hw) + K * math.prod(out_hw)) * item
    worst = 0
    tasks_gw = 1
    # forward tiles over the output, the input gradient tiles over the input
    for i, (OH, OW) in enumerate((out_hw, in_hw)):
        TH, TW = -(-OH // m), -(-OW // m)
        rows = max(1, batch * TH)
        per_row = a * a * (C + K) * TW * item
        _, tasks, rpc = _plan(per_row, rows, TW)
        worst = max(worst, tasks * rpc * per_row)
        if i == 0:
            tasks_gw = tasks
    return filters + worst + tasks_gw * a * a * K * (C // G) * item + phases  # + the weight gradient's accumulators
