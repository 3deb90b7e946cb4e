"""Transposed convolution with kernel == stride, no padding, dilation 1: one GEMM plus a scatter.

With kernel == stride the output windows of neighbouring inputs do not overlap (U-Net's 2x2/stride-2
up-convolution, patch "unembedding"), so every output element receives exactly one product sum:

    y[n, co, i*k + a] = sum_ci x[n, ci, i] * w[ci, co, a]      (per spatial dim, per group)

That is the GEMM ``Z = W^T X`` with W^T of shape (C_out/groups * prod(k), C_in/groups) and X of shape
(C_in/groups, prod(I)) per image, followed by a pure permutation of Z into y (no accumulation, unlike
the col2im of the generic input-gradient kernels, which adds overlapping windows). The GEMM runs in
BLAS through numpy; the permutation is a parallel Numba kernel. ``output_padding`` positions (beyond
I*k) are reached by no window and are zero.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import prange

from . import memory, parallel

from fastconv import config

from ..spec import ConvGeometry
from . import blas

_JIT = dict(cache=config.CACHE, fastmath=set(config.FASTMATH), nogil=True)


@parallel.kernel(work_arg=0, compute=False, **_JIT)
def _scatter_patches(z, bias, fill, out):
    """Permute the GEMM result into the upsampled image and add the bias on the way.

    z: (C, KD, KH, KW, N, ID, IH, IW); bias: (C,); out: (N, C, OD, OH, OW) with O >= I*K.
    ``out[n, c, id*KD + a, ih*KH + b, iw*KW + e] = z[c, a, b, e, n, id, ih, iw] + bias[c]``; when
    ``fill`` is set, the positions beyond I*K (output_padding: no window reaches them) get ``bias[c]``.
    """
    C, KD, KH, KW, N, ID, IH, IW = z.shape
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        bc = bias[c]
        if fill:
            out[n, c] = bc
        for a in range(KD):
            for i_d in range(ID):
                for b in range(KH):
                    for ih in range(IH):
                        row = out[n, c, i_d * KD + a, ih * KH + b]
                        # One unit-stride pass over each of the KW source rows; the writes of the KW
                        # passes interleave within the same output row, which stays in L1.
                        for e in range(KW):
                            src = z[c, a, b, e, n, i_d, ih]
                            for iw in range(IW):
                                row[iw * KW + e] = src[iw] + bc


@config.parallel_entry
def forward(x: torch.Tensor, w: torch.Tensor, bias, geom: ConvGeometry) -> torch.Tensor:
    """Transposed conv forward for kernel == stride, padding 0, dilation 1.

    x: (N, C_in, ID, IH, IW) contiguous; w: (C_in, C_out/groups, KD, KH, KW) contiguous; bias: (C_out,)
    or None; ``geom`` is the adjoint convolution's geometry (``in_spatial`` = the transposed conv's
    output size O, ``out_spatial`` = its input size I, ``in_channels`` = C_out, ``out_channels`` = C_in).
    Returns y: (N, C_out, OD, OH, OW), freshly allocated, bias included.
    """
    config.sync_threads()
    xn = x.detach().numpy()
    wn = w.detach().numpy()
    N, C_in = xn.shape[:2]
    ID, IH, IW = xn.shape[2:]
    _, C_out_g, KD, KH, KW = wn.shape
    G = geom.groups
    C_in_g = C_in // G
    C_out = C_out_g * G
    OD, OH, OW = geom.in_spatial
    kp = KD * KH * KW
    P = ID * IH * IW
    b = np.zeros(C_out, xn.dtype) if bias is None else np.ascontiguousarray(bias.detach().numpy())
    y = memory.empty_aligned((N, C_out, OD, OH, OW), xn.dtype)
    if y.size == 0:
        return torch.from_numpy(y)
    if xn.size == 0 or C_in_g == 0:
        y[...] = b.reshape(1, C_out, 1, 1, 1)
        return torch.from_numpy(y)
    # One GEMM per group over the whole batch, (C_out_g*kp, C_in_g) @ (C_in_g, N*P): a wider GEMM
    # than one per image, measured faster through BLAS than numpy's broadcast (batched) matmul.
    # The input is small next to the output (1/kp of it per channel), so its transposed copy is cheap.
    x4 = xn.reshape(N, G, C_in_g, P)
    xt = x4[0] if N == 1 else np.ascontiguousarray(x4.transpose(1, 2, 0, 3))  # (G, C_in_g, N, P)
    wt = wn.reshape(G, C_in_g, C_out_g * kp).transpose(0, 2, 1)  # (G, C_out_g*kp, C_in_g), a view
    z = np.empty((G, C_out_g * kp, N * P), xn.dtype)
    for g in range(G):
        blas.matmul(wt[g], xt[g].reshape(C_in_g, N * P), out=z[g])
    covered = (OD, OH, OW) == (ID * KD, IH * KH, IW * KW)
    _scatter_patches(z.reshape(C_out, KD, KH, KW, N, ID, IH, IW), b, not covered, y)
    return torch.from_numpy(y)
