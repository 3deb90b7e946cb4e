"""Whole-model benchmark (``fastconv bench --models``): converted networks against the same network on torch.

Per-layer ratios do not add up to what a user feels: per-call overhead, layout copies, torch's other
ops and the thread pools of a mixed process show only in whole models. For each model and mode —
inference at batch 1 and 8, one training step (forward + backward) at batch 8 — this module

1. builds the torch network (a zoo model turned back into torch layers with
   :func:`fastconv.nn.to_torch`, or a torchvision model when torchvision is installed) and the same
   network converted to fastconv (:func:`fastconv.convert`, same weights), and checks that their
   outputs agree within float32 tolerance before anything is timed;
2. times torch the way a user who chose torch runs it — in a worker process that never imports
   fastconv or Numba (:mod:`fastconv.bench_torch_worker`), which loads the network as a
   ``torch.export`` program — and, for comparison, in this process;
3. times the converted model here, interleaved round by round with the worker, medians over rounds;
   in each round each side first idles (the other side's thread pools go to sleep), takes one untimed
   step and times the next :data:`STEPS_PER_ROUND` back to back, as a user's loop runs them;
4. splits one converted forward (torch's profiler) into fastconv's ops, torch's other ops, and the
   rest (Python, dispatch, overhead).

Two more ways to measure, for the thread-policy targets of a mixed process and a shared machine:

- ``baseline="alternate"``: torch's model and the converted one in this one process, stepped in turn
  (a fastconv step, then torch, then fastconv, ...), so that each side runs right after the other and
  meets its thread pools awake; the ratio is fastconv over torch *here*, and the clean worker still
  runs in every round, so torch here / torch clean says how much torch itself suffers from living
  beside fastconv.
- ``busy_neighbour=True``: another process (:class:`BusyNeighbour`) keeps one of this process's cores
  busy; in every round the converted model and torch (the clean worker) are timed once with the
  neighbour stopped and once with it running, and each side's slowdown is busy time / quiet time.
"""
from __future__ import annotations

import atexit
import copy
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from . import autotune, convert, optimize
from .bench_runner import QUIESCE_S, TorchBaseline, _load
from .bench_torch_worker import settle_heap
from .nn import to_torch

MODES = ("infer1", "infer8", "train8")
_BATCH = {"infer1": 1, "infer8": 8, "train8": 8}
#: Output agreement of converted and torch model (float32, relative to the output's largest magnitude).
MODEL_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ModelCase:
    """A network to compare: ``build()`` returns a torch ``nn.Module`` (torch layers), input (C, *S)."""

    name: str
    source: str  # "zoo" or "torchvision"
    build: Callable[[], nn.Module]
    input_shape: tuple


def _zoo(name: str, input_shape: tuple) -> ModelCase:
    def build():
        from . import models

        return to_torch(models.MODELS[name][0]())

    return ModelCase(name, "zoo", build, input_shape)


def _torchvision(name: str, input_shape: tuple = (3, 224, 224)) -> ModelCase:
    def build():
        import torchvision

        return getattr(torchvision.models, name)(weights=None)

    return ModelCase(f"tv_{name}", "torchvision", build, input_shape)


#: Zoo networks (always available) and torchvision's classification models (when installed).
ZOO_MODELS = [_zoo("lenet5", (1, 32, 32)), _zoo("resnet18", (3, 224, 224)), _zoo("resnet50", (3, 224, 224)),
              _zoo("mobilenet_v1", (3, 224, 224)), _zoo("googlenet", (3, 224, 224)),
              _zoo("alexnet", (3, 224, 224)), _zoo("vgg11", (3, 224, 224))]
TORCHVISION_MODELS = [_torchvision(n) for n in (
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0",
    "regnet_y_400mf", "densenet121", "googlenet", "vgg11", "alexnet", "squeezenet1_0", "convnext_tiny")]


def available_models() -> list[ModelCase]:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return list(ZOO_MODELS)
    return ZOO_MODELS + TORCHVISION_MODELS


