"""Matrix products on fastconv's own GEMM kernels, split into tasks of one Numba parallel region.

Why: the CPU paths' whole-array products (the 1x1 convs' per-image GEMMs in :mod:`.pointwise`, the plain
im2col path's ``w @ columns`` and its gradients, the transposed convs', Winograd's unfused ones; all through
:mod:`.blas`) ran on torch's MKL, which on AMD CPUs runs 8-wide AVX2 code where the cores have 512-bit FMA
units. :mod:`.micro_gemm` computes the same products at up to twice the rate on one thread; here they run on
all of Numba's threads: each task takes one block of rows and columns of one product of a stack, a
single-threaded GEMM on views of the operands, and adds the bias while its block is in cache. Measured, 2
threads, float32, 1x1 convs' forwards (own / ``torch.mm`` time): ResNet-50's 64 -> 256 at 32x32 batch 8 0.22,
256 -> 64 0.46, 512 -> 128 at 16x16 0.45, 1024 -> 256 at 8x8 0.41, DenseNet's 704 -> 128 at 8x8 0.43,
MobileNet-v2's 144 -> 24 at 32x32 0.49; batch 1: 256 -> 64 0.44, 512 -> 128 0.61.

Used where :func:`.jit_gemm.own_gemm_in_use` says so (CPUs with 512-bit vectors).
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from fastconv import config

from . import micro_gemm, parallel, task_queue

__all__ = ["matmul", "PARALLEL_MIN_MACS", "MIN_BLOCK_COLUMNS", "MIN_BLOCK_ROWS", "TASKS_PER_THREAD"]

_JIT = dict(cache=config.CACHE, nogil=True)

#: Fewest multiply-adds for which the region wakes the worker threads (below, the calling thread does it all).
PARALLEL_MIN_MACS = 1_000_000
#: Fewest columns and rows of a block when a product is split between tasks (multiples of the micro-kernel's
#: tile, so only the last block has a narrow edge).
MIN_BLOCK_COLUMNS = 64
MIN_BLOCK_ROWS = 32
#: Tasks per thread a parallel product is cut into (where the minimum blocks allow), claimed one at a time
#: (:mod:`.task_queue`): a thread that shares its core with another process takes fewer of them.
TASKS_PER_THREAD = 8


@parallel.kernel(always=True, **_JIT)
def _region(a3, b3, c3, bias, accumulate, summed, row_blocks, col_blocks, block_rows, block_columns, workers,
            claimed):
    """``c3[s][rows, cols] (+)= a3[s][rows] @ b3[s][:, cols] (+ bias[rows, None])`` for every product ``s`` of the
    stack (``a3`` or ``b3`` with one entry: shared by all) and block, one task per (product, block); with
    ``summed``, ``c3[0][rows, cols] (+)= sum over s`` instead, one task per block adding the stack's products.
    ``workers`` threads claim the tasks from the counter ``claimed`` (:mod:`.task_queue`)."""
    S = max(a3.shape[0], b3.shape[0])
    blocks = row_blocks * col_blocks
    # (the task count is computed before the loop: a conditional expression inside prange's argument keeps
    # Numba from making the loop parallel at all)
    products = S
    if summed:
        products = 1
    tasks = products * blocks
    for _ in prange(workers):
        while True:
            t = task_queue.claim(claimed)
            if t >= tasks:
                break
            _task(a3, b3, c3, bias, accumulate, summed, S, col_blocks, block_rows, block_columns, blocks, t)


@numba.njit(inline="always", **_JIT)
def _task(a3, b3, c3, bias, accumulate, summed, S, col_blocks, block_rows, block_columns, blocks, t):
    """Task ``t`` of :func:`_region`: one block of one product (or of the stack's sum)."""
    M, N = c3.shape[1], c3.shape[2]
    s0 = t // blocks
    r = (t - s0 * blocks) // col_blocks
    q = t - s0 * blocks - r * col_blocks
    i0 = r * block_rows
    i1 = min(M, i0 + block_rows)
    j0 = q * block_columns
    j1 = min(N, j0 + block_columns)
    if i0 >= i1 or j0 >= j1:
        return
    c = c3[s0, i0:i1, j0:j1]
    for s in range(s0, S if summed else s0 + 1):
        a = a3[s if a3.shape[0] > 1 else 0, i0:i1]
        b = b3[s if b3.shape[0] > 1 else 0, :, j0:j1]
        beta = 1.0 if accumulate or s > s0 else 0.0
        if b.strides[1] != b.itemsize and b.strides[0] == b.itemsize:
            micro_gemm.gemm(a, b.T, c, beta, True)  # a transposed operand: its rows run along the reduction
        else:
            micro_gemm.gemm(a, b, c, beta, False)
    if bias.size:
        for i in range(i1 - i0):
            bi = bias[i0 + i]
            for j in range(j1 - j0):
                c[i, j] += bi


def _blocks(S: int, M: int, N: int, tasks: int) -> tuple[int, int]:
    """(row blocks, column blocks) per product: enough that the stack has ``tasks`` tasks or a multiple of them
    (an idle thread otherwise waits for the last product), none smaller than the minimum block."""
    wanted = tasks // math.gcd(S, tasks)
    col_blocks = max(1, min(wanted, N // MIN_BLOCK_COLUMNS))
    row_blocks = max(1, min(wanted // col_blocks, M // MIN_BLOCK_ROWS))
    return row_blocks, col_blocks


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray, *, bias: np.ndarray | None = None,
           accumulate: bool = False, summed: bool = False) -> np.ndarray:
    """``out = a @ b (+ bias[:, None])``, or ``out += a @ b`` with ``accumulate``; ``out`` is returned.

    a: (M, K) or (S, M, K); b: (K, N) or (S, K, N) (a 2-D operand is shared by the stack); out: (M, N) or
    (S, M, N), its columns adjacent in memory; a and b any strides (a transposed view of a contiguous array is
    read as such); bias: (M,) or None; one dtype, float32 or float64. ``summed``: ``out`` (M, N) receives the
    sum of the stack's products (a weight gradient's sum over images), each task adding them up for its block.
    """
    c3 = out if out.ndim == 3 else out[None]
    a3 = a if a.ndim == 3 else a[None]
    b3 = b if b.ndim == 3 else b[None]
    S = max(a3.shape[0], b3.shape[0])
    M, N = c3.shape[1], c3.shape[2]
    K = a3.shape[2]
    parallel_ = S * M * N * K >= PARALLEL_MIN_MACS and not parallel.SERIAL_ONLY
    workers = numba.get_num_threads() if parallel_ else 1
    row_blocks, col_blocks = _blocks(1 if summed else S, M, N, workers * TASKS_PER_THREAD if parallel_ else 1)
    block_rows = -(-M // row_blocks)
    block_columns = -(-N // col_blocks)
    if row_blocks > 1:
        # whole tiles of either height where blocks are large; small ones stay even (64 rows: 32 + 32, not 48 + 16)
        grain = micro_gemm.ROW_GRAIN if block_rows >= 2 * micro_gemm.ROW_GRAIN else micro_gemm.MR
        block_rows = -(-block_rows // grain) * grain
    if col_blocks > 1:
        block_columns = -(-block_columns // 16) * 16
    bias_array = np.empty(0, out.dtype) if bias is None else np.ascontiguousarray(bias, out.dtype)
    kernel = _region.parallel if parallel_ else _region.serial
    kernel(a3, b3, c3, bias_array, accumulate, summed, row_blocks, col_blocks, block_rows, block_columns, workers,
           task_queue.counter())
    return out
