"""The report of ``fastconv bench``: summary statistics, terminal tables, and the JSON, text and PNG files.

Reads the rows :mod:`fastconv.bench_runner` produced; knows nothing about how they were measured.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Optional

PASSES = ("forward", "grad_input", "grad_weight")


def geomean(values) -> Optional[float]:
    """Geometric mean of the positive finite values, None when there are none."""
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return statistics.geometric_mean(values) if values else None


def summarize(rows: list[dict]) -> dict:
    """Geometric means of the auto/torch ratio (forward; forward+backward by summed time), worst layer."""
    def ms(layer, pass_, algo):
        return next((r.get("ms") for r in rows if r["layer"] == layer and r["pass"] == pass_
                     and r["algo"] == algo), None)

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    passes = list(dict.fromkeys(r["pass"] for r in rows))
    per_pass = {}
    worst = {}
    for p in passes:
        ratios = {l: (ms(l, p, "auto") / ms(l, p, "torch")) if ms(l, p, "auto") and ms(l, p, "torch") else None
                  for l in layers}
        per_pass[p] = geomean(ratios.values())
        known = {l: r for l, r in ratios.items() if r is not None}
        if known:
            name = max(known, key=known.get)
            worst[p] = {"layer": name, "ratio": known[name]}
    total = {}
    if set(PASSES) <= set(passes):
        for l in layers:
            a = [ms(l, p, "auto") for p in PASSES]
            t = [ms(l, p, "torch") for p in PASSES]
            if all(a) and all(t):
                total[l] = sum(a) / sum(t)
    failures = [f"{r['layer']}/{r['pass']}/{r['algo']}: {r['failure']}" for r in rows if r.get("failure")]
    return {"auto_vs_torch_geomean": per_pass, "worst_layer": worst,
            "fwd_bwd_auto_vs_torch_geomean": geomean(total.values()) if total else None,
            "fwd_bwd_auto_vs_torch": total, "failures": failures}


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------
def _fmt(v, spec, missing="-"):
    return missing if v is None else format(v, spec)


def format_case(layer, pass_: str, rows: list[dict], gemm_label: str = "%SGEMM") -> str:
    """The terminal table of one layer and pass."""
    head = (f"{layer.name} [{layer.arch}] {pass_}: {layer.describe()}  "
            f"({layer.macs / 1e6:.1f} M MACs)")
    lines = [head, f"  {'algo':<18}{'ms':>10}{'spread':>8}{'GFLOP/s':>10}{gemm_label:>8}{'vs torch':>10}"
                   f"{'max err':>10}"]
    for r in rows:
        name = r["algo"] + (f"->{r['auto_choice']}" if r.get("auto_choice") else "")
        if r.get("failure"):
            lines.append(f"  {name:<18}  FAILED: {r['failure']}")
            continue
        spread = (r["q3_ms"] - r["q1_ms"]) / r["ms"] * 100 if r.get("ms") and r.get("q1_ms") is not None else None
        lines.append(f"  {name:<18}{_fmt(r.get('ms'), '10.2f')}{_fmt(spread, '7.0f')}%{_fmt(r.get('gflops'), '10.1f')}"
                     f"{_fmt(r.get('pct_gemm'), '7.0f')}%{_fmt(r.get('ratio'), '10.2f')}"
                     f"{_fmt(r.get('error'), '10.1e')}")
        if r["algo"] == "torch" and r.get("inprocess_ms") is not None:
            flag = "  <- slowed by fastconv's thread pools" if r.get("contaminated") else ""
            lines.append(f"  {'(torch, this proc.)':<18}{r['inprocess_ms']:10.2f}{'':>8}{'':>10}{'':>8}"
                         f"{r['inprocess_ms'] / r['ms']:10.2f}{flag}")
    return "\n".join(lines)


def format_summary(result: dict) -> str:
    s = result["summary"]
    env = result["environment"]
    lines = [f"GEMM rate ({env['gemm_dtype']}, 2048^3 torch.mm): {env['gemm_gflops']:.0f} GFLOP/s; "
             f"threads: torch {env['torch_threads']}, numba {env['numba_threads']}; "
             f"load average before/after: {env.get('load_average_before')} / {env.get('load_average')}",
             f"torch baseline timed in {env.get('torch_baseline', 'this process')}"]
    contaminated = [r["layer"] + "/" + r["pass"] for r in result["rows"] if r.get("contaminated")]
    if contaminated:
        lines.append(f"torch ran > 1.5x slower in this process than in the clean worker for "
                     f"{len(contaminated)} case(s): {', '.join(contaminated)}")
    for p, g in s["auto_vs_torch_geomean"].items():
        worst = s["worst_layer"].get(p)
        lines.append(f"auto/torch {p:<11} geomean {_fmt(g, '.2f')}"
                     + (f"   worst: {worst['layer']} {worst['ratio']:.2f}" if worst else ""))
    if s.get("fwd_bwd_auto_vs_torch_geomean") is not None:
        lines.append(f"auto/torch forward+backward (time summed per layer) geomean "
                     f"{s['fwd_bwd_auto_vs_torch_geomean']:.2f}")
    fc = result.get("first_call")
    if fc and "failure" not in fc:
        lines.append(f"first call (fresh process, Numba cache as is): import fastconv {fc['import_fastconv_s']:.2f} s"
                     f" + first conv2d {fc['first_conv2d_s']:.2f} s (import torch {fc['import_torch_s']:.2f} s)")
    elif fc:
        lines.append(f"first call: FAILED ({fc['failure']})")
    lines.append("ratio = fastconv time / torch time (below 1: faster than torch)")
    if s["failures"]:
        lines.append(f"{len(s['failures'])} check(s) FAILED:")
        lines += [f"  {f}" for f in s["failures"]]
    return "\n".join(lines)


def ratio_bars(ax, categories: list, series: list, ratios: dict, ylabel: str) -> None:
    """Grouped bars of ``ratios[(category, series)]`` on a log axis with the line at 1 (parity with torch)."""
    width = 0.8 / max(1, len(series))
    for i, name in enumerate(series):
        xs, ys = [], []
        for j, category in enumerate(categories):
            if (category, name) in ratios:
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                ys.append(ratios[(category, name)])
        ax.bar(xs, ys, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, rotation=30, ha="right", fontsize=8)


def plot(result: dict, path: Path) -> Path:
    """Bar chart of the ratio to torch, one panel per pass, bars per algorithm across layers (log scale)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend switch in the caller's process

    rows = [r for r in result["rows"] if r["algo"] != "torch" and r.get("ratio")]
    passes = list(dict.fromkeys(r["pass"] for r in result["rows"]))
    layers = list(dict.fromkeys(r["layer"] for r in result["rows"]))
    algos = list(dict.fromkeys(r["algo"] for r in rows))
    fig = Figure(figsize=(max(6.0, 0.9 * len(layers) + 2), 3.2 * max(1, len(passes))), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(passes)), 1, squeeze=False)[:, 0]
    for ax, p in zip(axes, passes):
        ratios = {(r["layer"], r["algo"]): r["ratio"] for r in rows if r["pass"] == p}
        ratio_bars(ax, layers, algos, ratios, "time / torch")
        ax.set_title(f"{p} (below 1: faster than torch)", fontsize=10)
    if algos:
        axes[0].legend(fontsize=8, ncols=min(len(algos), 6))
    fig.suptitle(f"fastconv vs torch, {result['environment']['gemm_dtype']}, "
                 f"{result['environment']['torch_threads']} threads")
    fig.savefig(path, dpi=110)
    return path