def select_models(spec: Optional[str]) -> list[ModelCase]:
    """Models named by ``spec`` (comma-separated names or substrings); default: every available one."""
    cases = available_models()
    if not spec or spec == "all":
        return cases
    chosen = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        hits = [c for c in cases if c.name == part] or [c for c in cases if part in c.name]
        if not hits:
            raise ValueError(f"unknown model {part!r}; available: {', '.join(c.name for c in cases)}"
                             + ("" if any(c.source == "torchvision" for c in cases)
                                else " (install torchvision for its models)"))
        chosen += [c for c in hits if c not in chosen]
    return chosen


def _inputs(case: ModelCase, batch: int, size: Optional[int]) -> torch.Tensor:
    shape = case.input_shape
    if size is not None and len(shape) == 3 and shape[1:] == (224, 224):  # ImageNet models only
        shape = (shape[0], size, size)
    return torch.randn((batch,) + tuple(shape), generator=torch.Generator().manual_seed(0))


def _step(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """One timed unit: an inference forward, or a training forward + backward."""
    if mode.startswith("infer"):
        with torch.no_grad():
            return model(x)
    for p in model.parameters():
        p.grad = None
    out = model(x)
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
    out.float().sum().backward()
    return out


def _timed(model, x, mode) -> float:
    """One step's time in ms."""
    start = time.perf_counter()
    _step(model, x, mode)
    return (time.perf_counter() - start) * 1e3


#: Timed steps per round and side, after one untimed step. A user's loop runs steps back to back; a single step
#: after an idle pause is not what it sees: on the 2-core dev machine (a VM) a torch-only process stepping
#: torchvision's mobilenet_v2 at batch 1 took 16-20 ms per step after 0.15 s of sleep and 5.3-6.6 ms back to back,
#: and fastconv's converted model likewise (17.8-18.7 against 7.0-8.6): the idle pause's cost (cores woken from
#: the hypervisor's idle, caches refilled) swamped both. So every round settles (the other side's pools asleep),
#: wakes its own side with one step, and times the next ones.
STEPS_PER_ROUND = 2


def _timed_round(model, x, mode) -> list[float]:
    """One round of one side: settle (:data:`QUIESCE_S`), one untimed step, then :data:`STEPS_PER_ROUND` timed
    steps (ms each)."""
    time.sleep(QUIESCE_S)
    _step(model, x, mode)
    return [_timed(model, x, mode) for _ in range(STEPS_PER_ROUND)]


def _output(out):
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = _output(got).detach().double(), _output(ref).detach().double()
    scale = ref.abs().max().item() or 1.0
    return (got - ref).abs().max().item() / scale


def breakdown(model: nn.Module, x: torch.Tensor) -> dict:
    """Where one inference forward's time goes: fastconv's ops, torch's other ops, the rest (ms)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
        total = (time.perf_counter() - start) * 1e3
    fastconv_ms = other_ms = 0.0
    calls = 0
    for event in prof.key_averages():
        if event.key.startswith("fastconv::"):
            fastconv_ms += event.cpu_time_total / 1e3  # inclusive: the kernels run inside the op
            calls += event.count
        elif event.key.startswith("aten::") and not event.key.startswith("aten::empty"):
            other_ms += event.self_cpu_time_total / 1e3
    # aten ops called inside fastconv's ops are already in fastconv_ms.
    inside = sum(e.self_cpu_time_total for e in prof.events()
                 if e.name.startswith("aten::") and _inside_fastconv(e)) / 1e3
    other_ms = max(0.0, other_ms - inside)
    return {"total_ms": total, "fastconv_ops_ms": fastconv_ms, "fastconv_calls": calls,
            "torch_ops_ms": other_ms, "rest_ms": max(0.0, total - fastconv_ms - other_ms)}


def _inside_fastconv(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("fastconv::"):
            return True
        parent = parent.cpu_parent
    return False


class BusyNeighbour:
    """Another process on this process's cores that keeps one core busy, switched on and off.

    It is ``bench_torch_worker.py --busy``: a one-thread torch matmul loop (256^3), pinned to the last
    core this process may run on. A matmul rather than a pure-Python loop, because another ML job holds
    its core's vector units and caches, not just a time slice; one thread and pinned, so that the load is
    exactly one core whatever its BLAS would do. :meth:`busy` and :meth:`quiet` send SIGCONT / SIGSTOP
    (a stopped process costs nothing), so that quiet and busy times come from the same run, round by
    round. It is always killed: :meth:`close` (call it in a ``finally``), an ``atexit`` hook, and on Linux
    the neighbour asks the kernel to kill it when this process dies (PR_SET_PDEATHSIG). POSIX only.
    """

    #: Seconds between SIGCONT and the first timed step, so that the neighbour is on its core.
    SETTLE_S = 0.05

    def __init__(self):
        if not hasattr(signal, "SIGSTOP"):
            raise RuntimeError("--busy-neighbour needs POSIX signals (SIGSTOP/SIGCONT); not available on "
                               f"{sys.platform}")
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.cpu = cpus[-1] if cpus else -1
        worker = Path(__file__).resolve().parent / "bench_torch_worker.py"
        self._proc = subprocess.Popen([sys.executable, str(worker), "--busy", str(self.cpu)],
                                      stdout=subprocess.PIPE, text=True)
        self.pid = self._proc.pid
        atexit.register(self.close)
        self._busy = False
        self._cpu_at_start = None
        self._busy_since = 0.0
        self._busy_wall = 0.0
        self._busy_cpu = 0.0
        try:
            line = self._proc.stdout.readline()
            if not line.startswith("ready"):
                raise RuntimeError(f"the busy neighbour did not start (exit code {self._proc.poll()})")
            self.quiet()
        except BaseException:
            self.close()
            raise

    def _cpu_s(self) -> Optional[float]:
        """CPU seconds the neighbour has used (Linux /proc), None where unknown."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, ValueError, IndexError):
            return None

    def busy(self) -> None:
        """Let the neighbour run, and give it a moment to be on its core."""
        if self._proc.poll() is not None:
            raise RuntimeError(f"the busy neighbour died (exit code {self._proc.returncode})")
        if not self._busy:
            os.kill(self.pid, signal.SIGCONT)
            self._busy, self._busy_since = True, time.perf_counter()
            self._cpu_at_start = self._cpu_s()
            time.sleep(self.SETTLE_S)

    def _state(self) -> Optional[str]:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return None

    def quiet(self) -> None:
        """Stop the neighbour, and wait until it is stopped (a signal is delivered asynchronously)."""
        os.kill(self.pid, signal.SIGSTOP)
        deadline = time.perf_counter() + 1.0
        while time.perf_counter() < deadline:
            state = self._state()
            if state is None:  # no /proc: a moment is plenty for the kernel to deliver SIGSTOP
                time.sleep(0.01)
                break
            if state in ("T", "t"):
                break
            if state in ("Z", "X"):
                raise RuntimeError(f"the busy neighbour died (exit code {self._proc.poll()})")
            time.sleep(0.001)
        if self._busy:
            self._busy = False
            self._busy_wall += time.perf_counter() - self._busy_since
            cpu = self._cpu_s()
            if cpu is not None and self._cpu_at_start is not None:
                self._busy_cpu += cpu - self._cpu_at_start

    def core_share(self) -> Optional[float]:
        """The share of one core the neighbour got while switched on (1.0: a whole core), None if unknown."""
        if self._busy_wall <= 0 or self._cpu_s() is None:
            return None
        return self._busy_cpu / self._busy_wall

    def close(self) -> None:
        """Kill the neighbour (SIGKILL works on a stopped process too) and reap it."""
        atexit.unregister(self.close)
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def alive(self) -> bool:
        return self._proc.poll() is None


def _time_alternating(ours, torch_model, x, mode, reps, baseline, key):
    """Rounds of: an untimed fastconv step, torch here (timed), fastconv (timed), then the clean worker.

    Every timed step of this process runs right after a step of the other model, with its thread pools
    still awake, as in a program that mixes torch work with fastconv work; the lead-in step makes the
    round's first timed torch step follow fastconv too, not the worker's quiet pause.
    """
    ours_ms, here_ms, clean_ms = [], [], []
    for _ in range(reps):
        _step(ours, x, mode)
        here_ms.append(_timed(torch_model, x, mode))
        ours_ms.append(_timed(ours, x, mode))
        if key is not None:
            clean_ms += baseline.time_model(key, mode, 1)
    return ours_ms, here_ms, clean_ms


def _time_busy(ours, torch_model, x, mode, reps, neighbour: BusyNeighbour, baseline, key) -> dict:
    """Quiet and busy times of both sides, interleaved: each round times both with the neighbour stopped
    and with it running, in the order quiet-busy, then busy-quiet (a drift in load hits both alike)."""
    times = {(side, state): [] for side in ("fastconv", "torch") for state in ("quiet", "busy")}
    try:
        for i in range(reps):
            for state in (("quiet", "busy") if i % 2 == 0 else ("busy", "quiet")):
                if state == "busy":
                    neighbour.busy()
                else:
                    neighbour.quiet()
                times[("fastconv", state)] += _timed_round(ours, x, mode)
                times[("torch", state)] += (baseline.time_model(key, mode, STEPS_PER_ROUND, warm=1)
                                            if key is not None else _timed_round(torch_model, x, mode))
    finally:
        neighbour.quiet()
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"torch_timed_in": "separate process" if key is not None else "this process", "reps": reps}
    for side in ("fastconv", "torch"):
        out.update({f"{side}_quiet_ms": med[(side, "quiet")], f"{side}_busy_ms": med[(side, "busy")],
                    f"{side}_slowdown": med[(side, "busy")] / med[(side, "quiet")],
                    f"{side}_quiet_times_ms": times[(side, "quiet")],
                    f"{side}_busy_times_ms": times[(side, "busy")]})
    out["fastconv_no_worse"] = out["fastconv_slowdown"] <= out["torch_slowdown"]
    return out


