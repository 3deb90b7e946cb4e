"""fastconv.cpu.memory.zeros: the zero arrays kernels accumulate into (written, not calloc'ed)."""
import numpy as np
import pytest

from fastconv.cpu import memory


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint8, np.bool_])
@pytest.mark.parametrize("shape", [(0,), 7, (3, 0, 2), (2, 3, 4), (1 << 21,)])
def test_zeros_is_a_zero_array_of_the_shape_and_dtype(shape, dtype):
    out = memory.zeros(shape, dtype)
    expected = np.zeros(shape, dtype)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert out.flags.c_contiguous and out.flags.writeable
    if out.size:  # (a cache line's start, as memory.empty_aligned's)
        assert out.ctypes.data % memory.ALIGN_BYTES == 0
    assert not out.any()


def test_zeros_memory_is_not_shared_between_calls():
    a = memory.zeros((4, 5), np.float32)
    b = memory.zeros((4, 5), np.float32)
    a += 1
    assert not b.any() and a.all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint8])
@pytest.mark.parametrize("shape", [(0,), 7, (3, 5), [4, 6], (2, 3, 4), (1 << 20,)])
def test_empty_aligned_starts_a_cache_line(shape, dtype):
    # numpy's own allocations start 16 or 32 bytes into a line; the kernels' 64-byte vector loads then straddle two
    out = memory.empty_aligned(shape, dtype)
    expected = np.empty(tuple(shape) if isinstance(shape, list) else shape, dtype)
    assert out.shape == expected.shape and out.dtype == expected.dtype and out.flags.c_contiguous
    if out.size:  # (an empty view's data pointer is numpy's placeholder: nothing is ever loaded from it)
        assert out.ctypes.data % memory.ALIGN_BYTES == 0
    out[...] = 3
    assert (out == 3).all()


def test_scratch_buffers_start_a_cache_line():
    memory.clear_scratch()
    for i, (shape, dtype) in enumerate([((5,), np.float32), ((3, 7), np.float64), ((1 << 18,), np.float32)]):
        a = memory.scratch(f"test_align_{i}", shape, dtype)
        assert a.shape == shape and a.dtype == dtype
        assert a.ctypes.data % memory.ALIGN_BYTES == 0
    memory.clear_scratch()


def _starts_a_line(t) -> bool:
    return t.data_ptr() % memory.ALIGN_BYTES == 0


@pytest.mark.parametrize("case", ["im2col", "winograd4", "depthwise", "shift", "group_lanes", "max_pool", "avg_pool",
                                  "adaptive_avg_pool", "adaptive_max_pool", "conv_transpose"])
def test_op_results_and_input_gradients_start_a_cache_line(case):
    """What the CPU kernels hand to torch starts a cache line, forward result and input gradient alike: torch's own
    vectorised ops that read them next ran slower on tensors 16 or 32 bytes into a line (a training BatchNorm's
    forward and backward on 8 x 64 x 32x32 0.89 -> 1.09 ms; in a converted ResNet-18's training step its
    BatchNorms took 14.3 ms against 10.1 in torch's model until the Winograd and pooling results were aligned)."""
    import torch

    import fastconv.functional as F

    torch.manual_seed(0)
    x = torch.randn(2, 16, 13, 13, requires_grad=True)
    w = torch.randn(16, 16, 3, 3)
    run = {
        "im2col": lambda: F.conv2d(x, w, padding=1, algo="im2col"),
        "winograd4": lambda: F.conv2d(x, w, padding=1, algo="winograd4"),
        "depthwise": lambda: F.conv2d(x, w[:, :1], padding=1, groups=16, algo="depthwise"),
        "shift": lambda: F.conv2d(x, w[:, :4], padding=1, groups=4, algo="shift"),
        "group_lanes": lambda: F.conv2d(x, w[:, :8], padding=1, groups=2, algo="group_lanes"),
        "max_pool": lambda: F.max_pool2d(x, 3, 2, 1),
        "avg_pool": lambda: F.avg_pool2d(x, 2, 2),
        "adaptive_avg_pool": lambda: F.adaptive_avg_pool2d(x, 5),
        "adaptive_max_pool": lambda: F.adaptive_max_pool2d(x, 5),
        "conv_transpose": lambda: F.conv_transpose2d(x, w, stride=2),
    }[case]
    for _ in range(3):  # several allocations: one aligned by chance proves nothing
        x.grad = None
        y = run()
        assert _starts_a_line(y), case
        y.backward(torch.ones_like(y))
        assert _starts_a_line(x.grad), case
