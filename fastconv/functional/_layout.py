"""channels_last in, channels_last out: torch's rule for the memory format of a conv or pooling result.

torch gives a convolution the memory format its input suggests, or its weight's when the weight is
channels_last; pooling follows its input. fastconv's kernels read and write (N, C, *S) contiguous tensors, so the
ops convert at their boundary (``contiguous()``) and this layer lays the result out as the caller's tensors
suggest. Kernels that could read NHWC directly (depthwise and pooling over a channel vector per pixel, a 1x1
conv as one GEMM over (N*H*W, C)) would make both copies unnecessary; see the README's channels_last note.
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
