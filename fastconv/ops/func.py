"""torch.func (grad, jacrev, vjp, vmap over grad) through fastconv's ops.

Each op's autograd is registered with ``register_autograd`` (what opcheck, torch.compile and FlopCounterMode
understand). In torch 2.13 that registration builds a legacy ``torch.autograd.Function`` (``forward(ctx, ...)``
with no ``setup_context`` staticmethod), and ``Function.apply`` refuses such a class under any functorch
transform: "In order to use an autograd.Function with functorch transforms ... it must override the
setup_context staticmethod" (pytorch/pytorch#168393, #170834, #179652).

The fix upstream (pytorch/pytorch#171305, #184974) builds the same wrapper on
``torch.autograd.function._SingleLevelFunction`` and applies it under
``enable_single_level_autograd_function()`` -- what functorch itself does for the autograd nodes it creates
inside a transform (``torch._functorch.autograd_function.custom_function_call_grad``): the node is recorded at
the transform level that is current when the op is called, so ``grad``, nested ``grad`` and ``vmap(grad)`` all
see ordinary autograd. This module applies that fix to fastconv's ops only: it re-registers each op's Autograd
kernel with such a wrapper around the very setup_context/backward that ``register_autograd`` received. Outside
a transform the wrapper is what ``Function.apply`` would have run (the C++ apply), so eager autograd, double
backward, opcheck and torch.compile are unchanged.

Forward mode (``torch.func.jvp``, ``jacfwd``, ``hessian`` = jacfwd(jacrev), ``torch.autograd.forward_ad``) uses
the rules of :mod:`fastconv.ops.jvp`; an op without one (the separable conv) raises a NotImplementedError that
names it, instead of the zero tangent ``register_autograd``'s wrapper hands back. Batching rules for vmap are in
:mod:`fastconv.ops.batching`.

Private torch API used: ``torch._library.custom_ops.OPDEFS``, ``torch._library.utils.fill_defaults``,
``torch.autograd.function._SingleLevelFunction``,
``torch._C._functorch.{get,set}_single_level_autograd_function_allowed`` (what
``torch._functorch.utils.enable_single_level_autograd_function`` sets).
If a torch version lacks one of them, or refuses to replace a registered kernel, :func:`install` leaves the ops
as ``register_autograd`` made them.
"""
from __future__ import annotations

import warnings

import torch
from torch import _C
from torch.autograd import forward_ad

from . import jvp as jvp_rules

_INSTALLED: dict[str, object] = {}


def _has_tangent(args) -> bool:
    return any(isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args)


def _make_autograd_kernel(opdef):
    """The Autograd-key kernel for one custom op: torch's generated wrapper, on a single-level Function."""
    from torch._C._functorch import get_single_level_autograd_function_allowed as get_allowed
    from torch._C._functorch import set_single_level_autograd_function_allowed as set_allowed
    from torch._functorch.utils import unwrap_dead_wrappers
    from torch._library import utils as library_utils

    op = opdef._opoverload
    schema = op._schema
    label = f"fastconv.{op._opname}"
    after_autograd = _C._after_autograd_keyset
    below_autograd = _C._AutoDispatchBelowAutograd
    # The operator handle, found once: ``OpOverload.redispatch`` looks the schema up again on every call.
    handle = getattr(op, "_handle", None)
    redispatch = handle.redispatch_boxed if handle is not None else op.redispatch
    # ``fill_defaults(schema, args, {})`` without its per-call walk over ``schema.arguments`` (which builds
    # every Argument object anew, about a third of a small training step's host time): the dispatcher drops
    # trailing arguments equal to their defaults, and none of these ops has keyword-only arguments.
    arguments = schema.arguments
    defaults = tuple(a.default_value for a in arguments)
    positional = not any(a.kwarg_only for a in arguments)

    def full_args(args) -> tuple:
        if not positional:
            return library_utils.fill_defaults(schema, args, {})[0]
        n = len(args)
        return args if n == len(defaults) else (*args, *defaults[n:])

    def forward_no_grad(keyset, args):
        with below_autograd():
            return redispatch(keyset & after_autograd, *args)

    def forward(ctx, *args):
        keyset = args[-1]
        args = args[:-1]
        # Function.apply turns gradients (reverse and forward) off for forward; an outer transform level
        # (grad(grad(f)), jacrev(jacrev(f)), jacfwd(jacrev(f))) must still see the op, as functorch's own
        # single-level functions allow it (torch._functorch.autograd_function.generate_single_level_function).
        with _C._AutoDispatchBelowAutograd():
            if _C._are_functorch_transforms_active():
                with torch.enable_grad(), forward_ad._set_fwd_grad_enabled(True):
                    result = redispatch(keyset & after_autograd, *args)
            else:  # plain autograd: nothing below this op records gradients (3 us saved per call)
                result = redispatch(keyset & after_autograd, *args)
            # the dispatcher drops arguments equal to their defaults; setup_context expects every one
            full = full_args(args)
            opdef._setup_context_fn(ctx=ctx, inputs=full, output=result)
        if forward_ad._current_level >= 0:  # forward mode may ask for the jvp: keep what it reads
            ctx.fastconv_primals, ctx.fastconv_output = full, result
        return result

    def backward(ctx, *grads):
        prev = ctx.needs_input_grad
        try:
            ctx.needs_input_grad = prev[:-1]  # without the keyset argument
            result = opdef._backward_fn(ctx, *grads)
        finally:
            ctx.needs_input_grad = prev
        return (*result, None) if isinstance(result, tuple) else (result, None)

    jvp_rule = jvp_rules.rule(op._opname)

    def refuse_forward_mode():
        raise NotImplementedError(
            f"{label}: forward-mode automatic differentiation (torch.func.jvp, jacfwd, hessian, "
            f"torch.autograd.forward_ad) is not implemented for this fastconv op; use reverse mode "
            f"(torch.func.grad, vjp, jacrev, or jacrev(jacrev(f)) for second derivatives)")

    def jvp(ctx, *tangents):
        if jvp_rule is None:
            refuse_forward_mode()
        return jvp_rule(op, ctx.fastconv_primals, tangents[:-1], ctx.fastconv_output)

    # ``unwrap_dead_wrappers(args)`` (torch._functorch.utils) looks at every argument; only the schema's Tensor
    # and Tensor? arguments can hold a tensor here (the dispatcher hands lists as lists of ints), so only those
    # are looked at. An op with other tensor-bearing arguments (Tensor[]) keeps torch's function.
    tensor_at = []
    for i, a in enumerate(arguments):
        kind = a.type
        if isinstance(kind, torch.OptionalType):
            kind = kind.getElementType()
        if isinstance(kind, torch.TensorType):
            tensor_at.append(i)
        elif "Tensor" in str(kind):
            tensor_at = None
            break
    unwrap_if_dead = getattr(torch._C._functorch, "unwrap_if_dead", None)  # what unwrap_dead_wrappers calls
    if unwrap_if_dead is None:
        tensor_at = None

    def unwrap(args):
        if tensor_at is None:
            return unwrap_dead_wrappers(args)
        args = list(args)
        n = len(args)
        for i in tensor_at:
            if i < n and args[i] is not None:
                args[i] = unwrap_if_dead(args[i])
        return args

    function = type(f"FastconvBackward_{op._opname}", (torch.autograd.function._SingleLevelFunction,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward),
                     "jvp": staticmethod(jvp)})

    def autograd_kernel(keyset, *args):
        tangent = forward_ad._current_level >= 0 and _C._is_fwd_grad_enabled() and _has_tangent(args)
        if tangent and jvp_rule is None:
            # without this the op would run on the primals only and hand back a zero tangent: silently wrong
            refuse_forward_mode()
        if tangent or (_C.is_grad_enabled() and _C._any_requires_grad(*args)):
            # enable_single_level_autograd_function(), without a generator context manager's 2 us per call
            previous = get_allowed()
            set_allowed(True)
            try:
                return function.apply(*unwrap(args), keyset)
            finally:
                set_allowed(previous)
        return forward_no_grad(keyset, args)

    return autograd_kernel


