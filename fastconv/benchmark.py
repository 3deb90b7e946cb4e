"""The layer benchmark suite and its runner: fastconv's algorithms against torch, per layer and pass.

The suite is data: :data:`SUITE` lists :class:`Layer` entries (name, architecture, op, shapes, keyword
arguments). Each entry carries, per pass, a :class:`PassImpl`: how to build the inputs, the fastconv
callable (taking an algorithm name) and the torch callable computing the same thing. Convolutions are
built by :func:`conv_layer`; another op family (transposed convs, pooling) adds entries with its own
factory and passes, and the runner, table, JSON and plot need no change.

The runner (:func:`run_suite`) follows DESIGN.md §9, the DeepBench layout: for every layer x pass x
algorithm (each registered algorithm that accepts the geometry, ``"auto"``, and ``"torch"``) it

1. checks the result against torch in float64 on the same data (max abs error relative to the
   reference's largest magnitude) *before* timing; a row that fails is reported and not timed;
2. times it: one warm-up, then ``reps`` rounds in which every algorithm of the (layer, pass) runs
   once in turn, median per algorithm. Interleaving keeps the ratio to torch honest on a shared,
   noisy machine: a burst of load slows every algorithm of a round alike, instead of one of them;
3. reports milliseconds, GFLOP/s (FLOPs = 2 x MACs, bias not counted), percent of the machine's GEMM
   rate measured in the same run (:func:`measure_gemm`, 2048^3 ``torch.mm``), the ratio to torch
   (fastconv time / torch time: below 1 is faster), and the error.

:func:`first_call` times ``import fastconv`` and the first convolution in a fresh Python process.
``fastconv bench`` (:mod:`fastconv.commands.bench`) and ``bench/bench_conv2d.py`` (pytest-benchmark)
drive this module.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import backends, registry

PASSES = registry.PASSES
#: Relative error bound (max |got - reference| / max |reference|) per dtype, and per algorithm where
#: one is documented to lose more (DESIGN.md §4: Winograd F(4x4,3x3) about 3e-5 in float32).
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}
ALGO_TOLERANCE = {("winograd4", torch.float32): 5e-4}
#: Seconds of timed rounds one (layer, pass) may take at most; large layers get fewer rounds (>= MIN_REPS).
ROUND_BUDGET_S = 20.0
MIN_REPS = 3


@dataclass(frozen=True)
class PassImpl:
    """One pass of one layer: ``inputs(dtype, generator) -> tuple``, then ``fastconv(inputs, algo)`` and
    ``torch(inputs)`` return the same tensor."""

    inputs: Callable[[torch.dtype, torch.Generator], tuple]
    fastconv: Callable[[tuple, str], torch.Tensor]
    torch: Callable[[tuple], torch.Tensor]


@dataclass(frozen=True)
class Layer:
    """One entry of the suite.

    ``macs`` is the multiply-accumulate count of one pass; ``algorithms(dtype)`` names the registered
    fastconv algorithms that accept the layer (``"auto"`` and ``"torch"`` are always run besides);
    ``slow`` layers are left out of ``--quick`` unless named; ``quick`` layers form the quick subset.
    """

    name: str
    arch: str
    op: str
    shapes: dict
    kwargs: dict
    macs: int
    passes: dict
    algorithms: Callable[[torch.dtype], list]
    slow: bool = False
    quick: bool = False

    def describe(self) -> str:
        shapes = " ".join(f"{k}={'x'.join(map(str, v))}" for k, v in self.shapes.items())
        kw = " ".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.op} {shapes} {kw}".strip()


# --------------------------------------------------------------------------------------------------
# convolution entries
# --------------------------------------------------------------------------------------------------
def _conv_geometry(ndim, x_shape, w_shape, stride, padding, dilation, groups, dtype):
    from .ops.conv import make_geometry

    return make_geometry(ndim, x_shape[0], x_shape[1], w_shape[0], groups, x_shape[2:], w_shape[2:], None,
                         stride, padding, padding, dilation, dtype, backends.current())


def conv_layer(name: str, arch: str, batch: int, in_channels: int, out_channels: int,
               spatial: Sequence[int], kernel: Sequence[int], *, stride=1, padding=0, dilation=1,
               groups: int = 1, slow: bool = False, quick: bool = False) -> Layer:
    """A conv{1,2,3}d entry: input (batch, in_channels, *spatial), weight (out, in/groups, *kernel), no bias.

    Passes: ``forward`` (torch: ``aten.convolution``), ``grad_input`` and ``grad_weight`` (fastconv:
    ``torch.ops.fastconv.conv{d}d_grad_input/_grad_weight``; torch: ``aten.convolution_backward`` with
    one output requested).
    """
    ndim = len(spatial)
    expand = lambda v: [int(v)] * ndim if isinstance(v, int) else [int(i) for i in v]  # noqa: E731
    stride_l, pad_l, dil_l = expand(stride), expand(padding), expand(dilation)
    x_shape = (batch, in_channels, *spatial)
    w_shape = (out_channels, in_channels // groups, *kernel)
    geom = _conv_geometry(ndim, x_shape, w_shape, stride_l, pad_l, dil_l, groups, torch.float32)
    y_shape = (batch, out_channels, *geom.out_spatial[3 - ndim:])
    ops = getattr(torch.ops.fastconv, f"conv{ndim}d")
    op_gi = getattr(torch.ops.fastconv, f"conv{ndim}d_grad_input")
    op_gw = getattr(torch.ops.fastconv, f"conv{ndim}d_grad_weight")
    aten_bw = torch.ops.aten.convolution_backward.default
    zeros = [0] * ndim

    def randn(shape, dtype, gen):
        return torch.randn(shape, dtype=dtype, generator=gen)

    def fwd_inputs(dtype, gen):
        return randn(x_shape, dtype, gen), randn(w_shape, dtype, gen)

    def gi_inputs(dtype, gen):
        # The input tensor only tells aten.convolution_backward its shape; fastconv takes the size.
        return randn(y_shape, dtype, gen), randn(w_shape, dtype, gen), torch.empty(x_shape, dtype=dtype)

    def gw_inputs(dtype, gen):
        return randn(y_shape, dtype, gen), randn(x_shape, dtype, gen), torch.empty(w_shape, dtype=dtype)

    passes = {
        "forward": PassImpl(
            fwd_inputs,
            lambda t, algo: ops(t[0], t[1], None, stride_l, pad_l, pad_l, dil_l, groups, algo),
            lambda t: torch.ops.aten.convolution.default(t[0], t[1], None, stride_l, pad_l, dil_l, False,
                                                         zeros, groups)),
        "grad_input": PassImpl(
            gi_inputs,
            lambda t, algo: op_gi(t[0], t[1], list(x_shape[2:]), stride_l, pad_l, pad_l, dil_l, groups, algo),
            lambda t: aten_bw(t[0], t[2], t[1], None, stride_l, pad_l, dil_l, False, zeros, groups,
                              [True, False, False])[0]),
        "grad_weight": PassImpl(
            gw_inputs,
            lambda t, algo: op_gw(t[0], t[1], list(w_shape[2:]), stride_l, pad_l, pad_l, dil_l, groups, algo),
            lambda t: aten_bw(t[0], t[1], t[2], None, stride_l, pad_l, dil_l, False, zeros, groups,
                              [False, True, False])[1]),
    }

    def algorithms(dtype):
        g = _conv_geometry(ndim, x_shape, w_shape, stride_l, pad_l, dil_l, groups, dtype)
        return [alg.name for alg in registry.candidates(g)]

    defaults = dict(stride=1, padding=0, dilation=1, groups=1)  # shown only where they differ
    kwargs = {k: v for k, v in dict(stride=stride, padding=padding, dilation=dilation, groups=groups).items()
              if v != defaults[k]}
    return Layer(name, arch, f"conv{ndim}d", {"input": x_shape, "weight": w_shape, "output": y_shape},
                 kwargs, geom.macs, passes, algorithms, slow=slow, quick=quick)


def _randn(shape, dtype, gen):
    return torch.randn(shape, dtype=dtype, generator=gen)


def conv_transpose_layer(name: str, arch: str, batch: int, in_channels: int, out_channels: int,
                         spatial: Sequence[int], kernel: int, *, stride: int = 1, padding: int = 0,
                         slow: bool = False, quick: bool = False) -> Layer:
    """A conv_transpose2d entry: input (batch, in, *spatial), weight (in, out, k, k), no bias.

    Passes: ``forward`` (``fastconv::conv_transpose2d``; auto may pick the kernel == stride GEMM),
    ``grad_input`` (a forward conv of the output gradient: ``fastconv::conv2d``) and ``grad_weight``
    (``fastconv::conv2d_grad_weight`` with the roles of input and output gradient swapped); torch:
    ``aten.convolution(transposed=True)`` and its backward.
    """
    k, s, p = [kernel] * 2, [stride] * 2, [padding] * 2
    x_shape = (batch, in_channels, *spatial)
    w_shape = (in_channels, out_channels, *k)
    y_shape = (batch, out_channels, *[(i - 1) * stride - 2 * padding + kernel for i in spatial])
    ones, zeros = [1, 1], [0, 0]
    aten_bw = torch.ops.aten.convolution_backward.default
    # The adjoint convolution (output -> input) is what the registry's algorithms see.
    adjoint = _conv_geometry(2, y_shape, w_shape, s, p, ones, 1, torch.float32)

    passes = {
        "forward": PassImpl(
            lambda dtype, gen: (_randn(x_shape, dtype, gen), _randn(w_shape, dtype, gen)),
            lambda t, algo: torch.ops.fastconv.conv_transpose2d(t[0], t[1], None, s, p, zeros, ones, 1, algo),
            lambda t: torch.ops.aten.convolution.default(t[0], t[1], None, s, p, ones, True, zeros, 1)),
        "grad_input": PassImpl(
            lambda dtype, gen: (_randn(y_shape, dtype, gen), _randn(w_shape, dtype, gen),
                                torch.empty(x_shape, dtype=dtype)),
            lambda t, algo: torch.ops.fastconv.conv2d(t[0], t[1], None, s, p, p, ones, 1, algo),
            lambda t: aten_bw(t[0], t[2], t[1], None, s, p, ones, True, zeros, 1, [True, False, False])[0]),
        "grad_weight": PassImpl(
            lambda dtype, gen: (_randn(y_shape, dtype, gen), _randn(x_shape, dtype, gen),
                                torch.empty(w_shape, dtype=dtype)),
            lambda t, algo: torch.ops.fastconv.conv2d_grad_weight(t[1], t[0], k, s, p, p, ones, 1, algo),
            lambda t: aten_bw(t[0], t[1], t[2], None, s, p, ones, True, zeros, 1, [False, True, False])[1]),
    }

    def algorithms(dtype):
        g = _conv_geometry(2, y_shape, w_shape, s, p, ones, 1, dtype)
        return [alg.name for alg in registry.candidates(g)]

    return Layer(name, arch, "conv_transpose2d", {"input": x_shape, "weight": w_shape, "output": y_shape},
                 {"stride": stride, "padding": padding}, adjoint.macs, passes, algorithms, slow=slow,
                 quick=quick)


def pool_layer(name: str, arch: str, kind: str, shape: Sequence[int], *, kernel: int = 2,
               stride: Optional[int] = None, padding: int = 0, output_size: int = 1, quick: bool = False) -> Layer:
    """A pooling entry (``kind`` max, avg or adaptive_avg, 2-D): forward and grad_input passes.

    Pooling has one algorithm per target (``auto``). ``macs`` counts window elements (comparisons or
    additions), so the GFLOP/s column reads as G window-ops/s x 2.
    """
    from .ops import pool as pool_ops

    stride = kernel if stride is None else stride
    k, s, p, d = [kernel] * 2, [stride] * 2, [padding] * 2, [1, 1]
    if kind == "adaptive_avg":
        out = [output_size] * 2
    else:
        out = [pool_ops.pool_output_size(i, kernel, stride, padding, 1, False) for i in shape[2:]]
    y_shape = (*shape[:2], *out)
    window = math.prod(k) if kind != "adaptive_avg" else math.prod(math.ceil(i / o) for i, o in zip(shape[2:], out))
    ops = torch.ops.fastconv

    def with_indices(dtype, gen):
        x = _randn(shape, dtype, gen)
        return _randn(y_shape, dtype, gen), torch.ops.aten.max_pool2d_with_indices(x, k, s, p, d, False)[1], x

    if kind == "max":
        forward = PassImpl(lambda dtype, gen: (_randn(shape, dtype, gen),),
                           lambda t, algo: ops.max_pool(t[0], k, s, p, d, False, False)[0],
                           lambda t: torch.ops.aten.max_pool2d_with_indices(t[0], k, s, p, d, False)[0])
        backward = PassImpl(with_indices, lambda t, algo: ops.max_pool_backward(t[0], t[1], list(shape[2:])),
                            lambda t: torch.ops.aten.max_pool2d_with_indices_backward(t[0], t[2], k, s, p, d,
                                                                                        False, t[1]))
    elif kind == "avg":
        forward = PassImpl(lambda dtype, gen: (_randn(shape, dtype, gen),),
                           lambda t, algo: ops.avg_pool(t[0], k, s, p, False, True, 0),
                           lambda t: torch.ops.aten.avg_pool2d(t[0], k, s, p, False, True, None))
        backward = PassImpl(lambda dtype, gen: (_randn(y_shape, dtype, gen), torch.empty(shape, dtype=dtype)),
                            lambda t, algo: ops.avg_pool_backward(t[0], list(shape[2:]), k, s, p, False, True, 0),
                            lambda t: torch.ops.aten.avg_pool2d_backward(t[0], t[1], k, s, p, False, True, None))
    else:
        forward = PassImpl(lambda dtype, gen: (_randn(shape, dtype, gen),),
                           lambda t, algo: ops.adaptive_avg_pool(t[0], out),
                           lambda t: torch.ops.aten._adaptive_avg_pool2d(t[0], out))
        backward = PassImpl(lambda dtype, gen: (_randn(y_shape, dtype, gen), torch.empty(shape, dtype=dtype)),
                            lambda t, algo: ops.adaptive_avg_pool_backward(t[0], list(shape[2:])),
                            lambda t: torch.ops.aten._adaptive_avg_pool2d_backward(t[0], t[1]))
    kwargs = {"output_size": output_size} if kind == "adaptive_avg" else {"kernel": kernel, "stride": stride,
                                                                          "padding": padding}
    return Layer(name, arch, f"{kind}_pool2d", {"input": tuple(shape), "output": y_shape}, kwargs,
                 math.prod(y_shape) * window, {"forward": forward, "grad_input": backward}, lambda dtype: [],
                 quick=quick)


#: The layer suite: the core issue's layers plus small, depthwise, 1-D and 3-D cases.
SUITE: list[Layer] = [
    conv_layer("lenet5_conv1", "LeNet-5", 64, 1, 6, (32, 32), (5, 5), quick=True),
    conv_layer("lenet5_conv2", "LeNet-5", 64, 6, 16, (14, 14), (5, 5), quick=True),
    conv_layer("resnet50_3x3", "ResNet-50", 8, 64, 64, (56, 56), (3, 3), padding=1),
    conv_layer("resnet50_1x1", "ResNet-50", 8, 512, 128, (28, 28), (1, 1), quick=True),
    conv_layer("resnet_3x3_256", "ResNet-50", 8, 256, 256, (14, 14), (3, 3), padding=1),
    conv_layer("vgg16_conv1_2", "VGG-16", 2, 64, 64, (224, 224), (3, 3), padding=1),
    conv_layer("vgg16_conv3", "VGG-16", 8, 256, 256, (56, 56), (3, 3), padding=1),
    conv_layer("alexnet_conv1", "AlexNet", 8, 3, 96, (227, 227), (11, 11), stride=4),
    conv_layer("inception_5x5", "Inception", 8, 192, 32, (28, 28), (5, 5), padding=2),
    conv_layer("mobilenet_dw3x3", "MobileNet", 8, 256, 256, (28, 28), (3, 3), padding=1, groups=256,
               quick=True),
    conv_layer("audio_conv1d", "audio front end", 16, 1, 128, (8000,), (80,), stride=4, quick=True),
    conv_layer("c3d_conv3d", "C3D", 2, 64, 64, (16, 56, 56), (3, 3, 3), padding=1, slow=True),
    conv_transpose_layer("unet_upconv", "U-Net", 4, 512, 256, (28, 28), 2, stride=2),
    conv_transpose_layer("dcgan_g2", "DCGAN", 64, 512, 256, (4, 4), 4, stride=2, padding=1),
    conv_transpose_layer("dcgan_g4", "DCGAN", 64, 128, 64, (16, 16), 4, stride=2, padding=1, quick=True),
    pool_layer("resnet_maxpool", "ResNet-50", "max", (8, 64, 112, 112), kernel=3, stride=2, padding=1,
               quick=True),
    pool_layer("densenet_avgpool", "DenseNet", "avg", (8, 256, 56, 56), kernel=2),
    pool_layer("resnet_global_avg", "ResNet-50", "adaptive_avg", (8, 2048, 7, 7), output_size=1),
]


def select_layers(spec: Optional[str], quick: bool = False, suite: Sequence[Layer] = None) -> list[Layer]:
    """Layers named by ``spec`` (comma-separated exact names or substrings of name/architecture).

    Without ``spec``: the whole suite, or with ``quick`` the quick subset; slow layers only when named.
    Raises ValueError for a name that matches nothing, listing the known names.
    """
    suite = SUITE if suite is None else list(suite)
    if not spec:
        return [l for l in suite if (l.quick if quick else not l.slow)]
    chosen: list[Layer] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        exact = [l for l in suite if l.name == part]
        hits = exact or [l for l in suite if part.lower() in l.name.lower() or part.lower() in l.arch.lower()]
        if not hits:
            raise ValueError(f"unknown layer {part!r}; known layers: {', '.join(l.name for l in suite)}")
        chosen += [l for l in hits if l not in chosen]
    return chosen


def parse_passes(spec: Optional[str]) -> list[str]:
    """``"forward,grad_weight"`` -> list; aliases ``all``, ``fwd``, ``bwd`` (both gradients)."""
    if not spec or spec == "all":
        return list(PASSES)
    alias = {"fwd": ["forward"], "bwd": ["grad_input", "grad_weight"], "backward": ["grad_input", "grad_weight"]}
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        names = alias.get(part, [part])
        for n in names:
            if n not in PASSES:
                raise ValueError(f"unknown pass {part!r}; expected {', '.join(PASSES)} (or all, fwd, bwd)")
            if n not in out:
                out.append(n)
    return out


def parse_algos(spec: Optional[str]) -> Optional[list[str]]:
    """Algorithm names to run besides torch (None: every one that accepts a layer, plus auto)."""
    if not spec or spec == "all":
        return None
    known = registry.names() + ["torch"]
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part not in known:
            raise ValueError(f"unknown algorithm {part!r}; expected one of {', '.join(known)}")
        out.append(part)
    return out


def parse_dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if name not in dtypes:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {', '.join(dtypes)}")
    return dtypes[name]


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
    if not layer.op.startswith("conv") or "transpose" in layer.op:
        return None  # pooling has one kernel; a transposed forward may take patch_gemm outside the registry
    shapes = layer.shapes
    ndim = len(shapes["input"]) - 2
    kw = layer.kwargs
    expand = lambda v: [int(v)] * ndim if isinstance(v, int) else list(v)  # noqa: E731
    g = _conv_geometry(ndim, shapes["input"], shapes["weight"], expand(kw.get("stride", 1)),
                       expand(kw.get("padding", 0)), expand(kw.get("dilation", 1)), kw.get("groups", 1), dtype)
    try:
        return registry.choose("auto", g, pass_).name
    except (RuntimeError, ValueError):
        return None


def run_case(layer: Layer, pass_: str, algos: Sequence[str], dtype: torch.dtype, reps: int,
             gemm_gflops: float, seed: int = 0) -> list[dict]:
    """Check then time ``algos`` (must include ``"torch"``) on one layer and pass; one row dict per algorithm."""
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
    if warm:
        rounds = min(reps, max(MIN_REPS, int(ROUND_BUDGET_S * 1e3 / max(sum(warm.values()), 1e-3))))
        times: dict[str, list] = {a: [] for a in warm}
        for _ in range(rounds):
            for algo in warm:  # interleaved: see the module docstring
                times[algo].append(_timed(impl, algo, inputs))
        torch_ms = statistics.median(times["torch"]) if "torch" in times else None
        for algo, ts in times.items():
            ms = statistics.median(ts)
            gflops = 2 * layer.macs / (ms * 1e-3) / 1e9
            rows[algo].update(ms=ms, times_ms=ts, reps=rounds, gflops=gflops,
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
                  "second_conv2d_ms": (t4 - t3) * 1e3, "import_and_first_call_s": t3 - t1}))
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


# --------------------------------------------------------------------------------------------------
# the whole run
# --------------------------------------------------------------------------------------------------
def algos_for(layer: Layer, dtype: torch.dtype, wanted: Optional[Sequence[str]]) -> list[str]:
    """torch first (the baseline every ratio needs), then the accepted algorithms, then auto."""
    accepted = layer.algorithms(dtype) + ["auto"]
    if wanted is not None:
        accepted = [a for a in accepted if a in wanted]
    return ["torch"] + accepted


def geomean(values) -> Optional[float]:
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


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


def environment(gemm_gflops: float, dtype: torch.dtype) -> dict:
    import numba
    import numpy

    from . import __version__

    return {"fastconv": __version__, "torch": torch.__version__, "numba": numba.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "numba_threads": numba.get_num_threads(), "backend": backends.current(),
            "gemm_dtype": str(dtype).replace("torch.", ""), "gemm_gflops": gemm_gflops,
            "autotune": __import__("fastconv.autotune", fromlist=["enabled"]).enabled(),
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_suite(layers: Sequence[Layer], passes: Sequence[str], algos: Optional[Sequence[str]] = None,
              dtype: torch.dtype = torch.float32, reps: int = 5, progress: bool = True,
              on_case: Optional[Callable[[Layer, str, list], None]] = None, with_first_call: bool = True
              ) -> dict:
    """Run the suite; returns ``{"environment", "rows", "summary", "first_call"}`` (JSON-ready).

    ``on_case(layer, pass_, rows)`` is called after each (layer, pass), e.g. to print its table.
    A tqdm bar on stderr counts (layer, pass) cases when ``progress``.
    """
    from tqdm import tqdm

    gemm = measure_gemm(dtype)
    cases = [(l, p) for l in layers for p in passes if p in l.passes]
    rows: list[dict] = []
    bar = tqdm(total=len(cases), desc="fastconv bench", unit="case", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    try:
        for layer, pass_ in cases:
            bar.set_postfix_str(f"{layer.name} {pass_}")
            case_rows = run_case(layer, pass_, algos_for(layer, dtype, algos), dtype, reps, gemm)
            rows += case_rows
            if on_case is not None:
                on_case(layer, pass_, case_rows)
            bar.update()
    finally:
        bar.close()
    result = {"environment": environment(gemm, dtype),
              "layers": [{"name": l.name, "arch": l.arch, "op": l.op, "shapes": l.shapes, "kwargs": l.kwargs,
                          "macs": l.macs} for l in layers],
              "rows": rows, "summary": summarize(rows)}
    result["first_call"] = first_call() if with_first_call else None
    return result


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------
def _fmt(v, spec, missing="-"):
    return missing if v is None else format(v, spec)


def format_case(layer: Layer, pass_: str, rows: list[dict], gemm_label: str = "%SGEMM") -> str:
    """The terminal table of one layer and pass."""
    head = (f"{layer.name} [{layer.arch}] {pass_}: {layer.describe()}  "
            f"({layer.macs / 1e6:.1f} M MACs)")
    lines = [head, f"  {'algo':<18}{'ms':>10}{'GFLOP/s':>10}{gemm_label:>8}{'vs torch':>10}{'max err':>10}"]
    for r in rows:
        name = r["algo"] + (f"->{r['auto_choice']}" if r.get("auto_choice") else "")
        if r.get("failure"):
            lines.append(f"  {name:<18}  FAILED: {r['failure']}")
            continue
        lines.append(f"  {name:<18}{_fmt(r.get('ms'), '10.2f')}{_fmt(r.get('gflops'), '10.1f')}"
                     f"{_fmt(r.get('pct_gemm'), '7.0f')}%{_fmt(r.get('ratio'), '10.2f')}"
                     f"{_fmt(r.get('error'), '10.1e')}")
    return "\n".join(lines)


def format_summary(result: dict) -> str:
    s = result["summary"]
    env = result["environment"]
    lines = [f"GEMM rate ({env['gemm_dtype']}, 2048^3 torch.mm): {env['gemm_gflops']:.0f} GFLOP/s; "
             f"threads: torch {env['torch_threads']}, numba {env['numba_threads']}"]
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
    width = 0.8 / max(1, len(algos))
    for ax, p in zip(axes, passes):
        for i, a in enumerate(algos):
            xs, ys = [], []
            for j, l in enumerate(layers):
                r = next((r for r in rows if r["layer"] == l and r["pass"] == p and r["algo"] == a), None)
                if r:
                    xs.append(j + (i - (len(algos) - 1) / 2) * width)
                    ys.append(r["ratio"])
            ax.bar(xs, ys, width, label=a)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("time / torch")
        ax.set_title(f"{p} (below 1: faster than torch)", fontsize=10)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=8)
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


def write_results(result: dict, out: Path, stem: str = "fastconv-bench") -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.png`` into ``out`` (created); returns both paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.json"

    def clean(v):  # JSON has no inf/nan
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    json_path.write_text(json.dumps(clean(result), indent=1), encoding="utf-8")
    return json_path, plot(result, out / f"{stem}.png")
