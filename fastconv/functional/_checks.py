"""Argument checks shared by the functional API. Every check runs before any kernel does.

Messages name the function and the argument, say what was expected and what came, and give the fix
when there is one. Exception types follow torch: RuntimeError where torch's functional raises it,
TypeError for a wrong Python type, ValueError for a bad value of a keyword of our own (``algo``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float64)
IntOrSeq = Union[int, Sequence[int]]


def check_tensor(op: str, arg: str, t, *, optional: bool = False) -> Optional[Tensor]:
    """``t`` must be a floating tensor fastconv supports (float32 or float64)."""
    if t is None and optional:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        if t.is_floating_point():
            raise RuntimeError(
                f"{op}: {arg} has dtype {t.dtype}, which fastconv does not support "
                f"(expected torch.float32 or torch.float64); cast with {arg}.float()")
        raise RuntimeError(
            f"{op}: {arg} has dtype {t.dtype}; expected a floating tensor (torch.float32 or torch.float64); "
            f"convolution is not implemented for integer, bool or complex tensors")
    return t


def check_same(op: str, ref_name: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    """Other tensors must share ``ref``'s dtype and device (torch refuses mixed ones too)."""
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != ref.dtype:
            raise RuntimeError(
                f"{op}: {ref_name} has dtype {ref.dtype} but {name} has dtype {t.dtype}; "
                f"they must be the same (cast {name} with .to({ref_name}.dtype))")
        if t.device != ref.device:
            raise RuntimeError(
                f"{op}: {ref_name} is on {ref.device} but {name} is on {t.device}; "
                f"they must be on the same device")


def int_tuple(op: str, arg: str, value, ndim: int, *, minimum: int) -> tuple[int, ...]:
    """Normalise an int or a sequence of 1 or ``ndim`` ints, each >= ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{op}: {arg} must be an int or a tuple of {ndim} ints, got {value!r}")
    if isinstance(value, int):
        values = (value,) * ndim
    elif isinstance(value, (tuple, list, torch.Size)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        values = tuple(value)
        if len(values) == 1:
            values = values * ndim
        if len(values) != ndim:
            raise RuntimeError(f"{op}: expected {arg} to be a single int or a tuple of {ndim} ints, "
                               f"got {len(values)} values {tuple(value)}")
    else:
        raise TypeError(f"{op}: {arg} must be an int or a tuple of {ndim} ints, got {value!r}")
    for v in values:
        if v < minimum:
            what = "positive" if minimum == 1 else "non-negative"
            sign = "non-positive" if minimum == 1 else "negative"
            raise RuntimeError(f"{op}: {sign} {arg} is not supported: got {arg}={values}; each value must be "
                               f"{what}")
    return values


def check_groups(op: str, groups) -> int:
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"{op}: groups must be an int, got {groups!r}")
    if groups <= 0:
        raise RuntimeError(f"{op}: non-positive groups is not supported: got groups={groups}")
    return groups


def batched(op: str, arg: str, t: Tensor, ndim: int) -> tuple[Tensor, bool]:
    """Accept (C, *S) unbatched or (N, C, *S) batched input with ``ndim`` spatial dims.

    Returns the batched tensor and whether the caller must drop the batch dim again.
    """
    if t.dim() == ndim + 2:
        return t, False
    if t.dim() == ndim + 1:
        return t.unsqueeze(0), True
    raise RuntimeError(
        f"{op}: expected {arg} to be {ndim + 1}-D (unbatched) or {ndim + 2}-D (batched), "
        f"got {t.dim()}-D {arg} of size {list(t.shape)}")