#: Most extra warm-up steps spent letting the autotuner finish (each key needs a few calls per candidate).
TUNING_STEPS_MAX = 40


def run_model(case: ModelCase, modes: Sequence[str], reps: int, size: Optional[int],
              baseline: Optional[TorchBaseline], workdir: Path, alternate: bool = False,
              neighbour: Optional[BusyNeighbour] = None) -> list[dict]:
    """Check, then time one model in each mode; one row per mode.

    ``alternate``: time torch in this process stepped in turn with fastconv (``ratio`` against that);
    ``neighbour``: also time both sides with the neighbour stopped and running (``row["busy_neighbour"]``).
    """
    torch.manual_seed(0)
    torch_model = case.build()
    ours = convert(copy.deepcopy(torch_model))
    rows = []
    # In eval mode a freshly initialised deep network may end in all-zero features (its BatchNorms hold
    # no statistics yet), and then only the classifier's bias reaches the output: a comparison that
    # cannot fail. Train mode normalises with the batch's own statistics, so every layer shows; both
    # models see the same batch, so their running statistics stay equal.
    try:
        torch_model.train()
        ours.train()
        with torch.no_grad():
            x_check = _inputs(case, 8, size)
            # the same random state for both forwards: dropout and stochastic depth draw the same masks
            # in both models (fastconv's ops draw nothing), so a difference is the convolutions' own
            with torch.random.fork_rng():
                torch.manual_seed(1)
                ours_out = ours(x_check)
                torch.manual_seed(1)
                train_error = relative_error(ours_out, torch_model(x_check))
    except Exception as e:  # noqa: BLE001 - reported in every row below
        train_error, check_failure = None, f"{type(e).__name__}: {e}"
    else:
        check_failure = None
    optimized = None  # fastconv.optimize(ours): BatchNorm folded, ReLU fused; built for the first inference mode
    for mode in modes:
        batch = _BATCH[mode]
        row = {"model": case.name, "source": case.source, "mode": mode, "batch": batch}
        rows.append(row)
        train = mode.startswith("train")
        torch_model.train(train)
        ours.train(train)
        x = _inputs(case, batch, size)
        try:
            # Compared in eval mode, so that BatchNorm's running statistics stay as they are.
            torch_model.eval()
            ours.eval()
            with torch.no_grad():
                err = relative_error(ours(x), torch_model(x))
            torch_model.train(train)
            ours.train(train)
        except Exception as e:  # noqa: BLE001 - reported in the table, the suite goes on
            row.update(ok=False, failure=f"{type(e).__name__}: {e}")
            continue
        if check_failure is not None:
            row.update(ok=False, failure=f"train-mode check: {check_failure}")
            continue
        err = max(err, train_error)
        row.update(error=err, ok=err <= MODEL_TOLERANCE)
        if not row["ok"]:
            row["failure"] = f"output error {err:.1e} exceeds {MODEL_TOLERANCE:.0e}"
            continue
        key = None
        if baseline is not None:
            try:
                key = baseline.load_model(torch_model, x, workdir / f"{case.name}-{mode}.pt2")
                baseline.time_model(key, mode, 1)  # warm-up
            except Exception as e:  # noqa: BLE001 - e.g. a model torch.export cannot trace
                row["baseline_note"] = f"worker: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                key = None
        start = time.perf_counter()
        _step(ours, x, mode)
        row["first_call_ms"] = (time.perf_counter() - start) * 1e3  # compiles, starts tuning
        # The CPU autotuner measures on real calls: step until every layer's choice is made (bounded), so
        # the timed rounds see the tuned model, and report what getting there cost.
        start, steps = time.perf_counter(), 0
        while steps < TUNING_STEPS_MAX:
            before = autotune.tuning_calls()
            _step(ours, x, mode)
            if autotune.tuning_calls() == before:
                break  # this step ran only final choices (the step is timed again below anyway)
            steps += 1
        row.update(tuning_steps=steps, tuning_ms=(time.perf_counter() - start) * 1e3,
                   still_tuning=steps >= TUNING_STEPS_MAX)
        if not train:
            if optimized is None:
                try:
                    optimized = optimize(ours)
                except Exception as e:  # noqa: BLE001 - e.g. a model torch.fx cannot trace
                    optimized = False
                    optimized_note = f"optimize: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            if optimized is False:
                row["optimized_note"] = optimized_note
            else:
                with torch.no_grad():
                    row["optimized_error"] = relative_error(optimized(x), torch_model(x))
                _step(optimized, x, mode)
        opt = optimized if not train and optimized and row["optimized_error"] <= MODEL_TOLERANCE else None
        opt_ms: list[float] = []
        _step(torch_model, x, mode)
        if alternate:
            ours_ms, here_ms, clean_ms = _time_alternating(ours, torch_model, x, mode, reps, baseline, key)
        else:
            ours_ms, here_ms, clean_ms = [], [], []
            for _ in range(reps):  # interleaved rounds: a burst of load hits all three alike
                # each side after the others' pools have slept: timed right after the worker's step, a converted
                # mobilenet_v2 at batch 1 ran 18 ms instead of 14 (the worker's OpenMP threads still spinning)
                ours_ms += _timed_round(ours, x, mode)
                if opt is not None:
                    opt_ms += _timed_round(opt, x, mode)
                here_ms += _timed_round(torch_model, x, mode)
                if key is not None:
                    clean_ms += baseline.time_model(key, mode, STEPS_PER_ROUND, warm=1)
        if alternate:
            torch_ms, torch_times, where = statistics.median(here_ms), here_ms, "this process, alternating"
        elif clean_ms:
            torch_ms, torch_times, where = statistics.median(clean_ms), clean_ms, "separate process"
        else:
            torch_ms, torch_times, where = statistics.median(here_ms), here_ms, "this process"
        row.update(fastconv_ms=statistics.median(ours_ms), fastconv_times_ms=ours_ms,
                   torch_ms=torch_ms, torch_times_ms=torch_times, torch_baseline=where,
                   torch_inprocess_ms=statistics.median(here_ms), reps=reps,
                   ratio=statistics.median(ours_ms) / torch_ms)
        if opt_ms:
            row.update(optimized_ms=statistics.median(opt_ms), optimized_times_ms=opt_ms,
                       optimized_ratio=statistics.median(opt_ms) / torch_ms)
        if alternate:
            alt = {"fastconv_ms": row["fastconv_ms"], "torch_here_ms": row["torch_inprocess_ms"],
                   "ratio": row["ratio"]}
            if clean_ms:
                clean = statistics.median(clean_ms)
                alt.update(torch_clean_ms=clean, torch_clean_times_ms=clean_ms,
                           torch_here_vs_clean=row["torch_inprocess_ms"] / clean,
                           fastconv_vs_clean=row["fastconv_ms"] / clean)
            row["alternate"] = alt
        if neighbour is not None:
            row["busy_neighbour"] = _time_busy(ours, torch_model, x, mode, reps, neighbour, baseline, key)
        if mode == modes[0]:
            ours.eval()
            row["breakdown"] = breakdown(ours, x)
    return rows


