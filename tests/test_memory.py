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
    assert out.flags.c_contiguous and out.flags.writeable and out.flags.owndata
    assert not out.any()


def test_zeros_memory_is_not_shared_between_calls():
    a = memory.zeros((4, 5), np.float32)
    b = memory.zeros((4, 5), np.float32)
    a += 1
    assert not b.any() and a.all()
