"""A layer's repeated calls: the conv op's planned work without re-deriving the plan on every call.

Why: a converted model calls each conv layer with the same shapes, dtypes and arguments on every forward. The
op's own hot path (:mod:`fastconv.ops.conv`) already plans such calls, but still pays on each one for the
functional layer's argument memo, the dispatcher-free entry's wrappers, a 15-item plan key and the contiguous
route's selection: 10-15 µs of Python per call measured alone, and two to three times that inside a model,
where the torch ops between two fastconv calls evict the interpreter's caches. Measured in situ (forward hooks
on each layer of a converted MobileNet v3 large at batch 1, 2 threads, Zen 5), its 1x1 convs took 50-97 µs
more than torch's, 30-40 µs more alone.

:class:`ConvRepeatCall` holds what the first full call established for one layer (the geometry, the result's
shape, the named algorithm or ``auto``) and, per call, checks only what can differ from that call: the
operands' shapes, dtype, device, contiguity and type (``fastconv.ops.eager.direct_ok``, asked by the caller),
the registry's generation and the CPU target. The algorithm is still asked of :func:`fastconv.registry.choose`
on every ``auto`` call, so the autotuner's exploration, stored choices and re-validation behave exactly as on
the full path; the contiguous route of an algorithm is selected once per algorithm object. Whatever it does not
take (another shape, a channels_last operand, a route that leaves the call) returns None and the caller takes
the full path. Results and errors are the full path's.

Training calls (a gradient recorded, nothing watching: ``fastconv.ops.eager.direct_grad_ok``) take the same
planned forward inside an autograd node (:class:`_ConvTraining`) that records the op's own setup and gradient
formula, and whose plain backward runs the two gradient passes by their routes too (:class:`_GradientRoute`:
algorithm asked per call, route selected once per algorithm), instead of the gradient ops' implementations with
their wrappers and plan keys. A backward that records a graph (``create_graph``), runs under a mode or profiler,
or gets a strided output gradient runs the op's backward unchanged. Measured on the 2-core Intel Xeon, 2
threads: a converted layer's forward + backward with a 4 MB array streamed through the caches before each
(as the torch ops between two layers of a model do) 400 -> 370 µs (1 x 8 x 2x2, all overhead) and 640 -> 585
µs (8 x 128 x 4x4 -> 32 3x3); training steps at batch 8, 128x128, alternating in one process, 20 rounds,
planned / full path medians: RegNet-Y-400MF 0.988, EfficientNet-B0 0.986, MobileNet v3 large 0.988, MobileNet
v2 0.985, ShuffleNet v2 0.996 (13 of its 56 layers get a strided input, the channel split's view: full path),
DenseNet-121 0.999, ResNet-18 1.016 (20 layers of large kernels: within the noise).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

import torch

from .. import backends, registry
from ..spec import CONTIGUOUS_ROUTE
from . import conv as conv_ops
from . import eager, validation
from .conv import _ROUTE_DTYPES, forward_key, forward_plan_of

__all__ = ["ConvRepeatCall", "conv_repeat_call"]


def _nothing():
    return None


class ConvRepeatCall:
    """One conv layer's calls for operands shaped as in the call it was built from (see the module docstring).

    ``call(input, weight, bias)`` -> the op's result (N, K, *O) of an inference call, or None when this call is
    not one it takes; :meth:`training` the same for a call that records a gradient. Not pickled or copied (a copy
    of the module plans its own): it holds the algorithm's functions."""

    __slots__ = ("name", "ndim", "args", "geom", "out_shape", "named", "algo", "x_shape", "w_shape", "b_shape",
                 "dtype", "generation", "target", "chosen", "route", "_run", "_passes")

    def __init__(self, name: str, ndim: int, args: tuple, plan: tuple, input: Tensor, weight: Tensor,
                 bias: Optional[Tensor]):
        self.name, self.ndim, self.args, self.algo = name, ndim, args, args[-1]
        self.geom, self.named, self.out_shape, self.generation = plan[0], plan[1], plan[2], plan[3]
        self.x_shape, self.w_shape = input.shape, weight.shape
        self.b_shape = None if bias is None else bias.shape
        self.dtype = input.dtype
        self.target = backends.current()
        self.chosen = self.route = None
        self._run = validation.allocation_errors(name)(self._routed)
        self._passes = {}  # "grad_input" / "grad_weight" -> _GradientRoute, made at the first backward

    def __reduce__(self):
        return _nothing, ()

    def _routed(self, input, weight, bias):
        return self.route(input, weight, bias, self.geom, self.out_shape)

    def _takes(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
        """Whether a call with these operands is one this layer planned, with the forward's route selected for
        the algorithm :func:`registry.choose` answers now (``auto`` asks on every call, as the full path)."""
        dtype = self.dtype
        if (input.shape != self.x_shape or weight.shape != self.w_shape or input.dtype is not dtype
                or weight.dtype is not dtype or not input.is_cpu or not weight.is_cpu
                or not input.is_contiguous() or not weight.is_contiguous()):
            return False
        if bias is None:
            if self.b_shape is not None:
                return False
        elif (bias.shape != self.b_shape or bias.dtype is not dtype or not bias.is_cpu
              or not bias.is_contiguous()):
            return False
        if registry.generation() != self.generation or backends.current() != self.target:
            return False
        alg = self.named or registry.choose(self.algo, self.geom, "forward", self.name)
        if alg is not self.chosen:
            select = getattr(alg.forward, CONTIGUOUS_ROUTE, None)
            route = None if select is None else select(self.geom)
            if route is None:
                return False
            self.chosen, self.route = alg, route
        return True

    def __call__(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
        """An inference call (no gradient recorded): the op's result, or None (take the full path)."""
        return self._run(input, weight, bias) if self._takes(input, weight, bias) else None

    def training(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
        """A call that records a gradient (:func:`fastconv.ops.eager.direct_grad_ok` said yes): the op's result
        with its autograd node, or None (take the full path). The node is the op's own (setup and formula of
        :mod:`fastconv.ops.conv`); its backward runs the gradient passes' routes where it can (see
        :class:`_ConvTraining`)."""
        if not self._takes(input, weight, bias):
            return None
        return _ConvTraining.apply(input, weight, bias, self)

    def forward_for_autograd(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """The forward inside :class:`_ConvTraining`: the route, or the op's implementation where the route
        leaves the call."""
        out = self._run(input, weight, bias)
        if out is None:
            out = conv_ops.IMPLEMENTATIONS[self.ndim](input, weight, bias, *self.args)
        return out

    def gradient(self, pass_: str, grad: Tensor, operand: Tensor) -> Tensor:
        """``pass_`` ("grad_input": ``operand`` the weight; "grad_weight": the input) of a plain backward
        through this layer, for a contiguous ``grad`` of the layer's dtype: the pass's route, or the gradient
        op's implementation where there is none or it leaves the call."""
        route = self._passes.get(pass_)
        if route is None:
            route = self._passes[pass_] = _GradientRoute(self, pass_)
        out = route(grad, operand)
        if out is None:
            if pass_ == "grad_input":
                out = conv_ops.GRAD_INPUT_IMPLEMENTATIONS[self.ndim](grad, operand, list(self.x_shape[2:]),
                                                                     *self.args)
            else:
                out = conv_ops.GRAD_WEIGHT_IMPLEMENTATIONS[self.ndim](grad, operand, list(self.w_shape[2:]),
                                                                      *self.args)
        return out


class _GradientRoute:
    """One gradient pass of a planned layer: the algorithm asked of :func:`registry.choose` per call (``auto``
    keeps its tuning and re-validation), its contiguous route selected once per algorithm."""

    __slots__ = ("layer", "pass_", "op", "out_shape", "named", "chosen", "route", "_run")

    def __init__(self, layer: ConvRepeatCall, pass_: str):
        self.layer, self.pass_ = layer, pass_
        self.op = f"{layer.name}_{pass_}"
        self.out_shape = tuple(layer.x_shape if pass_ == "grad_input" else layer.w_shape)
        # a named algorithm is resolved (and refused, as the gradient op's plan would) once
        self.named = None if layer.algo == "auto" else registry.choose(layer.algo, layer.geom, pass_, self.op)
        self.chosen = self.route = None
        self._run = validation.allocation_errors(self.op)(self._routed)

    def _routed(self, grad, operand):
        return self.route(grad, operand, self.layer.geom, self.out_shape)

    def __call__(self, grad: Tensor, operand: Tensor) -> Optional[Tensor]:
        layer = self.layer
        alg = self.named or registry.choose(layer.algo, layer.geom, self.pass_, self.op)
        if alg is not self.chosen:
            select = getattr(getattr(alg, self.pass_), CONTIGUOUS_ROUTE, None)
            self.chosen, self.route = alg, None if select is None else select(layer.geom)
        return None if self.route is None else self._run(grad, operand)


class _ConvTraining(torch.autograd.Function):
    """The autograd node of a planned layer's training call: the op's own setup (:func:`fastconv.ops.conv`'s
    ``conv_setup``) and gradient formula, with the gradient passes run by the layer's routes when the backward
    is a plain one on a contiguous gradient; anything else (``create_graph``, a profiler or mode watching, a
    strided gradient, a registry or backend changed since) runs the op's own backward."""

    @staticmethod
    def forward(ctx, input, weight, bias, layer):
        output = layer.forward_for_autograd(input, weight, bias)
        conv_ops.SETUP[layer.ndim](ctx, (input, weight, bias, *layer.args), output)
        ctx.layer = layer
        return output

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        input, weight = ctx.saved_tensors
        if (grad.dtype is not layer.dtype or not grad.is_contiguous() or ctx.zero_channels
                or registry.generation() != layer.generation or backends.current() != layer.target
                or not eager.direct_ok(grad, weight, input)):
            return (*conv_ops.BACKWARD[layer.ndim](ctx, grad)[:3], None)
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        gi = layer.gradient("grad_input", grad, weight) if need_input else None
        gw = layer.gradient("grad_weight", grad, input) if need_weight else None
        gb = grad.sum(dim=[0, *range(2, grad.dim())]) if ctx.has_bias and need_bias else None
        return gi, gw, gb, None


def conv_repeat_call(ndim: int, input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
                     padding_end, dilation, groups: int, algo: str) -> Optional[ConvRepeatCall]:
    """A :class:`ConvRepeatCall` for calls like this one (arguments normalised as the op takes them), after the
    op has run it once (its plan is stored then); None when such calls cannot take it (another dtype, a layout
    other than contiguous, a call with no plan: an empty result)."""
    if (input.dtype not in _ROUTE_DTYPES or not input.is_cpu or not input.is_contiguous()
            or not weight.is_contiguous() or (bias is not None and not bias.is_contiguous())):
        return None
    plan = forward_plan_of(forward_key(input, weight, bias, stride, padding, padding_end, dilation, groups, algo))
    if plan is None:
        return None
    return ConvRepeatCall(f"conv{ndim}d", ndim, (stride, padding, padding_end, dilation, groups, algo), plan,
                          input, weight, bias)
