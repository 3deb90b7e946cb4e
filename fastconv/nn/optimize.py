"""``fastconv.optimize(model)``: an inference copy of a model with eval-mode BatchNorm folded into its convs.

A BatchNorm in eval mode is an affine map per channel, ``y = (x - mean) / sqrt(var + eps) * gamma + beta``;
after a convolution it folds into the convolution's weight and bias (``w' = w * s``, ``b' = (b - mean) * s
+ beta`` with ``s = gamma / sqrt(var + eps)``), which removes a whole pass over the activations per
layer. The dataflow comes from ``torch.fx``: a BatchNorm is folded only when its input is the output of a
convolution that nothing else reads. The original model is left untouched.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

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


def optimize(model: nn.Module) -> fx.GraphModule:
    """An inference copy of ``model`` with every eval-mode ``BatchNorm`` that follows a conv folded into it.

    ``model`` must be traceable by ``torch.fx`` (torchvision's models and fastconv's zoo are) and is not
    modified. The copy is in eval mode; its outputs equal the original's in eval mode within float32
    rounding. Convs are folded whether they are torch's or fastconv's layers, so ``optimize`` and
    :func:`fastconv.convert` compose in either order.

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
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.folded_batchnorms = folded
    return gm
