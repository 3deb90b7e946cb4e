"""Runs the layer suite (:mod:`fastconv.bench_suite`): check each result against torch, then time it.

DESIGN.md §9, the DeepBench layout: for every layer x pass x algorithm (each registered algorithm that
accepts the geometry, ``"auto"``, and ``"torch"``) :func:`run_case`

1. checks the result against torch in float64 on the same data (max abs error relative to the
   reference's largest magnitude) *before* timing; a row that fails is reported and not timed;
2. times it: one warm-up, then rounds in which every algorithm of the (layer, pass) runs in turn, one
   untimed call then one timed call each (several for a sub-millisecond row, :func:`calls_per_round`),
   median per algorithm. Interleaving keeps the ratio to torch
   honest on a shared, noisy machine: a burst of load slows every algorithm of a round alike, instead
   of one of them. Each round starts after the same idle pause the clean worker's call gets (below), and
   each timed call follows an untimed one of its own, as the worker's does: without them fastconv's call
   ran right after the worker's reply, on cores the worker's OpenMP threads were still spinning on
   (libgomp spins after a parallel region), which no user of either library sees. Measured on the
   ResNet-50 global average pool (8x2048x7x7, forward; the suite's worst forward row, 1.61): fastconv's
   call right after a worker's reply 2.5 ms, the next calls 0.10-0.15 (torch in the worker: 2.1 after
   this process's calls, then 0.31);
3. takes torch's time, by default, from a worker process that never imports fastconv or Numba
   (:mod:`fastconv.bench_torch_worker`), interleaved with the rounds: that is what a user who chose
   torch would see (after one untimed call, and after this process has idled long enough for its
   spinning OpenBLAS and TBB threads to sleep, so that they do not take the worker's cores). torch is
   timed in this process too, and the two are compared: a baseline that is much slower here than in
   the clean worker is reported as contaminated;
4. reports milliseconds (median and quartiles), GFLOP/s (FLOPs = 2 x MACs, bias not counted), percent
   of the machine's GEMM rate measured in the same run (:func:`measure_gemm`, 2048^3 ``torch.mm``),
   the ratio to the clean torch time (below 1 is faster), and the error.

:func:`first_call` times ``import fastconv`` and the first convolution in a fresh Python process.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import autotune, backends, registry
from .bench_report import summarize
from .bench_suite import Layer, PassImpl
from .bench_torch_worker import settle_heap
from .tolerances import ALGORITHM_TOLERANCES, TOLERANCES

#: Relative error bound (max |got - reference| / max |reference|) per dtype, and per algorithm where
#: one is documented to lose more: the ``rtol`` of the tests' table (:mod:`fastconv.tolerances`).
TOLERANCE = {dtype: tol["rtol"] for dtype, tol in TOLERANCES.items()}
ALGO_TOLERANCE = {key: tol["rtol"] for key, tol in ALGORITHM_TOLERANCES.items()}
#: Seconds of timed rounds one (layer, pass) may take at most; large layers get fewer rounds (>= MIN_REPS).
ROUND_BUDGET_S = 20.0
MIN_REPS = 3
#: torch in this process slower than in the clean worker by more than this factor: a contaminated baseline.
CONTAMINATED_RATIO = 1.5
#: A round times each algorithm's call at least this long in all (ms): rows faster than this get several timed calls
#: per round (at most :data:`MAX_CALLS_PER_ROUND`), in this process and in the worker alike. With one call per
#: round a sub-millisecond row's median rested on a handful of samples, each a single call after an idle pause: the
#: MobileNet global average pool (0.1-0.3 ms) read 0.03 in one held-out run (run CQ: torch's worker calls stalled
#: to a median of 7.95 ms) against 0.50-0.59 in the others, and moved the held-out forward geomean by 0.1.
MIN_ROUND_MS = 2.0
MAX_CALLS_PER_ROUND = 20
#: Seconds this process idles before the worker times torch: OpenBLAS's threads spin for about 0.1 s
#: after their last call and TBB's for a while too; on two cores they would take the worker's cores.
QUIESCE_S = 0.15


class _PlainOutputs(torch.nn.Module):
    """``model`` with a named-tuple result handed back as a plain tuple. ``torch.export`` cannot save a
    named-tuple class it has not registered, and torchvision's GoogLeNet returns ``GoogLeNetOutputs`` in
    training mode, so its training step had been timed in this process instead of the clean worker."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return tuple(out) if isinstance(out, tuple) else out


