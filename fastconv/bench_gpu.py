"""The layer suite on a GPU (``fastconv bench --device cuda``), and the host overhead of a launch.

The suite is :data:`fastconv.benchmark.SUITE`, unchanged: each layer x pass is run by every
fastconv CUDA algorithm (:data:`GPU_ALGOS`, a refusal is reported as such) and by torch (cuDNN with
``torch.backends.cudnn.benchmark = True``), in three modes (:data:`MODES`):

``fp32``     float32, NCHW, TF32 off for cuDNN and matmul: the like-for-like comparison;
``tf32``     float32, NCHW, TF32 on (torch's default for convolutions): what a user gets by default;
``amp_cl``   float16 inputs in channels_last under ``torch.autocast``: cuDNN on tensor cores. fastconv's
             kernels take float32/float64 only today, so its rows say "refused" with the reason.

Timing: one checked call (the error, max |got - ref| / max |ref| against torch in float64 on the
same device), warm-up, then ``reps`` rounds, interleaved across the algorithms of a case, each
round a CUDA-event-timed burst of calls (enough for about a millisecond); the median round. Rows
give milliseconds, the host time per call (enqueueing, measured without synchronizing), TFLOP/s
(2 x MACs), percent of the device's peak for that mode (a large matmul in the same precision,
measured in the same run), the ratio to cuDNN (below 1: faster) and the error.

``emulate=True`` runs the same runner on the CPU execution harness (target "cuda-emu") with tiny
layers and wall-clock timing: it keeps this code working in CI; its numbers mean nothing.

:func:`host_overhead` measures the Python cost of one op with the kernel launch stubbed (no GPU
needed): the part of a small layer's time a GPU would spend waiting for the host.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Callable, Optional, Sequence

import torch

from . import backends, benchmark

#: fastconv's CUDA conv algorithms (pooling layers run "auto" only: one kernel per op).
GPU_ALGOS = ("cuda-direct", "implicit-gemm", "implicit-gemm-tc", "cuda-depthwise", "auto")
MODES = ("fp32", "tf32", "amp_cl")
#: Error tolerance per mode: float32 kernels against a float64 reference; TF32 (10-bit mantissa)
#: and float16 inputs are looser.
TOLERANCE = {"fp32": 1e-4, "tf32": 5e-3, "amp_cl": 2e-2}
BURST_MS = 1.0          #: aim for a timed burst of about this long
MAX_BURST = 200         #: calls per burst at most
QUICK_LAYERS = ("resnet50_1x1", "mobilenet_dw3x3", "lenet5_conv2", "resnet_maxpool", "resnet_global_avg",
                "resnet50_3x3")


class Refused(Exception):
    """fastconv does not take this case (dtype, layout): a row with status "refused"."""


def gpu_unavailable_reason() -> Optional[str]:
    """Why the GPU benchmark cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed (fastconv launches its CUDA kernels through it: pip install fastconv[cuda])"
    return None


# --------------------------------------------------------------------------------------------- modes
@contextlib.contextmanager
def _mode_settings(mode: str, device: str):
    """TF32 switches and cudnn.benchmark for one mode; restored afterwards."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = saved


def _dtype(mode: str) -> torch.dtype:
    return torch.float16 if mode == "amp_cl" else torch.float32


def _prepare(inputs: tuple, mode: str, device: str) -> tuple:
    """Move a case's inputs to ``device`` in the mode's dtype and layout (indices keep theirs)."""
    out = []
    for t in inputs:
        if not isinstance(t, torch.Tensor):
            out.append(t)
            continue
        t = t.to(device)
        if t.is_floating_point():
            t = t.to(_dtype(mode))
            if mode == "amp_cl" and t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
        out.append(t)
    return tuple(out)


def _autocast(mode: str, device: str):
    if mode == "amp_cl" and device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _call(impl, algo: str, inputs: tuple, mode: str, device: str) -> torch.Tensor:
    with torch.no_grad(), _autocast(mode, device):
        if algo == "torch":
            return impl.torch(inputs)
        if mode == "amp_cl" and any(isinstance(t, torch.Tensor) and t.dtype == torch.float16 for t in inputs):
            try:
                return impl.fastconv(inputs, algo)
            except (RuntimeError, TypeError, ValueError) as e:
                raise Refused(str(e).splitlines()[0].split(". ")[0][:160]) from e
        return impl.fastconv(inputs, algo)


# --------------------------------------------------------------------------------------------- timing
class _Clock:
    """CUDA events on a GPU, the wall clock on the CPU (emulation)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def burst(self, fn: Callable[[], object], n: int) -> tuple[float, float]:
        """(device ms per call, host ms per call) of ``n`` back-to-back calls."""
        if not self.cuda:
            start = time.perf_counter()
            for _ in range(n):
                fn()
            ms = (time.perf_counter() - start) * 1e3 / n
            return ms, ms
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        host0 = time.perf_counter()
        start.record()
        for _ in range(n):
            fn()
        end.record()
        host = (time.perf_counter() - host0) * 1e3 / n
        end.synchronize()
        return start.elapsed_time(end) / n, host