def run_models(cases: Sequence[ModelCase], modes: Sequence[str] = MODES, reps: int = 5,
               size: Optional[int] = None, baseline: str = "process", progress: bool = True,
               on_model: Optional[Callable[[ModelCase, list], None]] = None,
               busy_neighbour: bool = False) -> dict:
    """Run the model suite; returns ``{"environment", "rows", "summary"}`` (JSON-ready).

    ``baseline``: ``"process"`` (torch in a clean worker), ``"inprocess"`` (torch here) or
    ``"alternate"`` (torch here, stepped in turn with fastconv; the clean worker too, for comparison).
    ``busy_neighbour``: also time every model and mode with a :class:`BusyNeighbour` on and off.
    """
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    settle_heap()  # as the worker does at its setup
    load_before = _load()
    rows: list[dict] = []
    neighbour_info = None
    with tempfile.TemporaryDirectory(prefix="fastconv-models-") as tmp:
        worker = TorchBaseline(torch.get_num_threads()) if baseline in ("process", "alternate") else None
        neighbour = None
        try:
            if busy_neighbour:
                neighbour = BusyNeighbour()
            for case in cases:
                case_rows = run_model(case, modes, reps, size, worker, Path(tmp), alternate=baseline == "alternate",
                                      neighbour=neighbour)
                rows += case_rows
                if on_model is not None:
                    on_model(case, case_rows)
            clean = worker.is_clean() if worker is not None else None
        finally:
            if neighbour is not None:
                neighbour_info = {"pid": neighbour.pid, "cpu": neighbour.cpu, "core_share": neighbour.core_share(),
                                  "what": "one-thread torch matmul loop (256^3), pinned to one core of this "
                                          "process's affinity set, stopped (SIGSTOP) between busy phases"}
                neighbour.close()
            if worker is not None:
                worker.close()
    summary = summarize_models(rows, modes)
    where = ("a separate process that imported neither fastconv nor Numba (checked)" if clean
             else "this process" if clean is None else "a separate process (NOT clean)")
    if baseline == "alternate":
        where = (f"this process, stepped in turn with fastconv (and, for torch here / clean, {where})"
                 if clean is not None else "this process, stepped in turn with fastconv")
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "load_average_before": load_before, "load_average": _load(), "input_size": size,
           "baseline": baseline, "torch_baseline": where}
    if neighbour_info is not None:
        env["busy_neighbour"] = neighbour_info
    return {"environment": env, "rows": rows, "summary": summary}


