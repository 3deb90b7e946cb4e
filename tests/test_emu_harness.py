"""The CPU execution harness for CUDA kernels (fastconv.emu, DESIGN.md section 7).

Correct kernels must run exactly, and planted bugs (tests/emu_kernels/planted.cu and the matmul
with a barrier deleted) must be caught the way a GPU would show them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastconv import emu

KERNELS = Path(__file__).parent / "emu_kernels"
KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"     # tc.cuh
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
    p = subprocess.run(["nvcc", "-arch=sm_75", f"-I{KERNEL_DIR}", "-c", *files, "-odir", str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert len(list(tmp_path.glob("*.o"))) == len(files)


# ------------------------------------------------------------- build cache (issue 10 item 4) ---
_BUILD_AND_RUN = """
import sys, numpy as np
from fastconv import emu
src = open(sys.argv[1]).read()
fn = emu.RawModule(code=src, options=("-DTILE=8",)).get_function("matmul")
a = np.arange(64, dtype=np.float32).reshape(8, 8); c = np.zeros((8, 8), np.float32)
fn((1, 1), (8, 8), (a, a, c, np.int32(8), np.int32(8), np.int32(8)))
assert np.array_equal(c, a @ a), "wrong product"
from fastconv.emu import cache
print("ok", cache.compiles)
"""


def _child_env(cache, **extra):
    env = dict(os.environ, FASTCONV_EMU_CACHE=str(cache), PYTHONPATH=str(Path(__file__).resolve().parent.parent), **extra)
    env.pop("FASTCONV_EMU_SEED", None)
    return env


def test_four_processes_building_into_a_fresh_cache_all_succeed(tmp_path):
    cache = tmp_path / "fresh"
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD_AND_RUN, str(KERNELS / "matmul.cu")],
                              env=_child_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0 and out.split()[0] == "ok", err
    assert sum(int(out.split()[1]) for out, _, _ in results) == 1    # the others waited on the lock
    libs = list(cache.glob("*.so"))
    assert len(libs) == 1, libs          # one content-addressed library, built once, never deleted
    assert not list(cache.glob("build-*")), "temporary build folders left behind"


def _cached_entry():
    metas = sorted(emu.cache_dir().glob("*.json"), key=lambda p: p.stat().st_mtime)
    return metas[-1]


def test_cache_entries_pointing_outside_the_folder_are_refused_and_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCONV_EMU_CACHE", str(tmp_path / "cache"))
    code = 'extern "C" __global__ void put(int* y) { y[threadIdx.x] = 7; }\n'
    y = np.zeros(4, np.int32)
    emu.RawModule(code=code).get_function("put")((1,), (4,), (y,))
    meta = _cached_entry()
    good = json.loads(meta.read_text())
    evil = tmp_path / "evil.so"
    evil.write_bytes(b"not a shared library: loading this would raise OSError")
    for so in (str(evil), "../evil.so"):
        meta.write_text(json.dumps({**good, "so": so}))
        emu._loaded.clear()
        y[:] = 0
        emu.RawModule(code=code).get_function("put")((1,), (4,), (y,))
        assert (y == 7).all()
        assert json.loads(meta.read_text())["so"] == good["so"]      # rebuilt, entry repaired
    lib = emu.cache_dir() / good["so"]
    lib.unlink()
    lib.symlink_to(evil)                  # a symlink out of the folder: refused too
    emu._loaded.clear()
    emu.RawModule(code=code).get_function("put")((1,), (4,), (y,))
    assert not lib.is_symlink() and lib.is_file()
    assert all(os.path.realpath(p).startswith(os.path.realpath(emu.cache_dir())) for p in emu._loaded)


def test_bad_seed_variable_is_named(monkeypatch):
    monkeypatch.setattr(emu, "_seed", None)
    monkeypatch.setenv("FASTCONV_EMU_SEED", "abc")
    with pytest.raises(ValueError, match="FASTCONV_EMU_SEED must be an integer.*'abc'"):
        emu.get_seed()
    monkeypatch.setenv("FASTCONV_EMU_SEED", "0x10")
    monkeypatch.setattr(emu, "_seed", None)
    assert emu.get_seed() == 16
    # Importing the harness with a bad value is fine; the first launch says what is wrong.
    p = subprocess.run([sys.executable, "-c", "import fastconv.emu as e; e.get_seed()"], capture_output=True,
                       text=True, env=dict(_child_env(emu.cache_dir()), FASTCONV_EMU_SEED="abc"))
    assert p.returncode != 0 and "FASTCONV_EMU_SEED" in p.stderr and "Traceback" in p.stderr


# --------------------------------------------------------------- arch and shared-memory limits ---
_ARCH = 'extern "C" __global__ void arch(int* y) { extern __shared__ int s[]; y[0] = __CUDA_ARCH__; s[0] = 1; }\n'


@pytest.mark.parametrize("options, env, want", [
    ((), None, 800), (("-arch=sm_90",), None, 900), (("--gpu-architecture=compute_75",), None, 750),
    ((), "sm_90", 900), (("-arch", "sm_80"), "90", 800),
])
def test_cuda_arch_follows_the_arch_option_or_the_environment(monkeypatch, options, env, want):
    if env:
        monkeypatch.setenv("FASTCONV_EMU_ARCH", env)
    y = np.zeros(1, np.int32)
    emu.RawModule(code=_ARCH, options=options).get_function("arch")((1,), (1,), (y,), shared_mem=4)
    assert y[0] == want


def test_shared_memory_limit_per_arch():
    y = np.zeros(1, np.int32)
    f80 = emu.RawModule(code=_ARCH, options=("-arch=sm_80",)).get_function("arch")
    f90 = emu.RawModule(code=_ARCH, options=("-arch=sm_90",)).get_function("arch")
    with pytest.raises(emu.LaunchError, match="max_dynamic_shared_size_bytes"):
        f80((1,), (1,), (y,), shared_mem=64 * 1024)          # above 48 KiB needs the opt-in, as on a GPU
    f80.max_dynamic_shared_size_bytes = 163 * 1024
    f80((1,), (1,), (y,), shared_mem=163 * 1024)
    f80.max_dynamic_shared_size_bytes = 200 * 1024
    with pytest.raises(emu.LaunchError, match="sm_80's opt-in limit of 166912 bytes"):
        f80((1,), (1,), (y,), shared_mem=200 * 1024)
    f90.max_dynamic_shared_size_bytes = 227 * 1024
    f90((1,), (1,), (y,), shared_mem=227 * 1024)
    f90.max_dynamic_shared_size_bytes = 228 * 1024
    with pytest.raises(emu.LaunchError, match="sm_90's opt-in limit of 232448 bytes"):
        f90((1,), (1,), (y,), shared_mem=227 * 1024)
    with pytest.raises(ValueError, match="unsupported GPU architecture 'sm_61'"):
        emu.RawModule(code=_ARCH, options=("-arch=sm_61",))


def test_bad_arch_variable_is_named(monkeypatch):
    monkeypatch.setenv("FASTCONV_EMU_ARCH", "volta")
    with pytest.raises(ValueError, match="FASTCONV_EMU_ARCH: .*unsupported GPU architecture 'volta'"):
        emu.RawModule(code=_ARCH)


# -------------------------------------------------------- warp ops are no block barrier (fix) ---
@pytest.mark.parametrize("with_warp_op", [0, 1])
def test_race_is_caught_with_and_without_a_warp_op_between_the_accesses(with_warp_op):
    """Issue 13: warps used to be released only when the whole block was blocked, so a shuffle
    between two racing accesses hid the missing __syncthreads (0/20 seeds caught)."""
    fn = emu.RawModule(code=_src("planted.cu")).get_function("race_across_warp_op")
    blocks = 8
    want = np.arange(blocks * 32, dtype=np.float32)
    caught = 0
    for seed in range(20):
        emu.set_seed(seed)
        out = np.zeros(blocks * 32, np.float32)
        fn((blocks,), (64,), (out, np.int32(with_warp_op)))
        caught += not np.array_equal(out, want)
    emu.set_seed(0)
    assert caught >= 18, f"race caught on {caught}/20 seeds"


# ------------------------------------------------ tensor cores, ldmatrix, cp.async (issue 13) ---
def _tf32_rna(x):
    """cvt.rna.tf32.f32 as bits: round to nearest, ties away from zero; NaN canonical."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    out = ((u + 0x1000) & ~np.uint64(0x1FFF)).astype(np.uint32)
    finite = (u & 0x7F800000) != 0x7F800000
    out = np.where(finite, out, u.astype(np.uint32))
    return np.where(np.isnan(np.asarray(x, np.float32)), np.uint32(0x7FFFFFFF), out).astype(np.uint32)


