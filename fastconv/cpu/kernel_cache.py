"""Numba's on-disk cache of the CPU kernels, invalidated when any kernel source changes.

Numba keys a cached function by the stamp (modification time and size) of the one file that defines it. A
kernel compiled into another (every ``micro_gemm`` tile inlined into ``im2col_fused``'s parallel regions) is
not part of that stamp: after an edit of ``micro_gemm.py`` alone, ``im2col_fused``'s regions kept loading
machine code built from the old tiles, and a measurement of the edit timed the old code (seen: the gather
kernel's new half-width tile "made no difference" until the caches were deleted). An installed release
changes every file at once, so only a working tree meets this; but there it silently runs code that is
no longer in the source.

:func:`install` puts two locators in front of Numba's own for the files of this package: the same cache
places (``$NUMBA_CACHE_DIR``, else ``__pycache__`` beside the module), with a stamp that also covers every
source file of this directory. An edit of any kernel then recompiles every kernel once (about a minute),
the price of never running stale code. Uses Numba's locator classes and ``CacheImpl._locator_classes``
(``numba.core.caching``); where they are not found (another Numba), Numba's own stamps stay in force.
"""
from __future__ import annotations

import functools
import hashlib
import os

__all__ = ["install", "sources_stamp"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_PACKAGE = os.path.dirname(_HERE)


@functools.lru_cache(maxsize=1)
def sources_stamp() -> str:
    """A digest of every kernel source's name, modification time and size (this directory, and the package's
    ``config.py`` whose flags the kernels read at compile time), taken once per process."""
    paths = sorted(os.path.join(_HERE, f) for f in os.listdir(_HERE) if f.endswith(".py"))
    paths.append(os.path.join(_PACKAGE, "config.py"))
    digest = hashlib.sha256()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:  # removed meanwhile: its absence is part of the stamp
            digest.update(f"{os.path.basename(path)}:-\n".encode())
            continue
        digest.update(f"{os.path.basename(path)}:{st.st_mtime_ns}:{st.st_size}\n".encode())
    return digest.hexdigest()


def _ours(py_file: str) -> bool:
    try:
        return os.path.commonpath([os.path.abspath(py_file), _PACKAGE]) == _PACKAGE
    except ValueError:  # another drive (Windows)
        return False


def _locator(base):
    """``base`` (a Numba source-file locator) for this package's files only, its stamp extended."""

    class PackageLocator(base):
        def get_source_stamp(self):
            return super().get_source_stamp(), sources_stamp()

        @classmethod
        def from_function(cls, py_func, py_file):
            if not _ours(py_file):
                return None
            return super().from_function(py_func, py_file)

    PackageLocator.__name__ = PackageLocator.__qualname__ = "Fastconv" + base.__name__.lstrip("_")
    return PackageLocator


_INSTALLED: list = []


def install() -> bool:
    """Put the package's locators first in Numba's list (once). Returns whether they are in place."""
    if _INSTALLED:
        return True
    try:
        from numba.core import caching
    except ImportError:
        return False
    bases = [getattr(caching, name, None) or getattr(caching, "_" + name, None)
             for name in ("UserProvidedCacheLocator", "InTreeCacheLocator")]
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    if None in bases or not isinstance(getattr(impl, "_locator_classes", None), list):
        return False
    ours = [_locator(base) for base in bases]  # the user's directory first, as in Numba's own order
    impl._locator_classes[:0] = ours
    _INSTALLED.extend(ours)
    return True
