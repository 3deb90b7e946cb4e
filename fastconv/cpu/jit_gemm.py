"""A GEMM that Numba kernels call from inside their parallel loops: fastconv's own, else torch's MKL.

Why: Winograd's fused kernels (:mod:`.winograd`) run each chunk's transforms and its ``a*a`` small GEMMs on
one thread, inside a ``prange`` task, so the transformed tiles stay in that core's cache. Numba's own
``np.dot`` there calls scipy's OpenBLAS; torch's MKL does the same single-threaded GEMMs in 0.35-0.5x the
time (measured, 2 threads, the 36 GEMMs of F(4x4,3x3) on ResNet-18's 3x3 layers at batch 8: 64 channels x
576 tiles 1.63 -> 0.57 ms, 128 x 160 1.47 -> 0.62 ms, 256 x 48 1.34 -> 1.02 ms), as fast as torch's own
multi-threaded batched GEMM over the whole stack.

How: the CPU builds of torch link MKL into ``libtorch_cpu`` and export its Fortran ``sgemm_``/``dgemm_`` and
``MKL_Set_Num_Threads_Local``. Their addresses are registered with LLVM under fastconv's own symbol names
(``llvmlite.binding.add_symbol``), and the kernels declare those names as external functions: the compiled
code refers to a name, not an address, so Numba's on-disk cache stays valid across processes, each process
linking the name to what it registered at import. Where torch has no MKL (other platforms and builds), the
same names are bound to scipy's OpenBLAS GEMMs (the ones ``np.dot`` would call, same Fortran interface) and
to a no-op thread setter; callers then keep scipy's BLAS on one thread themselves (see
``winograd._SingleThreadedBlas``). :data:`SOURCE` says which (``None``: neither was found, and nothing here
may be called).

Every call sets MKL's thread count for the calling thread to 1 and restores it: the caller is already one
of several parallel tasks, and MKL would otherwise start a team of its own threads inside each.

Where the CPU has 512-bit vectors, the products run on :mod:`.micro_gemm`, fastconv's own register-tiled
kernels, instead: MKL runs its AVX2 code on AMD CPUs, and the own kernels do the same products in 0.45-0.65x
its time there (one thread; the forwards' ``w @ columns``, Winograd's ``U @ V``, the weight gradients'
``gy @ columns^T``; numbers in :mod:`.micro_gemm`). On AVX2 hosts (FMA, 256-bit vectors) too, with a tile
sized for them: there MKL and the own kernels run the same vector code, and the own kernels win by reading
a conv's operands in place (docs/performance-log.md, run AK).
Not on Intel CPUs with 512-bit vectors where the library is torch's MKL (:func:`_mkl_runs_512_bit`): there MKL
runs its own AVX-512 code, and it was the faster of the two (docs/performance-log.md, run BO; a 2-core Xeon with AVX-512, one
thread, GFLOP/s own / MKL: (256, 2304, 392) 159 / 182-199, (192, 1600, 1800) 121-126 / 171-175, (512, 512, 512)
170-172 / 179-181, transposed (128, 8192, 1152) 130-132 / 169; converted torchvision models with the whole route
switched, same process, MKL / own time: training steps at batch 8 0.91-1.06, geomean 0.97, inference at batch 8
0.81-1.00, geomean 0.92). Small dense convs still take the own kernels that read their input in place there
(:data:`.im2col_fused.SMALL_ON_OWN`): their column fills cost more than MKL's faster GEMM saves.
:func:`use_own_gemm` switches the route at run time (a flag in memory that the compiled code reads, so cached
kernels follow it); ``FASTCONV_JIT_GEMM=mkl`` or ``scipy`` start with it off, ``own`` with it on wherever the own
kernels can run (an Intel CPU with AVX-512 included).
"""
from __future__ import annotations

import ctypes
import os
import warnings

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from fastconv import config

from . import micro_gemm

__all__ = ["SOURCE", "gemm", "use_own_gemm", "own_gemm_in_use", "default_own_gemm", "mkl_by_default"]

_SYMBOLS = ("fastconv_jit_sgemm", "fastconv_jit_dgemm", "fastconv_jit_blas_threads_local")


