"""Calling a registered op's implementation without torch's dispatcher, where only the time differs.

A call of ``torch.ops.fastconv.conv2d`` goes through torch's dispatcher before it reaches the Python function
that does the work: the autograd kernel (:mod:`fastconv.ops.func`), the custom-op wrapper, argument boxing.
Measured on the 2-core dev machine, a batch-1 1x1 conv of MobileNet v2 (192x8x8 -> 64): the implementation
called directly 50-90 µs, through the dispatcher 90-230 µs, torch's whole ``conv2d`` 15-30 µs. A converted
MobileNet v2 makes 52 such calls per forward.

The dispatcher's layers do nothing for an eager call that records no gradient, on ordinary tensors, with
nothing watching: the autograd kernel only records a graph node when an input requires grad, the CPU kernel
is the implementation itself. :func:`direct_ok` says when a call is such a call. A training call (grad mode
on, an input requires grad) needs a graph node, and nothing more when nothing watches: :func:`direct_grad_ok`
lets such a call record the op's own autograd formula with an ordinary ``torch.autograd.Function`` around the
implementation (:func:`autograd_entry`: the conv and pooling ops, ``fastconv.ops.conv.FORWARD_GRAD_DIRECT``,
``fastconv.ops.pool.GRAD_DIRECT``), and the formula's gradient ops go
direct when the backward records nothing (a plain ``backward()``; ``create_graph=True`` keeps the dispatcher
there, so double backward records the registered ops). Anything else keeps the dispatcher, because there it
matters:

- forward mode: a forward-mode level is open (``forward_ad.dual_level``: an input may carry a tangent, and
  only the registered op has the jvp rule);
- ``torch.func`` transforms (vmap, grad, functionalize: functorch levels), ``torch.compile``/``export``
  (tracing must see the op, not the Python inside it), ``torch.jit.trace`` (the same);
- ``__torch_function__`` and ``__torch_dispatch__`` modes (FlopCounterMode, FakeTensorMode, user modes) and
  tensor subclasses (only exact ``torch.Tensor`` and ``nn.Parameter`` pass; ``Parameter`` disables
  ``__torch_function__``);
- autocast (the op's autocast rule casts the inputs: :mod:`fastconv.ops.autocast`);
- torch's profiler (it records ops at the dispatcher; ``fastconv bench --models`` reads them);
- meta, sparse and other non-dense devices and layouts (the dispatcher sends meta tensors to the fake kernel).

``FASTCONV_DIRECT_CALLS=0`` in the environment (read once, at import) turns direct calls off everywhere.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad
from torch.autograd import profiler as _profiler
from torch.nn import Parameter

__all__ = ["autograd_entry", "direct_ok", "direct_grad_ok", "keep_implementation", "ENABLED"]

#: Direct calls allowed at all (``FASTCONV_DIRECT_CALLS=0`` turns them off).
ENABLED = os.environ.get("FASTCONV_DIRECT_CALLS", "1").strip().lower() not in ("0", "off", "false", "no")

_PLAIN_TYPES = (Tensor, Parameter)
_C = torch._C
_is_compiling = torch.compiler.is_compiling


def _plain(t) -> bool:
    """``t`` an ordinary dense CPU or CUDA tensor (None counts as plain)."""
    if t is None:
        return True
    return type(t) in _PLAIN_TYPES and (t.is_cpu or t.is_cuda) and t.layout == torch.strided


def keep_implementation(table: dict, key):
    """Decorator, placed right under ``@torch.library.custom_op``: stores the function it decorates (the op's
    implementation, what the dispatcher runs for CPU and CUDA tensors) in ``table[key]`` for direct calls,
    and returns it unchanged for ``custom_op`` to register."""
    def keep(fn):
        table[key] = fn
        return fn
    return keep


def autograd_entry(name: str, implementation, setup_context, backward):
    """``apply`` of an ordinary ``torch.autograd.Function`` named ``FastconvDirect_<name>`` that runs an op's
    ``implementation`` and records the op's own autograd formula (the ``setup_context`` and ``backward`` given
    to ``register_autograd``): the entry of the calls :func:`direct_grad_ok` accepts. Integer outputs (pooling
    indices) come out non-differentiable, as from the registered op."""

    class Direct(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = implementation(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Direct.__name__ = Direct.__qualname__ = f"FastconvDirect_{name}"
    return Direct.apply


def _watched() -> bool:
    """Something records, traces, transforms, casts or watches ops now (see the module docstring).
    ``is_compiling`` comes first: Dynamo folds it to True, and cannot trace the other queries."""
    return (_is_compiling() or _C._are_functorch_transforms_active() or bool(_C._len_torch_function_stack())
            or bool(_C._len_torch_dispatch_stack()) or _C._is_any_autocast_enabled()
            or _C._get_tracing_state() is not None or _profiler._is_profiler_enabled
            or _forward_ad._current_level >= 0)


def direct_grad_ok(input: Tensor, weight=None, bias=None) -> bool:
    """True when a call that records a gradient (grad mode on, an input requires grad) may build its autograd
    node with an ordinary ``torch.autograd.Function`` around the op's implementation instead of going through
    the dispatcher's custom-op and autograd layers: everything :func:`direct_ok` asks except the gradient.

    The node's backward is the op's own formula, whose gradient ops go direct in turn when nothing records
    them (a plain ``backward()``); under ``create_graph=True`` they keep the dispatcher and record their own
    nodes, so double backward is the registered op's. Measured, 2 threads: a batch-8 1x1 conv of RegNet's
    squeeze-excitation block (104 -> 26 at 1x1), medians of 150 calls in two processes each, forward that
    records a gradient 97-125 -> 69-85 µs, forward and backward 287-356 -> 203-241 µs; a converted model's
    training step at batch 8, 128x128, against torch's in the same process: RegNet-Y-400MF 1.25 / 1.25 -> 1.23
    / 1.13, MobileNet v2 1.19 / 1.17 -> 1.07 / 1.05 (two runs each)."""
    if not ENABLED or not torch.is_grad_enabled() or _watched():
        return False
    return _plain(input) and _plain(weight) and _plain(bias)


def direct_ok(input: Tensor, weight=None, bias=None) -> bool:
    """True when calling an op's implementation directly with these tensor arguments (``weight`` and ``bias``
    may be None) gives exactly what the dispatcher would, with nothing recorded, traced or watched (see the
    module docstring). About 1 µs."""
    if not ENABLED:
        return False
    if torch.is_grad_enabled() and (input.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        return False
    if _watched():
        return False
    return _plain(input) and _plain(weight) and _plain(bias)
