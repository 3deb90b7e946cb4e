"""Claim vs clock: time each conv and pooling layer of a model with fastconv (``algo="auto"``) and with torch,
and place it on this machine's roofline.

:func:`measure` runs the model once on real (random) data to capture each layer's input, then per layer:

* the nominal MACs (or pool ops), the algorithm ``auto`` chose and why (:func:`fastconv.flops.decide`, as
  recorded in the count), the multiplications it executes and its workspace (:mod:`fastconv.flops.executed`);
* the median time of the fastconv layer and of torch's own op on the same shapes, the torch one in a child
  process that never imports Numba or fastconv (DESIGN.md §9: torch is slower and bimodal in a process where
  Numba's and OpenBLAS's thread pools exist); if the child cannot run, in this process, and the result says so;
* achieved GFLOP/s (2 x MACs / time; pool ops / time for pools), arithmetic intensity (FLOPs per byte of the
  minimal traffic: input + weights + output, read or written once) and whether the layer is memory- or
  compute-bound: below the ridge point ``peak / bandwidth`` it is memory-bound. ``peak`` is the SGEMM rate
  (float32 ``torch.mm`` 1024^3) and ``bandwidth`` a large copy's, both measured in the same run (quick, a
  few repetitions: indicative, not a benchmark).

:func:`plot_roofline` writes the PNG (matplotlib; without it, :func:`measure` says how to get it).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

__all__ = ["measure", "roofline_machine", "plot_roofline", "LayerTiming", "Machine"]


@dataclass
class Machine:
    sgemm_gflops: float      #: float32 GEMM rate measured now (GFLOP/s)
    bandwidth_gbs: float     #: copy bandwidth measured now (GB/s, read + write)
    threads: int

    @property
    def ridge(self) -> float:
        """Arithmetic intensity (FLOP/byte) where the roofline turns from memory- to compute-bound."""
        return self.sgemm_gflops / self.bandwidth_gbs


@dataclass
class LayerTiming:
    layer: str
    op: str
    output_shape: tuple
    macs: int                 #: nominal MACs (0 for pools)
    pool_ops: int
    algorithm: str
    reason: str
    executed: int             #: multiplications the algorithm executes
    workspace_bytes: int
    seconds: float
    torch_seconds: Optional[float]
    bytes: int                #: minimal traffic: input + weights + output
    gflops: float = 0.0
    intensity: float = 0.0
    bound: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def roofline_machine(repeats: int = 5) -> Machine:
    """The SGEMM rate and copy bandwidth of this machine, measured now (a second or so)."""
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = _median_time(lambda: torch.mm(a, b), repeats)
    src = torch.empty(16 << 20)  # 64 MB of float32: well past the caches
    dst = torch.empty_like(src)
    src.fill_(1.0)
    tc = _median_time(lambda: dst.copy_(src), repeats)
    return Machine(2 * n ** 3 / t / 1e9, 2 * src.numel() * 4 / tc / 1e9, torch.get_num_threads())


# the torch baseline, timed in a process that never imports Numba or fastconv
_CHILD = r"""
import json, statistics, sys, time
import torch
import torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
specs = json.load(sys.stdin)
out = []
for warm in (True, False):  # one untimed pass over every layer first: thread pools and allocator warm up
 for s in specs:
    x = torch.randn(s["input"])
    w = torch.randn(s["weight"]) if s.get("weight") else None
    b = torch.randn(s["bias"]) if s.get("bias") else None
    fn = getattr(F, s["fn"])
    args = [x] + ([w, b] if w is not None else [])
    call = lambda: fn(*args, **s["kwargs"])
    with torch.no_grad():
        call()
        if warm:
            continue
        times = []
        for _ in range(s["repeats"]):
            t0 = time.perf_counter(); call(); times.append(time.perf_counter() - t0)
    out.append(statistics.median(times))
