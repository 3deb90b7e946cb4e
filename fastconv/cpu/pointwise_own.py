"""The 1x1 convs' per-image GEMMs on fastconv's own micro-kernel, all images in one parallel region.

Why: :mod:`.pointwise` runs ``y[n] = w @ x[n]`` (and the input gradient's ``w^T @ gy[n]``) through ``torch.mm`` /
``torch.matmul``, which is MKL; on AMD CPUs MKL runs 8-wide AVX2 code where the cores have 512-bit FMA units.
:func:`.micro_gemm.gemm` computes the same products at up to twice the rate (see its numbers), so where it is in
use (:func:`.jit_gemm.own_gemm_in_use`) these products go through it: one Numba region whose tasks are (image,
block of pixels) pairs, each a single-threaded GEMM writing its own block of the result, the bias added while
the block is in cache.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from fastconv import config

from . import micro_gemm, parallel

__all__ = ["batch_gemm", "PARALLEL_MIN_MACS", "MIN_BLOCK_COLUMNS"]

_JIT = dict(cache=config.CACHE, nogil=True)

#: Fewest multiply-adds for which the region wakes the worker threads (below, the calling thread does it all).
PARALLEL_MIN_MACS = 1_000_000
#: Fewest pixels per block when an image's pixels are split between tasks (a multiple of the micro-kernel's
#: float32 tile width, so only the last block has a narrow edge).
MIN_BLOCK_COLUMNS = 64


@parallel.kernel(always=True, **_JIT)
def _region(a, b3, bias, out, blocks, block_columns):
    """``out[n, :, j0:j1] = a @ b3[n, :, j0:j1] (+ bias[:, None])`` for every image ``n`` and block ``j0:j1`` of
    ``block_columns`` pixels (the last one shorter), a task per (image, block)."""
    N, _, P = b3.shape
    M = a.shape[0]
    for t in prange(N * blocks):
        n = t // blocks
        j0 = (t - n * blocks) * block_columns
        j1 = min(P, j0 + block_columns)
        if j0 >= j1:
            continue
        o = out[n, :, j0:j1]
        micro_gemm.gemm(a, b3[n, :, j0:j1], o, 0.0, False)
        if bias.size:
            for m in range(M):
                bm = bias[m]
                for j in range(j1 - j0):
                    o[m, j] += bm


def batch_gemm(a: np.ndarray, b3: np.ndarray, bias: np.ndarray | None, out: np.ndarray) -> np.ndarray:
    """``out[n] = a @ b3[n] (+ bias[:, None])`` for every image, written into ``out``, which is returned.

    a: (M, R), any strides (the input gradient passes ``w.T``); b3: (N, R, P) with adjacent pixels (columns);
    bias: (M,) or None; out: (N, M, P) C-contiguous; one dtype, float32 or float64.
    """
    N, R, P = b3.shape
    M = a.shape[0]
    parallel_ = N * M * R * P >= PARALLEL_MIN_MACS and not parallel.SERIAL_ONLY
    tasks = numba.get_num_threads() if parallel_ else 1
    # enough blocks per image that the tasks are a multiple of the threads (an idle thread otherwise waits for the
    # last image), none narrower than MIN_BLOCK_COLUMNS
    blocks = max(1, min(tasks // math.gcd(N, tasks), P // MIN_BLOCK_COLUMNS))
    block_columns = -(-P // blocks)
    if blocks > 1:
        block_columns = -(-block_columns // 16) * 16
    b = np.empty(0, out.dtype) if bias is None else np.ascontiguousarray(bias, out.dtype)
    kernel = _region.parallel if parallel_ else _region.serial
    kernel(a, b3, b, out, blocks, block_columns)
    return out
