"""Launch helpers shared by the GPU and the CPU harness.

:class:`Launcher` is made for the tensor an op runs on. It hands out kernels, converts tensors to
kernel arguments (the raw device pointer on the GPU, zero-copy; the CPU tensor itself in the harness)
and launches on torch's current CUDA stream (a ``cupy.cuda.ExternalStream`` around it), so a
kernel never runs on the default stream while torch works on another. Scalars are always numpy
scalars of the kernel parameter's exact type (:func:`i32`, :func:`i64`, :func:`scalar`): a Python
float would reach the kernel as a double.
"""
from __future__ import annotations

import numpy as np
import torch

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


#: The element type a kernel template is instantiated for, per torch dtype (kernels/common.cuh).
CTYPES = {torch.float32: "float", torch.float64: "double", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}


def instance(stem: str, dtype: torch.dtype, *more: str) -> str:
    """The name expression of a kernel template: ``instance("max_pool_forward", torch.float32)`` is
    ``"max_pool_forward<float>"``; ``more`` are further template arguments (``"true"``). It must be
    listed by an ``FC_INSTANTIATE`` line of the kernel file (else the lookup raises KeyError)."""
    try:
        ctype = CTYPES[dtype]
    except KeyError:
        raise TypeError(f"fastconv CUDA kernels support {', '.join(str(d).replace('torch.', '') for d in CTYPES)}, "
                        f"not {dtype}") from None
    return f"{stem}<{', '.join((ctype, *more))}>"


def plane_grid(planes: int, plane: int) -> tuple[int, int]:
    """Grid of the FC_PLANE_LOOP kernels (kernels/common.cuh ``FcPlaneWalk``), mapping work, not planes.

    A plane of at least BLOCK / 2 positions: x covers one plane, y strides over the planes. A
    smaller one (7x7 maps, the 1x1 output of global pooling): one block holds BLOCK // plane whole
    planes and y strides over those groups, so a block is not left with a handful of busy threads.
    """
    if 2 * plane <= BLOCK:
        per_block = BLOCK // max(plane, 1)
        return (1, max(1, min(-(-planes // per_block), MAX_GRID_YZ)))
    return (max(1, min(-(-plane // BLOCK), MAX_GRID_X)), max(1, min(planes, MAX_GRID_YZ)))


def flat_grid(count: int) -> tuple[int]:
    return (max(1, min(-(-count // BLOCK), MAX_GRID_X)),)


_streams: dict = {}


def _external_stream(cupy, ptr: int, device_id: int):
    """A CuPy view of torch's stream ``ptr``, made once per (stream, device)."""
    key = (ptr, device_id)
    stream = _streams.get(key)
    if stream is None:
        stream = _streams[key] = cupy.cuda.ExternalStream(ptr, device_id)
    return stream


class Launcher:
    """Kernels and launches for tensors living where ``like`` lives.

    Host overhead matters on a GPU (a small layer's kernel runs for microseconds), so a launch does
    no more than: look the kernel up (memoised), check each tensor argument is contiguous and on
    the right device, and call. On the GPU a tensor goes to the kernel as its raw device pointer
    (an 8-byte ``numpy.uint64``, zero-copy like DLPack and without building an array object); the
    harness needs the tensor itself (it maps each argument between guard pages).
    """

    __slots__ = ("target", "device", "device_id", "_cupy", "stream")

    def __init__(self, like: torch.Tensor):
        device = like.device
        self.device = device
        if device.type == "cuda":
            self.target = "cuda"
            self._cupy = loader.import_cupy()
            self.device_id = device.index if device.index is not None else torch.cuda.current_device()
            self.stream = _external_stream(self._cupy, torch.cuda.current_stream(self.device_id).cuda_stream,
                                           self.device_id)
        elif device.type == "cpu":
            # A CPU tensor reaches a CUDA kernel only when dispatch chose a "cuda-emu" implementation
            # (the backend switch lives above this layer): it runs on the CPU execution harness.
            self.target = "cuda-emu"
            self.device_id, self._cupy, self.stream = 0, None, None
        else:
            raise RuntimeError(f"fastconv.cuda: device {device} is not a CUDA device or the CPU harness")

    def empty(self, shape, dtype) -> torch.Tensor:
        """An output buffer allocated by torch on the op's device (its caching allocator)."""
        return torch.empty(shape, dtype=dtype, device=self.device)

    def zeros(self, shape, dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def full(self, shape, value, dtype) -> torch.Tensor:
        return torch.full(shape, value, dtype=dtype, device=self.device)

    def _bad_arg(self, a):
        if isinstance(a, torch.Tensor):
            if a.device != self.device:
                return ValueError(f"fastconv.cuda: kernel argument on {a.device}, expected {self.device}")
            return ValueError("fastconv.cuda: kernel arguments must be contiguous tensors")
        return TypeError(f"fastconv.cuda: kernel argument of type {type(a).__name__}; pass a tensor or a "
                         f"numpy scalar (numpy.int32/int64/float32/float64)")

    def launch(self, family: str, name: str, grid: tuple, block: tuple, tensors, scalars=(),
               shared_mem: int = 0) -> None:
        """Launch ``name`` from ``kernels/<family>.cu`` with arguments ``(*tensors, *scalars)``.

        ``tensors``: contiguous tensors on this launcher's device (checked). ``scalars``: numpy
        scalars of the parameters' exact types, as made by :func:`i32` / :func:`i64` (not checked
        here, to keep the launch cheap; the harness refuses any other type, so the tests catch it).
        """
        fn = loader.function(self.target, family, name, self.device_id)
        if self._cupy is None:
            for a in tensors:
                if not a.is_contiguous() or a.device.type != "cpu":
                    raise self._bad_arg(a)
            fn(grid, block, (*(a.detach() for a in tensors), *scalars), shared_mem=shared_mem)
            return
        device = self.device
        ptrs = []
        for a in tensors:
            if not a.is_contiguous() or a.device != device:
                raise self._bad_arg(a)
            ptrs.append(np.uint64(a.data_ptr()))
        with self._cupy.cuda.Device(self.device_id):  # the tensor's GPU, not the current one
            fn(grid, block, (*ptrs, *scalars), shared_mem=shared_mem, stream=self.stream)
