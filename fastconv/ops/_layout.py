"""channels_last in, channels_last out: torch's rule for the memory format of a conv or pooling result.

torch gives a convolution the memory format its input suggests, or its weight's when the weight is
channels_last; pooling follows its input. Most of fastconv's kernels read and write (N, C, *S) contiguous tensors
(the ops copy at their boundary); the ones that declare ``"channels_last"`` in their layouts (the CPU im2col, the
tensor-core conv) read channels-last operands as they are and write channels-last results. The conv ops promise
one layout per call whatever the algorithm (:func:`op_result`, which their fake kernels follow too, so
``torch.compile`` and ``opcheck`` see the strides the real kernels give), and the functional layer lays out the
results of the other ops as the caller's tensors suggest.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def suggested_format(t: Optional[Tensor]) -> Optional[torch.memory_format]:
    """``channels_last`` (4-D) or ``channels_last_3d`` (5-D) when ``t`` is laid out so and not also plainly
    contiguous (a tensor that is both, such as (N, C, 1, 1), suggests nothing), else None."""
    if t is None:
        return None
    fmt = _FORMATS.get(t.dim())
    if fmt is None or t.is_contiguous():
        return None
    try:
        return fmt if t.is_contiguous(memory_format=fmt) else None
    except RuntimeError:
        # torch.func.vmap's batched tensors answer only the contiguous-format query: no layout to keep there
        return None


def result_format(*tensors: Optional[Tensor]) -> Optional[torch.memory_format]:
    """The first channels_last format any of ``tensors`` (input first, then weight) suggests, or None."""
    for t in tensors:
        fmt = suggested_format(t)
        if fmt is not None:
            return fmt
    return None


def laid_out(out: Tensor, fmt: Optional[torch.memory_format]) -> Tensor:
    """``out`` in memory format ``fmt`` (unchanged when None or already so)."""
    if fmt is None or out.dim() != (4 if fmt is torch.channels_last else 5):
        return out
    return out.contiguous(memory_format=fmt)


def op_result(out: Tensor, fmt: Optional[torch.memory_format]) -> Tensor:
    """``out`` exactly in memory format ``fmt``, or plainly contiguous when ``fmt`` is None: the layout a conv
    op promises (a kernel may hand back a channels-last or a contiguous buffer; no copy when it already matches)."""
    if fmt is None or out.dim() != (4 if fmt is torch.channels_last else 5):
        return out if out.is_contiguous() else out.contiguous()
    return out if out.is_contiguous(memory_format=fmt) else out.contiguous(memory_format=fmt)


def empty_result(like: Tensor, shape, dtype: torch.dtype, fmt: Optional[torch.memory_format]) -> Tensor:
    """A fake kernel's result: ``shape`` on ``like``'s device, laid out as :func:`op_result` would."""
    out = like.new_empty(shape, dtype=dtype)
    return op_result(out, fmt)
