"""im2col + GEMM with the columns made and used in cache: one parallel region, a column chunk per task.

Why: the plain im2col path writes the whole column matrix (``C*KH*KW`` rows, 9x the input for 3x3) to memory in
one pass and reads it back in one multi-threaded GEMM. On the 2-core machine the fill alone cost about half the
GEMM (ResNet-18's 64 -> 128 stride-2 layer at batch 8: 0.35 ms phase split + 0.49 fill + 0.97 GEMM, against
torch's 0.85 for the whole conv). Here each task of one parallel region takes a chunk of output rows, fills
that chunk's columns into its own buffer of about :data:`CHUNK_BYTES` (it stays in the core's 2 MB L2) straight
from the unpadded input, multiplies it with a single-threaded BLAS GEMM called from inside the region
(:func:`.jit_gemm.gemm`, torch's MKL) and adds the bias as it copies the result into the output. No padded copy,
no column matrix in memory, no phase split. Measured against the plain path, 2 threads, float32 3x3
(a prototype of this kernel, medians in µs): DenseNet's 128 -> 32 at 16x16 batch 1 157-236 against 305 (torch
185); ResNet's 64 -> 64 at 32x32 batch 8 2728 against 4733 (torch 2157); 64 -> 128 stride 2 at batch 8 1693
against 3248 (torch 1306); 256 -> 256 at 8x8 batch 8 2394 against 3614 (torch 1997).

Without columns at all, on fastconv's own GEMM (:mod:`.micro_gemm`): the "gather" kernels multiply the im2col
matrix read in place from the zero-padded input through offset tables (each output position's window corner,
each tap's offset from it: :func:`forward_gather`, with positions as the GEMM's rows, and :func:`grad_weight_gather`,
with taps as rows), so any stride and dilation runs with nothing copied but the padded input; they take most
forwards with small weights (:data:`GATHER_MAX_WEIGHT_BYTES`), stride-1 input gradients and weight gradients. The
"taps" kernel reads the GEMM's panels straight from the zero-padded input at each tap's offset
(:func:`_forward_taps_region`; a strided conv through its phases, :func:`_phase_box`, for thin inputs:
:data:`TAPS_STRIDED_MAX_IN_CHANNELS`) and keeps the stride-1 forwards whose weights are too large for the gather
kernel (on AVX2 hosts also those of 64 and more output channels on wide rows).
(A weight gradient on the taps kernel, packing its transposed panels by register transposes, ran 1.1-1.9x the
gather kernel's time on every layer measured and was removed.)

Scope: dense (``groups == 1``) 1-D and 2-D convs with any stride, padding (negative: cropping) and dilation, and
more than one tap; the caller (:func:`fastconv.cpu.conv.im2col_forward`, and its stride-1 input gradient as
the flipped conv) keeps the other cases. Arrays are 4-D here, ``x`` (N, C, H, W) and ``y`` (N, K, OH*OW).
"""
from __future__ import annotations

import functools

import numba
import numpy as np
from numba import njit, prange

from fastconv import config

from . import jit_gemm, memory, micro_gemm, parallel, task_queue

__all__ = ["applies", "forward", "grad_weight", "workspace_bytes", "gather_applies", "takes_gather_forward",
           "takes_gather_grad_weight", "takes_narrow_taps", "forward_gather", "grad_input_gather", "grad_weight_gather",
           "gather_workspace_bytes", "CHUNK_BYTES", "ENABLED",
           "MIN_CHUNK_COLUMNS", "MIN_GRAD_WEIGHT_CHUNK_COLUMNS"]

_JIT = dict(cache=config.CACHE, fastmath=set(config.FASTMATH), nogil=True)

#: Bytes of columns one task builds and multiplies at a time: a chunk of whole output rows (at least one) that
#: stays in the core's L2 (2 MB here) with the GEMM's panels beside it. Prototype medians for 512 KB / 1 MB / 2 MB:
#: DenseNet 128 -> 32 16x16 batch 1 157 / 236 / 275 µs (the 1 MB and 2 MB chunks left one of two tasks idle,
#: which :func:`_plan` now avoids), ResNet 64 -> 64 32x32 batch 8 2982 / 2728 / 4477, 256 -> 256 8x8 batch 8
#: 4967 / 2394 / 2429.
CHUNK_BYTES = 1 << 20

#: Whether :func:`applies` says yes at all (tests switch it off to reach the plain paths; A/B measurements too).
ENABLED = True

#: Whether im2col's weight gradient takes :func:`grad_weight` where :func:`applies` says yes.
GRAD_WEIGHT = True

#: On hosts whose kernels' GEMMs run on torch's MKL by default (Intel CPUs with AVX-512, see
#: :func:`.jit_gemm.mkl_by_default`), small convs still take the own kernels that read the input in place (the gather
#: and taps kernels, :mod:`.micro_gemm`) as they do on the own route (:func:`small_for_own` says which): MKL wins the
#: big products, but small convs pay more for their columns than its faster GEMM saves. Measured on a 2-core Xeon
#: (AVX-512), converted torchvision models, training step at batch 8, one process alternating with and without, median
#: time with / without (tuned choices kept), at a 2 MB weight limit and before the reduction and window rules: AlexNet
#: 0.954, ResNet-18 0.963, GoogLeNet 0.976, EfficientNet-B0 0.992, MobileNet-v3 0.987, RegNet 0.994, SqueezeNet 0.993,
#: MobileNet-v2 1.001, ResNet-50 1.008, ConvNeXt 1.011, VGG-11 1.023, ShuffleNet 1.025 (the last three on their stems
#: and patchify convs, now left to MKL); with 1 MB DenseNet-121 0.957; with 4 MB AlexNet 0.985, ResNet-18 0.966. With
#: the rules as they are: AlexNet 0.970, DenseNet-121 0.965, ResNet-18 0.987, ShuffleNet 1.005, ConvNeXt 1.012,
#: SqueezeNet 1.013, VGG-11 1.074 (pairs 1.00-1.35; its tuned convs all run Winograd, which this rule does not touch:
#: per layer level). Per layer, batch 8, forward / input gradient / weight gradient ms, own kernels against MKL:
#: AlexNet's 64 -> 192 5x5 at 15x15 4.2-4.4 / 4.2 / 4.0-4.3 against 5.2-5.3 / 5.3-5.6 / 4.3-4.5, DenseNet's 128 -> 32
#: 3x3 at 16x16 0.86 / 0.80 / 0.72 against 1.05 / 0.80 / 1.21, the 3 -> 64 7x7 stride-2 stem 3.0 / - / 3.4 against 4.1 /
#: - / 4.5, AlexNet's 11x11 stride-4 stem 1.9 / - / 1.6 against 2.2 / - / 2.3; ResNet's 512 -> 512 at 4x4 (9.4 MB) 3.4 /
#: 3.4 / 3.1 against 2.6 / 2.9 / 2.3.
SMALL_ON_OWN_MAX_WEIGHT_BYTES = 2 << 20
#: The same limit for weight gradients, which the gather kernel takes up to :data:`GATHER_GRAD_MAX_WEIGHT_BYTES`.
#: Measured after the kernels' buffers were aligned to cache lines, 2 threads, batch 8, each call after a torch ReLU,
#: same process alternating, gather / MKL's columns ms: AlexNet's 384 -> 256 3x3 at 7x7 (3.5 MB) 2.26-2.52 /
#: 2.83-3.10, 256 -> 256 at 7x7 (2.4 MB) 1.68-1.73 / 2.07-2.15, at 8x8 2.10-2.14 / 2.72-2.73, at 16x16 6.6-7.5 /
#: 8.1-8.5, 192 -> 384 at 7x7 (2.6 MB) 1.90-1.94 / 2.08-2.17. Forwards of those layers measured level or slower on
#: the own kernels and keep the 2 MB limit (input gradients: the next limit).
SMALL_ON_OWN_GRAD_WEIGHT_MAX_BYTES = 4 << 20
#: The same limit for input gradients (the flipped conv's weights): the gather kernel's own stride-1 limit. Measured
#: after the gather kernel's input gradient packed the flipped weights directly (the 2 MB limit above predates it), 2
#: threads, batch 8, same process alternating, input gradient ms, gather / MKL's columns (torch): ResNet's 256 -> 256
#: 3x3 at 8x8 (2.4 MB) 3.12 / 4.11 (2.39), at 16x16 10.1 / 11.5 (8.5), AlexNet's 384 -> 256 at 7x7 (3.5 MB) 3.67 /
#: 4.52 (2.74), 256 -> 256 at 7x7 2.70 / 3.41 (1.99), 192 -> 384 at 7x7 3.45 / 3.77 (2.87); level at batch 1 (256 ->
#: 256 at 8x8 1.16 / 1.14) and for 512 -> 512 at 4x4 (9.4 MB, 3.38 / 3.49).
SMALL_ON_OWN_GRAD_INPUT_MAX_BYTES = 16 << 20
#: ... with reductions (``C*KH*KW``) at least this long: VGG's 3 -> 64 3x3 stem at 128x128 (27) ran 11.2 / 5.4 ms
#: (forward / weight gradient) on the own kernels against 8.5 / 4.5, ShuffleNet's 3 -> 24 3x3 stride 2 1.04 / 1.42
#: against 0.84 / 0.94 ...
SMALL_ON_OWN_MIN_REDUCTION = 128
#: ... and only where windows overlap (a kernel larger than its stride): a patchify conv's columns are a plain
#: reshuffle (ConvNeXt's 3 -> 96 4x4 stride 4 forward 0.96 against 0.82, 96 -> 192 2x2 stride 2 1.99 against 1.51).
#: A forward takes the own kernels this way only with at least this many output positions in the batch
#: (``N*OH*OW``), or with at most :data:`SMALL_ON_OWN_FORWARD_NARROW_CHANNELS` output channels: with few positions each
#: task rereads all the packed weights for a short run of them. Forward ms, own / MKL: batch 1, ResNet's 128 -> 128
#: 3x3 at 16x16 (256 positions) 0.46 / 0.41, 64 -> 128 stride 2 0.31 / 0.25, GoogLeNet's 96 -> 128 at 16x16 0.35 /
#: 0.31; batch 8, its 96 -> 208 at 8x8 (512) 0.88 / 0.78; with more positions the own kernels were level or faster
#: (batch 1, 64 -> 64 at 32x32 0.40 / 0.42; batch 8, 128 -> 128 at 16x16 2.48 / 2.56), and so with few output
#: channels (DenseNet's 128 -> 32 at 16x16, batch 1, 0.16 / 0.20). The input gradients of those layers ran faster on
#: the own kernels at any size (batch 1: 128 -> 128 at 16x16 0.45 / 0.50; batch 8: 96 -> 208 at 8x8 0.84 / 1.06).
#: Converted models, one process alternating with and without this rule, inference time with / without: batch 1
#: GoogLeNet 0.961, ResNet-18 0.991, ResNet-50 0.995, DenseNet-121 0.990; batch 8 GoogLeNet 0.989, ResNet-18 1.004.
SMALL_ON_OWN_FORWARD_MIN_POSITIONS = 1024
SMALL_ON_OWN_FORWARD_NARROW_CHANNELS = 64
#: Whether the rule is in force: set at import where it applies (tests and A/B measurements switch it).
SMALL_ON_OWN = jit_gemm.mkl_by_default() and micro_gemm.HOST_HAS_AVX512
#: Whether strided convs that the taps kernel takes (RGB stems: :data:`TAPS_STRIDED_MAX_IN_CHANNELS`) run there rather
#: than on the gather kernel. Measured where :data:`SMALL_ON_OWN` is in force (on by default there), 2 threads,
#: batch 8, forward ms, gather / taps / MKL's columns: SqueezeNet's 3 -> 96 7x7 stride 2 unpadded at 128x128 (61x61
#: out) 4.9-5.5 / 3.6-3.8 / 4.3-4.5, 3 -> 64 the same way 3.31 / 2.38 / 3.14; level where the output rows are a
#: whole number of vectors: 3 -> 64 7x7 padded 3 at 128x128 2.87 / 2.90 / 3.87, at 224x224 8.73 / 9.01 / 12.05,
#: AlexNet's 11x11 stride 4 1.91 / 1.92 / 2.26. Converted models, one process alternating with and without, median
#: step time with / without: SqueezeNet training at batch 8 0.925, inference 0.858; AlexNet, ResNet-18, GoogLeNet
#: 0.98-1.02 (their stems' rows are whole vectors).
STRIDED_TAPS_BEFORE_GATHER = SMALL_ON_OWN