def _f16(x):
    """numpy's float32 -> float16 (round to nearest even); overflow to Inf is intended here."""
    with np.errstate(over="ignore"):
        return x.astype(np.float16)


def _mma_model(A, B, C):
    """The harness's documented accumulation: exact products, summed in k order in float64 on
    top of C, one rounding to float32."""
    acc = C.astype(np.float64).copy()
    for k in range(A.shape[1]):
        acc += A[:, k, None].astype(np.float64) * B[None, k, :].astype(np.float64)
    return acc.astype(np.float32)


def _probe(*defines):
    return emu.RawModule(code=_src("tc_probe.cu"), options=(f"-I{KERNEL_DIR}", "-arch=sm_80", *defines))


def _probe_inputs(seed):
    rng = np.random.default_rng(seed)
    # Values with bits in the low 13 mantissa bits, so truncation and rounding differ.
    A = (rng.standard_normal((16, 8)) * 3).astype(np.float32)
    B = (rng.standard_normal((8, 8)) * 3).astype(np.float32)
    C = rng.standard_normal((16, 8)).astype(np.float32)
    return A, B, C


def _designed_tf32_inputs(seed):
    """A = integers plus 0.75 of a TF32 ulp (bits only below TF32's 10 mantissa bits), B and C
    integers: truncating A gives the integers, cvt.rna rounds up by one ulp, and either way every
    product and sum is exact in float32, so the result shows the operand rule and nothing else
    (no accumulation-order or rounding question). Returns A, B, C, A truncated, A rounded."""
    rng = np.random.default_rng(seed)
    mag = rng.integers(1, 8, (16, 8)).astype(np.float32)
    sign = np.where(rng.integers(0, 2, (16, 8)) == 1, np.float32(1), np.float32(-1))
    ulp = np.float32(2.0) ** (np.floor(np.log2(mag)) - 10).astype(np.float32)
    A = (sign * (mag + np.float32(0.75) * ulp)).astype(np.float32)
    B = rng.integers(-7, 8, (8, 8)).astype(np.float32)
    C = rng.integers(-50, 51, (16, 8)).astype(np.float32)
    return A, B, C, sign * mag, sign * (mag + ulp)


