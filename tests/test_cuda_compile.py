"""Compile checks of kernels/*.cu that need no GPU (DESIGN.md section 6).

* nvcc (when on PATH) for two architectures, -Werror all-warnings, ptxas report checked by
  tools/check_ptxas.py (no spills, register budget). CMakeLists.txt runs every architecture.
* NVRTC through CuPy's low-level bindings with exactly the run-time options
  (fastconv.cuda.loader.OPTIONS), every kernel name present in the compiled program.
* The CPU harness finds the same kernel names (it compiles the same text with g++).
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
    from fastconv import emu

    return sorted(emu.find_kernels(loader.source(family)))


def test_every_family_has_float_and_double_entry_points():
    for family in FAMILIES:
        names = _kernel_names(family)
        assert names, family
        stems = {re.sub(r"_(f32|f64|i64)$", "", n) for n in names}
        for stem in stems:
            assert f"{stem}_f32" in names and f"{stem}_f64" in names or f"{stem}_i64" in names, stem


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
           "nvcc", "-cubin", "-std=c++17", f"-arch={arch}", f"-I{ROOT / 'kernels'}", "-Werror", "all-warnings",
           "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"), str(ROOT / "kernels" / f"{family}.cu")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    compiled = set(re.findall(r"Compiling entry function '([^']+)'", report.read_text()))
    assert compiled == set(_kernel_names(family))


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
        options = [*loader.OPTIONS, "--gpu-architecture=sm_75"]
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as e:
            pytest.fail(f"NVRTC rejected {family}.cu: {e}\n{nvrtc.getProgramLog(prog)}")
        log = nvrtc.getProgramLog(prog)
        assert "warning" not in log.lower(), log
        cubin = nvrtc.getCUBIN(prog)
        assert len(cubin) > 1000
        for name in _kernel_names(family):  # extern "C": unmangled names in the binary
            assert name.encode() in cubin, name
    finally:
        nvrtc.destroyProgram(prog)
