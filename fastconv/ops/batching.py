"""vmap rules for fastconv's ops: a batch of calls becomes one call, not a Python loop.

Without a rule ``torch.vmap`` runs an op once per batch element (functorch's fallback, with a "performance drop"
warning). Per-sample gradients (``vmap(grad(loss))``, Opacus-style training) call every forward and gradient op
under vmap, so each layer would run B times. The rules:

* only activations batched (the usual case): fold the vmap dim into the op's batch dim N, one call;
* weights batched too (per-sample weights, and the weight gradient of per-sample gradients, where both
  grad_output and input carry the vmap dim): one grouped call with ``groups * B`` groups -- sample b's channels
  are group block b, so a (B, N, C, *S) input becomes (N, B*C, *S) and a (B, K, C/g, *k) weight (B*K, C/g, *k);
* pooling and unpooling work per (n, c) plane: fold the vmap dim into N.

``depthwise_separable_conv2d`` with batched weights falls back to a loop of single calls (rare under vmap).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _front(t: Optional[Tensor], dim: Optional[int], batch: int) -> Optional[Tensor]:
    """``t`` with its vmap dim first; an unbatched tensor expanded (a view) to ``batch``."""
    if t is None:
        return None
    if dim is None:
        return t.unsqueeze(0).expand(batch, *t.shape)
    return t.movedim(dim, 0)


def _fold(t: Tensor) -> Tensor:
    """(B, N, ...) -> (B*N, ...)."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _to_groups(t: Tensor) -> Tensor:
    """(B, N, C, *S) -> (N, B*C, *S): sample b's channels become channel block b."""
    return t.movedim(0, 1).reshape(t.shape[1], t.shape[0] * t.shape[2], *t.shape[3:])


def _from_groups(y: Tensor, batch: int) -> Tensor:
    """(N, B*K, *O) -> (N, B, K, *O) (vmap dim 1, no copy)."""
    return y.reshape(y.shape[0], batch, y.shape[1] // batch, *y.shape[2:])


def _weights(t: Optional[Tensor], dim, batch) -> Optional[Tensor]:
    """(B, K, ...) -> (B*K, ...) for a weight or bias batched per sample."""
    t = _front(t, dim, batch)
    return None if t is None else t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _conv_rule(op):
    def rule(info, in_dims, input, weight, bias, stride, padding, padding_end, dilation, groups, algo):
        B = info.batch_size
        xd, wd, bd = in_dims[:3]
        if wd is None and bd is None:
            x = _front(input, xd, B)
            y = op(_fold(x), weight, bias, stride, padding, padding_end, dilation, groups, algo)
            return y.reshape(B, x.shape[1], *y.shape[1:]), 0
        y = op(_to_groups(_front(input, xd, B)), _weights(weight, wd, B), _weights(bias, bd, B), stride, padding,
               padding_end, dilation, groups * B, algo)
        return _from_groups(y, B), 1
    return rule


def _grad_input_rule(op):
    def rule(info, in_dims, grad_output, weight, input_size, stride, padding, padding_end, dilation, groups, algo):
        B = info.batch_size
        gd, wd = in_dims[:2]
        if wd is None:
            g = _front(grad_output, gd, B)
            y = op(_fold(g), weight, input_size, stride, padding, padding_end, dilation, groups, algo)
            return y.reshape(B, g.shape[1], *y.shape[1:]), 0
        y = op(_to_groups(_front(grad_output, gd, B)), _weights(weight, wd, B), input_size, stride, padding,
               padding_end, dilation, groups * B, algo)
        return _from_groups(y, B), 1
    return rule


def _grad_weight_rule(op):
    def rule(info, in_dims, grad_output, input, weight_size, stride, padding, padding_end, dilation, groups, algo):
        # one weight gradient per sample: sample b's (grad_output, input) pair is group block b
        B = info.batch_size
        gd, xd = in_dims[:2]
        y = op(_to_groups(_front(grad_output, gd, B)), _to_groups(_front(input, xd, B)), weight_size, stride,
               padding, padding_end, dilation, groups * B, algo)
        return y.reshape(B, y.shape[0] // B, *y.shape[1:]), 0
    return rule


def _transpose_rule(op):
    def rule(info, in_dims, input, weight, bias, stride, padding, output_padding, dilation, groups, algo):
        B = info.batch_size
        xd, wd, bd = in_dims[:3]
        if wd is None and bd is None:
            x = _front(input, xd, B)
            y = op(_fold(x), weight, bias, stride, padding, output_padding, dilation, groups, algo)
            return y.reshape(B, x.shape[1], *y.shape[1:]), 0
        y = op(_to_groups(_front(input, xd, B)), _weights(weight, wd, B), _weights(bias, bd, B), stride, padding,
               output_padding, dilation, groups * B, algo)
        return _from_groups(y, B), 1
    return rule


def _separable_rule(op):
    def rule(info, in_dims, input, dw, pw, db, pb, stride, padding, padding_end, dilation, algo):
        B = info.batch_size
        if any(d is not None for d in in_dims[1:5]):
            # per-sample weights: a loop of single calls (the fused kernel has no grouped form)
            parts = [_front(t, d, B) for t, d in zip((input, dw, pw, db, pb), in_dims[:5])]
            outs = [op(*[None if p is None else p[b] for p in parts], stride, padding, padding_end, dilation, algo)
                    for b in range(B)]
            return torch.stack(outs), 0
        x = _front(input, in_dims[0], B)
        y = op(_fold(x), dw, pw, db, pb, stride, padding, padding_end, dilation, algo)
        return y.reshape(B, x.shape[1], *y.shape[1:]), 0
    return rule


def _plane_rule(op, n_tensors: int):
    """Per-plane ops: the first ``n_tensors`` arguments are (N, C, ...) tensors; fold the vmap dim into N."""
    def rule(info, in_dims, *args):
        B = info.batch_size
        tensors = [_front(t, d, B) for t, d in zip(args[:n_tensors], in_dims[:n_tensors])]
        N = tensors[0].shape[1]
        out = op(*[_fold(t) for t in tensors], *args[n_tensors:])
        if isinstance(out, tuple):
            return tuple(y.reshape(B, N, *y.shape[1:]) for y in out), (0,) * len(out)
        return out.reshape(B, N, *out.shape[1:]), 0
    return rule


#: op name -> number of leading per-plane tensor arguments
PLANE_OPS = {"max_pool": 1, "max_pool_backward": 2, "max_unpool": 2, "max_unpool_backward": 2,
             "adaptive_max_pool": 1, "avg_pool": 1, "avg_pool_backward": 1, "adaptive_avg_pool": 1,
             "adaptive_avg_pool_backward": 1}


def register() -> None:
    """Register every rule (on the ops' custom-op definitions)."""
    ops = torch.ops.fastconv
    for d in (1, 2, 3):
        for name, make in ((f"conv{d}d", _conv_rule), (f"conv{d}d_grad_input", _grad_input_rule),
                           (f"conv{d}d_grad_weight", _grad_weight_rule), (f"conv_transpose{d}d", _transpose_rule)):
            op = getattr(ops, name).default
            torch.library.register_vmap(op, make(op))
    op = ops.depthwise_separable_conv2d.default
    torch.library.register_vmap(op, _separable_rule(op))
    for name, n in PLANE_OPS.items():
        op = getattr(ops, name).default
        torch.library.register_vmap(op, _plane_rule(op, n))


register()
