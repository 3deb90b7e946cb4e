"""Autotuning for ``algo="auto"``: measure the candidate algorithms once per geometry and pass, keep the winner.

Two ways to measure. On the CPU (default, :data:`MODE` ``"online"``) a key is tuned on the caller's own
calls: the first call runs the heuristic's pick, the next few calls run each other candidate on the real
inputs (see :class:`_Exploration`), then the fastest is stored and runs from then on -- a converted
model's first step costs what the untuned model's does, instead of minutes of measuring every layer. On
the GPU (and with ``FASTCONV_AUTOTUNE_MODE=measure``) the first call measures on synthetic tensors, as
described next.

:func:`fastconv.registry.choose` asks :func:`lookup` first when ``algo == "auto"``; when it returns
``None`` the per-target heuristic decides. On the first call for a cache key (:func:`cache_key`: the
geometry with its batch rounded up to a power of two, the pass, the thread count) every algorithm in
:func:`fastconv.registry.candidates` runs on synthetic tensors of that geometry, drawn from a private
generator (the global torch and numpy random states are never touched, so a first, tuning run gives
the same dropout masks as later ones): one warm-up, then repetitions for a time budget, median. The
fastest median is cached in memory and on disk, so later calls and later processes measure nothing.

Why tuning is on by default, and only above :data:`MIN_MACS`
    ``torch.backends.cudnn.benchmark`` is off by default because measuring delays the first call of
    every new shape. Here the choice matters more: on a 2-core AVX-512 machine the CPU algorithms
    differ by 2-6x on ordinary layers, in both directions, and no size rule predicts it reliably
    across machines. So ``"auto"`` measures, but only where measuring can pay off: a convolution of
    at least :data:`MIN_MACS` multiply-accumulates. Below it even a wrong pick costs little.

Robust measurements
    Each candidate gets one warm-up and then at least :data:`MIN_REPS` timed runs, more while its
    :data:`BUDGET_S` lasts (at most :data:`MAX_REPS`); the median counts. A candidate is abandoned
    early only when the median of its first :data:`MIN_REPS` runs is :data:`HOPELESS` times the best
    median so far (one slow run under load no longer decides), or at once when its warm-up and first
    timed run are both :data:`HOPELESS_AT_ONCE` times it; the heuristic's pick is measured first, so
    that best time exists early. A candidate that raises, or whose time
    is not finite, is out; when every candidate fails nothing is stored and the heuristic chooses.
    The chosen algorithm keeps being watched: the real calls are timed (two clock reads), and when
    :data:`SLOW_STREAK` calls in a row take more than :data:`SLOW_FACTOR` times the stored median,
    or less than the stored median divided by :data:`FAST_FACTOR`, the key is measured again, once per
    process (a choice made under load, or a machine that changed, heals itself instead of being kept
    forever).
    "Slower" is relative to the other keys' recent calls (:data:`RECENT_CALLS`): when every layer
    runs 2-3x its stored time because another process holds a core, that is load, and racing the
    slow candidates under it would only add to it.
    The second rule catches a choice measured while another process held the cores: then every
    candidate's time is inflated alike (on this 2-core machine, with one busy process beside the
    tuner, RegNet's grouped 3x3 layers measured 7.6-16 ms for every candidate, in steps of the
    scheduler's time slice) and the stored winner is a coin toss (``direct``, 6x slower than ``shift``
    on a quiet machine); its quiet calls then run far below the stored time.
    Choices made while the machine is oversubscribed (:func:`oversubscribed`: a 1-minute load average
    of at least one runnable thread per core plus one) are used by this process but not written to
    the cache file, so a later process, on a quieter machine, measures them again instead of
    inheriting the coin toss.

Keys
    The batch size enters the key rounded up to a power of two: the best algorithm changes little
    between batch 5 and 8, and one entry per batch size made the file grow with every new batch (the
    last short batch of an epoch, varying inference batches).

Switches
    ``FASTCONV_AUTOTUNE=0`` (also ``off``/``false``/``no``) in the environment, read at each call, or
    :func:`enabled` in code (``enabled(False)`` sets it; ``with enabled(False): ...`` sets it for a
    block). Code beats the environment.

Determinism
    Under ``torch.use_deterministic_algorithms(True)``, ``fastconv.set_deterministic(True)`` or
    ``FASTCONV_DETERMINISTIC=1``, ``"auto"`` never measures and ignores stored choices: the
    heuristic, a function of the geometry alone, picks, so every process with the same inputs and
    thread count runs the same kernels and gets the same bits (the CPU kernels reduce in a fixed
    order for a given thread count; see :func:`deterministic`).

Cache file
    SQLite at ``$FASTCONV_CACHE_DIR/autotune.sqlite``, else ``$XDG_CACHE_HOME/fastconv/autotune.sqlite``,
    else ``~/.cache/fastconv/autotune.sqlite``; WAL journal and a busy timeout, so several processes
    tuning at once lose nothing, and a new entry is one small transaction (no whole-file rewrite).
    Entries sit under a fingerprint of the machine and the software versions: a file copied from
    another machine or left by another version is not trusted. An entry naming an algorithm that is
    unknown or refuses the geometry, or made among other candidates, is ignored (re-measured). The
    file holds at most ``$FASTCONV_AUTOTUNE_MAX_ENTRIES`` entries (default :data:`MAX_ENTRIES`); the
    least recently used go first. A file that is not a regular file (a FIFO, a folder), unreadable,
    or not an SQLite database is renamed to ``<name>.corrupt-<timestamp>`` with one warning, and a
    fresh one is started; if none can be written (or the file is read-only, which is left alone),
    choices are kept in memory only.

Where tuning never happens (the heuristic chooses, nothing is cached)
    inside a ``torch.compile`` trace or under any Python dispatch mode, on the ``"cuda-emu"`` target
    (the CPU harness's speed says nothing about a GPU), in deterministic mode, and re-entrantly (a
    call to ``choose`` made while tuning gets the heuristic).

Public: ``fastconv.autotune_cache()`` (read-only mapping), ``fastconv.clear_autotune_cache(disk=True)``,
``fastconv.set_deterministic``, :func:`enabled`.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import sqlite3
import stat
import statistics
import threading
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch

from . import backends, config, registry
from .spec import CONTIGUOUS_ROUTE

#: Convolutions with fewer multiply-accumulates than this use the heuristic (see the module docstring).
MIN_MACS = 1_000_000
#: Timed repetitions per candidate: at least MIN_REPS (after one warm-up), more while BUDGET_S lasts.
MIN_REPS = 3
MAX_REPS = 15
#: Seconds of timed repetitions per candidate beyond MIN_REPS. Small on purpose: a model's first step
#: tunes every layer and pass at once (densenet121: about 360 keys of 2-4 candidates), so this figure
#: times the number of keys is most of a converted model's first-step cost (0.25 s made densenet121's
#: first training step take 244 s against torch's 4-15 s). Three runs and a median already shrug off one
#: disturbed run, and a choice that turns out slow is measured again (see SLOW_FACTOR).
BUDGET_S = 0.05
#: A candidate whose warm-up and first timed run are both this many times the best median so far is
#: abandoned at once: two runs that slow are not noise, and MIN_REPS more of them would cost most of the
#: key's tuning time (a direct 1x1 conv at 290 ms against im2col's 2.3 ms).
HOPELESS_AT_ONCE = 20.0
#: A candidate whose median over MIN_REPS runs is this many times the best median so far is abandoned.
HOPELESS = 3.0
#: Tuning on real calls (:class:`_Exploration`): after MIN_REPS timed rounds, the candidates within this
#: factor of the best median race on alone, up to MAX_TIMED_ROUNDS rounds in all (a close race costs
#: little, since the contenders are close, and three runs each under drifting load decided it by chance).
CLOSE_FACTOR = 1.1
MAX_TIMED_ROUNDS = 6
#: Re-validation: this many calls in a row slower than SLOW_FACTOR x the stored median, or faster than the
#: stored median / FAST_FACTOR (and off by at least SLOW_MIN_MS, so timer noise on tiny calls never counts),
#: re-measure the key, once per process.
SLOW_FACTOR = 3.0
#: Why the "faster" side is tighter: a choice measured under load has every candidate inflated alike, and
#: then even a 2x gap says the race was run in the wrong conditions. Seen in a whole-model run: ResNet-18's
#: 512-channel 3x3 at 4x4, batch 1, stored Winograd at 7.8 ms over im2col at 8.0; the calls then ran in 3.5
#: ms (2.2x under the stored time, so the old factor 3 never fired), and im2col runs it in 0.7.
FAST_FACTOR = 1.6
SLOW_STREAK = 3
SLOW_MIN_MS = 1.0
#: "Slower than stored" is judged against the machine, not the clock: a call counts as slow only when it is
#: SLOW_FACTOR x its stored median times more than the other keys' recent calls are slowed (the median of
#: their time / stored time over the last RECENT_CALLS watched calls, once at least RECENT_MIN_OTHERS of them
#: are there). Why: with another process busy on the cores every call runs 2-3x its stored time; the absolute
#: rule re-measured every key of a converted model at once, racing its slow candidates under load (ResNet-18
#: at batch 8 with a busy neighbour: a forward 469 ms against 143 ms with re-validation off, torch's 91).
RECENT_CALLS = 32
RECENT_MIN_OTHERS = 8
#: Most entries the cache file holds (all fingerprints together); ``$FASTCONV_AUTOTUNE_MAX_ENTRIES``.
MAX_ENTRIES = 4096
#: Seconds a writer waits for another process's transaction before giving up on this write.
BUSY_TIMEOUT_S = 10.0
#: Version of the cache file's layout (the table name carries it).
#: 3: choices measured on real calls (online) with the 0.05 s budget; version 2's entries were measured on
#: synthetic tensors with 0.25 s and often under load (im2col stored at 16 ms where it runs in 1 ms), and
#: a stored choice is never re-measured while it runs as fast as stored, so they start over.
FILE_FORMAT = 3
FILE_NAME = "autotune.sqlite"
#: Targets whose timings are meaningless for choosing (the CUDA kernels run on the CPU harness).
UNTUNED_TARGETS = frozenset({"cuda-emu"})
_TABLE = f"choices_v{FILE_FORMAT}"
_SQLITE_MAGIC = b"SQLite format 3\x00"

CacheKey = tuple  # (geometry key with the batch bucketed, pass_, threads)


@dataclass(frozen=True)
class Choice:
    """The autotuner's decision for one cache key.

    ``algo`` is the winner; ``times_ms`` the median time of each candidate measured (``inf`` in memory
    for one that failed; failures are never written to disk); ``candidates`` the algorithm names that
    could run the geometry when it was measured.
    """

    algo: str
    times_ms: dict = field(default_factory=dict)
    candidates: tuple = ()


# --------------------------------------------------------------------------------------------------
# switches: on/off and deterministic mode
# --------------------------------------------------------------------------------------------------
_override: Optional[bool] = None
_deterministic: Optional[bool] = None
_FALSE = ("0", "off", "false", "no", "")


_ENV_FLAGS: dict[tuple, bool] = {}  # (raw value of a switch variable, its "off" words) -> on


def _env_flag(raw: str, off: tuple = _FALSE) -> bool:
    """A switch variable's value read as on/off (memoised: every ``algo="auto"`` call reads two)."""
    flag = _ENV_FLAGS.get((raw, off))
    if flag is None:
        if len(_ENV_FLAGS) >= 64:
            _ENV_FLAGS.clear()
        flag = _ENV_FLAGS[(raw, off)] = raw.strip().lower() not in off
    return flag


