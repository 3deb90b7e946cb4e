"""``fastconv.optimize(model)``: an inference copy of a model with eval-mode BatchNorm folded into its convs,
and each conv whose output only feeds a ReLU/ReLU6 fused with it into one :class:`~fastconv.nn.ConvBiasAct`.

A BatchNorm in eval mode is an affine map per channel, ``y = (x - mean) / sqrt(var + eps) * gamma + beta``;
after a convolution it folds into the convolution's weight and bias (``w' = w * s``, ``b' = (b - mean) * s
+ beta`` with ``s = gamma / sqrt(var + eps)``), which removes a whole pass over the activations per
layer. The dataflow comes from ``torch.fx``: a BatchNorm is folded only when its input is the output of a
convolution that nothing else reads. The original model is left untouched.

After folding, a conv followed by a ReLU or ReLU6 (module, function or method, in place or not) is replaced by
a :class:`~fastconv.nn.ConvBiasAct` holding the conv's parameters, when the conv's output has no other reader:
on the CPU the bias add and the activation then run in one pass over the conv's output
(:mod:`fastconv.ops.fused`). The fused layer runs fastconv's kernels even where the conv was torch's.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import fx, nn

from .fused import ConvBiasAct

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _LeafTracer(fx.Tracer):
    """Keeps every torch and fastconv layer a single node (fastconv's modules live outside torch.nn)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("fastconv.nn") or super().is_leaf_module(m, qualname)


def _fold(conv: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` (eval mode, running statistics) into ``conv``'s weight and bias, in place."""
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
            1 / torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
        w = conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
        b = (conv.bias * scale if conv.bias is not None else 0) + shift
        conv.weight = nn.Parameter(w.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


def optimize(model: nn.Module, *, fuse_activations: bool = True) -> fx.GraphModule:
    """An inference copy of ``model`` with every eval-mode ``BatchNorm`` that follows a conv folded into it,
    and (``fuse_activations``) every conv followed only by a ReLU/ReLU6 fused into a
    :class:`~fastconv.nn.ConvBiasAct`.

    ``model`` must be traceable by ``torch.fx`` (torchvision's models and fastconv's zoo are) and is not
    modified. The copy is in eval mode; its outputs equal the original's in eval mode within float32
    rounding. Convs are folded and fused whether they are torch's or fastconv's layers, so ``optimize`` and
    :func:`fastconv.convert` compose in either order (a fused layer always runs fastconv's kernels).

    The result counts what it did: ``folded_batchnorms`` and ``fused_activations``.

    >>> fast = fastconv.optimize(fastconv.convert(torchvision.models.resnet50().eval()))
    """
    model = copy.deepcopy(model).eval()
    graph = _LeafTracer().trace(model)
    gm = fx.GraphModule(model, graph)
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), _NORMS):
            continue
        source = node.args[0] if node.args else None
        if not (isinstance(source, fx.Node) and source.op == "call_module"
                and isinstance(modules.get(source.target), _CONVS) and len(source.users) == 1):
            continue
        bn, conv = modules[node.target], modules[source.target]
        if bn.running_mean is None or bn.num_features != conv.out_channels:
            continue  # batch statistics only (track_running_stats=False): nothing fixed to fold
        _fold(conv, bn)
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        folded += 1
    fused = _fuse_activations(gm, modules) if fuse_activations else 0
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.folded_batchnorms = folded
    gm.fused_activations = fused
    return gm


def _plain_conv(m) -> bool:
    """A Conv1d/2d/3d (torch's, fastconv's, or a subclass that changes only its construction) with zero
    padding: what :class:`ConvBiasAct` computes exactly."""
    if not isinstance(m, _CONVS) or m.padding_mode != "zeros":
        return False
    cls = type(m)
    base = next(c for c in cls.__mro__ if c in _CONVS)
    # torch's forward, and torch's _conv_forward or fastconv's (its mixin calls fastconv's functional conv):
    # a subclass overriding either computes something else
    return cls.forward is base.forward and getattr(cls._conv_forward, "__module__", "").startswith(
        ("torch.nn.", "fastconv.nn."))


def _number(node: fx.Node, index: int, key: str, default):
    value = node.args[index] if len(node.args) > index else node.kwargs.get(key, default)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _clamp_activation(low, high) -> str | None:
    if low == 0 and high == 6:
        return "relu6"
    if low == 0 and high is None:
        return "relu"
    return None


_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_HARDTANH_FUNCTIONS = (F.hardtanh, torch._C._nn.hardtanh_, F.hardtanh_)


def _activation(node: fx.Node, modules: dict) -> str | None:
    """``"relu"`` / ``"relu6"`` when ``node`` applies that activation to its first argument, else None."""
    if node.op == "call_module":
        m = modules.get(node.target)
        if type(m) is nn.ReLU:
            return "relu"
        if type(m) in (nn.ReLU6, nn.Hardtanh):
            return _clamp_activation(m.min_val, m.max_val)
        return None
    if node.op == "call_function":
        if node.target in _RELU_FUNCTIONS:
            return "relu"
        if node.target is F.relu6:
            return "relu6"
        if node.target in _HARDTANH_FUNCTIONS:
            return _clamp_activation(_number(node, 1, "min_val", -1.0), _number(node, 2, "max_val", 1.0))
        if node.target in (torch.clamp, torch.clamp_):
            return _clamp_activation(_number(node, 1, "min", None), _number(node, 2, "max", None))
        return None
    if node.op == "call_method":
        if node.target in ("relu", "relu_"):
            return "relu"
        if node.target in ("clamp", "clamp_"):
            return _clamp_activation(_number(node, 1, "min", None), _number(node, 2, "max", None))
    return None


def _fuse_activations(gm: fx.GraphModule, modules: dict) -> int:
    """Replace each (conv -> ReLU/ReLU6) pair whose conv output has no other reader by a ConvBiasAct node."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fused = 0
    for node in list(gm.graph.nodes):
        source = node.args[0] if node.args else None
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1
                and calls.get(source.target) == 1 and _plain_conv(modules.get(source.target))):
            continue
        activation = _activation(node, modules)
        if activation is None or any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
            continue
        # the fused layer takes the conv's place (same name, same parameters); the conv's one call site
        # now computes act(conv(x)), and the activation node goes
        parent, _, name = source.target.rpartition(".")
        layer = ConvBiasAct.from_conv(modules[source.target], activation)
        setattr(gm.get_submodule(parent) if parent else gm, name, layer)
        modules[source.target] = layer  # not a conv any more: an activation after this one is not fused
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        fused += 1
    return fused
