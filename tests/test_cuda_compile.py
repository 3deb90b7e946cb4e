"""Compile checks of kernels/*.cu that need no GPU (DESIGN.md section 6).

* nvcc (when on PATH) for two architectures, -Werror all-warnings, ptxas report checked by
  tools/check_ptxas.py (no spills, register budget). CMakeLists.txt runs every architecture.
* NVRTC through CuPy's low-level bindings with exactly the run-time options
  (fastconv.cuda.loader.options(), through the same loader.nvrtc_compile the GPU path uses), every
  kernel name present in the compiled program, and no flush-to-zero instruction in the PTX.
* The module cache key covers every included file (a changed common.cuh changes it).
* The CPU harness finds the same kernel names (it compiles the same text with g++).
* Kernels are templates launched by name expression: each family's FC_INSTANTIATE list
  (loader.name_expressions) is what nvcc compiles (explicit instantiations), what NVRTC lowers, and
  what the host side launches.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastconv.cuda import loader

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tools" / "check_ptxas.py"
FAMILIES = loader.FAMILIES


def _kernel_names(family: str) -> list[str]:
    """Every name the host can launch from the family: extern "C" names and name expressions."""
    from fastconv import emu

    return sorted([*emu.find_kernels(loader.source(family)), *loader.name_expressions(family)])


def _extern_c_names(family: str) -> list[str]:
    from fastconv import emu

    return sorted(emu.find_kernels(loader.source(family)))


def _lowered(family: str) -> dict:
    """name expression -> the mangled symbol NVRTC gives it (the same Itanium mangling as nvcc's)."""
    _nvrtc()
    return loader.nvrtc_compile(loader.source(family), f"{family}.cu", loader.options(), "compute_75",
                                loader.name_expressions(family))[2]


def test_every_template_kernel_is_instantiated_for_every_element_type():
    """pool.cu and conv.cu have no extern "C" f32/f64 wrapper pairs left: each __global__ template is
    instantiated (FC_INSTANTIATE) for float, double, __half and __nv_bfloat16; only dtype-free kernels
    (int64 index bookkeeping) stay extern "C"."""
    from fastconv import emu

    every = ("float", "double", "__half", "__nv_bfloat16")
    want = {"pool": every, "conv": every}
    for family, types in want.items():
        src = loader.source(family)
        templates = emu.find_kernels(src, templates=True)
        exprs = set(loader.name_expressions(family))
        assert templates and exprs
        for name in templates:
            for t in types:
                assert any(e.startswith(f"{name}<{t}") for e in exprs), (name, t)
        assert {e.split("<")[0] for e in exprs} == set(templates)
        assert not [n for n in emu.find_kernels(src) if re.search(r"_(f32|f64)$", n)]
    depthwise = {e for e in loader.name_expressions("conv") if ", true>" in e}
    assert depthwise == {f"conv_direct_{p}<{t}, true>" for p in ("forward", "grad_input")
                         for t in ("float", "double", "__half", "__nv_bfloat16")}


def test_host_launch_names_are_instantiated():
    """Every name expression the host side builds (fastconv/cuda/*.py through launch.instance) is in the
    family's FC_INSTANTIATE list (a typo would only fail at run time otherwise)."""
    import torch
    from fastconv.cuda import conv, launch, pool

    pool_src = Path(pool.__file__).read_text()
    for stem in re.findall(r'instance\("(\w+)"', pool_src):
        for dtype in launch.CTYPES:
            assert launch.instance(stem, dtype) in loader.name_expressions("pool"), stem
    for kind in ("conv_direct_forward", "conv_direct_grad_input", "conv_direct_grad_weight", "conv_depthwise_forward",
                 "conv_depthwise_grad_input", "igemm_forward", "igemm_grad_input"):
        g = _geometry(torch.float32)
        assert conv._plan(kind, g)[0] in loader.name_expressions("conv"), kind
    for stem in ("igemm_grad_weight", "conv_reduce_splits"):
        assert launch.instance(stem, torch.float64) in loader.name_expressions("conv")


def _geometry(dtype):
    from fastconv.ops.conv import make_geometry

    return make_geometry(1, 4, 4, 4, 4, (5, 5), (3, 3), None, (1, 1), (1, 1), (1, 1), (1, 1), dtype, "cuda-emu")


def test_tensor_core_family_has_every_dtype_and_loader():
    """conv_tc.cu: each pass in f16, bf16 and tf32, each with the element-wise and the 16-byte
    (``_vec``) loaders; the reduction of the weight gradient's splits per dtype. The host builds
    exactly these names (fastconv/cuda/conv_tc.py)."""
    names = set(_kernel_names("conv_tc"))
    want = {f"tc_{p}_{k}{v}" for p in ("forward", "grad_input", "grad_weight") for k in ("f16", "bf16", "tf32")
            for v in ("", "_vec")} | {f"tc_wgrad_reduce_{k}" for k in ("f16", "bf16", "tf32")}
    assert names == want


def test_sources_ship_inside_the_package():
    import fastconv

    shipped = Path(fastconv.__file__).parent / "kernels"
    assert (shipped / "conv.cu").is_file() and (shipped / "common.cuh").is_file()
    assert loader.KERNEL_DIR.resolve() == shipped.resolve()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_75", "sm_90"])
@pytest.mark.parametrize("family", FAMILIES)
def test_nvcc_werror_and_ptxas_budget(family, arch, tmp_path):
    report = tmp_path / "ptxas.txt"
    cmd = [sys.executable, str(CHECK), "--max-registers", "128", "--save", str(report), "--",
           "nvcc", "-cubin", "-std=c++17", f"-arch={arch}", "-ftz=false", "-prec-div=true", "-prec-sqrt=true", f"-I{ROOT / 'kernels'}", "-Werror", "all-warnings",
           "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"), str(ROOT / "kernels" / f"{family}.cu")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    compiled = set(re.findall(r"Compiling entry function '([^']+)'", report.read_text()))
    # The explicit instantiations nvcc compiled are exactly the name expressions NVRTC lowers.
    assert compiled == set(_extern_c_names(family)) | set(_lowered(family).values())


def test_check_ptxas_fails_on_spills_and_register_budget(tmp_path):
    report = tmp_path / "r.txt"
    report.write_text(
        "ptxas info    : Compiling entry function 'k_ok' for 'sm_80'\n"
        "ptxas info    : Function properties for k_ok\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 0 barriers, 384 bytes cmem[0]\n"
        "ptxas info    : Compiling entry function 'k_spill' for 'sm_80'\n"
        "ptxas info    : Function properties for k_spill\n"
        "    8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n"
        "ptxas info    : Used 200 registers, used 0 barriers, 384 bytes cmem[0]\n")
    p = subprocess.run([sys.executable, str(CHECK), str(report)], capture_output=True, text=True)
    assert p.returncode == 1
    assert "k_spill (sm_80): spills" in p.stderr and "200 registers, over the budget of 128" in p.stderr
    assert "k_ok" not in p.stderr


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001 - any failure to load libnvrtc means: skip
        pytest.skip(f"NVRTC is not available: {e}")
    return nvrtc


@pytest.mark.parametrize("family", FAMILIES)
def test_nvrtc_compiles_with_the_runtime_options(family):
    nvrtc = _nvrtc()
    src = loader.source(family)
    prog = nvrtc.createProgram(src, f"{family}.cu", [], [])
    try:
        for expr in loader.name_expressions(family):
            nvrtc.addNameExpression(prog, expr)
        try:
            nvrtc.compileProgram(prog, [*loader.options(), "--gpu-architecture=sm_75"])
        except nvrtc.NVRTCError as e:
            pytest.fail(f"NVRTC rejected {family}.cu: {e}\n{nvrtc.getProgramLog(prog)}")
        log = nvrtc.getProgramLog(prog)
        assert "warning" not in log.lower(), log
        cubin = nvrtc.getCUBIN(prog)
        assert len(cubin) > 1000
        for name in _extern_c_names(family):  # extern "C": unmangled names in the binary
            assert name.encode() in cubin, name
        for expr in loader.name_expressions(family):  # templates: their lowered names
            lowered = nvrtc.getLoweredName(prog, expr)
            assert (lowered if isinstance(lowered, bytes) else lowered.encode()) in cubin, expr
    finally:
        nvrtc.destroyProgram(prog)


@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_build_keeps_subnormals(family):
    """The decision on -ftz: torch does not flush float32 subnormals, so neither do we. The PTX of
    the run-time build (loader.nvrtc_compile, the function the GPU path calls) has no .ftz
    instruction, while the same source built as CuPy's RawModule would (-ftz=true) has them."""
    _nvrtc()
    assert "-ftz=false" in loader.options()
    ptx = loader.nvrtc_compile(loader.source(family), f"{family}.cu", loader.options(), "compute_75")[0].decode()
    assert ".f32" in ptx and ".ftz" not in ptx
    flushed = loader.nvrtc_compile(loader.source(family), f"{family}.cu", (*loader.options(), "-ftz=true"),
                                   "compute_75")[0].decode()
    assert ".ftz" in flushed  # the check above can fail: CuPy's appended option would flush


def test_cache_key_covers_included_headers(tmp_path, monkeypatch):
    """CuPy keys its cache on the .cu text and options only; ours (and the -DFASTCONV_SRC_HASH option
    the harness's cache sees) changes when common.cuh changes."""
    _nvrtc()
    kernels = tmp_path / "kernels"
    shutil.copytree(loader.KERNEL_DIR, kernels)
    monkeypatch.setattr(loader, "KERNEL_DIR", kernels)
    loader.clear()
    try:
        before_opts, before_key = loader.options(), loader.cache_key("conv", loader.options(), "sm_90")
        assert loader.source("conv") == (ROOT / "kernels" / "conv.cu").read_text()
        header = kernels / "common.cuh"
        header.write_text(header.read_text() + "\n// an edit that changes no .cu file\n")
        loader.clear()
        after_opts, after_key = loader.options(), loader.cache_key("conv", loader.options(), "sm_90")
        assert after_opts != before_opts and after_key != before_key
        assert [o for o in after_opts if "SRC_HASH" not in o] == [o for o in before_opts if "SRC_HASH" not in o]
    finally:
        monkeypatch.undo()
        loader.clear()


def test_block_size_constants_match_the_launcher():
    """The host's BLOCK and implicit-GEMM tile sizes are the kernels' #defines (the kernels also
    static_assert their own maps and trap on another block size)."""
    from fastconv.cuda import conv, launch

    text = (ROOT / "kernels" / "common.cuh").read_text() + loader.source("conv")
    defines = dict(re.findall(r"^#define (\w+) (\d+)", text, re.M))
    assert int(defines["FC_BLOCK"]) == launch.BLOCK == int(defines["IG_THREADS"])
    assert (int(defines["IG_BM"]), int(defines["IG_BN"]), int(defines["IG_BK"])) == (
        conv.IG_TILE_M, conv.IG_TILE_N, conv.IG_K_STEP)


def test_gpu_module_image_is_compiled_once_and_cached_on_disk(tmp_path, monkeypatch):
    """loader._image (what the GPU path loads): a cubin for a known arch, PTX for the newest known arch
    below an unknown one, cached on disk under the key and served from there the second time."""
    _nvrtc()
    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(tmp_path))
    image, lowered = loader._image("pool", loader.options(), "90")
    assert image[:4] == b"\x7fELF" and lowered["max_pool_backward_gather<float>"].encode() in image
    assert set(lowered) == set(loader.name_expressions("pool"))
    assert len(list((tmp_path / "cubin").glob("*.bin"))) == 1
    assert len(list((tmp_path / "cubin").glob("*.names.json"))) == 1

    def no_compile(*args):
        raise AssertionError("compiled again instead of reading the cache")
    monkeypatch.setattr(loader, "nvrtc_compile", no_compile)
    assert loader._image("pool", loader.options(), "90") == (image, lowered)
    monkeypatch.undo()
    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(tmp_path))
    ptx, _ = loader._image("pool", loader.options(), "99")  # an arch this NVRTC does not know
    assert b".target sm_" in ptx and b".ftz" not in ptx


