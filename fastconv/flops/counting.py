"""Count the work of a model: MACs, FLOPs, bias adds, pooling operations, parameters and activation memory.

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
* **activation bytes** -- bytes of the new tensors the forward pass produces (a view or an in-place result
  shares its input's storage and adds nothing); **saved bytes** -- bytes autograd keeps for the backward pass
  of a training step (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded, each storage once.

:func:`count` runs the model once under a :class:`~torch.utils._python_dispatch.TorchDispatchMode`, so it
sees every aten op and every ``fastconv::`` op however it was reached -- a fastconv module, a torch module,
``torch.nn.functional.conv2d``, ``fastconv.functional.conv2d`` -- and attributes each op to the innermost
module running, as told by torch's :class:`torch.utils.module_tracker.ModuleTracker` (forward and backward).

For fastconv ops each row also names the algorithm ``algo`` picks for that pass and geometry and why
(:func:`decide`: the autotuner's recorded choice, else the registry's heuristic; counting never measures), the
multiplications that algorithm really executes (:mod:`fastconv.flops.executed`) and its workspace in bytes.
Torch-native ops show algorithm ``"torch"``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.module_tracker import ModuleTracker

from .. import registry
from . import executed

__all__ = ["count", "Row", "conv_macs", "conv_transpose_macs", "conv_geometry", "decide"]


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
    algorithm: str = ""       #: fastconv algorithm chosen for this pass and geometry, "torch" for aten ops
    algorithm_mults: int = 0  #: multiplications the chosen algorithm executes (fastconv.flops.executed)
    workspace_bytes: int = 0
    reason: str = ""          #: why that algorithm (requested, autotuned, heuristic, ...)

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["pass"] = d.pop("pass_")
        d["input_shape"], d["output_shape"] = list(self.input_shape), list(self.output_shape)
        return d


# --------------------------------------------------------------------------------------------------
# which algorithm, and why (never measures)
# --------------------------------------------------------------------------------------------------
def decide(algo: str, geom: registry.ConvGeometry, pass_: str, op: str = "conv"):
    """``(ConvAlgorithm, reason)`` that ``algo`` resolves to for ``geom`` and ``pass_``, without measuring:
    :func:`fastconv.registry.decide`'s answer (the one the op's own choice is read from)."""
    d = registry.decide(algo, geom, pass_, op)
    return d.algorithm, d.reason


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
    from ..backends import target_for

    return target_for(torch.empty(0) if t.device.type == "meta" else t)


def conv_geometry(op_name: str, a: dict, out: torch.Tensor) -> tuple[str, registry.ConvGeometry]:
    """The pass and :class:`~fastconv.registry.ConvGeometry` of a bound ``fastconv::conv*`` op call."""
    from ..ops.conv import make_geometry

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
    alg, reason = decide(a["algo"], geom, pass_, op)
    macs = geom.macs  # the same for the three passes of one convolution
    bias_adds = out.numel() if pass_ == "forward" and a.get("bias") is not None else 0
    row = Row("", "", op, "", tuple(inputs.shape), tuple(out.shape), macs=macs, bias_adds=bias_adds,
              algorithm=alg.name, algorithm_mults=executed.executed_multiplications(alg.name, geom, pass_, alg),
              workspace_bytes=executed.workspace_bytes(alg.name, geom, alg), reason=reason)
    row._weights = weights  # type: ignore[attr-defined]
    row._geometry = (geom, pass_)  # type: ignore[attr-defined]
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
        return Row("", "", kind, "", tuple(src.shape), tuple(y.shape), algorithm=_pool_algorithm(ns),
                   reason=_pool_reason(ns))
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
               pool_ops=ops, algorithm=_pool_algorithm(ns), reason=_pool_reason(ns))


def _pool_reason(ns: str) -> str:
    return "fastconv pooling op (one kernel per target)" if ns == "fastconv" else ""


def _pool_algorithm(ns: str) -> str:
    return "fastconv" if ns == "fastconv" else "torch"


def _fastconv_conv_transpose(name: str, a: dict, out: torch.Tensor) -> Row:
    from ..ops import transposed

    ndim = int(name[len("conv_transpose")])
    x, w, groups = a["input"], a["weight"], a["groups"]
    # the adjoint convolution (output -> input) this op's implementations see, as the op builds it
    geom = transposed.geometry(ndim, x.shape, w.shape, out.shape[2:], groups, a["stride"], a["padding"],
                               a["dilation"], x.dtype, _target_for(x))
    macs = geom.macs  # = N * C_in * prod(I) * (C_out/groups) * prod(k): follows the input
    d = registry.decide(a["algo"], geom, "forward", f"fastconv.{name}", transposed.FAMILY)
    adjoint = d.algorithm.adjoint
    if adjoint is not None:  # a conv algorithm's grad_input pass
        mults = executed.executed_multiplications(d.name, geom, "grad_input", adjoint)
        workspace = executed.workspace_bytes(d.name, geom, adjoint)
    else:  # a transposed-only implementation (patch_gemm): its forward is what EXECUTED describes
        mults = executed.executed_multiplications(d.name, geom)
        workspace = executed.workspace_bytes(d.name, geom, d.algorithm)
    bias = a["bias"]
    row = Row("", "", name, "", tuple(x.shape), tuple(out.shape), macs=macs,
              bias_adds=out.numel() if bias is not None else 0, algorithm=d.name, algorithm_mults=mults,
              workspace_bytes=workspace, reason=d.reason)
    row._weights = [w] + ([bias] if bias is not None else [])  # type: ignore[attr-defined]
    return row


def _fastconv_separable(a: dict, out: torch.Tensor) -> Row:
    """``fastconv::depthwise_separable_conv2d``: depthwise (groups = C) then 1x1 pointwise, one op."""
    from ..ops import separable

    x, dw, pw = a["input"], a["depthwise_weight"], a["pointwise_weight"]
    geom = separable.geometry(x.shape, dw.shape, pw.shape, out.shape[2:], a["stride"], a["padding"],
                              a["padding_end"], a["dilation"], x.dtype, _target_for(x))
    macs = geom.macs  # depthwise N*M*prod(out)*k (one input channel per filter) + pointwise N*K*prod(out)*M
    n, m, positions = out.shape[0], dw.shape[0], math.prod(out.shape[2:])
    bias_adds = (n * m * positions if a["depthwise_bias"] is not None else 0) \
        + (out.numel() if a["pointwise_bias"] is not None else 0)
    d = registry.decide(a["algo"], geom, "forward", f"fastconv.{separable.OP}", separable.FAMILY)
    row = Row("", "", "depthwise_separable_conv2d", "", tuple(x.shape), tuple(out.shape), macs=macs,
              bias_adds=bias_adds, algorithm=d.name, algorithm_mults=macs, workspace_bytes=d.workspace_bytes,
              reason=d.reason)
    row._weights = [t for t in (dw, pw, a["depthwise_bias"], a["pointwise_bias"])  # type: ignore[attr-defined]
                    if t is not None]
    return row


def _storage_key(t: torch.Tensor) -> Optional[int]:
    """Identity of a tensor's storage (views share it). Works on meta tensors, whose data_ptr is always 0,
    which made every equal-sized meta parameter look like the same one."""
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, AttributeError):  # sparse, nested, exotic subclasses
        return None


def _param_key(t: torch.Tensor) -> tuple:
    return (_storage_key(t), t.storage_offset(), t.numel())


class _Where:
    """Which module an op belongs to.

    Forward: the innermost module running, from :class:`torch.utils.module_tracker.ModuleTracker`'s
    ``parents`` (fully qualified names prefixed by the root's class name, plus ``"Global"``); the deepest
    name wins (a Sequential and its last child are both running).

    Backward: the tracker's ``parents`` are a set, and in a branching block (Inception's four branches end in
    one ``cat``) every branch is "running" at once, so it cannot tell whose gradient op runs. Instead each
    module's forward post hook tags the autograd nodes it created (walking back from its outputs to its
    inputs' nodes; inner modules tag first, so the innermost wins), and a backward op is attributed through
    ``torch._C._current_autograd_node()``; the tracker is the fallback for untagged nodes.
    """

    KEY = "fastconv.flops.module"

    def __init__(self, tracker: ModuleTracker, model: Optional[nn.Module]):
        self.tracker = tracker
        self.prefix = type(model).__name__ if model is not None else None
        self.types = {name: type(m).__name__ for name, m in model.named_modules()} if model is not None else {}
        self.names = {id(m): name for name, m in model.named_modules()} if model is not None else {}
        self.input_nodes: dict[int, list] = {}
        self.hooks: list = []

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self.hooks = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        self.hooks.clear()

    @staticmethod
    def _nodes(obj) -> list:
        return [t.grad_fn for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor) and t.grad_fn is not None]

    def _pre(self, module, args):
        if id(module) in self.names:
            self.input_nodes.setdefault(id(module), []).append(self._nodes(args))

    def _post(self, module, args, output):
        name = self.names.get(id(module))
        if name is None:
            return
        stack = self.input_nodes.get(id(module))
        stops = stack.pop() if stack else []
        stop_ids = {id(n) for n in stops}
        seen: set = set()
        todo = self._nodes(output)
        keep = []  # autograd wraps C++ nodes anew on each access: hold them so ids stay unique here
        while todo:
            node = todo.pop()
            keep.append(node)
            if node is None or id(node) in seen or id(node) in stop_ids or node in stops:
                continue
            seen.add(id(node))
            node.metadata.setdefault(self.KEY, name)
            todo.extend(n for n, _ in node.next_functions if n is not None)

    def name(self) -> Optional[str]:
        if torch._C._current_graph_task_id() != -1:
            node = torch._C._current_autograd_node()
            tag = node.metadata.get(self.KEY) if node is not None else None
            if tag is not None:
                return tag
        parents = [p for p in self.tracker.parents if p != "Global"]
        if not parents:
            return None
        fqn = max(parents, key=lambda p: (p.count("."), p))
        if self.prefix is not None:
            if fqn == self.prefix:
                return ""
            if fqn.startswith(self.prefix + "."):
                return fqn[len(self.prefix) + 1:]
        return fqn


class _Counter(TorchDispatchMode):
    """Sees every op below autograd; turns the counted ones into rows for the innermost module and tallies
    the bytes of new activations per module."""

    def __init__(self, where: _Where, known_storages: set):
        super().__init__()
        self.where = where
        self.rows: list[Row] = []
        self.seen_params: set = set()
        self.storages = known_storages        # storages not produced by the model (inputs, parameters)
        self.activation_bytes: dict[str, int] = {}
        self._keep: list = []                 # keep counted storages alive: their ids must not be reused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        backward = torch._C._current_graph_task_id() != -1
        where = self.where.name()
        try:
            row = self._row(func, args, kwargs, out)
        except Exception as exc:  # a wrong or missing count must not pass silently: name the op
            raise RuntimeError(f"fastconv.flops: could not count {func}: {exc}") from exc
        if not backward:
            self._new_activations(out, "(functional)" if where is None else where)
        if row is not None:
            row.pass_ = "backward" if backward else "forward"
            if where is None:
                row.name, row.type = "(functional)", row.op
            else:
                row.name, row.type = where, self.where.types.get(where, where.rsplit(".", 1)[-1])
            # Parameters are what the forward multiplies by; backward ops only meet activations and grads.
            row.params = 0 if backward else self._new_params(getattr(row, "_weights", []))
            self.rows.append(row)
        return out

    def _new_activations(self, out, where: str) -> None:
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = _storage_key(t)
            if key is None or key in self.storages:
                continue
            self.storages.add(key)
            self._keep.append(t.untyped_storage())
            self.activation_bytes[where] = self.activation_bytes.get(where, 0) + t.untyped_storage().nbytes()

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


class _Saved:
    """``saved_tensors_hooks`` that tally, per innermost module, the bytes autograd keeps for backward."""

    def __init__(self, where: _Where, params: set):
        self.where = where
        self.params = params
        self.seen: set = set()
        self.bytes: dict[str, int] = {}
        self._keep: list = []

    def pack(self, t: torch.Tensor):
        key = _storage_key(t)
        if key is not None and key not in self.params and key not in self.seen:
            self.seen.add(key)
            self._keep.append(t.untyped_storage())
            where = self.where.name()
            where = "(functional)" if where is None else where
            self.bytes[where] = self.bytes.get(where, 0) + t.untyped_storage().nbytes()
        return t

    @staticmethod
    def unpack(t):
        return t


# --------------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------------
def count(model: Callable, *inputs: Any, backward: bool = False, **kwargs: Any):
    """Run ``model(*inputs, **kwargs)`` once and count its work, per module and per op.

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
    fastconv.flops.Report
        ``.macs``, ``.flops`` (= 2 x MACs), ``.bias_adds``, ``.pool_ops``, ``.params`` (trainable and
        ``.frozen_params``), ``.activation_bytes``, ``.saved_bytes``; ``.root`` the module tree (per-module own
        counts and subtotals, ``.modules(depth)``), ``.rows`` one per counted op call; ``str(report)`` the tree
        table, ``report.as_dict()`` / ``to_json()`` / ``to_csv()``. The model runs once as it is (a
        training-mode BatchNorm updates its statistics; with ``backward=True`` the parameters' ``.grad`` are
        left as computed). Meta tensors work: shapes only, no memory, no arithmetic, and the autotuner is never
        run (algorithms are those ``auto`` would pick on the CPU: its recorded choice, else the heuristic).
        With real tensors, every activation stays alive until ``count`` returns (storages are told apart by
        identity), so its peak memory is the ``activation_bytes`` total: count on meta for big models.

    >>> rep = fastconv.flops.count(nn.Conv2d(192, 32, 5, padding=2), torch.zeros(1, 192, 28, 28))
    >>> rep.macs
    120422400
    """
    from .report import build_report

    module = model if isinstance(model, nn.Module) else None
    params = list(module.parameters()) if module is not None else []
    param_storages = {_storage_key(p) for p in params}
    known = set(param_storages) | {_storage_key(t) for t in tree_flatten((inputs, kwargs))[0]
                                   if isinstance(t, torch.Tensor)}
    calls: dict[str, list] = {}
    hooks = []
    if module is not None:
        for name, m in module.named_modules():
            def record(mod, args, output, name=name):
                calls.setdefault(name, []).append(output)
            hooks.append(m.register_forward_hook(record))
    tracker = ModuleTracker()
    where = _Where(tracker, module)
    saved = _Saved(where, param_storages)
    try:
        with tracker, where, torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack), \
                _Counter(where, known) as counter:
            out = model(*inputs, **kwargs)
            outputs = {name: [_shape_of(o) for o in outs] for name, outs in calls.items()}
            calls.clear()  # drop the references: the outputs may be large
            if backward:
                flat = [t for t in tree_flatten(out)[0]
                        if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()]
                if not flat:
                    raise ValueError("fastconv.flops.count(backward=True): the model's outputs do not require grad")
                torch.autograd.backward([t.sum() for t in flat])
    finally:
        for h in hooks:
            h.remove()
    rows = counter.rows
    for r in rows:
        r.flops = 2 * r.macs
        r.__dict__.pop("_weights", None)
    return build_report(module, rows, outputs, counter.activation_bytes, saved.bytes)


def _shape_of(o) -> tuple:
    t = next((t for t in tree_flatten(o)[0] if isinstance(t, torch.Tensor)), None)
    return tuple(t.shape) if t is not None else ()
