"""The implementation registry: which implementation runs which call of an op family, and why not when it can't.

Every convolution (1-, 2-, 3-D, transposed, depthwise) reaches the kernels through one normalised
description, :class:`ConvGeometry` (always 3 spatial dims: a 2-D conv has depth 1), and one of the
registered :class:`ConvAlgorithm` objects. An algorithm declares the targets it runs on (``"numba"``,
``"cuda"``, ``"cuda-emu"``) and a ``refuse(geometry)`` function returning the reason it cannot run a
geometry, or ``None`` [xformers' ``not_supported_reasons``]. ``algo="auto"`` asks :func:`choose`.

One table serves every op family of :data:`fastconv.spec.FAMILIES`, told apart by the declarations'
``family``: ``"conv"`` (the three passes, :class:`ConvAlgorithm`), ``"conv_transpose"`` and ``"separable"``
(:class:`OpImplementation`: one ``run`` per call). A transposed convolution is the adjoint of a convolution,
so the ``conv_transpose`` family holds its declared implementations (``patch_gemm``) *and* every conv
algorithm run through its ``grad_input`` pass (derived here when the conv algorithm is registered).
``choose(..., family=...)`` and ``decide(..., family=...)`` answer for every family; ``algo="auto"`` outside
``conv`` takes the first declared implementation (in registration order) that runs the call, and for
``conv_transpose`` otherwise the conv choice for the adjoint's ``grad_input`` pass.

The data types live in :mod:`fastconv.spec` (re-exported here). Kernel modules only declare their
algorithms as data; the op layer (:mod:`fastconv.ops.catalog`) imports the declarations and registers them.

Public: ``fastconv.algorithms()`` lists the registered algorithms as rows, each with its ``family``.
"""
from __future__ import annotations

from typing import Callable

from .spec import (FAMILIES, PASSES, ConvAlgorithm, ConvGeometry, Decision, Forward,  # noqa: F401  (re-exported)
                   GradInput, GradWeight, OpImplementation, SeparableGeometry, Triple)

_REGISTRY: dict[tuple[str, str], ConvAlgorithm] = {}
#: The other families' declared implementations: family -> {(name, target): implementation}, in
#: registration order (the order ``algo='auto'`` prefers them in).
_FAMILY_REGISTRY: dict[str, dict[tuple[str, str], OpImplementation]] = {}
#: ``conv_transpose`` entries derived from the conv algorithms (their ``grad_input``): (name, target) -> entry.
_ADJOINTS: dict[tuple[str, str], OpImplementation] = {}
#: Appended to a conv algorithm's refusal when a transposed convolution asked for it.
_ADJOINT_NOTE = (" (for a transposed convolution the registry sees the adjoint convolution: its in_channels are "
                 "this op's out_channels and its input is this op's output)")
#: Heuristic choosers per target: geometry, pass -> algorithm name. Registered by fastconv.ops.catalog.
_HEURISTICS: dict[str, Callable[[ConvGeometry, str], str]] = {}


_GENERATION = [0]  # bumped by every registration: memoised choices made before it are stale


def generation() -> int:
    """A counter that changes whenever an algorithm is registered (for memoised choices)."""
    return _GENERATION[0]


def register(algorithm):
    """Add ``algorithm`` (a :class:`ConvAlgorithm` or an :class:`OpImplementation`) to its family's table for
    each of its targets (a later registration of the same name in the same family replaces it)."""
    family = algorithm.family
    if family == "conv":
        if not isinstance(algorithm, ConvAlgorithm):
            raise TypeError(f"register: a 'conv' implementation must be a ConvAlgorithm, got {type(algorithm).__name__}")
        adjoint = _adjoint(algorithm)
        for target in algorithm.targets:
            _REGISTRY[(algorithm.name, target)] = algorithm
            _ADJOINTS[(algorithm.name, target)] = adjoint
    elif family in FAMILIES:
        if not isinstance(algorithm, OpImplementation):
            raise TypeError(f"register: a {family!r} implementation must be an OpImplementation, got "
                            f"{type(algorithm).__name__}")
        table = _FAMILY_REGISTRY.setdefault(family, {})
        for target in sorted(algorithm.targets):
            table[(algorithm.name, target)] = algorithm
    else:
        raise ValueError(f"register: unknown op family {family!r}; expected one of {', '.join(FAMILIES)}")
    _GENERATION[0] += 1
    return algorithm


