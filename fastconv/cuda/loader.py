"""Kernel sources and compiled modules, memoised per (target, device, family).

The run-time compile options are :data:`OPTIONS`; ``tests/test_cuda_compile.py`` compiles every
kernel file through NVRTC with exactly these, and the CMake build with nvcc for every arch.
"""
from __future__ import annotations

import functools
import threading
from pathlib import Path

#: The ``kernels/*.cu`` folder shipped inside the package (``fastconv/kernels``).
KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"
#: Kernel families: one ``kernels/<family>.cu`` each.
FAMILIES = ("conv", "pool")
#: NVRTC options at run time (the CPU harness accepts the same and ignores the GPU-only ones).
#: No fast-math: max pooling and NaN propagation must match torch bit for bit.
OPTIONS = ("--std=c++17", "-I" + str(KERNEL_DIR))

_lock = threading.Lock()


def source(family: str) -> str:
    """The CUDA C++ text of ``kernels/<family>.cu``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}; expected one of {', '.join(FAMILIES)}")
    path = KERNEL_DIR / f"{family}.cu"
    if not path.is_file():
        raise FileNotFoundError(f"fastconv: CUDA kernel source {path} is missing (broken install?)")
    return path.read_text()


def import_cupy():
    """CuPy, or an ImportError that says how to get it."""
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("fastconv: CUDA tensors need CuPy to run fastconv's CUDA kernels; install it with "
                          "`pip install fastconv[cuda]`") from e
    return cupy


@functools.lru_cache(maxsize=None)
def _cupy_module(device_id: int, family: str, options: tuple):
    cupy = import_cupy()
    with cupy.cuda.Device(device_id):
        mod = cupy.RawModule(code=source(family), options=options)
        mod.compile()
    return mod


@functools.lru_cache(maxsize=None)
def _emu_module(family: str, options: tuple):
    from .. import emu

    return emu.RawModule(code=source(family), options=options)


def module(target: str, family: str, device_id: int = 0):
    """The compiled module of ``family`` for ``target`` ("cuda" on ``device_id``, or "cuda-emu")."""
    with _lock:
        if target == "cuda":
            return _cupy_module(device_id, family, OPTIONS)
        if target == "cuda-emu":
            return _emu_module(family, OPTIONS)
    raise ValueError(f"fastconv.cuda: unknown target {target!r}")


@functools.lru_cache(maxsize=None)
def _function(target: str, family: str, name: str, device_id: int):
    return module(target, family, device_id).get_function(name)


def function(target: str, family: str, name: str, device_id: int = 0):
    """One kernel, memoised."""
    return _function(target, family, name, device_id)


def clear() -> None:
    """Forget the compiled modules (tests that edit kernel sources)."""
    for f in (_cupy_module, _emu_module, _function):
        f.cache_clear()
