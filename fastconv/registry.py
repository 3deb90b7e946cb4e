"""The algorithm registry: which convolution algorithm runs which geometry, and why not when it can't.

Every convolution (1-, 2-, 3-D, transposed, depthwise) reaches the kernels through one normalised
description, :class:`ConvGeometry` (always 3 spatial dims: a 2-D conv has depth 1), and one of the
registered :class:`ConvAlgorithm` objects. An algorithm declares the targets it runs on (``"numba"``,
``"cuda"``, ``"cuda-emu"``) and a ``refuse(geometry)`` function returning the reason it cannot run a
geometry, or ``None`` [xformers' ``not_supported_reasons``]. ``algo="auto"`` asks :func:`choose`.

The data types live in :mod:`fastconv.spec` (re-exported here). Kernel modules only declare their
algorithms as data; the op layer (:mod:`fastconv.ops.catalog`) imports the declarations and registers them.

Public: ``fastconv.algorithms()`` lists the registered algorithms as rows.
"""
from __future__ import annotations

from typing import Callable

from .spec import (PASSES, ConvAlgorithm, ConvGeometry, Decision, Forward, GradInput, GradWeight,  # noqa: F401  (re-exported)
                   Triple)

_REGISTRY: dict[tuple[str, str], ConvAlgorithm] = {}
#: Heuristic choosers per target: geometry, pass -> algorithm name. Registered by fastconv.ops.catalog.
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


def decide(algo: str, geom: ConvGeometry, pass_: str, op: str = "conv") -> Decision:
    """What a call of ``algo`` runs for ``geom`` and ``pass_`` now, why, and its workspace -- never measuring.

    The one answer to "which algorithm runs this" for everything that reports it (the FLOP counter, the
    benchmark's labels, ``fastconv info``): a named algorithm is :func:`choose`'s answer (refusals raise as
    there); for ``"auto"`` the autotuner's stored choice for this geometry's cache key when it has one
    (what the op runs), else the heuristic, asked with tuning off -- so a count on the meta device never
    runs the autotuner.
    """
    from . import autotune  # late: autotune imports this module

    if algo != "auto":
        alg = choose(algo, geom, pass_, op)
        return Decision(alg, f"requested algo={algo!r}", int(alg.workspace_bytes(geom)))
    names = tuple(a.name for a in candidates(geom))
    key = autotune.cache_key(geom, pass_)
    choice = autotune.autotune_cache().get(key)
    if choice is not None and tuple(choice.candidates) == names and choice.algo in names:
        times = sorted(choice.times_ms.items(), key=lambda kv: kv[1])
        shown = ", ".join(f"{n} {t:.3g} ms" for n, t in times[:3])
        alg = choose(choice.algo, geom, pass_, op)
        return Decision(alg, f"autotuned here: {shown}", int(alg.workspace_bytes(geom)))
    tuning = autotune.enabled()
    with autotune.enabled(False):
        alg = choose("auto", geom, pass_, op)
    if len(names) == 1:
        reason = "the only algorithm that runs it"
    elif not tuning:
        reason = "heuristic (autotuning off)"
    elif autotune.deterministic():
        reason = "heuristic (deterministic mode)"
    elif geom.target in autotune.UNTUNED_TARGETS:
        reason = f"heuristic (no tuning on {geom.target})"
    elif geom.macs < autotune.MIN_MACS:
        reason = f"heuristic (< {autotune.MIN_MACS / 1e6:g}M MACs: not tuned)"
    elif key in autotune._exploring:
        reason = "heuristic (being tuned on this process's calls)"
    else:
        reason = "heuristic (not tuned yet here)"
    return Decision(alg, reason, int(alg.workspace_bytes(geom)))