@pytest.mark.parametrize("convert", [1, 0])
def test_mma_tf32_operand_rule_on_designed_inputs(convert):
    A, B, C, a_trunc, a_rna = _designed_tf32_inputs(12)
    np.testing.assert_array_equal(_tf32_rna(A).view(np.float32), a_rna)
    D = np.zeros((16, 8), np.float32)
    _probe().get_function("probe_mma_tf32")((1,), (32,), (A.view(np.uint32), B.view(np.uint32), C, D, np.int32(convert)))
    want = (a_rna if convert else a_trunc).astype(np.float64) @ B.astype(np.float64) + C
    np.testing.assert_array_equal(D, want.astype(np.float32))


@pytest.mark.parametrize("convert", [1, 0])
def test_mma_tf32_matches_the_documented_rounding(convert):
    A, B, C = _probe_inputs(1)
    D = np.zeros((16, 8), np.float32)
    _probe().get_function("probe_mma_tf32")((1,), (32,), (A.view(np.uint32), B.view(np.uint32), C, D, np.int32(convert)))
    if convert:   # cvt.rna.tf32.f32 first
        a, b = _tf32_rna(A).view(np.float32), _tf32_rna(B).view(np.float32)
    else:         # raw float32 registers: the low 13 bits are ignored (the assumption tc_probe.cu checks)
        a = (A.view(np.uint32) & ~np.uint32(0x1FFF)).view(np.float32)
        b = (B.view(np.uint32) & ~np.uint32(0x1FFF)).view(np.float32)
    np.testing.assert_array_equal(D, _mma_model(a, b, C))
    assert not np.array_equal(D, _mma_model(A, B, C))      # the rounding is really applied


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_mma_m16n8k16_matches_the_model(dtype):
    g = torch.Generator().manual_seed(2)
    tdt = torch.float16 if dtype == "f16" else torch.bfloat16
    A, B = torch.randn(16, 16, generator=g).to(tdt), torch.randn(16, 8, generator=g).to(tdt)
    C = torch.randn(16, 8, generator=g).numpy()
    D = np.zeros((16, 8), np.float32)
    _probe().get_function("probe_mma_16bit")((1,), (32,), (A.view(torch.int16).numpy().view(np.uint16),
                                                           B.view(torch.int16).numpy().view(np.uint16), C, D,
                                                           np.int32(dtype == "bf16")))
    np.testing.assert_array_equal(D, _mma_model(A.float().numpy(), B.float().numpy(), C))
    torch.testing.assert_close(torch.from_numpy(D), (A.double() @ B.double() + torch.from_numpy(C).double()).float(),
                               rtol=1e-6, atol=1e-6)


