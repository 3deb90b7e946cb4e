"""fastconv's own GEMM micro-kernel (fastconv.cpu.micro_gemm): results against numpy in float32 and float64 at
sizes that cross every block and tile edge, both orientations of ``b``, overwrite (NaN in ``c`` included) and
accumulate, degenerate sizes, calls from parallel tasks, and its place behind :func:`jit_gemm.gemm`."""
import os
import platform
import sys

import numpy as np
import pytest
from numba import njit, prange

from fastconv.cpu import jit_gemm, micro_gemm

_NR32 = micro_gemm.NV * 16  # float32 columns per tile
_EDGES_M = [1, micro_gemm.MR - 1, micro_gemm.MR, micro_gemm.MR + 1, micro_gemm.MC + 3]
_EDGES_K = [1, 7, micro_gemm.KC, micro_gemm.KC + 5]
_EDGES_N = [1, _NR32 - 1, _NR32, _NR32 + 1, micro_gemm.NC + _NR32 + 3]


def _check(m, k, n, dtype, beta, b_transposed, seed=0):
    rng = np.random.default_rng(seed + m * 1000 + k * 10 + n)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if b_transposed else (k, n)).astype(dtype)
    c = rng.standard_normal((m, n)).astype(dtype)
    want = a.astype(np.float64) @ (b.T if b_transposed else b).astype(np.float64) + beta * c.astype(np.float64)
    if beta == 0.0:
        c[:] = np.nan  # overwritten, whatever it held
    micro_gemm.gemm(a, b, c, beta, b_transposed)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(c, want, rtol=tol, atol=tol * np.sqrt(max(k, 1)) * 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m", _EDGES_M)
@pytest.mark.parametrize("k", _EDGES_K)
@pytest.mark.parametrize("n", _EDGES_N)
def test_every_block_and_tile_edge_matches_numpy(dtype, m, k, n):
    _check(m, k, n, dtype, 0.0, False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("b_transposed", [False, True])
@pytest.mark.parametrize("m,k,n", [(micro_gemm.MR + 1, micro_gemm.KC + 5, micro_gemm.NC + _NR32 + 3),
                                   (64, 576, 200), (3, 2, 5)])
def test_orientations_and_accumulation_match_numpy(dtype, beta, b_transposed, m, k, n):
    _check(m, k, n, dtype, beta, b_transposed)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("b_transposed", [False, True])
@pytest.mark.parametrize("n", [4, 8, 15, 16, 17, 24, 31, 40, 48, 49, micro_gemm.NC + 16, micro_gemm.NC + 40])
def test_columns_short_of_a_whole_tile_run_on_half_width_panels(dtype, beta, b_transposed, n):
    """The columns after the last whole tile (fewer than NR) run on half-width tiles, read in place when exactly
    one vector wide and adjacent, packed otherwise: every width around one and two vectors of both dtypes (a
    vector holds 16 float32 or 8 float64), past a column block, rows and reduction across their edges."""
    _check(micro_gemm.MR * 2 + 3, micro_gemm.KC + 9, n, dtype, beta, b_transposed)


_NRW32 = micro_gemm.WIDE_NV * 16  # float32 columns per wide tile (0: no wide tile on this host)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("m", [1, micro_gemm.WIDE_MR - 1, micro_gemm.WIDE_MR, micro_gemm.WIDE_MR * 5 + 1,
                               micro_gemm.MC + 5])
