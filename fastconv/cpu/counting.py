"""Counting mode of the direct convolution: the direct kernel's loop nest, tallying its multiplications.

:func:`fastconv.flops.count` reports the analytic MAC count ``N * K * prod(out) * (C/groups) * prod(kernel)``,
which includes every tap that falls on zero padding (the convention of fvcore, thop, ptflops and torch). The
executing kernel (:func:`fastconv.cpu.conv.direct_forward`) does not do exactly that much work, and this
module measures what it does instead of asserting it:

* along depth and height the direct kernel walks only the in-range (tap, input row) pairs
  (``_pairs_forward``): taps over padding rows are **skipped**;
* along width it reads a zero-padded, stride-phase-split copy of the row and runs every tap over the whole
  output row (one vectorisable loop, no bounds checks): taps over padding columns **are executed**, as
  multiplications by zero.

:func:`direct_forward_counted` runs the same loop structure -- the same ``_pairs_forward`` CSR tap lists
for D and H, the same phase-split row and tap offsets for W -- computes the convolution (so a test can check
the loop nest really is a convolution) and returns two tallies:

``executed``
    multiplications the direct kernel performs: ``N * K * (C/groups) * P_D * P_H * KW * OW`` where ``P_D``,
    ``P_H`` are the numbers of in-range (output, tap) pairs along D and H;
``in_range``
    those whose input element lies inside the input (no padding at all):
    ``N * K * (C/groups) * P_D * P_H * P_W``.

Without padding all three counts (analytic, executed, in range) are equal.
"""
from __future__ import annotations

from fastconv import config

import numpy as np
from numba import njit

from .conv import _pairs_forward, _phase_split, _tup

__all__ = ["direct_forward_counted", "in_range_pairs"]


def in_range_pairs(n_out: int, n_in: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Number of (output index, tap) pairs along one dim whose input index is inside ``[0, n_in)``."""
    start, _, _ = _pairs_forward(n_out, n_in, kernel, stride, padding, dilation)
    return int(start[-1])


@njit(cache=config.CACHE)
def _rowconv_counted(xq, wt, bias, groups, dstart, dtap, dsrc, hstart, htap, hsrc, tap_off,
                     W, sw, pw, dw, out):
    """The direct forward's loop nest without register blocking, one output channel at a time.

    Same iteration space as ``fastconv.cpu.conv._rowconv`` for the forward pass (one segment holding all
    KW taps, row length OW). Returns (executed multiplications, multiplications on in-range input).
    """
    N, K, OD, OH, OW = out.shape
    Cg = wt.shape[1]
    KW = wt.shape[4]
    Kg = K // groups
    executed = 0
    in_range = 0
    acc = np.empty(OW, dtype=out.dtype)
    for n in range(N):
        for co in range(K):
            g = co // Kg
            for a in range(OD):
                for b in range(OH):
                    acc[:] = 0
                    for cs in range(Cg):
                        csrc = g * Cg + cs
                        for pd_ in range(dstart[a], dstart[a + 1]):
                            kd = dtap[pd_]
                            for ph_ in range(hstart[b], hstart[b + 1]):
                                kh = htap[ph_]
                                srow = xq[n, csrc, dsrc[pd_], hsrc[ph_]]
                                for kw in range(KW):
                                    wv = wt[co, cs, kd, kh, kw]
                                    off = tap_off[kw]
                                    for m in range(OW):
                                        acc[m] += wv * srow[off + m]
                                        executed += 1
                                        iw = m * sw - pw + kw * dw
                                        if iw >= 0 and iw < W:
                                            in_range += 1
                    for m in range(OW):
                        out[n, co, a, b, m] = acc[m] + bias[co]
    return executed, in_range


def direct_forward_counted(x, w, bias, stride, padding, dilation, groups, out_spatial):
    """Direct convolution forward that also counts its multiplications.

    x: (N, C, D, H, W); w: (K, C // groups, KD, KH, KW); bias: (K,) or None; 3-tuples as in
    :func:`fastconv.cpu.conv.direct_forward`.
    Returns ``(y, executed, in_range)``: y (N, K, *out_spatial) and the two tallies (ints) described in the
    module docstring. Slow (no blocking, one thread): meant for tests and small shapes.
    """
    x = np.ascontiguousarray(x)
    w = np.ascontiguousarray(w)
    stride, padding, dilation, out_spatial = map(_tup, (stride, padding, dilation, out_spatial))
    N, C, D, H, W = x.shape
    K, Cg, KD, KH, KW = w.shape
    OD, OH, OW = out_spatial
    y = np.empty((N, K) + out_spatial, x.dtype)
    if y.size == 0:
        return y, 0, 0
    b = np.zeros(K, x.dtype) if bias is None else np.ascontiguousarray(np.asarray(bias, x.dtype))
    xq, _, offs = _phase_split(x, KW, stride[2], padding[2], dilation[2], OW)
    dt = _pairs_forward(OD, D, KD, stride[0], padding[0], dilation[0])
    ht = _pairs_forward(OH, H, KH, stride[1], padding[1], dilation[1])
    executed, in_range = _rowconv_counted(xq, w, b, int(groups), *dt, *ht, offs, W, stride[2], padding[2],
                                          dilation[2], y)
    return y, int(executed), int(in_range)
