"""Host side of ``kernels/pool.cu``: :class:`fastconv.spec.PoolKernels` on the CUDA kernels (:data:`POOL_IMPLS`).

Tensors are contiguous 5-D (N, C, D, H, W), processed as P = N*C planes. Pooling kernel argument
order (kernels/common.cuh ``POOL_PARAMS``): P, D, H, W, OD, OH, OW, kd, kh, kw, sd, sh, sw, pd, ph,
pw, dd, dh, dw, all int32.

Kernels are templates launched by name expression (:func:`~fastconv.cuda.launch.instance`:
``"max_pool_forward<float>"``), instantiated for float32, float64, float16 (``__half``) and bfloat16
(``__nv_bfloat16``); 16-bit tensors are read and written as such and computed in float32
(``precision.NATIVE_HALF`` lets them through without a float32 copy).
"""
from __future__ import annotations

import math

import torch

from .launch import BLOCK, INT32_MAX, Launcher, i32, instance, plane_grid


def _planes(t: torch.Tensor) -> int:
    p = t.shape[0] * t.shape[1]
    if p > INT32_MAX or math.prod(t.shape[2:]) > INT32_MAX:
        raise RuntimeError(f"fastconv CUDA pooling: tensor of shape {tuple(t.shape)} has N*C or a plane of "
                           f"2**31 elements or more, which the kernels do not index")
    return p


def _pool_args(x_shape, out_spatial, kernel, stride, padding, dilation):
    return tuple(i32(v) for v in (x_shape[0] * x_shape[1], *x_shape[2:], *out_spatial, *kernel, *stride,
                                  *padding, *dilation))


def _check_err(err: torch.Tensor, message: str) -> None:
    """Fail if a kernel flagged a bad index, without a host sync: on the GPU a device-side assert
    (the stream stops, like torch's own CUDA kernels); on the harness (CPU) it raises
    RuntimeError(message) at once."""
    torch._assert_async(err == 0, message)