@pytest.mark.parametrize("b_transposed", [False, True])
@pytest.mark.parametrize("n", [_NRW32 + _NR32 + 17, 3 * _NRW32, micro_gemm.NC + _NRW32 + 5])
def test_wide_panels_then_narrower_tiles_match_numpy(dtype, beta, m, b_transposed, n):
    """Whole panels of the wide tile (``WIDE_MR x WIDE_NV`` vectors; read in place, or packed from a transposed
    ``b``), then whole ``MR x NV`` tiles and half-width ones for the columns left: rows short of a wide tile
    (computed into a scratch tile), reduction blocks and a column block crossed, overwrite and accumulate, both
    dtypes (a float64 panel is half as wide)."""
    if micro_gemm.WIDE_NV == 0:
        pytest.skip("no wide tile on this host (it has no 512-bit vectors)")
    _check(m, micro_gemm.KC + 13, n, dtype, beta, b_transposed)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_empty_reduction_overwrites_or_keeps(beta):
    c = np.full((3, 4), np.nan if beta == 0.0 else 2.0, np.float32)
    micro_gemm.gemm(np.ones((3, 0), np.float32), np.ones((0, 4), np.float32), c, beta, False)
    np.testing.assert_array_equal(c, np.zeros((3, 4)) if beta == 0.0 else np.full((3, 4), 2.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_views_of_any_strides(dtype):
    """Row and column views, a transposed ``a`` and a ``b`` with gaps between columns are read as they are; ``c``
    may be a block of rows and columns of a bigger array."""
    rng = np.random.default_rng(5)
    big_a = rng.standard_normal((70, 90)).astype(dtype)
    big_b = rng.standard_normal((300, 120)).astype(dtype)
    for a in (big_a[3:40, 5:75], big_a[3:40, 5:75:2], big_a.T[5:75, 3:40].T, big_a[::-1][:37, :70]):
        for b in (big_b[7:7 + a.shape[1], 9:100], big_b[7:7 + a.shape[1], 9:100:3]):
            c_big = np.full((50, 200), 7.0, dtype)
            c = c_big[4:4 + a.shape[0], 10:10 + b.shape[1]]
            micro_gemm.gemm(a, b, c, 0.0, False)
            tol = 1e-4 if dtype == np.float32 else 1e-12
            np.testing.assert_allclose(c, a.astype(np.float64) @ b, rtol=tol, atol=tol * 10)
            c[:] = 7.0
            np.testing.assert_array_equal(c_big, 7.0)  # nothing outside the view was written


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (micro_gemm.MR + 1, 64, 2 * _NR32 + 17),
                                   (9, micro_gemm.KC + 37, 6), (3, 17, 10), (2, 16, 16)])
def test_transposed_views_are_packed_by_blocks(dtype, beta, m, k, n):
    """A transposed ``b`` (rows along the reduction) is packed by ``W x W`` blocks transposed in registers: every
    tile edge, reductions and panels that end short of a whole block, rows of views with gaps between them."""
    rng = np.random.default_rng(m + k + n)
    a = rng.standard_normal((m, k + 3)).astype(dtype)[:, 2:2 + k]
    b = rng.standard_normal((n, k + 5)).astype(dtype)[:, :k]
    c = rng.standard_normal((m, n)).astype(dtype)
    want = a.astype(np.float64) @ b.T.astype(np.float64) + beta * c
    if beta == 0.0:
        c[:] = np.nan
    micro_gemm.gemm(a, b, c, beta, True)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(c, want, rtol=tol, atol=tol * np.sqrt(k) * 4)


def test_misfits_are_refused():
    with pytest.raises(ValueError, match="columns must be adjacent"):
        micro_gemm.gemm(np.ones((4, 6)), np.ones((6, 4)), np.zeros((4, 8))[:, ::2], 0.0, False)
    with pytest.raises(ValueError, match="shapes do not match"):
        micro_gemm.gemm(np.ones((4, 6)), np.ones((5, 3)), np.zeros((4, 3)), 0.0, False)


@njit
def _line_offsets(sizes, like):
    """Where each of a run of internal buffers of ``sizes`` elements starts in its cache line (bytes)."""
    out = np.empty(sizes.shape[0], np.int64)
    for i in range(sizes.shape[0]):
        buf = micro_gemm._empty_line_aligned(sizes[i], like)
        buf[:] = 1.0  # every element is inside the allocation (NUMBA_BOUNDSCHECK checks the slice)
        out[i] = buf.ctypes.data % 64
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_internal_panel_and_tile_buffers_start_a_cache_line(dtype):
    # Numba's np.empty aligns to 32 bytes only: a packed panel half a line in made every 64-byte load of it
    # straddle two lines (the packed products ran 5-10% slower on the AVX-512 Xeon)
    sizes = np.array([1, 3, 16, 17, 48, 255, 4096, 8 * 32, 256 * 64 + 1] * 4, np.int64)
    offsets = _line_offsets(sizes, np.zeros(1, dtype))
    assert (offsets == 0).all(), offsets


