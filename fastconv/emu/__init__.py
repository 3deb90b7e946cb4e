"""Run fastconv's CUDA C++ kernels on the CPU, for tests (DESIGN.md section 7).

The front end mimics the part of CuPy that fastconv's launch code uses, so the same code drives
the GPU and this harness::

    mod = RawModule(code=src, options=("-DTILE=16", "--std=c++17"))
    fn = mod.get_function("matmul")
    fn((gx, gy), (16, 16), (a, b, c, np.int32(n)), shared_mem=nbytes)

The kernel source is compiled by g++ together with ``cuda_emu.h`` (the device API), ``emu_runtime.h``
(fiber scheduler) and ``emu_tc.h`` (tensor cores, ldmatrix, cp.async), plus one generated ``extern "C"``
launch trampoline per kernel (``emu_launch_<i>``, i the entry's index): per ``extern "C"`` kernel and
per name expression (``"max_pool_forward<float>"``, as given to ``RawModule(name_expressions=...)``;
taking the expression's address there instantiates the template, so ``get_function`` with the same
text works as with CuPy and NVRTC; an expression that was not given is a :class:`KeyError`), into a shared library cached under ``$FASTCONV_EMU_CACHE`` (default
``~/.cache/fastconv/emu``; see :mod:`fastconv.emu.cache` for why concurrent builders are safe).

Architecture: ``-arch=sm_XX`` in the options (else ``$FASTCONV_EMU_ARCH``, else sm_80) sets
``__CUDA_ARCH__`` and the opt-in dynamic shared-memory limit (:data:`MAX_SHARED_OPTIN`: 163 KiB on
sm_80, 227 KiB on sm_90). Tensor cores and async copies are reached through ``kernels/tc.cuh``
(inline PTX on a GPU): ``mma.sync`` m16n8k8 tf32 and m16n8k16 f16/bf16 with float32 accumulation
and ``ldmatrix`` x1/x2/x4 (``.trans``) are warp-collective, with the PTX ISA fragment layouts;
``cp.async`` copies are deferred to ``cp.async.wait_group`` and their destination reads as NaN
until then. ``<cuda_fp16.h>``/``<cuda_bf16.h>`` give ``__half``/``__nv_bfloat16`` (round to nearest
even). The numerics and the one assumption that needs a GPU are written down in ``emu_tc.h`` and
``tests/emu_kernels/tc_probe.cu``.

Strictness, i.e. what a GPU would show and the harness reports:

* threads of a block run as fibers in a seeded shuffled order between barriers (``set_seed``, or
  ``$FASTCONV_EMU_SEED``), blocks in a shuffled order too, so a missing ``__syncthreads()`` gives
  wrong results; a warp op (shuffle, ballot, mma, ldmatrix) releases its own warp as soon as its
  lanes arrive, so it is no block barrier and hides no missing ``__syncthreads()``;
* shared memory (static and dynamic) is filled with 0xFF bytes (NaN as float) before each block;
* every array argument is copied into its own mapping whose end touches a PROT_NONE page (another
  page guards the front); an out-of-bounds access raises :class:`OutOfBoundsError` naming the
  argument. The few bytes between the 16-byte-aligned start and the page, or after the data when
  its size is not a multiple of 16, are filled with garbage and checked for stray writes;
  arrays passed to ``const T*`` parameters are mapped read-only;
* launch geometry is checked (1024 threads, ``__launch_bounds__``, 48 KiB dynamic shared memory);
* a ``__syncthreads()`` or warp intrinsic not reached by all the threads it waits for raises
  :class:`BarrierError` instead of hanging; ``cp.async``/``ldmatrix`` outside shared memory or
  misaligned, and ``mma.sync`` by part of a warp, raise :class:`AsyncCopyError`;
* scalars must be numpy scalars of exactly the parameter's type: a Python ``float`` would reach a
  GPU kernel as a double, so Python numbers are refused with :class:`TypeError`.
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
import signal
import threading
from pathlib import Path

import numpy as np

__all__ = [
    "RawModule", "RawKernel", "Function", "memoize", "clear_memo", "set_seed", "get_seed",
    "cache_dir", "EmuError", "CompileError", "LaunchError", "OutOfBoundsError", "BarrierError",
    "KernelTrap", "AsyncCopyError", "preprocess", "find_kernels", "parse_arch", "default_arch",
    "MAX_SHARED_OPTIN", "DEFAULT_ARCH",
]

HERE = Path(__file__).resolve().parent
MAX_THREADS = 1024
MAX_SHARED_DEFAULT = 48 * 1024      # dynamic shared memory without opting in
#: Opt-in dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) by arch.
MAX_SHARED_OPTIN = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
#: The arch a module is compiled for when its options name none and $FASTCONV_EMU_ARCH is unset:
#: sm_80, the first with mma.sync on tf32/bf16 and cp.async.
DEFAULT_ARCH = 80


from .cache import _loaded, cache_dir, digest, load_or_build  # noqa: F401 - _loaded: tests clear it
from .memory import PAGE, _as_array, _Buffer, _group
from .source import find_kernels, preprocess
from .errors import (AsyncCopyError, BarrierError, CompileError, EmuError, KernelTrap, LaunchError,
                     OutOfBoundsError)


# ---------------------------------------------------------------------------------- settings ---
_seed = None                    # None: read $FASTCONV_EMU_SEED at the first launch
_lock = threading.Lock()        # the runtime has process-global state: one launch at a time


def set_seed(seed: int) -> None:
    """Seed for the thread and block order of every later launch (default 0, or $FASTCONV_EMU_SEED)."""
    global _seed
    _seed = int(seed) & (2**63 - 1)


def get_seed() -> int:
    """The seed of the next launch: set_seed's, else $FASTCONV_EMU_SEED (an integer), else 0."""
    global _seed
    if _seed is None:
        raw = os.environ.get("FASTCONV_EMU_SEED", "").strip() or "0"
        try:
            value = int(raw, 0)
        except ValueError:
            raise ValueError(f"FASTCONV_EMU_SEED must be an integer (the seed of fastconv.emu's thread order), "
                             f"got {raw!r}") from None
        _seed = value & (2**63 - 1)
    return _seed


