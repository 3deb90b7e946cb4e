"""Count the work of a model: MACs, FLOPs, bias adds, pooling operations and parameters, per layer.

Units (DESIGN.md §10), stated once and used everywhere:

* **MACs** -- multiply-accumulates of convolutions (plain, grouped, depthwise, dilated, transposed) and of
  matrix products (``Linear``, ``matmul``). A conv producing ``O`` output elements from ``C/groups`` input
  channels with a ``k``-tap kernel costs ``O * (C/groups) * k`` MACs, *including* the taps that fall on zero
  padding, as fvcore, thop, ptflops and torch's ``FlopCounterMode`` count. Dilation changes nothing. A
  transposed conv's work follows its *input* size: ``N * C_in * prod(in_spatial) * (C_out/groups) * k``.
* **FLOPs** -- ``2 x MACs`` (one multiply and one add each), torch's ``FlopCounterMode`` convention.
* **bias adds** -- one add per output element of a conv or linear layer with a bias, counted separately and
  not included in MACs or FLOPs (ptflops adds them to its MACs, which is why it reads 120.45M where fvcore
  reads 120.42M on the same layer).
* **pool ops** -- pooling work, not included in MACs or FLOPs: one operation per window element visited
  (a comparison for max/min pooling, an add for average pooling); a window of ``k`` elements is counted as
  ``k`` (strictly ``k - 1`` comparisons plus the first load), taps over padding included as for convs.
  Adaptive pools count their exact, variable windows; a global average (``aten.mean``) counts one add per
  input element. In the backward pass max/min pooling counts one add per output element (the gradient is
  scattered to the argmax) and average pooling its window elements again. Unpooling is a scatter: 0.

:func:`count` runs the model once under a :class:`~torch.utils._python_dispatch.TorchDispatchMode`, so it
sees every aten op and every ``fastconv::`` op however it was reached -- a fastconv module, a torch module,
``torch.nn.functional.conv2d``, ``fastconv.functional.conv2d`` -- and attributes each op to the innermost
module running (forward pre/post hooks; in the backward pass gradient hooks on the module's outputs and
inputs, as ``torch.utils.module_tracker`` does).

For fastconv ops each row also names the algorithm the registry picks for that pass and geometry, the
multiplications that algorithm actually performs (``mult_ratio(geom) x MACs``: Winograd does fewer) and its
workspace in bytes. Torch-native ops show algorithm ``"torch"``.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.autograd.graph import register_multi_grad_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import registry

__all__ = ["count", "Report", "Row", "conv_macs", "conv_transpose_macs", "conv_geometry"]


# --------------------------------------------------------------------------------------------------
# closed forms (also used by the tests' hand derivations and the CLI)
# --------------------------------------------------------------------------------------------------
def conv_macs(batch: int, in_channels: int, out_channels: int, out_spatial: Sequence[int],
              kernel: Sequence[int], groups: int = 1) -> int:
    """MACs of a convolution: every output element sums ``(in_channels / groups) * prod(kernel)`` products."""
    return batch * out_channels * math.prod(out_spatial) * (in_channels // groups) * math.prod(kernel)


def conv_transpose_macs(batch: int, in_channels: int, out_channels: int, in_spatial: Sequence[int],
                        kernel: Sequence[int], groups: int = 1) -> int:
    """MACs of a transposed convolution: every *input* element is scattered to
    ``(out_channels / groups) * prod(kernel)`` outputs, whatever the stride or output padding."""
    return batch * in_channels * math.prod(in_spatial) * (out_channels // groups) * math.prod(kernel)


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One counted op call. ``macs``/``flops``/``bias_adds``/``pool_ops`` in the module docstring's units."""

    name: str                 #: fully qualified module name ("" for the root; "(functional)" outside modules)
    type: str                 #: module class name, or the op kind when no module owns the op
    op: str                   #: op kind: conv2d, conv_transpose2d, conv2d_grad_input, linear, max_pool2d, ...
    pass_: str                #: "forward" or "backward"
    input_shape: tuple
    output_shape: tuple
    params: int = 0           #: parameters first used by this op (each parameter counted once per report)
    macs: int = 0
    flops: int = 0
    bias_adds: int = 0
    pool_ops: int = 0
    algorithm: str = ""       #: fastconv algorithm chosen by the registry, "torch" for aten ops
    algorithm_mults: int = 0  #: multiplications the chosen algorithm performs
    workspace_bytes: int = 0

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Report:
    """Totals and per-op rows of :func:`count`. ``str(report)`` is a table with units and a totals line."""

    rows: list[Row] = field(default_factory=list)
    params: int = 0

    def _sum(self, attr: str, pass_: Optional[str] = None) -> int:
        return sum(getattr(r, attr) for r in self.rows if pass_ is None or r.pass_ == pass_)

    @property
    def macs(self) -> int:
        """Multiply-accumulates, forward plus (when counted) backward."""
        return self._sum("macs")

    @property
    def flops(self) -> int:
        """``2 x macs`` (bias adds and pool ops not included)."""
        return 2 * self.macs

    @property
    def bias_adds(self) -> int:
        return self._sum("bias_adds")

    @property
    def pool_ops(self) -> int:
        return self._sum("pool_ops")

    @property
    def algorithm_mults(self) -> int:
        return self._sum("algorithm_mults")

    @property
    def forward_macs(self) -> int:
        return self._sum("macs", "forward")

    @property
    def backward_macs(self) -> int:
        return self._sum("macs", "backward")

    def by_module(self) -> dict[str, int]:
        """MACs per module name (forward and backward together)."""
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.name] = out.get(r.name, 0) + r.macs
        return out

    def __str__(self) -> str:
        head = ("name", "type", "pass", "input", "output", "params", "MACs", "bias adds", "pool ops",
                "algorithm", "alg. mults", "workspace B")
        body = [(r.name or "(root)", r.type, r.pass_[:3], _shape(r.input_shape), _shape(r.output_shape),
                 _n(r.params), _n(r.macs), _n(r.bias_adds), _n(r.pool_ops), r.algorithm,
                 _n(r.algorithm_mults), _n(r.workspace_bytes)) for r in self.rows]
        total = ("total", "", "", "", "", _n(self.params), _n(self.macs), _n(self.bias_adds), _n(self.pool_ops),
                 "", _n(self.algorithm_mults), "")
        widths = [max(len(str(row[i])) for row in [head, total, *body]) for i in range(len(head))]
        right = {5, 6, 7, 8, 10, 11}

        def line(row):
            return "  ".join(str(v).rjust(w) if i in right else str(v).ljust(w)
                             for i, (v, w) in enumerate(zip(row, widths))).rstrip()

        rule = "-" * len(line(head))
        summary = (f"params {self.params:,}   MACs {self.macs:,} ({_si(self.macs)}MAC)   "
                   f"FLOPs {self.flops:,} ({_si(self.flops)}FLOP)")
        if self.backward_macs:
            summary += f"   [forward {self.forward_macs:,} + backward {self.backward_macs:,} MACs]"
        summary += f"   bias adds {self.bias_adds:,}   pool ops {self.pool_ops:,}"
        units = ("units: MACs = multiply-accumulates; FLOPs = 2 x MACs; bias adds (one per output element of a "
                 "biased conv/linear) and pool ops (one comparison or add per pooling-window element) are "
                 "counted separately and not in MACs/FLOPs; alg. mults = multiplications the chosen algorithm "
                 "performs.")
        return "\n".join([line(head), rule, *map(line, body), rule, line(total), summary, units])