@njit(parallel=True)
def _stacked(a, b, c):
    for i in prange(a.shape[0]):
        micro_gemm.gemm(a[i], b[i], c[i], 0.0, False)


def test_calls_from_parallel_tasks():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((12, 40, 70)).astype(np.float32)
    b = rng.standard_normal((12, 70, 90)).astype(np.float32)
    c = np.empty((12, 40, 90), np.float32)
    _stacked(a, b, c)
    np.testing.assert_allclose(c, a @ b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("vector_fma, avx512, source, vendor, wanted, own", [
    (True, True, "mkl", "AuthenticAMD", "auto", True),  # MKL would run AVX2 code: the own kernels
    (True, True, "mkl", "GenuineIntel", "auto", False),  # MKL runs AVX-512 code there, and faster
    (True, True, "scipy", "GenuineIntel", "auto", True),  # no MKL: the own kernels beat OpenBLAS's
    (True, False, "mkl", "GenuineIntel", "auto", True),  # AVX2 only: the own kernels read operands in place
    (True, True, "mkl", "", "auto", True),  # vendor unknown: as before
    (True, True, "mkl", "GenuineIntel", "own", True),  # asked for
    (True, True, "mkl", "AuthenticAMD", "mkl", False),
    (False, False, "mkl", "AuthenticAMD", "own", False),  # cannot run here
])
def test_default_route_by_host(monkeypatch, vector_fma, avx512, source, vendor, wanted, own):
    """Which route a host starts on: the own kernels unless MKL runs its 512-bit code (Intel, AVX-512) or the
    environment chose a library; never where the own kernels cannot run."""
    monkeypatch.setattr(micro_gemm, "HOST_HAS_VECTOR_FMA", vector_fma)
    monkeypatch.setattr(micro_gemm, "HOST_HAS_AVX512", avx512)
    monkeypatch.setattr(jit_gemm, "SOURCE", source)
    monkeypatch.setattr(jit_gemm, "_cpu_vendor", lambda: vendor)
    assert jit_gemm.default_own_gemm(wanted) is own


@pytest.mark.parametrize("vector_fma, avx512, source, vendor, wanted, expected", [
    (True, True, "mkl", "GenuineIntel", "auto", True),  # chosen for speed: small convs may still take the own kernels
    (True, True, "mkl", "GenuineIntel", "mkl", False),  # asked for: MKL for everything
    (True, True, "mkl", "GenuineIntel", "own", False),
    (True, True, "mkl", "AuthenticAMD", "auto", False),  # the own kernels are the default there
    (True, True, "scipy", "GenuineIntel", "auto", False),
    (False, False, "mkl", "GenuineIntel", "auto", False),  # no own kernels at all
])
def test_mkl_by_default_only_where_chosen_for_speed(monkeypatch, vector_fma, avx512, source, vendor, wanted, expected):
    """:func:`mkl_by_default`: the library route was picked because MKL was the faster here, not asked for."""
    monkeypatch.setattr(micro_gemm, "HOST_HAS_VECTOR_FMA", vector_fma)
    monkeypatch.setattr(micro_gemm, "HOST_HAS_AVX512", avx512)
    monkeypatch.setattr(jit_gemm, "SOURCE", source)
    monkeypatch.setattr(jit_gemm, "_cpu_vendor", lambda: vendor)
    assert jit_gemm.mkl_by_default(wanted) is expected


def test_cpu_vendor_is_read():
    """The vendor string comes from the kernel's CPU table where there is one (Linux), else it is empty."""
    vendor = jit_gemm._cpu_vendor()
    assert isinstance(vendor, str)
    if sys.platform.startswith("linux") and os.path.exists("/proc/cpuinfo") and platform.machine() in ("x86_64",
                                                                                                      "AMD64"):
        assert vendor, "no vendor_id line read from /proc/cpuinfo"


def test_jit_gemm_routes_by_the_switch():
    """The switch is on by default exactly where the CPU has 512-bit vectors or AVX2 with FMA (and no library was
    forced), except on an Intel CPU with 512-bit vectors and torch's MKL; both routes give the same product."""
    assert jit_gemm.own_gemm_in_use() == jit_gemm.default_own_gemm()
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((19, 300)), rng.standard_normal((300, 45))
    results = []
    previous = jit_gemm.use_own_gemm(True)
    try:
        for own in (True, False):
            jit_gemm.use_own_gemm(own)
            assert jit_gemm.own_gemm_in_use() is own
            c = np.full((19, 45), np.nan)
            jit_gemm.gemm(a, b, c, 0.0, False)
            results.append(c)
    finally:
        jit_gemm.use_own_gemm(previous)
    np.testing.assert_allclose(results[0], a @ b, rtol=1e-12, atol=1e-11)
    np.testing.assert_allclose(results[1], a @ b, rtol=1e-12, atol=1e-11)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,C,KH,KW,Wp,rows", [(32, 128, 3, 3, 18, 16), (9, 5, 3, 3, 10, 4), (64, 3, 7, 7, 134, 3),
                                              (3, 300, 1, 2, 40, 2), (micro_gemm.MC + 5, 30, 3, 3, 35, 1)])
