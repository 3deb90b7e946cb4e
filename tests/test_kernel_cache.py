"""The CPU kernels' Numba cache is keyed by every kernel source, not only the defining file's
(:mod:`fastconv.cpu.kernel_cache`): a kernel inlined into another must not leave the other's cached code stale."""
import os

import pytest

from fastconv.cpu import im2col_fused, kernel_cache, micro_gemm


def test_the_kernels_use_the_package_locator():
    if not kernel_cache.install():
        pytest.skip("this Numba has no locator classes to extend; its own per-file stamps apply")
    for kernel in (micro_gemm.gemm_gather, im2col_fused._forward_gather_region.parallel):
        locator = kernel._cache._impl.locator
        assert type(locator) in kernel_cache._INSTALLED
        own, sources = locator.get_source_stamp()
        assert sources == kernel_cache.sources_stamp()


def test_a_foreign_function_keeps_numbas_locator():
    """Only this package's files: a user's own cached Numba function is none of our business."""
    if not kernel_cache.install():
        pytest.skip("this Numba has no locator classes to extend")
    for locator in kernel_cache._INSTALLED:
        assert locator.from_function(test_a_foreign_function_keeps_numbas_locator, __file__) is None


def test_the_stamp_follows_every_source_file(tmp_path, monkeypatch):
    """An edit of any kernel file (its modification time or size) changes the stamp; an untouched tree keeps it."""
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    for name in ("micro_gemm.py", "im2col_fused.py"):
        (cpu / name).write_text("x = 1\n")
    (tmp_path / "config.py").write_text("CACHE = True\n")
    monkeypatch.setattr(kernel_cache, "_HERE", str(cpu))
    monkeypatch.setattr(kernel_cache, "_PACKAGE", str(tmp_path))
    stamp = kernel_cache.sources_stamp.__wrapped__
    before = stamp()
    assert stamp() == before
    st = os.stat(cpu / "micro_gemm.py")
    os.utime(cpu / "micro_gemm.py", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    edited = stamp()
    assert edited != before
    (tmp_path / "config.py").write_text("CACHE = False\n")
    assert stamp() != edited