def install() -> list[str]:
    """Re-register the Autograd kernel of every fastconv op that has a ``register_autograd`` formula.

    Returns the names of the ops it covered. Idempotent. Call after every ``register_autograd`` of the ops."""
    try:
        from torch._C._functorch import (get_single_level_autograd_function_allowed,  # noqa: F401
                                         set_single_level_autograd_function_allowed)
        from torch._functorch.utils import unwrap_dead_wrappers  # noqa: F401
        from torch._library.custom_ops import OPDEFS
        from torch._library.utils import fill_defaults  # noqa: F401

        torch.autograd.function._SingleLevelFunction  # noqa: B018
    except (ImportError, AttributeError):  # a torch without these: keep register_autograd's own wrapper
        return []
    for qualname, opdef in OPDEFS.items():
        if not qualname.startswith("fastconv::") or opdef._backward_fn is None or qualname in _INSTALLED:
            continue
        kernel = _make_autograd_kernel(opdef)
        if not _replace_autograd_kernel(opdef, kernel):
            return sorted(_INSTALLED)  # this torch refuses the override: every op keeps register_autograd's kernel
        _INSTALLED[qualname] = kernel
    return sorted(_INSTALLED)


def _replace_autograd_kernel(opdef, kernel) -> bool:
    """Register ``kernel`` as ``opdef``'s Autograd kernel over the one ``register_autograd`` made; False when
    this torch refuses (the op keeps its kernel).

    ``Library.impl`` refuses a second Python kernel for one (op, dispatch key) unless ``allow_override=True``
    (torch 2.13's default): on torch 2.11 (the GPU machine's), called without it, ``import fastconv`` failed
    with "This is not allowed since there's already a kernel registered from python overriding conv1d's
    behavior for Autograd dispatch key and fastconv namespace". A torch without the argument gets the same
    effect by forgetting the first registration in ``torch.library._impls``, the set that check reads (the
    dispatcher itself replaces a kernel with a warning)."""
    with warnings.catch_warnings():
        # replacing register_autograd's kernel is the point; the dispatcher's override warning is noise
        warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
        try:
            opdef._lib.impl(opdef._name, kernel, "Autograd", with_keyset=True, allow_override=True)
            return True
        except TypeError:  # no allow_override argument in this torch
            pass
        except RuntimeError:
            return False
        impls = getattr(torch.library, "_impls", None)
        key = f"{opdef._lib.ns}/{opdef._name}/Autograd"
        if isinstance(impls, set):
            impls.discard(key)
        try:
            opdef._lib.impl(opdef._name, kernel, "Autograd", with_keyset=True)
        except RuntimeError:
            return False
        return True