def test_taps_product_matches_numpy(dtype, m, C, KH, KW, Wp, rows):
    """:func:`gemm_taps`: rows of ``B`` are windows of one flat array at the taps' offsets (a stride-1 conv over a
    padded input); every tile edge, reductions across blocks, a base offset, NaN in ``c`` overwritten."""
    rng = np.random.default_rng(m + C + Wp)
    Hp = rows + KH - 1
    base = 7
    x = rng.standard_normal(base + C * Hp * Wp).astype(dtype)
    taps = np.array([c * Hp * Wp + kh * Wp + kw for c in range(C) for kh in range(KH) for kw in range(KW)],
                    np.int64)
    n = (rows - 1) * Wp + Wp - KW + 1  # the last row's positions up to the last full window
    a = rng.standard_normal((m, taps.size)).astype(dtype)
    b = np.stack([x[base + t:base + t + n] for t in taps])
    c = np.full((m, n), np.nan, dtype)
    micro_gemm.gemm_taps(a, x, base, taps, c)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(c, a.astype(np.float64) @ b, rtol=tol, atol=tol * np.sqrt(taps.size) * 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("b_transposed", [False, True])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (micro_gemm.MR - 1, 9, _NR32 + 1), (micro_gemm.MC + 5, micro_gemm.KC + 21, 40),
                                   (micro_gemm.MR + 1, 2 * micro_gemm.KC, 2 * _NR32), (33, 17, 3),
                                   (micro_gemm.MC + 7, micro_gemm.KC + 3, 5 * _NR32 + 5),
                                   # last panels of 1.5, 0.5 and 1 panel widths, a half panel after a wide tile
                                   (2 * micro_gemm.MR + 3, 30, _NR32 + _NR32 // 2), (9, 5, _NR32 // 2),
                                   (micro_gemm.MR, 7, 2 * _NR32 + _NR32 + _NR32 // 2), (micro_gemm.MR * 3, 11, _NR32),
                                   (micro_gemm.MR, 9, 56)])
def test_gathered_product_matches_numpy(dtype, beta, b_transposed, m, k, n):
    """:func:`gemm_gather`: ``A[i, p] = x[base + row_off[i] + step_off[p]]`` (offsets in any order, repeated and
    overlapping) times a ``B`` packed by :func:`pack_b` from a plain or a transposed view (register transposes); every
    tile edge (the wide tile's two panels, then the panels left and the partial one), reductions across blocks, a base
    offset, overwrite (NaN in ``c``) and accumulate."""
    rng = np.random.default_rng(m * 7 + k * 3 + n)
    base = 3
    x = rng.standard_normal(base + 3000).astype(dtype)
    row_off = rng.integers(0, 1500, m).astype(np.int64)
    step_off = rng.integers(0, 1500, k).astype(np.int64)
    a = x[base + row_off[:, None] + step_off[None, :]].astype(np.float64)
    b = rng.standard_normal((k, n)).astype(dtype)
    b_view = np.ascontiguousarray(b.T).T if b_transposed else b
    bp = np.full(micro_gemm.packed_size(k, n, x.itemsize) + 7, np.nan, dtype)
    micro_gemm.pack_b(b_view, bp)
    c = rng.standard_normal((m, n)).astype(dtype)
    want = a @ b + beta * c.astype(np.float64)
    if beta == 0.0:
        c[:] = np.nan
    micro_gemm.gemm_gather(x, base, row_off, step_off, bp, c, beta)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(c, want, rtol=tol, atol=tol * np.sqrt(k) * 4)
    with pytest.raises(ValueError, match="shapes do not match"):
        micro_gemm.gemm_gather(x, base, row_off, step_off, bp[:micro_gemm.packed_size(k, n, x.itemsize) - 1], c, beta)
    with pytest.raises(ValueError, match="shapes do not match"):
        micro_gemm.gemm_gather(x, base, np.append(row_off, 0), step_off, bp, c, beta)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_packed_operand_from_pieces_is_the_whole_packed(dtype):
    """:func:`pack_b_rows`: a ``B`` packed piece by piece (row ranges, transposed views as the weight gradient's
    output-gradient pieces are) is the same panels as :func:`pack_b` of the whole."""
    rng = np.random.default_rng(1)
    k, n = 45, 2 * _NR32 + 5
    b = rng.standard_normal((n, k)).astype(dtype).T  # a transposed view
    whole = np.zeros(micro_gemm.packed_size(k, n, b.itemsize), dtype)
    micro_gemm.pack_b(b, whole)
    pieces = np.full_like(whole, np.nan)
    for p0, p1 in ((0, 16), (16, 17), (17, 45)):
        micro_gemm.pack_b_rows(b[p0:p1], pieces, k, p0)
    np.testing.assert_array_equal(pieces, whole)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,n", [(1, 1), (16, 16), (17, 33), (48, 5), (3, 100)])
def test_transpose_into_matches_numpy(dtype, m, n):
    """:func:`transpose_into`: whole register blocks and both edges, into a view with other rows around it."""
    rng = np.random.default_rng(m + n)
    src = rng.standard_normal((m, n + 3)).astype(dtype)[:, 1:n + 1]  # rows strided, columns adjacent
    dst = np.full((n, m + 5), np.nan, dtype)
    micro_gemm.transpose_into(src, dst[:, 2:m + 2])
    np.testing.assert_array_equal(dst[:, 2:m + 2], src.T)
    assert np.isnan(dst[:, :2]).all() and np.isnan(dst[:, m + 2:]).all()
    with pytest.raises(ValueError, match="shapes do not match"):
        micro_gemm.transpose_into(src, dst[:, :m + 1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,n", [(1, 1), (16, 16), (17, 33), (48, 5), (3, 100)])
def test_transpose_flat_and_to_rows_match_numpy(dtype, m, n):
    """:func:`transpose_flat` (a matrix inside flat buffers) and :func:`transpose_to_rows` (each destination row at
    its own offset, plus a lane offset): whole register blocks and both edges; nothing else written."""
    rng = np.random.default_rng(m * n)
    lds, ldd, so, do = n + 3, m + 5, 7, 2
    src = rng.standard_normal(so + m * lds).astype(dtype)
    a = src[so:].reshape(m, lds)[:, :n]
    dst = np.full(do + n * ldd, np.nan, dtype)
    micro_gemm.transpose_flat(src, so, lds, dst, do, ldd, m, n)
    np.testing.assert_array_equal(dst[do:].reshape(n, ldd)[:, :m], a.T)
    assert np.isnan(dst[:do]).all() and np.isnan(dst[do:].reshape(n, ldd)[:, m:]).all()

    rows = rng.permutation(n).astype(np.int64) * (m + 4) + 1  # rows in shuffled order, gaps between them
    lane0 = 2
    dst = np.full(n * (m + 4) + m + 8, np.nan, dtype)
    micro_gemm.transpose_to_rows(src, so, lds, dst, rows, lane0, m, n)
    expected = np.full_like(dst, np.nan)
    for j in range(n):
        expected[rows[j] + lane0:rows[j] + lane0 + m] = a[:, j]
    np.testing.assert_array_equal(dst, expected)
