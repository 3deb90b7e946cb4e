"""Tasks claimed one at a time from a shared counter inside a Numba parallel region (dynamic scheduling).

Why: Numba's ``prange`` hands each thread a fixed, equal share of the iterations (its OpenMP layer runs a static
``omp for``). When another process takes one of the cores, the thread that shares that core gets half of it and
the whole region waits for its share: a kernel runs twice as long although the other thread sits idle after
half the time. Here a region runs one ``prange`` iteration per thread, and each thread takes the next task from
a counter (an atomic add), so a thread slowed by a neighbour simply takes fewer tasks.

Use::

    counter = task_queue.counter()            # outside the kernel: np.zeros(1, np.int64)
    for worker in prange(workers):            # inside: one iteration per thread
        while True:
            t = task_queue.claim(counter)      # 0, 1, 2, ... across all threads
            if t >= tasks:
                break
            ...                                # task t, with the worker's own scratch buffers

A counter serves one region call; a fresh one (or one reset to zero) for the next.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["counter", "claim"]


def counter() -> np.ndarray:
    """A task counter for one region call: one int64, zero."""
    return np.zeros(1, np.int64)


@intrinsic
def claim(typingctx, counter_array):
    """``counter_array[0]`` before adding one to it, atomically (LLVM ``atomicrmw add``, sequentially
    consistent): every call in a region returns another number, 0, 1, 2, ... (int64)."""
    if not (isinstance(counter_array, types.Array) and counter_array.dtype == types.int64):
        return None
    sig = types.int64(counter_array)

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, signature.args[0], array,
                                           [context.get_constant(types.intp, 0)])
        return builder.atomic_rmw("add", pointer, ir.Constant(ir.IntType(64), 1), "seq_cst")

    return sig, codegen
