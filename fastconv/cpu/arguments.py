"""Geometry arguments of the kernel entry points as tuples of Python ints, memoised.

Every entry point normalises its ``stride``, ``padding``, ``dilation`` and shape arguments (tuples, lists or
numpy integers) to tuples of ints before they reach Numba (one compiled signature per argument kind). Built
afresh that cost about 0.8 µs per argument, 3 µs of a small call's host time; a model passes the same few
tuples again and again, so the answers are remembered.
"""
from __future__ import annotations

_INT_TUPLES: dict = {}
#: Entries kept; when full the table starts over.
INT_TUPLES_MAX = 4096


def int_tuple(values) -> tuple:
    """``tuple(int(v) for v in values)``: remembered for hashable ``values`` (equal keys give equal ints)."""
    try:
        known = _INT_TUPLES.get(values)
    except TypeError:  # a list: unhashable
        return tuple(map(int, values))
    if known is None:
        known = tuple(map(int, values))
        if len(_INT_TUPLES) >= INT_TUPLES_MAX:
            _INT_TUPLES.clear()
        _INT_TUPLES[values] = known
    return known
