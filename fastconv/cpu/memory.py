"""Memory for the kernels: zero-filled arrays zeroed by writing rather than by ``calloc`` (:func:`zeros`), and
workspaces reused between calls (:func:`scratch`).

Why: ``np.zeros`` asks ``calloc`` for memory, and for a large array (above glibc's mmap threshold, or heap memory
the allocator has just returned to the system) ``calloc`` hands back untouched pages it knows are zero without
writing them. A kernel that then *adds* into them (a pooling gradient's scatter-add, col2im, a weight gradient's
accumulators) touches each page first with a read, which maps the shared zero page, and then with a write,
which faults again to give the page its own frame: two faults per page, on a VM each costing host work as well.
Measured in a converted ResNet-18's training step (2 threads, batch 8, 128x128), the max-pool gradient's
scatter-add into an 8 MB ``np.zeros`` array: 0.3-0.6 ms when the memory came back from the heap, 9-19 ms
(960-4000 faults) on the steps where it came fresh, every few steps; with :func:`zeros` (``np.empty`` then a
sequential fill) the worst call seen was 1.6 ms (515 faults, all taken by the fill), the scatter-add 0.3-0.9 ms.
torch zeroes its results the same way (``empty`` + ``zero_``).
"""
from __future__ import annotations

import math
import threading

import numpy as np

__all__ = ["zeros", "empty_aligned", "scratch", "clear_scratch", "SCRATCH_KEEP_BYTES", "ALIGN_BYTES"]


def zeros(shape, dtype) -> np.ndarray:
    """A C-contiguous zero array of ``shape`` and ``dtype``, every page written once before it is returned (see
    the module docstring). Use it for arrays a kernel reads before it writes them; ``np.empty`` stays right for
    arrays every element of which is stored before it is read."""
    out = empty_aligned(shape, dtype)
    out.fill(0)
    return out


#: Scratch buffers larger than this are not kept between calls (see :func:`scratch`).
SCRATCH_KEEP_BYTES = 64 << 20

_SCRATCH = threading.local()


def scratch(role: str, shape, dtype) -> np.ndarray:
    """An uninitialised ``shape`` array for the workspace ``role``, reused from this thread's last call.

    Why: a fresh multi-megabyte ``np.empty`` comes from new pages, and the first touch of each page faults:
    measured 2.3 ms for the two 2.9 MB Winograd tile buffers of a 128-channel 16x16 layer at batch 8 (the whole
    forward takes about 4), 0.01 ms on reused memory; the gather input gradient's flipped weights and their packed
    panels (1.8 MB each, GoogLeNet's 160 -> 320 3x3) took 1.0 and 0.56 ms of a 4.6 ms call in a loop of such
    calls, 0.13 ms for both on reused memory. One buffer per role and Python thread (so concurrent callers never
    share), grown as needed; one above :data:`SCRATCH_KEEP_BYTES` is not kept. Never returned to the caller:
    outputs are always fresh arrays, and a role is used by one function, which holds it only during its call.
    """
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize  # (np.prod costs 7 µs a call: more than the rest of this function)
    pool = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = {}
    buf = pool.get(role)
    if buf is None or buf.size < n:
        buf = empty_aligned(max(n, 1), np.uint8)
        if n <= SCRATCH_KEEP_BYTES:
            pool[role] = buf
    return buf[:n].view(dtype).reshape(shape)


#: The alignment of :func:`empty_aligned` and :func:`scratch`: one AVX-512 vector, one cache line.
ALIGN_BYTES = 64


def empty_aligned(shape, dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` whose first element starts a cache line (:data:`ALIGN_BYTES`).

    Why: numpy's allocations start 16 or 32 bytes into a line (malloc's alignment), so every 64-byte vector
    load or store of a kernel's packed panels, tiles and per-tap rows straddled two lines and cost two. Measured
    on the 2-core Intel Xeon (AVX-512), one core, :func:`.micro_gemm.gemm_gather` with its packed operand and
    result aligned / 16 bytes off: 218 / 191 GFLOP/s (AlexNet's 64 -> 192 5x5), 208 / 182 (192 -> 384 3x3),
    194 / 171 (DenseNet's 128 -> 32 3x3 at 32x32)."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) if isinstance(shape, (tuple, list)) else int(shape)
    raw = np.empty(n * dtype.itemsize + ALIGN_BYTES, np.uint8)
    skip = -raw.ctypes.data % ALIGN_BYTES
    return raw[skip:skip + n * dtype.itemsize].view(dtype).reshape(shape)


def clear_scratch() -> None:
    """Drop this thread's scratch buffers (their memory goes back once no array views it): the next calls allocate
    afresh, as a new thread's would (tests count a call's workspace that way)."""
    _SCRATCH.pool = {}
