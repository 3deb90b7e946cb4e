"""float16 / bfloat16 through kernels that compute in float32: upcast at the op boundary, round once.

torch's CPU convolution and pooling on half tensors accumulate in float32 and round the result to the input
dtype once (its "opmath" type). fastconv's Numba kernels and its SIMT CUDA kernels are written for float32 and
float64 only, so every registered op's implementation is wrapped with :func:`compute_in_float32`: when its
floating tensor arguments are all float16 (or all bfloat16) they are converted to float32, the unchanged
implementation runs, and each floating result is rounded back to the input dtype. Gradient ops are wrapped the
same way, so a half forward has a half backward.

Why a wrapper and not a dtype per kernel: one conversion per argument costs a copy of the input, but keeps the
kernels (and their Numba specialisations) at two dtypes and the op bodies untouched. A kernel that reads half
itself (the tensor-core conv on CUDA) is declared in :data:`NATIVE_HALF` and then receives the half tensors.

Mixed dtypes (half input, float32 weight) are not converted: the op's validation raises torch's error for them.
Integer tensors (max-pooling indices, integer max-pool inputs) pass through untouched.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor

from .. import backends

#: Dtypes computed in float32 and rounded once, as torch's CPU kernels do.
HALF_DTYPES = (torch.float16, torch.bfloat16)
_HALF_SET = frozenset(HALF_DTYPES)

#: ``(target, op)`` pairs whose kernels take float16/bfloat16 themselves: the wrapper hands them the half tensors
#: unchanged. The CUDA pooling kernels (kernels/pool.cu) are instantiated for ``__half`` and ``__nv_bfloat16``,
#: read and write 16 bits and compute in float32 (max/min compare in float32, NaN-propagating as the float path),
#: rounding once, so every pooling op skips the float32 copies on the GPU and on the harness; the same holds
#: for the convolution kernels (kernels/conv.cu's SIMT algorithms and the tensor-core conv).
NATIVE_HALF: set[tuple[str, str]] = {
    (target, op) for target in ("cuda", "cuda-emu")
    for op in ("max_pool", "max_pool_backward", "max_unpool", "max_unpool_backward", "adaptive_max_pool",
               "avg_pool", "avg_pool_backward", "adaptive_avg_pool", "adaptive_avg_pool_backward",
               # convolutions: every CUDA algorithm takes 16-bit tensors (kernels/conv.cu, conv_tc.cu)
               *(f"conv{n}d{p}" for n in (1, 2, 3) for p in ("", "_grad_input", "_grad_weight")))}


def half_dtype(args, kwargs=None) -> torch.dtype | None:
    """The half dtype every floating tensor argument shares, or None (no half tensor, or mixed dtypes)."""
    found = None
    for a in (*args, *(kwargs or {}).values()):
        if isinstance(a, Tensor) and a.is_floating_point():
            if found is None:
                found = a.dtype
            elif a.dtype != found:
                return None  # mixed: leave them for validation to refuse with torch's message
    return found if found in HALF_DTYPES else None


def _up(a: Any) -> Any:
    return a.float() if isinstance(a, Tensor) and a.dtype in HALF_DTYPES else a


def _down(out: Any, dtype: torch.dtype) -> Any:
    if isinstance(out, Tensor):
        return out.to(dtype) if out.dtype == torch.float32 else out
    if isinstance(out, (tuple, list)):
        return type(out)(_down(o, dtype) for o in out)
    return out


def _first_tensor(args, kwargs) -> Tensor:
    return next(a for a in (*args, *kwargs.values()) if isinstance(a, Tensor))


def compute_in_float32(op: str) -> Callable:
    """Decorator for a registered op's implementation: float16/bfloat16 arguments are computed in float32 and
    the floating results rounded once to the arguments' dtype (see the module docstring)."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def impl(*args, **kwargs):
            # Fast path (every call pays it): each op's first argument is its main tensor; when that is not
            # half, nothing is converted (a half tensor elsewhere is a dtype mismatch validation refuses).
            if getattr(args[0] if args else None, "dtype", None) not in _HALF_SET:
                return fn(*args, **kwargs)
            dtype = half_dtype(args, kwargs)
            if dtype is None:
                return fn(*args, **kwargs)
            if NATIVE_HALF and (backends.target_for(_first_tensor(args, kwargs)), op) in NATIVE_HALF:
                return fn(*args, **kwargs)
            out = fn(*(_up(a) for a in args), **{k: _up(v) for k, v in kwargs.items()})
            return _down(out, dtype)
        return impl
    return wrap
