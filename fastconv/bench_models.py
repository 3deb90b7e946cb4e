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
4. splits one converted forward (torch's profiler) into fastconv's ops, torch's other ops, and the
   rest (Python, dispatch, overhead).
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from . import autotune, convert
from .bench_runner import TorchBaseline, _load
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
    start = time.perf_counter()
    _step(model, x, mode)
    return (time.perf_counter() - start) * 1e3


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


#: Most extra warm-up steps spent letting the autotuner finish (each key needs a few calls per candidate).
TUNING_STEPS_MAX = 40


def run_model(case: ModelCase, modes: Sequence[str], reps: int, size: Optional[int],
              baseline: Optional[TorchBaseline], workdir: Path) -> list[dict]:
    """Check, then time one model in each mode; one row per mode."""
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
        _step(torch_model, x, mode)
        ours_ms, here_ms, clean_ms = [], [], []
        for _ in range(reps):  # interleaved rounds: a burst of load hits all three alike
            ours_ms.append(_timed(ours, x, mode))
            here_ms.append(_timed(torch_model, x, mode))
            if key is not None:
                clean_ms += baseline.time_model(key, mode, 1)
        torch_ms = statistics.median(clean_ms) if clean_ms else statistics.median(here_ms)
        row.update(fastconv_ms=statistics.median(ours_ms), fastconv_times_ms=ours_ms,
                   torch_ms=torch_ms, torch_times_ms=clean_ms or here_ms,
                   torch_baseline="separate process" if clean_ms else "this process",
                   torch_inprocess_ms=statistics.median(here_ms), reps=reps,
                   ratio=statistics.median(ours_ms) / torch_ms)
        if mode == modes[0]:
            ours.eval()
            row["breakdown"] = breakdown(ours, x)
    return rows


def run_models(cases: Sequence[ModelCase], modes: Sequence[str] = MODES, reps: int = 5,
               size: Optional[int] = None, baseline: str = "process", progress: bool = True,
               on_model: Optional[Callable[[ModelCase, list], None]] = None) -> dict:
    """Run the model suite; returns ``{"environment", "rows", "summary"}`` (JSON-ready)."""
    from .bench_report import geomean

    load_before = _load()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fastconv-models-") as tmp:
        worker = TorchBaseline(torch.get_num_threads()) if baseline == "process" else None
        try:
            for case in cases:
                case_rows = run_model(case, modes, reps, size, worker, Path(tmp))
                rows += case_rows
                if on_model is not None:
                    on_model(case, case_rows)
            clean = worker.is_clean() if worker is not None else None
        finally:
            if worker is not None:
                worker.close()
    summary = {mode: geomean(r.get("ratio") for r in rows if r["mode"] == mode) for mode in modes}
    worst = {}
    for mode in modes:
        timed = [r for r in rows if r["mode"] == mode and r.get("ratio")]
        if timed:
            w = max(timed, key=lambda r: r["ratio"])
            worst[mode] = {"model": w["model"], "ratio": w["ratio"]}
    return {"environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                            "load_average_before": load_before, "load_average": _load(),
                            "input_size": size,
                            "torch_baseline": ("a separate process that imported neither fastconv nor Numba "
                                               "(checked)" if clean else "this process" if clean is None
                                               else "a separate process (NOT clean)")},
            "rows": rows, "summary": {"geomean_ratio": summary, "worst": worst,
                                      "failures": [f"{r['model']}/{r['mode']}: {r['failure']}"
                                                   for r in rows if r.get("failure")]}}


def format_model(case: ModelCase, rows: list[dict]) -> str:
    lines = [f"{case.name} ({case.source})",
             f"  {'mode':<8}{'fastconv ms':>12}{'torch ms':>10}{'ratio':>7}{'torch here':>11}{'error':>9}"]
    for r in rows:
        if r.get("failure"):
            lines.append(f"  {r['mode']:<8}  FAILED: {r['failure']}")
            continue
        lines.append(f"  {r['mode']:<8}{r['fastconv_ms']:12.1f}{r['torch_ms']:10.1f}{r['ratio']:7.2f}"
                     f"{r['torch_inprocess_ms']:11.1f}{r['error']:9.1e}")
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
    lines = [f"whole models: torch timed in {env['torch_baseline']}; threads {env['threads']}; load average "
             f"before/after {env['load_average_before']} / {env['load_average']}"]
    for mode, g in result["summary"]["geomean_ratio"].items():
        worst = result["summary"]["worst"].get(mode)
        lines.append(f"fastconv/torch {mode:<7} geomean {g:.2f}" if g else f"fastconv/torch {mode:<7} -")
        if worst:
            lines[-1] += f"   worst: {worst['model']} {worst['ratio']:.2f}"
    for f in result["summary"]["failures"]:
        lines.append(f"FAILED {f}")
    return "\n".join(lines)


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
