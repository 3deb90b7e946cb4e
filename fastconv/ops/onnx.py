"""ONNX translations of fastconv's forward ops to the standard operators (Conv, ConvTranspose, MaxPool,
AveragePool, GlobalAveragePool, GlobalMaxPool; Relu/Clip after a fused conv), for ``torch.onnx.export`` (the
dynamo exporter, torch >= 2.5).

``torch.onnx.export`` knows aten ops only; a converted model holds ``fastconv::*`` custom ops, and without a
translation the export fails ("unrecognized namespace fastconv::conv2d"). Two ways to give it one:

* per call: ``torch.onnx.export(model, args, custom_translation_table=translation_table())``, or
  :func:`export`, which passes the table for you;
* for the process: :func:`register` adds the translations to the exporter's own op table (a private torch
  API; it returns False if this torch has none), after which a plain ``torch.onnx.export`` works.

The translations need ``onnxscript`` (the exporter needs it too); it is imported only when one of these
functions is called, never by ``import fastconv``. Only the forward ops are translated: an exported model is
for inference. What ONNX cannot express (adaptive pooling whose output size does not divide the input size,
``divisor_override`` with ``ceil_mode``) is refused when exporting, with the op's name.

Index convention: torch's max-pool indices count within each (n, c) plane, ONNX's MaxPool indices over the
whole NCHW tensor; the translation subtracts each plane's offset, as the exporter does for aten's max_pool.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

_REGISTERED = False


def _opset():
    from onnxscript import opset18

    return opset18


def _plane_indices(op, x, flat_indices, ndim: int):
    """ONNX MaxPool's whole-tensor flat indices -> torch's per-plane ones (subtract each plane's first index)."""
    _, first = op.MaxPool(x, kernel_shape=[1] * ndim, strides=[1] * ndim)
    spatial_axes = list(range(2, 2 + ndim))
    offset = op.Slice(first, op.Constant(value_ints=[0] * ndim), op.Constant(value_ints=[1] * ndim),
                      op.Constant(value_ints=spatial_axes))
    return op.Sub(flat_indices, offset)


def _pads(padding, padding_end=None) -> list[int]:
    return [int(p) for p in padding] + [int(p) for p in (padding if padding_end is None else padding_end)]


def conv(input, weight, bias=None, stride=(1,), padding=(0,), padding_end=(0,), dilation=(1,), groups: int = 1,
         algo: str = "auto"):
    """``fastconv::conv{1,2,3}d`` -> Conv (asymmetric padding as ONNX's begin/end pads)."""
    op = _opset()
    args = (input, weight) if bias is None else (input, weight, bias)
    return op.Conv(*args, strides=[int(s) for s in stride], pads=_pads(padding, padding_end),
                   dilations=[int(d) for d in dilation], group=int(groups))


def conv_bias_act(input, weight, bias=None, stride=(1,), padding=(0,), padding_end=(0,), dilation=(1,),
                  groups: int = 1, algo: str = "auto", activation: str = "relu"):
    """``fastconv::conv{1,2,3}d_bias_act`` (what ``fastconv.optimize`` fuses) -> Conv, then Relu or Clip(0, 6)."""
    op = _opset()
    y = conv(input, weight, bias, stride, padding, padding_end, dilation, groups)
    if activation == "relu":
        return op.Relu(y)
    if activation == "relu6":
        return op.Clip(y, op.CastLike(op.Constant(value_float=0.0), y), op.CastLike(op.Constant(value_float=6.0), y))
    return y


def conv_transpose(input, weight, bias=None, stride=(1,), padding=(0,), output_padding=(0,), dilation=(1,),
                   groups: int = 1, algo: str = "auto"):
    """``fastconv::conv_transpose{1,2,3}d`` -> ConvTranspose (weight (C_in, C_out/groups, *k), as torch)."""
    op = _opset()
    args = (input, weight) if bias is None else (input, weight, bias)
    return op.ConvTranspose(*args, strides=[int(s) for s in stride], pads=_pads(padding),
                            output_padding=[int(p) for p in output_padding], dilations=[int(d) for d in dilation],
                            group=int(groups))


def separable(input, depthwise_weight, pointwise_weight, depthwise_bias=None, pointwise_bias=None, stride=(1, 1),
              padding=(0, 0), padding_end=(0, 0), dilation=(1, 1), algo: str = "auto"):
    """``fastconv::depthwise_separable_conv2d`` -> a depthwise Conv (group = C) and a 1x1 Conv."""
    op = _opset()
    channels = input.shape[1] if input.shape is not None else None
    if not isinstance(channels, int):
        raise ValueError("fastconv.depthwise_separable_conv2d: ONNX export needs a static channel count")
    depthwise = conv(input, depthwise_weight, depthwise_bias, stride, padding, padding_end, dilation, channels)
    args = (depthwise, pointwise_weight) if pointwise_bias is None else (depthwise, pointwise_weight, pointwise_bias)
    return op.Conv(*args, strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1)


def max_pool(input, kernel_size, stride, padding, dilation, ceil_mode: bool = False, minimum: bool = False):
    """``fastconv::max_pool`` -> MaxPool (values and torch's per-plane indices); min pooling as -MaxPool(-x)."""
    op = _opset()
    ndim = len(kernel_size)
    x = op.Neg(input) if minimum else input
    values, flat = op.MaxPool(x, kernel_shape=[int(k) for k in kernel_size], strides=[int(s) for s in stride],
                              pads=_pads(padding), dilations=[int(d) for d in dilation], ceil_mode=int(ceil_mode))
    return (op.Neg(values) if minimum else values), _plane_indices(op, x, flat, ndim)


def avg_pool(input, kernel_size, stride, padding, ceil_mode: bool = False, count_include_pad: bool = True,
             divisor_override: int = 0):
    """``fastconv::avg_pool`` -> AveragePool (a divisor override rescales the padded-window average)."""
    op = _opset()
    if divisor_override and ceil_mode:
        raise ValueError("fastconv.avg_pool: divisor_override with ceil_mode has no ONNX AveragePool equivalent "
                         "(the clipped last window's sum is not recoverable); export with ceil_mode=False")
    y = op.AveragePool(input, kernel_shape=[int(k) for k in kernel_size], strides=[int(s) for s in stride],
                       pads=_pads(padding), ceil_mode=int(ceil_mode),
                       count_include_pad=int(bool(count_include_pad) or bool(divisor_override)))
    if divisor_override:
        scale = math.prod(int(k) for k in kernel_size) / float(divisor_override)
        y = op.Mul(y, op.CastLike(op.Constant(value_float=scale), y))
    return y


def _adaptive_window(name: str, input, output_size) -> Optional[list[int]]:
    """The kernel (= stride) of the plain pooling equal to adaptive pooling, or None for global pooling."""
    spatial = list(input.shape[2:]) if input.shape is not None else []
    if all(int(o) == 1 for o in output_size):
        return None
    if len(spatial) != len(output_size) or not all(isinstance(s, int) for s in spatial):
        raise ValueError(f"fastconv.{name}: ONNX export of adaptive pooling needs static spatial sizes")
    if any(s % int(o) for s, o in zip(spatial, output_size)):
        raise ValueError(f"fastconv.{name}: ONNX has no adaptive pooling; output_size={list(output_size)} must "
                         f"divide the input's spatial size {spatial} (or be all ones) to export as a plain pooling")
    return [s // int(o) for s, o in zip(spatial, output_size)]


def adaptive_avg_pool(input, output_size):
    """``fastconv::adaptive_avg_pool`` -> GlobalAveragePool, or AveragePool when the output size divides."""
    op = _opset()
    window = _adaptive_window("adaptive_avg_pool", input, output_size)
    if window is None:
        return op.GlobalAveragePool(input)
    return op.AveragePool(input, kernel_shape=window, strides=window)


def adaptive_max_pool(input, output_size):
    """``fastconv::adaptive_max_pool`` -> MaxPool with kernel = stride = input / output (indices per plane)."""
    op = _opset()
    window = _adaptive_window("adaptive_max_pool", input, output_size)
    if window is None:
        window = [int(s) for s in input.shape[2:]]
    values, flat = op.MaxPool(input, kernel_shape=window, strides=window)
    return values, _plane_indices(op, input, flat, len(window))


def max_unpool(input, indices, output_size):
    """``fastconv::max_unpool`` -> ScatterElements into zeros along the flattened plane (torch's indices)."""
    op = _opset()
    n_c = op.Slice(op.Shape(input), op.Constant(value_ints=[0]), op.Constant(value_ints=[2]))
    flat_shape = op.Concat(n_c, op.Constant(value_ints=[-1]), axis=0)
    plane = op.Constant(value_ints=[math.prod(int(o) for o in output_size)])
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), input), op.Concat(n_c, plane, axis=0))
    y = op.ScatterElements(zeros, op.Reshape(indices, flat_shape), op.Reshape(input, flat_shape), axis=2)
    return op.Reshape(y, op.Concat(n_c, op.Constant(value_ints=[int(o) for o in output_size]), axis=0))