def peak_tflops(mode: str, device: str, n: int = 8192, reps: int = 5) -> float:
    """TFLOP/s of an n^3 matmul in the mode's precision on ``device`` now (the % of peak column)."""
    clock = _Clock(device)
    dtype = _dtype(mode) if device.startswith("cuda") else torch.float32
    with _mode_settings(mode, device):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)
        clock.sync()
        times = [clock.burst(lambda: torch.mm(a, b), 3)[0] for _ in range(reps)]
    return 2 * n ** 3 / (statistics.median(times) * 1e-3) / 1e12


def _algos(layer: benchmark.Layer, wanted: Optional[Sequence[str]]) -> list[str]:
    algos = ["auto"] if "pool" in layer.op else list(GPU_ALGOS)
    if wanted:
        algos = [a for a in algos if a in wanted]
    return algos


def reference_case(layer: benchmark.Layer, pass_: str, device: str, seed: int = 0) -> tuple:
    """(float64 inputs on the CPU, torch's float64 result on ``device``) of one layer and pass."""
    impl = layer.passes[pass_]
    base = impl.inputs(torch.float64, torch.Generator().manual_seed(seed))
    ref_inputs = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in base)
    with torch.no_grad(), _mode_settings("fp32", device):
        return base, impl.torch(ref_inputs)


def run_case(layer: benchmark.Layer, pass_: str, mode: str, algos: Sequence[str], *, device: str, reps: int,
             peak: float, seed: int = 0, reference: Optional[tuple] = None) -> list[dict]:
    """Check, then time ``algos`` and torch on one layer, pass and mode; one row per algorithm.

    ``reference``: :func:`reference_case`'s result, when the caller shares it between modes."""
    impl = layer.passes[pass_]
    clock = _Clock(device)
    base, reference = reference if reference is not None else reference_case(layer, pass_, device, seed)
    inputs = _prepare(base, mode, device)
    rows: dict[str, dict] = {}
    runnable: dict[str, Callable[[], object]] = {}
    with _mode_settings(mode, device):
        for algo in ["torch", *algos]:
            row = rows[algo] = {"layer": layer.name, "arch": layer.arch, "op": layer.op, "pass": pass_,
                                "mode": mode, "algo": algo, "macs": layer.macs}
            try:
                out = _call(impl, algo, inputs, mode, device)
            except Refused as e:
                row.update(status="refused", reason=str(e))
                continue
            except Exception as e:  # noqa: BLE001 - report in the table, go on with the suite
                message = (str(e).splitlines()[0] if str(e) else "").split(". ")[0][:160]
                refused = "cannot run" in message or "refuse" in message.lower()
                row.update(status="refused" if refused else "error", reason=f"{type(e).__name__}: {message}")
                continue
            err = benchmark.relative_error(out.float(), reference)
            row.update(error=err, tolerance=TOLERANCE[mode], status="ok" if err <= TOLERANCE[mode] else "wrong")
            if row["status"] == "ok":
                runnable[algo] = (lambda a=algo: _call(impl, a, inputs, mode, device))
        if not runnable:
            return list(rows.values())
        bursts = {}
        for algo, fn in runnable.items():  # warm-up, and calls per burst
            fn()
            clock.sync()
            once = clock.burst(fn, 1)[0]
            bursts[algo] = max(1, min(MAX_BURST, math.ceil(BURST_MS / max(once, 1e-3))))
        times: dict[str, list] = {a: [] for a in runnable}
        host: dict[str, list] = {a: [] for a in runnable}
        for _ in range(reps):
            for algo, fn in runnable.items():  # interleaved: a burst of load slows every algorithm alike
                ms, host_ms = clock.burst(fn, bursts[algo])
                times[algo].append(ms)
                host[algo].append(host_ms)
    torch_ms = statistics.median(times["torch"]) if "torch" in times else None
    for algo, ts in times.items():
        ms = statistics.median(ts)
        tflops = 2 * layer.macs / (ms * 1e-3) / 1e12
        rows[algo].update(ms=ms, host_us=statistics.median(host[algo]) * 1e3, calls_per_round=bursts[algo],
                          reps=reps, tflops=tflops, pct_peak=100 * tflops / peak if peak else None,
                          ratio_to_cudnn=ms / torch_ms if torch_ms else None)
    return list(rows.values())