#: Where torch is timed (``fastconv bench --models --baseline``).
BASELINES = ("process", "inprocess", "alternate")


def summarize_models(rows: list[dict], modes: Sequence[str]) -> dict:
    """Per mode: geomean and worst fastconv/torch ratio; with the alternate baseline also the geomean of
    torch here / torch clean; with a busy neighbour the geomean slowdown of each side and how many
    models fastconv slowed no more than torch."""
    from .bench_report import geomean

    def worst_of(timed, key):
        w = max(timed, key=lambda r: key(r))
        return {"model": w["model"], "ratio": key(w)}

    summary = {"geomean_ratio": {mode: geomean(r.get("ratio") for r in rows if r["mode"] == mode)
                                 for mode in modes}, "worst": {}}
    for mode in modes:
        timed = [r for r in rows if r["mode"] == mode and r.get("ratio")]
        if timed:
            summary["worst"][mode] = worst_of(timed, lambda r: r["ratio"])
    optimized = {mode: geomean(r.get("optimized_ratio") for r in rows if r["mode"] == mode)
                 for mode in modes if any(r.get("optimized_ratio") for r in rows if r["mode"] == mode)}
    if optimized:
        summary["optimized_geomean_ratio"] = optimized
    alt = [r for r in rows if r.get("alternate")]
    if alt:
        summary["alternate"] = {}
        for mode in modes:
            here = [r for r in alt if r["mode"] == mode]
            if here:
                clean = [r for r in here if r["alternate"].get("torch_here_vs_clean")]
                summary["alternate"][mode] = {
                    "geomean_ratio": geomean(r["ratio"] for r in here),
                    "worst": worst_of(here, lambda r: r["ratio"]),
                    "torch_here_vs_clean_geomean": geomean(r["alternate"].get("torch_here_vs_clean") for r in here),
                    "torch_here_vs_clean_worst": worst_of(clean, lambda r: r["alternate"]["torch_here_vs_clean"])
                    if clean else None}
    busy = [r for r in rows if r.get("busy_neighbour")]
    if busy:
        summary["busy_neighbour"] = {}
        for mode in modes:
            here = [r for r in busy if r["mode"] == mode]
            if here:
                summary["busy_neighbour"][mode] = {
                    "fastconv_slowdown_geomean": geomean(r["busy_neighbour"]["fastconv_slowdown"] for r in here),
                    "torch_slowdown_geomean": geomean(r["busy_neighbour"]["torch_slowdown"] for r in here),
                    "fastconv_no_worse": sum(r["busy_neighbour"]["fastconv_no_worse"] for r in here),
                    "models": len(here),
                    "worst": worst_of(here, lambda r: r["busy_neighbour"]["fastconv_slowdown"]
                                      / r["busy_neighbour"]["torch_slowdown"])}
    summary["failures"] = [f"{r['model']}/{r['mode']}: {r['failure']}" for r in rows if r.get("failure")]
    return summary


