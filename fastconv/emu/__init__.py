"""Run fastconv's CUDA C++ kernels on the CPU, for tests (DESIGN.md section 7).

The front end mimics the part of CuPy that fastconv's launch code uses, so the same code drives
the GPU and this harness::

    mod = RawModule(code=src, options=("-DTILE=16", "--std=c++17"))
    fn = mod.get_function("matmul")
    fn((gx, gy), (16, 16), (a, b, c, np.int32(n)), shared_mem=nbytes)

The kernel source is compiled by g++ together with ``cuda_emu.h`` (the device API) and
``emu_runtime.h`` (fiber scheduler), plus one generated launch wrapper per kernel, into a shared
library cached under ``$FASTCONV_EMU_CACHE`` (default ``~/.cache/fastconv/emu``).

Strictness, i.e. what a GPU would show and the harness reports:

* threads of a block run as fibers in a seeded shuffled order between barriers (``set_seed``),
  blocks in a shuffled order too, so a missing ``__syncthreads()`` gives wrong results;
* shared memory (static and dynamic) is filled with 0xFF bytes (NaN as float) before each block;
* every array argument is copied into its own mapping whose end touches a PROT_NONE page (another
  page guards the front); an out-of-bounds access raises :class:`OutOfBoundsError` naming the
  argument. The few bytes between the 16-byte-aligned start and the page, or after the data when
  its size is not a multiple of 16, are filled with garbage and checked for stray writes;
  arrays passed to ``const T*`` parameters are mapped read-only;
* launch geometry is checked (1024 threads, ``__launch_bounds__``, 48 KiB dynamic shared memory);
* a ``__syncthreads()`` or warp intrinsic not reached by all the threads it waits for raises
  :class:`BarrierError` instead of hanging;
* scalars must be numpy scalars of exactly the parameter's type: a Python ``float`` would reach a
  GPU kernel as a double, so Python numbers are refused with :class:`TypeError`.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import mmap
import os
import re
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

__all__ = [
    "RawModule", "RawKernel", "Function", "memoize", "clear_memo", "set_seed", "get_seed",
    "cache_dir", "EmuError", "CompileError", "LaunchError", "OutOfBoundsError", "BarrierError",
    "KernelTrap", "preprocess", "find_kernels",
]

HERE = Path(__file__).resolve().parent
HEADERS = ("cuda_emu.h", "emu_runtime.h", "emu.ld")
PAGE = mmap.PAGESIZE
MAX_THREADS = 1024
MAX_SHARED_DEFAULT = 48 * 1024      # dynamic shared memory without opting in
MAX_SHARED_OPTIN = 64 * 1024        # sm_75's opt-in limit, the lowest arch fastconv targets
_ALIGN = 16                         # array starts are 16-byte aligned (float4 loads), like cudaMalloc's 256


class EmuError(RuntimeError):
    """A kernel launch failed in the harness."""


class CompileError(EmuError):
    """g++ rejected the kernel source (the message holds its diagnostics)."""


class LaunchError(EmuError, ValueError):
    """The launch configuration is invalid (block too large, bad grid, too much shared memory)."""


class OutOfBoundsError(EmuError):
    """The kernel touched memory outside an argument's buffer (or wrote to a const one)."""


class BarrierError(EmuError):
    """A __syncthreads() or warp intrinsic was not reached by all the threads it waits for."""


class KernelTrap(EmuError):
    """The kernel called __trap() (or faulted in some other way the harness cannot attribute)."""


# ---------------------------------------------------------------------------------- settings ---
_seed = int(os.environ.get("FASTCONV_EMU_SEED", "0"))
_lock = threading.Lock()        # the runtime has process-global state: one launch at a time


def set_seed(seed: int) -> None:
    """Seed for the thread and block order of every later launch (default 0, or $FASTCONV_EMU_SEED)."""
    global _seed
    _seed = int(seed) & (2**63 - 1)


def get_seed() -> int:
    return _seed


def cache_dir() -> Path:
    d = os.environ.get("FASTCONV_EMU_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastconv", "emu")
    return Path(d)


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


# ------------------------------------------------------------------------ source processing ---
def _blank(src: str) -> str:
    """The source with comments and string/char literal bodies replaced by spaces (same length,
    newlines kept), so regexes can search it and positions still index the original."""
    out = list(src)
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c and src[j] != "\n":
                j += 2 if src[j] == "\\" else 1
            for k in range(i + 1, min(j, n)):
                out[k] = " "
            i = j + 1
            continue
        else:
            i += 1
            continue
        for k in range(i, j):
            if out[k] != "\n":
                out[k] = " "
        i = j
    return "".join(out)