def _adjoint(alg: ConvAlgorithm) -> OpImplementation:
    """``alg`` as a ``conv_transpose`` implementation: the adjoint convolution's input gradient, plus the bias."""

    def run(x, w, bias, geom: ConvGeometry):
        out = alg.grad_input(x, w, geom)
        if bias is not None:
            # In place on the freshly allocated result: no second output-sized buffer.
            out.add_(bias.reshape((1, -1, 1, 1, 1)))
        return out

    return OpImplementation(alg.name, "conv_transpose", alg.targets,
                            f"the adjoint convolution's input gradient by {alg.name}", run, refuse=alg.refuse,
                            mult_ratio=alg.mult_ratio, workspace_bytes=alg.workspace_bytes, dtypes=alg.dtypes,
                            layouts=alg.layouts, adjoint=alg)


def _adjoint_of(alg: ConvAlgorithm, target: str) -> OpImplementation:
    entry = _ADJOINTS.get((alg.name, target))
    if entry is None or entry.adjoint is not alg:  # an algorithm swapped into _REGISTRY directly (tests)
        entry = _ADJOINTS[(alg.name, target)] = _adjoint(alg)
    return entry


def register_heuristic(target: str, chooser: Callable[[ConvGeometry, str], str]) -> None:
    """Set the function that picks an algorithm name for ``algo='auto'`` on ``target``."""
    _HEURISTICS[target] = chooser


def names(family: str = "conv") -> list[str]:
    """Every ``algo`` a call of ``family`` accepts: ``"auto"``, then the registered names.

    ``conv_transpose`` accepts every conv algorithm (run as the adjoint) and then its declared ones."""
    if family == "conv":
        return ["auto"] + sorted({name for name, _ in _REGISTRY})
    declared = sorted({name for name, _ in _FAMILY_REGISTRY.get(family, {})})
    return (names() if family == "conv_transpose" else ["auto"]) + declared


def declared_names(family: str) -> set[str]:
    """The names declared for ``family`` itself (for ``conv_transpose``: not the conv algorithms)."""
    if family == "conv":
        return {name for name, _ in _REGISTRY}
    return {name for name, _ in _FAMILY_REGISTRY.get(family, {})}


def algorithms() -> list[dict]:
    """The declared implementations, one row each: name, targets, summary, dtypes, layouts, family.

    The conv algorithms first (sorted by name), then each other family's declared implementations; the
    conv algorithms also serve ``conv_transpose`` (as the adjoint) without a row of their own there.

    >>> [row["name"] for row in fastconv.algorithms() if row["family"] == "conv"]
    ['direct', 'im2col', ...]
    """
    rows: dict[tuple[str, str], dict] = {}
    tables = [("conv", _REGISTRY)] + [(f, _FAMILY_REGISTRY.get(f, {})) for f in FAMILIES if f != "conv"]
    for family, table in tables:
        for (name, target), alg in sorted(table.items()):
            row = rows.setdefault((family, name), {"name": name, "targets": [], "summary": alg.summary,
                                                   "dtypes": list(alg.dtypes), "layouts": list(alg.layouts),
                                                   "family": family})
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


_AUTOTUNE: list = []


def _autotune():
    """The autotune module, imported late (it imports this one) and once: every ``auto`` call asks it."""
    if not _AUTOTUNE:
        from . import autotune

        _AUTOTUNE.append(autotune)
    return _AUTOTUNE[0]


def choose(algo: str, geom, pass_: str, op: str = "conv", family: str = "conv"):
    """Resolve ``algo`` (a name or ``"auto"``) for ``geom`` and one of :data:`PASSES`.

    ``family`` other than ``"conv"``: ``geom`` is that family's geometry (the adjoint :class:`ConvGeometry`
    for ``conv_transpose``, a :class:`SeparableGeometry` for ``separable``), ``pass_`` is ``"forward"``, and
    the answer an :class:`OpImplementation`. Raises ValueError naming the algorithms that would work and
    why the others do not.
    """
    if family != "conv":
        return _choose_in_family(family, algo, geom, op)
    if algo == "auto":
        tuned = _autotune().lookup(geom, pass_)  # None when tuning is off, too small, or nested
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


