"""im2col + GEMM on channels-last operands: the three passes read and write (N, D, H, W, C) memory.

A channels_last model hands the convolutions tensors whose channels are the innermost dimension. The
NCDHW kernels of :mod:`.conv` would copy such an input to NCDHW first and the op layer would copy the
result back (two passes over each activation per layer). Here the layout is used as it is:

* a column row is one output pixel ``p = (n, od, oh, ow)``; its ``Cg * KD * KH * KW`` entries are the
  input pixels under the window, each a contiguous run of ``Cg`` channels (a plain copy);
* the forward GEMM ``y[p, k] = col[p, :] @ w[k, :]`` writes the result straight into channels-last memory
  (``(N*OD*OH*OW, K)`` row-major); a 1x1, stride-1, unpadded conv needs no columns at all: the input *is*
  the ``(N*D*H*W, C)`` matrix;
* the input gradient is the GEMM to columns ``gcol = go @ w`` followed by a gather per input pixel (each
  input pixel sums the column entries that read it, so the pixels can be filled in parallel without
  write conflicts);
* the weight gradient is ``go^T @ col``, accumulated over chunks.

The order of a column's entries follows the weight's memory: channel-major ``(c, kd, kh, kw)`` for an
NCDHW-contiguous weight (the common case: torchvision keeps 4-D weights contiguous unless the model was
converted with ``.to(memory_format=torch.channels_last)``), tap-major ``(kd, kh, kw, c)`` for a channels-last
weight, so the weight is never copied. Columns are made ``COL_BUFFER_BYTES`` at a time.

Arguments and results follow :mod:`.conv`: 5-D ``(N, C, D, H, W)`` arrays of any strides (a channels-last
one is read without a copy), 3-tuples of stride / padding-before / dilation and the result's spatial size.
Results are ``(N, K, OD, OH, OW)`` views of channels-last buffers.
"""
from __future__ import annotations

import functools
import math

import numba
import numpy as np
from numba import prange

from fastconv import config

from . import blas, memory, micro_gemm, parallel, task_queue
from .arguments import int_tuple
from .conv import COL_BUFFER_BYTES

__all__ = ["forward", "grad_input", "grad_weight", "is_channels_last"]

_JIT = dict(cache=config.CACHE, fastmath=set(config.FASTMATH), nogil=True)


def is_channels_last(a: np.ndarray) -> bool:
    """Whether a 5-D (N, C, D, H, W) array keeps its channels innermost and is not plainly NCDHW-contiguous
    (an array that is both, such as (N, C, 1, 1, 1), counts as NCDHW)."""
    return (a.ndim == 5 and not a.flags.c_contiguous
            and np.transpose(a, (0, 2, 3, 4, 1)).flags.c_contiguous)


def _ndhwc(a: np.ndarray) -> np.ndarray:
    """(N, C, D, H, W) -> its (N, D, H, W, C) view (a copy only when ``a`` is not channels-last)."""
    return np.ascontiguousarray(np.transpose(a, (0, 2, 3, 4, 1)))


def _weight_matrix(w: np.ndarray):
    """The weight as a (K, Cg*KD*KH*KW) matrix without a copy, and whether its columns are tap-major."""
    K = w.shape[0]
    if w.flags.c_contiguous:
        return w.reshape(K, -1), False
    wt = np.transpose(w, (0, 2, 3, 4, 1))
    if wt.flags.c_contiguous:
        return wt.reshape(K, -1), True
    return np.ascontiguousarray(w).reshape(K, -1), False


def _pointwise(ksz, stride, padding, in_sp, out_sp) -> bool:
    return (tuple(ksz) == (1, 1, 1) and tuple(stride) == (1, 1, 1) and tuple(padding) == (0, 0, 0)
            and tuple(in_sp) == tuple(out_sp))