def small_for_own(out_channels: int, reduction: int, kernel_hw, stride_hw, itemsize: int,
                  positions: int | None = None, weight_gradient: bool = False, grad_input: bool = False) -> bool:
    """Whether a dense conv (``out_channels``, ``reduction = C*KH*KW``) is one that :data:`SMALL_ON_OWN` sends to the
    own kernels: at most :data:`SMALL_ON_OWN_MAX_WEIGHT_BYTES` of weights (a weight gradient, ``weight_gradient``:
    :data:`SMALL_ON_OWN_GRAD_WEIGHT_MAX_BYTES`; an input gradient's flipped conv, ``grad_input``:
    :data:`SMALL_ON_OWN_GRAD_INPUT_MAX_BYTES`), a reduction of at least :data:`SMALL_ON_OWN_MIN_REDUCTION`,
    overlapping windows; for a forward (``positions``: the batch's output positions; None for the gradients) also
    :data:`SMALL_ON_OWN_FORWARD_MIN_POSITIONS` or few output channels."""
    (KH, KW), (sh, sw) = kernel_hw, stride_hw
    if positions is not None and not (positions >= SMALL_ON_OWN_FORWARD_MIN_POSITIONS
                                      or out_channels <= SMALL_ON_OWN_FORWARD_NARROW_CHANNELS):
        return False
    limit = (SMALL_ON_OWN_GRAD_WEIGHT_MAX_BYTES if weight_gradient else
             SMALL_ON_OWN_GRAD_INPUT_MAX_BYTES if grad_input else SMALL_ON_OWN_MAX_WEIGHT_BYTES)
    return (out_channels * reduction * itemsize <= limit
            and reduction >= SMALL_ON_OWN_MIN_REDUCTION and (KH > sh or KW > sw))


def own_kernels_take(small: bool = False) -> bool:
    """Whether the kernels built on the own GEMM (gather, taps) may run a conv: wherever the kernels' GEMMs run on
    the own kernels; on a host where they run on MKL by default, a conv that :func:`small_for_own` (``small``)."""
    return jit_gemm.own_gemm_in_use() or (SMALL_ON_OWN and small)


#: Fewest multiply-adds for which the region runs on every thread (below, on the calling thread alone: waking
#: the workers costs more than a tiny conv, see :mod:`.parallel`).
PARALLEL_MIN_MACS = 2_000_000


