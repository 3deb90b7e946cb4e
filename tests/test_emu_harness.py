"""The CPU execution harness for CUDA kernels (fastconv.emu, DESIGN.md section 7).

Correct kernels must run exactly, and planted bugs (tests/emu_kernels/planted.cu and the matmul
with a barrier deleted) must be caught the way a GPU would show them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from fastconv import emu

KERNELS = Path(__file__).parent / "emu_kernels"
pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the harness needs g++")


@pytest.fixture(scope="module", autouse=True)
def _isolated_cache(tmp_path_factory):
    old = os.environ.get("FASTCONV_EMU_CACHE")
    os.environ["FASTCONV_EMU_CACHE"] = str(tmp_path_factory.mktemp("emu-cache"))
    emu.set_seed(0)
    yield
    if old is None:
        os.environ.pop("FASTCONV_EMU_CACHE", None)
    else:
        os.environ["FASTCONV_EMU_CACHE"] = old


def _src(name: str) -> str:
    return (KERNELS / name).read_text()


def _matmul(tile: int = 8, missing_sync: bool = False):
    opts = (f"-DTILE={tile}", "--std=c++17", "-arch=sm_75") + (("-DMISSING_SYNC=1",) if missing_sync else ())
    return emu.RawModule(code=_src("matmul.cu"), options=opts).get_function("matmul")


def _run_matmul(fn, a, b, tile=8):
    m, k = a.shape
    n = b.shape[1]
    c = np.full((m, n), -7.0, np.float32)
    fn(((n + tile - 1) // tile, (m + tile - 1) // tile), (tile, tile),
       (a, b, c, np.int32(m), np.int32(n), np.int32(k)))
    return c


def _ints(shape, seed):  # small integers: float sums are exact in any order
    return np.random.default_rng(seed).integers(-4, 5, shape).astype(np.float32)


# --------------------------------------------------------------------------- correct kernels ---
@pytest.mark.parametrize("shape", [(19, 21, 23), (8, 8, 8), (1, 30, 2)])
def test_tiled_matmul_exact(shape):
    m, k, n = shape
    a, b = _ints((m, k), 1), _ints((k, n), 2)
    np.testing.assert_array_equal(_run_matmul(_matmul(), a, b), a @ b)


def test_matmul_exact_for_every_seed_and_torch_args():
    a, b = _ints((17, 9), 3), _ints((9, 13), 4)
    fn = _matmul()
    for seed in range(4):
        emu.set_seed(seed)
        np.testing.assert_array_equal(_run_matmul(fn, a, b), a @ b)
    emu.set_seed(0)
    ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.zeros(17, 13)
    fn((2, 3), (8, 8), (ta, tb, tc, np.int32(17), np.int32(13), np.int32(9)))
    torch.testing.assert_close(tc, ta @ tb, rtol=0, atol=0)   # the caller sees the kernel's writes


def test_shfl_down_reduction_with_dynamic_shared_and_atomic_add():
    fn = emu.RawModule(code=_src("reduce.cu")).get_function("block_sum")
    x = _ints(10_001, 5)
    for block in (32, 96, 256):           # 96: a partial last warp of the second reduction
        out = np.zeros(1, np.float32)
        nwarps = (block + 31) // 32
        fn((7,), (block,), (x, out, np.int32(x.size)), shared_mem=4 * nwarps)
        assert out[0] == x.sum()


def test_warp_intrinsics_and_atomics():
    fn = emu.RawModule(code=_src("reduce.cu")).get_function("warp_ops")
    out = np.zeros((64, 4), np.int32)
    counters = np.zeros(8, np.int32)
    fn((1,), (64,), (out, counters))
    assert (out[:, 0] == 496).all()                     # xor butterfly: sum of lanes 0..31
    assert (out[:, 1] == 30).all()                      # __shfl_sync from lane 3
    assert (out[:, 2].view(np.uint32) == 0xAAAAAAAA).all()  # ballot of the odd lanes
    assert (out[:, 3] == 8).all()                       # __syncthreads_count: lanes 0..3 of 2 warps
    assert list(counters[:3]) == [64, 63, 7]
    assert counters[4:6].view(np.uint64)[0] == 64 and counters[6:8].view(np.float64)[0] == 32.0


# ------------------------------------------------------------------- the harness must bite ---
def test_missing_syncthreads_gives_wrong_results():
    a, b = _ints((16, 16), 6), _ints((16, 16), 7)
    fn = _matmul(missing_sync=True)
    for seed in range(3):
        emu.set_seed(seed)
        assert not np.array_equal(_run_matmul(fn, a, b), a @ b), f"seed {seed}"
    emu.set_seed(0)


def test_off_by_one_read_raises_out_of_bounds():
    fn = emu.RawModule(code=_src("planted.cu")).get_function("read_past_end")
    x, y = np.arange(100, dtype=np.float32), np.zeros(100, np.float32)
    with pytest.raises(emu.OutOfBoundsError, match=r"read of argument #0 'x'.*element 100\)"):
        fn((4,), (32,), (x, y, np.int32(100)))
    fn((4,), (32,), (x, y, np.int32(99)))               # in bounds: fine, and the process survived
    np.testing.assert_array_equal(y[:99], np.ones(99, np.float32))


def test_unwritten_shared_memory_reads_garbage():
    fn = emu.RawModule(code=_src("planted.cu")).get_function("read_unwritten_shared")
    y = np.zeros(64, np.float32)
    fn((1,), (64,), (y,))
    assert np.isnan(y[0::2]).all() and (y[1::2] == 1).all()


def test_python_scalars_are_refused():
    fn = emu.RawModule(code=_src("planted.cu")).get_function("scale")
    y = np.ones(8, np.float32)
    with pytest.raises(TypeError, match="as a double"):
        fn((1,), (8,), (y, 2.0, np.int32(8)))
    with pytest.raises(TypeError, match="not int"):
        fn((1,), (8,), (y, np.float32(2), 8))
    with pytest.raises(TypeError, match="float64"):
        fn((1,), (8,), (y, np.float64(2), np.int32(8)))
    with pytest.raises(TypeError, match="dtype float64"):
        fn((1,), (8,), (y.astype(np.float64), np.float32(2), np.int32(8)))
    fn((1,), (8,), (y, np.float32(2), np.int32(8)))
    assert (y == 2).all()


def test_oversize_blocks_are_refused():
    fn = emu.RawModule(code=_src("planted.cu")).get_function("scale")
    y = np.ones(8, np.float32)
    with pytest.raises(emu.LaunchError, match="1024"):
        fn((1,), (1025,), (y, np.float32(2), np.int32(8)))
    with pytest.raises(emu.LaunchError, match="__launch_bounds__"):
        _matmul(tile=8)((1, 1), (16, 16), (y, y, y, np.int32(1), np.int32(1), np.int32(1)))
    with pytest.raises(emu.LaunchError, match="shared_mem"):
        fn((1,), (8,), (y, np.float32(2), np.int32(8)), shared_mem=64 * 1024)
    with pytest.raises(TypeError):
        fn(1, 8, (y, np.float32(2), np.int32(8)))       # CuPy wants tuples too


def test_two_argument_launch_bounds_limit_by_their_first_argument():
    fn = emu.RawModule(code=_src("features.cu")).get_function("bounded_two_args")
    out = np.zeros(64, np.float32)
    fn((1,), (64,), (out,))
    assert (out == np.arange(64)).all()
    with pytest.raises(emu.LaunchError, match="__launch_bounds__"):
        fn((1,), (65,), (np.zeros(65, np.float32),))


def test_divergent_barrier_is_reported():
    fn = emu.RawModule(code=_src("planted.cu")).get_function("divergent_barrier")
    with pytest.raises(emu.BarrierError, match=r"divergent __syncthreads: reached by 16 of 32"):
        fn((1,), (32,), (np.zeros(32, np.float32),))


def test_const_write_and_dynamic_shared_overrun_fault():
    mod = emu.RawModule(code=_src("planted.cu"))
    x = np.zeros(8, np.float32)
    with pytest.raises(emu.OutOfBoundsError, match="const parameter"):
        mod.get_function("write_const")((1,), (8,), (x,))
    with pytest.raises(emu.OutOfBoundsError, match="dynamic shared memory"):
        mod.get_function("dyn_shared_overrun")((1,), (32,), (np.zeros(32, np.float32), np.int32(16)), shared_mem=64)


def test_compile_errors_and_unknown_names():
    with pytest.raises(emu.CompileError, match="g\\+\\+ failed"):
        emu.RawModule(code='extern "C" __global__ void k(float* y) { y[0] = undefined_name; }').get_function("k")
    with pytest.raises(KeyError, match="no extern"):
        emu.RawModule(code=_src("planted.cu")).get_function("nope")
    with pytest.raises(ValueError, match="unsupported compile option"):
        emu.RawModule(code=_src("planted.cu"), options=("-fopenmp",))


# ------------------------------------------------------------------------- more features ---
@pytest.fixture(scope="module")
def features():
    return emu.RawModule(code=_src("features.cu"), name_expressions=("axpy<float, 2>", "axpy<double, 1>"))


def test_3d_block_and_grid_indices(features):
    out = np.zeros((12, 24), np.int32)
    features.get_function("coords")((2, 3, 2), (4, 2, 3), (out,))
    b, t = np.meshgrid(np.arange(12), np.arange(24), indexing="ij")
    want = (t % 4) | (t // 4 % 2) << 4 | (t // 8) << 8 | (b % 2) << 12 | (b // 2 % 3) << 16 | (b // 6) << 20
    np.testing.assert_array_equal(out, want)


def test_template_kernels_through_name_expressions(features):
    x, y = np.arange(9, dtype=np.float32), np.ones(9, np.float32)
    features.get_function("axpy<float, 2>")((2,), (3,), (np.float32(2), x, y, np.int32(9)))
    np.testing.assert_array_equal(y, 2 * x + 1)
    xd, yd = x.astype(np.float64), np.zeros(9)
    features.get_function("axpy<double, 1>")((3,), (3,), (np.float64(3), xd, yd, np.int32(9)))
    np.testing.assert_array_equal(yd, 3 * xd)
    with pytest.raises(KeyError):
        features.get_function("axpy")                    # templates only through name_expressions


def test_file_scope_dynamic_shared_and_aliased_arguments(features):
    x = np.arange(10, dtype=np.float32)
    features.get_function("reverse_inplace")((3,), (4,), (x, np.int32(10)), shared_mem=16)
    np.testing.assert_array_equal(x, [3, 2, 1, 0, 7, 6, 5, 4, 9, 8])
    a = np.arange(5, dtype=np.float32)
    features.get_function("add_into")((1,), (8,), (a, a, np.int32(5)))      # the same array twice
    np.testing.assert_array_equal(a, 2 * np.arange(5))
    b = np.arange(10, dtype=np.float32)
    # Overlapping views share one buffer. n=2: the threads read b[0:2] and write b[3:5]; with more
    # threads a thread would read what another writes (a race; a GPU warp's lockstep hides it).
    features.get_function("add_into")((1,), (8,), (b[:5], b[3:8], np.int32(2)))
    np.testing.assert_array_equal(b, [0, 1, 2, 3, 5, 5, 6, 7, 8, 9])


def test_intrinsics_static_shared_and_namespace_scope_dynamic_shared(features):
    x = np.array([4, np.nan, np.inf, 0, 1.5, 9], np.float32)
    out = np.zeros(8, np.float32)
    features.get_function("intrinsics")((1,), (1,), (x, out), shared_mem=4)
    np.testing.assert_array_equal(out, [0.5, 1, 1, 1, 1.5, 5, 3, 8])


@pytest.mark.parametrize("name, pattern", [
    ("divergent_shuffle", "names lane 16, which has exited"),
    ("barrier_sites", "divergent __syncthreads: .* waits at kernel.cu:\\d+ but .* waits at kernel.cu:\\d+"),
])
def test_divergent_warp_ops_and_barrier_sites(features, name, pattern):
    with pytest.raises(emu.BarrierError, match=pattern):
        features.get_function(name)((1,), (32,), (np.zeros(32, np.float32),))


def test_trap_and_stack_overflow_are_reported(features):
    with pytest.raises(emu.KernelTrap, match=r"__trap\(\) in threadIdx=\(5,0,0\)"):
        features.get_function("trap_if")((1,), (32,), (np.int32(1),))
    features.get_function("trap_if")((1,), (32,), (np.int32(0),))
    out = np.zeros(32, np.int32)
    features.get_function("stack_hog")((1,), (32,), (out, np.int32(5)))
    assert (out == 15).all()
    with pytest.raises(emu.KernelTrap, match="stack overflow"):
        features.get_function("stack_hog")((1,), (32,), (out, np.int32(1000)))


def test_seeded_order_reproduces():
    a, b = _ints((16, 16), 8), _ints((16, 16), 9)
    fn = _matmul(missing_sync=True)
    runs = {}
    for seed in (1, 2, 1):
        emu.set_seed(seed)
        runs.setdefault(seed, []).append(_run_matmul(fn, a, b))
    emu.set_seed(0)
    np.testing.assert_array_equal(*runs[1])             # NaN == NaN here: identical bytes
    assert not np.array_equal(runs[1][0], runs[2][0], equal_nan=True)


def test_cache_reuses_builds_and_tracks_included_headers(tmp_path):
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "val.cuh").write_text("#define VAL 3\n")
    code = '#include "val.cuh"\nextern "C" __global__ void put(int* y) { y[threadIdx.x] = VAL; }\n'
    y = np.zeros(4, np.int32)
    emu.RawModule(code=code, options=(f"-I{inc}",)).get_function("put")((1,), (4,), (y,))
    assert (y == 3).all()
    n_so = len(list(emu.cache_dir().glob("*.so")))
    emu._loaded.clear()                                  # as in a new process: loads from disk
    emu.RawModule(code=code, options=(f"-I{inc}",)).get_function("put")((1,), (4,), (y,))
    assert len(list(emu.cache_dir().glob("*.so"))) == n_so
    (inc / "val.cuh").write_text("#define VAL 5\n")     # a header changed: rebuilt
    emu._loaded.clear()
    emu.RawModule(code=code, options=(f"-I{inc}",)).get_function("put")((1,), (4,), (y,))
    assert (y == 5).all()


def test_memoize():
    calls = []

    @emu.memoize(for_each_device=True)
    def build(opt):
        calls.append(opt)
        return object()

    assert build("a") is build("a") and build("a") is not build("b") and calls == ["a", "b"]


# ------------------------------------------------- the test kernels are real CUDA as well ----
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernels_compile_with_nvcc(tmp_path):
    """The harness must not accept code real CUDA rejects: every test kernel also builds with nvcc."""
    files = sorted(str(p) for p in KERNELS.glob("*.cu"))
    p = subprocess.run(["nvcc", "-arch=sm_75", "-c", *files, "-odir", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert len(list(tmp_path.glob("*.o"))) == len(files)
