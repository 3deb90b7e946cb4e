"""The register-tiled many-tap sum behind the depthwise kernels (``fastconv.cpu.fir.fir``): against numpy in float32
and float64 for tap counts of 1x1 to 7x7 kernels and lengths across every tile edge (tiles of eight, two and one
64-byte vectors, then single elements), offsets in any order, and results written only where asked."""
import numpy as np
import pytest

from fastconv.cpu import fir


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T", [1, 2, 9, 25, 49])
@pytest.mark.parametrize("L", [1, 7, 8, 15, 16, 17, 31, 32, 33, 127, 128, 129, 160, 1030])
def test_fir_matches_numpy(dtype, T, L):
    rng = np.random.default_rng(T * 1000 + L)
    src = rng.standard_normal(L + 300).astype(dtype)
    offs = rng.integers(0, 300, T).astype(np.int64)
    wts = rng.standard_normal(T + 3).astype(dtype)  # only the first T are taps
    out = np.full(L + 5, np.nan, dtype)
    fir.fir(src, offs, wts, T, out, L)
    want = sum(wts[t].astype(np.float64) * src[offs[t]:offs[t] + L].astype(np.float64) for t in range(T))
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(out[:L], want, rtol=tol, atol=tol * np.sqrt(T) * 4)
    assert np.isnan(out[L:]).all()  # nothing written past L
