"""No op's CUDA path makes the host wait for the GPU (DESIGN.md section 6, issue 14).

A host sync (``.item()``, ``.tolist()``, ``bool(tensor)``, ``torch.cuda.synchronize()`` ...) stalls
every training step and fails under CUDA-graph capture. The ops run here on the CPU harness
(target "cuda-emu", the same host code as the GPU) with every such call patched to raise, forward
and backward. Bad indices are reported by a device-side assert (``torch._assert_async``), not by
reading a flag back. The autotuner must not time candidates while a graph is captured.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

import fastconv
import fastconv.functional as F
from fastconv import autotune, registry

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU harness needs g++")


class HostSync(AssertionError):
    pass


#: The harness itself reads CPU tensors as numpy arrays to run a kernel: that is the stand-in for
#: the GPU, not the host code under test.
HARNESS = str(Path(fastconv.__file__).resolve().parent / "emu")


def _refuse(name, real=None):
    def refuse(*args, **kwargs):
        if real is not None and sys._getframe(1).f_code.co_filename.startswith(HARNESS):
            return real(*args, **kwargs)
        raise HostSync(f"{name} called on the CUDA path: a host sync on a GPU")
    return refuse


@pytest.fixture
def no_syncs(monkeypatch):
    """Every host-sync entry point raises inside the block."""
    def patch():
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"):
            monkeypatch.setattr(torch.Tensor, name, _refuse(f"Tensor.{name}", getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch.cuda, "synchronize", _refuse("torch.cuda.synchronize"))
        monkeypatch.setattr(torch.cuda.Stream, "synchronize", _refuse("Stream.synchronize"))
        monkeypatch.setattr(torch.cuda.Event, "synchronize", _refuse("Event.synchronize"))
        monkeypatch.setattr(torch, "nonzero", _refuse("torch.nonzero"))
    return patch


def _x(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


OPS = {
    "conv2d_direct": lambda: F.conv2d(_x(2, 3, 7, 6), _x(4, 3, 3, 3), _x(4), stride=2, padding=1, algo="cuda-direct"),
    "conv2d_igemm": lambda: F.conv2d(_x(2, 3, 7, 6), _x(4, 3, 3, 3), padding=1, algo="implicit-gemm"),
    "conv2d_depthwise": lambda: F.conv2d(_x(2, 3, 6, 6), _x(6, 1, 3, 3), groups=3, algo="cuda-depthwise"),
    "conv2d_auto": lambda: F.conv2d(_x(2, 3, 7, 6), _x(4, 3, 3, 3), padding="same"),
    "conv1d": lambda: F.conv1d(_x(2, 3, 9), _x(4, 3, 3), padding=1),
    "conv3d": lambda: F.conv3d(_x(1, 2, 4, 5, 4), _x(3, 2, 2, 3, 2)),
    "conv_transpose2d": lambda: F.conv_transpose2d(_x(2, 3, 5, 5), _x(3, 4, 3, 3), stride=2),
    "max_pool2d": lambda: F.max_pool2d(_x(2, 3, 7, 6), 3, 2, 1),
    "min_pool2d": lambda: F.min_pool2d(_x(2, 3, 7, 6), 2),
    "max_pool3d": lambda: F.max_pool3d(_x(1, 2, 4, 5, 5), 2),
    "avg_pool2d": lambda: F.avg_pool2d(_x(2, 3, 7, 6), 3, 2, 1, ceil_mode=True),
    "adaptive_avg_pool2d": lambda: F.adaptive_avg_pool2d(_x(2, 3, 7, 6), 1),
    "adaptive_max_pool2d": lambda: F.adaptive_max_pool2d(_x(2, 3, 7, 6), (3, 2)),
    # lp_pool2d is avg_pool2d plus elementwise torch ops; its functional layer turns a host-side
    # CPU tensor (the kernel size) into an int, which this CPU-only detector cannot tell from a read
    # of device data, so it is covered through avg_pool2d.
    "max_unpool2d": lambda: _unpool(),
}


def _unpool():
    x = _x(2, 3, 6, 6)
    y, i = F.max_pool2d(x, 2, return_indices=True)
    return F.max_unpool2d(y, i, 2)


@pytest.mark.parametrize("op", sorted(OPS))
def test_op_forward_and_backward_make_no_host_sync(op, no_syncs):
    torch.manual_seed(0)
    with fastconv.backend("cuda-emu"):
        no_syncs()
        out = OPS[op]()
        leaves = [t for t in _leaves(out)]
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
    assert any(g is not None for g in grads)


def _leaves(out):
    seen, stack, leaves = set(), [out.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.append(fn.variable)
        stack.extend(f for f, _ in fn.next_functions)
    return leaves


def test_the_detector_catches_a_sync(no_syncs):
    """The patched entry points really raise (else the test above could not fail)."""
    t = torch.ones(2)
    no_syncs()
    with pytest.raises(HostSync):
        t.sum().item()
    with pytest.raises(HostSync):
        bool(t.sum())


def test_bad_index_is_a_device_side_assert_not_a_read_back(no_syncs, monkeypatch):
    """max_unpool's index check goes through torch._assert_async (on the CPU harness it raises)."""
    calls = []
    real = torch._assert_async
    monkeypatch.setattr(torch, "_assert_async", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    idx = torch.zeros(1, 2, 2, 2, dtype=torch.int64)
    idx[0, 1, 1, 1] = 99
    with fastconv.backend("cuda-emu"):
        no_syncs()
        with pytest.raises(RuntimeError, match="invalid max index"):
            torch.ops.fastconv.max_unpool(x, idx, [4, 4])
    assert calls


def test_autotuner_does_not_time_under_graph_capture(monkeypatch):
    """Under stream capture a CUDA geometry falls back to the heuristic instead of timing."""
    from fastconv.ops.conv import make_geometry

    geom = make_geometry(2, 32, 256, 256, 1, (56, 56), (3, 3), None, (1, 1), (1, 1), (1, 1), (1, 1),
                         torch.float32, "cuda")
    assert len(registry.candidates(geom)) >= 2 and geom.macs >= autotune.MIN_MACS
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(autotune, "_measure", _refuse("autotune._measure"))
    monkeypatch.setattr(autotune, "_memory", {})
    monkeypatch.setattr(autotune, "_ensure_loaded", lambda: None)
    # nothing on disk either (reading it fingerprints the GPU, which this CPU-only torch cannot name)
    monkeypatch.setattr(autotune, "_read_one", lambda key: None)
    with autotune.enabled(True):
        assert autotune.lookup(geom, "forward") is None
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with autotune.enabled(True), pytest.raises(HostSync):  # the same call times when not capturing
        autotune.lookup(geom, "forward")
