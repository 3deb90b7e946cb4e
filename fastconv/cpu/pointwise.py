"""The three passes of a 1x1 conv as GEMMs on the tensors themselves (torch's BLAS, torch's thread pool).

A 1x1, unpadded, ungrouped conv is a matrix product per image: ``y[n] (K, P) = w (K, C) @ x[n] (C, P)`` with
``P`` the pixels of a plane. The im2col kernel computes the same products, but through its numpy seam: argument
normalisation, zero-copy array views, one Numba finiteness scan and, for the weight gradient, one GEMM call per
image through numpy-to-torch wrappers. On the mid-sized layers of a training step that seam cost more than the
GEMMs: ShuffleNet-v2's 116-channel 8x8 1x1 layer at batch 8 took 0.43 ms for its weight gradient through the
kernel against 0.09-0.14 ms for the GEMMs alone (2 threads), and a converted ShuffleNet-v2's training step spent
26 ms more than torch's in its 36 1x1 layers. These functions call the GEMMs directly.

Each returns ``None`` when it cannot take the call (an operand it cannot view as ``(N, C, P)`` rows): the caller
then runs the kernel. Non-finite operands need no other route: an unpadded 1x1 product forms exactly the pairs
torch's conv forms (the GEMMs' zero padding only fills result rows and columns that are dropped), so a NaN or an
infinity lands where torch puts it. The sum over the result that once sent such calls to the kernel's exact
handling cost a reduction and a host sync per pass: SqueezeNet's training step at batch 8 ran 5.5% faster
without it (in-process A/B, 16 pairs, median on/off 1.055 [1.022, 1.095]), GoogLeNet's 2%.

Operands are detached (the ops run below autograd): ``torch.matmul`` of a 2-D by a 3-D operand takes another,
4x slower route when an operand requires grad, which a module's weight does even under ``no_grad`` (1.29
against 0.29 ms for MobileNet-v2's 144 -> 24 layer at batch 8). Every torch call costs about a microsecond of
host time, so there are as few as the GEMMs need.
"""
from __future__ import annotations

import numpy as np
import torch

from ..spec import ConvGeometry
from . import jit_gemm, memory, micro_gemm, parallel_gemm


def applies(g: ConvGeometry) -> bool:
    """True for the geometries these paths compute: 1x1 kernel, no padding, one group (any stride)."""
    return (g.groups == 1 and g.kernel == (1, 1, 1) and g.padding == (0, 0, 0)
            and g.padding_end == (0, 0, 0))


def _rows(t: torch.Tensor):
    """``t`` (N, C, D, H, W) as (N, C, D*H*W) rows without a copy, or None when its strides do not allow it
    (a channels_last tensor). A channel slice of a wider tensor (ShuffleNet's ``chunk``) qualifies. A contiguous
    ``t`` may have any rank (N, C, *S): the ops' contiguous routes pass their operands as they come."""
    if t.is_contiguous():
        return t.detach().view(t.shape[0], t.shape[1], -1)
    if t.dim() != 5:
        return None
    N, C, D, H, W = t.shape
    sn, sc, sd, sh, sw = t.stride()
    if (W == 1 or sw == 1) and (H == 1 or sh == W) and (D == 1 or sd == H * W):
        return t.detach().view(N, C, D * H * W) if t.is_contiguous() else t.detach().as_strided(
            (N, C, D * H * W), (sn, sc, 1))
    return None