def parse_arch(value) -> int:
    """75, 80, 86, 87, 89 or 90 from ``sm_80``, ``compute_90a``, ``80`` or ``800``."""
    m = re.fullmatch(r"(?:sm_|compute_)?(\d+)a?", str(value).strip())
    arch = int(m.group(1)) if m else -1
    if arch >= 100 and arch % 10 == 0 and arch // 10 in MAX_SHARED_OPTIN:
        arch //= 10         # a __CUDA_ARCH__ value
    if arch not in MAX_SHARED_OPTIN:
        raise ValueError(f"fastconv.emu: unsupported GPU architecture {value!r}; expected one of "
                         f"{', '.join('sm_%d' % a for a in MAX_SHARED_OPTIN)}")
    return arch


def default_arch() -> int:
    """$FASTCONV_EMU_ARCH (``sm_90``, ``90``...) or :data:`DEFAULT_ARCH`."""
    raw = os.environ.get("FASTCONV_EMU_ARCH", "").strip()
    if not raw:
        return DEFAULT_ARCH
    try:
        return parse_arch(raw)
    except ValueError as e:
        raise ValueError(f"FASTCONV_EMU_ARCH: {e}") from None


def memoize(for_each_device: bool = False):
    """Like ``cupy.memoize``: cache a function's result per positional/keyword arguments."""
    def deco(f):
        cache = {}

        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            key = (args, tuple(sorted(kwargs.items())))
            if key not in cache:
                cache[key] = f(*args, **kwargs)
            return cache[key]
        _memo_caches.append(cache)
        wrapper.cache = cache
        return wrapper
    return deco


_memo_caches: list = []


def clear_memo() -> None:
    for c in _memo_caches:
        c.clear()


# ------------------------------------------------------------------------------ compilation ---
_IGNORED = re.compile(
    r"^(--?std=c\+\+\d+|-arch(=.*)?|--gpu-architecture(=.*)?|-lineinfo|--generate-line-info|-G|--device-debug"
    r"|--?use_fast_math|-ftz=.*|--ftz=.*|-prec-div=.*|--prec-div=.*|-prec-sqrt=.*|--prec-sqrt=.*|-fmad=.*|--fmad=.*"
    r"|-default-device|--device-as-default-execution-space|-dopt=.*|--dopt=.*|-maxrregcount=.*|--maxrregcount=.*"
    r"|-rdc=.*|--relocatable-device-code=.*|-w|--disable-warnings|-Xptxas.*|--ptxas-options=.*|-restrict|--restrict"
    r"|-ewp|--extensible-whole-program|-dlto|--dlto|-extra-device-vectorization|--extra-device-vectorization)$")


