"""``fastconv gpu-check --out DIR [--emulate]``: the one prepared check for a machine with a GPU.

From a source tree, with the packages such a machine already has (torch, CuPy, pytest; Numba's
TBB layer is not needed, the CUDA path never runs a Numba kernel)::

    PYTHONPATH=. python -m fastconv gpu-check --out DIR

1. writes the environment (torch, CUDA, CuPy, NVRTC, device) and the host overhead per call with
   the launch stubbed (:func:`fastconv.bench_gpu.host_overhead`);
2. runs ``tests/test_cuda_gpu.py`` under pytest (every op, dtypes, channels_last, streams, a second
   device, sync debug mode, CUDA-graph capture), in a child process with a time limit;
3. runs the quick GPU benchmark (:mod:`fastconv.bench_gpu`: fastconv's CUDA algorithms vs cuDNN);

and writes ``DIR/gpu-check.json`` (everything, machine-readable) and ``DIR/gpu-check.log`` (the
pytest output and the benchmark tables). The whole run is sized for under 6 minutes on one GPU.

``--emulate`` runs the same steps on the CPU execution harness (``FASTCONV_GPU_CHECK=emulate``,
tiny benchmark layers), so CI keeps the check working without a GPU.

Exit status: 0 all passed, 1 a test or a benchmark row failed, 2 no GPU (without ``--emulate``) or
a bad argument.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

#: Seconds for the pytest step (the child is killed after it) and the whole benchmark.
TEST_TIMEOUT_S = {"gpu": 200, "emulate": 900}
BENCH_REPS = 3
ROOT = Path(__file__).resolve().parents[2]
GPU_TESTS = ROOT / "tests" / "test_cuda_gpu.py"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu-check.json and gpu-check.log")
    parser.add_argument("--emulate", action="store_true",
                        help="run the same checks on the CPU execution harness (no GPU needed; small sizes)")
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmark step")
    parser.add_argument("--no-tests", action="store_true", help="skip the pytest step")


def _environment(emulate: bool) -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0, "emulate": emulate}
    if env["gpus"]:
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2 ** 30, 1))
    for name in ("cupy", "numba", "pytest"):
        try:
            env[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - record what is missing, the steps say whether it matters
            env[name] = f"missing ({type(e).__name__})"
    try:
        from cupy_backends.cuda.libs import nvrtc
        env["nvrtc"] = ".".join(map(str, nvrtc.getVersion()))
    except Exception as e:  # noqa: BLE001
        env["nvrtc"] = f"unavailable ({type(e).__name__})"
    from fastconv import config
    env["numba_threading_layer"] = dict(getattr(config, "THREADING", {}) or {}).get("layer")
    return env


def _run_tests(emulate: bool, out: Path, log) -> dict:
    """pytest on tests/test_cuda_gpu.py in a child process; counts parsed from its summary line."""
    if not GPU_TESTS.is_file():
        return {"status": "missing", "reason": f"{GPU_TESTS} not found: run gpu-check from the source tree"}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    # The check runs the source tree's GPU tests against the source tree on purpose (the GPU machine has
    # no install); CI's "test the installed wheel" guard does not apply to this child.
    env.pop("FASTCONV_EXPECT_INSTALLED", None)
    if emulate:
        env["FASTCONV_GPU_CHECK"] = "emulate"
    else:
        env.pop("FASTCONV_GPU_CHECK", None)
    junit = out / "gpu-check-junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(GPU_TESTS),
           f"--junitxml={junit}"]
    timeout = TEST_TIMEOUT_S["emulate" if emulate else "gpu"]
    start = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        output += f"\n[gpu-check: pytest killed after {timeout} s]"
        rc = None
    seconds = time.perf_counter() - start
    log.write("=== pytest " + " ".join(cmd[1:]) + "\n" + output + "\n")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", output)}
    failed = sorted(set(re.findall(r"^FAILED (\S+)", output, re.M)))
    skipped = sorted(set(re.findall(r"^SKIPPED \[\d+\] (.+)$", output, re.M)))
    ok = rc == 0 and counts.get("passed", 0) > 0
    return {"status": "passed" if ok else ("timeout" if rc is None else "failed"), "returncode": rc,
            "counts": counts, "failed": failed, "skip_reasons": skipped, "seconds": round(seconds, 1)}


def _run_bench(emulate: bool, log) -> dict:
    from fastconv import bench_gpu, benchmark

    start = time.perf_counter()
    if emulate:
        layers = bench_gpu.emulated_suite()
    else:
        layers = bench_gpu.select_layers(None, quick=True)

    def show(layer, pass_, mode, rows):
        log.write(bench_gpu.format_case(layer, pass_, mode, rows) + "\n\n")
        log.flush()

    result = bench_gpu.run_gpu_suite(layers, benchmark.PASSES, reps=BENCH_REPS if not emulate else 2,
                                     emulate=emulate, on_case=show)
    log.write(bench_gpu.format_summary(result) + "\n")
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"command": "fastconv gpu-check" + (" --emulate" if args.emulate else ""),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    start = time.perf_counter()
    with open(out / "gpu-check.log", "w") as log:
        report["environment"] = env = _environment(args.emulate)
        log.write("environment: " + json.dumps(env) + "\n")
        if not args.emulate and not env["gpus"]:
            report["status"] = "no-gpu"
            report["reason"] = ("no CUDA GPU is visible to torch; run `fastconv gpu-check --emulate` to check the "
                                "CUDA kernels on the CPU harness")
            _write(out, report, start)
            print(f"fastconv gpu-check: error: {report['reason']}", file=sys.stderr)
            return 2
        from fastconv import bench_gpu

        report["host_overhead_us"] = bench_gpu.host_overhead()
        log.write("host overhead per call, launch stubbed (us): " + json.dumps(report["host_overhead_us"]) + "\n")
        log.flush()
        report["tests"] = {"status": "skipped"} if args.no_tests else _run_tests(args.emulate, out, log)
        if args.no_bench:
            report["bench"] = {"status": "skipped"}
        else:
            try:
                report["bench"] = _run_bench(args.emulate, log)
            except Exception as e:  # noqa: BLE001 - the JSON must say what broke
                report["bench"] = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
    tests_ok = report["tests"]["status"] in ("passed", "skipped")
    bench = report["bench"]
    bench_ok = bench.get("status") == "skipped" or (bench.get("summary", {}).get("failures", 1) == 0)
    report["status"] = "passed" if tests_ok and bench_ok else "failed"
    path = _write(out, report, start)
    print(f"fastconv gpu-check: {report['status']} (tests: {report['tests']['status']}"
          f" {report['tests'].get('counts', '')}; bench: "
          f"{bench.get('summary', {}).get('status', bench.get('status'))}); wrote {path} and "
          f"{out / 'gpu-check.log'}")
    return 0 if report["status"] == "passed" else 1


def _write(out: Path, report: dict, start: float) -> Path:
    report["seconds"] = round(time.perf_counter() - start, 1)
    path = out / "gpu-check.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    return path