_ATTR = re.compile(r"__align__\s*\([^()]*\)|alignas\s*\([^()]*\)|__attribute__\s*\(\([^()]*(\([^()]*\))?[^()]*\)\)")
_EXTERN_SHARED = re.compile(r"\bextern\s+__shared__\s+([^;{}\[\]]*?)\b([A-Za-z_]\w*)\s*\[\s*\]\s*;")
_LB = r"__launch_bounds__\s*\(((?:[^()]|\((?:[^()]|\([^()]*\))*\))*)\)\s*"
_KERNEL = re.compile(r"\b__global__\s+(?:" + _LB + r")?void\s+(?:" + _LB + r")?([A-Za-z_]\w*)\s*\(")


def preprocess(src: str) -> str:
    """Rewrite ``extern __shared__ T name[];`` so ``name`` denotes this launch's dynamic shared
    buffer (C++ cannot size a declaration at launch time). Line numbers are preserved."""
    blank = _blank(src)
    out, last = [], 0
    for m in _EXTERN_SHARED.finditer(blank):
        ctype = _ATTR.sub(" ", src[m.start(1):m.end(1)]).strip()
        name = m.group(2)
        if not ctype:
            raise CompileError(f"cannot parse the type of `extern __shared__ ... {name}[]`")
        view = f"(*reinterpret_cast<{ctype} (*)[]>(::emu::g_dyn_smem))"
        nl = src.count("\n", m.start(), m.end())
        depth = blank.count("{", 0, m.start()) - blank.count("}", 0, m.start())
        if depth > 0:   # inside a function: a reference, scoped like the declaration
            rep = f"{ctype} (&{name})[] = {view};" + "\n" * nl
        else:           # file scope: the name is global for the rest of the file, so is a macro
            line = src.count("\n", 0, m.end()) + 1
            rep = f"\n#define {name} {view}\n#line {line}\n"
        out.append(src[last:m.start()])
        out.append(rep)
        last = m.end()
    out.append(src[last:])
    return "".join(out)