def _gxx_options(options) -> tuple[list[str], int]:
    """Translate NVRTC options: keep -D/-U/-I, take the arch from -arch (it sets ``__CUDA_ARCH__``
    and the shared-memory limit), ignore other GPU-only ones, refuse anything else.
    Returns (g++ flags, arch)."""
    out, opts, i, arch = [], list(options), 0, None
    while i < len(opts):
        o = str(opts[i])
        if o in ("-D", "-U", "-I", "--define-macro", "--undefine-macro", "--include-path", "-arch", "--gpu-architecture"):
            if i + 1 >= len(opts):
                raise ValueError(f"option {o} needs a value")
            if o in ("-arch", "--gpu-architecture"):
                arch = parse_arch(opts[i + 1])
                i += 2
                continue
            flag = {"--define-macro": "-D", "--undefine-macro": "-U", "--include-path": "-I"}.get(o, o)
            out.append(flag + str(opts[i + 1]))
            i += 2
            continue
        m = re.match(r"^(?:-arch|--gpu-architecture)=(.*)$", o)
        if m:
            arch = parse_arch(m.group(1))
        elif re.match(r"^-[DUI].+", o):
            if re.match(r"^-[DU]\s*(__CUDA_ARCH__|FASTCONV_EMU_ARCH)\b", o):
                raise ValueError(f"fastconv.emu: set the architecture with -arch=sm_XX, not {o!r}")
            out.append(o)
        elif re.match(r"^--(define-macro|undefine-macro|include-path)=", o):
            k, v = o.split("=", 1)
            out.append({"--define-macro": "-D", "--undefine-macro": "-U", "--include-path": "-I"}[k] + v)
        elif not _IGNORED.match(o):
            raise ValueError(f"fastconv.emu: unsupported compile option {o!r}")
        i += 1
    arch = arch or default_arch()
    return [f"-DFASTCONV_EMU_ARCH={arch * 10}", *out], arch


def _opt_level() -> str:
    lvl = os.environ.get("FASTCONV_EMU_OPT", "-O1")
    if lvl not in ("-O0", "-O1", "-O2", "-O3"):
        raise ValueError(f"FASTCONV_EMU_OPT must be -O0..-O3, not {lvl!r}")
    return lvl


def _generated_unit(src: str, entries: list[tuple[str, str]], name: str) -> str:
    lines = ['#include "cuda_emu.h"', f'#line 1 "{name}"', preprocess(src), "", '#include "emu_runtime.h"']
    for i, (expr, bound) in enumerate(entries):
        # The symbols are numbered (a name expression has no C spelling); the Python side maps names
        # to numbers. `(expr)` names the function: for a template it instantiates it, implicitly, so a
        # source that also instantiates it explicitly (FC_INSTANTIATE in kernels/common.cuh) still builds.
        # __launch_bounds__(maxThreads, minBlocks): only the first argument limits a launch.
        lines.append(f"EMU_KERNEL({i}, ({expr}), emu_launch_bound({bound or 0}))")
    return "\n".join(lines) + "\n"


def _harness_files() -> list[Path]:
    """Every file of the harness (headers, stand-in includes, linker script): part of every key."""
    return sorted(p for p in HERE.rglob("*") if p.is_file() and p.suffix in (".h", ".ld"))


def _build(src: str, options, entries, name: str):
    flags, _ = _gxx_options(options)
    unit = _generated_unit(src, entries, name)
    gxx = os.environ.get("FASTCONV_EMU_CXX", "g++")
    base = ["-std=c++17", _opt_level(), "-fPIC", "-shared", "-fvisibility=hidden", "-ffp-contract=off",
            "-fno-strict-aliasing", "-U_FORTIFY_SOURCE",
            "-fstack-clash-protection", "-I" + str(HERE), "-I" + str(HERE / "include"), "-Wl,-T," + str(HERE / "emu.ld")]
    key = digest([unit, gxx, *base, *flags] + [p.read_bytes() for p in _harness_files()])
    return load_or_build(key, unit, [gxx, *base, *flags], name, HERE)


_KIND = {1: "i", 2: "u", 3: "f", 4: "b"}


def _describe(code: int) -> str:
    size, cls = code & 0xFF, code >> 8 & 0xF
    base = {1: f"int{8 * size}", 2: f"uint{8 * size}", 3: f"float{8 * size}", 4: "bool",
            5: "bfloat16"}.get(cls, f"<{size}-byte type>")
    if code & 0x1000:
        return ("const " if code & 0x2000 else "") + (base if cls or size else "void") + "*"
    return base