def format_model(case: ModelCase, rows: list[dict]) -> str:
    alternate = any(r.get("alternate") for r in rows)
    if alternate:  # both torch columns: here (stepped in turn with fastconv, the ratio's) and clean
        head = (f"  {'mode':<8}{'fastconv ms':>12}{'torch here':>11}{'ratio':>7}{'torch clean':>12}"
                f"{'here/clean':>11}{'error':>9}")
    else:
        head = f"  {'mode':<8}{'fastconv ms':>12}{'torch ms':>10}{'ratio':>7}{'torch here':>11}{'error':>9}"
    lines = [f"{case.name} ({case.source})" + ("  [alternating in one process]" if alternate else ""), head]
    for r in rows:
        if r.get("failure"):
            lines.append(f"  {r['mode']:<8}  FAILED: {r['failure']}")
            continue
        a = r.get("alternate")
        if a:
            lines.append(f"  {r['mode']:<8}{r['fastconv_ms']:12.1f}{a['torch_here_ms']:11.1f}{a['ratio']:7.2f}"
                         + (f"{a['torch_clean_ms']:12.1f}{a['torch_here_vs_clean']:11.2f}" if "torch_clean_ms" in a
                            else f"{'-':>12}{'-':>11}") + f"{r['error']:9.1e}")
        else:
            lines.append(f"  {r['mode']:<8}{r['fastconv_ms']:12.1f}{r['torch_ms']:10.1f}{r['ratio']:7.2f}"
                         f"{r['torch_inprocess_ms']:11.1f}{r['error']:9.1e}")
        if r.get("optimized_ms"):
            lines.append(f"  {'':<8}fastconv.optimize (BatchNorm folded, ReLU fused): {r['optimized_ms']:.1f} ms, "
                         f"ratio {r['optimized_ratio']:.2f}, error {r['optimized_error']:.1e}")
        elif r.get("optimized_note") or r.get("optimized_error") is not None:
            lines.append(f"  {'':<8}fastconv.optimize: " + (r.get("optimized_note") or
                                                             f"not timed (error {r['optimized_error']:.1e})"))
        n = r.get("busy_neighbour")
        if n:
            lines.append(f"  {'':<8}busy neighbour: fastconv {n['fastconv_quiet_ms']:.1f} -> {n['fastconv_busy_ms']:.1f} "
                         f"ms (x{n['fastconv_slowdown']:.2f}), torch ({n['torch_timed_in']}) "
                         f"{n['torch_quiet_ms']:.1f} -> {n['torch_busy_ms']:.1f} ms (x{n['torch_slowdown']:.2f}); "
                         f"fastconv slowed {'no more' if n['fastconv_no_worse'] else 'MORE'} than torch")
        if "tuning_steps" in r:
            lines.append(f"  {'':<8}first step {r['first_call_ms']:.0f} ms; tuning on real calls took "
                         f"{r['tuning_steps']} more steps ({r['tuning_ms']:.0f} ms)"
                         + (" (stopped: still tuning)" if r.get("still_tuning") else ""))
        b = r.get("breakdown")
        if b:
            lines.append(f"  {'':<8}one forward: {b['total_ms']:.1f} ms = fastconv ops {b['fastconv_ops_ms']:.1f} "
                         f"({b['fastconv_calls']} calls) + torch ops {b['torch_ops_ms']:.1f} + rest "
                         f"{b['rest_ms']:.1f}")
        if r.get("baseline_note"):
            lines.append(f"  {'':<8}{r['baseline_note']}")
    return "\n".join(lines)


