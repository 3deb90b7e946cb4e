"""Numba and torch share the process: forked DataLoader workers, Python threads, thread counts."""
from __future__ import annotations

import multiprocessing
import os
import platform
import subprocess
import sys
import threading

import numba
import pytest
import torch
import torch.nn.functional as TF

import fastconv
import fastconv.functional as F
from helpers import assert_close


class _ConvDataset(torch.utils.data.Dataset):
    """Each item is computed by a fastconv model inside the worker process."""

    def __init__(self):
        torch.manual_seed(0)
        # the last two: im2col's fused region (dense 2-D) and shift's kernels (narrow groups), whose
        # parallel compilations are chosen by their callers rather than by the kernel wrapper
        self.model = torch.nn.Sequential(fastconv.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                         fastconv.nn.Conv2d(8, 16, 3, stride=2),
                                         fastconv.nn.Conv2d(16, 16, 3, padding=1, algo="im2col"),
                                         fastconv.nn.Conv2d(16, 4, 3, padding=1, groups=4, algo="shift")).double()
        self.inputs = torch.randn(6, 3, 16, 16, dtype=torch.float64)

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, i):
        with torch.no_grad():
            return self.model(self.inputs[i:i + 1])[0]


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_forked_dataloader_workers_run_fastconv(monkeypatch):
    from fastconv.cpu import parallel

    # Every size-gated kernel parallel, in the parent and (inherited through fork) in the workers: a parallel
    # launch in a child forked after one in the parent is what kills it under GNU OpenMP.
    for name in ("PARALLEL_MIN_ELEMENTS", "COMPUTE_PARALLEL_MIN_ELEMENTS", "POOL_PARALLEL_MIN_ELEMENTS"):
        monkeypatch.setattr(parallel, name, 0)
    from fastconv.cpu import im2col_fused, shift

    monkeypatch.setattr(im2col_fused, "PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(shift, "PARALLEL_MIN_MACS", 0)
    data = _ConvDataset()
    expected = torch.stack([data[i] for i in range(len(data))])
    assert numba.threading_layer() == fastconv.config.THREADING["layer"]  # raises if nothing ran in parallel
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2,
                                         multiprocessing_context="fork", timeout=120)
    got = torch.cat(list(loader))
    assert_close(got, expected)


def test_two_python_threads_calling_conv2d_at_once():
    x = torch.randn(4, 16, 24, 24)
    w = torch.randn(16, 16, 3, 3)
    expected = TF.conv2d(x, w, padding=1)
    results, errors = [], []

    def work(algo):
        try:
            for _ in range(5):
                results.append(F.conv2d(x, w, padding=1, algo=algo))
        except Exception as e:  # surfaced below: an exception in a thread would otherwise be lost
            errors.append(e)

    threads = [threading.Thread(target=work, args=(a,)) for a in ("direct", "im2col")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(results) == 10
    for r in results:
        assert_close(r, expected)


def test_numba_thread_count_follows_torch():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        F.conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3))
        assert numba.get_num_threads() == 1
        torch.set_num_threads(max(1, min(2, numba.config.NUMBA_NUM_THREADS)))
        F.conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3))
        assert numba.get_num_threads() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_threading_layer_is_the_one_chosen_and_thread_safe():
    # Numba's OpenMP layer where it loads (it shares the cores with torch's OpenMP ops without the
    # spinning-thread stalls TBB had, see fastconv.config), else TBB; both take launches from several
    # Python threads, so no lock.
    F.conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), algo="direct")
    assert numba.threading_layer() == fastconv.config.THREADING["layer"], fastconv.config.THREADING
    if "NUMBA_THREADING_LAYER" not in os.environ or os.environ["NUMBA_THREADING_LAYER"] == "omp":
        assert fastconv.config.THREADING["layer"] in ("omp", "tbb"), fastconv.config.THREADING
    assert fastconv.config.THREADING["needs_lock"] is False