def test_wrong_fragment_layout_fails():
    A, B, C = _probe_inputs(3)
    D = np.zeros((16, 8), np.float32)
    _probe("-DWRONG_LAYOUT").get_function("probe_mma_tf32")((1,), (32,), (A.view(np.uint32), B.view(np.uint32), C, D, np.int32(1)))
    ref = _mma_model(_tf32_rna(A).view(np.float32), _tf32_rna(B).view(np.float32), C)
    assert np.abs(D - ref).max() > 1.0


def test_cvt_rounding_of_tf32_half_and_bfloat16():
    tie_tf32 = np.array([0x3F801000, 0x3F803000, 0xBF801000], np.uint32).view(np.float32)   # ties: away from zero
    x = np.concatenate([tie_tf32, np.array([1.0, -2.5, 65504, 65519.99, 65520, 1e-8, 6e-8, 3e-5, -0.0, np.inf, -np.inf,
                                            np.nan, 3.4e38, 1 + 2**-8, 1 + 3 * 2**-9, 2**-133], np.float32),
                        np.random.default_rng(4).standard_normal(200).astype(np.float32) * 100])
    out = np.zeros((x.size, 5), np.uint32)
    _probe().get_function("probe_cvt")((2,), (128,), (x, out, np.int32(x.size)))
    np.testing.assert_array_equal(out[:, 0], _tf32_rna(x))
    assert list(out[:3, 0]) == [0x3F802000, 0x3F804000, 0xBF802000]
    np.testing.assert_array_equal(out[:, 1], out[:, 2])          # pair and scalar conversions agree
    h, bf = (out[:, 1] & 0xFFFF).astype(np.uint16), (out[:, 1] >> 16).astype(np.uint16)
    fin = ~np.isnan(x)
    np.testing.assert_array_equal(h[fin], _f16(x[fin]).view(np.uint16))       # numpy: nearest even
    want_bf = torch.from_numpy(x[fin]).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf[fin], want_bf)
    assert h[~fin].tolist() == [0x7FFF] and bf[~fin].tolist() == [0x7FFF]    # the GPU's canonical NaN
    np.testing.assert_array_equal(out[fin, 3].view(np.float32), _f16(x[fin]).astype(np.float32))
    np.testing.assert_array_equal(out[fin, 4].view(np.float32), torch.from_numpy(x[fin]).bfloat16().float().numpy())