def _env_enabled() -> bool:
    # an empty FASTCONV_AUTOTUNE leaves tuning on (only these words switch it off)
    return _env_flag(backends.getenv("FASTCONV_AUTOTUNE", "1"), ("0", "off", "false", "no"))


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


def set_deterministic(flag: Optional[bool]) -> None:
    """Make ``algo="auto"`` reproducible (``True``), or not (``False``); ``None`` returns to the default.

    Deterministic: ``"auto"`` never measures and ignores stored choices; the heuristic picks from the
    geometry alone, so any process with the same inputs and thread count gets the same output bits.
    The default follows ``$FASTCONV_DETERMINISTIC`` (``1``/``true``/``on``) and
    ``torch.use_deterministic_algorithms(True)``. Explicit algorithms (``algo="im2col"``...) are
    deterministic either way.

    >>> fastconv.set_deterministic(True)
    """
    global _deterministic
    _deterministic = None if flag is None else bool(flag)


def deterministic() -> bool:
    """True when ``"auto"`` must not depend on timing (see :func:`set_deterministic`).

    Every CPU kernel reduces in an order fixed by the geometry and the thread count: the Numba
    ``prange`` loops each own their outputs (no shared accumulators, no atomics), the Winograd weight
    gradient sums its tiles chunk by chunk in a fixed order, and the BLAS GEMMs (OpenBLAS) split their
    work by the thread count only. So fixing the algorithm fixes the bits for a given thread count.
    """
    if _deterministic is not None:
        return _deterministic
    if _env_flag(backends.getenv("FASTCONV_DETERMINISTIC")):
        return True
    return torch.are_deterministic_algorithms_enabled()


