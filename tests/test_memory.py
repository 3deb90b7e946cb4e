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
