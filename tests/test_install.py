"""What a user meets first: the console script, the installed files, the threading layer's report.

The commands run in a child process, as a user runs them; each must exit 0 or fail with a one-line
error, never a traceback.
"""
from __future__ import annotations

import subprocess
import sys
from importlib import metadata, resources

import pytest

import fastconv


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastconv_cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_answers_without_importing_torch():
    code = ("import sys, fastconv_cli\n"
            "try:\n    fastconv_cli.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('torch imported:', 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "bench" in proc.stdout and "info" in proc.stdout
    assert proc.stdout.strip().endswith("torch imported: False")


def test_version():
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip().startswith("fastconv "), proc


def test_unknown_command_is_one_usage_error():
    proc = _cli("benchh")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "invalid choice: 'benchh'" in proc.stderr


def test_info_reports_threading_caches_and_cuda():
    proc = _cli("info")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for line in ("versions: fastconv", "threading: layer", "caches: autotune", "CUDA: torch sees a GPU",
                 "algorithms:"):
        assert line in out, out
    assert "FAILED" not in out and "Traceback" not in proc.stderr


def test_bad_argument_is_one_line_not_a_traceback():
    proc = _cli("bench", "--layers", "no_such_layer", "--no-progress")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "unknown layer 'no_such_layer'" in proc.stderr


@pytest.mark.parametrize("name", ["kernels/conv.cu", "kernels/pool.cu", "kernels/common.cuh",
                                  "emu/cuda_emu.h", "emu/emu_runtime.h", "emu/emu.ld",
                                  "emu/include/cuda_runtime.h"])
def test_package_ships_its_kernel_sources(name):
    # Read through the package, as the loaders do: a file missing from the wheel fails here in CI,
    # where the tests import the installed wheel.
    assert (resources.files("fastconv") / name).is_file(), name


def test_installed_distribution_has_license_and_console_script():
    try:
        dist = metadata.distribution("fastconv")
    except metadata.PackageNotFoundError:
        pytest.skip("fastconv is not installed (a source tree on PYTHONPATH)")
    files = {str(f) for f in dist.files or ()}
    if not any(f.startswith("fastconv/") for f in files):
        pytest.skip("an editable install: the files live in the source tree")
    assert any(f.endswith("LICENSE") for f in files), sorted(files)[:20]
    assert "fastconv_cli.py" in files
    assert any(ep.name == "fastconv" and ep.value == "fastconv_cli:main" for ep in dist.entry_points)
    assert dist.metadata["License-Expression"] == "MIT"


def test_version_attribute_matches_metadata():
    try:
        assert fastconv.__version__ == metadata.version("fastconv")
    except metadata.PackageNotFoundError:
        pytest.skip("fastconv is not installed (a source tree on PYTHONPATH)")