# --------------------------------------------------------------------------------------------------
# fingerprint, keys and file location
# --------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    return config.cpuinfo_field("model name") or platform.processor() or "unknown"


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


def batch_bucket(batch: int) -> int:
    """The batch size as it enters a cache key: rounded up to a power of two (0 stays 0)."""
    return 0 if batch <= 0 else 1 << (int(batch) - 1).bit_length()


def cache_key(geom: registry.ConvGeometry, pass_: str, threads: Optional[int] = None) -> CacheKey:
    """``(geometry key with the batch bucketed, pass, thread count)``: the key of :func:`autotune_cache`."""
    gk = geom.key()
    gk = (gk[0], batch_bucket(gk[1])) + gk[2:]
    return (gk, pass_, torch.get_num_threads() if threads is None else int(threads))


def max_entries() -> int:
    """The cap on the file's entries now (``$FASTCONV_AUTOTUNE_MAX_ENTRIES``, else :data:`MAX_ENTRIES`)."""
    raw = os.environ.get("FASTCONV_AUTOTUNE_MAX_ENTRIES", "").strip()
    if not raw:
        return MAX_ENTRIES
    try:
        value = int(raw)
    except ValueError:
        _warn_once(f"fastconv autotune: FASTCONV_AUTOTUNE_MAX_ENTRIES={raw!r} is not an integer; "
                   f"using {MAX_ENTRIES}")
        return MAX_ENTRIES
    return max(1, value)


_path_memo: tuple = (None, None)


def cache_path() -> Path:
    """The cache file in use now (the environment is read at each call; the path is rebuilt only when
    it changed, since every tuned call asks)."""
    global _path_memo
    getenv = backends.getenv
    probe = (getenv("FASTCONV_CACHE_DIR", None), getenv("XDG_CACHE_HOME", None), getenv("HOME", None))
    if _path_memo[0] == probe:
        return _path_memo[1]
    path = config.cache_folder(FILE_NAME)  # the one cache-folder rule (probe: the variables it reads)
    _path_memo = (probe, path)
    return path


# --------------------------------------------------------------------------------------------------
# the file: an SQLite database, set aside when it is not one
# --------------------------------------------------------------------------------------------------
_warned: set = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _set_aside(path: Path, why: str) -> None:
    """Rename a broken cache file (and its WAL side files) out of the way, with one warning."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return  # another process set it aside first
    except OSError as e:
        _warn_once(f"fastconv autotune: cache file {path} is unusable ({why}) and cannot be moved ({e}); "
                   f"keeping choices in memory only")
        raise
    for side in ("-wal", "-shm"):
        with contextlib.suppress(OSError):
            os.rename(f"{path}{side}", f"{target}{side}")
    _warn_once(f"fastconv autotune: cache file {path} is unusable ({why}); moved it to {target.name} "
               f"and starting a new one")


def _check_file(path: Path) -> Optional[str]:
    """Why ``path`` cannot be the cache database, or None (missing, empty, or an SQLite file).

    Never blocks: the type is checked before opening (a FIFO would block ``open``), and the header is
    read through a non-blocking descriptor whose type is checked again (a swap in between)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot stat it: {e}"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot read it: {e.strerror or e}"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not a regular file"
        head = os.read(fd, len(_SQLITE_MAGIC))
    except OSError as e:
        return f"cannot read it: {e.strerror or e}"
    finally:
        os.close(fd)
    if head and head != _SQLITE_MAGIC[:len(head)]:
        return "not an SQLite database"
    return None


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    # a row with invalid UTF-8 must read as a damaged entry (ignored), not fail the whole query
    conn.text_factory = lambda b: b.decode("utf-8", "replace")
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")  # readers never block the writer, nor it them
        # No fsync: it is a cache. With fsyncs (synchronous=NORMAL) one write in ~250 paid 10-20 ms for
        # the WAL checkpoint; a file torn by a power cut is set aside and measured again like any other
        # damaged file. Transactions still keep concurrent writers from losing each other's entries.
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA wal_autocheckpoint = 100")  # small checkpoints: ~0.4 MB copied, not 4 MB
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {_TABLE} (fp TEXT NOT NULL, key TEXT NOT NULL, pass TEXT NOT NULL, "
            "threads INTEGER NOT NULL, algo TEXT NOT NULL, times TEXT NOT NULL, candidates TEXT NOT NULL, "
            "used REAL NOT NULL, PRIMARY KEY (fp, key, pass, threads))")
        conn.execute(f"CREATE INDEX IF NOT EXISTS {_TABLE}_used ON {_TABLE} (used)")
        conn.execute("CREATE TABLE IF NOT EXISTS fingerprints (fp TEXT PRIMARY KEY, info TEXT NOT NULL)")
        conn.execute(f"SELECT count(*) FROM {_TABLE}").fetchone()  # a damaged file fails here
    except BaseException:
        conn.close()
        raise
    return conn