def _torch_mkl() -> tuple | None:
    """Addresses of MKL's sgemm_, dgemm_ and its thread-local thread setter in torch's CPU library."""
    import torch

    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        path = os.path.join(lib_dir, name)
        if not os.path.exists(path):
            continue
        try:
            lib = ctypes.CDLL(path)
            # MKL_Set_Num_Threads_Local takes its int by value; the lower-case mkl_set_num_threads_local is
            # the Fortran entry (a pointer) in these builds, and calling it with a value crashes
            funcs = (lib.sgemm_, lib.dgemm_, lib.MKL_Set_Num_Threads_Local)
        except (OSError, AttributeError):
            return None
        return tuple(ctypes.cast(f, ctypes.c_void_p).value for f in funcs)
    return None


def _scipy_blas() -> tuple | None:
    """Addresses of scipy's OpenBLAS sgemm and dgemm (Fortran interface) and of a harmless int(int) function."""
    try:
        from scipy.linalg import cython_blas
    except ImportError:
        return None
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    capsules = cython_blas.__pyx_capi__
    try:
        gemms = tuple(get_pointer(capsules[n], get_name(capsules[n])) for n in ("sgemm", "dgemm"))
        no_op = ctypes.cast(ctypes.CDLL(None).abs, ctypes.c_void_p).value  # abs(1) is 1: changes nothing
    except (KeyError, OSError, AttributeError):
        return None
    return gemms + (no_op,)


#: ``FASTCONV_JIT_GEMM`` (read once, at import): "auto" (default: the own kernels where the CPU has 512-bit
#: vectors or AVX2 with FMA, except on Intel CPUs with 512-bit vectors when torch's MKL is there; the library for
#: the rest: torch's MKL, else scipy's BLAS), "own" (the own kernels wherever they can run), "mkl" or "scipy"
#: (that library for everything; the tests run the scipy fallback this way).
CHOICES = ("auto", "own", "mkl", "scipy")


def _wanted_from_env() -> str:
    wanted = os.environ.get("FASTCONV_JIT_GEMM", "").strip().lower() or "auto"
    if wanted not in CHOICES:
        warnings.warn(f"fastconv: FASTCONV_JIT_GEMM={wanted!r} is not one of {', '.join(CHOICES)}; using 'auto'",
                      RuntimeWarning, stacklevel=2)
        return "auto"
    return wanted


def _bind(wanted: str) -> str | None:
    for source, find in (("mkl", _torch_mkl), ("scipy", _scipy_blas)):
        if wanted not in ("auto", "own", source):
            continue
        addresses = find()
        if addresses and all(addresses):
            for symbol, address in zip(_SYMBOLS, addresses):
                llvm.add_symbol(symbol, address)
            return source
    return None


#: Which library the kernels' GEMMs run on: "mkl" (torch's), "scipy" (its OpenBLAS) or None (neither found).
_WANTED = _wanted_from_env()
SOURCE = _bind(_WANTED)

_P = types.intp  # every Fortran argument is a pointer
_sgemm = types.ExternalFunction(_SYMBOLS[0], types.void(*([_P] * 13)))
_dgemm = types.ExternalFunction(_SYMBOLS[1], types.void(*([_P] * 13)))
_threads_local = types.ExternalFunction(_SYMBOLS[2], types.int32(types.int32))

_N, _T = ord("N"), ord("T")

# The own-kernel switch: an int32 in this process's memory that the compiled kernels read through a symbol
# name (like the library functions above), so Numba's cached machine code follows a switch made at run time.
_OWN_GEMM_SYMBOL = "fastconv_jit_own_gemm"
_own_gemm_flag = ctypes.c_int32(0)
llvm.add_symbol(_OWN_GEMM_SYMBOL, ctypes.addressof(_own_gemm_flag))


def use_own_gemm(enabled: bool) -> bool:
    """Route the kernels' GEMMs (and the 1x1 paths' products, :mod:`.pointwise`) to :mod:`.micro_gemm` (True) or
    to the library (False); returns the previous setting. Meant for tests and A/B measurements; the default is set at import."""
    previous = bool(_own_gemm_flag.value)
    _own_gemm_flag.value = 1 if enabled else 0
    return previous