def translation_table() -> dict[Any, Callable]:
    """``{torch.ops.fastconv.<op>.default: translation}`` for ``torch.onnx.export(custom_translation_table=)``."""
    ops = torch.ops.fastconv
    table: dict[Any, Callable] = {}
    for d in (1, 2, 3):
        table[getattr(ops, f"conv{d}d").default] = conv
        table[getattr(ops, f"conv{d}d_bias_act").default] = conv_bias_act
        table[getattr(ops, f"conv_transpose{d}d").default] = conv_transpose
    table.update({ops.depthwise_separable_conv2d.default: separable, ops.max_pool.default: max_pool,
                  ops.avg_pool.default: avg_pool, ops.adaptive_avg_pool.default: adaptive_avg_pool,
                  ops.adaptive_max_pool.default: adaptive_max_pool, ops.max_unpool.default: max_unpool})
    return table


def export(model: torch.nn.Module, args: tuple, f=None, **kwargs):
    """``torch.onnx.export`` with fastconv's translations added to ``custom_translation_table`` (a table passed
    in ``kwargs`` wins for the ops it names). Returns what ``torch.onnx.export`` returns (an ONNXProgram)."""
    table = {**translation_table(), **(kwargs.pop("custom_translation_table", None) or {})}
    return torch.onnx.export(model, args, f, custom_translation_table=table, dynamo=True, **kwargs)


def register() -> bool:
    """Add the translations to the exporter's built-in table, so a plain ``torch.onnx.export`` finds them.

    Uses a private torch API (``torch.onnx._internal.exporter._torchlib._torchlib_registry.onnx_impl``, how
    torch registers its own aten translations); returns False, registering nothing, where it is missing.
    Idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        from torch.onnx._internal.exporter._torchlib._torchlib_registry import onnx_impl
    except ImportError:
        return False
    for target, fn in translation_table().items():
        onnx_impl(target, trace_only=True)(fn)
    _REGISTERED = True
    return True
