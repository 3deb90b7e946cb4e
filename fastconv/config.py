"""Process-wide configuration: threading layer, thread count, compile flags, cache folders.

Imported first by every fastconv module that uses Numba, because Numba's threading layer must be
chosen before the first parallel kernel runs.

Why OpenMP: torch runs its ops on GNU OpenMP, whose idle threads keep spinning on the cores for a while
after each parallel op. A Numba kernel on TBB right after a torch op then ran with its second thread
fighting a spinning OpenMP thread for a core: a 64-channel Winograd conv at batch 8 took 2.2 ms alone and
4.1-4.5 ms after a 30 µs torch add. On Numba's OpenMP layer the same pair took 2.3 ms, and converted models
ran 25-45% faster (ResNet-18, MobileNet-v2, DenseNet-121 at batch 8, inference and training, 2 threads).
Numba's OpenMP extension links the system's ``libgomp.so.1.0.0``, not the copy torch's wheel brings: the process
holds two GNU OpenMP runtimes, each with its own pool. Linking Numba's layer to torch's runtime (a copy of the
extension whose ``DT_NEEDED`` names torch's soname) was tried and left out, measured no better: a fastconv conv
right after a parallel torch op took as long as right after another fastconv conv with two runtimes too (64 ->
64 3x3 at 16x16 batch 8: 515-527 µs either way; torch's conv after a torch op likewise), and five converted
torchvision models, separate processes alternating, 3-11 runs each, moved by 0.84-1.24x in both directions.
GNU OpenMP's pool does not survive ``fork``, and Numba ends a forked child at its first parallel launch, so
in a forked child (a ``DataLoader`` worker) every fastconv kernel runs its serial compilation
(:data:`fastconv.cpu.parallel.SERIAL_ONLY`). Where the OpenMP layer cannot load, TBB is used: fork-safe
and thread-safe. The ``workqueue`` layer, the last resort, aborts when two Python threads call parallel
kernels at once.

Why we load TBB ourselves: the ``tbb`` wheel puts ``libtbb.so.12`` in ``<prefix>/lib``, a folder the
dynamic loader does not search. Numba's ``tbbpool`` extension then fails to load in every virtual
environment, ``pip install --user`` and non-editable install (it works only where the interpreter's
own run path happens to cover that folder), and Numba answers with a misleading "pip install tbb".
So we find the library the ``tbb`` distribution installed and load it with ``RTLD_GLOBAL`` before Numba
needs it. If that fails we fall back to Numba's ``workqueue`` layer, which is fork-safe but not
thread-safe, and serialise parallel launches from several Python threads with a lock
(:func:`parallel_entry`); the fallback is announced once in a warning and in ``fastconv info``.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading
import warnings

#: Flags for ``@njit(fastmath=...)``. Only reassociation and FMA contraction: the full
#: ``fastmath=True`` assumes no NaN/Inf, which would break max-pooling's NaN propagation.
FASTMATH = frozenset({"reassoc", "contract"})

#: Numba's on-disk cache (``cache=True``) lives beside the modules unless NUMBA_CACHE_DIR is set.
CACHE = True


def cpuinfo_field(name: str) -> str:
    """The first ``name`` line's value in ``/proc/cpuinfo`` ("vendor_id", "model name", ...); "" where there is
    none (other systems, or the field is missing)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cache_folder(*parts: str) -> "os.PathLike":
    """fastconv's on-disk cache folder (autotune choices, compiled CUDA modules, the harness's builds):
    ``$FASTCONV_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastconv``, else ``~/.cache/fastconv``, with ``parts``
    appended. Read at each call: tests and users switch it at run time. The one rule for every cache path."""
    from pathlib import Path

    root = os.environ.get("FASTCONV_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "fastconv")
    return Path(root, *parts)

_TBB_SONAME = "libtbb.so.12"


def _tbb_candidates() -> list[str]:
    """Where pip may have put ``libtbb.so.12``, most specific first.

    The ``tbb`` distribution's own file list is authoritative (venv, ``--user``, system site-packages
    alike); the interpreter prefixes are a fallback for installs whose metadata lacks a RECORD.
    """
    found: list[str] = []
    try:
        from importlib import metadata

        dist = metadata.distribution("tbb")
        for entry in dist.files or ():
            if os.path.basename(str(entry)) == _TBB_SONAME:
                found.append(os.path.realpath(str(dist.locate_file(entry))))
    except Exception:  # no tbb distribution, or unreadable metadata: try the prefixes below
        pass
    import site

    prefixes = [sys.prefix, sys.base_prefix, getattr(site, "USER_BASE", None) or ""]
    for prefix in prefixes:
        if prefix:
            found.extend(sorted(glob.glob(os.path.join(prefix, "lib", _TBB_SONAME))))
    return list(dict.fromkeys(p for p in found if os.path.exists(p)))


def _load_tbb() -> tuple[str | None, str]:
    """Load TBB into the process so Numba's ``tbbpool`` can link against it.

    Returns ``(path or None, reason)``. Loading the system's copy by soname is tried first, because a
    TBB already reachable by the loader is the one any other library in the process will use.
    """
    try:
        ctypes.CDLL(_TBB_SONAME, mode=ctypes.RTLD_GLOBAL)
        return _TBB_SONAME, "found by the dynamic loader"
    except OSError:
        pass
    errors = []
    for path in _tbb_candidates():
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path, "loaded from the tbb package"
        except OSError as exc:
            errors.append(f"{path}: {exc}")
    if errors:
        return None, "; ".join(errors)
    return None, "no libtbb.so.12 in the tbb package, the interpreter prefix or the user base"


def _openmp_loads() -> tuple[bool, str]:
    """Whether Numba's OpenMP threading layer can load here (its extension links the GNU OpenMP runtime)."""
    try:
        from numba.np.ufunc import omppool  # noqa: F401  (loading it starts no threads)
    except Exception as exc:  # ImportError, or OSError from the loader: no usable OpenMP runtime
        return False, f"Numba's OpenMP layer did not load ({exc})"
    return True, "Numba's OpenMP layer loaded"


def _choose_threading_layer() -> dict:
    requested = os.environ.get("NUMBA_THREADING_LAYER")
    if requested and requested != "tbb":
        # The user chose a layer deliberately: respect it, and serialise launches unless it is
        # known to be thread-safe.
        return {"layer": requested, "tbb_path": None, "reason": "NUMBA_THREADING_LAYER set by the user",
                "needs_lock": requested not in ("tbb", "omp", "safe", "threadsafe")}
    if not requested:
        ok, reason = _openmp_loads()
        if ok:
            os.environ["NUMBA_THREADING_LAYER"] = "omp"
            return {"layer": "omp", "tbb_path": None, "reason": reason, "needs_lock": False}
    path, reason = _load_tbb()
    if path is not None:
        os.environ["NUMBA_THREADING_LAYER"] = "tbb"
        return {"layer": "tbb", "tbb_path": path, "reason": reason, "needs_lock": False}
    os.environ["NUMBA_THREADING_LAYER"] = "workqueue"
    warnings.warn(
        "fastconv: Intel TBB could not be loaded (" + reason + "); Numba's parallel kernels run on the "
        "'workqueue' threading layer instead: fork-safe, and launches from several Python threads take "
        "turns. Run 'fastconv info' for details.", RuntimeWarning, stacklevel=3)
    return {"layer": "workqueue", "tbb_path": None, "reason": reason, "needs_lock": True}


#: What was decided about Numba's threading at import; read by ``fastconv info``.
THREADING = _choose_threading_layer()

_launch_lock = threading.RLock()


def parallel_entry(fn):
    """Decorator for a kernel entry point that launches parallel Numba kernels.

    On the OpenMP and TBB layers it returns ``fn`` itself (no cost). On the fallback ``workqueue`` layer,
    which aborts the process when two Python threads launch parallel kernels at once, calls take turns on
    one lock.
    """
    if not THREADING["needs_lock"]:
        return fn

    import functools

    @functools.wraps(fn)
    def serialised(*args, **kwargs):
        with _launch_lock:
            return fn(*args, **kwargs)

    return serialised


_blas_threads: int | None = None


def _limit_blas(threads: int) -> None:
    """Give numpy's and scipy's BLAS pools (OpenBLAS, usually two of them) ``threads`` threads.

    Neither follows ``torch.set_num_threads`` by itself, and each pool brings as many threads as there
    are cores: on two cores a process holding torch's, Numba's and two BLAS pools was seen to run a
    1x1 conv's GEMM 50x slower than with one BLAS thread. Called only when the count changes.
    """
    global _blas_threads
    if _blas_threads == threads:
        return
    _blas_threads = threads
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a declared dependency; tolerate its absence rather than fail a convolution
        return
    threadpool_limits(limits=threads, user_api="blas")


def sync_threads() -> int:
    """Make Numba and the BLAS pools use as many threads as torch (``torch.set_num_threads`` is the knob).

    Returns the thread count in force. Called before every parallel kernel launch; cheap when nothing
    changed (two integer comparisons).
    """
    import torch

    torch_threads = torch.get_num_threads()
    # Numba's thread count is per Python thread: remember what this thread last set (a call costs 0.3 µs
    # instead of 3 µs, and every kernel launch makes one)
    if getattr(_synced, "torch_threads", None) == torch_threads:
        return _synced.wanted
    import numba

    wanted = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
    if torch.get_num_threads() != torch_threads:
        # Numba's OpenMP pool, launched by its first thread-count call, runs in torch's libgomp and sets the
        # launching thread's OpenMP thread count to the pool's size: after the first conv, a process that had
        # chosen torch.set_num_threads(1) ran torch's own ops (and then ours) on every core. Put it back.
        torch.set_num_threads(torch_threads)
    _limit_blas(wanted)
    _synced.torch_threads, _synced.wanted = torch_threads, wanted
    return wanted


_synced = threading.local()


def announce_first_compile(kernel_dir: str) -> bool:
    """Say once, on stderr, that the CPU kernels are about to be compiled, when Numba's cache is cold.

    A cold cache costs seconds per kernel family on the first call of each (a minute for the whole
    benchmark); without a word the first run looks hung. The cache counts as warm when any index file
    (``*.nbi``) of a module in ``kernel_dir`` exists where Numba keeps it. Returns whether it spoke.
    """
    root = os.environ.get("NUMBA_CACHE_DIR")
    stems = [f[:-3] for f in os.listdir(kernel_dir) if f.endswith(".py") and not f.startswith("__")]
    if root:
        pattern = os.path.join(root, "**", "*.nbi")
        found = any(os.path.basename(p).split(".")[0] in stems for p in glob.iglob(pattern, recursive=True))
    else:
        found = bool(glob.glob(os.path.join(kernel_dir, "__pycache__", "*.nbi")))
    if found:
        return False
    print("fastconv: compiling the CPU kernels for this machine as they are first used (a few seconds per "
          "kernel family); this happens only once, later runs load them from Numba's cache.", file=sys.stderr)
    return True