class _FakeCupy:
    """Enough of CuPy's API to watch which device the loader is on when it loads and looks up."""

    def __init__(self):
        self.current, self.events = 0, []
        fake = self

        class Device:
            def __init__(self, index):
                self.index, self.compute_capability = index, "90"

            def __enter__(self):
                self.saved, fake.current = fake.current, self.index
                return self

            def __exit__(self, *exc):
                fake.current = self.saved

        class Module:
            def load(self, image):
                fake.events.append(("load", fake.current, image[:4]))

            def get_function(self, name):
                fake.events.append(("get_function", fake.current, name))
                return name

        self.cuda = type("cuda", (), {"Device": Device, "function": type("function", (), {"Module": Module})})


def test_gpu_modules_are_loaded_and_looked_up_on_the_tensors_device(monkeypatch, tmp_path):
    """A process working on cuda:1 must not load fastconv's kernels into GPU 0's context."""
    _nvrtc()
    fake = _FakeCupy()
    monkeypatch.setattr(loader, "import_cupy", lambda: fake)
    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(tmp_path))
    loader.clear()
    try:
        mangled = loader.function("cuda", "pool", "max_pool_forward<float>", 1)
        assert mangled.startswith("_Z16max_pool_forwardIf")     # looked up by its lowered name
        with pytest.raises(KeyError, match="'max_pool_forward<int>' was not instantiated"):
            loader.function("cuda", "pool", "max_pool_forward<int>", 1)
        assert loader.function("cuda", "pool", "max_unpool_owner", 1) == "max_unpool_owner"  # extern "C"
    finally:
        loader.clear()
    assert fake.events[:2] == [("load", 1, b"\x7fELF"), ("get_function", 1, mangled)]
    assert fake.current == 0