print(json.dumps(out))
"""

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
          nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def _torch_spec(m: nn.Module, x: torch.Tensor, repeats: int) -> Optional[dict]:
    """The torch.nn.functional call equivalent to layer ``m`` (fastconv modules derive from torch's)."""
    if isinstance(m, _CONVS):
        if getattr(m, "padding_mode", "zeros") != "zeros":
            return None
        nd = len(m.kernel_size)
        kw = dict(stride=list(m.stride), dilation=list(m.dilation), groups=m.groups)
        if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            fn = f"conv_transpose{nd}d"
            kw.update(padding=list(m.padding), output_padding=list(m.output_padding))
        else:
            fn = f"conv{nd}d"
            kw["padding"] = m.padding if isinstance(m.padding, str) else list(m.padding)
        return dict(fn=fn, input=list(x.shape), weight=list(m.weight.shape),
                    bias=list(m.bias.shape) if m.bias is not None else None, kwargs=kw, repeats=repeats)
    if isinstance(m, _POOLS):
        name = type(m).__mro__[0].__name__
        for base in type(m).__mro__:
            if base.__module__.startswith("torch.nn") and base in _POOLS:
                name = base.__name__
                break
        nd = int(name[-2])
        if name.startswith("Adaptive"):
            fn = ("adaptive_avg_pool" if "Avg" in name else "adaptive_max_pool") + f"{nd}d"
            kw = dict(output_size=m.output_size)
        else:
            fn = ("avg_pool" if "Avg" in name else "max_pool") + f"{nd}d"
            kw = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, ceil_mode=m.ceil_mode)
            if "Max" in name:
                kw["dilation"] = m.dilation
            else:
                kw["count_include_pad"] = m.count_include_pad
        return dict(fn=fn, input=list(x.shape), weight=None, bias=None, kwargs=kw, repeats=repeats)
    return None


def _torch_times(specs: list, threads: int) -> tuple[list, str]:
    """Median seconds of each spec in a clean child process; falls back to this process."""
    try:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(threads)], input=json.dumps(specs),
                              capture_output=True, text=True, timeout=600, env=env)
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1]), "torch timed in a clean child process"
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    except (OSError, subprocess.TimeoutExpired, ValueError) as e:
        why = str(e)
    import torch.nn.functional as F

    out = []
    for s in specs:
        x = torch.randn(s["input"])
        args = [x] + ([torch.randn(s["weight"]), torch.randn(s["bias"]) if s["bias"] else None]
                      if s["weight"] else [])
        fn = getattr(F, s["fn"])
        with torch.no_grad():
            out.append(_median_time(lambda: fn(*args, **s["kwargs"]), s["repeats"]))
    return out, f"torch timed in this process (child failed: {why}); may read slow, see DESIGN.md §9"


def measure(model: nn.Module, x: torch.Tensor, repeats: int = 5, machine: Optional[Machine] = None):
    """``(layers, machine, note)``: a :class:`LayerTiming` per conv and pooling layer of ``model`` (real
    tensors on the CPU), the measured :class:`Machine` and how torch was timed."""
    from .counting import count

    if x.device.type == "meta" or any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError("measure: the model and input must hold real CPU tensors, not meta ones")
    model.eval()
    inputs: dict = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, _CONVS + _POOLS) or type(m).__name__ == "DepthwiseSeparableConv2d":
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: inputs.setdefault(name, args[0].detach())))
    try:
        with torch.no_grad():
            model(x)  # compiles kernels and runs the autotuner where auto measures: before the count
            report = count(model, x)
    finally:
        for h in hooks:
            h.remove()
    machine = machine or roofline_machine()
    modules = dict(model.named_modules())
    layers, specs = [], []
    for name, xi in inputs.items():
        node = report.module(name)
        rows = [r for r in node.ops if r.pass_ == "forward"]
        if not rows:
            continue
        r = rows[0]
        m = modules[name]
        with torch.no_grad():
            seconds = _median_time(lambda: m(xi), repeats)
            y = m(xi)
        weights = sum(p.numel() * p.element_size() for p in m.parameters())
        nbytes = xi.numel() * xi.element_size() + weights + y.numel() * y.element_size()
        layers.append(LayerTiming(name, r.op, tuple(y.shape), r.macs, r.pool_ops, r.algorithm, r.reason,
                                  r.algorithm_mults, r.workspace_bytes, seconds, None, nbytes))
        spec = _torch_spec(m, xi, repeats)
        specs.append(spec)
    valid = [s for s in specs if s is not None]
    times, note = _torch_times(valid, machine.threads) if valid else ([], "")
    it = iter(times)
    for layer, spec in zip(layers, specs):
        layer.torch_seconds = next(it) if spec is not None else None
        work = 2 * layer.macs if layer.macs else layer.pool_ops
        layer.gflops = work / layer.seconds / 1e9 if layer.seconds else 0.0
        layer.intensity = work / layer.bytes if layer.bytes else 0.0
        layer.bound = "memory" if layer.intensity < machine.ridge else "compute"
    return layers, machine, note


