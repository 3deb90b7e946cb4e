"""DistributedDataParallel over fastconv layers: two gloo processes on localhost, each with half the batch,
end with the same gradients and parameters as one process on the full batch.

DDP averages the ranks' gradients; with a mean loss over equal halves the average is exactly the full-batch
mean gradient, so in float64 the two runs agree to rounding.
"""
from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from helpers import assert_close

WORLD = 2
STEPS = 3
BATCH = 8
LR = 0.1
TIMEOUT_S = 240  # whole test, spawn and Numba cache loading included


def _model() -> nn.Module:
    import fastconv

    fnn = fastconv.nn
    torch.manual_seed(0)
    # no BatchNorm: its statistics are per rank under DDP, so the runs would legitimately differ
    return nn.Sequential(
        fnn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), fnn.MaxPool2d(2),
        fnn.Conv2d(6, 8, 3, groups=2), nn.ReLU(), fnn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, 10, 10, generator=g, dtype=torch.float64), torch.randint(0, 4, (BATCH,), generator=g)


def _train(model, x, y, record):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 0:
            record["grads"] = [p.grad.detach().clone() for p in model.parameters()]
        opt.step()
    record["params"] = [p.detach().clone() for p in model.parameters()]
    return record


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        x, y = _data()
        half = BATCH // WORLD
        record = _train(model, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half], {})
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo backend not built")
def test_ddp_two_processes_match_single_process(tmp_path):
    ctx = mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:  # only the workers this test started
            if p.is_alive():
                p.kill()
    records = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, y = _data()
    single = _train(_model(), x, y, {})
    for r, rec in enumerate(records):
        for i, (a, b) in enumerate(zip(rec["grads"], single["grads"])):
            assert_close(a, b, what=f"rank {r} first-step gradient {i}")
        for i, (a, b) in enumerate(zip(rec["params"], single["params"])):
            assert_close(a, b, what=f"rank {r} parameter {i} after {STEPS} steps")
    # the test can fail: the halves' own gradients differ from the full batch's
    model = _model()
    half = _train(model, x[:BATCH // WORLD], y[:BATCH // WORLD], {})
    assert not torch.allclose(half["grads"][0], single["grads"][0])