# ------------------------------------------------------------------------------------------- the suite
def emulated_suite() -> list[benchmark.Layer]:
    """Tiny layers for the harness: every kind of case (conv, depthwise, max / global-avg pooling)."""
    return [
        benchmark.conv_layer("emu_conv3x3", "emulated", 1, 4, 8, (6, 6), (3, 3), padding=1, quick=True),
        benchmark.conv_layer("emu_dw3x3", "emulated", 1, 4, 4, (6, 6), (3, 3), padding=1, groups=4, quick=True),
        benchmark.pool_layer("emu_maxpool", "emulated", "max", (1, 4, 8, 8), kernel=3, stride=2, padding=1,
                             quick=True),
        benchmark.pool_layer("emu_global_avg", "emulated", "adaptive_avg", (1, 8, 5, 5), output_size=1, quick=True),
    ]


def select_layers(spec: Optional[str], quick: bool) -> list[benchmark.Layer]:
    """The GPU suite's layers: ``--layers`` as in ``fastconv bench``; ``quick``: :data:`QUICK_LAYERS`."""
    if spec:
        return benchmark.select_layers(spec)
    if quick:
        return [l for l in benchmark.SUITE if l.name in QUICK_LAYERS]
    return benchmark.select_layers(None)


def run_gpu_suite(layers: Sequence[benchmark.Layer], passes: Sequence[str], *, modes: Sequence[str] = MODES,
                  algos: Optional[Sequence[str]] = None, reps: int = 5, device: str = "cuda",
                  emulate: bool = False, on_case: Optional[Callable] = None) -> dict:
    """Run the suite; returns ``{"environment", "peaks_tflops", "rows", "summary"}``.

    ``emulate``: CPU tensors through the CUDA kernels on the harness (wall-clock timing, fp32 only).
    """
    if emulate:
        device, modes = "cpu", [m for m in modes if m == "fp32"]
    else:
        reason = gpu_unavailable_reason()
        if reason:
            raise RuntimeError(f"fastconv bench --device cuda: {reason}")
    ctx = backends.backend("cuda-emu") if emulate else contextlib.nullcontext()
    rows: list[dict] = []
    with ctx:
        peaks = {m: peak_tflops(m, device, n=256 if emulate else 8192) for m in modes}
        for layer in layers:
            for pass_ in passes:
                if pass_ not in layer.passes:
                    continue
                ref = reference_case(layer, pass_, device)  # float64, once for every mode
                for mode in modes:
                    case = run_case(layer, pass_, mode, _algos(layer, algos), device=device, reps=reps,
                                    peak=peaks[mode], reference=ref)
                    rows += case
                    if on_case:
                        on_case(layer, pass_, mode, case)
    return {"environment": environment(device, emulate), "peaks_tflops": peaks, "rows": rows,
            "summary": summarize(rows)}