def test_ldmatrix_variants_follow_the_ptx_layout():
    M = np.random.default_rng(5).integers(0, 2**16, (4, 8, 8)).astype(np.uint16)
    out = np.zeros((6, 32, 4), np.uint32)
    _probe().get_function("probe_ldmatrix")((1,), (32,), (M, out))
    lane = np.arange(32)
    row, col = lane // 4, 2 * (lane % 4)
    for v, (num, trans) in enumerate([(1, 0), (2, 0), (4, 0), (1, 1), (2, 1), (4, 1)]):
        for m in range(num):
            lo = M[m, col, row] if trans else M[m, row, col]
            hi = M[m, col + 1, row] if trans else M[m, row, col + 1]
            np.testing.assert_array_equal(out[v, :, m], lo.astype(np.uint32) | hi.astype(np.uint32) << 16,
                                          err_msg=f"x{num}{'.trans' if trans else ''} matrix {m}")


def test_half_types_convert_and_compute_like_cuda():
    mod = emu.RawModule(code=_src("half.cu"))
    x = np.concatenate([np.array([1.0, 1 + 2**-11, 1 + 3 * 2**-11, 70000, -1e-7, np.nan], np.float32),
                        np.random.default_rng(6).standard_normal(100).astype(np.float32)])
    h, bf, back = np.zeros(x.size, np.uint16), np.zeros(x.size, np.uint16), np.zeros(2 * x.size, np.float32)
    mod.get_function("half_roundtrip")((1,), (128,), (x, h, bf, back, np.int32(x.size)))
    fin = ~np.isnan(x)
    np.testing.assert_array_equal(h[fin], _f16(x[fin]).view(np.uint16))
    np.testing.assert_array_equal(back[0::2][fin], _f16(x[fin]).astype(np.float32))
    np.testing.assert_array_equal(back[1::2][fin], torch.from_numpy(x[fin]).bfloat16().float().numpy())
    xs = np.random.default_rng(7).standard_normal(64).astype(np.float16)
    ws = np.random.default_rng(8).standard_normal(64).astype(np.float16)
    y, pairs = np.zeros(64, np.float16), np.zeros(128, np.float32)
    mod.get_function("half_math")((1,), (64,), (xs, ws, y, pairs, np.int32(64)))
    want = (xs.astype(np.float32) * ws.astype(np.float32)).astype(np.float16)          # exact product, one rounding
    np.testing.assert_array_equal(y, (want.astype(np.float32) + xs.astype(np.float32)).astype(np.float16))
    np.testing.assert_array_equal(pairs[0::2], xs.astype(np.float32))
    assert (pairs[1::2] == 2).all()
    with pytest.raises(TypeError, match="float16"):
        mod.get_function("half_math")((1,), (64,), (xs.astype(np.float32), ws, y, pairs, np.int32(64)))


# A tensor-core GEMM: cp.async pipeline, ldmatrix, mma.sync; and its planted bugs.
def _gemm(dtype, *defines):
    return emu.RawModule(code=_src("tc_gemm.cu"),
                         options=(f"-I{KERNEL_DIR}", "-arch=sm_80", *defines)).get_function(f"gemm_{dtype}")