class TorchBaseline:
    """The clean torch worker: ``time(layer, pass_, dtype, n)`` returns n call times in ms.

    A context manager; the worker inherits this process's environment (OPENBLAS_* included) and is
    told the thread count torch uses here.
    """

    def __init__(self, threads: int):
        worker = Path(__file__).resolve().parent / "bench_torch_worker.py"
        self._proc = subprocess.Popen([sys.executable, str(worker)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = self._ask({"cmd": "setup", "threads": threads})

    def _ask(self, request: dict) -> dict:
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch baseline worker exited (code {self._proc.poll()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"torch baseline worker: {answer['error']}")
        return answer

    def time(self, layer: str, pass_: str, dtype: torch.dtype, n: int = 1, seed: int = 0) -> list[float]:
        """``n`` timed calls after one untimed call (torch's pool awake, as in a torch user's loop), asked
        for after :data:`QUIESCE_S` of idling here (this process's spinning pools asleep)."""
        time.sleep(QUIESCE_S)
        return self._ask({"cmd": "time", "layer": layer, "pass": pass_, "seed": seed, "n": n, "warm": 1,
                          "dtype": str(dtype).replace("torch.", "")})["ms"]

    def load_model(self, model, example: torch.Tensor, path: Path) -> str:
        """Export ``model`` (torch layers only, in its current train/eval mode) for ``example``'s shape,
        have the worker load it; returns its key. The worker never sees the model's Python classes."""
        plain = _PlainOutputs(model).train(model.training)
        program = torch.export.export(plain, (example,))
        torch.export.save(program, str(path))
        key = path.stem
        self._ask({"cmd": "load_model", "key": key, "path": str(path), "input_shape": list(example.shape)})
        return key

    def time_model(self, key: str, mode: str, n: int = 1, warm: int = 0) -> list[float]:
        """n timed steps of a loaded model (inference forward, or training forward + backward) after ``warm``
        untimed ones, asked for after :data:`QUIESCE_S` of idling here."""
        time.sleep(QUIESCE_S)
        return self._ask({"cmd": "time_model", "key": key, "mode": mode, "n": n, "warm": warm})["ms"]

    def is_clean(self) -> bool:
        """True when the worker has imported neither fastconv nor Numba (checked, not assumed)."""
        return not any(self._ask({"cmd": "clean"}).values())

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------------
def measure_gemm(dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n^3 ``torch.mm`` in ``dtype`` on this machine now (median of ``reps``)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, dtype=dtype, generator=gen)
    b = torch.randn(n, n, dtype=dtype, generator=gen)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """max |got - reference| / max |reference| (computed in float64; inf for a shape mismatch or NaN)."""
    if got.shape != reference.shape:
        return math.inf
    ref = reference.to(torch.float64)
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (got.to(torch.float64) - ref).abs().max().item() if ref.numel() else 0.0
    if math.isnan(err):
        return math.inf
    return err / scale if scale > 0 else err


def tolerance(dtype: torch.dtype, algo: str) -> float:
    return ALGO_TOLERANCE.get((algo, dtype), TOLERANCE[dtype])


def _call(impl: PassImpl, algo: str, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return impl.torch(inputs) if algo == "torch" else impl.fastconv(inputs, algo)


def _timed(impl: PassImpl, algo: str, inputs: tuple) -> float:
    start = time.perf_counter()
    _call(impl, algo, inputs)
    return (time.perf_counter() - start) * 1e3


def _auto_choice(layer: Layer, pass_: str, dtype: torch.dtype) -> Optional[str]:
    """Which algorithm ``"auto"`` runs for this layer and pass now (after its first call tuned it)."""
    if not layer.op.startswith("conv"):
        return None  # pooling has one kernel
    shapes = layer.shapes
    ndim = len(shapes["input"]) - 2
    kw = layer.kwargs
    expand = lambda v: [int(v)] * ndim if isinstance(v, int) else list(v)  # noqa: E731
    from .ops import transposed
    from .ops.conv import make_geometry

    pad, stride, dilation = expand(kw.get("padding", 0)), expand(kw.get("stride", 1)), expand(kw.get("dilation", 1))
    family = "conv"
    if "transpose" in layer.op:
        # The adjoint convolution: the forward is the conv_transpose family's choice, the gradients are the
        # adjoint's forward (grad_input) and weight-gradient passes (bench_suite.conv_transpose_layer).
        g = transposed.geometry(ndim, shapes["input"], shapes["weight"], shapes["output"][2:], kw.get("groups", 1),
                                stride, pad, dilation, dtype, backends.current())
        family, pass_ = (transposed.FAMILY, "forward") if pass_ == "forward" else \
            ("conv", "forward" if pass_ == "grad_input" else pass_)
    else:
        g = make_geometry(ndim, shapes["input"][0], shapes["input"][1], shapes["weight"][0], kw.get("groups", 1),
                          shapes["input"][2:], shapes["weight"][2:], None, stride, pad, pad, dilation, dtype,
                          backends.current())
    try:
        # what auto ran: the stored choice, never a new measurement
        return registry.decide("auto", g, pass_, family=family).name
    except (RuntimeError, ValueError):
        return None


def _quartiles(times: list[float]) -> tuple[float, float]:
    if len(times) < 2:
        return times[0], times[0]
    q = statistics.quantiles(times, n=4, method="inclusive")
    return q[0], q[2]


def calls_per_round(slowest_ms: float) -> int:
    """Timed calls per algorithm and round for a (layer, pass) whose slowest warm call took ``slowest_ms``: enough
    for :data:`MIN_ROUND_MS` of timed work, 1 to :data:`MAX_CALLS_PER_ROUND`."""
    return max(1, min(MAX_CALLS_PER_ROUND, math.ceil(MIN_ROUND_MS / max(slowest_ms, 1e-6))))


#: Most extra calls given to ``auto`` to finish tuning on real calls before it is checked and timed.
AUTO_TUNING_CALLS_MAX = 64


def run_case(layer: Layer, pass_: str, algos: Sequence[str], dtype: torch.dtype, reps: int,
             gemm_gflops: float, seed: int = 0, baseline: Optional[TorchBaseline] = None) -> list[dict]:
    """Check then time ``algos`` (must include ``"torch"``) on one layer and pass; one row dict per algorithm.

    With a ``baseline`` worker, the ``torch`` row's time is the clean worker's, and the row also holds
    torch's time in this process (``inprocess_ms``) and whether that one was contaminated.
    """
    impl = layer.passes[pass_]
    inputs = impl.inputs(dtype, torch.Generator().manual_seed(seed))
    # Reference: torch's own op in float64 on the same numbers.
    inputs64 = tuple(t.to(torch.float64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                     for t in inputs)
    reference = _call(impl, "torch", inputs64)
    rows: dict[str, dict] = {}
    warm: dict[str, float] = {}
    for algo in algos:
        row = rows[algo] = {"layer": layer.name, "arch": layer.arch, "op": layer.op, "pass": pass_,
                            "algo": algo, "dtype": str(dtype).replace("torch.", ""), "macs": layer.macs}
        try:
            start = time.perf_counter()
            out = _call(impl, algo, inputs)  # first call: compiles, and for "auto" may tune
            row["first_call_ms"] = (time.perf_counter() - start) * 1e3
            if algo == "auto":
                # the CPU autotuner measures on real calls: call until it has chosen (bounded), so the
                # timed rounds and the error check see the chosen algorithm, not the candidates on trial
                for _ in range(AUTO_TUNING_CALLS_MAX):
                    before = autotune.tuning_calls()
                    out = _call(impl, algo, inputs)
                    if autotune.tuning_calls() == before:
                        break
        except Exception as e:  # noqa: BLE001 - report the failure in the table, go on with the suite
            row.update(ok=False, error=None, failure=f"{type(e).__name__}: {e}")
            continue
        err = relative_error(out, reference)
        tol = tolerance(dtype, algo)
        row.update(error=err, tolerance=tol, ok=err <= tol)
        if not row["ok"]:
            row["failure"] = f"error {err:.2e} exceeds tolerance {tol:.0e}"
            continue
        if algo == "auto":
            row["auto_choice"] = _auto_choice(layer, pass_, dtype)
        warm[algo] = _timed(impl, algo, inputs)  # warm-up: caches and buffers settled
    clean: list[float] = []
    if warm and baseline is not None and "torch" in warm:
        baseline.time(layer.name, pass_, dtype, 1, seed)  # the worker's warm-up
    if warm:
        calls = calls_per_round(max(warm.values()))
        # each round costs calls + 1 calls per algorithm (the untimed one before them)
        rounds = min(reps, max(MIN_REPS, int(ROUND_BUDGET_S * 1e3 / max((calls + 1) * sum(warm.values()), 1e-3))))
        times: dict[str, list] = {a: [] for a in warm}
        for _ in range(rounds):
            if baseline is not None:
                time.sleep(QUIESCE_S)  # the worker's pools asleep: what the worker is given before its calls
            for algo in warm:  # interleaved: see the module docstring
                _call(impl, algo, inputs)  # untimed: this side's pools awake, as the worker's call is given
                times[algo] += [_timed(impl, algo, inputs) for _ in range(calls)]
            if baseline is not None and "torch" in warm:
                clean += baseline.time(layer.name, pass_, dtype, calls, seed)
        if clean:
            inprocess = times["torch"]
            times["torch"] = clean
            rows["torch"].update(inprocess_ms=statistics.median(inprocess), inprocess_times_ms=inprocess,
                                 baseline="separate process")
            rows["torch"]["contaminated"] = (rows["torch"]["inprocess_ms"]
                                             > CONTAMINATED_RATIO * statistics.median(clean))
        elif "torch" in rows:
            rows["torch"]["baseline"] = "this process"
        torch_ms = statistics.median(times["torch"]) if "torch" in times else None
        for algo, ts in times.items():
            ms = statistics.median(ts)
            q1, q3 = _quartiles(ts)
            gflops = 2 * layer.macs / (ms * 1e-3) / 1e9
            rows[algo].update(ms=ms, q1_ms=q1, q3_ms=q3, times_ms=ts, reps=rounds, calls_per_round=calls,
                              gflops=gflops,
                              pct_gemm=100 * gflops / gemm_gflops if gemm_gflops else None,
                              ratio=ms / torch_ms if torch_ms else None)
    return list(rows.values())


FIRST_CALL_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import fastconv
t2 = time.perf_counter()
x = torch.randn(1, 3, 32, 32); w = torch.randn(8, 3, 3, 3)
fastconv.functional.conv2d(x, w, padding=1)
t3 = time.perf_counter()
fastconv.functional.conv2d(x, w, padding=1)
t4 = time.perf_counter()
print(json.dumps({"import_torch_s": t1 - t0, "import_fastconv_s": t2 - t1, "first_conv2d_s": t3 - t2,
                  "second_conv2d_ms": (t4 - t3) * 1e3, "import_and_first_call_s": t3 - t1,
                  "dynamo_imported": "torch._dynamo" in sys.modules}))
"""


def first_call(timeout: float = 600.0) -> dict:
    """Time ``import fastconv`` and the first (small) conv2d call in a fresh Python process.

    Numba's on-disk cache is used as it is (warm when the kernels were compiled before), so this is
    the delay a user sees at the start of each script. Returns seconds (``second_conv2d_ms`` in ms),
    or ``{"failure": ...}``.
    """
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run([sys.executable, "-c", FIRST_CALL_SCRIPT], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"failure": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"failure": (proc.stderr.strip().splitlines() or ["exit code %d" % proc.returncode])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def algos_for(layer: Layer, dtype: torch.dtype, wanted: Optional[Sequence[str]]) -> list[str]:
    """torch first (the baseline every ratio needs), then the accepted algorithms, then auto."""
    accepted = layer.algorithms(dtype) + ["auto"]
    if wanted is not None:
        accepted = [a for a in accepted if a in wanted]
    return ["torch"] + accepted


def _load() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(gemm_gflops: float, dtype: torch.dtype) -> dict:
    import numba
    import numpy

    from . import __version__, autotune

    return {"fastconv": __version__, "torch": torch.__version__, "numba": numba.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "numba_threads": numba.get_num_threads(), "backend": backends.current(),
            "gemm_dtype": str(dtype).replace("torch.", ""), "gemm_gflops": gemm_gflops,
            "autotune": autotune.enabled(), "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "load_average": _load(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_suite(layers: Sequence[Layer], passes: Sequence[str], algos: Optional[Sequence[str]] = None,
              dtype: torch.dtype = torch.float32, reps: int = 5, progress: bool = True,
              on_case: Optional[Callable[[Layer, str, list], None]] = None, with_first_call: bool = True,
              baseline: str = "process") -> dict:
    """Run the suite; returns ``{"environment", "rows", "summary", "first_call"}`` (JSON-ready).

    ``baseline``: ``"process"`` (default) times torch in a clean worker process, ``"inprocess"`` in
    this one. ``on_case(layer, pass_, rows)`` is called after each (layer, pass), e.g. to print its
    table. A tqdm bar on stderr counts (layer, pass) cases when ``progress``.
    """
    from tqdm import tqdm

    if baseline not in ("process", "inprocess"):
        raise ValueError(f"baseline must be 'process' or 'inprocess', got {baseline!r}")
    settle_heap()  # as the worker does at its setup
    gemm = measure_gemm(dtype)
    load_before = _load()
    cases = [(l, p) for l in layers for p in passes if p in l.passes]
    rows: list[dict] = []
    worker = TorchBaseline(torch.get_num_threads()) if baseline == "process" else None
    bar = tqdm(total=len(cases), desc="fastconv bench", unit="case", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    try:
        for layer, pass_ in cases:
            bar.set_postfix_str(f"{layer.name} {pass_}")
            case_rows = run_case(layer, pass_, algos_for(layer, dtype, algos), dtype, reps, gemm,
                                 baseline=worker)
            rows += case_rows
            if on_case is not None:
                on_case(layer, pass_, case_rows)
            bar.update()
        worker_clean = worker.is_clean() if worker is not None else None
    finally:
        bar.close()
        if worker is not None:
            worker.close()
    env = environment(gemm, dtype)
    env.update(load_average_before=load_before,
               torch_baseline=("a separate process that imported neither fastconv nor Numba (checked)"
                               if worker_clean else "this process" if worker is None else
                               "a separate process (NOT clean: it imported fastconv or Numba)"))
    result = {"environment": env,
              "layers": [{"name": l.name, "arch": l.arch, "op": l.op, "shapes": l.shapes, "kwargs": l.kwargs,
                          "macs": l.macs} for l in layers],
              "rows": rows, "summary": summarize(rows)}
    result["first_call"] = first_call() if with_first_call else None
    return result