def _is_busy(e: sqlite3.Error) -> bool:
    text = str(e).lower()
    return "locked" in text or "busy" in text


def _is_readonly(e: sqlite3.Error) -> bool:
    """A file we may read but not write (a shared, read-only cache): not damaged, never set aside."""
    text = str(e).lower()
    return "readonly" in text or "read-only" in text


class _Store:
    """The connection to the cache file of one path, opened lazily, reopened after a fork."""

    def __init__(self):
        self.path: Optional[Path] = None
        self.pid = None
        self.conn: Optional[sqlite3.Connection] = None
        self.broken = False  # no usable file: memory only (until the path changes)

    def get(self, path: Path) -> Optional[sqlite3.Connection]:
        if self.path != path or self.pid != os.getpid():
            self.close()
            self.path, self.pid, self.broken = path, os.getpid(), False
        if self.conn is None and not self.broken:
            self.conn = self._open(path)
            self.broken = self.conn is None
        return self.conn

    def _open(self, path: Path) -> Optional[sqlite3.Connection]:
        for attempt in range(2):
            why = _check_file(path)
            if why is None:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    return _connect(path)
                except sqlite3.DatabaseError as e:
                    if _is_busy(e) or _is_readonly(e):
                        _warn_once(f"fastconv autotune: cannot use cache file {path} ({e}); keeping choices "
                                   f"in memory")
                        return None
                    why = f"{type(e).__name__}: {e}"
                except OSError as e:
                    _warn_once(f"fastconv autotune: cannot create {path} ({e}); keeping choices in memory")
                    return None
            if attempt == 1:
                break
            try:
                _set_aside(path, why)
            except OSError:
                return None
        _warn_once(f"fastconv autotune: cannot use {path} ({why}); keeping choices in memory")
        return None

    def close(self) -> None:
        if self.conn is not None and self.pid == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
        self.conn = None  # a connection inherited through fork is dropped, never used

    def run(self, path: Path, action, write: bool = True):
        """``action(conn)`` in a transaction (``write``: taking the write lock at once, so concurrent
        writers queue instead of failing an upgrade); a damaged file is set aside and the action retried
        once. Returns the action's result, or None when there is no usable file."""
        for attempt in range(2):
            conn = self.get(path)
            if conn is None:
                return None
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    result = action(conn)
                    conn.execute("COMMIT")
                    return result
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.DatabaseError as e:
                if _is_busy(e) or _is_readonly(e):
                    _warn_once(f"fastconv autotune: cannot use cache file {path} ({e}); this choice is kept "
                               f"in memory only")
                    return None
                self.close()
                if attempt == 1:
                    self.broken = True
                    _warn_once(f"fastconv autotune: cannot use {path} ({e}); keeping choices in memory")
                    return None
                try:
                    _set_aside(path, f"{type(e).__name__}: {e}")
                except OSError:
                    self.broken = True
                    return None
        return None


_store = _Store()


# --------------------------------------------------------------------------------------------------
# the cache: memory, backed by the file
# --------------------------------------------------------------------------------------------------
_memory: dict[CacheKey, Choice] = {}
_memory_path: Optional[Path] = None  # the file whose entries _memory holds (None: none yet)
_full = False  # _memory holds every entry of that file (read for autotune_cache(); lookups read one)
_touched: set = set()  # keys whose last use this process already recorded in the file (LRU)
_lock = threading.RLock()  # one tuning at a time: concurrent measurements would disturb each other
_local = threading.local()  # .tuning: this thread is inside the tuner (recursion guard)
_TUNING = [0]  # threads inside the tuner now: lookups skip reading _local (half a microsecond) while none is


def _tuplify(value):
    """JSON arrays back to the tuples of a geometry key."""
    if not isinstance(value, list):
        return value
    return tuple(_tuplify(v) if isinstance(v, list) else v for v in value)


def _key_text(key: CacheKey) -> str:
    return json.dumps(key[0], separators=(",", ":"))


def _choice_from_row(algo, times, candidates) -> Optional[Choice]:
    """A stored row as a Choice, None when any field is damaged (the row is then ignored)."""
    try:
        t = json.loads(times)
        c = json.loads(candidates)
        if not isinstance(algo, str) or not isinstance(t, dict) or not isinstance(c, list):
            return None
        times_ms = {str(k): float(v) for k, v in t.items()}
        if not all(math.isfinite(v) and v >= 0 for v in times_ms.values()):
            return None
        return Choice(algo, times_ms, tuple(str(n) for n in c))
    except (ValueError, TypeError, RecursionError):
        return None


def _load(conn: sqlite3.Connection) -> dict[CacheKey, Choice]:
    out = {}
    rows = conn.execute(f"SELECT key, pass, threads, algo, times, candidates FROM {_TABLE} WHERE fp = ?",
                        (_fingerprint_id(),)).fetchall()
    for key, pass_, threads, algo, times, candidates in rows:
        try:
            gk = _tuplify(json.loads(key))
            if not isinstance(gk, tuple):
                continue
            hash(gk)
            k = (gk, str(pass_), int(threads))
        except (ValueError, TypeError, RecursionError):
            continue  # one damaged entry does not spoil the rest
        choice = _choice_from_row(algo, times, candidates)
        if choice is not None:
            out[k] = choice
    return out


