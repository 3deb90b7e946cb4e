"""The Numba pooling kernels (``fastconv.cpu.pool_*``, one file per family) declared as the ``"numba"`` pooling target: :data:`POOL_IMPLS`.

Registers nothing (:mod:`fastconv.ops.catalog` does). The kernels take and return numpy arrays;
``Tensor.numpy()`` and ``torch.from_numpy`` share memory, so this seam copies nothing.
"""
from __future__ import annotations

import torch

from . import pool_adaptive_avg, pool_adaptive_max, pool_avg, pool_max, pool_unpool


def _np(t: torch.Tensor):
    return t.detach().numpy()


class NumbaPoolKernels:
    """:class:`fastconv.spec.PoolKernels` on the CPU through Numba."""

    def max_pool(self, x, kernel, stride, padding, dilation, out_spatial, minimum):
        run = pool_max.min_pool_forward if minimum else pool_max.max_pool_forward
        y, idx = run(_np(x), kernel, stride, padding, dilation, out_spatial, True)
        return torch.from_numpy(y), torch.from_numpy(idx)

    def max_pool_values(self, x, kernel, stride, padding, dilation, out_spatial, minimum):
        """:meth:`max_pool`'s values only (no indices: the separable kernel for 1-D and 2-D windows)."""
        run = pool_max.min_pool_forward if minimum else pool_max.max_pool_forward
        return torch.from_numpy(run(_np(x), kernel, stride, padding, dilation, out_spatial, False)[0])

    def max_pool_backward_from_values(self, grad_out, x, y, kernel, stride, padding, dilation, minimum):
        """:meth:`max_pool_backward` at the indices :meth:`max_pool` would return, found again from the input
        ``x`` and the pooled values ``y`` (a training forward then runs :meth:`max_pool_values`)."""
        return torch.from_numpy(pool_max.max_pool_backward_from_values(_np(grad_out), _np(x), _np(y), kernel, stride,
                                                                        padding, dilation, minimum))

    def max_pool_backward(self, grad_out, indices, in_spatial):
        return torch.from_numpy(pool_max.max_pool_backward(_np(grad_out), _np(indices), in_spatial))

    def adaptive_max_pool(self, x, out_spatial):
        y, idx = pool_adaptive_max.adaptive_max_pool_forward(_np(x), out_spatial)
        return torch.from_numpy(y), torch.from_numpy(idx)

    def max_unpool(self, x, indices, out_spatial):
        return torch.from_numpy(pool_unpool.max_unpool_forward(_np(x), _np(indices), out_spatial))

    def max_unpool_backward(self, grad_out, indices):
        return torch.from_numpy(pool_unpool.max_unpool_backward(_np(grad_out), _np(indices)))

    def avg_pool(self, x, kernel, stride, padding, out_spatial, ceil_mode, count_include_pad, divisor_override):
        return torch.from_numpy(pool_avg.avg_pool_forward(_np(x), kernel, stride, padding, out_spatial, ceil_mode,
                                                          count_include_pad, divisor_override))

    def avg_pool_backward(self, grad_out, kernel, stride, padding, in_spatial, ceil_mode, count_include_pad,
                          divisor_override):
        return torch.from_numpy(pool_avg.avg_pool_backward(_np(grad_out), kernel, stride, padding, in_spatial,
                                                           ceil_mode, count_include_pad, divisor_override))

    #: :meth:`adaptive_avg_pool` takes a contiguous input of any rank with the result's ``shape`` (see there).
    reads_contiguous_any_rank = True

    def adaptive_avg_pool(self, x, out_spatial, shape=None):
        """``shape`` given: ``x`` is any contiguous (N, C, *S), read as the kernel's (N, C, D, H, W) array, and the
        result comes back in ``shape``, both reshaped in numpy (no tensor views: a squeeze-and-excitation
        block's pool at batch 1 spent 17 µs around an 11 µs kernel)."""
        a = _np(x)
        if shape is None:
            return torch.from_numpy(pool_adaptive_avg.adaptive_avg_pool_forward(a, out_spatial))
        a = a.reshape(a.shape[:2] + (1,) * (5 - a.ndim) + a.shape[2:])
        return torch.from_numpy(pool_adaptive_avg.adaptive_avg_pool_forward(a, out_spatial).reshape(shape))

    def adaptive_avg_pool_backward(self, grad_out, in_spatial):
        return torch.from_numpy(pool_adaptive_avg.adaptive_avg_pool_backward(_np(grad_out), in_spatial))


#: target -> pooling kernels (registered by :mod:`fastconv.ops.catalog`).
POOL_IMPLS = {"numba": NumbaPoolKernels()}