def _balanced(text: str, open_pos: int) -> int:
    """Index just past the parenthesis matching the one at open_pos."""
    depth = 0
    for i in range(open_pos, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    raise CompileError("unbalanced parentheses in a kernel declaration")


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "(<[":
            depth += 1
        elif ch in ")>]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


def find_kernels(src: str) -> dict:
    """``{name: {"bound": str|None, "params": [names]}}`` for the ``extern "C"`` (non-template)
    ``__global__`` functions of the source: the names ``get_function`` can find, as with NVRTC."""
    blank = _blank(src)
    # Brace blocks opened by `extern "C" {`.
    extern_blocks, stack = [], []
    for m in re.finditer(r"[{}]", blank):
        if m.group() == "{":
            stack.append((m.start(), bool(re.search(r'extern\s+"C"\s*$', src[max(0, m.start() - 40):m.start()]))))
        elif stack:
            start, is_c = stack.pop()
            if is_c:
                extern_blocks.append((start, m.start()))
    kernels = {}
    for m in _KERNEL.finditer(blank):
        name = m.group(3)
        head = max(blank.rfind(";", 0, m.start()), blank.rfind("}", 0, m.start()), blank.rfind("{", 0, m.start()))
        before = src[head + 1:m.start()]
        if re.search(r"\btemplate\b", before):
            continue
        is_c = bool(re.search(r'extern\s+"C"', before)) or any(a < m.start() < b for a, b in extern_blocks)
        if not is_c:
            continue
        close = _balanced(blank, m.end() - 1)
        params = []
        for p in _split_top(blank[m.end():close - 1]):
            ids = re.findall(r"[A-Za-z_]\w*", re.sub(r"\[[^\]]*\]", "", p))
            params.append(ids[-1] if ids and p.strip() not in ("void",) else "?")
        bound = m.group(1) or m.group(2)
        info = kernels.setdefault(name, {"bound": None, "params": params})
        if bound:
            info["bound"] = src[m.start(1 if m.group(1) else 2):m.end(1 if m.group(1) else 2)]
    return kernels


# ------------------------------------------------------------------------------ compilation ---
_IGNORED = re.compile(
    r"^(--?std=c\+\+\d+|-arch(=.*)?|--gpu-architecture(=.*)?|-lineinfo|--generate-line-info|-G|--device-debug"
    r"|--?use_fast_math|-ftz=.*|--ftz=.*|-prec-div=.*|--prec-div=.*|-prec-sqrt=.*|--prec-sqrt=.*|-fmad=.*|--fmad=.*"
    r"|-default-device|--device-as-default-execution-space|-dopt=.*|--dopt=.*|-maxrregcount=.*|--maxrregcount=.*"
    r"|-rdc=.*|--relocatable-device-code=.*|-w|--disable-warnings|-Xptxas.*|--ptxas-options=.*|-restrict|--restrict"
    r"|-ewp|--extensible-whole-program|-dlto|--dlto|-extra-device-vectorization|--extra-device-vectorization)$")


def _gxx_options(options) -> list[str]:
    """Translate NVRTC options: keep -D/-U/-I, ignore GPU-only ones, refuse anything else."""
    out, opts, i = [], list(options), 0
    while i < len(opts):
        o = str(opts[i])
        if o in ("-D", "-U", "-I", "--define-macro", "--undefine-macro", "--include-path", "-arch", "--gpu-architecture"):
            if i + 1 >= len(opts):
                raise ValueError(f"option {o} needs a value")
            if o in ("-arch", "--gpu-architecture"):
                i += 2
                continue
            flag = {"--define-macro": "-D", "--undefine-macro": "-U", "--include-path": "-I"}.get(o, o)
            out.append(flag + str(opts[i + 1]))
            i += 2
            continue
        if re.match(r"^-[DUI].+", o):
            out.append(o)
        elif re.match(r"^--(define-macro|undefine-macro|include-path)=", o):
            k, v = o.split("=", 1)
            out.append({"--define-macro": "-D", "--undefine-macro": "-U", "--include-path": "-I"}[k] + v)
        elif not _IGNORED.match(o):
            raise ValueError(f"fastconv.emu: unsupported compile option {o!r}")
        i += 1
    return out


def _opt_level() -> str:
    lvl = os.environ.get("FASTCONV_EMU_OPT", "-O1")
    if lvl not in ("-O0", "-O1", "-O2", "-O3"):
        raise ValueError(f"FASTCONV_EMU_OPT must be -O0..-O3, not {lvl!r}")
    return lvl


def _generated_unit(src: str, entries: list[tuple[str, str]], name: str) -> str:
    lines = ['#include "cuda_emu.h"', f'#line 1 "{name}"', preprocess(src), "", '#include "emu_runtime.h"']
    for i, (expr, bound) in enumerate(entries):
        lines.append(f"EMU_KERNEL({i}, ({expr}), (long long)({bound or 0}))")
    return "\n".join(lines) + "\n"


_loaded: dict = {}      # cache key -> ctypes.CDLL


def _build(src: str, options, entries, name: str) -> ctypes.CDLL:
    flags = _gxx_options(options)
    unit = _generated_unit(src, entries, name)
    gxx = os.environ.get("FASTCONV_EMU_CXX", "g++")
    base = ["-std=c++17", _opt_level(), "-fPIC", "-shared", "-fvisibility=hidden", "-ffp-contract=off",
            "-fno-strict-aliasing", "-I" + str(HERE), "-Wl,-T," + str(HERE / "emu.ld")]
    h = hashlib.sha256()
    for part in [unit, gxx, *base, *flags] + [(HERE / f).read_text() for f in HEADERS]:
        h.update(part.encode())
        h.update(b"\0")
    key = h.hexdigest()[:32]
    if key in _loaded:
        return _loaded[key]
    cdir = cache_dir()
    cdir.mkdir(parents=True, exist_ok=True)
    so = cdir / f"{key}.so"
    deps = cdir / f"{key}.deps.json"
    if so.exists() and deps.exists() and _deps_fresh(deps):
        lib = ctypes.CDLL(str(so), mode=os.RTLD_LOCAL)
    else:
        with tempfile.TemporaryDirectory(dir=cdir, prefix="build-") as tmp:
            cpp = Path(tmp) / "unit.cpp"
            cpp.write_text(unit)
            out = Path(tmp) / "out.so"
            cmd = [gxx, *base, *flags, "-MMD", "-MF", str(Path(tmp) / "unit.d"), str(cpp), "-o", str(out)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                raise CompileError(f"g++ failed to compile {name} for fastconv.emu:\n{p.stderr.strip()}\n"
                                   f"command: {shlex.join(cmd)}")
            dep_files = [f for f in _parse_depfile(Path(tmp) / "unit.d")
                         if Path(f).resolve().parent not in (HERE, Path(tmp).resolve())]
            # Each build gets its own file name, so a stale .so that is still loaded is never overwritten.
            so = cdir / f"{key}-{os.getpid()}-{os.urandom(4).hex()}.so"
            os.replace(out, so)
            final = cdir / f"{key}.so"
            os.replace(so, final)
            so = final
            deps.write_text(json.dumps({f: _file_hash(f) for f in dep_files}))
        lib = ctypes.CDLL(str(so), mode=os.RTLD_LOCAL)
    _loaded[key] = lib
    return lib


def _parse_depfile(path: Path) -> list[str]:
    text = path.read_text().replace("\\\n", " ")
    _, _, rest = text.partition(":")
    return [f.replace("\\ ", " ") for f in re.findall(r"(?:\\ |\S)+", rest)]


def _file_hash(f: str) -> str:
    try:
        return hashlib.sha256(Path(f).read_bytes()).hexdigest()
    except OSError:
        return ""


def _deps_fresh(deps: Path) -> bool:
    try:
        return all(_file_hash(f) == h for f, h in json.loads(deps.read_text()).items())
    except (OSError, ValueError):
        return False
