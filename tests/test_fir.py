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


def _check_channel_rows(out, src, base, row_step, offs, wts, T, rows, cols, step):
    """``out`` of a channel-rows kernel against numpy in float64 (the bias after the taps), and nothing written
    past the last position."""
    w = wts.astype(np.float64).reshape(T + 1, step)
    want = np.empty((rows, cols, step))
    for r in range(rows):
        for q in range(cols):
            at = base + r * row_step + q * step
            want[r, q] = w[T] + sum(w[t] * src[at + offs[t]:at + offs[t] + step] for t in range(T))
    tol = 1e-5 if out.dtype == np.float32 else 1e-13
    np.testing.assert_allclose(out[:rows * cols * step].reshape(rows, cols, step), want, rtol=tol,
                               atol=tol * np.sqrt(T) * 4)
    assert np.isnan(out[rows * cols * step:]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T", [1, 9, 49])
@pytest.mark.parametrize("cols", [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17])
@pytest.mark.parametrize("step", [16, 64])
def test_channel_rows_match_numpy(dtype, T, cols, step):
    """The channel-innermost tiles (``fir.channel_rows``: eight, four, two and one positions by one vector of
    channels, every lane of the ``step`` channels): against numpy for rows of every width around the tile sizes,
    two rows apart by a row step, the bias after the taps, nothing written past the last position."""
    rng = np.random.default_rng(T * 100 + cols * 7 + step)
    rows, row_step, base = 2, (cols + 9) * step, 3 * step
    src = rng.standard_normal(base + rows * row_step + 400 * step).astype(dtype)
    offs = (rng.integers(0, 400, T) * step).astype(np.int64)
    wts = rng.standard_normal((T + 1) * step).astype(dtype)
    out = np.full(rows * cols * step + 7, np.nan, dtype)
    fir.channel_rows(src, base, row_step, offs, wts, T, rows, cols, step, out)
    _check_channel_rows(out, src, base, row_step, offs, wts, T, rows, cols, step)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("KH, KW", [(1, 3), (3, 3), (5, 5), (7, 7), (2, 7)])
@pytest.mark.parametrize("cols", [1, 3, 4, 7, 8, 9, 15, 16, 17, 23])
@pytest.mark.parametrize("step", [16, 64, 96])
def test_channel_rows_by_window_match_numpy(dtype, KH, KW, cols, step):
    """The window tiles (``fir.channel_rows_by_window``: eight positions whose taps lie in rows of ``KW`` adjacent
    positions, each row's inputs loaded once; the last positions on the tap-by-tap tiles): against numpy for rows
    of every width around the tile size, rows of taps at any offsets, the bias after the taps, nothing written
    past the last position; and the same bits as :func:`fir.channel_rows_by_position`, which sums in the same
    order."""
    if fir._VECTOR_BYTES != 64:
        pytest.skip("the window tiles are built for 32 vector registers (AVX-512); this host has 256-bit vectors")
    rng = np.random.default_rng(KH * 1000 + KW * 100 + cols * 7 + step)
    T = KH * KW
    rows, row_step, base = 2, (cols + 9) * step, 3 * step
    src = rng.standard_normal(base + rows * row_step + 400 * step).astype(dtype)
    row_offs = (rng.integers(0, 300, KH) * step).astype(np.int64)
    offs = (row_offs[:, None] + np.arange(KW)[None, :] * step).reshape(-1).astype(np.int64)
    wts = rng.standard_normal((T + 1) * step).astype(dtype)
    out = np.full(rows * cols * step + 7, np.nan, dtype)
    fir.channel_rows_by_window(src, base, row_step, row_offs, KH, KW, offs, wts, T, rows, cols, step, out)
    _check_channel_rows(out, src, base, row_step, offs, wts, T, rows, cols, step)
    by_tap = np.full_like(out, np.nan)
    fir.channel_rows_by_position(src, base, row_step, offs, wts, T, rows, cols, step, by_tap)
    np.testing.assert_array_equal(out, by_tap)