def environment(device: str, emulate: bool) -> dict:
    env = {"torch": torch.__version__, "device": device, "emulated": emulate,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(device)
        env.update(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2 ** 30, 1), cuda=torch.version.cuda)
        try:
            import cupy
            env["cupy"] = cupy.__version__
        except ImportError:
            pass
    return env


def summarize(rows: list[dict]) -> dict:
    """Counts by status and, per mode and algorithm, the geometric mean of the ratio to cuDNN."""
    by_status: dict[str, int] = {}
    for r in rows:
        if r["algo"] != "torch":
            by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    ratios: dict[str, dict] = {}
    for r in rows:
        if r["algo"] != "torch" and r.get("ratio_to_cudnn"):
            ratios.setdefault(r["mode"], {}).setdefault(r["algo"], []).append(r["ratio_to_cudnn"])
    geo = {m: {a: statistics.geometric_mean(vs) for a, vs in d.items()}
           for m, d in ratios.items()}
    return {"status": by_status, "geomean_ratio_to_cudnn": geo,
            "failures": by_status.get("wrong", 0) + by_status.get("error", 0)}


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_case(layer: benchmark.Layer, pass_: str, mode: str, rows: list[dict]) -> str:
    lines = [f"{layer.name} ({layer.describe()}) {pass_} [{mode}]",
             f"  {'algo':<16}{'ms':>10}{'host us':>9}{'TFLOP/s':>9}{'% peak':>8}{'x cuDNN':>9}{'error':>10}  status"]
    for r in rows:
        lines.append(f"  {r['algo']:<16}{_f(r.get('ms'), '.4f'):>10}{_f(r.get('host_us'), '.1f'):>9}"
                     f"{_f(r.get('tflops'), '.2f'):>9}{_f(r.get('pct_peak'), '.1f'):>8}"
                     f"{_f(r.get('ratio_to_cudnn'), '.2f'):>9}{_f(r.get('error'), '.1e'):>10}  {r['status']}"
                     + (f": {r['reason']}" if r.get("reason") else ""))
    return "\n".join(lines)


def format_summary(result: dict) -> str:
    s = result["summary"]
    lines = ["peaks (matmul, TFLOP/s): " + ", ".join(f"{m} {v:.1f}" for m, v in result["peaks_tflops"].items()),
             "rows by status: " + ", ".join(f"{k} {v}" for k, v in sorted(s["status"].items()))]
    for mode, d in s["geomean_ratio_to_cudnn"].items():
        lines.append(f"geomean time / cuDNN [{mode}]: " + ", ".join(f"{a} {v:.2f}" for a, v in sorted(d.items())))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- the command
def run_from_cli(args) -> int:
    """``fastconv bench --device cuda`` (arguments parsed by :mod:`fastconv.commands.bench`)."""
    import json
    import sys

    reason = gpu_unavailable_reason()
    if reason:
        print(f"fastconv bench --device cuda: error: {reason}; run `fastconv bench` (CPU) instead", file=sys.stderr)
        return 2
    try:
        layers = select_layers(args.layers, args.quick)
        passes = benchmark.parse_passes(args.passes)
        algos = benchmark.parse_algos(args.algo)
    except ValueError as e:
        print(f"fastconv bench: error: {e}", file=sys.stderr)
        return 2
    if args.dtype != "float32":
        print("fastconv bench --device cuda: error: the GPU suite runs its own modes (fp32, tf32, amp_cl); "
              f"--dtype {args.dtype} is for the CPU suite", file=sys.stderr)
        return 2
    reps = args.reps or (3 if args.quick else 5)

    def show(layer, pass_, mode, rows):
        print(format_case(layer, pass_, mode, rows) + "\n", flush=True)

    result = run_gpu_suite(layers, passes, algos=algos, reps=reps, on_case=show)
    result["host_overhead_us"] = host_overhead()
    out = args.out if args.out is not None else benchmark.default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fastconv-bench-gpu.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(format_summary(result))
    print(f"wrote {path}")
    return 1 if result["summary"]["failures"] else 0