# ------------------------------------------------------------------------------------ kernels ---
class _Result(ctypes.Structure):
    _fields_ = [("code", ctypes.c_int), ("signo", ctypes.c_int), ("is_write", ctypes.c_int),
                ("pad", ctypes.c_int), ("addr", ctypes.c_ulonglong), ("msg", ctypes.c_char * 1024)]


class Function:
    """A kernel of a :class:`RawModule`; call it like CuPy's ``Function``."""

    def __init__(self, module: "RawModule", name: str, lib, index: int, params: list[str], bound):
        self.module, self.name, self.params = module, name, params
        self._launch = getattr(lib, f"emu_launch_{index}")
        self._launch.argtypes = [ctypes.POINTER(ctypes.c_longlong), ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(_Result)]
        self._launch.restype = ctypes.c_int
        sig = getattr(lib, f"emu_signature_{index}")
        sig.argtypes, sig.restype = [ctypes.POINTER(ctypes.c_int), ctypes.c_int], ctypes.c_int
        codes = (ctypes.c_int * 256)()
        n = sig(codes, 256)
        self.codes = list(codes[:n])
        if len(self.params) != n:
            self.params = [f"arg{i}" for i in range(n)]
        self.launch_bound = bound
        self.max_threads_per_block = min(MAX_THREADS, bound) if bound else MAX_THREADS
        self.max_dynamic_shared_size_bytes = MAX_SHARED_DEFAULT   # settable, as on CuPy's Function

    def __repr__(self):
        return f"<fastconv.emu.Function {self.name}({', '.join(map(_describe, self.codes))})>"

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None, enable_cooperative_groups=False):
        grid, block = _dims(grid, "grid"), _dims(block, "block")
        if enable_cooperative_groups:
            raise LaunchError("cooperative launches are not supported by fastconv.emu")
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"args must be a tuple, not {type(args).__name__}")
        if len(args) != len(self.codes):
            raise TypeError(f"kernel {self.name} takes {len(self.codes)} arguments, got {len(args)}")
        shared_mem = int(shared_mem)
        limit = MAX_SHARED_OPTIN[self.module.arch]
        if self.max_dynamic_shared_size_bytes > limit:
            raise LaunchError(f"kernel {self.name}: max_dynamic_shared_size_bytes="
                              f"{self.max_dynamic_shared_size_bytes} is above sm_{self.module.arch}'s opt-in limit "
                              f"of {limit} bytes ({limit // 1024} KiB)")
        if not 0 <= shared_mem <= self.max_dynamic_shared_size_bytes:
            raise LaunchError(f"kernel {self.name}: shared_mem={shared_mem} bytes exceeds the "
                              f"{self.max_dynamic_shared_size_bytes} bytes allowed (max_dynamic_shared_size_bytes)")
        nthreads = block[0] * block[1] * block[2]
        if nthreads > self.max_threads_per_block:
            raise LaunchError(f"kernel {self.name}: block {block} has {nthreads} threads, more than the "
                              f"{self.max_threads_per_block} allowed"
                              + (" by __launch_bounds__" if self.launch_bound else " per block"))
        with _lock:
            return self._call(grid, block, args, shared_mem)

    def _call(self, grid, block, args, shared_mem):
        n = len(args)
        slots = (ctypes.c_void_p * max(n, 1))()
        keep = []                       # ctypes storage that must outlive the call
        arrays = []                     # (index, array, const)
        for i, (a, code) in enumerate(zip(args, self.codes)):
            if code & 0x1000:
                if a is None:
                    v = ctypes.c_void_p(0)
                else:
                    arr = _as_array(a, i)
                    if arr is None:
                        raise TypeError(f"argument {i} ({self.params[i]}) of {self.name} is {_describe(code)}; "
                                        f"pass a numpy array or CPU tensor, not {type(a).__name__}")
                    self._check_pointee(i, arr, code)
                    arrays.append((i, arr, bool(code & 0x2000)))
                    v = None
            else:
                v = self._scalar(i, a, code)
            keep.append(v)
        groups = _group(arrays)
        try:
            for g in groups:
                g.buf = _Buffer(g.hi - g.lo)
                for i, arr, _ in g.members:
                    off = arr.__array_interface__["data"][0] - g.lo
                    ctypes.memmove(g.buf.ptr + off, arr.ctypes.data, arr.nbytes)
                    keep[i] = ctypes.c_void_p(g.buf.ptr + off)
                if all(c for _, _, c in g.members):
                    g.buf.protect_readonly()
            for i, v in enumerate(keep):
                slots[i] = ctypes.cast(ctypes.pointer(v), ctypes.c_void_p)
            cfg = (ctypes.c_longlong * 8)(*grid, *block, shared_mem, get_seed())
            res = _Result()
            rc = self._launch(cfg, slots, ctypes.byref(res))
            if rc:
                raise self._error(res, groups)
            for g in groups:
                if not g.buf.slack_intact():
                    raise OutOfBoundsError(f"kernel {self.name}: out-of-bounds write next to argument "
                                           f"{self._argname(g.members[0][0])} (bytes beyond its ends changed)")
                for i, arr, const in g.members:
                    if const:
                        continue
                    off = arr.__array_interface__["data"][0] - g.lo
                    if arr.flags.writeable:
                        ctypes.memmove(arr.ctypes.data, g.buf.ptr + off, arr.nbytes)
                    elif ctypes.string_at(g.buf.ptr + off, arr.nbytes) != arr.tobytes():
                        raise ValueError(f"kernel {self.name} wrote to argument {self._argname(i)}, a read-only array")
        finally:
            for g in groups:
                if getattr(g, "buf", None):
                    g.buf.free()

    def _argname(self, i):
        return f"#{i} '{self.params[i]}'"

    def _check_pointee(self, i, arr, code):
        size, cls = code & 0xFF, code >> 8 & 0xF
        if not cls:             # void* or a struct pointee: any array
            return
        kind = arr.dtype.kind
        ok = arr.dtype.itemsize == size and (
            (cls == 3 and kind == "f") or (cls in (1, 2) and kind in "iu") or (cls == 4 and kind in "bu")
            # 16-bit floats kept as raw bits (unsigned short*, as kernels/tc.cuh suggests for NVRTC)
            or (cls in (1, 2) and size == 2 and kind == "f")
            # bfloat16: a torch bfloat16 tensor (seen as int16), raw 16-bit words, or ml_dtypes' bfloat16
            or (cls == 5 and (kind in "iuV" or arr.dtype.name == "bfloat16")))
        if not ok:
            raise TypeError(f"argument {self._argname(i)} of {self.name} is {_describe(code)} but the array "
                            f"has dtype {arr.dtype}")

    def _scalar(self, i, a, code):
        if not isinstance(a, np.generic):   # (numpy.float64 subclasses float: test this first)
            hint = ("; CuPy would pass a Python float as a double and an int as int64"
                    if isinstance(a, (int, float)) else "")
            raise TypeError(f"argument {self._argname(i)} of {self.name} is {_describe(code)}: pass "
                            f"numpy.{_np_name(code)}(...), not {type(a).__name__}{hint}")
        size, cls = code & 0xFF, code >> 8 & 0xF
        if cls == 0 or a.dtype.itemsize != size or _KIND.get(cls) != a.dtype.kind:
            raise TypeError(f"argument {self._argname(i)} of {self.name} is {_describe(code)}, got numpy.{a.dtype}")
        return ctypes.create_string_buffer(a.tobytes(), max(size, 8))

    def _error(self, res, groups):
        msg = res.msg.decode(errors="replace")
        where = f"kernel {self.name}: "
        if res.code == 1:
            return LaunchError(where + msg)
        if res.code == 3:
            return BarrierError(where + msg)
        if res.code == 5:
            return AsyncCopyError(where + msg)
        if res.code == 2 and (res.signo not in (signal.SIGSEGV, signal.SIGBUS) or "stack overflow" in msg):
            return KernelTrap(where + msg)
        if res.code == 2:
            addr, what = res.addr, {1: "write", 0: "read"}.get(res.is_write, "access")
            for g in groups:
                b = g.buf
                for i, arr, _ in g.members:
                    start = b.ptr + arr.__array_interface__["data"][0] - g.lo
                    end = start + arr.nbytes
                    desc = f"argument {self._argname(i)} ({arr.dtype}{list(arr.shape)}, {arr.nbytes} bytes)"
                    off = addr - start
                    at = f"at byte offset {off} (element {off // max(arr.itemsize, 1)})"
                    if b.hi <= addr < b.hi + PAGE or b.base <= addr < b.lo:
                        return OutOfBoundsError(f"{where}out-of-bounds {what} of {desc} {at}; {msg}")
                    if start <= addr < end and b.readonly:
                        return OutOfBoundsError(f"{where}{what} to {desc} {at}, a const parameter; {msg}")
            if "shared memory" in msg:
                return OutOfBoundsError(f"{where}{msg}")
            return OutOfBoundsError(f"{where}invalid memory {what} (not next to any argument); {msg}")
        return KernelTrap(where + msg)