def default_out_dir() -> Path:
    """``bench/results`` of the source checkout when run inside it, else ``./fastconv-bench-results``."""
    repo = Path(__file__).resolve().parent.parent
    cwd = Path.cwd().resolve()
    if (repo / "bench").is_dir() and (repo / "pyproject.toml").is_file() and (cwd == repo or repo in cwd.parents):
        return repo / "bench" / "results"
    return cwd / "fastconv-bench-results"


def _json_clean(v):
    """JSON has no inf/nan: write them as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_clean(x) for x in v]
    return v


def _keep_previous(out: Path, stem: str) -> list[Path]:
    """Rename an earlier run's ``<stem>.*`` files to ``<stem>-<their time>.*`` instead of overwriting them."""
    kept = []
    old = [p for p in (out / f"{stem}{ext}" for ext in (".json", ".txt", ".png")) if p.exists()]
    if not old:
        return kept
    when = time.strftime("%Y%m%d-%H%M%S", time.localtime(max(p.stat().st_mtime for p in old)))
    for p in old:
        target = p.with_name(f"{stem}-{when}{p.suffix}")
        p.replace(target)
        kept.append(target)
    return kept


def write_results(result: dict, out: Path, stem: str = "fastconv-bench", text: str = "") -> dict:
    """The layer suite's files: ``text`` (the terminal tables) and the summary go to ``<stem>.txt``."""
    text = text + ("\n" if text and not text.endswith("\n") else "") + format_summary(result)
    return write_files(result, out, stem, text, plot)


def write_files(result: dict, out: Path, stem: str, text: str, plotter) -> dict:
    """Write ``<stem>.json``, ``<stem>.txt`` and ``<stem>.png`` (by ``plotter(result, path)``) into ``out``.

    An earlier run's files are renamed with their time, never overwritten. Without matplotlib the PNG
    is skipped and ``"png"`` says how to get it. Returns ``{"json", "txt", "png", "kept"}``.
    """
    out.mkdir(parents=True, exist_ok=True)
    kept = _keep_previous(out, stem)
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(_json_clean(result), indent=1), encoding="utf-8")
    txt_path = out / f"{stem}.txt"
    txt_path.write_text(text + "\n", encoding="utf-8")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        png = "skipped: matplotlib is not installed (pip install matplotlib, or fastconv[bench])"
    else:
        png = plotter(result, out / f"{stem}.png")
    return {"json": json_path, "txt": txt_path, "png": png, "kept": kept}
