"""Launch helpers shared by the GPU and the CPU harness.

:class:`Launcher` is made for the tensor an op runs on. It hands out kernels, converts tensors to
kernel arguments (``cupy.from_dlpack`` on the GPU, zero-copy; the CPU tensor itself in the harness)
and launches on torch's current CUDA stream (a ``cupy.cuda.ExternalStream`` around it), so a
kernel never runs on the default stream while torch works on another. Scalars are always numpy
scalars of the kernel parameter's exact type (:func:`i32`, :func:`i64`, :func:`scalar`): a Python
float would reach the kernel as a double.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from .. import backends
from . import loader

BLOCK = 256             #: threads per block (FC_BLOCK / IG_THREADS in kernels/common.cuh)
MAX_GRID_X = 2**31 - 1  #: CUDA's grid limits
MAX_GRID_YZ = 65535
INT32_MAX = 2**31 - 1


def i32(v) -> np.int32:
    v = int(v)
    if not -2**31 <= v < 2**31:
        raise OverflowError(f"fastconv.cuda: {v} does not fit a 32-bit kernel argument")
    return np.int32(v)


def i64(v) -> np.int64:
    return np.int64(int(v))


def suffix(dtype: torch.dtype) -> str:
    """Kernel name suffix for a dtype (``_f32`` / ``_f64``)."""
    try:
        return {torch.float32: "_f32", torch.float64: "_f64"}[dtype]
    except KeyError:
        raise TypeError(f"fastconv CUDA kernels support float32 and float64, not {dtype}") from None


def plane_grid(planes: int, plane: int) -> tuple[int, int]:
    """Grid of the FC_PLANE_LOOP kernels: x covers one plane, y strides over the planes."""
    return (max(1, min(-(-plane // BLOCK), MAX_GRID_X)), max(1, min(planes, MAX_GRID_YZ)))


def flat_grid(count: int) -> tuple[int]:
    return (max(1, min(-(-count // BLOCK), MAX_GRID_X)),)


class Launcher:
    """Kernels and launches for tensors living where ``like`` lives."""

    def __init__(self, like: torch.Tensor):
        self.target = backends.target_for(like)
        if self.target not in ("cuda", "cuda-emu"):
            raise RuntimeError(f"fastconv.cuda: target {self.target!r} is not a CUDA target")
        self.device = like.device
        self.device_id = like.device.index if like.device.type == "cuda" else 0
        self._cupy = loader.import_cupy() if self.target == "cuda" else None
        if self._cupy is not None:
            if self.device_id is None:
                self.device_id = torch.cuda.current_device()
            ptr = torch.cuda.current_stream(like.device).cuda_stream
            self.stream = self._cupy.cuda.ExternalStream(ptr, self.device_id)
        else:
            self.stream = None

    @contextlib.contextmanager
    def _context(self):
        if self._cupy is None:
            yield
        else:
            with self._cupy.cuda.Device(self.device_id), self.stream:
                yield

    def empty(self, shape, dtype) -> torch.Tensor:
        """An output buffer allocated by torch on the op's device (its caching allocator)."""
        return torch.empty(tuple(int(s) for s in shape), dtype=dtype, device=self.device)

    def zeros(self, shape, dtype) -> torch.Tensor:
        return torch.zeros(tuple(int(s) for s in shape), dtype=dtype, device=self.device)

    def _arg(self, a):
        if isinstance(a, torch.Tensor):
            if not a.is_contiguous():
                raise ValueError("fastconv.cuda: kernel arguments must be contiguous tensors")
            if self._cupy is None:
                return a.detach()
            return self._cupy.from_dlpack(a.detach())
        if isinstance(a, np.generic):
            return a
        raise TypeError(f"fastconv.cuda: kernel argument of type {type(a).__name__}; pass a tensor or a "
                        f"numpy scalar (numpy.int32/int64/float32/float64)")

    def launch(self, family: str, name: str, grid, block, args, shared_mem: int = 0) -> None:
        fn = loader.function(self.target, family, name, self.device_id)
        with self._context():
            kernel_args = tuple(self._arg(a) for a in args)
            if self._cupy is None:
                fn(tuple(grid), tuple(block), kernel_args, shared_mem=shared_mem)
            else:
                fn(tuple(grid), tuple(block), kernel_args, shared_mem=shared_mem, stream=self.stream)
