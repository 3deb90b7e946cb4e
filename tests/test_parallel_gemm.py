"""Whole-array products on the own GEMM kernels (fastconv.cpu.parallel_gemm, and fastconv.cpu.blas where it
routes to them): stacks with shared or per-product operands, transposed views, accumulation, the bias, products
split into row and column blocks between tasks, the serial path, and both routes of ``blas.matmul`` against
numpy in float64 and float32."""
import numpy as np
import pytest

from fastconv.cpu import blas, jit_gemm, parallel_gemm


def _operands(rng, dtype, S, M, K, N, a_shared, b_transposed_view):
    a = rng.standard_normal((M, K) if a_shared else (S, M, K)).astype(dtype)
    if b_transposed_view:  # a view whose rows run along the reduction (a weight gradient's columns^T)
        b = np.swapaxes(rng.standard_normal((S, N, K)).astype(dtype), -1, -2)
    else:
        b = rng.standard_normal((S, K, N)).astype(dtype)
    return a, b


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("S,M,K,N", [(1, 100, 70, 300), (3, 9, 200, 130), (2, 64, 300, 64), (1, 1, 1, 1)])
@pytest.mark.parametrize("a_shared", [True, False])
@pytest.mark.parametrize("b_transposed_view", [False, True])
@pytest.mark.parametrize("accumulate,with_bias", [(False, False), (False, True), (True, False)])
def test_matmul_matches_numpy(monkeypatch, dtype, S, M, K, N, a_shared, b_transposed_view, accumulate, with_bias):
    monkeypatch.setattr(parallel_gemm, "PARALLEL_MIN_MACS", 1)  # the region on every thread, blocks split
    rng = np.random.default_rng(S * 7 + M + K + N)
    a, b = _operands(rng, dtype, S, M, K, N, a_shared, b_transposed_view)
    out = rng.standard_normal((S, M, N)).astype(dtype)
    bias = rng.standard_normal(M).astype(dtype) if with_bias else None
    want = np.matmul(a.astype(np.float64), b.astype(np.float64))
    want = want + out if accumulate else want
    if bias is not None:
        want = want + bias[:, None]
    if not accumulate:
        out[:] = np.nan
    got = parallel_gemm.matmul(a, b, out, bias=bias, accumulate=accumulate)
    assert got is out
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol * np.sqrt(K) * 4)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("S,M,K,N", [(5, 70, 40, 150), (1, 9, 3, 7), (3, 64, 300, 64)])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("parallel_min_macs", [1, 10 ** 12])
def test_summed_stack_matches_numpy(monkeypatch, dtype, S, M, K, N, accumulate, parallel_min_macs):
    """``summed``: one (M, N) result holding the sum of the stack's products (a weight gradient over images),
    with a transposed-view ``b`` as the 1x1 weight gradient passes it; on every thread and on one."""
    monkeypatch.setattr(parallel_gemm, "PARALLEL_MIN_MACS", parallel_min_macs)
    rng = np.random.default_rng(S + M + K + N)
    a, b = _operands(rng, dtype, S, M, K, N, False, True)
    out = rng.standard_normal((M, N)).astype(dtype)
    want = np.matmul(a.astype(np.float64), b.astype(np.float64)).sum(0) + (out if accumulate else 0)
    if not accumulate:
        out[:] = np.nan
    parallel_gemm.matmul(a, b, out, accumulate=accumulate, summed=True)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol * np.sqrt(K * S) * 4)


def test_blocks_cover_the_threads():
    """A lone product is split so that every thread has a block; a stack of as many products as threads is not."""
    assert parallel_gemm._blocks(1, 256, 1024, 2) == (1, 2)
    assert parallel_gemm._blocks(1, 256, 32, 2) == (2, 1)  # too few columns: rows instead
    assert parallel_gemm._blocks(8, 256, 1024, 2) == (1, 1)
    assert parallel_gemm._blocks(3, 256, 1024, 2) == (1, 2)
    assert parallel_gemm._blocks(1, 8, 16, 4) == (1, 1)  # too small to split at all


def test_serial_below_the_threshold(monkeypatch):
    monkeypatch.setattr(parallel_gemm, "PARALLEL_MIN_MACS", 10 ** 12)
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((30, 40)), rng.standard_normal((40, 50))
    out = np.empty((30, 50))
    np.testing.assert_allclose(parallel_gemm.matmul(a, b, out), a @ b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("own", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_blas_routes_give_the_same_products(monkeypatch, own, dtype):
    """``blas.matmul`` and ``blas.matmul_add`` on the own kernels (a spy counts them) and on torch's: 2-D,
    stacked, a shared operand, a transposed view, a new or a given (strided-row) output."""
    if blas.GEMM_LIBRARY != "torch":
        pytest.skip("FASTCONV_GEMM=numpy: the products run on numpy")
    calls = []
    real = parallel_gemm.matmul
    monkeypatch.setattr(parallel_gemm, "matmul", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    previous = jit_gemm.use_own_gemm(own)
    try:
        rng = np.random.default_rng(3)
        a = rng.standard_normal((4, 20, 33)).astype(dtype)
        b = rng.standard_normal((4, 33, 70)).astype(dtype)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(blas.matmul(a, b), np.matmul(a, b), **tol)
        np.testing.assert_allclose(blas.matmul(a[0], b), np.matmul(a[0], b), **tol)
        np.testing.assert_allclose(blas.matmul(a[1], b[2].T.copy().T), a[1] @ b[2], **tol)
        wide = np.zeros((20, 100), dtype)
        blas.matmul(a[0], b[0], out=wide[:, 10:80])
        np.testing.assert_allclose(wide[:, 10:80], a[0] @ b[0], **tol)
        assert not wide[:, :10].any() and not wide[:, 80:].any()
        acc = rng.standard_normal((4, 20, 70)).astype(dtype)
        want = acc + np.matmul(a, b)
        blas.matmul_add(a, b, acc)
        np.testing.assert_allclose(acc, want, **tol)
    finally:
        jit_gemm.use_own_gemm(previous)
    assert len(calls) == (5 if own else 0)


_COMPILE_CHECK = """
import warnings, numpy as np
from numba.core.errors import NumbaPerformanceWarning
warnings.simplefilter("error", NumbaPerformanceWarning)
from fastconv.cpu import parallel_gemm
parallel_gemm.PARALLEL_MIN_MACS = 1
a = np.ones((16, 8), np.float32); b = np.ones((3, 8, 70), np.float32)
parallel_gemm.matmul(a, b, np.empty((3, 16, 70), np.float32))
parallel_gemm.matmul(a, b, np.empty((16, 70), np.float32), summed=True)
print("parallel ok")
"""


def test_the_region_compiles_parallel(tmp_path):
    """Compiled from nothing (an empty Numba cache), the region's prange loop becomes a parallel loop: Numba
    only warns when it cannot (a conditional expression in prange's argument did that once, and the region ran
    on one thread), so the warning is an error here."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parallel ok" in done.stdout
