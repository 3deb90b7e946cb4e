"""Numba CPU kernels for the pooling ops (max, min, avg, adaptive avg/max, max_unpool), forward and backward.

One file per op family -- :mod:`.pool_max` (max/min + backward), :mod:`.pool_avg`,
:mod:`.pool_adaptive_avg`, :mod:`.pool_adaptive_max`, :mod:`.pool_unpool` -- and the shared pieces in
:mod:`.pool_common`; this module is their index (the names below) and the semantics they share.

numpy in, numpy out. Every kernel works on 5-D arrays ``(N, C, D, H, W)`` so one kernel serves 1-D, 2-D
and 3-D pooling: callers reshape (1-D: ``D = H = 1``; 2-D: ``D = 1``). Internally the ``N * C`` planes are
flattened into one axis and split over threads with ``prange``; each plane is processed one output row
at a time with the output row (``W``) as the innermost, vectorisable loop.

Semantics follow torch's CPU kernels exactly, including the visiting order inside a window (so ties give
the first index, a NaN wins and the *last* NaN in a window gives the index, and float sums are added in
the same order):

* max pool: ``if val > maxval or isnan(val)`` with ``maxval = -inf`` and ``maxindex`` = first in-bounds
  element of the window (``aten/src/ATen/native/cpu/MaxPoolKernel.cpp``);
* avg pool: ``divide_factor`` = ``divisor_override``, else the window clipped to input + padding
  (``count_include_pad``), else clipped to the input; a window with no input element gives 0
  (``AvgPoolKernel.cpp``);
* adaptive pools: ``start = floor(i * In / Out)``, ``end = ceil((i + 1) * In / Out)``; the average is
  ``sum / kd / kh / kw`` (``AdaptiveAvgPoolKernel.cpp``, ``AdaptiveMaxPoolKernel.cpp``);
* max_unpool: scatter into zeros, later elements of a plane overwrite earlier ones, an index outside
  the output plane is an error (``MaxUnpoolKernel.cpp``).

Geometry arguments are 3-tuples of ints ``(d, h, w)``. Indices are int64 flat offsets into one
``(D, H, W)`` plane, ``d * H * W + h * W + w``, as torch returns them.
"""
from __future__ import annotations

from .pool_adaptive_avg import adaptive_avg_pool_backward, adaptive_avg_pool_forward
from .pool_adaptive_max import adaptive_max_pool_forward
from .pool_avg import avg_pool_backward, avg_pool_forward
from .pool_common import EMPTY_WINDOW_INDEX, output_size  # noqa: F401
from .pool_max import (_max_pool_kernel_generic, _pool_extreme, max_pool_backward,  # noqa: F401  (tests reach
                       max_pool_forward, min_pool_forward)                          # the generic kernel)
from .pool_unpool import max_unpool_backward, max_unpool_forward

__all__ = [
    "output_size",
    "max_pool_forward",
    "max_pool_backward",
    "min_pool_forward",
    "avg_pool_forward",
    "avg_pool_backward",
    "adaptive_avg_pool_forward",
    "adaptive_avg_pool_backward",
    "adaptive_max_pool_forward",
    "max_unpool_forward",
    "max_unpool_backward",
]
