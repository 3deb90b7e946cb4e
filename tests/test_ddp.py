"""DistributedDataParallel over fastconv layers: two gloo processes on localhost, each with half the batch,
end with the same gradients and parameters as one process on the full batch.

DDP averages the ranks' gradients; with a mean loss over equal halves the average is exactly the full-batch
mean gradient, so in float64 the two runs agree to rounding.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback
import warnings

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
    except Exception:  # for the parent's failure message (the hard exit below skips torch's own reporting)
        with open(os.path.join(out_dir, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    # torch 2.13's gloo sometimes aborts the interpreter's own teardown ("terminate called without an active
    # exception", SIGABRT) after all the work is done and saved, with or without fastconv in the model; a
    # hard exit skips that teardown so the test measures DDP, not torch's shutdown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo backend not built")
def test_ddp_two_processes_match_single_process(tmp_path):
    ctx = mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in ctx.processes:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(p.is_alive() for p in ctx.processes):
            pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:  # only the workers this test started
            if p.is_alive():
                p.kill()
    saved = [tmp_path / f"rank{r}.pt" for r in range(WORLD)]
    codes = [p.exitcode for p in ctx.processes]
    failures = []
    for r, (path, code) in enumerate(zip(saved, codes)):
        # a worker that died before saving failed the training itself: that is a failure
        if not path.exists():
            error_file = tmp_path / f"rank{r}.error"
            error = error_file.read_text() if error_file.exists() else "no traceback (killed or crashed)"
            failures.append(f"DDP rank {r} exited with code {code} before saving its results:\n{error}")
        elif code != 0:  # it trained and saved, then died in destroy_process_group (torch's teardown, see above)
            warnings.warn(f"DDP rank {r} exited with code {code} after saving its results (torch teardown)")
    if failures:
        pytest.fail("\n".join(failures))
    records = [torch.load(path) for path in saved]
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
