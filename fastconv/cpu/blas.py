"""The GEMMs of the CPU kernels, run by torch's BLAS on torch's thread pool.

Why not ``np.matmul``: numpy (and scipy) bring their own OpenBLAS, with a thread pool of its own that
follows neither ``torch.set_num_threads`` nor torch's OpenMP pool. In a converted model the process then
holds torch's OpenMP threads, Numba's TBB workers and one or two OpenBLAS pools on the same cores; each
pool's threads spin for a while after their work, so the next pool's work waits for cores that are busy
doing nothing. Measured on two cores: torch's own ops (batch norm, ReLU, adds) inside a converted model
ran several times slower than in the same model on torch alone. Running the GEMMs through ``torch.matmul``
on zero-copy views of the numpy buffers puts them on the pool torch's ops use (MKL/oneDNN over OpenMP),
so a converted model has one BLAS runtime, governed by ``torch.set_num_threads``.

Where fastconv's own GEMM kernels are in use (:func:`.jit_gemm.own_gemm_in_use`: CPUs with 512-bit vectors,
where MKL runs AVX2 code on AMD's), float32 and float64 products run on them instead, on Numba's threads
(:mod:`.parallel_gemm`).

``FASTCONV_GEMM=numpy`` (read once, at import) switches back to ``np.matmul`` for comparison.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from . import jit_gemm, parallel_gemm

LIBRARIES = ("torch", "numpy")

# torch's GEMM functions, bound once at import. Tools that count a model's work by patching torch's namespace
# (ptflops wraps torch.matmul, torch.mm, torch.bmm while it counts) would otherwise count the GEMMs inside
# fastconv's kernels on top of the module hooks that already count each convolution (a converted 5x5 conv
# came out at twice its multiply-adds).
torch_matmul = torch.matmul
torch_mm = torch.mm


def _library_from_env() -> str:
    value = os.environ.get("FASTCONV_GEMM", "").strip().lower() or "torch"
    if value not in LIBRARIES:
        warnings.warn(f"fastconv: FASTCONV_GEMM={value!r} is not one of {', '.join(LIBRARIES)}; using 'torch'",
                      RuntimeWarning, stacklevel=2)
        return "torch"
    return value


#: "torch" (default) or "numpy": which library runs the kernels' GEMMs.
GEMM_LIBRARY = _library_from_env()


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A zero-copy tensor view of ``a`` (a copy only where torch cannot view it: negative strides,
    read-only memory)."""
    if a.flags.writeable and all(s >= 0 for s in a.strides):
        return torch.from_numpy(a)
    return torch.from_numpy(np.array(a))


def _torch_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``a @ b`` for 2-D or stacked 3-D float arrays (any strides), written into ``out`` when given."""
    ta, tb = _tensor(a), _tensor(b)
    if out is None:
        return torch_matmul(ta, tb).numpy()
    to = torch.from_numpy(out)
    if to.is_contiguous():
        torch_matmul(ta, tb, out=to)
    else:  # torch would resize/replace a non-contiguous out; compute, then copy into the view
        to.copy_(torch_matmul(ta, tb))
    return out


def _numpy_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return np.matmul(a, b) if out is None else np.matmul(a, b, out=out)


def _torch_matmul_add(a: np.ndarray, b: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """``acc += a @ b`` in place (2-D, or stacked 3-D with ``acc`` contiguous): the GEMM's own accumulation
    (beta = 1), no temporary result."""
    ta, tb, tacc = _tensor(a), _tensor(b), torch.from_numpy(acc)
    if tacc.dim() == 2:
        tacc.addmm_(ta, tb)
    else:
        tacc.baddbmm_(ta, tb)
    return acc


def _numpy_matmul_add(a: np.ndarray, b: np.ndarray, acc: np.ndarray) -> np.ndarray:
    acc += np.matmul(a, b)
    return acc


_OWN_DTYPES = (np.float32, np.float64)


def _own_result(a: np.ndarray, b: np.ndarray, out: np.ndarray | None) -> np.ndarray | None:
    """Where the own kernels take ``a @ b``: the array it is written into (``out``, or a new one); else None."""
    if not (GEMM_LIBRARY == "torch" and jit_gemm.own_gemm_in_use()):
        return None
    if (a.dtype != b.dtype or a.dtype.type not in _OWN_DTYPES or a.ndim not in (2, 3) or b.ndim not in (2, 3)
            or a.shape[-1] != b.shape[-2]):
        return None
    stack = a.shape[0] if a.ndim == 3 else b.shape[0] if b.ndim == 3 else None
    if a.ndim == 3 and b.ndim == 3 and a.shape[0] != b.shape[0]:
        return None
    shape = (a.shape[-2], b.shape[-1]) if stack is None else (stack, a.shape[-2], b.shape[-1])
    if out is None:
        return np.empty(shape, a.dtype)
    if out.shape != shape or out.dtype != a.dtype or (out.strides[-1] != out.itemsize and shape[-1] > 1):
        return None
    return out


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``a @ b`` for 2-D or stacked 3-D float arrays (any strides), written into ``out`` when given: the GEMM
    every CPU kernel calls (see the module docstring)."""
    result = _own_result(a, b, out)
    if result is not None:
        return parallel_gemm.matmul(a, b, result)
    return _torch_matmul(a, b, out) if GEMM_LIBRARY == "torch" else _numpy_matmul(a, b, out)


def matmul_add(a: np.ndarray, b: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """``acc += a @ b`` in place (2-D, or stacked 3-D with ``acc`` contiguous); see :func:`matmul`."""
    if _own_result(a, b, acc) is not None:
        return parallel_gemm.matmul(a, b, acc, accumulate=True)
    return _torch_matmul_add(a, b, acc) if GEMM_LIBRARY == "torch" else _numpy_matmul_add(a, b, acc)