def format_models_summary(result: dict) -> str:
    env = result["environment"]
    s = result["summary"]
    lines = [f"whole models: torch timed in {env['torch_baseline']}; threads {env['threads']}; load average "
             f"before/after {env['load_average_before']} / {env['load_average']}"]
    n = env.get("busy_neighbour")
    if n:
        share = f", got {n['core_share']:.2f} of a core while on" if n.get("core_share") is not None else ""
        lines.append(f"busy neighbour: {n['what']} (cpu {n['cpu']}{share})")
    label = "fastconv/torch here (alternating)" if env.get("baseline") == "alternate" else "fastconv/torch"
    for mode, g in s["geomean_ratio"].items():
        worst = s["worst"].get(mode)
        lines.append(f"{label} {mode:<7} geomean {g:.2f}" if g else f"{label} {mode:<7} -")
        if worst:
            lines[-1] += f"   worst: {worst['model']} {worst['ratio']:.2f}"
    for mode, g in s.get("optimized_geomean_ratio", {}).items():
        lines.append(f"fastconv.optimize/torch {mode:<7} geomean {_fmt(g)}")
    for mode, a in s.get("alternate", {}).items():
        g, w = a["torch_here_vs_clean_geomean"], a["torch_here_vs_clean_worst"]
        lines.append(f"torch here (alternating) / torch clean {mode:<7} geomean {_fmt(g)}"
                     + (f"   worst: {w['model']} {w['ratio']:.2f}" if w else ""))
    for mode, b in s.get("busy_neighbour", {}).items():
        w = b["worst"]
        lines.append(f"busy neighbour slowdown {mode:<7} fastconv geomean {_fmt(b['fastconv_slowdown_geomean'])}, "
                     f"torch {_fmt(b['torch_slowdown_geomean'])}; fastconv no worse than torch in "
                     f"{b['fastconv_no_worse']}/{b['models']}   worst (fastconv/torch slowdown): "
                     f"{w['model']} {w['ratio']:.2f}")
    for f in s["failures"]:
        lines.append(f"FAILED {f}")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def plot_models(result: dict, path: Path) -> Path:
    """Bar chart: fastconv/torch time per model, one bar per mode (log scale)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .bench_report import ratio_bars

    rows = [r for r in result["rows"] if r.get("ratio")]
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    modes = list(dict.fromkeys(r["mode"] for r in result["rows"]))
    fig = Figure(figsize=(max(6.0, 0.8 * len(models) + 2), 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ratios = {(r["model"], r["mode"]): r["ratio"] for r in rows}
    ratio_bars(ax, models, modes, ratios, "fastconv time / torch time")
    ax.legend(fontsize=8)
    ax.set_title("whole models (below 1: fastconv faster)", fontsize=10)
    fig.savefig(path, dpi=110)
    return path