def _n(v: int) -> str:
    return f"{v:,}" if v else "-"


def _shape(s: tuple) -> str:
    return "x".join(map(str, s)) if s else "-"


def _si(v: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v} "


# --------------------------------------------------------------------------------------------------
# op rules: each returns a partly filled Row for one op call (None: not counted)
# --------------------------------------------------------------------------------------------------
def _bind(func, args, kwargs) -> dict:
    """The op's arguments by schema name (defaults filled)."""
    bound = {}
    for i, a in enumerate(func._schema.arguments):
        if i < len(args):
            bound[a.name] = args[i]
        elif a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        elif a.has_default_value():
            bound[a.name] = a.default_value
    return bound


def _first_tensor(out) -> Optional[torch.Tensor]:
    flat, _ = tree_flatten(out)
    return next((t for t in flat if isinstance(t, torch.Tensor)), None)


def _target_for(t: torch.Tensor) -> str:
    """The kernel target of a tensor; meta tensors (shape-only runs) count as the CPU's target."""
    from .backends import target_for

    return target_for(torch.empty(0) if t.device.type == "meta" else t)


def conv_geometry(op_name: str, a: dict, out: torch.Tensor) -> tuple[str, registry.ConvGeometry]:
    """The pass and :class:`~fastconv.registry.ConvGeometry` of a bound ``fastconv::conv*`` op call."""
    from .ops.conv import make_geometry

    ndim = int(op_name[4])
    geo = (a["stride"], a["padding"], a["padding_end"], a["dilation"])
    if op_name.endswith("_grad_input"):
        go, w = a["grad_output"], a["weight"]
        g = make_geometry(ndim, go.shape[0], w.shape[1] * a["groups"], w.shape[0], a["groups"], a["input_size"],
                          w.shape[2:], go.shape[2:], *geo, go.dtype, _target_for(go))
        return "grad_input", g
    if op_name.endswith("_grad_weight"):
        go, x = a["grad_output"], a["input"]
        g = make_geometry(ndim, x.shape[0], x.shape[1], go.shape[1], a["groups"], x.shape[2:], a["weight_size"],
                          go.shape[2:], *geo, x.dtype, _target_for(x))
        return "grad_weight", g
    x, w = a["input"], a["weight"]
    g = make_geometry(ndim, x.shape[0], x.shape[1], w.shape[0], a["groups"], x.shape[2:], w.shape[2:],
                      out.shape[2:], *geo, x.dtype, _target_for(x))
    return "forward", g


