"""Forward-mode derivatives (jvp) of fastconv's ops, for torch.func.jvp / jacfwd / hessian and forward_ad.

Every op is linear or bilinear in its tensor arguments, so its jvp is made of the op itself:

* convolution, its input and weight gradients, transposed convolution -- bilinear in their two tensors:
  ``d op(a, b) = op(da, b) + op(a, db)`` (+ the bias tangent broadcast over the output);
* pooling backward, unpooling, average pooling -- linear in their first tensor: ``d op(x, ...) = op(dx, ...)``;
* max pooling -- a selection: the values' tangent is the input tangent gathered at the indices.

The separable conv (trilinear with two biases) has no rule: it raises, naming the op.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import torch
from torch import Tensor


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else a if b is None else a + b


def _bilinear(op, primals, tangents, output, *, bias_index: Optional[int] = None):
    a, b, *rest = primals
    da, db = tangents[0], tangents[1]
    if bias_index is not None:
        rest = [None] + rest[1:]  # the bias term is added once, below
    out = None
    if da is not None:
        out = op(da, b, *rest)
    if db is not None:
        out = _add(out, op(a, db, *rest))
    if bias_index is not None and tangents[bias_index] is not None:
        shape = (1, -1) + (1,) * (output.dim() - 2)
        out = _add(out, tangents[bias_index].reshape(shape).expand_as(output))
    return torch.zeros_like(output) if out is None else out


def _linear_first(op, primals, tangents, output):
    if tangents[0] is None:
        return tuple(torch.zeros_like(o) for o in output) if isinstance(output, tuple) else torch.zeros_like(output)
    return op(tangents[0], *primals[1:])


def _selection(op, primals, tangents, output):
    values, indices = output
    dx = tangents[0]
    if dx is None:
        return torch.zeros_like(values), None
    gathered = dx.flatten(2).gather(2, indices.flatten(2)).reshape(values.shape)
    return gathered, None


def rule(name: str) -> Optional[Callable]:
    """The jvp of op ``name`` as ``f(op, primals, tangents, output)``, or None where there is none."""
    if re.fullmatch(r"conv[123]d|conv_transpose[123]d", name):
        return lambda op, p, t, out: _bilinear(op, p, t, out, bias_index=2)
    if re.fullmatch(r"conv[123]d_grad_(input|weight)", name):
        return _bilinear
    if name in ("max_pool", "adaptive_max_pool"):
        return _selection
    if name in ("avg_pool", "adaptive_avg_pool", "avg_pool_backward", "adaptive_avg_pool_backward",
                "max_pool_backward", "max_unpool", "max_unpool_backward"):
        return _linear_first
    return None