class CudaPoolKernels:
    """The pooling protocol on the CUDA kernels (GPU or CPU harness, chosen by the tensor's target)."""

    def max_pool(self, x, kernel, stride, padding, dilation, out_spatial, minimum):
        L = Launcher(x)
        n, c = x.shape[:2]
        y = L.empty((n, c, *out_spatial), x.dtype)
        ind = L.empty((n, c, *out_spatial), torch.int64)
        if y.numel() == 0:
            return y, ind
        P = _planes(x)
        L.launch("pool", instance("max_pool_forward", x.dtype), plane_grid(P, math.prod(out_spatial)), (BLOCK,),
                 (x, y, ind), (i32(bool(minimum)), *_pool_args(x.shape, out_spatial, kernel, stride, padding, dilation)))
        return y, ind

    def max_pool_backward(self, grad_out, indices, in_spatial, window=None):
        """Scatter-add of ``grad_out`` at ``indices`` into a zero (N, C, *in_spatial) tensor, as gathers.

        ``window`` = (kernel, stride, padding, dilation) triples, when the indices come from
        max_pool with that window: one gather over the outputs whose window can hold each input.
        Without it (any indices): integer claims (first output, count per input), then a gather
        from each input's first output. Both add in output order and use no float atomics.
        """
        L = Launcher(grad_out)
        n, c = grad_out.shape[:2]
        in_spatial = tuple(int(v) for v in in_spatial)
        if grad_out.numel() == 0 or n * c * math.prod(in_spatial) == 0:
            return L.zeros((n, c, *in_spatial), grad_out.dtype)
        gx = L.empty((n, c, *in_spatial), grad_out.dtype)
        P = _planes(gx)
        in_plane, out_plane = math.prod(in_spatial), math.prod(grad_out.shape[2:])
        _planes(grad_out)
        err = L.zeros((1,), torch.int32)
        indices = indices.contiguous()
        if window is not None:
            kernel, stride, padding, dilation = window
            L.launch("pool", instance("max_pool_backward_window", grad_out.dtype), plane_grid(P, in_plane), (BLOCK,),
                     (grad_out, indices, gx, err),
                     _pool_args(gx.shape, grad_out.shape[2:], kernel, stride, padding, dilation))
        else:
            first = L.full(gx.shape, INT32_MAX, torch.int32)
            count = L.zeros(gx.shape, torch.int32)
            L.launch("pool", "max_pool_backward_claims", plane_grid(P, out_plane), (BLOCK,),
                     (indices, first, count, err), (i32(P), i32(in_plane), i32(out_plane)))
            L.launch("pool", instance("max_pool_backward_gather", grad_out.dtype), plane_grid(P, in_plane), (BLOCK,),
                     (grad_out, indices, first, count, gx), (i32(P), i32(in_plane), i32(out_plane)))
        _check_err(err, f"max_pool_backward: found an index outside [0, {in_plane}) "
                        f"(input plane {'x'.join(map(str, in_spatial))})")
        return gx

    def adaptive_max_pool(self, x, out_spatial):
        L = Launcher(x)
        n, c = x.shape[:2]
        y = L.empty((n, c, *out_spatial), x.dtype)
        ind = L.empty((n, c, *out_spatial), torch.int64)
        if y.numel() == 0:
            return y, ind
        P = _planes(x)
        L.launch("pool", instance("adaptive_max_pool_forward", x.dtype), plane_grid(P, math.prod(out_spatial)),
                 (BLOCK,), (x, y, ind), (i32(P), *map(i32, x.shape[2:]), *map(i32, out_spatial)))
        return y, ind

    def max_unpool(self, x, indices, out_spatial):
        L = Launcher(x)
        n, c = x.shape[:2]
        y = L.empty((n, c, *out_spatial), x.dtype)
        if y.numel() == 0:
            return y
        if x.numel() == 0:
            return y.zero_()
        P = _planes(x)
        in_plane, out_plane = math.prod(x.shape[2:]), math.prod(out_spatial)
        owner = L.zeros((n, c, *out_spatial), torch.int64)
        err = L.zeros((1,), torch.int32)
        L.launch("pool", "max_unpool_owner", plane_grid(P, in_plane), (BLOCK,),
                 (indices.contiguous(), owner, err), (i32(P), i32(in_plane), i32(out_plane)))
        _check_err(err, f"max_unpool: found an invalid max index (output volume is of size {out_plane}, "
                        f"expected 0 <= index < {out_plane})")
        L.launch("pool", instance("max_unpool_gather", x.dtype), plane_grid(P, out_plane), (BLOCK,),
                 (x, owner, y), (i32(P), i32(in_plane), i32(out_plane)))
        return y

    def max_unpool_backward(self, grad_out, indices):
        L = Launcher(grad_out)
        gx = L.empty(tuple(indices.shape), grad_out.dtype)
        if gx.numel() == 0:
            return gx
        P = _planes(indices)
        in_plane, out_plane = math.prod(indices.shape[2:]), math.prod(grad_out.shape[2:])
        err = L.zeros((1,), torch.int32)
        L.launch("pool", instance("max_unpool_backward", grad_out.dtype), plane_grid(P, in_plane), (BLOCK,),
                 (grad_out, indices.contiguous(), gx, err), (i32(P), i32(in_plane), i32(out_plane)))
        _check_err(err, f"max_unpool_backward: found an invalid max index (gradient plane is of size {out_plane}, "
                        f"expected 0 <= index < {out_plane})")
        return gx

    def avg_pool(self, x, kernel, stride, padding, out_spatial, ceil_mode, count_include_pad, divisor_override):
        L = Launcher(x)
        n, c = x.shape[:2]
        y = L.empty((n, c, *out_spatial), x.dtype)
        if y.numel() == 0:
            return y
        P = _planes(x)
        L.launch("pool", instance("avg_pool_forward", x.dtype), plane_grid(P, math.prod(out_spatial)), (BLOCK,),
                 (x, y), (i32(bool(count_include_pad)), i32(divisor_override or 0),
                          *_pool_args(x.shape, out_spatial, kernel, stride, padding, (1, 1, 1))))
        return y

    def avg_pool_backward(self, grad_out, kernel, stride, padding, in_spatial, ceil_mode, count_include_pad,
                          divisor_override):
        L = Launcher(grad_out)
        n, c = grad_out.shape[:2]
        gx = L.empty((n, c, *in_spatial), grad_out.dtype)
        if gx.numel() == 0:
            return gx
        if grad_out.numel() == 0:
            return gx.zero_()
        P = _planes(gx)
        L.launch("pool", instance("avg_pool_backward", grad_out.dtype), plane_grid(P, math.prod(in_spatial)),
                 (BLOCK,), (grad_out, gx), (i32(bool(count_include_pad)), i32(divisor_override or 0),
                                          *_pool_args(gx.shape, grad_out.shape[2:], kernel, stride, padding, (1, 1, 1))))
        return gx

    def adaptive_avg_pool(self, x, out_spatial):
        L = Launcher(x)
        n, c = x.shape[:2]
        y = L.empty((n, c, *out_spatial), x.dtype)
        if y.numel() == 0:
            return y
        P = _planes(x)
        L.launch("pool", instance("adaptive_avg_pool_forward", x.dtype), plane_grid(P, math.prod(out_spatial)),
                 (BLOCK,), (x, y), (i32(P), *map(i32, x.shape[2:]), *map(i32, out_spatial)))
        return y

    def adaptive_avg_pool_backward(self, grad_out, in_spatial):
        L = Launcher(grad_out)
        n, c = grad_out.shape[:2]
        gx = L.empty((n, c, *in_spatial), grad_out.dtype)
        if gx.numel() == 0:
            return gx
        if grad_out.numel() == 0:
            return gx.zero_()
        P = _planes(gx)
        L.launch("pool", instance("adaptive_avg_pool_backward", grad_out.dtype), plane_grid(P, math.prod(in_spatial)),
                 (BLOCK,), (grad_out, gx), (i32(P), *map(i32, in_spatial), *map(i32, grad_out.shape[2:])))
        return gx


#: target -> pooling kernels for both CUDA targets (registered by :mod:`fastconv.ops.catalog`).
POOL_IMPLS = {target: CudaPoolKernels() for target in ("cuda", "cuda-emu")}