@njit(inline="always", **_JIT)
def _fill(x, g0, g1, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW, col):
    """The columns of the batch's output rows ``g0 <= g < g1`` (``g = n*OH + r``): ``col[(c*KH + kh)*KW + kw,
    (g - g0)*OW + ow] = x[n, c, r*sh - ph + kh*dh, ow*sw - pw + kw*dw]``, 0 in the padding. Inlined into the
    regions, with a test per element: a fill that computed each tap's valid column range and copied between
    ran 1.5-2.8x slower as a called function. Flat indices into C-contiguous ``x`` and ``col`` and ``(n, r)``
    stepped, not divided: two array views and a signed division per output row cost as much as copying its 7
    to 56 values (the segment fill of :func:`fastconv.cpu.conv._im2col` ran 0.64-0.73x the time without them)."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    ncol = col.shape[1]
    xf = x.reshape(x.size)
    cf = col.reshape(col.size)
    n_first = g0 // OH
    r_first = g0 - n_first * OH
    for c in range(C):
        for kh in range(KH):
            for kw in range(KW):
                d = ((c * KH + kh) * KW + kw) * ncol
                n = n_first
                r = r_first
                for g in range(g0, g1):
                    ih = r * sh - ph + kh * dh
                    if ih < 0 or ih >= H:
                        for ow in range(OW):
                            cf[np.uint64(d + ow)] = 0
                    else:
                        base = ((n * C + c) * H + ih) * W
                        for ow in range(OW):
                            iw = ow * sw - pw + kw * dw
                            cf[np.uint64(d + ow)] = xf[np.uint64(base + iw)] if 0 <= iw < W else 0
                    d += OW
                    r += 1
                    if r == OH:
                        r = 0
                        n += 1


#: Output rows at most this wide fill their columns by :func:`_fill_gather` from a zero-padded copy of the input
#: instead of :func:`_fill`'s row segments: a segment of 4 or 8 values costs its loop set-up and a bounds test
#: per value. Measured per chunk of 112-224 columns, one thread, batch 8, gather / segments: DenseNet's 128 -> 32
#: 3x3 at 4x4 56 / 379 µs (the chunk's GEMM takes 58) and at 8x8 59 / 139, ResNet's 256 -> 256 at 8x8 107 / 260,
#: AlexNet's 384 -> 256 at 7x7 164 / 856, a 64-channel stride-2 16x16 -> 8x8 56 / 259. Whole calls through
#: ``fastconv.functional`` (padded copy included), same process alternating, forward / forward + backward: 128 -> 32
#: at 4x4 batch 8 0.75 / 0.80, 192 -> 192 at 7x7 0.84 / 0.96; at 8x8 level (0.98-1.08 / 0.92-1.04). The plain
#: path draws the same line (:data:`fastconv.cpu.conv.GATHER_MAX_OW`).
GATHER_MAX_OW = 8


@njit(inline="always", **_JIT)
def _fill_gather(box, g0, g1, tap_off, pos, OH, OW, col, corner):
    """:func:`_fill`'s columns gathered from ``box``, the input zero-padded to the windows' extent
    (:func:`_pad_box`): ``col[c*T + t, (g - g0)*OW + ow] = box[n, c].flat[tap_off[t] + pos[r*OW + ow]]`` for
    ``g = n*OH + r``. One branch-free loop over the chunk's columns per (channel, tap), through the columns'
    window corners computed once per chunk into ``corner`` (at least ``(g1 - g0) * OW`` long)."""
    C = box.shape[1]
    plane = box.shape[2] * box.shape[3]
    T = tap_off.shape[0]
    Q = (g1 - g0) * OW
    bf = box.reshape(box.size)
    cf = col.reshape(col.size)
    n = g0 // OH
    r = g0 - n * OH
    q = 0
    for g in range(g0, g1):
        image = n * C * plane
        for ow in range(OW):
            corner[q] = image + pos[r * OW + ow]
            q += 1
        r += 1
        if r == OH:
            r = 0
            n += 1
    for c in range(C):
        for t in range(T):
            off = c * plane + tap_off[t]
            d = (c * T + t) * Q
            for i in range(Q):
                cf[np.uint64(d + i)] = bf[np.uint64(off + corner[i])]


@parallel.kernel(**_JIT)
def _pad_box(x, ph, pw, out):
    """``out[n, c, h, w] = x[n, c, h - ph, w - pw]``, 0 outside ``x`` (``out`` may end before ``x`` plus its
    padding: rows and columns no window reaches; a negative padding crops). x and out C-contiguous.

    Each plane zeroed in one loop, then its rows inside ``x`` copied (as :func:`.conv._pad_box`): with the zeros
    decided per row and element, DenseNet's 128 x 8x8 input at batch 8 took 0.08 ms against 0.016 (one thread),
    paid by its forward and its weight gradient in every layer."""
    N, C, H, W = x.shape
    Hb, Wb = out.shape[2], out.shape[3]
    w0 = min(Wb, max(0, pw))  # box columns before the first input column
    n = max(0, min(Wb, W + pw) - w0)  # input columns in a box row
    plane = Hb * Wb
    xf = x.reshape(x.size)
    of = out.reshape(out.size)
    for task in prange(N * C):
        ob = np.uint64(task * plane)
        for m in range(plane):
            of[ob + np.uint64(m)] = 0
        for h in range(min(max(0, ph), Hb), min(Hb, H + ph)):
            o = np.uint64((task * Hb + h) * Wb + w0)
            src = np.uint64((task * H + h - ph) * W + w0 - pw)
            for m in range(n):
                of[o + np.uint64(m)] = xf[src + np.uint64(m)]


def _gather_source(x, kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw):
    """``(box, tap_off, pos)`` for :func:`_fill_gather` where the output rows are narrow
    (``OW <= GATHER_MAX_OW``); otherwise ``(x, empty, empty)``, which the regions ignore. The box, a padded copy
    of the input, is not counted in :func:`workspace_bytes` (as the plain path's padded copies are not)."""
    (KH, KW), (sh, sw), (ph, pw), (dh, dw), (OH, OW) = kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw
    if OW > GATHER_MAX_OW:
        none = np.empty(0, np.int64)
        return x, none, none
    Hb, Wb = (OH - 1) * sh + (KH - 1) * dh + 1, (OW - 1) * sw + (KW - 1) * dw + 1
    box = memory.scratch("im2col.padded_input", (x.shape[0], x.shape[1], Hb, Wb), x.dtype)
    _pad_box(x, ph, pw, box)
    tap_off, pos = _gather_offsets(KH, KW, sh, sw, dh, dw, OH, OW, Wb)
    return box, tap_off, pos


@functools.lru_cache(maxsize=512)
def _gather_offsets(KH, KW, sh, sw, dh, dw, OH, OW, Wb):
    """Each tap's offset from a window's corner and each output position's corner in a box row ``Wb`` wide, built
    once per geometry (the meshgrids cost tens of µs, a good part of a batch-1 call) and shared read-only."""
    kh, kw = np.meshgrid(np.arange(KH), np.arange(KW), indexing="ij")
    tap_off = (kh * dh * Wb + kw * dw).reshape(-1).astype(np.int64)
    r, ow = np.meshgrid(np.arange(OH), np.arange(OW), indexing="ij")
    pos = (r * sh * Wb + ow * sw).reshape(-1).astype(np.int64)
    return tap_off, pos


@parallel.kernel(always=True, **_JIT)
def _forward_region(x, w2, bias, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW, rpc, kparts, colbuf, obuf, y3, box,
                    tap_off, pos, corners, claimed):
    """The whole forward in one parallel region. The batch's output rows ``g = n*OH + r`` are cut into chunks
    of ``rpc`` rows (a chunk may span images); jobs are (chunk, part of the output channels), and each task ``t``
    of ``colbuf.shape[0]`` claims jobs one at a time (:mod:`.task_queue`): it fills the chunk's columns into
    ``colbuf[t]``, runs ``w2[k0:k1] @ col`` on one thread into ``obuf[t]`` and writes that plus the bias into
    ``y3``. With ``kparts > 1`` each part of the channels fills the chunk's columns again (used where the
    weights outweigh the columns: reading them once matters more than filling twice). Narrow output rows (``pos``
    not empty) gather their columns from ``box`` (:func:`_gather_source`), with ``corners[t]`` as the task's
    scratch."""
    N = x.shape[0]
    K, CK = w2.shape
    P = y3.shape[2]
    yf = y3.reshape(y3.size)
    rows = N * OH
    nchunks = -(-rows // rpc)
    jobs = nchunks * kparts
    kstep = -(-K // kparts)
    tasks = colbuf.shape[0]
    for t in prange(tasks):
        while True:
            job = task_queue.claim(claimed)
            if job >= jobs:
                break
            chunk = job // kparts
            kp = job - chunk * kparts
            g0 = chunk * rpc
            g1 = min(rows, g0 + rpc)
            Q = (g1 - g0) * OW
            k0 = kp * kstep
            k1 = min(K, k0 + kstep)
            if k0 >= k1:
                continue
            col = colbuf[t, :CK * Q].reshape((CK, Q))
            if pos.shape[0] > 0:
                _fill_gather(box, g0, g1, tap_off, pos, OH, OW, col, corners[t])
            else:
                _fill(x, g0, g1, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW, col)
            o = obuf[t, :(k1 - k0) * Q].reshape((k1 - k0, Q))
            jit_gemm.gemm(w2[k0:k1], col, o, 0.0, False)
            # the chunk's rows of each image are one contiguous run of y3[n, k] (flat indices, no views: see _fill)
            of = o.reshape(o.size)
            g = g0
            while g < g1:
                n = g // OH
                r = g - n * OH
                L = min(g1 - g, OH - r) * OW
                for k in range(k0, k1):
                    b = bias[k]
                    d = np.uint64((n * K + k) * P + r * OW)
                    src = np.uint64((k - k0) * Q + (g - g0) * OW)
                    for i in range(L):
                        u = np.uint64(i)
                        yf[d + u] = of[src + u] + b
                g += L // OW


#: Largest weight (bytes) taken by :func:`grad_weight`: every chunk's GEMM reads and writes a task's accumulator of
#: the weights' size, and beyond the L2's size that costs more than the column matrix saves (measured against the
#: plain path, 2 threads: ResNet-18's 512 -> 512 3x3 at 4x4, 9.4 MB, 1.02x the time at batch 1 and 1.14x at batch 8,
#: 256 -> 512 stride 2, 4.7 MB, 0.99x and 1.24x; 256 -> 256 at 8x8, 2.4 MB, 0.72x and 0.81x). (Forwards: see
#: :data:`LARGE_WEIGHT_BYTES`.)
MAX_WEIGHT_BYTES = 4 << 20
#: Forwards (and stride-1 input gradients, forwards of the flipped conv) whose weights are larger than this (the
#: core's L2) take chunks of :data:`LARGE_WEIGHT_CHUNK_BYTES`: each chunk's GEMM streams all the weights from
#: memory, so fewer, longer chunks read them fewer times, which outweighs the columns' leaving L2; forwards take
#: weights of any size this way (up to :data:`MAX_FORWARD_WEIGHT_BYTES`; before, those beyond 4 MB, or whose 1 MB
#: chunks held too few columns, made the whole column matrix and ran one 2-thread MKL GEMM). Measured, 2 threads,
#: same process alternating, forward ms before / after, batch 8: ResNet's 512 -> 512 3x3 at 4x4 (9.4 MB) 2.39-2.52 /
#: 2.06-2.07 (torch 1.8-1.9), 256 -> 512 stride 2 (4.7 MB) 1.36-1.39 / 1.13 (torch 1.13), AlexNet's 384 -> 256 at 7x7
#: (3.5 MB) 2.83-2.92 / 2.59-2.80, 256 -> 256 at 7x7 1.91 / 1.78-1.81, 192 -> 384 2.04-2.06 / 1.89-1.92, 512 -> 512
#: at 7x7 6.33-6.46 / 6.16-6.82, at 8x8 9.4-9.6 / 7.4-8.2, at 16x16 33.6 / 29.9; batch 1: 512 -> 512 at 4x4 0.52 /
#: 0.48, at 7x7 1.40 / 1.15, 384 -> 256 at 7x7 0.68 / 0.58. Chunks of 2, 8 and 16 MB ran within a few percent of
#: 4 MB. Converted models, same process alternating with / without: ResNet-18 0.978 / 0.963 / 0.978 (batch 1 /
#: batch 8 / training step), ResNet-50 0.989 / 0.974 / 0.997, AlexNet 0.990 / 1.012 / 0.993. (Their stride-1 input
#: gradients, 128-392 positions at batch 8, keep the GEMM + col2im path: the flipped conv ran 1.2-1.8x slower.)
LARGE_WEIGHT_BYTES = 2 << 20
LARGE_WEIGHT_CHUNK_BYTES = 4 << 20
MAX_FORWARD_WEIGHT_BYTES = 64 << 20
#: Fewest input channels taken. It was 16: a thin input (an RGB stem: ResNet's 3 -> 64 7x7 stride 2 at 128x128)
#: ran 1.25-1.4x slower fused, when each output row's segment fill made two array views and a division. Since the
#: fills went flat (see :func:`_fill`) the stems run faster fused (same process, plain and fused alternating, 2
#: threads, 128x128, fused / plain time, forward at batch 1 and 8): 3 -> 32 3x3 stride 2 0.74 / 0.78, 3 -> 24
#: 0.75, 3 -> 64 7x7 stride 2 0.65-0.89 / 0.75-0.92, ConvNeXt's 3 -> 96 4x4 stride 4 0.67 / 0.72, AlexNet's 3 ->
#: 64 11x11 stride 4 1.10 / 1.01; forward + weight gradient at batch 8 0.67-0.98 (VGG's 3 -> 64 3x3 stride 1
#: 0.67, AlexNet's 0.98). Converted models with every stem fused or none (alternating in one process): ResNet-18,
#: MobileNet-v2, ConvNeXt-tiny, AlexNet, EfficientNet-B0 within 0.91-1.05 at batch 1, 8 and a training step,
#: inside the noise.
MIN_IN_CHANNELS = 1


@parallel.kernel(always=True, **_JIT)
def _grad_weight_region(x, go3, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW, rpc, colbuf, gobuf, gw2, acc, used,
                        box, tap_off, pos, corners, claimed):
    """The weight gradient in one parallel region: task ``t`` claims chunks of ``rpc``
    output rows of the batch, fills their columns into ``colbuf[t]`` (as the forward does), gathers the output
    gradient's rows into ``gobuf[t]`` (K, Q) and adds ``go @ col^T`` into its own accumulator with one
    single-threaded GEMM: task 0's is the result ``gw2`` (K, CK) itself, task ``t``'s ``acc[t - 1]``. A task's first
    product is stored (beta 0: no accumulator is zeroed first) and ``used[t]`` records that it made one; the caller
    adds the used accumulators into ``gw2``."""
    N = x.shape[0]
    K = go3.shape[1]
    P = go3.shape[2]
    gof = go3.reshape(go3.size)
    CK = gw2.shape[1]
    rows = N * OH
    nchunks = -(-rows // rpc)
    tasks = colbuf.shape[0]
    for t in prange(tasks):
        target = gw2 if t == 0 else acc[t - 1]
        beta = 0.0
        while True:
            chunk = task_queue.claim(claimed)
            if chunk >= nchunks:
                break
            g0 = chunk * rpc
            g1 = min(rows, g0 + rpc)
            Q = (g1 - g0) * OW
            col = colbuf[t, :CK * Q].reshape((CK, Q))
            if pos.shape[0] > 0:
                _fill_gather(box, g0, g1, tap_off, pos, OH, OW, col, corners[t])
            else:
                _fill(x, g0, g1, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW, col)
            gq = gobuf[t, :K * Q].reshape((K, Q))
            gqf = gq.reshape(gq.size)
            g = g0
            while g < g1:  # each image's rows of the chunk: one contiguous run of go3[n, k]
                n = g // OH
                r = g - n * OH
                L = min(g1 - g, OH - r) * OW
                for k in range(K):
                    d = np.uint64(k * Q + (g - g0) * OW)
                    src = np.uint64((n * K + k) * P + r * OW)
                    for i in range(L):
                        u = np.uint64(i)
                        gqf[d + u] = gof[src + u]
                g += L // OW
            jit_gemm.gemm(gq, col, target, beta, True)
            beta = 1.0
        used[t] = beta > 0.0


#: Fewest output positions a chunk's columns must hold for the forward (and the input gradient, a forward of
#: the flipped conv): the chunk's GEMM reads all the weights for that many columns, so tall columns
#: (``C*KH*KW`` large) leave a GEMM too thin to pay for rereading them. Measured fused / plain time, 2 threads,
#: batch 8: AlexNet's 384 -> 256 3x3 at 7x7 (3456-long columns, 75 per chunk) 1.15-1.26; the input gradient of
#: its 64 -> 192 5x5 at 15x15 (4800-long, 45 per chunk) 1.9-2.2; 256 -> 256 3x3 at 8x8 (112 per chunk)
#: 0.73-0.98.
MIN_CHUNK_COLUMNS = 112
#: The same for the weight gradient, where each chunk's GEMM reads and writes the task's whole accumulator
#: (``K x C*KH*KW``) for a reduction as long as the chunk's columns. Measured fused / plain time, batch 8:
#: 128 -> 128 3x3 at 16x16 (227 per chunk) 0.83, 64 -> 64 at 32x32 (455) 0.77; 64 -> 192 5x5 at 15x15 (163)
#: 1.05-1.15; 256 -> 256 3x3 at 8x8 and 7x7 (113) 1.05-1.33; 192 -> 384 and 384 -> 256 at 7x7 (151, 75) 1.41-1.45.
MIN_GRAD_WEIGHT_CHUNK_COLUMNS = 192


def applies(ksz, groups: int, in_channels: int, out_channels: int, in_spatial, out_spatial, itemsize: int,
            min_chunk_columns: int | None = None) -> bool:
    """Whether :func:`forward` runs this conv: dense, 1-D/2-D (depth 1), more than one tap, at least
    :data:`MIN_IN_CHANNELS` input channels, at most :data:`MAX_FORWARD_WEIGHT_BYTES` of weights, columns short enough
    for a chunk (:func:`forward_chunk_bytes`) to hold :data:`MIN_CHUNK_COLUMNS` of them, and a GEMM that Numba code
    can call (:data:`.jit_gemm.SOURCE`). With ``min_chunk_columns`` (:func:`grad_weight`'s callers pass
    :data:`MIN_GRAD_WEIGHT_CHUNK_COLUMNS`): whether :func:`grad_weight` runs it, at most :data:`MAX_WEIGHT_BYTES` of
    weights and chunks of :data:`CHUNK_BYTES`."""
    KD, KH, KW = ksz
    column_bytes = in_channels * KH * KW * itemsize
    weight_bytes = out_channels * column_bytes
    if min_chunk_columns is None:
        min_chunk_columns, max_weight, chunk = (MIN_CHUNK_COLUMNS, MAX_FORWARD_WEIGHT_BYTES,
                                                forward_chunk_bytes(weight_bytes))
    else:
        max_weight, chunk = MAX_WEIGHT_BYTES, CHUNK_BYTES
    return (ENABLED and jit_gemm.SOURCE is not None and groups == 1 and KD == 1 and in_spatial[0] == 1
            and out_spatial[0] == 1 and KH * KW > 1 and in_channels >= MIN_IN_CHANNELS
            and weight_bytes <= max_weight and column_bytes * min_chunk_columns <= chunk)


def forward_chunk_bytes(weight_bytes: int) -> int:
    """Bytes of columns per chunk of a forward with ``weight_bytes`` of weights (see :data:`LARGE_WEIGHT_BYTES`)."""
    return LARGE_WEIGHT_CHUNK_BYTES if weight_bytes > LARGE_WEIGHT_BYTES else CHUNK_BYTES


def _plan(N, K, CK, OH, OW, itemsize, tasks, chunk_bytes=CHUNK_BYTES):
    """(rows per chunk, channel parts). A chunk holds whole output rows of the batch, as many as fit
    ``chunk_bytes`` of columns (:data:`CHUNK_BYTES`; forwards with large weights: :data:`LARGE_WEIGHT_CHUNK_BYTES`;
    chunks as large as the weights, so that deep layers read their weights fewer times, measured 1.1-1.3x slower:
    the columns then leave L2). Chunks are then evened out over the
    tasks (a count that is a multiple of the tasks, when there are few), and where one chunk is all there is,
    the output channels are split between the tasks."""
    rows = N * OH
    per_row = max(1, CK * OW * itemsize)
    rpc = max(1, min(rows, chunk_bytes // per_row))
    nchunks = -(-rows // rpc)
    if nchunks == 1 and tasks > 1 and K >= 2 * tasks and K > rows * OW:
        return rows, tasks  # one chunk, weights larger than its columns: split the channels
    if nchunks < 8 * tasks and nchunks % tasks:
        nchunks = min(rows, -(-nchunks // tasks) * tasks)
    rpc = -(-rows // nchunks)
    return rpc, 1


def _layout(N, K, CK, OH, OW, itemsize, forward=True):
    """(parallel, tasks, rows per chunk, channel parts, channels per part) of a call: what :func:`forward` runs
    and sizes its buffers by (and :func:`workspace_bytes` reports); ``forward=False``: :func:`grad_weight`'s."""
    # (a child forked from an OpenMP process runs serial code only, see parallel.SERIAL_ONLY)
    parallel_ = N * K * CK * OH * OW >= PARALLEL_MIN_MACS and not parallel.SERIAL_ONLY
    tasks = numba.get_num_threads() if parallel_ else 1
    chunk = forward_chunk_bytes(K * CK * itemsize) if forward else CHUNK_BYTES
    rpc, kparts = _plan(N, K, CK, OH, OW, itemsize, tasks, chunk)
    return parallel_, tasks, rpc, kparts, -(-K // kparts)


def workspace_bytes(N, K, CK, OH, OW, itemsize, taps=None) -> int:
    """Bytes :func:`forward` allocates besides its result: a column chunk and a GEMM result per task, and for
    narrow output rows each task's column corners (int64; the padded input copy is not counted). With ``taps``
    ``(C, KH, KW, sh, sw, dh, dw)``, for a forward that takes the taps kernel (:func:`takes_taps`): the padded input it
    reads instead of columns and a GEMM result per task."""
    if taps is not None:
        C, KH, KW, sh, sw, dh, dw = taps
        _, tasks, rpc, Hb, Wb = _taps_layout(N, K, C, KH, KW, sh, sw, dh, dw, OH, OW, itemsize)
        return (N * C * sh * sw * Hb * Wb + tasks * K * ((rpc - 1) * Wb + OW)) * itemsize
    _, tasks, rpc, _, kstep = _layout(N, K, CK, OH, OW, itemsize)
    corners = tasks * rpc * OW * 8 if OW <= GATHER_MAX_OW else 0
    return tasks * (CK + kstep) * rpc * OW * itemsize + corners


#: Whether stride-1 forwards take :func:`_forward_taps_region` where the own GEMM is in use (tests and A/B
#: measurements switch it off).
TAPS = True
#: Whether strided forwards take it too, through their phases (:func:`_phase_box`) ...
TAPS_STRIDED = True
#: ... with at most this many input channels. Measured, 2 threads, same process alternating, taps / column-fill
#: forward time at batch 1 / 8: RGB stems 3 -> 64 7x7 stride 2 at 128x128 0.61 / 0.64 (at 256x256 0.64 / 0.77),
#: AlexNet's 3 -> 64 11x11 stride 4 0.69 / 0.61, 3 -> 32 3x3 stride 2 0.74 / 0.73, 16 -> 32 at 32x32 0.82 / 0.97,
#: 24 -> 48 at 64x64 0.89 / 0.78, 32 -> 64 at 64x64 0.73 / 0.85; with 64 and more input channels level or slower:
#: 64 -> 128 at 32x32 and 64x64 0.98-1.19, 128 -> 256 1.00-1.24, 256 -> 512 0.96-1.01, 64 -> 64 at 128x128 0.81 /
#: 1.19.
TAPS_STRIDED_MAX_IN_CHANNELS = 32
#: Narrowest output rows taken: each row computes ``(KW - 1) * dw`` positions more that are dropped, and short
#: rows leave narrow GEMMs. Measured, 2 threads, 3x3, taps / column-fill forward time: 128 -> 32 at 32x32 batch 8
#: 0.74-0.88, at 16x16 0.75-0.81 (batch 1 1.00-1.04), 64 -> 64 at 32x32 0.92 (batch 1 0.97), 128 -> 128 at 16x16
#: 0.86-0.98; at 8x8 1.12-1.31 (128 -> 32) and 1.06-1.81 (256 -> 256).
TAPS_MIN_OW = 16
#: Bytes of a task's GEMM result per chunk of output rows on the taps path (the chunk's ``K x rows*Wb`` stays in
#: L2 beside the input rows it reads).
TAPS_CHUNK_BYTES = 256 << 10


@parallel.kernel(always=True, **_JIT)
def _forward_taps_region(box, w2, bias, taps, OH, OW, rpc, obuf, y3, claimed):
    """A forward without columns: ``box`` (N, C', Hb, Wb) is the zero-padded input (stride 1) or its phases
    (strided, :func:`_phase_box`: phase ``(a, b)`` of channel ``c`` holds every ``sh``-th row from ``a`` and every
    ``sw``-th column from ``b``, so a strided conv reads each phase at stride 1), and output row ``r`` of image
    ``n`` is ``w2 @ B`` with ``B[(c, kh, kw), ow]`` the box element ``taps[p]`` past the row's first one (for
    stride 1 ``box[n, c, r + kh*dh, ow + kw*dw]``), so :func:`.micro_gemm.gemm_taps` reads it in
    place. A chunk of ``rpc`` rows is one GEMM over ``(rpc - 1)*Wb + OW`` flat positions (the ``Wb - OW``
    positions between two rows are computed and dropped); task ``t`` claims chunks one at a time and writes
    the valid columns plus the bias into ``y3`` (N, K, OH*OW)."""
    N, C, Hb, Wb = box.shape
    K = w2.shape[0]
    P = y3.shape[2]
    bf = box.reshape(box.size)
    yf = y3.reshape(y3.size)
    per_image = -(-OH // rpc)
    tasks = obuf.shape[0]
    for t in prange(tasks):
        while True:
            job = task_queue.claim(claimed)
            if job >= N * per_image:
                break
            n = job // per_image
            r0 = (job - n * per_image) * rpc
            r1 = min(OH, r0 + rpc)
            Q = (r1 - r0 - 1) * Wb + OW
            o = obuf[t, :K * Q].reshape((K, Q))
            micro_gemm.gemm_taps(w2, bf, (n * C * Hb + r0) * Wb, taps, o)
            of = o.reshape(o.size)
            for k in range(K):
                b = bias[k]
                for r in range(r1 - r0):
                    d = np.uint64((n * K + k) * P + (r0 + r) * OW)
                    src = np.uint64(k * Q + r * Wb)
                    for i in range(OW):
                        u = np.uint64(i)
                        yf[d + u] = of[src + u] + b


@functools.lru_cache(maxsize=512)
def _taps(C, KH, KW, sh, sw, dh, dw, Hb, Wb):
    """Each (channel, kh, kw) row's offset in a flat box (:func:`_phase_box`'s, or the padded input's for stride 1),
    in the weight's column order: tap ``(kh, kw)`` reads the padded input ``kh*dh`` rows below the output row's
    ``sh``-th, which is row ``kh*dh // sh`` of phase ``kh*dh % sh`` (columns likewise)."""
    c, kh, kw = np.meshgrid(np.arange(C), np.arange(KH), np.arange(KW), indexing="ij")
    a, r = np.divmod(kh * dh, sh)[::-1]  # (phase, row in the phase)
    b, q = np.divmod(kw * dw, sw)[::-1]
    return ((((c * sh + a) * sw + b) * Hb + r) * Wb + q).reshape(-1).astype(np.int64)


@parallel.kernel(**_JIT)
def _phase_box(x, sh, sw, ph, pw, out):
    """``out[n, (c, a, b), i, j] = xp[n, c, i*sh + a, j*sw + b]``, ``xp`` being ``x`` zero-padded by ``ph``, ``pw``
    before each dim: the ``sh*sw`` phases of the padded input, each a stride-1 image (a stride-``s`` conv is the
    sum over its phases of stride-1 convs, which the taps kernel runs without columns). ``out`` (N, C*sh*sw, Hq, Wq)
    ends where no window reaches. x and out C-contiguous."""
    N, C, H, W = x.shape
    Hq, Wq = out.shape[2], out.shape[3]
    xf = x.reshape(x.size)
    of = out.reshape(out.size)
    for task in prange(N * C):
        for a in range(sh):
            for b in range(sw):
                # phase columns j with 0 <= j*sw + b - pw < W
                j0 = min(Wq, max(0, -(-(pw - b) // sw)))
                j1 = max(j0, min(Wq, -(-(W + pw - b) // sw)))
                for i in range(Hq):
                    ih = i * sh + a - ph
                    d = np.uint64((((task * sh + a) * sw + b) * Hq + i) * Wq)
                    if ih < 0 or ih >= H:
                        for j in range(Wq):
                            of[d + np.uint64(j)] = 0
                        continue
                    src = (task * H + ih) * W + b - pw
                    for j in range(j0):
                        of[d + np.uint64(j)] = 0
                    for j in range(j0, j1):
                        of[d + np.uint64(j)] = xf[np.uint64(src + j * sw)]
                    for j in range(j1, Wq):
                        of[d + np.uint64(j)] = 0


def _taps_rows_per_chunk(N, K, OH, Wb, itemsize, tasks):
    """Output rows per chunk on the taps path: a result of about :data:`TAPS_CHUNK_BYTES`, and chunks enough that
    the tasks get equal shares."""
    rpc = max(1, min(OH, TAPS_CHUNK_BYTES // max(1, K * Wb * itemsize)))
    per_image = -(-OH // rpc)
    if (N * per_image) % tasks and N * per_image < 8 * tasks:
        per_image = min(OH, -(-(-(-(N * per_image) // tasks) * tasks) // N))
    # chunks of equal height (30 + 2 rows would hand every task the same chunk of each image: all the 30s to one)
    return -(-OH // per_image)


def takes_taps(kernel_hw, stride_hw, in_channels: int, out_width: int, small: bool = False) -> bool:
    """Whether :func:`forward` runs a conv of this geometry on the taps kernel (:func:`_forward_taps_region`):
    stride 1, or strided through its phases (:func:`_phase_box`) where :data:`TAPS_STRIDED_MAX_IN_CHANNELS` and
    overlapping windows say it pays; ``small``: whether :func:`small_for_own` (see :func:`own_kernels_take`)."""
    if not (TAPS and out_width >= TAPS_MIN_OW and own_kernels_take(small)):
        return False
    (KH, KW), (sh, sw) = kernel_hw, stride_hw
    if sh == sw == 1:
        return True
    # a window no larger than its stride (a patchify stem) is one tap per phase: its column fill is a plain
    # reshuffle, and the taps kernel measured level or slower there (ConvNeXt's 3 -> 96 4x4 stride 4: 1.00-1.14)
    return TAPS_STRIDED and in_channels <= TAPS_STRIDED_MAX_IN_CHANNELS and (KH > sh or KW > sw)


def _taps_layout(N, K, C, KH, KW, sh, sw, dh, dw, OH, OW, itemsize):
    """(parallel, tasks, rows per chunk, box height, box width) of a taps forward: the box holds ``sh*sw`` phase
    images per channel (one, the padded input, for stride 1), each as tall and wide as the output plus the
    farthest tap's reach in that phase."""
    Hb, Wb = OH + (KH - 1) * dh // sh, OW + (KW - 1) * dw // sw
    parallel_ = N * K * C * KH * KW * OH * OW >= PARALLEL_MIN_MACS and not parallel.SERIAL_ONLY
    tasks = numba.get_num_threads() if parallel_ else 1
    rpc = _taps_rows_per_chunk(N, K, OH, Wb, itemsize, tasks)
    return parallel_, min(tasks, N * -(-OH // rpc)), rpc, Hb, Wb


def _taps_source(x, K, kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw):
    """What both taps passes read: (parallel, tasks, rows per chunk, the box (the padded input, or for a strided
    conv its phases), each (channel, kh, kw) row's offset in it)."""
    N, C = x.shape[:2]
    (KH, KW), (sh, sw), (ph, pw), (dh, dw), (OH, OW) = kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw
    parallel_, tasks, rpc, Hb, Wb = _taps_layout(N, K, C, KH, KW, sh, sw, dh, dw, OH, OW, x.itemsize)
    box = memory.scratch("im2col.taps_box", (N, C * sh * sw, Hb, Wb), x.dtype)
    if sh == sw == 1:
        _pad_box(x, ph, pw, box)
    else:
        _phase_box(x, sh, sw, ph, pw, box)
    return parallel_, tasks, rpc, box, _taps(C, KH, KW, sh, sw, dh, dw, Hb, Wb)


def _forward_taps(x, w2, bias, kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw, y3):
    """:func:`forward` on the own GEMM without columns (see :func:`_forward_taps_region`)."""
    K = w2.shape[0]
    parallel_, tasks, rpc, box, taps = _taps_source(x, K, kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw)
    obuf = memory.scratch("im2col.task_results", (tasks, K * ((rpc - 1) * box.shape[3] + out_hw[1])), x.dtype)
    b = np.zeros(K, x.dtype) if bias is None else np.ascontiguousarray(bias, x.dtype)
    kernel = _forward_taps_region.parallel if parallel_ else _forward_taps_region.serial
    kernel(box, w2, b, taps, out_hw[0], out_hw[1], rpc, obuf, y3, task_queue.counter())
    return y3


def forward(x, w2, bias, kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw, y3, grad_input: bool = False):
    """x: (N, C, H, W); w2: (K, C*KH*KW) C-contiguous; bias: (K,) or None; y3: (N, K, OH*OW), written. The 2-D
    arguments are (H, W) pairs (padding: before each dim). ``grad_input``: this is an input gradient's flipped conv
    (for :func:`small_for_own`)."""
    N = x.shape[0]
    K, CK = w2.shape
    KH, KW = kernel_hw
    OH, OW = out_hw
    small = small_for_own(K, CK, kernel_hw, stride_hw, x.itemsize, None if grad_input else N * OH * OW,
                          grad_input=grad_input)
    if GATHER and own_kernels_take(small) and takes_gather_forward(kernel_hw, stride_hw, x.shape[1], K, OW,
                                                                   x.itemsize, N * OH * OW, grad_input):
        return forward_gather(x, w2, bias, kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw, y3)
    if takes_taps(kernel_hw, stride_hw, x.shape[1], OW, small):
        return _forward_taps(x, w2, bias, kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw, y3)
    parallel_, tasks, rpc, kparts, kstep = _layout(N, K, CK, OH, OW, x.itemsize)
    kernel = _forward_region.parallel if parallel_ else _forward_region.serial
    colbuf = memory.scratch("im2col.columns", (tasks, CK * rpc * OW), x.dtype)
    obuf = memory.scratch("im2col.task_results", (tasks, kstep * rpc * OW), x.dtype)
    b = np.zeros(K, x.dtype) if bias is None else np.ascontiguousarray(bias, x.dtype)
    box, tap_off, pos = _gather_source(x, kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw)
    corners = np.empty((tasks, rpc * OW if pos.shape[0] else 0), np.int64)
    kernel(x, w2, b, KH, KW, stride_hw[0], stride_hw[1], padding_hw[0], padding_hw[1], dilation_hw[0],
           dilation_hw[1], OH, OW, rpc, kparts, colbuf, obuf, y3, box, tap_off, pos, corners, task_queue.counter())
    return y3


def grad_weight(go3, x, kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw, gw2):
    """go3: (N, K, OH*OW); x: (N, C, H, W); gw2: (K, C*KH*KW) C-contiguous, written. The 2-D arguments are (H, W)
    pairs (padding: before each dim)."""
    N = x.shape[0]
    K, CK = gw2.shape
    KH, KW = kernel_hw
    OH, OW = out_hw
    parallel_, tasks, rpc, _, _ = _layout(N, K, CK, OH, OW, x.itemsize, forward=False)
    rows = N * OH
    tasks = min(tasks, -(-rows // rpc))  # no accumulator for a task without a chunk
    kernel = _grad_weight_region.parallel if parallel_ else _grad_weight_region.serial
    colbuf = memory.scratch("im2col.columns", (tasks, CK * rpc * OW), x.dtype)
    gobuf = memory.scratch("im2col.grad_out_rows", (tasks, K * rpc * OW), x.dtype)
    # Task 0 accumulates in gw2 itself and every task stores its first product: zeroing the accumulators and
    # summing all of them afterwards cost ResNet's 512 -> 512 3x3 layer (9.4 MB of weights, 2 tasks) 0.36 + 0.81 ms
    # of a ~3 ms call; one in-place add of the other task's accumulator takes 0.4.
    acc = memory.scratch("im2col.task_sums", (tasks - 1, K, CK), x.dtype)
    used = np.zeros(tasks, np.bool_)
    box, tap_off, pos = _gather_source(x, kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw)
    corners = np.empty((tasks, rpc * OW if pos.shape[0] else 0), np.int64)
    kernel(x, go3, KH, KW, stride_hw[0], stride_hw[1], padding_hw[0], padding_hw[1], dilation_hw[0],
           dilation_hw[1], OH, OW, rpc, colbuf, gobuf, gw2, acc, used, box, tap_off, pos, corners,
           task_queue.counter())
    if not used[0]:  # the other tasks claimed every chunk
        gw2.fill(0)
    for t in range(1, tasks):
        if used[t]:
            np.add(gw2, acc[t - 1], out=gw2)
    return gw2


# ---- the gather kernels: the own GEMM reading the padded input through offset tables ------------------------

#: Whether dense 2-D convs take the gather kernels where :func:`gather_applies` and the rules below say so (tests
#: and A/B measurements switch it off to reach the other paths).
GATHER = True
#: Largest weight (bytes) whose forward takes the gather kernel: its transposed weights are packed on every call,
#: and deep layers' products ran level or slower than the column and taps paths. Measured, 2 threads, batch 8, every
#: call after the same torch work (a BatchNorm and a ReLU, as in a model; back-to-back pairs favour their second
#: side: its fresh buffers come back already faulted in), order alternating, gather / previous forward time:
#: DenseNet's 128 -> 32 3x3 at 4x4 / 8x8 / 16x16 0.87 / 0.70 / 0.76 (32x32 0.98, batch 1 at 8x8 0.90), 32 -> 128
#: at 8x8 0.89, GoogLeNet's 16 -> 32 5x5 at 15x15 0.56, the 3 -> 64 7x7 stride-2 stem 0.71, 64 -> 128 3x3 stride 2
#: 0.84, strided 1x1 and the other stems 0.95-0.99; level (0.96-1.04) on 96 -> 128 and 128 -> 192 at 16x16, 256 ->
#: 256 and 160 -> 320 at 8x8 (over a megabyte: before the limit, 160 -> 320 read 1.13-1.23 and 512 -> 512 at 4x4
#: 1.05-1.20 in back-to-back pairs).
GATHER_MAX_WEIGHT_BYTES = 1 << 20
#: On AVX2 hosts (:data:`.micro_gemm.HOST_HAS_AVX512` false) the limit is this instead, for convs of at least
#: :data:`AVX2_GATHER_LARGE_MIN_POSITIONS` output positions (the batch's): there the column path's GEMMs run on
#: 6-row tiles with a column matrix to fill, and the gather kernel measured faster up to the largest weights.
#: Two Zen 2 cores, batch 8, forward / input gradient ms, gather / previous path: AlexNet's 64 -> 192 5x5 at 15x15
#: (1.2 MB) 6.0 / 6.3 against 8.0 / 13.6, 512 -> 512 3x3 at 8x8 15.2 / 18.6 against 20.1 / 29.4, 160 -> 320 at 8x8
#: 3.0 / 3.5 against 3.2 / 4.9, 256 -> 256 at 8x8 3.8 / 4.4 against 4.9 / 5.0, AlexNet's 5x5 at batch 1 (225
#: positions) 0.97 / 1.19 against 1.15 / 1.52; slower with fewer positions: 512 -> 512 at 4x4, batch 8 (128
#: positions) 5.0 / 10.4 against 4.7 / 6.7, 256 -> 256 at 8x8, batch 1 (64) 0.78 / 1.40 against 0.70 / 0.94.
AVX2_GATHER_MAX_WEIGHT_BYTES = 16 << 20
AVX2_GATHER_LARGE_MIN_POSITIONS = 192
#: Largest weight (bytes) whose gradient takes the gather kernel: it computes ``dW^T`` into a buffer as large as
#: the weight and transposes it into the result, and on ResNet's 512 -> 512 3x3 (9.4 MB) those two fresh buffers
#: cost more than the kernel saves (1.43x the column path's time, every call after other work as in a model).
#: Measured that way, 2 threads, batch 8, gather / previous path: DenseNet's 128 -> 32 at 4x4 to 16x16 0.57-0.74
#: (32x32 0.93), 256 -> 256 at 8x8 (2.4 MB) 0.76, 160 -> 320 at 8x8 0.82, 128 -> 128 at 16x16 0.90, strided 3x3 and
#: 1x1 0.80, the 7x7 stem 0.90, GoogLeNet's 16 -> 32 5x5 0.52; level on 64 -> 64 at 32x32 and 64 -> 192 5x5.
GATHER_GRAD_MAX_WEIGHT_BYTES = 4 << 20
#: On AVX-512 hosts a stride-1 forward (and input gradient) of at least :data:`AVX512_GATHER_MIN_POSITIONS` output
#: positions (the batch's) takes the gather kernel up to this weight size instead, and before the taps kernel. Each
#: task reads all of the packed weights for its share of the positions, which pays where the shares are large: in one
#: process, alternating, 2 threads, float32, forward / input gradient time with this limit over a limit of 2 MB
#: (the column and taps paths beyond it): ResNet's 256 -> 256 at 8x8 batch 8 0.90 / 0.82, at 16x16 batch 2 0.77 /
#: 0.73, at 14x14 batch 1 (196 positions) 0.93 / 0.94, 512 -> 512 at 8x8 batch 4 0.79 / 0.78, at 7x7 batch 8 0.86 /
#: 0.96, at 16x16 batch 1 0.87 / 0.89, 384 -> 256 at 8x8 0.76 / 0.82; 192 -> 384 at 8x8 1.02-1.04 / 0.73-0.77 (an
#: expanding forward level). (Before the gather kernel's jobs were balanced and its input gradient packed the flipped
#: weights directly, 256 -> 256 at 8x8 had measured level: the limit was 2 MB for any size.)
AVX512_GATHER_STRIDE1_MAX_WEIGHT_BYTES = 16 << 20
#: ... with fewer positions only :data:`GATHER_MAX_WEIGHT_BYTES`: there every task rereads the weights for a few dozen
#: positions, and the column path, which splits the weights between the tasks, ran faster (column / gather time:
#: GoogLeNet's 160 -> 320 at 4x4 batch 8, 128 positions, 0.93 / 0.90, 128 -> 256 at 4x4 0.94 / 1.00, 160 -> 320 at
#: 8x8 batch 1 0.75 / 0.79; 512 -> 512 at 4x4 batch 8 gather / column 1.05 / 1.16, at batch 1 3.1 / 3.1).
AVX512_GATHER_MIN_POSITIONS = 192
#: Fewest output channels at which a stride-1 forward the taps kernel takes stays there, on AVX2 hosts (64 -> 64 at
#: 32x32: gather / taps 1.06-1.10 in back-to-back pairs even with the gather side second; 32 -> 128 at 16x16 1.03
#: with each call after torch work; 128 -> 128 at 16x16 level; measured before the AVX-512 gather tiles were fixed).
GATHER_TAPS_MIN_OUT_CHANNELS = 64
#: On AVX-512 hosts, stride-1 forwards (and input gradients) with at most this many output channels take the taps
#: kernel, whose GEMM has the output channels as rows and the positions as its wide side, where it applies
#: (:func:`takes_taps`). On the gather kernel they are the product's columns: 16 of them fill half a packed panel,
#: and a half-width tile did not help (every broadcast of the input then feeds a single multiply-add: 128 -> 16 at
#: 30x30, batch 8, ran 3.2 ms on it against 3.0 for 128 -> 32). Measured, 2 threads, each call after a torch
#: BatchNorm and ReLU, taps / gather / torch ms: SqueezeNet's input gradients into 16 channels 64 -> 16 at 30x30
#: batch 8 1.14 / 1.53 / 1.00, 128 -> 16 2.31-2.42 / 2.98-3.19 / 1.88-2.04, batch 1 0.16 / 0.25 / 0.20;
#: 128 -> 17 2.49 / 3.29 / 3.03.
TAPS_NARROW_MAX_OUT_CHANNELS = 16


def takes_narrow_taps(kernel_hw, stride_hw, in_channels: int, out_channels: int, out_width: int,
                      small: bool = False) -> bool:
    """Whether a dense stride-1 forward of few output channels runs on the taps kernel rather than the gather
    kernel (see :data:`TAPS_NARROW_MAX_OUT_CHANNELS`); ``small`` as for :func:`takes_taps`."""
    return (micro_gemm.HOST_HAS_AVX512 and out_channels <= TAPS_NARROW_MAX_OUT_CHANNELS
            and tuple(stride_hw) == (1, 1) and takes_taps(kernel_hw, stride_hw, in_channels, out_width, small))


def takes_gather_grad_weight(in_channels: int, out_channels: int, kernel_taps: int, itemsize: int) -> bool:
    """Whether a weight gradient that :func:`gather_applies` to runs on :func:`grad_weight_gather` (see
    :data:`GATHER_GRAD_MAX_WEIGHT_BYTES`)."""
    return out_channels * in_channels * kernel_taps * itemsize <= GATHER_GRAD_MAX_WEIGHT_BYTES


def gather_applies(ksz, groups: int, in_spatial, out_spatial, small: bool = False) -> bool:
    """Whether the gather kernels can run this conv at all: dense (``groups == 1``), 1-D or 2-D (depth 1), on the
    own GEMM (:func:`own_kernels_take`; ``small``: whether :func:`small_for_own`)."""
    return (GATHER and ENABLED and groups == 1 and ksz[0] == 1 and in_spatial[0] == 1 and out_spatial[0] == 1
            and own_kernels_take(small))


def takes_gather_forward(kernel_hw, stride_hw, in_channels: int, out_channels: int, out_width: int,
                         itemsize: int, positions: int = 0, grad_input: bool = False) -> bool:
    """Whether a forward that :func:`gather_applies` to runs on :func:`forward_gather` (see
    :data:`GATHER_MAX_WEIGHT_BYTES`, :data:`AVX512_GATHER_STRIDE1_MAX_WEIGHT_BYTES`,
    :data:`AVX512_GATHER_MIN_POSITIONS`, :data:`GATHER_TAPS_MIN_OUT_CHANNELS`, :data:`STRIDED_TAPS_BEFORE_GATHER`);
    ``positions``: the batch's output positions (``N * OH * OW``); ``grad_input`` as for :func:`forward`."""
    KH, KW = kernel_hw
    limit = GATHER_MAX_WEIGHT_BYTES
    if micro_gemm.HOST_HAS_AVX512:
        if tuple(stride_hw) == (1, 1) and positions >= AVX512_GATHER_MIN_POSITIONS:
            limit = max(limit, AVX512_GATHER_STRIDE1_MAX_WEIGHT_BYTES)
    elif positions >= AVX2_GATHER_LARGE_MIN_POSITIONS:
        limit = max(limit, AVX2_GATHER_MAX_WEIGHT_BYTES)
    if out_channels * in_channels * KH * KW * itemsize > limit:
        return False
    small = small_for_own(out_channels, in_channels * KH * KW, kernel_hw, stride_hw, itemsize,
                          None if grad_input else positions, grad_input=grad_input)
    if takes_narrow_taps(kernel_hw, stride_hw, in_channels, out_channels, out_width, small):
        return False
    if (STRIDED_TAPS_BEFORE_GATHER and tuple(stride_hw) != (1, 1)
            and takes_taps(kernel_hw, stride_hw, in_channels, out_width, small)):
        return False
    return micro_gemm.HOST_HAS_AVX512 or not (out_channels >= GATHER_TAPS_MIN_OUT_CHANNELS
                                              and takes_taps(kernel_hw, stride_hw, in_channels, out_width, small))


#: Bytes of a task's result per job of the gather forward (output positions x channels, in L2 beside the
#: weights' panels).
GATHER_CHUNK_BYTES = 128 << 10
#: Positions of the output gradient packed per step of the gather weight gradient (a multiple of the GEMM's
#: reduction block), at most about this many bytes of packed panels.
GATHER_GRAD_CHUNK_BYTES = 512 << 10


#: Whether the gather kernels pack their weights and pad their input on every thread whenever their product runs
#: on every thread (:data:`PARALLEL_MIN_MACS`), rather than by the size of the copy
#: (:data:`.parallel.PARALLEL_MIN_ELEMENTS`, 2M elements: every layer's weights of the classic networks packed, and
#: every batch-8 input padded, on one thread). Why: the workers are woken for the product right after anyway, and
#: in a model the weights come from memory, not cache: AlexNet's 384 -> 256 3x3 (3.5 MB) packed serially in 0.32 ms
#: from cache and 0.65 from memory, on both threads in 0.18 and 0.24; its flipped packing for the input gradient
#: 0.59 against 0.31 from memory; DenseNet's 8 x 128 x 16x16 input padded in 78 against 39 µs, ResNet's 8 x 64 x
#: 32x32 in 188 against 85.
PREPARE_ON_PRODUCT_THREADS = True


def _on_product_threads(kernel: parallel.SizedKernel, product_parallel: bool):
    """``kernel`` (a packing or padding copy) to run before a gather product that runs on every thread or not
    (see :data:`PREPARE_ON_PRODUCT_THREADS`)."""
    return kernel.parallel if PREPARE_ON_PRODUCT_THREADS and product_parallel else kernel


def _product_parallel(macs: int) -> bool:
    """Whether a gather product of ``macs`` multiply-adds runs on every thread."""
    return macs >= PARALLEL_MIN_MACS and not parallel.SERIAL_ONLY


def _gather_tables(x, kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw, product_parallel=False):
    """(box, corners, taps): the input zero-padded to the windows' extent (N, C, Hb, Wb), each output position's
    window corner in it (``n*C*Hb*Wb + oh*sh*Wb + ow*sw``, the batch's positions in order) and each (channel, kh,
    kw)'s offset from a corner, in the weight's column order. ``product_parallel``: the product that reads them runs
    on every thread (the padding then does too, see :data:`PREPARE_ON_PRODUCT_THREADS`)."""
    N, C = x.shape[:2]
    (KH, KW), (sh, sw), (ph, pw), (dh, dw), (OH, OW) = kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw
    Hb, Wb = (OH - 1) * sh + (KH - 1) * dh + 1, (OW - 1) * sw + (KW - 1) * dw + 1
    box = memory.scratch("im2col.padded_input", (N, C, Hb, Wb), x.dtype)
    _on_product_threads(_pad_box, product_parallel)(x, ph, pw, box)
    return box, _corners(N, C * Hb * Wb, KH, KW, sh, sw, dh, dw, OH, OW, Wb), _taps(C, KH, KW, 1, 1, dh, dw, Hb, Wb)


@functools.lru_cache(maxsize=256)
def _corners(N, image, KH, KW, sh, sw, dh, dw, OH, OW, Wb):
    """The batch's window corners (see :func:`_gather_tables`), built once per geometry and batch (read-only)."""
    pos = _gather_offsets(KH, KW, sh, sw, dh, dw, OH, OW, Wb)[1]
    corners = (np.arange(N, dtype=np.int64)[:, None] * image + pos[None, :]).reshape(-1)
    corners.setflags(write=False)
    return corners


def _gather_jobs(total, per_position_bytes, tasks, cap, grain):
    """Jobs of the gather forward: results of at most about ``cap`` bytes, a count that is a multiple of the
    tasks where there are few (equal jobs then give the tasks equal shares), none shorter than ``grain`` rows."""
    MR = micro_gemm.ROW_GRAIN
    chunk = max(MR, min(total, cap // max(1, per_position_bytes)) // MR * MR)
    jobs = -(-total // chunk)
    if jobs % tasks and jobs < 8 * tasks:
        jobs = -(-jobs // tasks) * tasks
    return max(1, min(jobs, total // grain))


def _gather_grain(out_channels, itemsize):
    """Rows a gather job's first row is a multiple of: the height of every tile its product runs on
    (:func:`.micro_gemm.gemm_gather`: the wide tile on pairs of whole panels, the ``MR``-row tile on the rest),
    so that only a job's last tile may be short. ``out_channels``: the product's columns."""
    pair = 2 * micro_gemm.NV * micro_gemm.VECTOR_BYTES // itemsize  # columns of the wide tile
    if micro_gemm.WIDE_NV and out_channels % pair == 0:
        return micro_gemm.WIDE_MR
    if not micro_gemm.WIDE_NV or out_channels < pair:
        return micro_gemm.MR
    return micro_gemm.ROW_GRAIN


@njit(**_JIT)
def _job_rows(job, jobs, total, grain):
    """First row of gather job ``job`` of ``jobs`` over ``total`` rows (``total`` for ``job == jobs``): the equal
    share's boundary rounded to the nearest multiple of ``grain``, so that every job is within ``grain`` rows of
    ``total / jobs`` (``jobs <= total // grain`` keeps them all nonempty). Cut into jobs of a fixed size rounded
    to the tiles instead, the last job was short and a task idle: 512 positions (8 x 8 at batch 8) as 96-row jobs,
    96 x 5 + 32, left one task 224 rows against the other's 288."""
    if job >= jobs:
        return total
    return (job * total // jobs + grain // 2) // grain * grain


@parallel.kernel(always=True, **_JIT)
def _forward_gather_region(bf, bp, bias, has_bias, taps, corners, P, jobs, grain, obuf, y3, claimed):
    """The forward as ``y^T = A @ W^T`` with ``A`` (positions x taps) read from the flat padded input ``bf`` through
    ``corners`` and ``taps`` (:func:`.micro_gemm.gemm_gather`; ``bp``: the packed ``W^T``). Task ``t`` claims jobs
    (:mod:`.task_queue`) of positions of the batch (``g = n*P + q``, a job may span images; ``jobs`` equal shares,
    see :func:`_job_rows`) and writes its ``(positions, K)`` result transposed, plus the bias, into ``y3`` (N, K,
    P)."""
    K = y3.shape[1]
    total = corners.shape[0]
    yf = y3.reshape(y3.size)
    tasks = obuf.shape[0]
    for t in prange(tasks):
        while True:
            job = task_queue.claim(claimed)
            if job >= jobs:
                break
            g0 = _job_rows(job, jobs, total, grain)
            g1 = _job_rows(job + 1, jobs, total, grain)
            if g0 >= g1:
                continue
            o = obuf[t, :(g1 - g0) * K].reshape((g1 - g0, K))
            micro_gemm.gemm_gather(bf, 0, corners[g0:g1], taps, bp, o, 0.0)
            g = g0
            while g < g1:  # each image's positions of the job: one contiguous run of y3[n, k]
                n = g // P
                q = g - n * P
                L = min(g1 - g, P - q)
                micro_gemm.transpose_into(o[g - g0:g - g0 + L], y3[n, :, q:q + L])
                if has_bias:
                    for k in range(K):
                        b = bias[k]
                        d = np.uint64((n * K + k) * P + q)
                        for i in range(L):
                            yf[d + np.uint64(i)] += b
                g += L


@parallel.kernel(**_JIT)
def _pack_weights(w2, bp):
    """``W^T`` packed for :func:`.micro_gemm.gemm_gather` (see :func:`.micro_gemm.pack_b`), a panel of ``NR``
    output channels per task (serial packing of a 160 -> 320 3x3 layer's weights took as long as a tenth of its
    forward at batch 8)."""
    K, CK = w2.shape
    NR = micro_gemm.NV * micro_gemm._VECTOR_BYTES // w2.itemsize
    for panel in prange(-(-K // NR)):
        j0 = panel * NR
        micro_gemm.pack_b_rows(w2[j0:min(K, j0 + NR)].T, bp[panel * CK * NR:(panel + 1) * CK * NR], CK, 0)


def _gather_forward_layout(N, K, CK, OH, OW, itemsize):
    """(parallel, tasks, jobs, grain, rows of the largest job) of :func:`forward_gather`."""
    parallel_ = _product_parallel(N * K * CK * OH * OW)
    tasks = numba.get_num_threads() if parallel_ else 1
    total = N * OH * OW
    grain = _gather_grain(K, itemsize)
    jobs = _gather_jobs(total, K * itemsize, tasks, GATHER_CHUNK_BYTES, grain)
    largest = min(total, -(-total // jobs) + grain)  # (a bound: see _job_rows)
    return parallel_, min(tasks, jobs), jobs, grain, largest


def gather_workspace_bytes(N, C, K, kernel_hw, stride_hw, dilation_hw, out_hw, itemsize) -> int:
    """Bytes :func:`forward_gather` allocates besides its result: the padded input, the packed weights and a
    result per task (the offset tables are cached per geometry)."""
    (KH, KW), (sh, sw), (dh, dw), (OH, OW) = kernel_hw, stride_hw, dilation_hw, out_hw
    Hb, Wb = (OH - 1) * sh + (KH - 1) * dh + 1, (OW - 1) * sw + (KW - 1) * dw + 1
    CK = C * KH * KW
    _, tasks, _, _, largest = _gather_forward_layout(N, K, CK, OH, OW, itemsize)
    return (N * C * Hb * Wb + micro_gemm.packed_size(CK, K, itemsize) + tasks * largest * K) * itemsize


def forward_gather(x, w2, bias, kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw, y3):
    """:func:`forward` on the gather kernel (:func:`_forward_gather_region`): no columns, no phases, any stride."""
    K, CK = w2.shape
    bp = memory.scratch("im2col.packed_weights", (micro_gemm.packed_size(CK, K, x.itemsize),), x.dtype)
    _on_product_threads(_pack_weights, _product_parallel(x.shape[0] * K * CK * out_hw[0] * out_hw[1]))(w2, bp)
    return _run_forward_gather(x, bp, K, CK, bias, kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw, y3)


def grad_input_gather(go, w3, padding_hw, dilation_hw, in_hw, kernel_hw, gx3):
    """A stride-1 input gradient as the forward of the output gradient ``go`` (N, K, OH, OW) with the flipped,
    transposed weights, on the gather kernel; ``w3`` (K, C, KH*KW) the forward's weights (C-contiguous), packed
    flipped straight into the kernel's panels (:func:`_pack_flipped_weights`); ``padding_hw`` the transposed conv's
    padding before each dim (``(k - 1) * d - p``); ``gx3`` (N, C, H*W), written."""
    K, C, T = w3.shape
    bp = memory.scratch("im2col.packed_weights", (micro_gemm.packed_size(K * T, C, go.itemsize),), go.dtype)
    _on_product_threads(_pack_flipped_weights,
                        _product_parallel(go.shape[0] * C * K * T * in_hw[0] * in_hw[1]))(w3, bp)
    return _run_forward_gather(go, bp, C, K * T, None, kernel_hw, (1, 1), padding_hw, dilation_hw, in_hw, gx3)


@parallel.kernel(**_JIT)
def _pack_flipped_weights(w3, bp):
    """``bp``: ``B[(k, t), c] = w3[k, c, T - 1 - t]`` packed for :func:`.micro_gemm.gemm_gather` (panels of ``NR``
    input channels, zero-padded), ``w3`` (K, C, T) C-contiguous: the input gradient's flipped, transposed weights
    without a flipped copy first. Flipping into a copy and packing that took 1.0 + 0.56 ms of a 4.6 ms input
    gradient (GoogLeNet's 160 -> 320 3x3 at 8x8, batch 8, 2 threads). Each task reads its panel's channels of
    every kernel (one contiguous run of ``NR * T`` values per output channel ``k``)."""
    K, C, T = w3.shape
    NR = micro_gemm.NV * micro_gemm.VECTOR_BYTES // w3.itemsize
    wf = w3.reshape(w3.size)
    CK = K * T
    for panel in prange(-(-C // NR)):
        j0 = panel * NR
        nj = min(NR, C - j0)
        base = panel * CK * NR
        for k in range(K):
            for t in range(T):
                o = np.uint64(base + (k * T + t) * NR)
                src = np.uint64((k * C + j0) * T + T - 1 - t)
                for j in range(nj):
                    bp[o + np.uint64(j)] = wf[src + np.uint64(j * T)]
                for j in range(nj, NR):
                    bp[o + np.uint64(j)] = 0


def _run_forward_gather(x, bp, K, CK, bias, kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw, y3):
    """:func:`_forward_gather_region` over ``x`` (N, C, H, W) with ``bp`` the packed ``W^T`` (``CK`` taps by
    ``K`` output channels) into ``y3`` (N, K, OH*OW)."""
    N = x.shape[0]
    OH, OW = out_hw
    parallel_, tasks, jobs, grain, largest = _gather_forward_layout(N, K, CK, OH, OW, x.itemsize)
    box, corners, taps = _gather_tables(x, kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw, parallel_)
    obuf = memory.scratch("im2col.task_results", (tasks, largest * K), x.dtype)
    b = np.zeros(K, x.dtype) if bias is None else np.ascontiguousarray(bias, x.dtype)
    kernel = _forward_gather_region.parallel if parallel_ else _forward_gather_region.serial
    kernel(box.reshape(-1), bp, b, bias is not None, taps, corners, OH * OW, jobs, grain, obuf, y3,
           task_queue.counter())
    return y3


@parallel.kernel(always=True, **_JIT)
def _grad_weight_gather_region(bf, go3, taps, corners, chunk, rows_per_task, gbuf, acc, gw2):
    """The weight gradient as ``dW^T = A @ gy^T`` with ``A`` (taps x positions) read from the flat padded input
    through the tables of :func:`_forward_gather_region` swapped. Task ``t`` computes rows ``t*rows_per_task ...``
    of ``acc`` (CK, K) over the whole batch, ``chunk`` positions at a time: it packs that chunk's output gradient
    (``gy^T``, each image's piece by register transposes) into ``gbuf[t]`` and accumulates one GEMM; then it
    writes its rows transposed into ``gw2`` (K, CK)."""
    N, K, P = go3.shape
    CK = acc.shape[0]
    total = corners.shape[0]
    tasks = gbuf.shape[0]
    for t in prange(tasks):
        r0 = t * rows_per_task
        r1 = min(CK, r0 + rows_per_task)
        if r0 >= r1:
            continue
        for g0 in range(0, total, chunk):
            g1 = min(total, g0 + chunk)
            g = g0
            while g < g1:
                n = g // P
                q = g - n * P
                L = min(g1 - g, P - q)
                micro_gemm.pack_b_rows(go3[n, :, q:q + L].T, gbuf[t], g1 - g0, g - g0)
                g += L
            micro_gemm.gemm_gather(bf, 0, taps[r0:r1], corners[g0:g1], gbuf[t], acc[r0:r1], 0.0 if g0 == 0 else 1.0)
        micro_gemm.transpose_into(acc[r0:r1], gw2[:, r0:r1])


def grad_weight_gather(go3, x, kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw, gw2):
    """:func:`grad_weight` on the gather kernel (:func:`_grad_weight_gather_region`)."""
    N = x.shape[0]
    K, CK = gw2.shape
    OH, OW = out_hw
    parallel_ = _product_parallel(N * K * CK * OH * OW)
    box, corners, taps = _gather_tables(x, kernel_hw, stride_hw, padding_hw, dilation_hw, out_hw, parallel_)
    tasks = numba.get_num_threads() if parallel_ else 1
    MR, KC = micro_gemm.MR, micro_gemm.KC
    rows_per_task = -(-(-(-CK // tasks)) // micro_gemm.ROW_GRAIN) * micro_gemm.ROW_GRAIN
    tasks = -(-CK // rows_per_task)
    total = N * OH * OW
    NR = micro_gemm.NV * micro_gemm._VECTOR_BYTES // x.itemsize
    per_position = -(-K // NR) * NR * x.itemsize
    fit = GATHER_GRAD_CHUNK_BYTES // per_position
    chunk = min(total, fit // KC * KC if fit >= KC else max(MR, fit // MR * MR))
    gbuf = memory.scratch("im2col.grad_out_rows", (tasks, micro_gemm.packed_size(chunk, K, x.itemsize)), x.dtype)
    acc = memory.scratch("im2col.task_sums", (CK, K), x.dtype)
    kernel = _grad_weight_gather_region.parallel if parallel_ else _grad_weight_gather_region.serial
    kernel(box.reshape(-1), go3, taps, corners, chunk, rows_per_task, gbuf, acc, gw2)
    return gw2
