"""How a custom op hands back its result."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor


def fresh(t: Tensor, shape: Optional[Sequence[int]] = None) -> Tensor:
    """``t`` (reshaped to ``shape``) as a tensor that is not a view.

    Kernels fill 5-D buffers that the ops reshape to the caller's rank. Returning that reshape as is
    makes autograd treat the op's output as a view of a hidden buffer, and any in-place op after it
    (``nn.ReLU(inplace=True)`` in every torchvision model) then fails. ``detach`` gives the same
    memory without the view bookkeeping.
    """
    if shape is not None:
        t = t.reshape(tuple(shape))
    return t.detach() if t._is_view() else t
