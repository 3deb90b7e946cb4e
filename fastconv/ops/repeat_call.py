"""A layer's repeated inference call: the conv op's planned work without re-deriving the plan on every call.

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
the full path. Results, errors and autograd are the full path's: only inference calls with no gradient
recorded come here.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import backends, registry
from ..spec import CONTIGUOUS_ROUTE
from . import validation
from .conv import _ROUTE_DTYPES, forward_key, forward_plan_of

__all__ = ["ConvRepeatCall", "conv_repeat_call"]


def _nothing():
    return None


class ConvRepeatCall:
    """One conv layer's forward for operands shaped as in the call it was built from (see the module docstring).

    ``call(input, weight, bias)`` -> the op's result (N, K, *O), or None when this call is not one it takes.
    Not pickled or copied (a copy of the module plans its own): it holds the algorithm's functions."""

    __slots__ = ("name", "geom", "out_shape", "named", "algo", "x_shape", "w_shape", "b_shape", "dtype",
                 "generation", "target", "chosen", "route", "_run")

    def __init__(self, name: str, plan: tuple, input: Tensor, weight: Tensor, bias: Optional[Tensor], algo: str):
        self.name, self.algo = name, algo
        self.geom, self.named, self.out_shape, self.generation = plan[0], plan[1], plan[2], plan[3]
        self.x_shape, self.w_shape = input.shape, weight.shape
        self.b_shape = None if bias is None else bias.shape
        self.dtype = input.dtype
        self.target = backends.current()
        self.chosen = self.route = None
        self._run = validation.allocation_errors(name)(self._routed)

    def __reduce__(self):
        return _nothing, ()

    def _routed(self, input, weight, bias):
        return self.route(input, weight, bias, self.geom, self.out_shape)

    def __call__(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
        dtype = self.dtype
        if (input.shape != self.x_shape or weight.shape != self.w_shape or input.dtype is not dtype
                or weight.dtype is not dtype or not input.is_cpu or not weight.is_cpu
                or not input.is_contiguous() or not weight.is_contiguous()):
            return None
        if bias is None:
            if self.b_shape is not None:
                return None
        elif (bias.shape != self.b_shape or bias.dtype is not dtype or not bias.is_cpu
              or not bias.is_contiguous()):
            return None
        if registry.generation() != self.generation or backends.current() != self.target:
            return None
        alg = self.named or registry.choose(self.algo, self.geom, "forward", self.name)
        if alg is not self.chosen:
            select = getattr(alg.forward, CONTIGUOUS_ROUTE, None)
            route = None if select is None else select(self.geom)
            if route is None:
                return None
            self.chosen, self.route = alg, route
        return self._run(input, weight, bias)


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
    return ConvRepeatCall(f"conv{ndim}d", plan, input, weight, bias, algo)
