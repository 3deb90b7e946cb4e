"""Numba and torch share the process: forked DataLoader workers, Python threads, thread counts."""
from __future__ import annotations

import multiprocessing
import threading

import numba
import pytest
import torch
import torch.nn.functional as TF

import fastconv
import fastconv.functional as F
from conftest import assert_close


class _ConvDataset(torch.utils.data.Dataset):
    """Each item is computed by a fastconv model inside the worker process."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(fastconv.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                         fastconv.nn.Conv2d(8, 4, 3, stride=2)).double()
        self.inputs = torch.randn(6, 3, 16, 16, dtype=torch.float64)

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, i):
        with torch.no_grad():
            return self.model(self.inputs[i:i + 1])[0]


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_forked_dataloader_workers_run_fastconv():
    data = _ConvDataset()
    # Run parallel kernels in the parent first: this is what kills forked children with GNU OpenMP.
    expected = torch.stack([data[i] for i in range(len(data))])
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


def test_threading_layer_is_fork_and_thread_safe():
    F.conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3))
    assert numba.threading_layer() == "tbb"