# ------------------------------------------------------------------ the tensor-core conv (conv_tc.cu)
TC_INSTRUCTIONS = (
    "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
    "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32", "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
    "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16", "cp.async.cg.shared.global", "cp.async.wait_group 1",
    "cvt.rna.tf32.f32")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_tensor_core_conv_ptx_and_ptxas_report(arch, tmp_path):
    """conv_tc.cu for the tensor-core architectures: the PTX holds mma.sync (f16, bf16, tf32),
    ldmatrix (plain and .trans), the cp.async pipeline; ptxas reports no spill, no stack frame, and at
    most 128 registers (two 256-thread blocks per SM), with the run-time floating-point flags."""
    src = ROOT / "kernels" / "conv_tc.cu"
    flags = ["-std=c++17", f"-arch={arch}", "-ftz=false", "-prec-div=true", "-prec-sqrt=true", f"-I{ROOT / 'kernels'}"]
    p = subprocess.run(["nvcc", *flags, "--ptx", str(src), "-o", str(tmp_path / "k.ptx")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    ptx = (tmp_path / "k.ptx").read_text()
    for instr in TC_INSTRUCTIONS:
        assert instr in ptx, instr
    report = tmp_path / "ptxas.txt"
    p = subprocess.run([sys.executable, str(CHECK), "--max-registers", "128", "--table", "--save", str(report), "--",
                        "nvcc", "-cubin", *flags, "-Werror", "all-warnings", "-Xptxas", "-v",
                        "-o", str(tmp_path / "k.cubin"), str(src)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    text = report.read_text()
    kernels = re.findall(r"Compiling entry function '(tc_[a-z0-9_]+)'", text)
    assert set(kernels) == set(_kernel_names("conv_tc"))
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    assert len(frames) == len(kernels) and all(f == ("0", "0", "0") for f in frames), frames
    print(p.stdout)   # the per-kernel table (pytest -s shows it)


def test_tensor_core_conv_shared_memory_fits_two_blocks_per_sm():
    """Dynamic shared memory per block (the host's SMEM_* constants, which the launch passes) matches
    the kernel's tile maths and leaves room for two blocks on sm_80 (163 KiB opt-in per block,
    164 KiB per SM) and sm_90."""
    from fastconv import emu
    from fastconv.cuda import conv_tc

    text = loader.source("conv_tc")
    d = {k: int(v) for k, v in re.findall(r"^#define (TC_\w+) (\d+)", text, re.M)}
    assert (d["TC_BM"], d["TC_BN"], d["TC_THREADS"], d["TC_STAGES"], d["TC_KBYTES"]) == (
        conv_tc.TILE_M, conv_tc.TILE_N, conv_tc.THREADS, conv_tc.STAGES, conv_tc.K_BYTES)
    assert conv_tc.SMEM_KMAJOR == d["TC_STAGES"] * 2 * 128 * (64 + 16) == 61440
    assert conv_tc.SMEM_MNMAJOR == {2: 52224, 4: 52224}
    for arch in (80, 90):
        assert 2 * max(conv_tc.SMEM_KMAJOR, *conv_tc.SMEM_MNMAJOR.values()) <= emu.MAX_SHARED_OPTIN[arch]


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_nvrtc_compiles_the_tensor_core_conv_with_the_runtime_options(arch):
    """What a GPU runs: NVRTC with loader.options() (no CUDA include path), mma.sync in the PTX."""
    _nvrtc()
    ptx = loader.nvrtc_compile(loader.source("conv_tc"), "conv_tc.cu", loader.options(), arch)[0].decode()
    for instr in TC_INSTRUCTIONS:
        assert instr in ptx, instr
    for name in _kernel_names("conv_tc"):
        assert f".entry {name}(" in ptx, name