def _fastconv_conv(name: str, a: dict, out: torch.Tensor, backward: bool) -> Row:
    pass_, geom = conv_geometry(name, a, out)
    ndim = geom.ndim
    if pass_ == "grad_input":
        # Called in a forward pass this is a transposed convolution; its work follows its input, grad_output.
        op = f"conv{ndim}d_grad_input" if backward else f"conv_transpose{ndim}d"
        inputs, weights = a["grad_output"], [a["weight"]]
    elif pass_ == "grad_weight":
        op, inputs, weights = f"conv{ndim}d_grad_weight", a["grad_output"], []
    else:
        op, inputs = f"conv{ndim}d", a["input"]
        weights = [a["weight"]] + ([a["bias"]] if a["bias"] is not None else [])
    alg = registry.choose(a["algo"], geom, pass_, op)
    macs = geom.macs  # the same for the three passes of one convolution
    bias_adds = out.numel() if pass_ == "forward" and a.get("bias") is not None else 0
    row = Row("", "", op, "", tuple(inputs.shape), tuple(out.shape), macs=macs, bias_adds=bias_adds,
              algorithm=alg.name, algorithm_mults=round(alg.mult_ratio(geom) * macs),
              workspace_bytes=int(alg.workspace_bytes(geom)))
    row._weights = weights  # type: ignore[attr-defined]
    return row


def _aten_convolution(a: dict, out: torch.Tensor) -> Row:
    x, w = a["input"], a["weight"]
    ndim = x.dim() - 2
    # prod(w.shape[1:]) already holds the per-group channel count: groups need no separate factor
    if a["transposed"]:
        # weight (C_in, C_out/groups, *k): each input element meets C_out/groups * k weights
        macs = x.numel() * math.prod(w.shape[1:])
        op = f"conv_transpose{ndim}d"
    else:
        macs = out.numel() * math.prod(w.shape[1:])
        op = f"conv{ndim}d"
    bias = a.get("bias")
    row = Row("", "", op, "", tuple(x.shape), tuple(out.shape), macs=macs,
              bias_adds=out.numel() if bias is not None else 0, algorithm="torch", algorithm_mults=macs)
    row._weights = [w] + ([bias] if bias is not None else [])  # type: ignore[attr-defined]
    return row