def own_gemm_in_use() -> bool:
    """Whether the kernels' GEMMs run on fastconv's own kernels now."""
    return bool(_own_gemm_flag.value)


def _cpu_vendor() -> str:
    """The CPU's vendor as the kernel reports it ("GenuineIntel", "AuthenticAMD", ...); "" where unknown."""
    return config.cpuinfo_field("vendor_id")


def _mkl_runs_512_bit() -> bool:
    """Whether the library GEMM is torch's MKL on an Intel CPU with 512-bit vectors, where MKL takes its AVX-512
    code path (on AMD CPUs it takes its AVX2 one, which is why the own kernels exist)."""
    return SOURCE == "mkl" and micro_gemm.HOST_HAS_AVX512 and _cpu_vendor() == "GenuineIntel"


def mkl_by_default(wanted: str = _WANTED) -> bool:
    """Whether this host's kernels' GEMMs run on MKL because it was found the faster here (an Intel CPU with
    512-bit vectors, ``FASTCONV_JIT_GEMM`` unset or "auto"), not because the library was asked for."""
    return wanted == "auto" and micro_gemm.HOST_HAS_VECTOR_FMA and _mkl_runs_512_bit()


def default_own_gemm(wanted: str = _WANTED) -> bool:
    """The route :data:`FASTCONV_JIT_GEMM <CHOICES>` and this host give at import: own kernels (True) or library."""
    if not micro_gemm.HOST_HAS_VECTOR_FMA:
        return False
    return wanted == "own" or (wanted == "auto" and not _mkl_runs_512_bit())


use_own_gemm(default_own_gemm())


@intrinsic
def _own_gemm_enabled(typingctx):
    """The switch's current value (a load of the flag, at every call)."""
    def codegen(context, builder, signature, args):
        module = builder.module
        flag = module.globals.get(_OWN_GEMM_SYMBOL)
        if flag is None:
            flag = ir.GlobalVariable(module, ir.IntType(32), _OWN_GEMM_SYMBOL)
            flag.linkage = "external"
        return builder.icmp_signed("!=", builder.load(flag), ir.Constant(ir.IntType(32), 0))

    return types.boolean(), codegen


@njit(cache=config.CACHE, nogil=True)
def gemm(a, b, c, beta, b_transposed):
    """``c = a @ b + beta * c`` on one thread, ``b`` read as ``b.T`` when ``b_transposed``.

    a: (m, k); b: (k, n), or (n, k) when ``b_transposed``; c: (m, n); all C-contiguous, one float dtype
    (float32 or float64). ``beta`` 0 overwrites ``c`` (whatever it held), 1 accumulates into it.
    """
    m, k = a.shape
    n = c.shape[1]
    if not (a.flags.c_contiguous and b.flags.c_contiguous and c.flags.c_contiguous):
        raise ValueError("jit_gemm.gemm: operands must be C-contiguous")
    if m == 0 or n == 0:
        return
    if _own_gemm_enabled():
        micro_gemm.gemm(a, b, c, beta, b_transposed)
        return
    # Row-major c = a @ b is column-major c^T = b^T @ a^T: the operands swap, nothing is copied.
    dims = np.empty(6, np.int32)
    dims[0] = n
    dims[1] = m
    dims[2] = k
    dims[3] = max(k, 1) if b_transposed else n  # ldb (BLAS wants leading dimensions >= 1, also for k = 0)
    dims[4] = max(k, 1)  # lda
    dims[5] = n  # ldc
    ops = np.empty(2, np.uint8)
    ops[0] = _T if b_transposed else _N
    ops[1] = _N
    scal = np.empty(2, c.dtype)
    scal[0] = 1
    scal[1] = beta
    d = dims.ctypes.data
    args = (ops.ctypes.data, ops.ctypes.data + 1, d, d + 4, d + 8, scal.ctypes.data, b.ctypes.data, d + 12,
            a.ctypes.data, d + 16, scal.ctypes.data + c.itemsize, c.ctypes.data, d + 20)
    previous = _threads_local(1)
    if c.itemsize == 4:
        _sgemm(*args)
    else:
        _dgemm(*args)
    _threads_local(previous)