def _gemm_inputs(dtype, m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    tdt = {"f16": torch.float16, "bf16": torch.bfloat16, "tf32": torch.float32}[dtype]
    return torch.randn(m, k, generator=g).to(tdt), torch.randn(k, n, generator=g).to(tdt)


def _run_gemm(fn, a, b):
    m, k = a.shape
    n = b.shape[1]
    c = torch.full((m, n), -7.0)
    fn(((n + 31) // 32, (m + 31) // 32), (128,), (a, b, c, np.int32(m), np.int32(n), np.int32(k)))
    return c


@pytest.mark.parametrize("dtype", ["f16", "bf16", "tf32"])
def test_tensor_core_gemm_matches_torch_with_the_right_rounding(dtype):
    m, n, k = 48, 40, 80 if dtype != "tf32" else 72       # ragged M and N tiles, more k-tiles than stages
    a, b = _gemm_inputs(dtype, m, n, k, 0)
    c = _run_gemm(_gemm(dtype), a, b)
    if dtype == "tf32":
        ar = torch.from_numpy(_tf32_rna(a.numpy()).view(np.float32))
        br = torch.from_numpy(_tf32_rna(b.numpy()).view(np.float32))
        torch.testing.assert_close(c, (ar.double() @ br.double()).float(), rtol=1e-5, atol=1e-5)
        assert (c - (a.double() @ b.double()).float()).abs().max() > 1e-4     # TF32 really rounds
    else:
        torch.testing.assert_close(c, (a.double() @ b.double()).float(), rtol=1e-5, atol=1e-5)


def test_gemm_with_a_wrong_fragment_layout_fails():
    a, b = _gemm_inputs("f16", 32, 32, 32, 1)
    c = _run_gemm(_gemm("f16", "-DWRONG_LAYOUT"), a, b)
    assert (c - (a.double() @ b.double()).float()).abs().max() > 1.0


@pytest.mark.parametrize("dtype", ["f16", "tf32"])
def test_read_before_wait_group_is_caught(dtype):
    a, b = _gemm_inputs(dtype, 32, 32, 64, 2)
    fn = _gemm(dtype, "-DEARLY_READ")
    for seed in range(3):                  # the poison does not depend on the thread order
        emu.set_seed(seed)
        assert torch.isnan(_run_gemm(fn, a, b)).any(), f"seed {seed}"
    emu.set_seed(0)


def test_missing_barrier_around_the_ldmatrix_tile_is_caught_on_most_seeds():
    a, b = _gemm_inputs("f16", 32, 32, 64, 3)
    ref = (a.double() @ b.double()).float()
    fn = _gemm("f16", "-DNO_BARRIER")
    caught = 0
    for seed in range(10):
        emu.set_seed(seed)
        c = _run_gemm(fn, a, b)
        caught += not torch.allclose(c, ref, rtol=1e-5, atol=1e-5)
    emu.set_seed(0)
    assert caught >= 8, f"caught on {caught}/10 seeds"


@pytest.mark.parametrize("name, block, pattern", [
    ("cp_async_to_global", 8, "cp.async destination .* is not in shared memory"),
    ("cp_async_misaligned", 32, "cp.async source .* is not aligned to the copy size \\(16 bytes\\)"),
    ("ldmatrix_from_global", 32, "ldmatrix row address .* is not in shared memory"),
    ("mma_half_warp", 16, "mma.sync needs all 32 lanes of a warp"),
    ("mma_mixed_kinds", 32, "lanes of one warp issue different mma.sync variants"),
])
def test_misused_async_copies_and_tensor_core_ops_are_refused(name, block, pattern):
    fn = emu.RawModule(code=_src("tc_planted.cu"), options=(f"-I{KERNEL_DIR}", "-arch=sm_80")).get_function(name)
    buf = np.zeros(32 * 4 + 8, np.float32)
    args = {"cp_async_to_global": (buf, buf[: 32 * 4].copy()), "cp_async_misaligned": (buf, buf.copy()),
            "ldmatrix_from_global": (np.zeros(64, np.uint16), np.zeros(32, np.uint32))}.get(name, (buf,))
    with pytest.raises(emu.AsyncCopyError, match=pattern):
        fn((1,), (block,), args)


def test_tensor_core_ops_need_sm80():
    fn = emu.RawModule(code=_src("tc_probe.cu"), options=(f"-I{KERNEL_DIR}", "-arch=sm_75")).get_function("probe_mma_16bit")
    z16, z = np.zeros(256, np.uint16), np.zeros(128, np.float32)
    with pytest.raises(emu.KernelTrap, match="needs sm_80 or newer"):
        fn((1,), (32,), (z16, z16, z, z.copy(), np.int32(0)))


# ------------------------------------------------- real CUDA: nvcc for sm_80/sm_90, and a GPU ---
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_tensor_core_kernels_compile_to_mma_ldmatrix_cp_async(arch, tmp_path):
    ptx = tmp_path / "gemm.ptx"
    p = subprocess.run(["nvcc", f"-arch={arch}", f"-I{KERNEL_DIR}", "--ptx", str(KERNELS / "tc_gemm.cu"), "-o", str(ptx)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    text = ptx.read_text()
    for instr in ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", "mma.sync.aligned.m16n8k16.row.col.f32.bf16",
                  "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32", "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
                  "cp.async.cg.shared.global", "cp.async.wait_group 1", "cvt.rna.tf32.f32"):
        assert instr in text, instr
    p = subprocess.run(["nvcc", f"-arch={arch}", f"-I{KERNEL_DIR}", "-Xptxas", "-v", "-Werror", "all-warnings", "-cubin",
                        str(KERNELS / "tc_gemm.cu"), str(KERNELS / "tc_probe.cu"), "-odir", str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "spill" in p.stderr and " 0 bytes spill stores" in p.stderr
    assert not [line for line in p.stderr.splitlines() if "bytes spill" in line and not line.strip().startswith("0 bytes")]


def _gpu():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        major = cupy.cuda.Device(0).compute_capability
        return cupy if int(major) >= 80 else None
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device: skip
        return None


def test_probe_matches_the_gpu_bit_for_bit():
    """Run tc_probe.cu on the GPU and the harness and compare every bit (the TF32 truncation
    assumption, the conversions, the layouts, the accumulation on exactly representable sums)."""
    cp = _gpu()
    if cp is None:
        pytest.skip("needs CuPy and an sm_80+ GPU (none here); run this test the first time one is available")
    src = _src("tc_probe.cu")
    gpu_mod = cp.RawModule(code=src, options=("--std=c++17", f"-I{KERNEL_DIR}"))
    emu_mod = _probe()

    def both(name, grid, block, args, outs):
        emu_args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
        emu_mod.get_function(name)(grid, block, tuple(emu_args))
        gpu_args = [cp.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
        gpu_mod.get_function(name)(grid, block, tuple(gpu_args))
        for i in outs:
            np.testing.assert_array_equal(cp.asnumpy(gpu_args[i]).view(np.uint8), emu_args[i].view(np.uint8),
                                          err_msg=f"{name}: output #{i} differs between the GPU and the harness")

    # Inputs whose exact results are float32 values under either operand rule: a difference can only
    # come from the rule itself (the assumption), the layouts or the conversion, not from rounding.
    A, B, C, _, _ = _designed_tf32_inputs(12)
    for convert in (1, 0):
        both("probe_mma_tf32", (1,), (32,), [A.view(np.uint32), B.view(np.uint32), C, np.zeros((16, 8), np.float32),
                                             np.int32(convert)], [3])
    ints = np.random.default_rng(9).integers(-4, 5, (16, 16)).astype(np.float16)
    for bf in (0, 1):
        a16 = ints if not bf else torch.from_numpy(ints.astype(np.float32)).bfloat16().view(torch.int16).numpy()
        b16 = a16[:, :8].copy()
        both("probe_mma_16bit", (1,), (32,), [a16.view(np.uint16), b16.view(np.uint16), C.round(), np.zeros((16, 8), np.float32),
                                              np.int32(bf)], [3])
    x = np.random.default_rng(10).standard_normal(1000).astype(np.float32) * 1e3
    x[:4] = [np.nan, np.inf, 65520, 3.4e38]
    both("probe_cvt", (8,), (128,), [x, np.zeros((x.size, 5), np.uint32), np.int32(x.size)], [1])
    M = np.random.default_rng(11).integers(0, 2**16, (4, 8, 8)).astype(np.uint16)
    both("probe_ldmatrix", (1,), (32,), [M, np.zeros((6, 32, 4), np.uint32)], [1])


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_nvrtc_compiles_tc_cuh_without_cuda_headers(arch):
    """kernels/tc.cuh needs no CUDA header, so NVRTC (as CuPy runs it) compiles it with only -I."""
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001 - any failure to load libnvrtc means: skip
        pytest.skip(f"NVRTC is not available: {e}")
    prog = nvrtc.createProgram(_src("tc_probe.cu"), "tc_probe.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, ["--std=c++17", f"-I{KERNEL_DIR}", f"--gpu-architecture={arch}"])
        except nvrtc.NVRTCError as e:
            pytest.fail(f"NVRTC rejected tc_probe.cu: {e}\n{nvrtc.getProgramLog(prog)}")
        ptx = nvrtc.getPTX(prog)
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
        for instr in ("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32", "mma.sync.aligned.m16n8k16.row.col.f32.bf16",
                      "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16", "cvt.rna.tf32.f32", "cvt.rn.bf16x2.f32"):
            assert instr in ptx, instr
    finally:
        nvrtc.destroyProgram(prog)


@pytest.mark.parametrize("src_bytes", [16, 8, 0])
def test_cp_async_groups_zero_fill_and_poison_until_the_wait(src_bytes):
    fn = emu.RawModule(code=_src("tc_planted.cu"), options=(f"-I{KERNEL_DIR}", "-arch=sm_80")).get_function("cp_async_groups")
    src = np.arange(1, 193, dtype=np.float32)
    out = np.zeros((32, 8), np.float32)
    fn((1,), (32,), (src, out, np.int32(src_bytes)))
    group0 = src[:128].reshape(32, 4).copy()
    group0[:, src_bytes // 4:] = 0                      # bytes past src-size are zeros
    np.testing.assert_array_equal(out[:, :4], group0)
    assert np.isnan(out[:, 4:6]).all()                  # still in flight after wait_group 1
    np.testing.assert_array_equal(out[:, 6:], src[128:].reshape(32, 2))


# -------------------------------------------------- templates instantiated by name (issue 11 item 3) ---
TEMPLATE_EXPRESSIONS = ("scale_shift<float>", "scale_shift<double>", "repeat_sum<double, 3>")


@pytest.fixture(scope="module")
def templates():
    return emu.RawModule(code=_src("templates.cu"), name_expressions=TEMPLATE_EXPRESSIONS)


@pytest.mark.parametrize("ctype, dtype", [("float", np.float32), ("double", np.float64)])
def test_template_kernel_instantiated_by_name_expression(templates, ctype, dtype):
    """One dtype-generic kernel, reached as ``scale_shift<float>`` and ``scale_shift<double>`` (the
    first also explicitly instantiated in the source, the second only by the expression); the
    harness checks the argument types of each instantiation."""
    fn = templates.get_function(f"scale_shift<{ctype}>")
    x, y = np.arange(100, dtype=dtype), np.zeros(100, dtype)
    fn((2,), (64,), (x, y, dtype(2), dtype(-1), np.int32(100)))
    np.testing.assert_array_equal(y, 2 * x - 1)
    assert fn.params == ["x", "y", "a", "b", "n"]
    other = np.float64 if dtype is np.float32 else np.float32
    with pytest.raises(TypeError, match=f"argument #2 'a' of scale_shift<{ctype}> is float{8 * np.dtype(dtype).itemsize}"):
        fn((2,), (64,), (x, y, other(2), other(-1), np.int32(100)))
    with pytest.raises(TypeError, match="has dtype"):
        fn((2,), (64,), (x.astype(other), y, dtype(2), dtype(-1), np.int32(100)))


def test_template_kernel_keeps_its_launch_bound_and_non_type_parameters(templates):
    fn = templates.get_function("scale_shift<double>")
    assert fn.max_threads_per_block == 64
    x = np.ones(128)
    with pytest.raises(emu.LaunchError, match="more than the 64 allowed by __launch_bounds__"):
        fn((1,), (128,), (x, np.zeros(128), np.float64(1), np.float64(0), np.int32(128)))
    y = np.zeros(5)
    templates.get_function("repeat_sum<double, 3>")((1,), (8,), (np.arange(5.0), y, np.int32(5)))
    np.testing.assert_array_equal(y, 3 * np.arange(5.0))


def test_name_expression_not_instantiated_is_a_clear_error(templates):
    with pytest.raises(KeyError, match=r"'scale_shift<int>' was not instantiated: it is not among the module's "
                                       r"name_expressions \(scale_shift<float>, scale_shift<double>"):
        templates.get_function("scale_shift<int>")
    with pytest.raises(KeyError, match="templates, reached through name_expressions: scale_shift, repeat_sum"):
        templates.get_function("scale_shift")
    with pytest.raises(emu.CompileError, match="'no_such<float>' does not instantiate a __global__ function template"):
        emu.RawModule(code=_src("templates.cu"), name_expressions=("no_such<float>",)).get_function("no_such<float>")