def _strided(x: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    """The pixels a strided 1x1 conv reads (a copy, in a workspace: see :func:`_side_by_side`), or ``x`` itself
    at stride 1. Never part of a result. A workspace saved measured, 2 threads, each copy after a torch
    BatchNorm and ReLU, ResNet-50's stride-2 inputs at batch 8: 256 x 32x32 1.57 -> 1.03 ms, 512 x 16x16 0.30 ->
    0.11, 1024 x 8x8 0.16 -> 0.06."""
    if g.stride == (1, 1, 1):
        return x
    sd, sh, sw = g.stride
    picked = x[:, :, ::sd, ::sh, ::sw]
    return _scratch_tensor("pointwise.strided", tuple(picked.shape), x.dtype).copy_(picked)


#: ``a @ b[n]`` for every image of a batch (the forward's ``w @ x[n]``, the input gradient's ``w^T @ gy[n]``) as one
#: GEMM over the batch's pixels side by side, with a copy of ``b`` in and of the result out, when the planes have
#: at most this many pixels and the weights at least :data:`ONE_GEMM_MIN_WEIGHTS` entries: torch's batched
#: ``matmul`` runs N GEMMs of a few dozen columns, each rereading the whole weight matrix. Measured, 2 threads,
#: batch 8, input gradient, batched / one GEMM / torch's own conv backward, ms: SqueezeNet's 512 -> 1000 at 7x7
#: 2.78 / 1.99 / 2.26, ResNet-50's 2048 -> 512 at 4x4 2.35 / 1.48 / 1.97 and 512 -> 2048 2.17 / 1.45 / 1.65,
#: DenseNet's 1024 -> 128 at 4x4 0.23 / 0.21 / 0.32; level or slower with fewer weights (96 -> 576 at 4x4 0.09 /
#: 0.11) or larger planes (256 -> 1024 at 8x8 1.26 / 1.33, 128 -> 512 at 16x16 1.16 / 1.46).
ONE_GEMM_MAX_PIXELS = 49
ONE_GEMM_MIN_WEIGHTS = 131072


def _one_gemm_over_batch(a: torch.Tensor, b3: torch.Tensor) -> bool:
    """Whether :func:`_batch_mm` multiplies ``a`` (M, R) by the batch ``b3`` (N, R, P) as one GEMM."""
    return b3.shape[0] > 1 and b3.shape[2] <= ONE_GEMM_MAX_PIXELS and a.numel() >= ONE_GEMM_MIN_WEIGHTS


#: Fewest input channels (the GEMMs' reduction) for which the products run on fastconv's own GEMM
#: (:mod:`.parallel_gemm`) where it is in use: with fewer, each output tile is stored after a couple of dozen
#: steps and MKL is level or ahead (MobileNet-v2's 24 -> 144 at 32x32: 54-76 µs against 47 at batch 1, 379-411
#: against 414-485 at batch 8; with 64 and more the own GEMM takes 0.4-0.8x torch's time, see docs/performance-log.md).
OWN_GEMM_MIN_REDUCTION = 32
#: Fewest pixels per image for which each image is its own GEMM on the own path; smaller planes (ResNet-50's
#: last stage at 4x4) are laid side by side first (a copy in and out), as :func:`_one_gemm_over_batch` does for
#: torch: a 16-pixel product fills half of the micro-kernel's 32-column tile (512 -> 2048 at 4x4, batch 8: 5.5 ms
#: per image against 1.7 for torch's).
OWN_GEMM_MIN_PIXELS = 64
#: ... except for a single image, whose product is its own GEMM from this many pixels (one 64-byte vector of
#: float32: the micro-kernel's half-width tile reads such columns in place). Measured, 2 threads, float32, own /
#: ``torch.mm`` µs at 4x4 (16 columns): 2048 x 512 139 / 229, 512 x 2048 171 / 255, 440 x 440 36 / 49, 960 x 160
#: 30 / 35; 128 x 64 5 / 4. Fewer columns (SE blocks' 1x1 maps) stay on torch's matrix-vector code.
OWN_GEMM_MIN_PIXELS_ONE_IMAGE = 16
#: ... and a single image's product only from this many multiply-adds: below it torch's ``mm`` (MKL) was faster
#: on a Zen 5 (AVX-512) host, 2 threads, batch 1, own / ``mm`` µs: MobileNet v3's 40 -> 240 at 16x16 (2.5M) 42 /
#: 33, 112 -> 672 at 8x8 (4.8M) 61 / 56, 960 -> 160 at 4x4 (2.5M) 42 / 36, 200 -> 80 at 8x8 (1.0M) 23 / 16; and
#: twice as fast right after a torch conv, as inside a model (40 -> 240: 96 / 53, 64 -> 384 at 8x8: 104 / 47).
#: From 16.8M (ResNet-50's batch-1 1x1 layers) the own GEMM was level or faster (256 -> 64 at 32x32 173 / 233,
#: 1024 -> 256 at 8x8 172 / 182; after a torch conv 264 / 274 and 222 / 208).
OWN_GEMM_MIN_MACS_ONE_IMAGE = 1 << 23
_OWN_DTYPES = (torch.float32, torch.float64)
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
#: On hosts without 512-bit vectors (AVX2, :data:`.micro_gemm.HOST_HAS_AVX512` false) the own GEMM takes a 1x1
#: conv's products only with at least this many input and output channels and, for the forward and input
#: gradient, planes of at most :data:`AVX2_OWN_GEMM_MAX_PIXELS` pixels; elsewhere MKL runs the same AVX2 code
#: faster. Measured, two Zen 2 cores, batch 8, own / MKL time: 256 -> 1024 at 8x8 0.77-0.86, 1024 -> 512 at 8x8
#: 0.75-0.90, 480 -> 128 at 16x16 0.79-0.85; ShuffleNet's 116 -> 116 at 8x8 1.07-1.28, 104 -> 104 at 16x16 up to
#: 1.17, MobileNet's 24 -> 144 at 32x32 input gradient 1.87; 32x32 planes (rows 4 KB apart) forward 1.12-1.40.
AVX2_OWN_GEMM_MIN_CHANNELS = 128
AVX2_OWN_GEMM_MAX_PIXELS = 256


def _avx2_declines(M: int, R: int, P: int | None) -> bool:
    """Whether an AVX2 host leaves a 1x1 product (``M`` result rows, reduction ``R``, ``P`` pixels per image;
    None for the weight gradient) to MKL: see :data:`AVX2_OWN_GEMM_MIN_CHANNELS`."""
    return not micro_gemm.HOST_HAS_AVX512 and (min(M, R) < AVX2_OWN_GEMM_MIN_CHANNELS
                                               or (P is not None and P > AVX2_OWN_GEMM_MAX_PIXELS))


def _own_may_take(M: int, R: int, P: int, dtype: torch.dtype, images: int) -> bool:
    """Whether :func:`_own_batch_mm` may take an ``(M, R) @ (R, P)`` product per image of ``images``, asked before
    building the operands' views (two microseconds each on a batch-1 call that MKL then runs)."""
    return (jit_gemm.own_gemm_in_use() and R >= OWN_GEMM_MIN_REDUCTION and not _avx2_declines(M, R, P)
            and dtype in _OWN_DTYPES and (images > 1 or M * R * P >= OWN_GEMM_MIN_MACS_ONE_IMAGE))


#: Whether the side-by-side copies of small planes (:func:`_side_by_side`) and their products live in reused
#: workspaces (:func:`.memory.scratch`) instead of fresh tensors.
SIDE_BY_SIDE_SCRATCH = True


def _scratch_tensor(role: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor over this thread's workspace ``role`` (or a fresh one with
    :data:`SIDE_BY_SIDE_SCRATCH` off); never returned to a caller of this module."""
    if not SIDE_BY_SIDE_SCRATCH or dtype not in _OWN_DTYPES:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(memory.scratch(role, shape, _NUMPY_DTYPES[dtype]))


def _side_by_side(role: str, t3: torch.Tensor) -> torch.Tensor:
    """(R, N * P): the rows of ``t3`` (N, R, P) with the batch's pixels side by side, a copy in the workspace
    ``role``.

    Why a workspace: a fresh tensor of this size comes from pages the allocator has just mapped, and the copy
    faults on each one. Measured inside a 1x1 forward (SqueezeNet's 512 -> 64 at 7x7, batch 8, 0.8 MB), the copy
    into a fresh tensor took 75 µs a call against 20 µs into reused memory."""
    N, R, P = t3.shape
    rows = _scratch_tensor(role, (R, N * P), t3.dtype)
    rows.view(R, N, P).copy_(t3.transpose(0, 1))
    return rows


def _unstacked(y: torch.Tensor, N: int) -> torch.Tensor:
    """(N, M, P): a fresh copy of the (M, N * P) product ``y`` of :func:`_side_by_side` rows, one image per
    block (``y`` may be a workspace: the result never shares its memory)."""
    M, P = y.shape[0], y.shape[1] // N
    out = torch.empty((N, M, P), dtype=y.dtype)
    return out.copy_(y.view(M, N, P).transpose(0, 1))


def _own_batch_mm(a: torch.Tensor, b3: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """:func:`_batch_mm` on the own GEMM, or None where that path does not take the call."""
    N, R, P = b3.shape
    M = a.shape[0]
    if (not _own_may_take(M, R, P, b3.dtype, N)
            or a.dtype != b3.dtype or (bias is not None and bias.dtype != b3.dtype)):
        return None
    bias_np = None if bias is None else bias.detach().numpy()
    if P >= OWN_GEMM_MIN_PIXELS or (N == 1 and P >= OWN_GEMM_MIN_PIXELS_ONE_IMAGE):
        if b3.stride(2) != 1:
            return None
        y = b3.new_empty((N, M, P))
        parallel_gemm.matmul(a.detach().numpy(), b3.detach().numpy(), y.numpy(), bias=bias_np)
        return y
    if N == 1:
        return None
    rows = _side_by_side("pointwise.rows", b3.detach())
    y = _scratch_tensor("pointwise.products", (M, N * P), b3.dtype)
    parallel_gemm.matmul(a.detach().numpy(), rows.view(1, R, N * P).numpy(), y.view(1, M, N * P).numpy(),
                         bias=bias_np)
    return _unstacked(y, N)


def _batch_mm(a: torch.Tensor, b3: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(N, M, P) ``a @ b3[n] (+ bias[:, None])`` for every n; ``a`` (M, R), ``b3`` (N, R, P), ``bias`` (M,)."""
    N, R, P = b3.shape
    if P == 1 and N > 1:
        # single-pixel planes (squeeze-and-excitation blocks): the batch's vectors are the rows of one (N, R)
        # matrix, so one GEMM ``b3 @ a^T`` makes every image's product. Measured, 2 threads, batch 8, RegNet's
        # 440 -> 110 with bias: 0.43 ms as N matrix-vector products (baddbmm) against torch's conv 0.22.
        rows = b3[:, :, 0]
        y = torch.mm(rows, a.t()) if bias is None else torch.addmm(bias, rows, a.t())
        return y.view(N, a.shape[0], 1)
    own = _own_batch_mm(a, b3, bias)
    if own is not None:
        return own
    M = a.shape[0]
    if not _one_gemm_over_batch(a, b3):
        if bias is None:
            return torch.matmul(a, b3)
        return torch.baddbmm(bias.view(1, M, 1), a.expand(N, M, R), b3)
    rows = _side_by_side("pointwise.rows", b3)
    y = _scratch_tensor("pointwise.products", (M, N * P), b3.dtype)
    if bias is None:
        torch.mm(a, rows, out=y)
    else:
        torch.addmm(bias.view(M, 1), a, rows, out=y)
    return _unstacked(y, N)


def forward(x, w, bias, g: ConvGeometry, shape=None):
    """``y (N, K, *O) = w @ x`` per image, the bias as the GEMM's added term; (N, C, D, H, W) ``x``, (K, C, 1, 1, 1)
    ``w``. A single image gets one plain ``mm``/``addmm`` on the operands as they are (the op's implementation
    runs below autograd, and a direct call records nothing). ``shape``: the result's shape (default
    ``(N, K) + g.out_spatial``); contiguous operands at stride 1 may then have the op's own rank."""
    N, C = x.shape[:2]
    K = w.shape[0]
    if not w.is_contiguous():
        return None
    if g.stride != (1, 1, 1):
        if not x.is_contiguous():  # a channels_last input goes to the kernel that keeps its layout
            return None
        x = _strided(x, g)
    if N == 1 and x.is_contiguous():
        y = None
        if _own_may_take(K, C, x.numel() // max(C, 1), x.dtype, 1):
            y = _own_batch_mm(w.view(K, C), x.view(1, C, -1), bias)
        if y is None:
            # the operands as they are: no detach (a microsecond each) on a squeeze-and-excitation conv's 15 µs
            x2 = x.view(C, -1)
            w2 = w.view(K, C)
            y = torch.mm(w2, x2) if bias is None else torch.addmm(bias.view(K, 1), w2, x2)
    else:
        x3 = _rows(x)
        if x3 is None:
            return None
        y = _batch_mm(w.detach().view(K, C), x3, None if bias is None else bias.detach())
    return y.view((N, K) + g.out_spatial if shape is None else shape)


def grad_input(grad_out, w, g: ConvGeometry, shape=None):
    """``gx (N, C, *I) = w^T @ gy`` per image; (N, K, *O) ``grad_out``. A strided conv's gradient lands on the
    pixels it read, the others are zero. ``shape``: the result's shape (default ``(N, C) + g.in_spatial``)."""
    N, K = grad_out.shape[:2]
    C = w.shape[1]
    gy = _rows(grad_out)
    if gy is None or not w.is_contiguous():
        return None
    gx = _batch_mm(w.detach().view(K, C).t(), gy)
    if g.stride == (1, 1, 1):
        return gx.view((N, C) + g.out_spatial if shape is None else shape)
    gx = gx.view((N, C) + g.out_spatial)
    sd, sh, sw = g.stride
    full = gx.new_zeros((N, C) + g.in_spatial)
    full[:, :, ::sd, ::sh, ::sw] = gx  # an unpadded 1x1 conv reads every stride-th pixel: ceil(I / s) == O
    return full if shape is None else full.view(shape)


#: Weight gradient ``sum_n gy[n] @ x[n]^T``: with at most this many weights (K x C) one batched GEMM makes the
#: N products and a sum adds them (the extra N x K x C buffer is small) ...
GW_BATCHED_MAX_WEIGHTS = 16384
#: ... else with planes of at most this many pixels the batch goes inside the rows (two copies of the small
#: operands) and one GEMM reduces over N x P; larger planes accumulate one GEMM per image in place.
#: Measured, 2 threads, batch 8: 58x58 at 16x16 0.08 (batched) against 0.16 ms (either other way); 232x232 at
#: 4x4 0.11 (one GEMM) against 0.17 (per image); 64 -> 256 at 32x32 1.40 (per image) against 1.83 (one GEMM).
GW_ONE_GEMM_MAX_PIXELS = 64


#: Fewest input and output channels for the weight gradient on the own GEMM: each image's ``x^T`` is packed
#: for the product, which few rows of the result do not pay back. Measured, 2 threads, batch 8, own / torch
#: time: 64 -> 256 at 32x32 0.87, 256 -> 64 0.94, 512 -> 128 at 16x16 0.84, 1024 -> 256 at 8x8 0.92, 704 -> 128 at
#: 8x8 0.87; MobileNet-v2's 144 -> 24 and 24 -> 144 at 32x32 1.27 and 1.45.
OWN_GRAD_WEIGHT_MIN_CHANNELS = 48
#: ... and more weights than this: below, torch's batched GEMM and a sum (:data:`GW_BATCHED_MAX_WEIGHTS`) were
#: faster, since each task of the own region adds every image's short product (a reduction of one plane's pixels)
#: into its block of the result. Measured, 2 threads, batch 8, each call after a torch BatchNorm and ReLU, own /
#: torch's batched ms: ShuffleNet-v2's 58 -> 58 at 16x16 0.35-0.42 / 0.22-0.24, 116 -> 116 at 8x8 0.25-0.36 /
#: 0.26-0.27 (torch's own conv backward 0.50-0.62 on both).
OWN_GRAD_WEIGHT_MIN_WEIGHTS = GW_BATCHED_MAX_WEIGHTS + 1
#: ... (that rule only for planes of at most this many pixels: larger planes' products are long enough for the own
#: GEMM, 64 -> 256 at 32x32 measured 0.87 of torch's time there)
OWN_GRAD_WEIGHT_SMALL_PLANE = 256


def _own_grad_weight(gy: torch.Tensor, xr: torch.Tensor) -> torch.Tensor | None:
    """``sum_n gy[n] @ xr[n]^T`` (K, C) on the own GEMM (one region, each task adding the images' products for
    its block of the result), or None where that path does not take the call."""
    N, K, P = gy.shape
    C = xr.shape[1]
    if (not jit_gemm.own_gemm_in_use() or P < OWN_GEMM_MIN_REDUCTION or min(K, C) < OWN_GRAD_WEIGHT_MIN_CHANNELS
            or (K * C < OWN_GRAD_WEIGHT_MIN_WEIGHTS and P <= OWN_GRAD_WEIGHT_SMALL_PLANE)
            or _avx2_declines(K, C, None)
            or gy.dtype not in _OWN_DTYPES
            or xr.dtype != gy.dtype or gy.stride(2) != 1 or xr.stride(2) != 1):
        return None
    gw = gy.new_empty((K, C))
    parallel_gemm.matmul(gy.numpy(), xr.numpy().transpose(0, 2, 1), gw.numpy(), summed=True)
    return gw


def grad_weight(grad_out, x, g: ConvGeometry, shape=None):
    """``gw (K, C, 1, 1, 1) = sum_n gy[n] @ x[n]^T``; (N, K, *O) ``grad_out``, (N, C, D, H, W) ``x`` (any rank
    when contiguous at stride 1). ``shape``: the result's shape (default ``(K, C, 1, 1, 1)``)."""
    N, K = grad_out.shape[:2]
    C = x.shape[1]
    gy = _rows(grad_out)
    if gy is None:
        return None
    if g.stride == (1, 1, 1):
        xr = _rows(x)
        if xr is None:
            return None
    elif x.is_contiguous():
        xr = _strided(x.detach(), g).view(N, C, -1)
    else:
        return None
    gw = _own_grad_weight(gy, xr)
    if gw is None:
        gw = _torch_grad_weight(gy, xr)
    return gw.view((K, C, 1, 1, 1) if shape is None else shape)


def _torch_grad_weight(gy: torch.Tensor, xr: torch.Tensor) -> torch.Tensor:
    """``sum_n gy[n] @ xr[n]^T`` (K, C) on torch's GEMMs, in the form the sizes favour (see the constants)."""
    N, K, P = gy.shape
    C = xr.shape[1]
    if N == 1:
        gw = torch.mm(gy[0], xr[0].t())
    elif K * C <= GW_BATCHED_MAX_WEIGHTS:
        gw = torch.bmm(gy, xr.transpose(1, 2)).sum(0)
    elif P <= GW_ONE_GEMM_MAX_PIXELS:
        gw = torch.mm(_side_by_side("pointwise.rows", gy), _side_by_side("pointwise.columns", xr).t())
    else:
        gw = torch.mm(gy[0], xr[0].t())
        for n in range(1, N):
            gw.addmm_(gy[n], xr[n].t())
    return gw
