"""The GEMM Numba kernels call from their parallel loops (fastconv.cpu.jit_gemm): results against numpy in
float32 and float64, both operand orientations, overwrite and accumulate, degenerate sizes, calls from
parallel tasks, the thread setting it leaves behind, and the scipy fallback in a process of its own."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from numba import njit, prange

from fastconv.cpu import jit_gemm

pytestmark = pytest.mark.skipif(jit_gemm.SOURCE is None, reason="neither torch's MKL nor scipy's BLAS was found")


@pytest.fixture(params=["own", "library"])
def route(request):
    """Each test runs with the products on fastconv's own kernels and on the library."""
    previous = jit_gemm.use_own_gemm(request.param == "own")
    yield request.param
    jit_gemm.use_own_gemm(previous)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,k,n", [(3, 4, 5), (64, 64, 576), (1, 1, 1), (7, 13, 1), (1, 9, 2), (5, 0, 3)])
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("b_transposed", [False, True])
def test_gemm_matches_numpy(dtype, m, k, n, beta, b_transposed, route):
    rng = np.random.default_rng(m * 100 + k * 10 + n)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    c = rng.standard_normal((m, n)).astype(dtype)
    c[0, 0] = np.nan  # beta 0 must overwrite whatever c held, NaN included
    want = a.astype(np.float64) @ b.astype(np.float64) + (beta * c if beta else 0)
    jit_gemm.gemm(a, np.ascontiguousarray(b.T) if b_transposed else b, c, beta, b_transposed)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    if beta:
        want[0, 0] = np.nan
    np.testing.assert_allclose(c, want, rtol=tol, atol=tol * max(1, k))


def test_gemm_refuses_strided_operands():
    a = np.ones((4, 6))
    with pytest.raises(ValueError, match="C-contiguous"):
        jit_gemm.gemm(a[:, ::2], np.ones((3, 2)), np.zeros((4, 2)), 0.0, False)


@njit(parallel=True)
def _stacked(a, b, c):
    for i in prange(a.shape[0]):
        jit_gemm.gemm(a[i], b[i], c[i], 0.0, False)


def test_gemm_from_parallel_tasks_and_thread_setting_restored(route):
    """Called from a prange loop (what the Winograd kernels do), every task's GEMM is right, and torch's
    own thread count is what it was (the per-call MKL setting is thread-local and undone)."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((36, 32, 24)).astype(np.float32)
    b = rng.standard_normal((36, 24, 40)).astype(np.float32)
    c = np.empty((36, 32, 40), np.float32)
    threads = torch.get_num_threads()
    _stacked(a, b, c)
    np.testing.assert_allclose(c, a @ b, rtol=1e-4, atol=1e-4)
    assert torch.get_num_threads() == threads
    x = torch.randn(256, 256)
    torch.testing.assert_close(x @ x, torch.from_numpy(x.numpy().astype(np.float64) @ x.numpy()).float(),
                               rtol=1e-4, atol=1e-3)


_FALLBACK = """
import numpy as np, torch
import fastconv.functional as F
from fastconv.cpu import jit_gemm, winograd
assert jit_gemm.SOURCE == "scipy", jit_gemm.SOURCE
assert not jit_gemm.own_gemm_in_use()  # a forced library takes every product
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 5, 11, 9, dtype=torch.float64, generator=g, requires_grad=True)
w = torch.randn(6, 5, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
winograd.MIN_GEMM_TILES = 1  # the fused kernels even on this small input
for algo in ("winograd2", "winograd4"):
    y = F.conv2d(x, w, None, 1, 1, algo=algo)
    ref = torch.nn.functional.conv2d(x, w, None, 1, 1)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
    gy = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(y, (x, w), gy), torch.autograd.grad(ref, (x, w), gy)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
print("fallback ok")
"""


def test_scipy_fallback_runs_winograd():
    """Where torch has no MKL, the same kernels run on scipy's OpenBLAS (forced here by FASTCONV_JIT_GEMM)."""
    pytest.importorskip("scipy")
    env = dict(os.environ, FASTCONV_JIT_GEMM="scipy")
    done = subprocess.run([sys.executable, "-c", _FALLBACK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fallback ok" in done.stdout


def test_library_choice_from_the_environment_is_checked(monkeypatch):
    monkeypatch.setenv("FASTCONV_JIT_GEMM", " SciPy")
    assert jit_gemm._wanted_from_env() == "scipy"
    monkeypatch.setenv("FASTCONV_JIT_GEMM", "openblas")
    with pytest.warns(RuntimeWarning, match="FASTCONV_JIT_GEMM='openblas' is not one of auto, own, mkl, scipy"):
        assert jit_gemm._wanted_from_env() == "auto"


def test_own_kernels_can_be_asked_for():
    """``FASTCONV_JIT_GEMM=own`` starts with the own kernels wherever they can run (on an Intel CPU with AVX-512 the
    default is MKL), and the library stays bound behind them."""
    from fastconv.cpu import micro_gemm

    if not micro_gemm.HOST_HAS_VECTOR_FMA:
        pytest.skip("the own kernels need AVX2 with FMA or AVX-512; this CPU has neither")
    env = dict(os.environ, FASTCONV_JIT_GEMM="own")
    code = "from fastconv.cpu import jit_gemm; print(jit_gemm.own_gemm_in_use(), jit_gemm.SOURCE)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    own, source = done.stdout.split()[-2:]
    assert own == "True"
    assert source in ("mkl", "scipy")