def _choose_in_family(family: str, algo: str, geom, op: str) -> OpImplementation:
    declared = _FAMILY_REGISTRY.get(family, {})
    if algo == "auto":
        for (_, target), impl in declared.items():  # registration order: the declared preference
            if target == geom.target and impl.why_not(geom) is None:
                return impl
        if family == "conv_transpose":
            return _adjoint_of(_choose_adjoint("auto", geom, op), geom.target)
        raise RuntimeError(f"{op}: no {FAMILIES.get(family, family)} implementation is registered for target "
                           f"{geom.target!r}")
    impl = declared.get((algo, geom.target)) if isinstance(algo, str) else None
    if impl is not None and impl.why_not(geom) is None:
        return impl
    if impl is None and family == "conv_transpose" and isinstance(algo, str) and algo in declared_names("conv") \
            and algo not in declared_names(family):
        return _adjoint_of(_choose_adjoint(algo, geom, op), geom.target)
    accepted = names(family)
    if not isinstance(algo, str) or algo not in accepted:
        raise ValueError(f"{op}: unknown algo {algo!r}; expected one of {', '.join(accepted)}")
    reasons = _family_reasons(family, geom)
    working = [n for n in accepted[1:] if n not in reasons]
    raise ValueError(f"{op}: algo={algo!r} cannot run this {FAMILIES[family]} ({reasons[algo]}). "
                     f"Algorithms that can: {', '.join(['auto'] + working)}")


def _choose_adjoint(algo: str, geom: ConvGeometry, op: str) -> ConvAlgorithm:
    try:
        return choose(algo, geom, "grad_input", op)
    except ValueError as e:
        # The conv registry describes the adjoint convolution; say so, or "in_channels" reads wrong.
        raise ValueError(f"{e}{_ADJOINT_NOTE}") from None


def _family_reasons(family: str, geom) -> dict[str, str]:
    """name -> why it cannot run ``geom``, for every name ``family`` accepts that cannot (error paths only)."""
    out = dict(_reasons(geom)) if family == "conv_transpose" else {}
    declared = _FAMILY_REGISTRY.get(family, {})
    for name in declared_names(family):
        impl = declared.get((name, geom.target))
        if impl is None:
            targets = sorted(t for n, t in declared if n == name)
            out[name] = f"runs on {'/'.join(targets)}, not {geom.target}"
        elif (reason := impl.why_not(geom)) is not None:
            out[name] = reason
        else:
            out.pop(name, None)
    return out


def candidates(geom: ConvGeometry) -> list[ConvAlgorithm]:
    """The algorithms that can run ``geom`` (what the autotuner measures)."""
    return [alg for (name, target), alg in sorted(_REGISTRY.items())
            if target == geom.target and alg.why_not(geom) is None]


def decide(algo: str, geom, pass_: str, op: str = "conv", family: str = "conv") -> Decision:
    """What a call of ``algo`` runs for ``geom`` and ``pass_`` now, why, and its workspace -- never measuring.

    The one answer to "which algorithm runs this" for everything that reports it (the FLOP counter, the
    benchmark's labels, ``fastconv info``): a named algorithm is :func:`choose`'s answer (refusals raise as
    there); for ``"auto"`` the autotuner's stored choice for this geometry's cache key when it has one
    (what the op runs), else the heuristic, asked with tuning off -- so a count on the meta device never
    runs the autotuner. Other families (``family=``, ``pass_="forward"``): the declared implementation
    ``algo='auto'`` prefers where it runs, else (``conv_transpose``) the conv decision for the adjoint's
    ``grad_input`` pass, as :func:`choose` runs it.
    """
    from . import autotune  # late: autotune imports this module

    if family != "conv":
        return _decide_in_family(family, algo, geom, op)

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


def _decide_in_family(family: str, algo: str, geom, op: str) -> Decision:
    if algo != "auto":
        impl = choose(algo, geom, "forward", op, family)
        return Decision(impl, f"requested algo={algo!r}", int(impl.workspace_bytes(geom)))
    for (_, target), impl in _FAMILY_REGISTRY.get(family, {}).items():
        if target == geom.target and impl.why_not(geom) is None:
            return Decision(impl, f"auto: {impl.name} runs it wherever it can ({impl.summary})",
                            int(impl.workspace_bytes(geom)))
    if family != "conv_transpose":
        impl = choose("auto", geom, "forward", op, family)  # raises: nothing registered for the target
        return Decision(impl, "auto", int(impl.workspace_bytes(geom)))
    try:
        conv = decide("auto", geom, "grad_input", op)
    except ValueError as e:
        raise ValueError(f"{e}{_ADJOINT_NOTE}") from None
    return Decision(_adjoint_of(conv.algorithm, geom.target), conv.reason, conv.workspace_bytes)
