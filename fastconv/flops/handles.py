"""Make fvcore, ptflops and thop count fastconv's ops and modules (they count them as zero otherwise).

fvcore traces the model with ``torch.jit.trace`` and sees ``fastconv::conv2d`` and friends as unsupported
ops; ptflops and thop hook modules by *exact* type, so ``fastconv.nn.Conv2d`` (a subclass of torch's) is
skipped silently. The helpers below give each tool what it needs, in that tool's own units:

* :func:`fvcore_handles` -- ``FlopCountAnalysis(model, x).set_op_handle(**fastconv.flops.fvcore_handles())``.
  fvcore reports one "flop" per multiply-accumulate (its convention), so the conv handles return MACs, bias
  not included, exactly fastconv's MACs. Pooling follows fvcore's treatment of torch's pools: max/min pools
  are 0 (fvcore ignores ``aten::max_pool*``), average pools one per input element (as its
  ``adaptive_avg_pool2d`` handle).
* :func:`ptflops_hooks` -- ``get_model_complexity_info(model, res, backend="pytorch",
  custom_modules_hooks=fastconv.flops.ptflops_hooks())``: ptflops's own hook for the torch class each fastconv
  module derives from (its MACs include the bias adds: 120.45M on the Inception 5x5 layer).
* :func:`thop_ops` -- ``thop.profile(model, inputs=(x,), custom_ops=fastconv.flops.thop_ops())``: thop's own
  hooks (``count_convNd`` etc.) for the fastconv classes.
"""
from __future__ import annotations

import math

__all__ = ["fvcore_handles", "ptflops_hooks", "thop_ops"]


def _shape(value) -> list:
    t = value.type()
    return list(t.sizes()) if hasattr(t, "sizes") and t.sizes() is not None else []


def _conv(inputs, outputs) -> int:
    # input (N, C, *S), weight (K, C/groups, *k) -> out (N, K, *O): every output meets C/groups * k weights
    return math.prod(_shape(outputs[0])) * math.prod(_shape(inputs[1])[1:])


def _grad_input(inputs, outputs) -> int:
    # grad_output (N, K, *O), weight (K, C/groups, *k): the work follows grad_output (a transposed conv)
    return math.prod(_shape(inputs[0])) * math.prod(_shape(inputs[1])[1:])


def _grad_weight(inputs, outputs) -> int:
    # grad_output (N, K, *O) -> grad weight (K, C/groups, *k)
    return math.prod(_shape(inputs[0])) * math.prod(_shape(outputs[0])[1:])


def _conv_transpose(inputs, outputs) -> int:
    # input (N, C_in, *I), weight (C_in, C_out/groups, *k): every input element meets C_out/groups * k
    return math.prod(_shape(inputs[0])) * math.prod(_shape(inputs[1])[1:])


def _separable(inputs, outputs) -> int:
    # depthwise (M, 1, *k) on M channels at the output positions, then pointwise (K, M, 1, 1)
    out = _shape(outputs[0])
    dw, pw = _shape(inputs[1]), _shape(inputs[2])
    positions = out[0] * math.prod(out[2:])
    return positions * dw[0] * math.prod(dw[2:]) + positions * out[1] * pw[1]


def _input_elements(inputs, outputs) -> int:
    return math.prod(_shape(inputs[0]))


def _zero(inputs, outputs) -> int:
    return 0


def fvcore_handles() -> dict:
    """``{"fastconv::conv2d": handle, ...}`` for ``FlopCountAnalysis.set_op_handle(**handles)``: every
    fastconv op, counted in fvcore's unit (one per multiply-accumulate)."""
    handles = {}
    for d in (1, 2, 3):
        handles[f"fastconv::conv{d}d"] = _conv
        handles[f"fastconv::conv{d}d_bias_act"] = _conv  # a conv with its bias and activation fused
        handles[f"fastconv::conv{d}d_grad_input"] = _grad_input
        handles[f"fastconv::conv{d}d_grad_weight"] = _grad_weight
        handles[f"fastconv::conv_transpose{d}d"] = _conv_transpose
    handles["fastconv::depthwise_separable_conv2d"] = _separable
    for op in ("avg_pool", "adaptive_avg_pool", "avg_pool_backward", "adaptive_avg_pool_backward"):
        handles[f"fastconv::{op}"] = _input_elements
    for op in ("max_pool", "adaptive_max_pool", "max_pool_backward", "max_unpool", "max_unpool_backward"):
        handles[f"fastconv::{op}"] = _zero
    return handles


def _fastconv_classes():
    """(fastconv.nn class, the torch.nn class it derives from) for every fastconv module with one."""
    from torch import nn

    from .. import nn as fnn

    pairs = []
    for name in dir(fnn):
        cls = getattr(fnn, name)
        base = getattr(nn, name, None)
        if isinstance(cls, type) and isinstance(base, type) and issubclass(cls, base) and cls is not base:
            pairs.append((cls, base))
    return pairs


def ptflops_hooks() -> dict:
    """``{fastconv.nn class: ptflops hook}`` for ``get_model_complexity_info(..., backend="pytorch",
    custom_modules_hooks=...)``: ptflops's hook of the torch class each fastconv module derives from, plus
    the depthwise-separable block. Raises ImportError when ptflops is not installed."""
    from ptflops.pytorch_ops import MODULES_MAPPING

    from .. import nn as fnn

    hooks = {cls: MODULES_MAPPING[base] for cls, base in _fastconv_classes() if base in MODULES_MAPPING}

    def separable_hook(module, inputs, output):
        # same convention as ptflops's conv hook: MACs plus one add per output element of each biased conv
        out = output.shape
        positions = out[0] * math.prod(out[2:])
        dw, pw = module.depthwise.weight, module.pointwise.weight  # one fused op: the children never run
        macs = positions * dw.shape[0] * math.prod(dw.shape[2:]) + positions * out[1] * pw.shape[1]
        biases = sum(positions * b.numel() for b in (module.depthwise.bias, module.pointwise.bias)
                     if b is not None)
        module.__flops__ += int(macs + biases)

    hooks[fnn.DepthwiseSeparableConv2d] = separable_hook
    return hooks


def thop_ops() -> dict:
    """``{fastconv.nn class: thop counter}`` for ``thop.profile(..., custom_ops=...)``: thop's own counters of
    the torch class each fastconv module derives from. Raises ImportError when thop is not installed."""
    import torch
    from thop.profile import register_hooks

    from .. import nn as fnn

    ops = {cls: register_hooks[base] for cls, base in _fastconv_classes()
           if register_hooks.get(base) is not None}

    def separable(module, inputs, output):
        out = output.shape
        positions = out[0] * math.prod(out[2:])
        dw, pw = module.depthwise.weight, module.pointwise.weight  # one fused op: the children never run
        macs = positions * dw.shape[0] * math.prod(dw.shape[2:]) + positions * out[1] * pw.shape[1]
        module.total_ops += torch.DoubleTensor([int(macs)])

    ops[fnn.DepthwiseSeparableConv2d] = separable
    return ops
