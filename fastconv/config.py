"""Process-wide configuration: threading layer, thread count, compile flags, cache folders.

Imported first by every fastconv module that uses Numba, because Numba's threading layer must be
chosen before the first parallel kernel runs.

Why TBB: torch and Numba each bring an OpenMP runtime. With Numba's default (GNU OpenMP) layer a
forked child (a ``DataLoader`` worker) dies on its first parallel kernel, and the ``workqueue``
layer aborts when two Python threads call parallel kernels at once. TBB is both fork-safe and
thread-safe. If TBB is not importable we fall back to Numba's default choice and say so in
``fastconv.info()``.
"""
from __future__ import annotations

import os

# Must be set before numba is imported anywhere in the process to take effect reliably.
os.environ.setdefault("NUMBA_THREADING_LAYER", "tbb")

import numba  # noqa: E402

#: Flags for ``@njit(fastmath=...)``. Only reassociation and FMA contraction: the full
#: ``fastmath=True`` assumes no NaN/Inf, which would break max-pooling's NaN propagation.
FASTMATH = frozenset({"reassoc", "contract"})

#: Numba's on-disk cache (``cache=True``) lives beside the modules unless NUMBA_CACHE_DIR is set.
CACHE = True


def sync_threads() -> int:
    """Make Numba use as many threads as torch (``torch.set_num_threads`` is the single knob).

    Returns the thread count in force. Called before every parallel kernel launch; cheap.
    """
    import torch

    wanted = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
    return wanted