def _row_chunks(P: int, ck: int, itemsize: int):
    """(p0, p1) ranges of output pixels whose columns fit :data:`COL_BUFFER_BYTES`."""
    rows = max(1, COL_BUFFER_BYTES // max(1, ck * itemsize))
    for p0 in range(0, P, rows):
        yield p0, min(P, p0 + rows)


@parallel.kernel(**_JIT)
def _gather_columns(x, p0, p1, osz, ksz, stride, padding, dilation, c0, Cg, tap_major, col):
    """``col[p - p0]`` = the window of output pixel ``p`` over channels ``c0 .. c0+Cg`` (zeros off the image).

    ``x``: (N, D, H, W, C); ``col``: (p1 - p0, Cg*KD*KH*KW), entries ``(c, kd, kh, kw)`` or, when
    ``tap_major``, ``(kd, kh, kw, c)``.
    """
    OD, OH, OW = osz
    KD, KH, KW = ksz
    D, H, W = x.shape[1], x.shape[2], x.shape[3]
    T = KD * KH * KW
    for r in prange(p1 - p0):
        p = p0 + r
        ow = p % OW
        t = p // OW
        oh = t % OH
        t = t // OH
        od = t % OD
        n = t // OD
        crow = col[r]
        tap = 0
        for kd in range(KD):
            id_ = od * stride[0] - padding[0] + kd * dilation[0]
            for kh in range(KH):
                ih = oh * stride[1] - padding[1] + kh * dilation[1]
                for kw in range(KW):
                    iw = ow * stride[2] - padding[2] + kw * dilation[2]
                    inside = 0 <= id_ < D and 0 <= ih < H and 0 <= iw < W
                    if tap_major:
                        dst = crow[tap * Cg:(tap + 1) * Cg]
                        if inside:
                            src = x[n, id_, ih, iw, c0:c0 + Cg]
                            for c in range(Cg):
                                dst[c] = src[c]
                        else:
                            for c in range(Cg):
                                dst[c] = 0
                    else:
                        if inside:
                            src = x[n, id_, ih, iw, c0:c0 + Cg]
                            for c in range(Cg):
                                crow[c * T + tap] = src[c]
                        else:
                            for c in range(Cg):
                                crow[c * T + tap] = 0
                    tap += 1


@parallel.kernel(work_arg=0, **_JIT)
def _scatter_columns(gcol, p0, p1, osz, ksz, stride, padding, dilation, c0, Cg, tap_major, gx):
    """``gx[n, d, h, w, c0:c0+Cg] +=`` every entry of ``gcol`` (output pixels ``p0 .. p1``) that reads it.

    Parallel over input rows ``(n, d, h)``: each input pixel gathers the column entries of the output
    pixels whose window covers it (no two tasks write the same pixel). ``gx``: (N, D, H, W, C).
    """
    OD, OH, OW = osz
    KD, KH, KW = ksz
    N, D, H, W = gx.shape[0], gx.shape[1], gx.shape[2], gx.shape[3]
    T = KD * KH * KW
    for row in prange(N * D * H):
        h = row % H
        t = row // H
        d = t % D
        n = t // D
        for w in range(W):
            dst = gx[n, d, h, w, c0:c0 + Cg]
            for kd in range(KD):
                a = d + padding[0] - kd * dilation[0]
                if a < 0 or a % stride[0] != 0 or a // stride[0] >= OD:
                    continue
                od = a // stride[0]
                for kh in range(KH):
                    b = h + padding[1] - kh * dilation[1]
                    if b < 0 or b % stride[1] != 0 or b // stride[1] >= OH:
                        continue
                    oh = b // stride[1]
                    for kw in range(KW):
                        e = w + padding[2] - kw * dilation[2]
                        if e < 0 or e % stride[2] != 0 or e // stride[2] >= OW:
                            continue
                        ow = e // stride[2]
                        p = ((n * OD + od) * OH + oh) * OW + ow
                        if p < p0 or p >= p1:
                            continue
                        src = gcol[p - p0]
                        tap = (kd * KH + kh) * KW + kw
                        if tap_major:
                            seg = src[tap * Cg:(tap + 1) * Cg]
                            for c in range(Cg):
                                dst[c] += seg[c]
                        else:
                            for c in range(Cg):
                                dst[c] += src[c * T + tap]


_tup = int_tuple  # geometry arguments as int tuples, memoised

#: Whether unpadded convs whose windows do not overlap (a patchify stem, ConvNeXt's 2x2 downsamples) run their
#: forward on :func:`.micro_gemm.gemm_gather`, reading each window where it lies in the channels-last input and
#: writing the channels-last result in place, instead of copying every window into columns first (tests and A/B
#: measurements switch it).
PATCHES_IN_PLACE = True
#: Weight bytes up to which they do (the weights are packed on every call, and every task's rows read all of
#: them). Forward ms, batch 8, channels-last, 2 threads, in place / columns + MKL (torch): ConvNeXt's 96 -> 192
#: 2x2 downsample at 32x32 (288 KB of weights) 1.20 / 1.70 (0.93), at batch 1 0.26 / 0.31 (0.18); its 192 -> 384
#: (1.1 MB) 1.49 / 1.37 (1.08) and 384 -> 768 (4.5 MB) 2.24 / 1.32 (2.96) lost.
PATCH_MAX_WEIGHT_BYTES = 512 << 10
#: Output rows per job of :func:`_forward_patches` at most (a multiple of every tile height).
PATCH_JOB_ROWS = 16 * micro_gemm.ROW_GRAIN


def _patches_apply(G, ksz, stride, padding, dilation, weight_bytes) -> bool:
    """Whether :func:`_forward_patches` runs a forward: one group, no padding, no dilation, strides at least the
    kernel in every dim (each input pixel under one window at most: nothing to gain from columns) and at most
    :data:`PATCH_MAX_WEIGHT_BYTES` of weights."""
    return (PATCHES_IN_PLACE and G == 1 and tuple(padding) == (0, 0, 0) and tuple(dilation) == (1, 1, 1)
            and all(s >= k for s, k in zip(stride, ksz)) and weight_bytes <= PATCH_MAX_WEIGHT_BYTES)


@parallel.kernel(always=True, **_JIT)
def _forward_patches(xf, corners, taps, bp, bias, has_bias, jobs, workers, y2, claimed):
    """``y2 = A @ B (+ bias)`` with ``A[p, t] = xf[corners[p] + taps[t]]`` (each output pixel's window read where
    it lies in the flat channels-last input) and ``bp`` the packed weights (taps x K); ``y2`` (P, K) the
    channels-last result, written in place. ``workers`` threads claim ``jobs`` equal row ranges
    (:mod:`.task_queue`)."""
    P, K = y2.shape
    for _ in prange(workers):
        while True:
            job = task_queue.claim(claimed)
            if job >= jobs:
                break
            r0 = job * P // jobs // micro_gemm.ROW_GRAIN * micro_gemm.ROW_GRAIN
            r1 = P if job == jobs - 1 else (job + 1) * P // jobs // micro_gemm.ROW_GRAIN * micro_gemm.ROW_GRAIN
            if r0 >= r1:
                continue
            micro_gemm.gemm_gather(xf, 0, corners[r0:r1], taps, bp, y2[r0:r1], 0.0)
            if has_bias:
                for r in range(r0, r1):
                    for k in range(K):
                        y2[r, k] += bias[k]


@functools.lru_cache(maxsize=64)
def _patch_tables(xl_shape, out_spatial, ksz, stride, Cg, tap_major):
    """(corners, taps) of :func:`_forward_patches`: each output pixel's window corner in the flat (N, D, H, W, C)
    input, and each weight column's offset from it (tap-major ``(kd, kh, kw, c)`` or channel-major ``(c, kd, kh,
    kw)``, the weight's own order); built once per geometry (read-only)."""
    N, D, H, W, C = xl_shape
    OD, OH, OW = out_spatial
    KD, KH, KW = ksz
    n, od, oh, ow = np.meshgrid(np.arange(N), np.arange(OD), np.arange(OH), np.arange(OW), indexing="ij")
    corners = ((((n * D + od * stride[0]) * H + oh * stride[1]) * W + ow * stride[2]) * C).reshape(-1)
    kd, kh, kw, c = np.meshgrid(np.arange(KD), np.arange(KH), np.arange(KW), np.arange(Cg), indexing="ij")
    taps = ((kd * H + kh) * W + kw) * C + c
    if not tap_major:
        taps = np.transpose(taps, (3, 0, 1, 2))
    corners = np.ascontiguousarray(corners, np.int64)
    taps = np.ascontiguousarray(taps.reshape(-1), np.int64)
    corners.setflags(write=False)
    taps.setflags(write=False)
    return corners, taps


@config.parallel_entry
def forward(x, w, bias, stride, padding, dilation, groups, out_spatial):
    """Forward. x: (N, C, D, H, W), w: (K, C/groups, KD, KH, KW), bias: (K,) or None -> (N, K, OD, OH, OW)
    viewing channels-last memory."""
    config.sync_threads()
    stride, padding, dilation, out_spatial = map(_tup, (stride, padding, dilation, out_spatial))
    N, C, D, H, W = x.shape
    K, Cg, KD, KH, KW = w.shape
    G = int(groups)
    Kg = K // G
    OD, OH, OW = out_spatial
    y = memory.empty_aligned((N, OD, OH, OW, K), x.dtype)
    if y.size == 0:
        return y.transpose(0, 4, 1, 2, 3)
    P = N * OD * OH * OW
    y2 = y.reshape(P, K)
    xl = _ndhwc(x)
    w2, tap_major = _weight_matrix(w)
    ck = w2.shape[1]
    if G == 1 and _pointwise((KD, KH, KW), stride, padding, (D, H, W), out_spatial):
        blas.matmul(xl.reshape(P, C), w2.T, out=y2)
    elif _patches_apply(G, (KD, KH, KW), stride, padding, dilation, w2.size * w2.itemsize):
        corners, taps = _patch_tables(xl.shape, out_spatial, (KD, KH, KW), stride, Cg, tap_major)
        bp = memory.empty_aligned(micro_gemm.packed_size(ck, K, x.itemsize), x.dtype)
        micro_gemm.pack_b(w2.T, bp)
        threads = numba.get_num_threads() if not parallel.SERIAL_ONLY else 1
        jobs = max(1, min(-(-P // micro_gemm.ROW_GRAIN), max(4 * threads, -(-P // PATCH_JOB_ROWS))))
        b = np.zeros(K, x.dtype) if bias is None else np.ascontiguousarray(bias, x.dtype)
        _forward_patches(xl.reshape(-1), corners, taps, bp, b, bias is not None, jobs, min(jobs, threads), y2,
                         task_queue.counter())
        return y.transpose(0, 4, 1, 2, 3)
    else:
        colbuf = memory.empty_aligned(min(P, max(1, COL_BUFFER_BYTES // (ck * x.itemsize))) * ck, x.dtype)
        for g in range(G):
            wg = w2[g * Kg:(g + 1) * Kg]
            for p0, p1 in _row_chunks(P, ck, x.itemsize):
                col = colbuf[:(p1 - p0) * ck].reshape(p1 - p0, ck)
                _gather_columns(xl, p0, p1, out_spatial, (KD, KH, KW), stride, padding, dilation, g * Cg, Cg,
                                tap_major, col)
                if G == 1:
                    blas.matmul(col, wg.T, out=y2[p0:p1])
                else:
                    y2[p0:p1, g * Kg:(g + 1) * Kg] = blas.matmul(col, wg.T)
    if bias is not None:
        y2 += np.asarray(bias, x.dtype)
    return y.transpose(0, 4, 1, 2, 3)


@config.parallel_entry
def grad_input(grad_out, w, stride, padding, dilation, groups, in_spatial):
    """Input gradient. grad_out: (N, K, OD, OH, OW), w: (K, C/groups, KD, KH, KW) -> (N, C, D, H, W) viewing
    channels-last memory."""
    config.sync_threads()
    stride, padding, dilation, in_spatial = map(_tup, (stride, padding, dilation, in_spatial))
    N, K, OD, OH, OW = grad_out.shape
    _, Cg, KD, KH, KW = w.shape
    G = int(groups)
    Kg = K // G
    C = Cg * G
    D, H, W = in_spatial
    P = N * OD * OH * OW
    if P == 0 or N * C * D * H * W == 0 or K == 0:
        return np.zeros((N, D, H, W, C), grad_out.dtype).transpose(0, 4, 1, 2, 3)
    go2 = _ndhwc(grad_out).reshape(P, K)
    w2, tap_major = _weight_matrix(w)
    ck = w2.shape[1]
    if G == 1 and _pointwise((KD, KH, KW), stride, padding, (D, H, W), (OD, OH, OW)):
        gx = memory.empty_aligned((N, D, H, W, C), grad_out.dtype)
        blas.matmul(go2, w2, out=gx.reshape(P, C))
        return gx.transpose(0, 4, 1, 2, 3)
    gx = memory.zeros((N, D, H, W, C), grad_out.dtype)
    gcolbuf = np.empty(min(P, max(1, COL_BUFFER_BYTES // (ck * grad_out.itemsize))) * ck, grad_out.dtype)
    for g in range(G):
        wg = w2[g * Kg:(g + 1) * Kg]
        for p0, p1 in _row_chunks(P, ck, grad_out.itemsize):
            gcol = gcolbuf[:(p1 - p0) * ck].reshape(p1 - p0, ck)
            blas.matmul(go2[p0:p1, g * Kg:(g + 1) * Kg], wg, out=gcol)
            _scatter_columns(gcol, p0, p1, (OD, OH, OW), (KD, KH, KW), stride, padding, dilation, g * Cg, Cg,
                             tap_major, gx)
    return gx.transpose(0, 4, 1, 2, 3)


@config.parallel_entry
def grad_weight(grad_out, x, stride, padding, dilation, groups, kernel_spatial):
    """Weight gradient. grad_out: (N, K, OD, OH, OW), x: (N, C, D, H, W) -> (K, C/groups, KD, KH, KW),
    NCDHW-contiguous."""
    config.sync_threads()
    stride, padding, dilation, kernel_spatial = map(_tup, (stride, padding, dilation, kernel_spatial))
    N, K, OD, OH, OW = grad_out.shape
    _, C, D, H, W = x.shape
    G = int(groups)
    Kg = K // G
    Cg = C // G
    KD, KH, KW = kernel_spatial
    T = KD * KH * KW
    ck = Cg * T
    P = N * OD * OH * OW
    gw = memory.zeros((K, ck), x.dtype)
    if P == 0 or gw.size == 0:
        return gw.reshape(K, Cg, KD, KH, KW)
    go2 = _ndhwc(grad_out).reshape(P, K)
    xl = _ndhwc(x)
    if G == 1 and _pointwise((KD, KH, KW), stride, padding, (D, H, W), (OD, OH, OW)):
        blas.matmul(go2.T, xl.reshape(P, C), out=gw)
        return gw.reshape(K, Cg, KD, KH, KW)
    colbuf = np.empty(min(P, max(1, COL_BUFFER_BYTES // (ck * x.itemsize))) * ck, x.dtype)
    for g in range(G):
        for p0, p1 in _row_chunks(P, ck, x.itemsize):
            col = colbuf[:(p1 - p0) * ck].reshape(p1 - p0, ck)
            _gather_columns(xl, p0, p1, (OD, OH, OW), (KD, KH, KW), stride, padding, dilation, g * Cg, Cg,
                            False, col)
            gw[g * Kg:(g + 1) * Kg] += blas.matmul(go2[p0:p1, g * Kg:(g + 1) * Kg].T, col)
    return gw.reshape(K, Cg, KD, KH, KW)


def workspace_bytes(batch: int, in_channels: int, out_channels: int, groups: int, kernel, out_spatial,
                    itemsize: int) -> int:
    """The column buffer one call allocates (0 for a 1x1, stride-1, unpadded conv without groups)."""
    ck = in_channels // groups * math.prod(kernel)
    P = batch * math.prod(out_spatial)
    return min(P, max(1, COL_BUFFER_BYTES // (ck * itemsize))) * ck * itemsize


# Non-finite operands: exact IEEE results, as for the NCDHW kernels (see fastconv.cpu.nonfinite): the columns read
# padding as stored zeros, the only pairs torch does not form, so a finite weight proves the forward and the input
# gradient exact (finite_b_suffices).
from . import nonfinite as _nonfinite  # noqa: E402

forward = _nonfinite.exact(forward, bias=True, finite_b_suffices=True)
grad_input = _nonfinite.exact(grad_input, finite_b_suffices=True)
grad_weight = _nonfinite.exact(grad_weight)
