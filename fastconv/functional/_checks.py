"""Argument checks of the functional API: the ops layer's validation, one implementation.

:mod:`fastconv.ops.validation` holds every check (the registered ops run it before any kernel); this
module only names the helpers the functional layer uses to normalise torch-style arguments (an int or a
tuple, unbatched input) before it calls an op, which then validates shapes, dtypes and devices itself.
"""
from __future__ import annotations

from ..ops.validation import (  # noqa: F401  (re-exported for fastconv.functional)
    SUPPORTED_DTYPES,
    IntOrSeq,
    batched,
    check_groups,
    check_pool_output,
    check_pool_padding,
    check_same,
    check_tensor,
    check_type,
    int_tuple,
    max_pool_dtypes,
)


def plain(value) -> bool:
    """``value`` is an int (not a bool), a str, None, or a tuple of such ints: a form that a memo keyed by value
    may reuse for it. Others must take the full checks: as dict keys ``1 == 1.0 == True``, so a memo made by
    ``stride=1`` would otherwise answer ``stride=1.0`` or ``stride=True``, which the checks refuse."""
    kind = type(value)
    if kind is tuple:
        for v in value:  # a loop, not all(<generator>): half the time, and every nn layer call checks four
            if type(v) is not int:
                return False
        return True
    return kind is int or kind is str or value is None
