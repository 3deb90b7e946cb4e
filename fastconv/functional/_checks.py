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
