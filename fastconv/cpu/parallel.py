"""Parallel Numba kernels that run on the calling thread when their work is small.

A ``prange`` kernel wakes Numba's worker threads (OpenMP or TBB) on every call. For a small layer's padding,
im2col or col2im copy that costs more than it saves, and on a shared machine it costs far more: the call waits until a
worker gets a core, and the workers then spin on the cores that torch's OpenMP threads want for the GEMM and the
torch ops that follow. Measured on the 2-core dev machine with other work running (load 6-7), ResNet-18's 3x3
layers at batch 1 (im2col of 64x32x32 to 8x8x256 inputs), 200 interleaved calls each: median 11-17 ms with the
parallel copies against 0.76-1.13 ms with serial ones, and the BatchNorm + ReLU after them 1.3-1.8x slower
(0.16-0.23 ms against 0.10-0.18 ms). That was on TBB; on Numba's OpenMP layer (the default now) the depthwise
threshold below is lower. torch does the same for its own kernels (``at::parallel_for``'s grain size).

:func:`kernel` compiles a ``prange`` kernel twice, parallel and serial (``prange`` runs as ``range``), and picks
one per call by the size of one argument (the array the kernel writes or reads once).
"""
from __future__ import annotations

import os
import types

from numba import njit

from fastconv import config

__all__ = ["kernel", "PARALLEL_MIN_ELEMENTS", "COMPUTE_PARALLEL_MIN_ELEMENTS", "POOL_PARALLEL_MIN_ELEMENTS"]

#: Fewest elements of work for which a copy kernel wakes the worker threads. 2M float32 (8 MB) is several
#: hundred microseconds of copying on one core, enough to pay for the wake-up; ResNet-18 at batch 1 stays below
#: it (its largest column buffer is 0.6M elements), batch 8 goes above. 128K was tried on the OpenMP layer:
#: converted models on a quiet machine ran 0-5% faster (batch 1 ResNet-18 18.1 against 19.1 ms, EfficientNet-B0
#: 17.2 / 17.9; batch 8 ResNet-18 74.0 / 75.9), within the rounds' spread; with a busy process on one of the
#: two cores, the whole-model benchmark (ResNet-18, MobileNet-v2, VGG-11) found fastconv slowed more than torch
#: in 6 and 3 of 9 (model, mode) pairs in two runs at 128K (by up to 2.8x), 4 of 9 at 2M (by up to 1.25x).
#: The gain being within the noise and the risk not, copies stay serial up to 2M.
PARALLEL_MIN_ELEMENTS = 1 << 21
#: The same for kernels that do arithmetic per element (the depthwise convs: a multiply-add per tap, 9 or 25):
#: 16K elements of a 3x3 depthwise layer are 150K multiply-adds. At 256K (the TBB-era value) every depthwise
#: layer of a batch-1 MobileNet ran on one thread: EfficientNet-B0's took 1.4-1.8x the time serially (its
#: 240-channel 16x16 5x5 layer 422 against 276 µs), and the converted models at batch 1 ran 5-7% faster
#: at 16K (EfficientNet-B0 27.8 -> 26.0 ms, MobileNet-v2 18.7 -> 17.6, ConvNeXt-tiny 46.5 -> 44.4).
COMPUTE_PARALLEL_MIN_ELEMENTS = 1 << 14
#: The same for the pooling kernels, whose per-plane work (window compares, index tracking) pays for the
#: wake-up early: measured on a quiet machine, 2 threads, GoogLeNet's 3x3 max pools with indices at batch 1
#: ran 2.3-3.2x faster parallel than serial from 832 planes of 4x4 (13K elements) up to 192 of 16x16.
POOL_PARALLEL_MIN_ELEMENTS = 1 << 12


def _renamed(py_func, suffix: str):
    """A copy of ``py_func`` under another name: Numba's on-disk cache is keyed by the qualified name, and the
    serial and parallel compilations of one function must not share (and overwrite) an entry."""
    copy = types.FunctionType(py_func.__code__, py_func.__globals__, py_func.__name__ + suffix,
                              py_func.__defaults__, py_func.__closure__)
    copy.__qualname__ = py_func.__qualname__ + suffix
    copy.__module__ = py_func.__module__
    copy.__doc__ = py_func.__doc__
    return copy


#: True in a process forked from one whose parallel kernels run on GNU OpenMP (Numba's ``omp`` layer, see
#: :mod:`fastconv.config`): OpenMP's thread pool does not survive ``fork``, and Numba ends such a child at its
#: first parallel launch. There every kernel runs its serial compilation (forked DataLoader workers, the usual
#: case, run one thread each anyway: torch sets that for its own ops in them).
SERIAL_ONLY = False


def _forked() -> None:
    global SERIAL_ONLY
    SERIAL_ONLY = True


# every layer that may be GNU OpenMP ("omp", or a generic request Numba may answer with it); TBB and workqueue
# children keep their parallel kernels
if config.THREADING["layer"] not in ("tbb", "safe", "workqueue", "forksafe") and hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


class SizedKernel:
    """A kernel compiled parallel and serial; calls go to one or the other by ``args[work_arg].size``
    (``threshold`` None: always parallel), and to the serial one in a forked child (:data:`SERIAL_ONLY`)."""

    def __init__(self, py_func, work_arg: int, threshold: str, jit_options: dict):
        self.py_func = py_func
        self.work_arg = work_arg
        self.threshold = threshold
        self.parallel = njit(parallel=True, **jit_options)(py_func)
        self.serial = njit(**jit_options)(_renamed(py_func, "__serial"))
        self.__doc__ = py_func.__doc__
        self.__name__ = py_func.__name__

    def __call__(self, *args):
        if SERIAL_ONLY:
            return self.serial(*args)
        if self.threshold is None:
            return self.parallel(*args)
        big = args[self.work_arg].size >= globals()[self.threshold]  # looked up per call: tests lower it
        return (self.parallel if big else self.serial)(*args)


def kernel(work_arg: int = -1, compute: bool = False, pool: bool = False, always: bool = False, **jit_options):
    """Decorator: ``@kernel(work_arg=i, **njit_options)`` on a ``prange`` kernel (see the module docstring).

    ``work_arg``: the position of the array argument whose size measures the call's work (default the last,
    usually the array written). ``compute``: the kernel does arithmetic per element, so it goes parallel from
    :data:`COMPUTE_PARALLEL_MIN_ELEMENTS` on; ``pool``: a pooling kernel, parallel from
    :data:`POOL_PARALLEL_MIN_ELEMENTS`; copies from :data:`PARALLEL_MIN_ELEMENTS`; ``always``: parallel
    whatever the size (its callers decide; only a forked child runs it serially)."""
    threshold = (None if always else "POOL_PARALLEL_MIN_ELEMENTS" if pool else
                 "COMPUTE_PARALLEL_MIN_ELEMENTS" if compute else "PARALLEL_MIN_ELEMENTS")

    def decorate(py_func) -> SizedKernel:
        return SizedKernel(py_func, work_arg, threshold, jit_options)

    return decorate
