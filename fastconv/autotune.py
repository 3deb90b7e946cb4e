"""Autotuning for ``algo="auto"``: measure the candidate algorithms once per geometry and pass, keep the winner.

:func:`fastconv.registry.choose` asks :func:`lookup` first when ``algo == "auto"``; when it returns
``None`` the per-target heuristic decides. On the first call for a geometry key
(:meth:`~fastconv.registry.ConvGeometry.key`), pass (``"forward"``, ``"grad_input"``,
``"grad_weight"``) and thread count, every algorithm in :func:`fastconv.registry.candidates` runs on
synthetic tensors of that geometry (random data of its dtype): one warm-up, then a few timed
repetitions, median. The fastest is cached in memory and on disk, so later calls and later processes
measure nothing.

Why tuning is on by default, and only above :data:`MIN_MACS`
    ``torch.backends.cudnn.benchmark`` is off by default because measuring delays the first call of
    every new shape. Here the choice matters more: on a 2-core AVX-512 machine the two CPU algorithms
    differ by 2-6x on ordinary layers, in both directions (im2col wins 1x1 convolutions, the direct
    kernels win many 3x3 ones), and no size rule predicts it reliably across machines. So ``"auto"``
    measures, but only where measuring can pay off: a convolution of at least :data:`MIN_MACS`
    multiply-accumulates (2 MFLOP, a fraction of a millisecond for a good kernel). Below it even a
    wrong pick costs little, while tuning costs loading (or, with a cold Numba cache, compiling) every
    candidate's kernels, so the heuristic chooses. The threshold is low on purpose: on LeNet-5's
    conv1 (7.5 M MACs) the heuristic's im2col was measured 15x slower than the direct kernel. The cost is
    bounded: nothing is measured when only one algorithm can run the geometry, repetitions shrink to
    fit :data:`BUDGET_S` per candidate, a candidate already 3x slower than the best is not repeated,
    and the result persists on disk, so the delay is paid once per machine, not once per process.

Switches
    ``FASTCONV_AUTOTUNE=0`` (also ``off``/``false``/``no``) in the environment, read at each call, or
    :func:`enabled` in code (``enabled(False)`` sets it; ``with enabled(False): ...`` sets it for a
    block and restores it after; ``enabled()`` tells the state). Code beats the environment.

Cache file
    JSON at ``$FASTCONV_CACHE_DIR/autotune.json``, else ``$XDG_CACHE_HOME/fastconv/autotune.json``,
    else ``~/.cache/fastconv/autotune.json``. Entries sit under a fingerprint of the machine (CPU
    model, core count, architecture) and the software (fastconv, torch, numba, numpy versions): a file
    copied from another machine, or left by another version, is ignored rather than trusted. Each
    entry also records the candidates it chose among, so registering a new algorithm re-tunes.
    Writes go to a temporary file renamed over the old one (atomic on POSIX), merging what other
    processes wrote meanwhile; an unreadable or corrupt file is ignored with one warning and replaced
    on the next write.

Where tuning never happens (the heuristic chooses, nothing is cached)
    inside a ``torch.compile`` trace or under any Python dispatch mode (fake/meta tensors go through
    the ops' fake implementations, which never call :func:`~fastconv.registry.choose`; this is a
    second guard), on the ``"cuda-emu"`` target (the CPU harness's speed says nothing about a GPU),
    and re-entrantly: the tuner calls algorithms' functions directly, never through ``choose``, and a
    call to ``choose`` made while tuning (by an algorithm that delegates) gets the heuristic.

Public: ``fastconv.autotune_cache()`` (read-only mapping), ``fastconv.clear_autotune_cache(disk=True)``,
:func:`enabled`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import threading
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch

from . import registry

#: Convolutions with fewer multiply-accumulates than this use the heuristic (see the module docstring).
MIN_MACS = 1_000_000
#: Timed repetitions per candidate at most (after one warm-up).
MAX_REPS = 5
#: Seconds of timed repetitions per candidate we are willing to spend; big geometries get fewer reps.
BUDGET_S = 0.5
#: A candidate whose first timed run is this many times slower than the best so far is not repeated.
HOPELESS = 3.0
#: Version of the cache file's layout.
FILE_FORMAT = 1
#: Targets whose timings are meaningless for choosing (the CUDA kernels run on the CPU harness).
UNTUNED_TARGETS = frozenset({"cuda-emu"})

CacheKey = tuple  # (ConvGeometry.key(), pass_, threads)


@dataclass(frozen=True)
class Choice:
    """The autotuner's decision for one geometry, pass and thread count.

    ``algo`` is the winner; ``times_ms`` the median time of each candidate measured (``inf`` for one
    that raised); ``candidates`` the algorithm names that could run the geometry when it was measured.
    """

    algo: str
    times_ms: dict = field(default_factory=dict)
    candidates: tuple = ()


# --------------------------------------------------------------------------------------------------
# on/off switch
# --------------------------------------------------------------------------------------------------
_override: Optional[bool] = None


def _env_enabled() -> bool:
    return os.environ.get("FASTCONV_AUTOTUNE", "1").strip().lower() not in ("0", "off", "false", "no")


class enabled:
    """Tell, set, or (as a context manager) temporarily set whether ``algo="auto"`` measures.

    ``enabled()`` -> bool: the state in force (code setting, else ``$FASTCONV_AUTOTUNE``, default on).
    ``enabled(False)`` switches tuning off for the process; ``with enabled(False): ...`` only inside the
    block (the previous setting comes back after it). When off, the per-target heuristic chooses.
    """

    def __new__(cls, value: Optional[bool] = None):
        if value is None:
            return _override if _override is not None else _env_enabled()
        return super().__new__(cls)

    def __init__(self, value: Optional[bool] = None):
        global _override
        self._previous = _override
        _override = bool(value)

    def __enter__(self) -> "enabled":
        return self

    def __exit__(self, *exc) -> None:
        global _override
        _override = self._previous

    def __bool__(self) -> bool:
        return bool(_override)


# --------------------------------------------------------------------------------------------------
# fingerprint and file location
# --------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


_FINGERPRINT: Optional[dict] = None


def fingerprint() -> dict:
    """What a cached timing depends on besides the geometry: machine and software versions."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        import numba
        import numpy

        from . import __version__

        _FINGERPRINT = {
            "fastconv": __version__, "torch": torch.__version__, "numba": numba.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu": _cpu_model(), "cores": os.cpu_count(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        }
    return _FINGERPRINT


def _fingerprint_id() -> str:
    blob = json.dumps(fingerprint(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_path() -> Path:
    """The cache file in use now (the environment is read at each call)."""
    root = os.environ.get("FASTCONV_CACHE_DIR")
    if root:
        return Path(root) / "autotune.json"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "fastconv" / "autotune.json"


# --------------------------------------------------------------------------------------------------
# the cache: memory, backed by the file
# --------------------------------------------------------------------------------------------------
_memory: dict[CacheKey, Choice] = {}
_loaded_from: Optional[Path] = None  # the file whose entries _memory holds (None: not read yet)
_lock = threading.Lock()  # one tuning at a time: concurrent measurements would disturb each other
_local = threading.local()  # .tuning: this thread is inside the tuner (recursion guard)
_warned: set = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _tuplify(value):
    """JSON arrays back to the tuples of a geometry key."""
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


def _read_file(path: Path) -> dict:
    """The whole file as a dict of sections, ``{}`` when missing or unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        _warn_once(f"fastconv autotune: cannot read {path} ({e}); ignoring it")
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT \
                or not isinstance(data.get("sections"), dict):
            raise ValueError("unexpected layout")
        return data["sections"]
    except ValueError as e:
        _warn_once(f"fastconv autotune: ignoring corrupt cache file {path} ({e}); it will be rewritten")
        return {}


def _entries_from(section) -> dict[CacheKey, Choice]:
    out = {}
    if not isinstance(section, dict) or not isinstance(section.get("entries"), list):
        return out
    for e in section["entries"]:
        try:
            key = (_tuplify(e["key"]), str(e["pass"]), int(e["threads"]))
            out[key] = Choice(str(e["algo"]),
                              {str(k): math.inf if v is None else float(v) for k, v in e.get("times_ms", {}).items()},
                              tuple(str(c) for c in e.get("candidates", ())))
        except (KeyError, TypeError, ValueError):
            continue  # one damaged entry does not spoil the rest
    return out


def _entry_json(key: CacheKey, choice: Choice) -> dict:
    geom_key, pass_, threads = key
    return {"key": list(geom_key), "pass": pass_, "threads": threads, "algo": choice.algo,
            "times_ms": {k: (v if math.isfinite(v) else None) for k, v in choice.times_ms.items()},
            "candidates": list(choice.candidates)}


def _ensure_loaded() -> None:
    global _loaded_from
    path = cache_path()
    if _loaded_from == path:
        return
    _memory.clear()
    _memory.update(_entries_from(_read_file(path).get(_fingerprint_id())))
    _loaded_from = path


def _write(update: Optional[tuple[CacheKey, Choice]]) -> None:
    """Merge ``update`` into this fingerprint's section of the file (``None``: drop the section)."""
    path = cache_path()
    sections = _read_file(path)
    fid = _fingerprint_id()
    if update is None:
        sections.pop(fid, None)
        if not sections:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
    else:
        entries = _entries_from(sections.get(fid))
        entries[update[0]] = update[1]
        sections[fid] = {"fingerprint": fingerprint(),
                         "entries": [_entry_json(k, c) for k, c in entries.items()]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".autotune-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"format": FILE_FORMAT, "sections": sections}, f, allow_nan=False)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def autotune_cache() -> Mapping[CacheKey, Choice]:
    """The autotuner's choices for this machine, read-only: ``(geometry key, pass, threads) -> Choice``.

    Includes what earlier processes stored in the cache file (:func:`cache_path`).

    >>> for (geom_key, pass_, threads), choice in fastconv.autotune_cache().items():
    ...     print(pass_, choice.algo, choice.times_ms)
    """
    with _lock:
        _ensure_loaded()
        return types.MappingProxyType(_memory)


def clear_autotune_cache(disk: bool = True) -> None:
    """Forget the tuned choices: in memory, and with ``disk=True`` also this machine's entries in the file.

    With ``disk=False`` the file is kept, so the next lookup reads the choices back from it.
    """
    global _loaded_from
    with _lock:
        _memory.clear()
        _loaded_from = None
        if disk:
            try:
                _write(None)
            except OSError as e:
                _warn_once(f"fastconv autotune: cannot clear {cache_path()} ({e})")


# --------------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------------
def _synthetic_inputs(geom: registry.ConvGeometry, pass_: str) -> tuple:
    """Random tensors of the geometry's shapes for one pass (the arguments after ``alg.<pass>``)."""
    device = "cuda" if geom.target == "cuda" else "cpu"
    opts = dict(dtype=geom.dtype, device=device)
    x = (geom.batch, geom.in_channels) + geom.in_spatial
    w = (geom.out_channels, geom.in_channels // geom.groups) + geom.kernel
    y = (geom.batch, geom.out_channels) + geom.out_spatial
    if pass_ == "forward":
        return torch.randn(x, **opts), torch.randn(w, **opts), None, geom
    if pass_ == "grad_input":
        return torch.randn(y, **opts), torch.randn(w, **opts), geom
    return torch.randn(y, **opts), torch.randn(x, **opts), geom


def _sync(geom: registry.ConvGeometry) -> None:
    if geom.target == "cuda":
        torch.cuda.synchronize()


def _time_candidate(alg: registry.ConvAlgorithm, geom: registry.ConvGeometry, pass_: str, inputs: tuple,
                    best_ms: float) -> float:
    """Median milliseconds of ``alg``'s ``pass_`` on ``inputs``: one warm-up, then bounded repetitions."""
    fn = getattr(alg, pass_)
    fn(*inputs)  # warm-up: compiles or loads the kernels, touches the buffers
    _sync(geom)
    times: list[float] = []
    while len(times) < MAX_REPS:
        start = time.perf_counter()
        fn(*inputs)
        _sync(geom)
        times.append((time.perf_counter() - start) * 1e3)
        if times[0] > HOPELESS * best_ms or sum(times) > BUDGET_S * 1e3:
            break  # already lost, or repeating costs more than the choice is worth measuring
    return statistics.median(times)


def _measure(geom: registry.ConvGeometry, pass_: str, algs: list) -> Choice:
    """Time every candidate; the winner is the smallest median (failures count as infinitely slow)."""
    inputs = _synthetic_inputs(geom, pass_)
    times: dict[str, float] = {}
    for alg in algs:
        try:
            times[alg.name] = _time_candidate(alg, geom, pass_, inputs, min(times.values(), default=math.inf))
        except Exception as e:  # noqa: BLE001 - a candidate that fails here must not fail the user's call
            _warn_once(f"fastconv autotune: {alg.name} failed on {pass_} of {geom.key()} ({e!r}); skipping it")
            times[alg.name] = math.inf
    best = min(times, key=times.get)
    return Choice(best, times, tuple(a.name for a in algs))


def _tracing() -> bool:
    """True inside a torch.compile trace or under a Python dispatch mode (fake tensors, meta analysis)."""
    if torch.compiler.is_compiling():
        return True
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode
    except ImportError:  # pragma: no cover - older torch: no way to ask, fall back to measuring
        return False
    return _get_current_dispatch_mode() is not None


def _capturing(geom: registry.ConvGeometry) -> bool:
    """True while a CUDA graph is being captured (torch.compile(mode="reduce-overhead"),
    torch.cuda.graph): timing would synchronize, which capture forbids; the heuristic picks instead."""
    return geom.target == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def lookup(geom: registry.ConvGeometry, pass_: str) -> Optional[registry.ConvAlgorithm]:
    """The tuned algorithm for ``geom`` and ``pass_``, measuring on a miss; None: let the heuristic choose.

    Called by :func:`fastconv.registry.choose` for ``algo="auto"``.
    """
    if (not enabled() or geom.target in UNTUNED_TARGETS or geom.macs < MIN_MACS
            or getattr(_local, "tuning", False)):
        return None
    algs = registry.candidates(geom)
    if len(algs) < 2:
        return algs[0] if algs else None  # nothing to compare: measuring would only cost time
    names = tuple(a.name for a in algs)
    key = (geom.key(), pass_, torch.get_num_threads())
    with _lock:
        _ensure_loaded()
        choice = _memory.get(key)
        if choice is None or choice.candidates != names:
            if _tracing() or _capturing(geom):
                return None
            _local.tuning = True
            try:
                with torch.no_grad():
                    choice = _measure(geom, pass_, algs)
            finally:
                _local.tuning = False
            _memory[key] = choice
            try:
                _write((key, choice))
            except (OSError, TypeError, ValueError) as e:
                _warn_once(f"fastconv autotune: cannot write {cache_path()} ({e}); keeping choices in memory")
    return next(a for a in algs if a.name == choice.algo)