def _aten_convolution_backward(a: dict, out) -> Row:
    go, x, w = a["grad_output"], a["input"], a["weight"]
    mask = a["output_mask"]
    if a["transposed"]:
        per_pass = x.numel() * math.prod(w.shape[1:])
    else:
        per_pass = go.numel() * math.prod(w.shape[1:])
    macs = per_pass * (int(bool(mask[0])) + int(bool(mask[1])))
    ndim = x.dim() - 2
    return Row("", "", f"conv{ndim}d_backward", "", tuple(go.shape), tuple(x.shape), macs=macs,
               algorithm="torch", algorithm_mults=macs)


def _aten_matmul(name: str, a: dict, out: torch.Tensor) -> Row:
    if name in ("mm", "addmm"):
        m1, m2 = (a["mat1"], a["mat2"]) if name == "addmm" else (a["self"], a["mat2"])
        macs = m1.shape[0] * m1.shape[1] * m2.shape[1]
    else:  # bmm, baddbmm
        m1, m2 = (a["batch1"], a["batch2"]) if name == "baddbmm" else (a["self"], a["mat2"])
        macs = m1.shape[0] * m1.shape[1] * m1.shape[2] * m2.shape[2]
    bias_adds = out.numel() if name in ("addmm", "baddbmm") else 0
    row = Row("", "", "linear" if name in ("mm", "addmm") else "matmul", "", tuple(m1.shape), tuple(out.shape),
              macs=macs, bias_adds=bias_adds, algorithm="torch", algorithm_mults=macs)
    # A Linear's weight reaches addmm/mm transposed (a view of the same storage): still its parameter.
    row._weights = [m2] + ([a["self"]] if name == "addmm" else [])  # type: ignore[attr-defined]
    return row


def _ints(v, n: int) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        v = tuple(int(i) for i in v)
        return v if len(v) == n else (v * n if len(v) == 1 else v)
    return (int(v),) * n


