"""Kernel sources and compiled modules, memoised per (target, device, family).

What runs is what is checked. :func:`options` is the one option list of every build: the GPU
(NVRTC, called here directly), the CPU harness (``fastconv.emu``), and the compile test
(``tests/test_cuda_compile.py``, with exactly these options).

* NVRTC is driven directly (``cupy_backends.cuda.libs.nvrtc``) rather than through
  ``cupy.RawModule(code=...)``: CuPy appends ``-ftz=true`` after the caller's options (the last one
  wins), which flushes float32 subnormals to zero, so a max pooling window of subnormals would
  compare them as equal zeros and pick another index than torch (which does not flush). We pass
  ``-ftz=false`` and keep IEEE division and square root.
* CuPy's disk cache keys on the ``.cu`` text and options only, not on the included ``common.cuh``;
  ours keys on every file in ``kernels/`` (:func:`source_hash`), which is also passed to the
  compiler as ``-DFASTCONV_SRC_HASH=...`` so the harness's cache (keyed on the source text and
  options) sees a changed header too.
"""
from __future__ import annotations

import functools
import hashlib
import os
import threading
from pathlib import Path

from .. import config

#: The ``kernels/*.cu`` folder shipped inside the package (``fastconv/kernels``).
KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"
#: Kernel families: one ``kernels/<family>.cu`` each.
FAMILIES = ("conv", "pool", "conv_tc")
#: NVRTC options at run time, before the source hash (the CPU harness accepts the same and ignores
#: the GPU-only ones). No fast math and no flushing of subnormals: max pooling, its indices and NaN
#: propagation must match torch bit for bit.
BASE_OPTIONS = ("--std=c++17", "-ftz=false", "-prec-div=true", "-prec-sqrt=true")

_lock = threading.RLock()


def source(family: str) -> str:
    """The CUDA C++ text of ``kernels/<family>.cu``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}; expected one of {', '.join(FAMILIES)}")
    path = KERNEL_DIR / f"{family}.cu"
    if not path.is_file():
        raise FileNotFoundError(f"fastconv: CUDA kernel source {path} is missing (broken install?)")
    return path.read_text()


@functools.lru_cache(maxsize=None)
def _source_hash(kernel_dir: str) -> str:
    h = hashlib.sha256()
    for path in sorted(Path(kernel_dir).glob("*")):
        if path.suffix in (".cu", ".cuh", ".h"):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def source_hash() -> str:
    """Hash of every kernel source and header in :data:`KERNEL_DIR` (read once per process)."""
    return _source_hash(str(KERNEL_DIR))


def options() -> tuple:
    """The compile options of every build (GPU, harness, compile test)."""
    return (*BASE_OPTIONS, "-I" + str(KERNEL_DIR), f"-DFASTCONV_SRC_HASH=0x{source_hash()}")


def import_cupy():
    """CuPy, or an ImportError that says how to get it."""
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("fastconv: CUDA tensors need CuPy to run fastconv's CUDA kernels; install it with "
                          "`pip install fastconv[cuda]`") from e
    return cupy


# --------------------------------------------------------------------------------------------- NVRTC
def nvrtc_compile(src: str, name: str, opts: tuple, arch: str) -> tuple[bytes, str]:
    """Compile ``src`` with NVRTC: (image, kind), kind "cubin" for ``arch`` = "sm_XX" or "ptx" for
    "compute_XX". Raises RuntimeError with the compiler log on failure."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(src, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [*opts, f"--gpu-architecture={arch}"])
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"fastconv: NVRTC failed on {name} for {arch}: {e}\n"
                               f"{nvrtc.getProgramLog(prog)}") from e
        if arch.startswith("sm_"):
            return bytes(nvrtc.getCUBIN(prog)), "cubin"
        ptx = nvrtc.getPTX(prog)
        return (ptx if isinstance(ptx, bytes) else ptx.encode()), "ptx"
    finally:
        nvrtc.destroyProgram(prog)


def cache_key(family: str, opts: tuple, arch: str) -> str:
    """Disk-cache key of one compiled module: every kernel file, the options, NVRTC's version, arch."""
    from cupy_backends.cuda.libs import nvrtc

    text = "\0".join((family, source_hash(), *opts, arch, repr(nvrtc.getVersion())))
    return hashlib.sha256(text.encode()).hexdigest()


def _cache_dir() -> Path:
    """Compiled modules: the ``cubin`` folder of fastconv's cache (:func:`fastconv.config.cache_folder`)."""
    return config.cache_folder("cubin")


def _image(family: str, opts: tuple, cc: str) -> bytes:
    """The compiled module for compute capability ``cc`` ("90"): cubin when this NVRTC knows the
    arch, else PTX for the newest arch it knows (the driver JIT-compiles it)."""
    from cupy_backends.cuda.libs import nvrtc

    archs = sorted(int(a) for a in nvrtc.getSupportedArchs()) if hasattr(nvrtc, "getSupportedArchs") else []
    arch = f"sm_{cc}" if not archs or int(cc) in archs else f"compute_{max(a for a in archs if a <= int(cc))}"
    key = cache_key(family, opts, arch)
    path = _cache_dir() / f"{key}.bin"
    try:
        return path.read_bytes()
    except OSError:
        pass
    image, _ = nvrtc_compile(source(family), f"{family}.cu", opts, arch)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(image)
        os.replace(tmp, path)
    except OSError:  # a read-only home: compile every time, still correct
        pass
    return image


@functools.lru_cache(maxsize=None)
def _cupy_module(device_id: int, family: str, opts: tuple):
    cupy = import_cupy()
    with cupy.cuda.Device(device_id) as dev:
        mod = cupy.cuda.function.Module()
        mod.load(_image(family, opts, dev.compute_capability))
    return mod


@functools.lru_cache(maxsize=None)
def _emu_module(family: str, opts: tuple):
    from .. import emu

    return emu.RawModule(code=source(family), options=opts)


def module(target: str, family: str, device_id: int = 0):
    """The compiled module of ``family`` for ``target`` ("cuda" on ``device_id``, or "cuda-emu")."""
    with _lock:
        if target == "cuda":
            return _cupy_module(device_id, family, options())
        if target == "cuda-emu":
            return _emu_module(family, options())
    raise ValueError(f"fastconv.cuda: unknown target {target!r}")


@functools.lru_cache(maxsize=None)
def _function(target: str, family: str, name: str, device_id: int):
    if target == "cuda":  # load the module into the tensor's device's context, not the current one
        with import_cupy().cuda.Device(device_id):
            return module(target, family, device_id).get_function(name)
    return module(target, family, device_id).get_function(name)


def function(target: str, family: str, name: str, device_id: int = 0):
    """One kernel, memoised per (target, family, name, device)."""
    return _function(target, family, name, device_id)


def clear() -> None:
    """Forget the compiled modules and the source hash (tests that edit kernel sources)."""
    for f in (_cupy_module, _emu_module, _function, _source_hash):
        f.cache_clear()
