"""Depthwise 2-D convolution on channels-last operands: read (N, H, W, C) memory, write (N, OH, OW, C).

Why: a channels_last model (torchvision's ConvNeXt hands its 7x7 depthwise convs the permuted output of the
block before, channels innermost) gave the NCHW kernels of :mod:`.depthwise` a copy to NCHW in and a copy back
out, and their channel-blocked path then transposed each 64-channel block to channels-innermost and back again.
Channels innermost is the layout those register tiles want (:func:`.fir.channel_rows`: a tile of up to eight
output positions by one vector of channels, summed over every tap in registers), so here it is read as it comes:
a task takes a band of output rows of one image, copies the input rows under it (plain row copies, zero padding
around them, split by stride phase in W as :func:`.depthwise._forward2d_cb` does) into a buffer that stays in L2,
and the tiles write straight into the channels-last result (:func:`.fir.channel_rows_by_position`: all of a tile's
channel vectors before the next tile, so its input window stays in L1).

Measured on the 2-core Zen 5 (AVX-512), float32, channels_last input, medians of 40 calls, the depthwise algorithm
before / after (torch): ConvNeXt's 8 x 96 x 32x32 7x7 2.98 / 0.77 ms (0.61), 8 x 192 x 16x16 1.12 / 0.42 (0.39),
8 x 384 x 8x8 0.74 / 0.24-0.30 (0.17-0.23); with the tile loops lanes-outermost (:func:`.fir.channel_rows`) the
first read 1.2 ms on one thread against 0.74. In a converted ConvNeXt-tiny at batch 8 (forward hooks on every
conv, alternating with torch's model) its 23 convs took 41.6 ms against torch's 18.6 before, 24.0 against 18.1
after.

The input gradient of a stride-1 layer is the same forward on the output gradient with the flipped kernel.

Scope (:func:`applies`): multiplier 1 (``K == C``), 2-D (depth 1), padding >= 0, and a channel count that fills
whole vectors (a multiple of 64 bytes of channels: 16 float32, 8 float64). The caller keeps every other case on
the NCHW kernels. Arrays are 5-D ``(N, C, 1, H, W)`` views of channels-last memory, as :mod:`.im2col_nhwc` takes.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from fastconv import config

from . import channel_taps, fir, memory, micro_gemm, parallel, task_queue

__all__ = ["applies", "forward", "grad_input"]

_JIT = dict(cache=config.CACHE, fastmath=set(config.FASTMATH), nogil=True)

#: Bytes of padded input rows one task copies and reads per band of output rows (in L2 with its output rows).
BAND_BYTES = 512 << 10
#: Bands per thread at least, where the rows allow it (a batch-1 layer still spreads over every thread).
BANDS_PER_THREAD = 4
#: Channel counts are whole vectors of this many bytes (:func:`.fir.channel_rows`' tiles have no remainder).
VECTOR_BYTES = 64
#: Whether rows of adjacent taps (stride 1, no dilation in W, 3/5/7 wide) run on the tiles that load each input
#: vector once per row (:func:`.fir.channel_rows_by_window`) instead of once per tap (AVX-512 hosts; tests and
#: A/B measurements switch it). Measured on a 2-core Intel Xeon (AVX-512), float32, channels_last input, batch 8,
#: medians, tap-by-tap / window tiles (torch): 96 x 32x32 7x7 0.65 / 0.50 ms (0.35), 192 x 16x16 7x7 0.35 / 0.28
#: (0.19), 384 x 8x8 7x7 0.22 / 0.19 (0.11), 96 x 32x32 3x3 0.26 / 0.23, 5x5 0.35 / 0.31; rows shorter than eight
#: positions (768 x 4x4) run on the tap-by-tap tiles either way. A converted ConvNeXt-tiny at batch 8 did not
#: move (window / tap 1.00, same process): its depthwise convs are 8 of its 112 ms.
WINDOW = True
#: Small maps whose windows lie this much or less inside the input (the mean fraction of taps, the rest on the zero
#: padding) run on :func:`_forward_clipped`: only the taps inside, read in place, no padded copy. Measured on the
#: 2-core Intel Xeon (AVX-512), float32, channels_last, medians, bands / clipped ms: ConvNeXt's 7x7 at batch 8
#: 768 x 4x4 (33% inside) 0.15-0.18 / 0.08, 384 x 8x8 (62%) 0.15-0.16 / 0.145-0.153, at batch 1 0.07-0.08 / 0.037
#: and 0.058 / 0.048; 192 x 16x16 (79%) 0.25-0.29 / 0.34-0.39, 240 x 8x8 5x5 (72%) 0.064 / 0.074.
CLIPPED_MAX_INSIDE = 0.65



def applies(channels: int, out_channels: int, kernel, padding, itemsize: int, in_depth: int = 1) -> bool:
    """Whether :func:`forward` runs this depthwise conv: multiplier 1, 2-D (``kernel`` (KD, KH, KW) with KD == 1
    and input depth 1), padding (before each dim) >= 0, and ``channels * itemsize`` a multiple of
    :data:`VECTOR_BYTES`."""
    return (out_channels == channels and kernel[0] == 1 and in_depth == 1 and min(padding) >= 0
            and itemsize in (4, 8) and (channels * itemsize) % VECTOR_BYTES == 0 and channels > 0)


@parallel.kernel(work_arg=18, compute=True, **_JIT)
def _forward_bands(x, N, H, W, C, wt, T, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW, rpb, y, chunks, window):
    """x (N*H*W*C,) flat channels-last; wt ((T+1)*C,): tap ``t``'s weights for every channel, then the bias; y
    (N*OH*OW*C,) flat channels-last, written. Task ``(n, band)`` computes output rows ``band*rpb`` to
    ``band*rpb + rpb`` of image ``n``. ``window``: the rows' taps are adjacent (stride 1, no dilation in W, a width
    :func:`.fir.channel_rows_by_window` has tiles for) and run on those tiles."""
    Wq = OW + ((KW - 1) * dw) // sw
    row = sw * Wq * C  # one padded input row: its sw phases of Wq positions of C channels
    nbands = (OH + rpb - 1) // rpb
    ntask = N * nbands
    max_in = (rpb - 1) * sh + (KH - 1) * dh + 1
    nchunks = chunks[1]
    workers = chunks[2]
    for _ in prange(workers):  # one iteration per thread, which claims chunks
        Xp = np.empty(max_in * row, y.dtype)
        toff = np.empty(T, np.int64)
        row_offs = np.empty(KH, np.int64)
        for kh in range(KH):
            row_offs[kh] = kh * dh * sw * Wq * C
            for kw in range(KW):
                a = kw * dw
                toff[kh * KW + kw] = (kh * dh * sw + a % sw) * Wq * C + (a // sw) * C
        while True:
            chunk = task_queue.claim(chunks)
            if chunk >= nchunks:
                break
            for task in range(chunk * ntask // nchunks, (chunk + 1) * ntask // nchunks):
                n = task // nbands
                oh0 = (task - n * nbands) * rpb
                rows = min(OH, oh0 + rpb) - oh0
                nin = (rows - 1) * sh + (KH - 1) * dh + 1
                for r in range(nin):
                    ih = oh0 * sh + r - ph
                    dst = Xp[r * row:(r + 1) * row]
                    if ih < 0 or ih >= H:
                        dst[:] = 0
                        continue
                    src = x[((n * H + ih) * W) * C:((n * H + ih + 1) * W) * C]
                    for b in range(sw):
                        # phase b, position q reads input column q*sw + b - pw
                        qlo = (pw - b + sw - 1) // sw if pw > b else 0
                        qhi = max(qlo, min(Wq, (W - 1 + pw - b) // sw + 1))
                        d0 = b * Wq * C
                        dst[d0:d0 + qlo * C] = 0
                        dst[d0 + qhi * C:d0 + Wq * C] = 0
                        if sw == 1:
                            s0 = (qlo - pw) * C
                            dst[d0 + qlo * C:d0 + qhi * C] = src[s0:s0 + (qhi - qlo) * C]
                        else:
                            for q in range(qlo, qhi):
                                s0 = (q * sw + b - pw) * C
                                dst[d0 + q * C:d0 + (q + 1) * C] = src[s0:s0 + C]
                yo = y[(n * OH + oh0) * OW * C:(n * OH + oh0 + rows) * OW * C]
                if window:
                    fir.channel_rows_by_window(Xp, 0, sh * row, row_offs, KH, KW, toff, wt, T, rows, OW, C, yo)
                else:
                    fir.channel_rows_by_position(Xp, 0, sh * row, toff, wt, T, rows, OW, C, yo)


@parallel.kernel(work_arg=17, compute=True, **_JIT)
def _forward_clipped(x, N, H, W, C, wt, T, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW, y, chunks):
    """:func:`_forward_bands` without the padded copy: each output position sums only its taps that fall inside
    the input, read where they lie (:func:`.channel_taps.row_taps`). Task ``(n, oh)`` is one output row."""
    ntask = N * OH
    nchunks = chunks[1]
    workers = chunks[2]
    for _ in prange(workers):  # one iteration per thread, which claims chunks
        soffs = np.empty(OW * T, np.int64)
        woffs = np.empty(OW * T, np.int64)
        counts = np.empty(OW, np.int64)
        while True:
            chunk = task_queue.claim(chunks)
            if chunk >= nchunks:
                break
            for task in range(chunk * ntask // nchunks, (chunk + 1) * ntask // nchunks):
                n = task // OH
                oh = task - n * OH
                channel_taps.row_window_taps(n, oh, OW, H, W, C, KH, KW, sh, sw, ph, pw, dh, dw, soffs, woffs,
                                             counts)
                channel_taps.row_taps(x, soffs, wt, woffs, counts, OW, T, T * C, y, (n * OH + oh) * OW * C, C)


def _rows_per_band(N, OH, sh, KH, dh, row_bytes, threads):
    """Output rows per band: padded input of about :data:`BAND_BYTES`, and bands enough that every thread gets
    :data:`BANDS_PER_THREAD` (when the rows allow)."""
    rpb = max(1, ((BAND_BYTES // max(1, row_bytes)) - (KH - 1) * dh - 1) // sh + 1)
    rpb = min(rpb, OH)
    want = BANDS_PER_THREAD * threads
    if N * -(-OH // rpb) < want:
        per_image = min(OH, -(-want // N))
        rpb = -(-OH // per_image)
    return rpb


def _run(xl, taps, bias, KH, KW, stride, padding, dilation, out_hw):
    """The forward on (N, H, W, C) C-contiguous ``xl`` with ``taps`` (KH*KW, C), any strides: (N, OH, OW, C)
    C-contiguous."""
    N, H, W, C = xl.shape
    (sh, sw), (ph, pw), (dh, dw), (OH, OW) = stride, padding, dilation, out_hw
    T = KH * KW
    wt = memory.empty_aligned((T + 1, C), xl.dtype)
    wt[:T] = taps
    if bias is None:
        wt[T] = 0
    else:
        wt[T] = bias
    y = memory.empty_aligned((N, OH, OW, C), xl.dtype)
    if N * OH * OW == 0:
        return y
    threads = config.sync_threads()
    inside = channel_taps.inside_fraction(H, OH, KH, sh, ph, dh) * channel_taps.inside_fraction(W, OW, KW, sw, pw, dw)
    if inside <= CLIPPED_MAX_INSIDE:
        _forward_clipped(xl.reshape(-1), N, H, W, C, wt.reshape(-1), T, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW,
                         y.reshape(-1), _chunks(N * OH, threads))
        return y
    Wq = OW + ((KW - 1) * dw) // sw
    rpb = _rows_per_band(N, OH, sh, KH, dh, sw * Wq * C * xl.itemsize, threads)
    chunks = _chunks(N * -(-OH // rpb), threads)
    window = WINDOW and micro_gemm.HOST_HAS_AVX512 and sw == 1 and dw == 1 and KW in fir.WINDOW_WIDTHS
    _forward_bands(xl.reshape(-1), N, H, W, C, wt.reshape(-1), T, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW, rpb,
                   y.reshape(-1), chunks, window)
    return y


def _chunks(ntask, threads):
    """``[counter, chunks, workers]``: tasks cut into a few runs per thread, claimed one at a time."""
    chunks = max(1, min(ntask, 4 * threads))
    return np.array([0, chunks, min(chunks, threads)], np.int64)


def _nhwc(a: np.ndarray) -> np.ndarray:
    """(N, C, 1, H, W) -> (N, H, W, C), a view when ``a`` is channels-last (else a copy)."""
    return np.ascontiguousarray(np.transpose(a[:, :, 0], (0, 2, 3, 1)))


def _as_ncdhw_view(y: np.ndarray) -> np.ndarray:
    """(N, OH, OW, C) -> its (N, C, 1, OH, OW) view."""
    return np.transpose(y, (0, 3, 1, 2))[:, :, None]


@config.parallel_entry
def forward(x, w, bias, stride, padding, dilation, out_spatial):
    """x: (N, C, 1, H, W) channels-last; w: (C, 1, 1, KH, KW); bias: (C,) or None; the 3-tuples as
    :mod:`.depthwise` takes them. Returns (N, C, 1, OH, OW), a view of a channels-last buffer."""
    KH, KW = w.shape[3], w.shape[4]
    taps = w.reshape(w.shape[0], KH * KW).T  # (a view: _run copies it once, into its aligned table)
    y = _run(_nhwc(x), taps, bias, KH, KW, tuple(stride[1:]), tuple(padding[1:]), tuple(dilation[1:]),
             tuple(out_spatial[1:]))
    return _as_ncdhw_view(y)


def grad_input_applies(stride, padding, dilation, kernel) -> bool:
    """Whether :func:`grad_input` runs (on top of :func:`applies`): stride 1, and padding that the flipped
    forward can take (``(K-1)*d - p >= 0`` in H and W)."""
    return (tuple(stride[1:]) == (1, 1) and (kernel[1] - 1) * dilation[1] - padding[1] >= 0
            and (kernel[2] - 1) * dilation[2] - padding[2] >= 0)


@config.parallel_entry
def grad_input(grad_out, w, stride, padding, dilation, in_spatial):
    """Stride-1 input gradient: the forward of ``grad_out`` (N, C, 1, OH, OW) channels-last with the flipped
    kernel, padded by ``(K-1)*d - p``. Returns (N, C, 1, H, W), a view of a channels-last buffer."""
    KH, KW = w.shape[3], w.shape[4]
    taps = w[:, 0, 0, ::-1, ::-1].reshape(w.shape[0], KH * KW).T
    (dh, dw), (ph, pw) = tuple(dilation[1:]), tuple(padding[1:])
    y = _run(_nhwc(grad_out), taps, None, KH, KW, (1, 1), ((KH - 1) * dh - ph, (KW - 1) * dw - pw), (dh, dw),
             tuple(in_spatial[1:]))
    return _as_ncdhw_view(y)