# ------------------------------------------------------------------------------------- host overhead
_NOOPS: dict = {}


def _noop_custom_op(autograd: bool = False):
    """A torch.library.custom_op that returns a fresh empty tensor: the floor torch's custom-op
    dispatch sets under any fastconv op (host_overhead rows "custom_op_floor" and, with an autograd
    formula registered like every fastconv op, "custom_op_autograd_floor")."""
    if autograd not in _NOOPS:
        name = "fastconv_bench::noop_autograd" if autograd else "fastconv_bench::noop"

        @torch.library.custom_op(name, mutates_args=())
        def noop(x: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(x)

        if autograd:
            noop.register_autograd(lambda ctx, grad: grad)
        _NOOPS[autograd] = noop
    return _NOOPS[autograd]


@contextlib.contextmanager
def stubbed_launches():
    """Inside the block the CUDA kernels are looked up as no-ops: every op still runs its host code
    (checks, geometry, plan, buffers, argument conversion) but launches nothing."""
    from .cuda import loader

    real = loader.function
    loader.function = lambda *args, **kwargs: (lambda *a, **k: None)
    try:
        yield
    finally:
        loader.function = real


def host_overhead(rounds: int = 15, calls: int = 100) -> dict:
    """Microseconds of host time per call with the launch stubbed, on the harness target (CPU tensors
    with the same host code as the GPU): fastconv's conv2d forward through the public API, through
    ``torch.ops`` directly, its CUDA layer alone (plan + launch), forward + backward, and torch's own
    conv2d dispatch on a tiny CPU tensor for scale. The best round of each (least disturbed)."""
    from . import functional as F
    from .cuda import conv as cuda_conv
    from .ops.conv import make_geometry

    # Small tensors: the CPU must not spend the measured time on real tensor work (on a GPU the
    # buffers' sizes do not change the host's cost).
    x = torch.randn(2, 16, 8, 8)
    w = torch.randn(16, 16, 3, 3)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    gy = torch.randn(2, 16, 8, 8)
    geom = make_geometry(2, 2, 16, 16, 1, (8, 8), (3, 3), None, (1, 1), (1, 1), (1, 1), (1, 1),
                         torch.float32, "cuda-emu")
    alg = next(a for a in cuda_conv.ALGORITHMS if a.name == "implicit-gemm")
    x5, w5 = x.unsqueeze(2), w.unsqueeze(2)
    tiny_x, tiny_w = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 1, 1)

    def fwd_bwd():
        torch.autograd.grad(F.conv2d(xg, wg, padding=1, algo="implicit-gemm"), (xg, wg), gy)

    noop, noop_autograd = _noop_custom_op(), _noop_custom_op(autograd=True)
    cases = {
        "custom_op_floor": lambda: noop(x),
        "custom_op_autograd_floor": lambda: noop_autograd(x),
        "conv2d_forward_public_api": lambda: F.conv2d(x, w, padding=1, algo="implicit-gemm"),
        "conv2d_forward_torch_ops": lambda: torch.ops.fastconv.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], [1, 1], 1,
                                                                      "implicit-gemm"),
        "conv2d_forward_cuda_layer": lambda: alg.forward(x5, w5, None, geom),
        "conv2d_forward_backward_public_api": fwd_bwd,
        "torch_conv2d_tiny_cpu": lambda: torch.nn.functional.conv2d(tiny_x, tiny_w),
    }
    best = {name: math.inf for name in cases}
    with backends.backend("cuda-emu"), stubbed_launches():
        for fn in cases.values():
            for _ in range(10):
                fn()
        for _ in range(rounds):  # interleaved rounds, best of each: a burst of load hits every case alike
            for name, fn in cases.items():
                n = calls // 4 if "backward" in name else calls
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                best[name] = min(best[name], (time.perf_counter() - start) / n * 1e6)
    return {name: round(v, 1) for name, v in best.items()}