def _forget() -> None:
    global _memory_path, _full
    _fast.clear()
    _memory.clear()
    _touched.clear()
    _watch.clear()
    _recent.clear()
    _proxies.clear()
    _exploring.clear()
    _memory_path, _full = None, False


def _follow_path() -> Path:
    """The cache file now; memory is dropped when the environment moved it."""
    global _memory_path
    path = cache_path()
    if path != _memory_path:
        _forget()
        _memory_path = path
    return path


def _ensure_loaded() -> None:
    """Read every entry of the file into memory (for :func:`autotune_cache`; lookups read one key)."""
    global _full
    path = _follow_path()
    if _full:
        return
    for k, c in (_store.run(path, _load, write=False) or {}).items():
        _memory.setdefault(k, c)
    _full = True


def _read_one(key: CacheKey) -> Optional[Choice]:
    """The file's entry for ``key`` (another process may have measured it since we loaded)."""
    def action(conn):
        row = conn.execute(f"SELECT algo, times, candidates FROM {_TABLE} WHERE fp = ? AND key = ? AND pass = ? "
                           "AND threads = ?", (_fingerprint_id(), _key_text(key), key[1], key[2])).fetchone()
        return None if row is None else _choice_from_row(*row)

    return _store.run(cache_path(), action, write=False)


def _write(key: CacheKey, choice: Choice) -> None:
    """Insert or replace one entry (failed measurements left out), evicting the least recently used
    entries beyond :func:`max_entries`. One small transaction: its cost does not grow with the file."""
    times = {k: v for k, v in choice.times_ms.items() if math.isfinite(v)}
    fid = _fingerprint_id()
    cap = max_entries()

    def action(conn):
        conn.execute("INSERT OR IGNORE INTO fingerprints (fp, info) VALUES (?, ?)",
                     (fid, json.dumps(fingerprint(), sort_keys=True)))
        conn.execute(f"INSERT OR REPLACE INTO {_TABLE} (fp, key, pass, threads, algo, times, candidates, used) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (fid, _key_text(key), key[1], key[2], choice.algo, json.dumps(times),
                      json.dumps(list(choice.candidates)), time.time()))
        (count,) = conn.execute(f"SELECT count(*) FROM {_TABLE}").fetchone()
        if count > cap:
            conn.execute(f"DELETE FROM {_TABLE} WHERE rowid IN (SELECT rowid FROM {_TABLE} ORDER BY used "
                         "LIMIT ?)", (count - cap,))
        return True

    _store.run(cache_path(), action)
    _touched.add(key)


def oversubscribed() -> bool:
    """True when the machine has more runnable threads than cores, by the 1-minute load average: at least
    ``cores + 1`` (a tuner's own two busy threads on two quiet cores read about 2; the same with one busy
    process beside it about 3). False where the load average cannot be read."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        return False
    return load >= (os.cpu_count() or 1) + 1


def _persist(key: CacheKey, choice: Choice) -> None:
    """Write a new choice to the cache file, unless it was measured on an oversubscribed machine (see
    the module docstring: such a measurement is kept for this process only)."""
    if oversubscribed():
        return
    try:
        _write(key, choice)
    except (OSError, TypeError, ValueError) as e:
        _warn_once(f"fastconv autotune: cannot write {cache_path()} ({e}); keeping choices in memory")


def _touch(key: CacheKey) -> None:
    """Record that ``key`` was used (once per process and key): what the LRU eviction orders by."""
    _touched.add(key)

    def action(conn):
        conn.execute(f"UPDATE {_TABLE} SET used = ? WHERE fp = ? AND key = ? AND pass = ? AND threads = ?",
                     (time.time(), _fingerprint_id(), _key_text(key), key[1], key[2]))

    _store.run(cache_path(), action)


def autotune_cache() -> Mapping[CacheKey, Choice]:
    """The autotuner's choices for this machine, read-only: ``(geometry key, pass, threads) -> Choice``.

    The geometry key is :meth:`~fastconv.registry.ConvGeometry.key` with the batch rounded up to a
    power of two (:func:`cache_key`). Includes what earlier processes stored in the cache file
    (:func:`cache_path`).

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
    with _lock:
        _forget()
        if disk:
            fid = _fingerprint_id()

            def action(conn):
                conn.execute(f"DELETE FROM {_TABLE} WHERE fp = ?", (fid,))
                conn.execute("DELETE FROM fingerprints WHERE fp = ?", (fid,))

            _store.run(cache_path(), action)


# --------------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------------
def _synthetic_inputs(geom: registry.ConvGeometry, pass_: str) -> tuple:
    """Random tensors of the geometry's shapes for one pass (the arguments after ``alg.<pass>``).

    Drawn from a private, fixed-seed generator: tuning must not move torch's global random state."""
    device = "cuda" if geom.target == "cuda" else "cpu"
    gen = torch.Generator(device=device)
    gen.manual_seed(0x5EED)
    opts = dict(dtype=geom.dtype, device=device, generator=gen)
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
    """Median milliseconds of ``alg``'s ``pass_`` on ``inputs``: one warm-up, then at least
    :data:`MIN_REPS` runs and more while :data:`BUDGET_S` lasts; abandoned after MIN_REPS runs when
    their median is :data:`HOPELESS` times ``best_ms``."""
    fn = getattr(alg, pass_)
    warm_start = time.perf_counter()
    fn(*inputs)  # warm-up: compiles or loads the kernels, touches the buffers
    _sync(geom)
    warm_ms = (time.perf_counter() - warm_start) * 1e3
    if warm_ms > HOPELESS_AT_ONCE * HOPELESS_AT_ONCE * best_ms:
        return warm_ms  # 400x the best even counting a first call's loading: another run would only cost
    times: list[float] = []
    deadline = time.perf_counter() + BUDGET_S
    while len(times) < MAX_REPS:
        start = time.perf_counter()
        fn(*inputs)
        _sync(geom)
        end = time.perf_counter()
        times.append((end - start) * 1e3)
        if len(times) == 1 and min(warm_ms, times[0]) > HOPELESS_AT_ONCE * best_ms:
            break
        if len(times) >= MIN_REPS and (end > deadline or statistics.median(times) > HOPELESS * best_ms):
            break
    return statistics.median(times)