def format_measure(layers: list, machine: Machine, note: str, width: int = 100) -> str:
    """The claim-vs-clock table (<= ``width`` columns) and, below it, each layer's algorithm and why."""
    from .report import human

    head = ["layer", "MACs", "executed", "algorithm", "ms", "torch ms", "GFLOP/s", "FLOP/B", "bound"]
    body = []
    for t in layers:
        body.append([t.layer, human(t.macs or t.pool_ops), human(t.executed) if t.macs else "-", t.algorithm,
                     f"{1e3 * t.seconds:.3f}", f"{1e3 * t.torch_seconds:.3f}" if t.torch_seconds else "-",
                     f"{t.gflops:.1f}", f"{t.intensity:.1f}", t.bound])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    widths[0] = min(widths[0], max(12, width - sum(widths[1:]) - 2 * (len(head) - 1)))

    def line(r):
        cells = [(v if len(v) <= w else v[:w - 1] + "~") for v, w in zip(r, widths)]
        return "  ".join(c.ljust(w) if i in (0, 3, 8) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    import textwrap

    def wrap(text):
        return textwrap.wrap(text, width, subsequent_indent="    ")

    out = wrap(f"machine: SGEMM {machine.sgemm_gflops:.0f} GFLOP/s, copy {machine.bandwidth_gbs:.1f} GB/s, "
               f"ridge {machine.ridge:.1f} FLOP/B, {machine.threads} threads (measured now; quick, indicative)")
    out += [line(head), "-" * min(width, len(line(head))), *map(line, body), ""]
    out.append("algorithm choices (why; workspace):")
    for t in layers:
        out += wrap(f"  {t.layer}: {t.algorithm} -- {t.reason or 'torch op'}; "
                    f"workspace {human(t.workspace_bytes, 'B')}")
    out += wrap("MACs nominal (padding taps included); executed = multiplications the algorithm performs; "
                "GFLOP/s = 2 x MACs / time (pool ops / time for pools); FLOP/B over input + weights + output "
                "bytes.")
    if note:
        out += wrap(note + ".")
    return "\n".join(out)


def plot_roofline(layers: list, machine: Machine, path: str) -> Optional[str]:
    """Write the roofline PNG to ``path``; returns None, or the reason it could not (matplotlib missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: pip install matplotlib, then rerun to get the PNG"
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [t.intensity for t in layers if t.intensity > 0]
    lo, hi = min(xs + [machine.ridge]) / 4, max(xs + [machine.ridge]) * 4
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(grid, [min(machine.sgemm_gflops, i * machine.bandwidth_gbs) for i in grid], "k-", label="roofline")
    for i, t in enumerate(layers):
        if t.intensity > 0 and t.gflops > 0:
            color = f"C{i % 10}"
            ax.scatter(t.intensity, t.gflops, marker="o" if t.macs else "s", color=color,
                       label="fastconv (auto)" if i == 0 else None)
            ax.annotate(t.layer, (t.intensity, t.gflops), fontsize=7)
            if t.torch_seconds:  # torch on the same layer: hollow marker at the same intensity
                work = 2 * t.macs if t.macs else t.pool_ops
                ax.scatter(t.intensity, work / t.torch_seconds / 1e9, marker="o" if t.macs else "s",
                           facecolors="none", edgecolors=color, label="torch" if i == 0 else None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title(f"roofline: SGEMM {machine.sgemm_gflops:.0f} GFLOP/s, copy {machine.bandwidth_gbs:.1f} GB/s "
                 f"(filled: fastconv auto, hollow: torch; squares: pooling)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