def _np_name(code):
    size, cls = code & 0xFF, code >> 8 & 0xF
    return {1: f"int{8 * size}", 2: f"uint{8 * size}", 3: f"float{8 * size}", 4: "bool_"}.get(cls, "<type>")


def _dims(d, what):
    if not isinstance(d, tuple) or not 1 <= len(d) <= 3:
        raise TypeError(f"{what} must be a tuple of 1 to 3 ints, got {d!r}")
    out = []
    for v in d:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{what} must be a tuple of ints, got {d!r}")
        if v < 1:
            raise LaunchError(f"{what} dimensions must be >= 1, got {d!r}")
        out.append(int(v))
    return tuple(out) + (1,) * (3 - len(out))


class RawModule:
    """Mimics ``cupy.RawModule(code=..., options=..., name_expressions=...)``; compiles lazily."""

    def __init__(self, code: str | None = None, *, path=None, options=(), backend="nvrtc",
                 translate_cucomplex=False, enable_cooperative_groups=False, name_expressions=None, jitify=False):
        if code is None:
            raise ValueError("fastconv.emu.RawModule needs code= (CUDA C++ source)")
        if path is not None or jitify or enable_cooperative_groups:
            raise ValueError("fastconv.emu.RawModule supports code=, options= and name_expressions= only")
        self.code, self.options = code, tuple(options)
        self.name_expressions = tuple(name_expressions or ())
        self.arch = _gxx_options(self.options)[1]     # refuse bad options now, like NVRTC would
        self._lib = None
        self._functions: dict = {}

    def _load(self):
        if self._lib is None:
            self.kernels = find_kernels(self.code)
            self.templates = find_kernels(self.code, templates=True)
            entries = [(k, v["bound"]) for k, v in self.kernels.items()]
            for expr in self.name_expressions:
                entries.append((expr, self._template_of(expr)["bound"]))
            self._entries = {name: i for i, (name, _) in enumerate(entries)}
            self._lib = _build(self.code, self.options, entries, "kernel.cu")
        return self._lib

    def _template_of(self, expr: str) -> dict:
        """The ``__global__`` template a name expression instantiates (its launch bound, parameter names)."""
        base = expr.split("<", 1)[0].strip().split("::")[-1]
        if "<" not in expr or base not in self.templates:
            raise CompileError(f"name expression {expr!r} does not instantiate a __global__ function template "
                               f"of the module (templates: {', '.join(self.templates) or 'none'})")
        return self.templates[base]

    def compile(self, log_stream=None):
        self._load()

    def get_function(self, name: str) -> Function:
        lib = self._load()
        if name not in self._functions:
            if name not in self._entries:
                if "<" in name:
                    raise KeyError(f"{name!r} was not instantiated: it is not among the module's name_expressions "
                                   f"({', '.join(self.name_expressions) or 'none'}); pass it in "
                                   f"RawModule(name_expressions=[...]) (spelled exactly so, as NVRTC matches the text)")
                raise KeyError(f"no extern \"C\" __global__ function named {name!r} in the module "
                               f"(found: {', '.join(self.kernels) or 'none'}"
                               + (f"; templates, reached through name_expressions: {', '.join(self.templates)}"
                                  if self.templates else "") + ")")
            info = self.kernels.get(name) or self._template_of(name)
            bound = None
            if info["bound"]:
                getter = getattr(lib, f"emu_bound_{self._entries[name]}")
                getter.restype = ctypes.c_longlong
                bound = int(getter()) or None
            self._functions[name] = Function(self, name, lib, self._entries[name], info["params"], bound)
        return self._functions[name]


class RawKernel:
    """Mimics ``cupy.RawKernel(code, name, options=...)``."""

    def __init__(self, code: str, name: str, options=(), **kwargs):
        self._module = RawModule(code=code, options=options, **kwargs)
        self.name = name

    @property
    def kernel(self) -> Function:
        return self._module.get_function(self.name)

    def __call__(self, grid, block, args, **kwargs):
        return self.kernel(grid, block, args, **kwargs)
