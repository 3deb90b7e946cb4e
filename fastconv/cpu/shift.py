"""Numba CPU kernels for 1-D/2-D convolution as shifted-plane multiply-adds (``algo="shift"``).

Why: a grouped conv with narrow groups (RegNet's 8 channels per group, ResNeXt's 4) has too little arithmetic
per input element for im2col. Its column matrix is ``KH*KW`` times the input, written and read once for only
``Kg`` multiply-adds per element, and the column fill cost 3-5x torch's whole conv (measured, RegNet-Y-400MF at
batch 8). Here no columns are made: every kernel tap is one multiply-add of a whole (shifted) input plane into a
whole output plane, so each inner loop runs over a full plane (hundreds of elements, vectorised) instead of one
output row.

Layout (per input channel, the whole batch in one row): the input zero-padded and split by stride phase,
``xph[c, ph_h * sw + ph_w, (n * Hq + i) * Wq + j] = x_padded[n, c, i * sh + ph_h, j * sw + ph_w]``. An output
pixel ``(oh, ow)`` and tap ``(kh, kw)`` read ``x_padded[oh*sh + kh*dh, ow*sw + kw*dw]``, which is phase
``((kh*dh) % sh, (kw*dw) % sw)`` at ``(oh + (kh*dh)//sh) * Wq + ow + (kw*dw)//sw``. Laying the output out on
the same grid (``m = (n * Hq + oh) * Wq + ow``, ``M = N * Hq * Wq`` positions), one tap is one contiguous slice
of one phase row starting at the tap's offset, for every output pixel of every image at once. The positions
that are no output pixel (columns past ``OW``, rows past ``OH``; their slices run into the next row or image)
are computed and dropped (forward) or held at zero (gradients); a zero tail keeps the last slices inside.
Short planes (RegNet's 4x4 outputs) thus still give loops of hundreds of elements.

* forward: ``out[k, m] += w[k, c, t] * xph[c, phase_t, off_t + m]``, four output channels and three taps per
  pass (register blocking), parallel over (4-channel block, chunk of :data:`CHUNK` positions);
* input gradient: stride 1 is the forward conv of the output gradient with flipped, group-transposed weights;
  strided convs take the adjoint ``gxph[c, phase_t, off_t + m] += w[k, c, t] * go[k, m]``, parallel over input
  channels (each task owns its planes: no races), then un-split;
* weight gradient: ``gw[k, c, t] = dot(go[k, :], xph[c, phase_t, off_t : off_t + M])``, parallel over (group,
  4-channel block).

Arrays are 5-D ``(N, C, 1, H, W)`` as in :mod:`.conv` (a 1-D conv has ``H == 1``); 3-D convs are refused by
:func:`refuse_reason`. Arguments: 3-tuples of stride / padding-before / dilation and the result's spatial size.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from fastconv import config

from . import memory, parallel
from .arguments import int_tuple

__all__ = ["forward", "grad_input", "grad_weight", "refuse_reason"]

_JIT = dict(cache=config.CACHE, fastmath=set(config.FASTMATH), nogil=True)


def _shared_pad_extent(O, I, K, d, p):
    """Plane rows (or row length) of a stride-1 conv when consecutive rows (images) share their zero padding.

    A tap that reads past the end of a plane row lands in the next row's first columns; where those are left
    padding (zeros), the row needs no right padding of its own: with 3x3 filters and padding 1 a row is
    ``W + 1`` long instead of ``W + 2`` and an image ``H + 1`` rows instead of ``H + 2`` (RegNet's 4x4
    planes: 25 positions per image instead of 36, all computed for 16 outputs). Bounds: every output
    (``>= O``); every input column stored (``>= I + p``, else a read could wrap past real data); a wrapped
    read lands within the left padding (``>= O + (K - 1) * d - p``); never more than the unshared extent
    ``O + (K - 1) * d`` (negative padding: no zeros to share).
    """
    full = O + (K - 1) * d
    return min(full, max(O, I + p, full - p))


class _Planes:
    """The phase-plane geometry of one conv: plane rows ``Hq`` and row length ``Wq`` (``Wq >= OW``), the
    length ``M = N * Hq * Wq`` of one channel's planes over the batch, ``Lp`` with the zero tail that keeps
    the last tap's slice inside (``tail`` long), and each tap's (phase, offset). ``padding``: before each dim;
    ``in_spatial``: the input's (D, H, W)."""

    def __init__(self, batch, kernel, stride, dilation, out_spatial, padding, in_spatial):
        _, KH, KW = kernel
        _, sh, sw = stride
        _, dh, dw = dilation
        _, OH, OW = out_spatial
        if (sh, sw) == (1, 1):
            self.Hq = _shared_pad_extent(OH, in_spatial[1], KH, dh, padding[1])
            self.Wq = _shared_pad_extent(OW, in_spatial[2], KW, dw, padding[2])
        else:
            # the rows / columns of the padded input that some window reads, (O - 1) * s + (K - 1) * d + 1, in
            # phase units (each phase grid keeps its own padding)
            self.Hq = -(-((OH - 1) * sh + (KH - 1) * dh + 1) // sh)
            self.Wq = -(-((OW - 1) * sw + (KW - 1) * dw + 1) // sw)
        self.M = batch * self.Hq * self.Wq
        kh, kw = np.meshgrid(np.arange(KH), np.arange(KW), indexing="ij")
        ah, aw = (kh * dh).reshape(-1), (kw * dw).reshape(-1)
        self.phase = ((ah % sh) * sw + aw % sw).astype(np.int64)
        self.offset = ((ah // sh) * self.Wq + aw // sw).astype(np.int64)
        #: the largest tap offset: the zero tail a plane needs past its last position
        self.tail = int(self.offset.max())
        self.Lp = self.M + self.tail
        self.nphase = sh * sw


@functools.lru_cache(maxsize=512)
def _planes(batch, kernel, stride, dilation, out_spatial, padding, in_spatial) -> _Planes:
    """:class:`_Planes` of a geometry, built once (a model calls the same layers again and again; building
    them and their index maps cost about 60 µs a call, a third of a batch-1 RegNet layer)."""
    return _Planes(batch, kernel, stride, dilation, out_spatial, padding, in_spatial)


#: Plane elements one forward task multiplies into (a cache-sized slice of 4 output channels' planes).
CHUNK = 2048


# compute=True: an indexed gather with a branch per element, several times a plain copy's cost per element
# (stride 2, 1M elements: 0.72 ms on one thread), so it pays for the worker threads from 256K elements on
@parallel.kernel(compute=True, **_JIT)
def _to_phase_planes(x, source, Hq, Wq, out):
    """``out[c, p, n * Hq * Wq + q] = x[n, c].flat[source[p, q]]`` (0 where ``source`` is -1, and in the tail):
    one gather loop per (channel, image, phase) over the whole plane (``source``: :func:`_plane_sources`).
    Parallel over (channel, image)."""
    N, C, _, H, W = x.shape
    P = source.shape[0]
    Lp = out.shape[2]
    S = Hq * Wq
    xf = x.reshape(x.size)
    for task in prange(C * N):
        c = task // N
        n = task - c * N
        base = (n * C + c) * H * W
        for p in range(P):
            dst = out[c, p, n * S:(n + 1) * S]
            src = source[p]
            for q in range(S):
                v = src[q]
                dst[q] = xf[base + v] if v >= 0 else 0
            if n == N - 1:
                tail = out[c, p]
                for m in range(N * S, Lp):
                    tail[m] = 0


@functools.lru_cache(maxsize=512)
def _plane_sources(planes, in_hw, padding, stride):
    """For each phase ``(a, b)`` and plane position ``(i, j)``: the flat index ``ih * W + iw`` of the input pixel
    at padded position ``(i*sh + a, j*sw + b)``, or -1 in the padding."""
    H, W = in_hw
    sh, sw = stride[1], stride[2]
    i = np.arange(planes.Hq)[:, None]
    j = np.arange(planes.Wq)[None, :]
    rows = []
    for a in range(sh):
        for b in range(sw):
            ih = i * sh + a - padding[1]
            iw = j * sw + b - padding[2]
            inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            rows.append(np.where(inside, ih * W + iw, -1).reshape(-1))
    return np.ascontiguousarray(np.stack(rows), dtype=np.int64)


@parallel.kernel(**_JIT)
def _from_phase_planes(gph, back, S, out):
    """Inverse of :func:`_to_phase_planes` for the input gradient: ``out[n, c].flat[q] =
    gph[c].flat[back[q] + n * S]`` (0 where ``back`` is -1: no window reaches the pixel). One gather loop per
    (image, channel); ``back``: :func:`_plane_targets`. Parallel over (image, channel)."""
    N, C, _, H, W = out.shape
    HW = H * W
    of = out.reshape(out.size)
    for task in prange(N * C):
        n = task // C
        c = task - n * C
        src = gph[c].reshape(gph.shape[1] * gph.shape[2])
        dst = of[task * HW:(task + 1) * HW]
        shift = n * S
        for q in range(HW):
            v = back[q]
            dst[q] = src[v + shift] if v >= 0 else 0


@functools.lru_cache(maxsize=512)
def _plane_targets(planes, in_hw, padding, stride):
    """For each input pixel ``ih * W + iw`` of image 0: its flat index ``phase * Lp + i * Wq + j`` in the planes,
    or -1 where it lies outside them (rows or columns no window reaches)."""
    H, W = in_hw
    sh, sw = stride[1], stride[2]
    r = np.arange(H)[:, None] + padding[1]
    q = np.arange(W)[None, :] + padding[2]
    i, a = np.divmod(r, sh)
    j, b = np.divmod(q, sw)
    inside = (r >= 0) & (i < planes.Hq) & (q >= 0) & (j < planes.Wq)
    flat = (a * sw + b) * planes.Lp + i * planes.Wq + j
    return np.ascontiguousarray(np.where(inside, flat, -1).reshape(-1), dtype=np.int64)


@njit(**_JIT)
def _taps_into(xph, cb, Cg, w, k0, nr, phase, offset, m0, L, out, r0):
    """``out[r0 + j, m0 + m] = sum_{c < Cg, t} w[k0 + j, c, t] * xph[cb + c, phase[t], offset[t] + m0 + m]`` for
    ``j < nr`` (at most 4) and ``m < L``: four output channels and three taps per pass over the positions."""
    T = w.shape[2]
    for j in range(nr):
        out[r0 + j, m0:m0 + L] = 0
    for c in range(Cg):
        xc = xph[cb + c]
        if nr == 4:
            # rows taken one by one: a row of the 2-D slice out[r0:r0+4, m0:m0+L] is typed as strided
            # (layout 'A') and its loops do not vectorise (measured 6x slower)
            a0 = out[r0, m0:m0 + L]
            a1 = out[r0 + 1, m0:m0 + L]
            a2 = out[r0 + 2, m0:m0 + L]
            a3 = out[r0 + 3, m0:m0 + L]
            t = 0
            while t + 3 <= T:
                xa = xc[phase[t], m0 + offset[t]:m0 + offset[t] + L]
                xb = xc[phase[t + 1], m0 + offset[t + 1]:m0 + offset[t + 1] + L]
                xd = xc[phase[t + 2], m0 + offset[t + 2]:m0 + offset[t + 2] + L]
                w0a, w0b, w0d = w[k0, c, t], w[k0, c, t + 1], w[k0, c, t + 2]
                w1a, w1b, w1d = w[k0 + 1, c, t], w[k0 + 1, c, t + 1], w[k0 + 1, c, t + 2]
                w2a, w2b, w2d = w[k0 + 2, c, t], w[k0 + 2, c, t + 1], w[k0 + 2, c, t + 2]
                w3a, w3b, w3d = w[k0 + 3, c, t], w[k0 + 3, c, t + 1], w[k0 + 3, c, t + 2]
                for m in range(L):
                    va = xa[m]
                    vb = xb[m]
                    vd = xd[m]
                    a0[m] += w0a * va + w0b * vb + w0d * vd
                    a1[m] += w1a * va + w1b * vb + w1d * vd
                    a2[m] += w2a * va + w2b * vb + w2d * vd
                    a3[m] += w3a * va + w3b * vb + w3d * vd
                t += 3
            while t < T:
                xa = xc[phase[t], m0 + offset[t]:m0 + offset[t] + L]
                w0a, w1a, w2a, w3a = w[k0, c, t], w[k0 + 1, c, t], w[k0 + 2, c, t], w[k0 + 3, c, t]
                for m in range(L):
                    va = xa[m]
                    a0[m] += w0a * va
                    a1[m] += w1a * va
                    a2[m] += w2a * va
                    a3[m] += w3a * va
                t += 1
        else:
            for j in range(nr):
                aj = out[r0 + j, m0:m0 + L]
                for t in range(T):
                    xa = xc[phase[t], m0 + offset[t]:m0 + offset[t] + L]
                    wv = w[k0 + j, c, t]
                    for m in range(L):
                        aj[m] += wv * xa[m]


@parallel.kernel(work_arg=0, compute=True, **_JIT)
def _forward_planes(xph, w, groups, phase, offset, out):
    """``out[k, m] = sum_{c in k's group, t} w[k, c, t] * xph[g*Cg + c, phase[t], offset[t] + m]``.
    ``w``: (K, Cg, T); ``out``: (K, M). Parallel over (block of 4 output channels, chunk of ``CHUNK``)."""
    K, M = out.shape
    Cg = w.shape[1]
    Kg = K // groups
    nblk = (Kg + 3) // 4
    nch = (M + CHUNK - 1) // CHUNK
    for task in prange(groups * nblk * nch):
        blk = task // nch
        m0 = (task - blk * nch) * CHUNK
        L = min(M, m0 + CHUNK) - m0
        g = blk // nblk
        k0 = g * Kg + (blk - g * nblk) * 4
        _taps_into(xph, g * Cg, Cg, w, k0, min(4, g * Kg + Kg - k0), phase, offset, m0, L, out, k0)


#: Most bytes of one task's planes in :func:`_forward_by_group` (its group's input channels over its images) and
#: :func:`_grad_weight_by_group` (over the whole batch); beyond that (wide groups, large images) the planes are
#: built for the whole batch first, by :func:`_to_phase_planes`.
GROUP_PLANES_MAX_BYTES = 256 << 10


@parallel.kernel(work_arg=0, compute=True, **_JIT)
def _forward_by_group(x, w, bias, groups, source, Hq, Wq, phase, offset, tail, nb, y):
    """The whole forward per (group, block of ``nb`` images): build the group's planes of those images, run
    the taps, write the output pixels plus the bias to ``y``; every buffer local to the task.

    Why: the three-pass forward (planes of the batch, :func:`_forward_planes`, :func:`_unwiden`) runs three
    parallel regions and writes and rereads two batch-sized buffers; for RegNet's grouped 3x3 layers at batch 8
    (208 to 440 channels, 4x4 to 16x16) that was more than half the call. Here a task's planes and its output
    rows stay in its core's cache.

    x : (N, C, 1, H, W); w : (K, Cg, T); bias : (K,); source : :func:`_plane_sources`; tail : the largest of
    ``offset`` (:attr:`_Planes.tail`); y : (N, K, 1, OH, OW).
    """
    N = x.shape[0]
    K, OH, OW = y.shape[1], y.shape[3], y.shape[4]
    Cg = w.shape[1]
    Kg = K // groups
    S = Hq * Wq
    nblocks = (N + nb - 1) // nb
    for task in prange(groups * nblocks):
        g = task // nblocks
        n0 = (task - g * nblocks) * nb
        n1 = min(N, n0 + nb)
        Ml = (n1 - n0) * S
        xph = _group_planes(x, g, Cg, source, S, n0, n1, tail)
        wide = np.empty((Kg, Ml), x.dtype)
        for kb in range(0, Kg, 4):
            _taps_into(xph, 0, Cg, w, g * Kg + kb, min(4, Kg - kb), phase, offset, 0, Ml, wide, kb)
        for j in range(Kg):
            k = g * Kg + j
            b = bias[k]
            for n in range(n0, n1):
                for oh in range(OH):
                    src = wide[j, ((n - n0) * Hq + oh) * Wq:((n - n0) * Hq + oh) * Wq + OW]
                    dst = y[n, k, 0, oh]
                    for ow in range(OW):
                        dst[ow] = src[ow] + b


@njit(**_JIT)
def _scatter_into(gow, r0, Kg, w, k0, c, phase, offset, M, planes):
    """``planes[phase[t], offset[t] + m] += sum_{j < Kg} w[k0 + j, c, t] * gow[r0 + j, m]`` for every tap ``t`` and
    ``m < M``: the adjoint of the forward's taps for one input channel ``c`` (of the group whose output channels
    are ``k0 ...``), eight output channels per pass over the positions."""
    T = w.shape[2]
    for t in range(T):
        dst = planes[phase[t], offset[t]:offset[t] + M]
        j = 0
        while j + 8 <= Kg:  # 8 multiply-adds per store of dst (RegNet's groups are 8 wide)
            g0 = gow[r0 + j, :M]
            g1 = gow[r0 + j + 1, :M]
            g2 = gow[r0 + j + 2, :M]
            g3 = gow[r0 + j + 3, :M]
            g4 = gow[r0 + j + 4, :M]
            g5 = gow[r0 + j + 5, :M]
            g6 = gow[r0 + j + 6, :M]
            g7 = gow[r0 + j + 7, :M]
            k = k0 + j
            w0, w1, w2, w3 = w[k, c, t], w[k + 1, c, t], w[k + 2, c, t], w[k + 3, c, t]
            w4, w5, w6, w7 = w[k + 4, c, t], w[k + 5, c, t], w[k + 6, c, t], w[k + 7, c, t]
            for m in range(M):
                dst[m] += (w0 * g0[m] + w1 * g1[m] + w2 * g2[m] + w3 * g3[m]
                           + w4 * g4[m] + w5 * g5[m] + w6 * g6[m] + w7 * g7[m])
            j += 8
        while j + 4 <= Kg:
            g0 = gow[r0 + j, :M]
            g1 = gow[r0 + j + 1, :M]
            g2 = gow[r0 + j + 2, :M]
            g3 = gow[r0 + j + 3, :M]
            k = k0 + j
            w0, w1, w2, w3 = w[k, c, t], w[k + 1, c, t], w[k + 2, c, t], w[k + 3, c, t]
            for m in range(M):
                dst[m] += w0 * g0[m] + w1 * g1[m] + w2 * g2[m] + w3 * g3[m]
            j += 4
        while j < Kg:
            g0 = gow[r0 + j, :M]
            w0 = w[k0 + j, c, t]
            for m in range(M):
                dst[m] += w0 * g0[m]
            j += 1


@parallel.kernel(work_arg=0, compute=True, **_JIT)
def _grad_input_planes(gow, w, groups, phase, offset, gph):
    """``gph[c, phase[t], offset[t] + m] += w[k, c % Cg, t] * gow[k, m]`` over the ``k`` of ``c``'s group, from
    zero. ``gow``: (K, M), zero at positions that are no output pixel; ``gph``: (C, P, Lp). Parallel over input
    channels (each task owns its planes: no races)."""
    K, M = gow.shape
    C = gph.shape[0]
    Cg = w.shape[1]
    Kg = K // groups
    for ci in prange(C):
        g = ci // Cg
        planes = gph[ci]
        planes[:, :] = 0
        _scatter_into(gow, g * Kg, Kg, w, g * Kg, ci - g * Cg, phase, offset, M, planes)


@njit(**_JIT)
def _group_widened(go, g, Kg, Hq, Wq):
    """Group ``g``'s output channels of ``go`` (N, K, 1, OH, OW) on the plane grid: (Kg, N * Hq * Wq), zero at
    the positions that are no output pixel (see :func:`_widen`)."""
    N, OH, OW = go.shape[0], go.shape[3], go.shape[4]
    gow = np.zeros((Kg, N * Hq * Wq), go.dtype)
    for j in range(Kg):
        for n in range(N):
            for oh in range(OH):
                dst = gow[j, (n * Hq + oh) * Wq:(n * Hq + oh) * Wq + OW]
                src = go[n, g * Kg + j, 0, oh]
                for ow in range(OW):
                    dst[ow] = src[ow]
    return gow


@parallel.kernel(work_arg=0, compute=True, **_JIT)
def _grad_input_by_group(go, w, groups, Hq, Wq, phase, offset, back, P, Lp, gx):
    """The strided input gradient per group: the group's widened output gradient, then per input channel its
    planes (zeroed, the taps' adjoint, :func:`_scatter_into`) gathered straight into ``gx``; every buffer local
    to the task (as :func:`_forward_by_group`).

    Why: the whole-batch version (:func:`_widen`, :func:`_grad_input_planes`, :func:`_from_phase_planes`) wrote
    three batch-sized buffers to fresh memory and ran its gather on one thread (a copy kernel below the
    parallel threshold): RegNet's 440-channel stride-2 layer at batch 8 took 0.75 ms against torch's 0.36.

    go : (N, K, 1, OH, OW); w : (K, Cg, T); back : :func:`_plane_targets` (``P`` phase planes of ``Lp``: all
    of the stride's phases, also those no tap reads, whose pixels get zeros); gx : (N, C, 1, H, W), written.
    """
    N = go.shape[0]
    K = go.shape[1]
    C, H, W = gx.shape[1], gx.shape[3], gx.shape[4]
    Cg = w.shape[1]
    Kg = K // groups
    S = Hq * Wq
    M = N * S
    HW = H * W
    for g in prange(groups):
        gow = _group_widened(go, g, Kg, Hq, Wq)
        planes = np.empty((P, Lp), go.dtype)
        pf = planes.reshape(P * Lp)
        for c in range(Cg):
            planes[:, :] = 0
            _scatter_into(gow, 0, Kg, w, g * Kg, c, phase, offset, M, planes)
            for n in range(N):
                dst = gx[n, g * Cg + c, 0].reshape(HW)
                shift = n * S
                for q in range(HW):
                    v = back[q]
                    dst[q] = pf[v + shift] if v >= 0 else 0


@njit(**_JIT)
def _dots_into(gow, r0, xph, cb, Cg, phase, offset, M, gw, k0, nr):
    """``gw[k0 + j, c, t] += dot(gow[r0 + j, :M], xph[cb + c, phase[t], offset[t] : offset[t] + M])`` for ``j < nr``
    (at most 4), ``c < Cg`` and every tap ``t``: four output channels per pass over the positions."""
    T = gw.shape[2]
    for c in range(Cg):
        for t in range(T):
            xs = xph[cb + c, phase[t], offset[t]:offset[t] + M]
            if nr == 4:
                g0 = gow[r0, :M]
                g1 = gow[r0 + 1, :M]
                g2 = gow[r0 + 2, :M]
                g3 = gow[r0 + 3, :M]
                s0 = gw[k0, c, t]  # of gw's dtype (float32 sums vectorise)
                s1 = gw[k0 + 1, c, t]
                s2 = gw[k0 + 2, c, t]
                s3 = gw[k0 + 3, c, t]
                for m in range(M):
                    v = xs[m]
                    s0 += g0[m] * v
                    s1 += g1[m] * v
                    s2 += g2[m] * v
                    s3 += g3[m] * v
                gw[k0, c, t] = s0
                gw[k0 + 1, c, t] = s1
                gw[k0 + 2, c, t] = s2
                gw[k0 + 3, c, t] = s3
            else:
                for j in range(nr):
                    gj = gow[r0 + j, :M]
                    acc = gw[k0 + j, c, t]
                    for m in range(M):
                        acc += gj[m] * xs[m]
                    gw[k0 + j, c, t] = acc


@parallel.kernel(work_arg=1, compute=True, **_JIT)
def _grad_weight_planes(gow, xph, groups, phase, offset, gw):
    """``gw[k, c, t] = dot(gow[k], xph[g*Cg + c, phase[t], offset[t] : offset[t] + M])``. ``gow``: (K, M), zero
    at positions that are no output pixel; ``gw``: (K, Cg, T), arriving zeroed. Parallel over (group, block of 4
    output channels)."""
    K, M = gow.shape
    Cg = gw.shape[1]
    Kg = K // groups
    nblk = (Kg + 3) // 4
    for task in prange(groups * nblk):
        g = task // nblk
        k0 = g * Kg + (task - g * nblk) * 4
        _dots_into(gow, k0, xph, g * Cg, Cg, phase, offset, M, gw, k0, min(4, g * Kg + Kg - k0))


@njit(**_JIT)
def _group_planes(x, g, Cg, source, S, n0, n1, tail):
    """The planes (Cg, phases, (n1 - n0) * S + tail) of group ``g``'s input channels over the images ``[n0, n1)``
    (see :func:`_to_phase_planes`; zero in the padding and the tail)."""
    N, C, _, H, W = x.shape
    P = source.shape[0]
    Ml = (n1 - n0) * S
    xf = x.reshape(x.size)
    xph = np.empty((Cg, P, Ml + tail), x.dtype)
    for c in range(Cg):
        for n in range(n0, n1):
            base = (n * C + g * Cg + c) * H * W
            o = (n - n0) * S
            for p in range(P):
                src = source[p]
                dst = xph[c, p, o:o + S]
                for q in range(S):
                    v = src[q]
                    dst[q] = xf[base + v] if v >= 0 else 0
        for p in range(P):
            xph[c, p, Ml:] = 0
    return xph


@parallel.kernel(work_arg=0, compute=True, **_JIT)
def _grad_weight_by_group(x, go, groups, source, Hq, Wq, phase, offset, tail, gw):
    """The whole weight gradient per group, its planes of the batch and its widened output gradient local to
    the task (as :func:`_forward_by_group`: one parallel region, no batch-sized buffers).

    x : (N, C, 1, H, W); go : (N, K, 1, OH, OW); tail : :attr:`_Planes.tail`; gw : (K, Cg, T), arriving zeroed.
    """
    N = x.shape[0]
    K = go.shape[1]
    Cg = gw.shape[1]
    Kg = K // groups
    S = Hq * Wq
    for g in prange(groups):
        xph = _group_planes(x, g, Cg, source, S, 0, N, tail)
        gow = _group_widened(go, g, Kg, Hq, Wq)
        for kb in range(0, Kg, 4):
            _dots_into(gow, kb, xph, 0, Cg, phase, offset, N * S, gw, g * Kg + kb, min(4, Kg - kb))


@parallel.kernel(work_arg=0, **_JIT)
def _unwiden(wide, Hq, bias, out):
    """``out[n, k, 0, oh, ow] = wide[k, (n * Hq + oh) * Wq + ow] + bias[k]``: the output pixels of the planes."""
    N, K, _, OH, OW = out.shape
    Wq = wide.shape[1] // (N * Hq)
    for task in prange(N * K):
        n = task // K
        k = task - n * K
        b = bias[k]
        for oh in range(OH):
            base = (n * Hq + oh) * Wq
            src = wide[k, base:base + OW]
            dst = out[n, k, 0, oh]
            for ow in range(OW):
                dst[ow] = src[ow] + b


@parallel.kernel(work_arg=0, **_JIT)
def _widen(go, Hq, Wq, out):
    """``out[k, (n * Hq + oh) * Wq + ow] = go[n, k, 0, oh, ow]``, zero at the positions that are no output pixel."""
    N, K, _, OH, OW = go.shape
    for k in prange(K):
        row = out[k]
        for n in range(N):
            for i in range(Hq):
                dst = row[(n * Hq + i) * Wq:(n * Hq + i + 1) * Wq]
                if i < OH:
                    src = go[n, k, 0, i]
                    for ow in range(OW):
                        dst[ow] = src[ow]
                    for ow in range(OW, Wq):
                        dst[ow] = 0
                else:
                    for ow in range(Wq):
                        dst[ow] = 0


def refuse_reason(kernel, out_spatial, groups: int) -> str | None:
    """Why ``shift`` does not run a conv with this kernel / output size / groups, or None.

    1-D and 2-D only. Grouped convs only: on a dense conv the GEMM algorithms run faster (measured, batch 8:
    SqueezeNet's 32 -> 128 3x3 at 30x30 5.7 ms against Winograd's 2.6, ResNet's 7x7 stem 12.1 against
    im2col's 9.0), and offering it there let the autotuner keep it for some dense layers when the machine
    was noisy (the kernels themselves run any geometry, and are tested on dense ones)."""
    if kernel[0] != 1 or out_spatial[0] != 1:
        return f"1-D and 2-D convolutions only, got a 3-D kernel {tuple(kernel)}"
    if groups == 1:
        return "grouped convolutions only (groups > 1): dense convolutions run faster as GEMMs (im2col, winograd)"
    return None


def _planes_of(x, planes: _Planes, padding, stride):
    """``x`` (N, C, 1, H, W) as its zero-padded, stride-phase-split planes (C, phases, Lp)."""
    N, C = x.shape[:2]
    xph = np.empty((C, planes.nphase, planes.Lp), x.dtype)
    _to_phase_planes(x, _plane_sources(planes, tuple(x.shape[3:]), padding, stride), planes.Hq, planes.Wq, xph)
    return xph


#: Fewest multiply-adds for which the arithmetic kernels wake the worker threads. The serial kernels run short
#: planes at about 20 GFLOP/s, so waking the second thread pays from a few hundred thousand: measured at batch 1,
#: 2 threads, 8-wide groups 3x3, medians of 300 calls, µs forward / input grad / weight grad, serial -> parallel:
#: RegNet's 440 x 4x4 (1.1M) 92/111/84 -> 57/78/51, 208 x 8x8 (1.5M) 71/83/83 -> 46/60/50 (torch's forward 55);
#: 128 x 4x4 (0.33M) 38/48/37 -> 30/41/28; 64 x 4x4 (0.17M) level (27/36/27). (The dense fused-im2col kernels
#: are faster per call and stay serial below 2M: there a lower threshold measured 1.1-1.5x slower.)
PARALLEL_MIN_MACS = 250_000


def _sized(kernel, macs):
    """The parallel or the serial compilation of ``kernel``, by the call's multiply-adds (serial in a child
    forked from an OpenMP process, which ends at its first parallel launch: see ``parallel.SERIAL_ONLY``)."""
    return kernel.parallel if macs >= PARALLEL_MIN_MACS and not parallel.SERIAL_ONLY else kernel.serial


_tup = int_tuple  # geometry arguments as int tuples, memoised


def forward(x, w, bias, stride, padding, dilation, groups, out_spatial):
    """x: (N, C, 1, H, W); w: (K, C // groups, 1, KH, KW); bias: (K,) or None -> (N, K, 1, OH, OW)."""
    config.sync_threads()
    stride, padding, dilation, out_spatial = map(_tup, (stride, padding, dilation, out_spatial))
    N = x.shape[0]
    K, Cg = w.shape[:2]
    y = memory.empty_aligned((N, K) + out_spatial, x.dtype)
    if y.size == 0:
        return y
    planes = _planes(N, tuple(w.shape[2:]), stride, dilation, out_spatial, padding, tuple(x.shape[2:]))
    w3 = np.ascontiguousarray(w).reshape(K, Cg, -1)
    b = np.zeros(K, x.dtype) if bias is None else np.ascontiguousarray(bias, x.dtype)
    macs = K * planes.M * w3[0].size
    S = planes.Hq * planes.Wq
    image_bytes = Cg * planes.nphase * (S + planes.tail) * x.dtype.itemsize
    if image_bytes <= GROUP_PLANES_MAX_BYTES:
        # images per task: enough for CHUNK positions (long loops), in equal blocks, within the byte bound
        nb = max(1, min(N, CHUNK // max(1, S), GROUP_PLANES_MAX_BYTES // image_bytes))
        nb = -(-N // -(-N // nb))
        _sized(_forward_by_group, macs)(np.ascontiguousarray(x), w3, b, int(groups),
                                        _plane_sources(planes, tuple(x.shape[3:]), padding, stride),
                                        planes.Hq, planes.Wq, planes.phase, planes.offset, planes.tail, nb, y)
        return y
    xph = _planes_of(np.ascontiguousarray(x), planes, padding, stride)
    wide = np.empty((K, planes.M), x.dtype)
    _sized(_forward_planes, macs)(xph, w3, int(groups), planes.phase, planes.offset, wide)
    _unwiden(wide, planes.Hq, b, y)
    return y


def grad_input(grad_out, w, stride, padding, dilation, groups, in_spatial):
    """grad_out: (N, K, 1, OH, OW); w: (K, C // groups, 1, KH, KW) -> grad_input (N, C, 1, H, W)."""
    config.sync_threads()
    stride, padding, dilation, in_spatial = map(_tup, (stride, padding, dilation, in_spatial))
    N, K = grad_out.shape[:2]
    G = int(groups)
    _, Cg, _, KH, KW = w.shape
    C = Cg * G
    if stride == (1, 1, 1):
        # the adjoint of a stride-1 conv is a stride-1 conv of the output gradient with the flipped,
        # group-transposed weights and padding (k - 1) * d - p: the forward kernel's 12 multiply-adds per
        # 7 loads and 4 stores instead of the scatter's 4 per 5 loads and a store
        wt = w.reshape(G, K // G, Cg, KH, KW).transpose(0, 2, 1, 3, 4)[..., ::-1, ::-1]
        wt = np.ascontiguousarray(wt).reshape(C, K // G, 1, KH, KW)
        tpad = (0, (KH - 1) * dilation[1] - padding[1], (KW - 1) * dilation[2] - padding[2])
        return forward(grad_out, wt, None, stride, tpad, dilation, G, in_spatial)
    gx = memory.empty_aligned((N, C) + in_spatial, grad_out.dtype)
    if gx.size == 0:
        return gx
    if grad_out.size == 0:
        gx[...] = 0
        return gx
    planes = _planes(N, tuple(w.shape[2:]), stride, dilation, tuple(grad_out.shape[2:]), padding, in_spatial)
    w3 = np.ascontiguousarray(w).reshape(K, Cg, -1)
    targets = _plane_targets(planes, tuple(in_spatial[1:]), padding, stride)
    group_bytes = ((K // G) * planes.M + planes.nphase * planes.Lp) * grad_out.dtype.itemsize
    if group_bytes <= GROUP_PLANES_MAX_BYTES:
        _sized(_grad_input_by_group, K * planes.M * w3[0].size)(
            np.ascontiguousarray(grad_out), w3, G, planes.Hq, planes.Wq, planes.phase, planes.offset, targets,
            planes.nphase, planes.Lp, gx)
        return gx
    gow = np.empty((K, planes.M), grad_out.dtype)
    _widen(np.ascontiguousarray(grad_out), planes.Hq, planes.Wq, gow)
    gph = np.empty((C, planes.nphase, planes.Lp), grad_out.dtype)
    _sized(_grad_input_planes, gow.size * w3[0].size)(gow, w3, G, planes.phase, planes.offset, gph)
    _from_phase_planes(gph, targets, planes.Hq * planes.Wq, gx)
    return gx


def grad_weight(grad_out, x, stride, padding, dilation, groups, kernel_spatial):
    """grad_out: (N, K, 1, OH, OW); x: (N, C, 1, H, W) -> grad_weight (K, C // groups, 1, KH, KW)."""
    config.sync_threads()
    stride, padding, dilation, kernel_spatial = map(_tup, (stride, padding, dilation, kernel_spatial))
    N, K = grad_out.shape[:2]
    Cg = x.shape[1] // int(groups)
    gw = memory.zeros((K, Cg) + kernel_spatial, grad_out.dtype)
    if gw.size == 0 or grad_out.size == 0 or x.size == 0:
        return gw
    planes = _planes(N, kernel_spatial, stride, dilation, tuple(grad_out.shape[2:]), padding, tuple(x.shape[2:]))
    gw3 = gw.reshape(K, Cg, -1)
    batch_bytes = Cg * planes.nphase * (planes.M + planes.tail) * x.dtype.itemsize
    if batch_bytes <= GROUP_PLANES_MAX_BYTES:
        _sized(_grad_weight_by_group, K * planes.M * gw3[0].size)(
            np.ascontiguousarray(x), np.ascontiguousarray(grad_out), int(groups),
            _plane_sources(planes, tuple(x.shape[3:]), padding, stride), planes.Hq, planes.Wq, planes.phase,
            planes.offset, planes.tail, gw3)
        return gw
    gow = np.empty((K, planes.M), grad_out.dtype)
    _widen(np.ascontiguousarray(grad_out), planes.Hq, planes.Wq, gow)
    xph = _planes_of(np.ascontiguousarray(x), planes, padding, stride)
    _sized(_grad_weight_planes, gow.size * gw3[0].size)(gow, xph, int(groups), planes.phase, planes.offset, gw3)
    return gw


def executed_multiplications(batch, in_channels, out_channels, groups, kernel, stride, dilation, out_spatial,
                              padding, in_spatial) -> int:
    """Multiplications the forward performs: every output channel over every plane position of the batch
    (``N * Hq * Wq``, the output pixels plus the extra columns and rows that are computed and dropped)."""
    planes = _planes(batch, tuple(kernel), tuple(stride), tuple(dilation), tuple(out_spatial), tuple(padding),
                     tuple(in_spatial))
    return out_channels * planes.M * (in_channels // groups) * int(np.prod(kernel))


# Non-finite operands: exact IEEE results, as for the other kernels (see fastconv.cpu.nonfinite). The planes read
# padding as stored zeros and the gradients hold the extra columns at zero, so a finite result is exact and a
# non-finite product always reaches a kept output; those zeros times weights are the only pairs torch does not form,
# so a finite weight proves the forward and the input gradient exact too (finite_b_suffices).
from . import nonfinite as _nonfinite  # noqa: E402

forward = _nonfinite.exact(forward, bias=True, finite_b_suffices=True)
grad_input = _nonfinite.exact(grad_input, finite_b_suffices=True)
grad_weight = _nonfinite.exact(grad_weight)