def _measure(geom: registry.ConvGeometry, pass_: str, algs: list) -> Optional[Choice]:
    """Time every candidate; the winner is the smallest median. None when every candidate failed."""
    inputs = _synthetic_inputs(geom, pass_)
    times: dict[str, float] = {}
    # the heuristic's pick first: a good best time early lets the hopeless candidates go after one run
    chooser = registry._HEURISTICS.get(geom.target)
    first = chooser(geom, pass_) if chooser is not None else None
    for alg in sorted(algs, key=lambda a: a.name != first):
        best = min((t for t in times.values() if math.isfinite(t)), default=math.inf)
        try:
            t = float(_time_candidate(alg, geom, pass_, inputs, best))
            if not (math.isfinite(t) and t >= 0):
                raise ValueError(f"measured a time of {t} ms")
        except Exception as e:  # noqa: BLE001 - a candidate that fails here must not fail the user's call
            _warn_once(f"fastconv autotune: {alg.name} failed on {pass_} of {geom.key()} ({e!r}); skipping it")
            t = math.inf
        times[alg.name] = t
    finite = {n: t for n, t in times.items() if math.isfinite(t)}
    if not finite:
        return None
    return Choice(min(finite, key=finite.get), times, tuple(a.name for a in algs))


def _tracing() -> bool:
    """True inside a torch.compile trace or under a Python dispatch mode (fake tensors, meta analysis)."""
    if torch.compiler.is_compiling():
        return True
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode
    except ImportError:  # pragma: no cover - older torch: no way to ask, fall back to measuring
        return False
    return _get_current_dispatch_mode() is not None


# --------------------------------------------------------------------------------------------------
# watching the chosen algorithm: re-validation of a stored choice that turns out slow
# --------------------------------------------------------------------------------------------------
@dataclass
class _Watch:
    expected_ms: float
    calls: int = 0
    slow: int = 0
    fast: int = 0
    stale: bool = False  # measure again at the next lookup
    retuned: bool = False  # this process already measured it again once


_watch: dict[CacheKey, _Watch] = {}
#: (key, time / stored time) of the last RECENT_CALLS watched calls, every key's: how much the machine's load
#: slows calls right now (see RECENT_CALLS).
_recent: collections.deque = collections.deque(maxlen=RECENT_CALLS)
_proxies: dict[CacheKey, registry.ConvAlgorithm] = {}
#: (geometry, pass, threads) -> (result of lookup, cache key, registry generation, cache path): the
#: per-call fast path, so a tuned call costs a dict lookup instead of listing the candidates again.
_fast: dict = {}


def _observe(key: CacheKey, ms: float) -> None:
    w = _watch.get(key)
    if w is None or w.retuned:
        return
    w.calls += 1
    if w.calls == 1:
        return  # the first call of a process pays for loading kernels and first-touch memory
    _recent.append((key, ms / w.expected_ms if w.expected_ms > 0 else 1.0))
    if ms > SLOW_FACTOR * w.expected_ms and ms - w.expected_ms > SLOW_MIN_MS and \
            ms > SLOW_FACTOR * w.expected_ms * _machine_slowdown(key):
        w.slow, w.fast = w.slow + 1, 0
    elif ms * FAST_FACTOR < w.expected_ms and w.expected_ms - ms > SLOW_MIN_MS:
        # far faster than measured: the measurement was taken under load (every candidate inflated), so
        # it says nothing about which candidate is fastest
        w.slow, w.fast = 0, w.fast + 1
    else:
        w.slow = w.fast = 0
    if w.slow >= SLOW_STREAK or w.fast >= SLOW_STREAK:
        w.stale = True


