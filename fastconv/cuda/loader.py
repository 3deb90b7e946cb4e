"""Kernel sources and compiled modules, memoised per (target, device, family).

What runs is what is checked. :func:`options` is the one option list of every build: the GPU
(NVRTC, called here directly), the CPU harness (``fastconv.emu``), and the compile test
(``tests/test_cuda_compile.py``, with exactly these options).

* NVRTC is driven directly (``cupy_backends.cuda.libs.nvrtc``) rather than through
  ``cupy.RawModule(code=...)``: CuPy appends ``-ftz=true`` after the caller's options (the last one
  wins), which flushes float32 subnormals to zero, so a max pooling window of subnormals would
  compare them as equal zeros and pick another index than torch (which does not flush). We pass
  ``-ftz=false`` and keep IEEE division and square root.
* Kernels are ``__global__`` function templates launched by name expression
  (``"max_pool_forward<float>"``, as with ``cupy.RawModule(name_expressions=...)``): each
  ``kernels/<family>.cu`` lists its instantiations as ``FC_INSTANTIATE(<expression>)`` lines
  (:func:`name_expressions` reads them), which nvcc compiles as explicit instantiations; NVRTC gets
  them as name expressions (``nvrtcAddNameExpression``) and the lowered (mangled) name of each is
  kept beside the cached image; the harness gets them as ``name_expressions`` too. ``extern "C"``
  kernels (the tensor-core conv) are still found by their plain names.
* CuPy's disk cache keys on the ``.cu`` text and options only, not on the included ``common.cuh``;
  ours keys on every file in ``kernels/`` (:func:`source_hash`), which is also passed to the
  compiler as ``-DFASTCONV_SRC_HASH=...`` so the harness's cache (keyed on the source text and
  options) sees a changed header too.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
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


_INSTANTIATE = re.compile(r"^\s*FC_INSTANTIATE\((.+)\)\s*$", re.M)


@functools.lru_cache(maxsize=None)
def _name_expressions(kernel_dir: str, family: str) -> tuple:
    return tuple(e.strip() for e in _INSTANTIATE.findall(source(family)))


def name_expressions(family: str) -> tuple:
    """The template instantiations ``kernels/<family>.cu`` lists (``FC_INSTANTIATE(...)`` lines), as the
    name expressions every build instantiates and ``get_function`` accepts (``"max_pool_forward<float>"``)."""
    return _name_expressions(str(KERNEL_DIR), family)


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
def nvrtc_compile(src: str, name: str, opts: tuple, arch: str, expressions=()) -> tuple[bytes, str, dict]:
    """Compile ``src`` with NVRTC: (image, kind, lowered), kind "cubin" for ``arch`` = "sm_XX" or "ptx"
    for "compute_XX", ``lowered`` the mangled symbol of each name expression in ``expressions``.
    Raises RuntimeError with the compiler log on failure."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(src, name, [], [])
    try:
        for expr in expressions:
            nvrtc.addNameExpression(prog, expr)
        try:
            nvrtc.compileProgram(prog, [*opts, f"--gpu-architecture={arch}"])
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"fastconv: NVRTC failed on {name} for {arch}: {e}\n"
                               f"{nvrtc.getProgramLog(prog)}") from e
        lowered = {expr: nvrtc.getLoweredName(prog, expr) for expr in expressions}
        lowered = {k: v.decode() if isinstance(v, bytes) else v for k, v in lowered.items()}
        if arch.startswith("sm_"):
            return bytes(nvrtc.getCUBIN(prog)), "cubin", lowered
        ptx = nvrtc.getPTX(prog)
        return (ptx if isinstance(ptx, bytes) else ptx.encode()), "ptx", lowered
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


def _image(family: str, opts: tuple, cc: str) -> tuple[bytes, dict]:
    """The compiled module for compute capability ``cc`` ("90"): cubin when this NVRTC knows the
    arch, else PTX for the newest arch it knows (the driver JIT-compiles it); and the lowered name of
    each of the family's name expressions (kept in ``<key>.names.json`` beside the image)."""
    from cupy_backends.cuda.libs import nvrtc

    archs = sorted(int(a) for a in nvrtc.getSupportedArchs()) if hasattr(nvrtc, "getSupportedArchs") else []
    arch = f"sm_{cc}" if not archs or int(cc) in archs else f"compute_{max(a for a in archs if a <= int(cc))}"
    key = cache_key(family, opts, arch)
    path, names = _cache_dir() / f"{key}.bin", _cache_dir() / f"{key}.names.json"
    expressions = name_expressions(family)
    try:
        lowered = json.loads(names.read_text())
        if isinstance(lowered, dict) and set(lowered) == set(expressions):
            return path.read_bytes(), lowered
    except (OSError, ValueError):
        pass
    image, _, lowered = nvrtc_compile(source(family), f"{family}.cu", opts, arch, expressions)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for target, data in ((path, image), (names, json.dumps(lowered).encode())):  # names last: its
            tmp = target.with_suffix(f".{os.getpid()}.tmp")                         # presence says done
            tmp.write_bytes(data)
            os.replace(tmp, target)
    except OSError:  # a read-only home: compile every time, still correct
        pass
    return image, lowered


class _NamedModule:
    """A loaded module whose ``get_function`` takes a name expression (``"max_pool_forward<float>"``,
    looked up by its lowered name, as ``cupy.RawModule(name_expressions=...)`` does) or a plain
    ``extern "C"`` name."""

    def __init__(self, module, lowered: dict):
        self.module, self.lowered = module, lowered

    def get_function(self, name: str):
        if "<" in name and name not in self.lowered:
            raise KeyError(f"fastconv.cuda: kernel {name!r} was not instantiated: it is not among the "
                           f"FC_INSTANTIATE(...) name expressions of its kernel file "
                           f"({', '.join(self.lowered) or 'none'})")
        return self.module.get_function(self.lowered.get(name, name))


@functools.lru_cache(maxsize=None)
def _cupy_module(device_id: int, family: str, opts: tuple):
    cupy = import_cupy()
    with cupy.cuda.Device(device_id) as dev:
        mod = cupy.cuda.function.Module()
        image, lowered = _image(family, opts, dev.compute_capability)
        mod.load(image)
    return _NamedModule(mod, lowered)


@functools.lru_cache(maxsize=None)
def _emu_module(family: str, opts: tuple):
    from .. import emu

    return emu.RawModule(code=source(family), options=opts, name_expressions=name_expressions(family))


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
    for f in (_cupy_module, _emu_module, _function, _source_hash, _name_expressions):
        f.cache_clear()