def _adaptive_window_sum(in_size: int, out_size: int) -> int:
    """Sum over outputs of the adaptive window length: start = floor(i*In/Out), end = ceil((i+1)*In/Out)."""
    return sum(-(-((i + 1) * in_size) // out_size) - (i * in_size) // out_size for i in range(out_size))


def _pool(ns: str, name: str, a: dict, out) -> Row:
    """Pooling ops of aten (``max_pool2d_with_indices``, ``_adaptive_avg_pool2d_backward``, ...) and fastconv
    (rank-generic ``max_pool``, ``avg_pool``, ...), read through their schemas' argument names."""
    y = _first_tensor(out)
    is_grad = name.endswith("_backward")
    kind = name.lstrip("_").replace("_with_indices", "").replace("_backward", "")
    if ns == "fastconv" and kind == "max_pool" and a.get("minimum"):
        kind = "min_pool"
    grad = a.get("grad_output")
    x = a.get("self", a.get("input"))
    if kind[-2:-1].isdigit() and kind.endswith("d"):
        nd = int(kind[-2])
    else:
        # fastconv's pool ops serve every rank: the size arguments say which
        sizes = a.get("kernel_size") or a.get("output_size") or a.get("input_size")
        t = grad if is_grad else x
        nd = len(sizes) if sizes else t.dim() - 2
        kind = f"{kind}{nd}d"
    src = grad if is_grad else x
    out_t = grad if is_grad else y
    if "unpool" in kind:
        # a scatter of the inputs into zeros: no comparisons, no adds
        return Row("", "", kind, "", tuple(src.shape), tuple(y.shape), algorithm=_pool_algorithm(ns))
    out_spatial = tuple(out_t.shape[-nd:])
    if isinstance(x, torch.Tensor):
        in_spatial = tuple(x.shape[-nd:])
    else:
        in_spatial = tuple(_ints(a["input_size"], nd)) if a.get("input_size") is not None else None
    out_elems = out_t.numel()
    planes = out_elems // max(1, math.prod(out_spatial))
    kernel = a.get("kernel_size")
    if "adaptive" in kind and in_spatial is not None:
        windows = planes * math.prod(_adaptive_window_sum(i, o) for i, o in zip(in_spatial, out_spatial))
    elif kernel:
        windows = out_elems * math.prod(_ints(kernel, nd))
    else:
        windows = out_elems
    # backward: max/min scatter each output gradient to its argmax (one add); avg spreads it over its window
    ops = out_elems if is_grad and ("max" in kind or "min" in kind) else windows
    return Row("", "", kind + ("_backward" if is_grad else ""), "", tuple(src.shape), tuple(y.shape),
               pool_ops=ops, algorithm=_pool_algorithm(ns))


def _pool_algorithm(ns: str) -> str:
    return "fastconv" if ns == "fastconv" else "torch"


def _fastconv_conv_transpose(name: str, a: dict, out: torch.Tensor) -> Row:
    from .ops.conv import make_geometry
    from .ops import transposed

    ndim = int(name[len("conv_transpose")])
    x, w, groups = a["input"], a["weight"], a["groups"]
    # the adjoint convolution (output -> input) whose grad_input pass this op runs, as the op builds it
    geom = make_geometry(ndim, x.shape[0], w.shape[1] * groups, w.shape[0], groups, out.shape[2:], w.shape[2:],
                         x.shape[2:], a["stride"], a["padding"], a["padding"], a["dilation"], x.dtype,
                         _target_for(x))
    macs = geom.macs  # = N * C_in * prod(I) * (C_out/groups) * prod(k): follows the input
    algo = a["algo"]
    refusal = transposed.patch_gemm_refusal(w.shape[2:], a["stride"], a["padding"], a["dilation"], geom.target)
    if algo == "patch_gemm" or (algo == "auto" and refusal is None):
        alg_name, mults, workspace = "patch_gemm", macs, 0
    else:
        alg = registry.choose(algo, geom, "grad_input", name)
        alg_name, mults = alg.name, round(alg.mult_ratio(geom) * macs)
        workspace = int(alg.workspace_bytes(geom))
    bias = a["bias"]
    row = Row("", "", name, "", tuple(x.shape), tuple(out.shape), macs=macs,
              bias_adds=out.numel() if bias is not None else 0, algorithm=alg_name, algorithm_mults=mults,
              workspace_bytes=workspace)
    row._weights = [w] + ([bias] if bias is not None else [])  # type: ignore[attr-defined]
    return row


def _fastconv_separable(a: dict, out: torch.Tensor) -> Row:
    """``fastconv::depthwise_separable_conv2d``: depthwise (groups = C) then 1x1 pointwise, one op."""
    from .ops import separable

    x, dw, pw = a["input"], a["depthwise_weight"], a["pointwise_weight"]
    n, k = out.shape[:2]
    positions = math.prod(out.shape[2:])
    m = dw.shape[0]
    depthwise = n * m * positions * math.prod(dw.shape[2:])  # one input channel per depthwise filter
    pointwise = n * k * positions * m
    macs = depthwise + pointwise
    bias_adds = (n * m * positions if a["depthwise_bias"] is not None else 0) \
        + (out.numel() if a["pointwise_bias"] is not None else 0)
    algo = separable.choose_algo(a["algo"], _target_for(x))
    row = Row("", "", "depthwise_separable_conv2d", "", tuple(x.shape), tuple(out.shape), macs=macs,
              bias_adds=bias_adds, algorithm=algo, algorithm_mults=macs)
    row._weights = [t for t in (dw, pw, a["depthwise_bias"], a["pointwise_bias"])  # type: ignore[attr-defined]
                    if t is not None]
    return row


def _param_key(t: torch.Tensor) -> tuple:
    # Views (a Linear weight's transpose) share storage and offset with the parameter.
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())


class _Counter(TorchDispatchMode):
    """Sees every op below autograd; turns the counted ones into rows for the innermost module."""

    def __init__(self, tracker: "_ModuleTracker"):
        super().__init__()
        self.tracker = tracker
        self.rows: list[Row] = []
        self.seen_params: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            row = self._row(func, args, kwargs, out)
        except Exception as exc:  # a wrong or missing count must not pass silently: name the op
            raise RuntimeError(f"fastconv.flops: could not count {func}: {exc}") from exc
        if row is not None:
            backward = torch._C._current_graph_task_id() != -1
            row.pass_ = "backward" if backward else "forward"
            module = self.tracker.innermost(backward)
            row.name, row.type = (module[0], module[1]) if module else ("(functional)", row.op)
            # Parameters are what the forward multiplies by; backward ops only meet activations and grads.
            row.params = 0 if backward else self._new_params(getattr(row, "_weights", []))
            self.rows.append(row)
        return out

    def _new_params(self, tensors) -> int:
        n = 0
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            key = _param_key(t)
            if key not in self.seen_params:
                self.seen_params.add(key)
                n += t.numel()
        return n

    def _row(self, func, args, kwargs, out) -> Optional[Row]:
        ns, name = func.namespace, func._schema.name.split("::")[-1]
        backward = torch._C._current_graph_task_id() != -1
        if ns == "fastconv" and name.startswith("conv") and name[4:5].isdigit():
            return _fastconv_conv(name, _bind(func, args, kwargs), out, backward)
        if ns == "fastconv" and name == "depthwise_separable_conv2d":
            return _fastconv_separable(_bind(func, args, kwargs), out)
        if ns == "fastconv" and name.startswith("conv_transpose"):
            return _fastconv_conv_transpose(name, _bind(func, args, kwargs), out)
        if ns == "fastconv" and "pool" in name:
            return _pool(ns, name, _bind(func, args, kwargs), out)
        if ns != "aten":
            return None
        if name in ("convolution", "_convolution"):
            return _aten_convolution(_bind(func, args, kwargs), out)
        if name == "convolution_backward":
            return _aten_convolution_backward(_bind(func, args, kwargs), out)
        if name in ("mm", "addmm", "bmm", "baddbmm"):
            return _aten_matmul(name, _bind(func, args, kwargs), out)
        if "pool" in name:
            return _pool(ns, name, _bind(func, args, kwargs), out)
        if name == "mean" and not backward:
            a = _bind(func, args, kwargs)
            x = a["self"]
            # adaptive_avg_pool to 1x1 is decomposed to mean over the spatial dims before we see it
            return Row("", "", "mean", "", tuple(x.shape), tuple(out.shape), pool_ops=x.numel(), algorithm="torch")
        return None


# --------------------------------------------------------------------------------------------------
# module attribution
# --------------------------------------------------------------------------------------------------
class _ModuleTracker:
    """Which modules are running, forward (pre/post hooks) and backward (gradient hooks).

    Backward entry of a module is marked when the gradients of its outputs are ready, its exit when the
    gradients of its inputs are; the innermost active module is the deepest one (a Sequential and its last
    child share an output tensor, so entry order alone cannot tell them apart).
    """

    def __init__(self, model: Optional[nn.Module]):
        self.names: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
        self.forward_stack: list[nn.Module] = []
        self.backward_active: list[nn.Module] = []
        self.handles: list = []
        self.grad_handles: list = []
        self.model = model

    def __enter__(self):
        if self.model is not None:
            for name, m in self.model.named_modules():
                self.names.setdefault(m, name)
                self.handles.append(m.register_forward_pre_hook(self._pre))
                self.handles.append(m.register_forward_hook(self._post))
        return self

    def __exit__(self, *exc):
        for h in self.handles + self.grad_handles:
            h.remove()
        self.handles.clear()
        self.grad_handles.clear()

    def _depth(self, m: nn.Module) -> int:
        name = self.names.get(m, "")
        return 0 if name == "" else name.count(".") + 1

    def innermost(self, backward: bool) -> Optional[tuple[str, str]]:
        active = self.backward_active if backward else self.forward_stack
        if not active:
            return None
        # deepest wins; among equals the latest entered
        best = max(reversed(range(len(active))), key=lambda i: (self._depth(active[i]), i))
        m = active[best]
        return self.names.get(m, ""), type(m).__name__

    @staticmethod
    def _grad_tensors(obj) -> list[torch.Tensor]:
        flat, _ = tree_flatten(obj)
        return [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad]

    def _pre(self, module, inputs):
        self.forward_stack.append(module)
        tensors = self._grad_tensors(inputs)
        if tensors:
            self.grad_handles.append(register_multi_grad_hook(tensors, lambda *_: self._leave_bw(module)))

    def _post(self, module, inputs, output):
        if self.forward_stack and self.forward_stack[-1] is module:
            self.forward_stack.pop()
        tensors = self._grad_tensors(output)
        if tensors:
            self.grad_handles.append(register_multi_grad_hook(tensors, lambda *_: self._enter_bw(module)))

    def _enter_bw(self, module):
        if not self.backward_active:
            # forget everything when this backward ends (a module whose inputs need no grad never leaves)
            torch.autograd.Variable._execution_engine.queue_callback(self.backward_active.clear)
        self.backward_active.append(module)

    def _leave_bw(self, module):
        for i in range(len(self.backward_active) - 1, -1, -1):
            if self.backward_active[i] is module:
                del self.backward_active[i]
                break


# --------------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------------
def count(model: Callable, *inputs: Any, backward: bool = False, **kwargs: Any) -> Report:
    """Run ``model(*inputs, **kwargs)`` once and count its work.

    Parameters
    ----------
    model : nn.Module or any callable
        Its torch and fastconv layers and functional calls are all counted.
    *inputs : tensors, e.g. one (N, C, H, W) image batch for a 2-D CNN
    backward : bool
        Also run ``sum(outputs).backward()`` and count the backward pass (rows with ``pass_ == "backward"``).
        Parameters get gradients as in training; inputs only if they require grad.

    Returns
    -------
    Report
        ``.macs``, ``.flops`` (= 2 x MACs), ``.bias_adds``, ``.pool_ops``, ``.params`` and ``.rows`` (one per
        counted op call). ``.params`` is ``sum(p.numel() for p in model.parameters())`` for a module, else the
        weights and biases the counted ops used. The model runs once as it is (a training-mode BatchNorm
        updates its statistics; with ``backward=True`` the parameters' ``.grad`` are left as computed). Meta
        tensors work (shapes only, no memory or arithmetic; algorithms are those the CPU would pick).

    >>> rep = fastconv.flops.count(nn.Conv2d(192, 32, 5, padding=2), torch.zeros(1, 192, 28, 28))
    >>> rep.macs
    120422400
    """
    module = model if isinstance(model, nn.Module) else None
    with _ModuleTracker(module) as tracker, _Counter(tracker) as counter:
        out = model(*inputs, **kwargs)
        if backward:
            flat = [t for t in tree_flatten(out)[0]
                    if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()]
            if not flat:
                raise ValueError("fastconv.flops.count(backward=True): the model's outputs do not require grad")
            torch.autograd.backward([t.sum() for t in flat])
    rows = counter.rows
    if module is not None:
        # Layers whose ops are not counted (BatchNorm, ...) still get a row so the params add up.
        for name, m in module.named_modules():
            own = sum(p.numel() for p in m.parameters(recurse=False) if _param_key(p) not in counter.seen_params)
            if own:
                rows.append(Row(name, type(m).__name__, "-", "forward", (), (), params=own))
        params = sum(p.numel() for p in module.parameters())
    else:
        params = sum(r.params for r in rows)
    for r in rows:
        r.flops = 2 * r.macs
        r.__dict__.pop("_weights", None)
    return Report(rows=rows, params=params)
