"""Zero-filled arrays that kernels accumulate into, zeroed by writing rather than by ``calloc``.

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

import numpy as np

__all__ = ["zeros"]


def zeros(shape, dtype) -> np.ndarray:
    """A C-contiguous zero array of ``shape`` and ``dtype``, every page written once before it is returned (see
    the module docstring). Use it for arrays a kernel reads before it writes them; ``np.empty`` stays right for
    arrays every element of which is stored before it is read."""
    out = np.empty(shape, dtype)
    out.fill(0)
    return out