def _machine_slowdown(key: CacheKey) -> float:
    """How much slower than stored the other keys' recent calls ran (median, at least 1.0; 1.0 until
    RECENT_MIN_OTHERS of them were seen): a slowdown every key shares is the machine's load, not the choice."""
    others = sorted(r for k, r in _recent if k != key)
    if len(others) < RECENT_MIN_OTHERS:
        return 1.0
    return max(1.0, others[len(others) // 2])


def _watched(alg: registry.ConvAlgorithm, key: CacheKey, choice: Choice) -> registry.ConvAlgorithm:
    """``alg`` with its ``key[1]`` pass timed on every call (two clock reads) for :func:`_observe`."""
    expected = choice.times_ms.get(choice.algo, math.inf)
    if not math.isfinite(expected) or alg.targets == frozenset({"cuda"}):
        return alg  # nothing to compare with; GPU calls are asynchronous, their wall time says nothing
    _watch[key] = w = _watch.get(key) or _Watch(expected)
    w.expected_ms = expected
    proxy = _proxies.get(key)
    if proxy is not None and proxy.name == alg.name and getattr(proxy, "_fastconv_base", None) is alg:
        return proxy
    fn = getattr(alg, key[1])

    def timed(*args):
        start = time.perf_counter()
        out = fn(*args)
        _observe(key, (time.perf_counter() - start) * 1e3)
        return out

    select_route = getattr(fn, CONTIGUOUS_ROUTE, None)
    if select_route is not None:  # the ops take the contiguous route for contiguous operands: watch it too

        def timed_select(g):
            route = select_route(g)
            if route is None:
                return None

            def timed_route(*args):
                start = time.perf_counter()
                out = route(*args)
                if out is not None:  # None: left to the pass (timed there)
                    _observe(key, (time.perf_counter() - start) * 1e3)
                return out

            return timed_route

        setattr(timed, CONTIGUOUS_ROUTE, timed_select)

    proxy = dataclasses.replace(alg, **{key[1]: timed})
    object.__setattr__(proxy, "_fastconv_base", alg)
    _proxies[key] = proxy
    return proxy


def _capturing(geom: registry.ConvGeometry) -> bool:
    """True while a CUDA graph is being captured (torch.compile(mode="reduce-overhead"),
    torch.cuda.graph): timing would synchronize, which capture forbids; the heuristic picks instead."""
    return geom.target == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# --------------------------------------------------------------------------------------------------
# tuning on the real calls (CPU targets): the first call costs what the heuristic's pick costs
# --------------------------------------------------------------------------------------------------
#: "online" (default): a CPU key is tuned on the caller's own calls (see :class:`_Exploration`);
#: "measure": on its first call, on synthetic tensors, before the call returns (what the GPU always
#: does: its wall time is meaningless without a sync). ``$FASTCONV_AUTOTUNE_MODE`` or set it here.
MODES = ("online", "measure")


def _mode_from_env() -> str:
    value = os.environ.get("FASTCONV_AUTOTUNE_MODE", "").strip().lower() or "online"
    if value not in MODES:
        warnings.warn(f"fastconv: FASTCONV_AUTOTUNE_MODE={value!r} is not one of {', '.join(MODES)}; "
                      f"tuning 'online'", RuntimeWarning, stacklevel=2)
        return "online"
    return value


MODE = _mode_from_env()
#: Targets whose calls can be timed by the host clock (synchronous kernels).
ONLINE_TARGETS = frozenset({"numba"})


class _Exploration:
    """Tuning one key on the caller's real calls instead of synthetic ones.

    Why: measuring every candidate of every layer and pass before the first call returns made a
    converted densenet121's first training step take minutes (each key: candidates x (warm-up + runs)),
    where torch's takes seconds. Here each call of the key runs one candidate on the caller's inputs and
    times it, the heuristic's pick first (so a model's first step costs what the untuned model costs).
    When the race is decided the smallest median is stored as a measured choice would be, and later calls
    run it. The extra cost is only the slower candidates' excess, spread over a few steps; no synthetic
    tensors, so no random state is touched. Every call's result is the caller's result, computed by one
    of the candidates (a candidate that raises is dropped and the call re-run by the heuristic's pick).

    The candidates take turns, call by call, in rounds: a warm-up round (not counted: loading, first
    touch), then :data:`MIN_REPS` timed rounds; candidates within :data:`CLOSE_FACTOR` of the best median
    then race on, alone, up to :data:`MAX_TIMED_ROUNDS` rounds. Why turns and not each candidate's runs
    in a block (the first version): the load of this shared machine drifts over seconds, and a block
    measured in a busy second lost to one measured in a quiet one -- ResNet's 256-channel 3x3 weight
    gradient stored Winograd at 5.3 ms over im2col "at 6.1 ms", which runs it in 3.8. Taking turns, every
    round sees every candidate under about the same load. Dropped early, on the rules of
    :func:`_time_candidate`: after its warm-up at ``HOPELESS_AT_ONCE**2`` times the best warm-up, after
    its first timed run when that and its warm-up are both ``HOPELESS_AT_ONCE`` times the best, after
    MIN_REPS runs at HOPELESS times the best median.
    """

    def __init__(self, key: CacheKey, memo: tuple, pass_: str, algs: list, first: Optional[str]):
        self.key, self.memo, self.pass_ = key, memo, pass_
        self.names = tuple(a.name for a in algs)
        self.active = sorted(algs, key=lambda a: a.name != first)  # still racing, in turn order
        self.fallback = self.active[0]
        self.turn = 0            # index in ``active`` of the candidate the next call runs
        self.round = 0           # 0: the warm-up round; then the timed rounds
        self.done = False
        self.warm_ms: dict[str, float] = {}
        self.runs: dict[str, list] = {}
        self.times: dict[str, float] = {}

    def current(self) -> registry.ConvAlgorithm:
        """The candidate the next call runs (the heuristic's pick once the race is over)."""
        return self.fallback if self.done else self.active[self.turn]

    def best(self) -> float:
        """The best median so far among the candidates still racing (inf before any timed run)."""
        return min((statistics.median(self.runs[a.name]) for a in self.active if self.runs.get(a.name)),
                   default=math.inf)

    def call(self, *args):
        _tuning_calls[0] += 1
        if self.done:  # finished meanwhile (another thread): the stored winner next time
            return getattr(self.fallback, self.pass_)(*args)
        alg = self.current()
        fn = getattr(alg, self.pass_)
        start = time.perf_counter()
        try:
            out = fn(*args)
        except Exception:
            if alg is self.fallback:
                raise  # the untuned call would have raised the same
            self._drop(alg, math.inf)
            return getattr(self.fallback, self.pass_)(*args)
        self._record(alg, (time.perf_counter() - start) * 1e3)
        return out

    def _record(self, alg, ms: float) -> None:
        name = alg.name
        if self.round == 0:
            self.warm_ms[name] = ms
            if ms > HOPELESS_AT_ONCE * HOPELESS_AT_ONCE * min(self.warm_ms.values()):
                return self._drop(alg, ms)
            return self._next()
        runs = self.runs.setdefault(name, [])
        runs.append(ms)
        best = self.best()
        if len(runs) == 1 and min(self.warm_ms.get(name, ms), ms) > HOPELESS_AT_ONCE * best:
            return self._drop(alg, ms)
        if len(runs) >= MIN_REPS and statistics.median(runs) > HOPELESS * best:
            return self._drop(alg, statistics.median(runs))
        self._next()

    def _drop(self, alg, ms: float) -> None:
        """``alg`` leaves the race with ``ms`` as its time; the turn passes to the next one."""
        self.times[alg.name] = ms
        self.active.remove(alg)
        if self.turn >= len(self.active):
            self._end_round()

    def _next(self) -> None:
        self.turn += 1
        if self.turn >= len(self.active):
            self._end_round()

    def _end_round(self) -> None:
        self.turn = 0
        self.round += 1
        if self.active and self.round <= MIN_REPS:
            return
        medians = {a.name: statistics.median(self.runs[a.name]) for a in self.active}
        best = min(medians.values(), default=math.inf)
        close = [a for a in self.active if medians[a.name] <= CLOSE_FACTOR * best]
        if len(close) > 1 and self.round <= MAX_TIMED_ROUNDS:
            for a in self.active:
                if a not in close:
                    self.times[a.name] = medians[a.name]
            self.active = close  # a close race: only the contenders run on
            return
        self.times.update(medians)
        self._finish()

    def _finish(self) -> None:
        self.done = True
        with _lock:
            _exploring.pop(self.key, None)
            _fast.pop(self.memo, None)  # the next lookup finds the stored choice
            finite = {n: t for n, t in self.times.items() if math.isfinite(t)}
            if not finite:
                return
            choice = Choice(min(finite, key=finite.get), dict(self.times), self.names)
            _memory[self.key] = choice
            _persist(self.key, choice)


#: cache key -> its exploration in progress (one per key, shared by every caller of that key).
_exploring: dict = {}


def tuning_in_progress() -> int:
    """How many keys are being tuned on real calls now (0: every layer seen so far runs its final choice)."""
    return len(_exploring)


def tuning_calls() -> int:
    """How many calls so far ran a candidate being tuned (unchanged over a model's step: it is tuned)."""
    return _tuning_calls[0]


_tuning_calls = [0]


def _explorer(key: CacheKey, memo: tuple, geom: registry.ConvGeometry, pass_: str,
              algs: list) -> registry.ConvAlgorithm:
    """The algorithm to hand out while ``key`` is tuned on real calls (its ``pass_`` explores)."""
    ex = _exploring.get(key)
    if ex is None or ex.names != tuple(a.name for a in algs) or ex.pass_ != pass_:
        chooser = registry._HEURISTICS.get(geom.target)
        ex = _exploring[key] = _Exploration(key, memo, pass_, algs, chooser(geom, pass_) if chooser else None)
    return dataclasses.replace(ex.fallback, **{pass_: ex.call})


def lookup(geom: registry.ConvGeometry, pass_: str) -> Optional[registry.ConvAlgorithm]:
    """The tuned algorithm for ``geom`` and ``pass_``, measuring on a miss; None: let the heuristic choose.

    Called by :func:`fastconv.registry.choose` for ``algo="auto"``.
    """
    on = _override if _override is not None else _env_enabled()  # enabled(), without building an object
    if (not on or geom.target in UNTUNED_TARGETS or geom.macs < MIN_MACS
            or (_TUNING[0] and getattr(_local, "tuning", False)) or deterministic()):
        return None
    path = cache_path()
    threads = torch.get_num_threads()
    memo = (geom, pass_, threads)
    hit = _fast.get(memo)
    if hit is not None and hit[2] == registry.generation() and hit[3] is path and path is _memory_path:
        watch = _watch.get(hit[1])
        if watch is None or not watch.stale:
            return hit[0]
    with _lock:
        result, key = _lookup_slow(geom, pass_, threads, memo)
        if key is not None:  # None: inside a trace, nothing decided
            _fast[memo] = (result, key, registry.generation(), _memory_path)
        return result


def _lookup_slow(geom, pass_, threads, memo=None) -> tuple:
    """:func:`lookup` without its memo: (algorithm or None, cache key). Holds ``_lock``."""
    _follow_path()
    key = cache_key(geom, pass_, threads)
    algs = registry.candidates(geom)
    if len(algs) < 2:
        return (algs[0] if algs else None), key  # nothing to compare: measuring would only cost time
    names = tuple(a.name for a in algs)
    choice = _memory.get(key)
    watch = _watch.get(key)
    if choice is not None and watch is not None and watch.stale:
        choice = None  # observed way slower than measured: measure again (once per process)
    elif not _usable(choice, names):
        choice = _read_one(key)  # another process may have measured it meanwhile
    if not _usable(choice, names):
        if _tracing() or _capturing(geom):
            return None, None  # not memoised: the same call outside the trace or capture tunes
        if MODE == "online" and geom.target in ONLINE_TARGETS and not (watch is not None and watch.stale):
            return _explorer(key, memo or (geom, pass_, threads), geom, pass_, algs), key
        _local.tuning = True
        _TUNING[0] += 1
        try:
            with torch.no_grad():
                choice = _measure(geom, pass_, algs)
        finally:
            _local.tuning = False
            _TUNING[0] -= 1
        if choice is None:
            _memory.pop(key, None)
            return None, key  # every candidate failed: nothing stored, the heuristic chooses
        _memory[key] = choice
        if watch is not None and watch.stale:
            watch.stale, watch.retuned, watch.slow, watch.fast = False, True, 0, 0
        _persist(key, choice)
    else:
        _memory[key] = choice
        if key not in _touched:
            _touch(key)
    alg = next(a for a in algs if a.name == choice.algo)
    return _watched(alg, key, choice), key


def _usable(choice: Optional[Choice], names: tuple) -> bool:
    """A stored choice applies when it was made among today's candidates and names one of them (an
    unknown algorithm, or one that now refuses the geometry, is ignored and measured again)."""
    return choice is not None and choice.candidates == names and choice.algo in names
