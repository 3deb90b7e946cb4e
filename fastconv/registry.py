"""The algorithm registry: which convolution algorithm runs which geometry, and why not when it can't.

Every convolution (1-, 2-, 3-D, transposed, depthwise) reaches the kernels through one normalised
description, :class:`ConvGeometry` (always 3 spatial dims: a 2-D conv has depth 1), and one of the
registered :class:`ConvAlgorithm` objects. An algorithm declares the targets it runs on (``"numba"``,
``"cuda"``, ``"cuda-emu"``) and a ``refuse(geometry)`` function returning the reason it cannot run a
geometry, or ``None`` [xformers' ``not_supported_reasons``]. ``algo="auto"`` asks :func:`choose`.

Public: ``fastconv.algorithms()`` lists the registered algorithms as rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

Triple = tuple[int, int, int]
PASSES = ("forward", "grad_input", "grad_weight")


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


def _always(_: ConvGeometry) -> Optional[str]:
    return None


@dataclass(frozen=True)
class ConvAlgorithm:
    """One implementation of the three convolution passes on some targets.

    ``forward(x, w, bias, geom)``: x (N, C, D, H, W), w (K, C/groups, KD, KH, KW) -> (N, K, OD, OH, OW)
    ``grad_input(grad_out, w, geom)`` -> (N, C, D, H, W)
    ``grad_weight(grad_out, x, geom)`` -> (K, C/groups, KD, KH, KW)
    All tensors contiguous, 5-D, of ``geom.dtype``; results freshly allocated.
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

    def why_not(self, geom: ConvGeometry) -> Optional[str]:
        """The reason this algorithm cannot run ``geom``, or None when it can."""
        if geom.target not in self.targets:
            return f"runs on {'/'.join(sorted(self.targets))}, not {geom.target}"
        return self.refuse(geom)


_REGISTRY: dict[tuple[str, str], ConvAlgorithm] = {}
#: Heuristic choosers per target: geometry, pass -> algorithm name. Registered by the backends.
_HEURISTICS: dict[str, Callable[[ConvGeometry, str], str]] = {}


_GENERATION = [0]  # bumped by every registration: memoised choices made before it are stale


def generation() -> int:
    """A counter that changes whenever an algorithm is registered (for memoised choices)."""
    return _GENERATION[0]


def register(algorithm: ConvAlgorithm) -> ConvAlgorithm:
    """Add ``algorithm`` for each of its targets (a later registration of the same name replaces it)."""
    for target in algorithm.targets:
        _REGISTRY[(algorithm.name, target)] = algorithm
    _GENERATION[0] += 1
    return algorithm


def register_heuristic(target: str, chooser: Callable[[ConvGeometry, str], str]) -> None:
    """Set the function that picks an algorithm name for ``algo='auto'`` on ``target``."""
    _HEURISTICS[target] = chooser


def names() -> list[str]:
    """Every registered algorithm name, plus ``"auto"``."""
    return ["auto"] + sorted({name for name, _ in _REGISTRY})


def algorithms() -> list[dict]:
    """The registered algorithms, one row each: name, targets, summary, dtypes, layouts.

    >>> [row["name"] for row in fastconv.algorithms()]
    ['direct', 'im2col', ...]
    """
    rows: dict[str, dict] = {}
    for (name, target), alg in sorted(_REGISTRY.items()):
        row = rows.setdefault(name, {"name": name, "targets": [], "summary": alg.summary,
                                     "dtypes": list(alg.dtypes), "layouts": list(alg.layouts)})
        row["targets"].append(target)
    return list(rows.values())


def _reasons(geom: ConvGeometry) -> dict[str, str]:
    out = {}
    for name in names()[1:]:
        alg = _REGISTRY.get((name, geom.target))
        if alg is None:
            targets = sorted(t for n, t in _REGISTRY if n == name)
            out[name] = f"runs on {'/'.join(targets)}, not {geom.target}"
        else:
            reason = alg.why_not(geom)
            if reason:
                out[name] = reason
    return out


def choose(algo: str, geom: ConvGeometry, pass_: str, op: str = "conv") -> ConvAlgorithm:
    """Resolve ``algo`` (a name or ``"auto"``) for ``geom`` and one of :data:`PASSES`.

    Raises ValueError naming the algorithms that would work and why the others do not.
    """
    if algo == "auto":
        from . import autotune  # late: autotune imports this module

        tuned = autotune.lookup(geom, pass_)  # None when tuning is off, too small, or nested
        if tuned is not None:
            return tuned
        chooser = _HEURISTICS.get(geom.target)
        if chooser is None:
            raise RuntimeError(f"{op}: no algorithm is registered for target {geom.target!r}")
        return _REGISTRY[(chooser(geom, pass_), geom.target)]
    if not isinstance(algo, str) or algo not in names():
        raise ValueError(f"{op}: unknown algo {algo!r}; expected one of {', '.join(names())}")
    alg = _REGISTRY.get((algo, geom.target))
    reason = alg.why_not(geom) if alg is not None else _reasons(geom).get(algo)
    if reason is None and alg is not None:
        return alg
    reasons = _reasons(geom)
    working = [n for n in names()[1:] if n not in reasons]
    others = "; ".join(f"{n}: {r}" for n, r in reasons.items() if n != algo)
    raise ValueError(
        f"{op}: algo={algo!r} cannot run this convolution ({reason}). "
        f"Algorithms that can: {', '.join(['auto'] + working)}"
        + (f". Not available: {others}" if others else "")
    )


def candidates(geom: ConvGeometry) -> list[ConvAlgorithm]:
    """The algorithms that can run ``geom`` (what the autotuner measures)."""
    return [alg for (name, target), alg in sorted(_REGISTRY.items())
            if target == geom.target and alg.why_not(geom) is None]