TBB_SCRIPT = r"""
import torch, fastconv, fastconv.functional as F, numba
F.conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), algo="direct")
assert numba.threading_layer() == "tbb", (numba.threading_layer(), fastconv.config.THREADING)
assert fastconv.config.THREADING["needs_lock"] is False
print("ok")
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or sys.platform != "linux",
                    reason="the tbb wheel is a dependency on x86-64 Linux only")
def test_tbb_layer_loads_in_this_environment():
    # The fallback where OpenMP does not load, and what NUMBA_THREADING_LAYER=tbb asks for. In CI this runs
    # in the fresh venv the README's command made: TBB must load there (it did not, because the tbb wheel's
    # library sits in <venv>/lib where the loader does not look).
    env = dict(os.environ, NUMBA_THREADING_LAYER="tbb")
    proc = subprocess.run([sys.executable, "-c", TBB_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


FALLBACK_SCRIPT = r"""
import threading, warnings
import torch, torch.nn.functional as TF
import fastconv, fastconv.functional as F
import numba
x = torch.randn(4, 8, 20, 20); w = torch.randn(8, 8, 3, 3)
expected = TF.conv2d(x, w, padding=1)
errors = []
def work(algo):
    try:
        for _ in range(4):
            torch.testing.assert_close(F.conv2d(x, w, padding=1, algo=algo), expected, rtol=1e-4, atol=1e-4)
    except Exception as e:
        errors.append(e)
threads = [threading.Thread(target=work, args=(a,)) for a in ("direct", "im2col", "direct")]
[t.start() for t in threads]; [t.join() for t in threads]
assert not errors, errors
assert numba.threading_layer() == "workqueue", numba.threading_layer()
assert fastconv.config.THREADING["needs_lock"]
print("ok")
"""


def test_workqueue_fallback_serialises_threads():
    # Where TBB cannot load, Numba's workqueue layer is used: fork-safe, but it aborts the process
    # when two Python threads launch parallel kernels at once, so fastconv serialises the launches.
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    proc = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_blas_pools_follow_torch_threads():
    # numpy's and scipy's OpenBLAS pools do not follow torch.set_num_threads on their own; with four
    # pools on two cores the im2col GEMMs were seen to run 50x slower. fastconv keeps them in step.
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = torch.get_num_threads()
    try:
        for n in (1, max(1, min(2, numba.config.NUMBA_NUM_THREADS))):
            torch.set_num_threads(n)
            F.conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 4, 3, 3), algo="im2col")
            blas = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
            if not blas:
                pytest.skip("no BLAS library visible to threadpoolctl in this process")
            assert {p["num_threads"] for p in blas} == {n}, blas
    finally:
        torch.set_num_threads(before)


def test_kernel_gemms_run_on_torchs_blas():
    # One BLAS runtime per process: the im2col/1x1/Winograd GEMMs run through torch.matmul on torch's
    # thread pool (fastconv.cpu.blas), not on numpy's OpenBLAS pool, whose threads would compete with
    # torch's OpenMP threads for the same cores in a converted model.
    from fastconv.cpu import blas
    if blas.GEMM_LIBRARY != "torch":
        pytest.skip(f"FASTCONV_GEMM={os.environ.get('FASTCONV_GEMM')} selects numpy's BLAS for this run")
    x, w = torch.randn(2, 16, 8, 8, dtype=torch.float64), torch.randn(8, 16, 1, 1, dtype=torch.float64)
    with torch.profiler.profile() as prof:
        y = torch.ops.fastconv.conv2d(x, w, None, [1, 1], [0, 0], [0, 0], [1, 1], 1, "im2col")
    names = {e.key for e in prof.key_averages()}
    assert names & {"aten::mm", "aten::bmm", "aten::matmul"}, sorted(names)
    assert_close(y, TF.conv2d(x, w))


def test_gemm_library_from_the_environment_is_checked(monkeypatch):
    from fastconv.cpu import blas
    monkeypatch.setenv("FASTCONV_GEMM", " NumPy")
    assert blas._library_from_env() == "numpy"
    monkeypatch.setenv("FASTCONV_GEMM", "mkl")
    with pytest.warns(RuntimeWarning, match="FASTCONV_GEMM='mkl' is not one of torch, numpy"):
        assert blas._library_from_env() == "torch"


LAUNCH_SCRIPT = r"""
import torch
torch.set_num_threads(1)
import numba, fastconv.functional as F
F.conv2d(torch.randn(2, 8, 16, 16), torch.randn(8, 8, 3, 3), padding=1, algo="im2col")
print(torch.get_num_threads(), numba.get_num_threads())
"""


def test_first_conv_leaves_torchs_thread_count_alone():
    # Numba's OpenMP pool shares torch's libgomp and, when its threads are launched (the first conv of a
    # process), set the OpenMP thread count of the launching thread to the pool's size: a process that had
    # asked torch for one thread ran on two from then on. Needs a process whose pool is not launched yet.
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    run = subprocess.run([sys.executable, "-c", LAUNCH_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-2:] == ["1", "1"], run.stdout
