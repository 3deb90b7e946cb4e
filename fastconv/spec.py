"""Plain data shared by every layer: what a convolution is, what an implementation declares.

Nothing here chooses or registers anything, so the kernel modules (``fastconv.cpu``,
``fastconv.cuda``) may import it to *declare* their implementations as data; the op layer
(:mod:`fastconv.ops.catalog`) imports those declarations downward and registers them with
:mod:`fastconv.registry`, which chooses among them.

* :class:`ConvGeometry` -- one convolution normalised to 3 spatial dims (a 2-D conv has depth 1).
* :class:`ConvAlgorithm` -- one implementation of the three conv passes on some targets, with the
  reason it refuses a geometry (``refuse``), its multiplication ratio and its workspace (family ``"conv"``).
* :class:`OpImplementation` -- one implementation of another op family (``"conv_transpose"``,
  ``"separable"``): a single ``run`` call computing the op's forward, with the same refusal/workspace data.
* :class:`SeparableGeometry` -- a depthwise-separable convolution (its depthwise half plus the pointwise width).
* :class:`Decision` -- the algorithm a call runs, why, and its workspace (:func:`fastconv.registry.decide`).
* :class:`PoolKernels` -- what a target provides for the pooling op families.
* :data:`PASSES`, :data:`TARGETS`, :data:`FAMILIES`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch
from torch import Tensor

Triple = tuple[int, int, int]
#: The three passes of a convolution; each has its own algorithm choice.
PASSES = ("forward", "grad_input", "grad_weight")
#: Every execution target an implementation can declare.
TARGETS = ("numba", "cuda", "cuda-emu")
#: The op families the registry chooses implementations for, with how an error message names one call.
#: ``conv``: the three passes of conv{1,2,3}d (:class:`ConvAlgorithm`); ``conv_transpose``: the forward of
#: conv_transpose{1,2,3}d (declared :class:`OpImplementation` entries plus every conv algorithm's
#: ``grad_input``, the adjoint); ``separable``: depthwise_separable_conv2d's forward.
FAMILIES = {"conv": "convolution", "conv_transpose": "transposed convolution",
            "separable": "depthwise-separable convolution"}


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution, normalised to 3 spatial dims (a 2-D conv has depth 1, a 1-D conv depth and height 1).

    ``padding`` is the zero padding before each spatial dim, ``padding_end`` the padding after it
    (they differ only for ``padding='same'`` with an even effective kernel, as in torch).
    """

    ndim: int
    batch: int
    in_channels: int
    out_channels: int
    groups: int
    in_spatial: Triple
    kernel: Triple
    out_spatial: Triple
    stride: Triple
    padding: Triple
    padding_end: Triple
    dilation: Triple
    dtype: torch.dtype
    target: str

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the forward pass (each pass costs the same)."""
        return (self.batch * self.out_channels * math.prod(self.out_spatial)
                * (self.in_channels // self.groups) * math.prod(self.kernel))

    @property
    def is_depthwise(self) -> bool:
        return self.groups == self.in_channels and self.groups > 1 and self.out_channels % self.groups == 0

    @property
    def is_pointwise(self) -> bool:
        """1x1 kernel, stride 1, no padding: the convolution is a plain GEMM."""
        return (self.kernel == (1, 1, 1) and self.stride == (1, 1, 1)
                and self.padding == (0, 0, 0) and self.padding_end == (0, 0, 0))

    def key(self) -> tuple:
        """Hashable identity for caches (autotuning), without the batch-independent details lost."""
        return (self.ndim, self.batch, self.in_channels, self.out_channels, self.groups, self.in_spatial,
                self.kernel, self.out_spatial, self.stride, self.padding, self.padding_end, self.dilation,
                str(self.dtype).replace("torch.", ""), self.target)


Forward = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], ConvGeometry], torch.Tensor]
GradInput = Callable[[torch.Tensor, torch.Tensor, ConvGeometry], torch.Tensor]
GradWeight = Callable[[torch.Tensor, torch.Tensor, ConvGeometry], torch.Tensor]
#: A target's ``algo='auto'`` rule without measuring: geometry, pass -> algorithm name.
Heuristic = Callable[[ConvGeometry, str], str]


#: The attribute of a conv pass that holds its route for contiguous operands (see :class:`ConvAlgorithm`).
CONTIGUOUS_ROUTE = "contiguous_route"


def _always(_: ConvGeometry) -> Optional[str]:
    return None


@dataclass(frozen=True)
class ConvAlgorithm:
    """One implementation of the three convolution passes on some targets.

    ``forward(x, w, bias, geom)``: x (N, C, D, H, W), w (K, C/groups, KD, KH, KW) -> (N, K, OD, OH, OW)
    ``grad_input(grad_out, w, geom)`` -> (N, C, D, H, W)
    ``grad_weight(grad_out, x, geom)`` -> (K, C/groups, KD, KH, KW)
    All tensors contiguous, 5-D, of ``geom.dtype``; results freshly allocated.

    A pass may carry, as its attribute ``contiguous_route`` (:data:`CONTIGUOUS_ROUTE`), a function of the geometry
    that gives a faster way to run it for C-contiguous float32/float64 operands of the op's own rank, or None
    where only the pass runs the geometry: ``forward(x, w, bias, geom, shape)``, ``grad_input(grad_out, w, geom,
    shape)``, ``grad_weight(grad_out, x, geom, shape)``, returning the op's result of ``shape`` (contiguous, not a
    view), or None for a call it leaves to the pass. The ops take it for contiguous operands: a small call skips
    the 5-D views, the conversions and the result's reshape on the way (see :mod:`fastconv.ops.conv`). A pass
    replaced without one (a test's counting wrapper) is always called itself.
    """

    name: str
    targets: frozenset
    summary: str
    forward: Forward
    grad_input: GradInput
    grad_weight: GradWeight
    refuse: Callable[[ConvGeometry], Optional[str]] = field(default=_always)
    #: Multiplications the algorithm performs relative to the nominal MAC count (Winograd < 1).
    mult_ratio: Callable[[ConvGeometry], float] = field(default=lambda g: 1.0)
    #: Extra memory in bytes the algorithm needs for a pass (im2col buffers, transforms).
    workspace_bytes: Callable[[ConvGeometry], int] = field(default=lambda g: 0)
    #: Input dtypes (names) the algorithm runs; ``refuse`` says why not for any other.
    dtypes: tuple = ("float32", "float64")
    #: Memory layouts the kernels read directly (others are copied to one of them first).
    layouts: tuple = ("contiguous",)
    #: The op family (:data:`FAMILIES`) this declaration implements: always ``"conv"`` for this type.
    family: str = "conv"

    def why_not(self, geom: ConvGeometry) -> Optional[str]:
        """The reason this algorithm cannot run ``geom``, or None when it can."""
        if geom.target not in self.targets:
            return f"runs on {'/'.join(sorted(self.targets))}, not {geom.target}"
        return self.refuse(geom)


@dataclass(frozen=True)
class SeparableGeometry:
    """A depthwise-separable convolution: ``depthwise`` (groups == in_channels, M = multiplier x C outputs,
    a 2-D :class:`ConvGeometry`) followed by a 1x1 pointwise conv from M to ``out_channels`` channels."""

    depthwise: ConvGeometry
    out_channels: int

    @property
    def target(self) -> str:
        return self.depthwise.target

    @property
    def dtype(self) -> torch.dtype:
        return self.depthwise.dtype

    @property
    def macs(self) -> int:
        """Depthwise MACs plus pointwise MACs (N * K * prod(out) * M)."""
        d = self.depthwise
        return d.macs + d.batch * self.out_channels * math.prod(d.out_spatial) * d.out_channels


@dataclass(frozen=True)
class OpImplementation:
    """One implementation of an op family other than the conv passes (see :data:`FAMILIES`).

    ``run`` computes the op's forward; its arguments are the family's:

    * ``conv_transpose``: ``run(x, w, bias, geom)`` with x (N, C_in, D, H, W), w (C_in, C_out/groups, KD, KH, KW),
      bias (C_out,) or None, ``geom`` the *adjoint* convolution's :class:`ConvGeometry` (its ``in_spatial`` is
      this op's output size) -> (N, C_out, OD, OH, OW), bias included, freshly allocated.
    * ``separable``: ``run(x, dw, pw, db, pb, geom)`` with x (N, C, H, W), dw (M, 1, KH, KW), pw (K, M, 1, 1),
      biases or None, ``geom`` a :class:`SeparableGeometry` -> (N, K, OH, OW).

    ``adjoint`` is set on the ``conv_transpose`` entries the registry derives from a conv algorithm (their
    ``run`` is that algorithm's ``grad_input``); declared entries leave it None.
    """

    name: str
    family: str
    targets: frozenset
    summary: str
    run: Callable[..., torch.Tensor]
    refuse: Callable[[object], Optional[str]] = field(default=_always)
    mult_ratio: Callable[[object], float] = field(default=lambda g: 1.0)
    workspace_bytes: Callable[[object], int] = field(default=lambda g: 0)
    dtypes: tuple = ("float32", "float64")
    layouts: tuple = ("contiguous",)
    adjoint: Optional[ConvAlgorithm] = None

    def why_not(self, geom) -> Optional[str]:
        """The reason this implementation cannot run ``geom``, or None when it can."""
        if geom.target not in self.targets:
            return f"runs on {'/'.join(sorted(self.targets))}, not {geom.target}"
        return self.refuse(geom)


@dataclass(frozen=True)
class Decision:
    """Which algorithm a call of ``algo`` runs for one geometry and pass, why, and the memory it needs.

    What :func:`fastconv.registry.decide` answers; the FLOP counter, the benchmark and ``fastconv info``
    read it instead of re-deriving the choice.
    """

    algorithm: "ConvAlgorithm | OpImplementation"
    reason: str
    workspace_bytes: int

    @property
    def name(self) -> str:
        return self.algorithm.name

    @property
    def family(self) -> str:
        return self.algorithm.family


class PoolKernels(Protocol):
    """What a target provides for pooling. Tensors are contiguous 5-D (N, C, D, H, W); geometry args 3-tuples."""

    def max_pool(self, x: Tensor, kernel: Triple, stride: Triple, padding: Triple, dilation: Triple,
                 out_spatial: Triple, minimum: bool) -> tuple[Tensor, Tensor]: ...
    def max_pool_backward(self, grad_out: Tensor, indices: Tensor, in_spatial: Triple) -> Tensor: ...
    def adaptive_max_pool(self, x: Tensor, out_spatial: Triple) -> tuple[Tensor, Tensor]: ...
    def max_unpool(self, x: Tensor, indices: Tensor, out_spatial: Triple) -> Tensor: ...
    def max_unpool_backward(self, grad_out: Tensor, indices: Tensor) -> Tensor: ...
    def avg_pool(self, x: Tensor, kernel: Triple, stride: Triple, padding: Triple, out_spatial: Triple,
                 ceil_mode: bool, count_include_pad: bool, divisor_override: int) -> Tensor: ...
    def avg_pool_backward(self, grad_out: Tensor, kernel: Triple, stride: Triple, padding: Triple,
                          in_spatial: Triple, ceil_mode: bool, count_include_pad: bool,
                          divisor_override: int) -> Tensor: ...
    def adaptive_avg_pool(self, x: Tensor, out_spatial: Triple) -> Tensor: ...
    def adaptive_avg_pool_backward(self, grad_out: Tensor, in_spatial: Triple) -> Tensor: ...
    # Optional (looked up with getattr; a target without them takes the indexed path):
    # ``max_pool_values(x, kernel, stride, padding, dilation, out_spatial, minimum) -> Tensor`` (values only) and
    # ``max_pool_backward_from_values(grad_out, x, y, kernel, stride, padding, dilation, minimum) -> Tensor`` (the
    # gradient at the elements the indexed forward would pick, found again from the values).
