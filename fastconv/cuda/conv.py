"""Host side of ``kernels/conv.cu``: the CUDA convolution algorithms (grid maths, argument order).

Every function takes contiguous 5-D tensors and a :class:`~fastconv.spec.ConvGeometry` and
returns a fresh contiguous 5-D tensor allocated by torch on the input's device; the kernel writes
it. The same code runs CUDA tensors (target ``"cuda"``) and CPU tensors on the harness
(``"cuda-emu"``).

Kernel argument order (kernels/common.cuh ``CONV_PARAMS``): N, C, D, H, W, K, KD, KH, KW, OD, OH,
OW, sd, sh, sw, pd, ph, pw, dd, dh, dw, groups, all int32. Kernels are templates launched by name
expression (``"conv_direct_forward<float, true>"`` is cuda-depthwise's forward; kernels/conv.cu lists the
instantiations). The kernels also exist for ``__half``/``__nv_bfloat16`` (float32 accumulation),
and so do the other kernels: float16/bfloat16 convs run on them without a float32 copy (ops/precision.py
``NATIVE_HALF``), reading 16 bits and accumulating in float32.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from ..spec import ConvAlgorithm, ConvGeometry
from .launch import BLOCK, INT32_MAX, MAX_GRID_X, MAX_GRID_YZ, Launcher, flat_grid, i32, i64, instance, plane_grid

TARGETS = frozenset({"cuda", "cuda-emu"})
#: Every SIMT kernel is instantiated for these (kernels/conv.cu); 16-bit ones accumulate in float32.
DTYPES = ("float32", "float64", "float16", "bfloat16")
_DTYPES = frozenset(getattr(torch, d) for d in DTYPES)
_HALF = frozenset({torch.float16, torch.bfloat16})
IG_TILE_M = IG_TILE_N = 64   #: implicit-GEMM block tile (IG_BM, IG_BN in kernels/conv.cu)
IG_K_STEP = 8                #: IG_BK
#: Split-K for the implicit-GEMM weight gradient: aim for about this many blocks in all ...
IGEMM_TARGET_BLOCKS = 512
#: ... but give each split at least this many reduction elements (tests lower it to force splits).
IGEMM_MIN_SPLIT_LEN = 1024


# Launch plans are cached per geometry: building 22 checked int32 scalars, the grid and the output
# shape costs tens of microseconds of Python per call, which a GPU would wait for on small layers.
# ConvGeometry is a frozen dataclass (hashable); the caches are bounded.
@functools.lru_cache(maxsize=4096)
def _geom_args(g: ConvGeometry) -> tuple:
    return tuple(i32(v) for v in (g.batch, g.in_channels, *g.in_spatial, g.out_channels, *g.kernel,
                                  *g.out_spatial, *g.stride, *g.padding, *g.dilation, g.groups))


@functools.lru_cache(maxsize=4096)
def _shapes(g: ConvGeometry) -> tuple:
    """(input, output, weight) 5-D shapes."""
    return ((g.batch, g.in_channels, *g.in_spatial), (g.batch, g.out_channels, *g.out_spatial),
            (g.out_channels, g.in_channels // g.groups, *g.kernel))


def _taps(g: ConvGeometry) -> int:
    return math.prod(g.kernel)


# ------------------------------------------------------------------------------------------ refusals
@functools.lru_cache(maxsize=4096)  # asked on every call by registry.choose
def _common_refusal(g: ConvGeometry) -> Optional[str]:
    if g.dtype not in _DTYPES:
        return f"supports float32, float64, float16 and bfloat16, not {str(g.dtype).replace('torch.', '')}"
    if max(math.prod(g.in_spatial), math.prod(g.out_spatial)) > INT32_MAX:
        return "a spatial plane of 2**31 elements or more (the kernels index within a plane in 32 bits)"
    if g.batch * max(g.in_channels, g.out_channels) > INT32_MAX:
        return "N * channels >= 2**31 planes"
    if g.out_channels * (g.in_channels // g.groups) * _taps(g) > INT32_MAX:
        return "a weight of 2**31 elements or more"
    return None


@functools.lru_cache(maxsize=4096)  # asked on every call by registry.choose
def _direct_refusal(g: ConvGeometry) -> Optional[str]:
    return _common_refusal(g)


@functools.lru_cache(maxsize=4096)  # asked on every call by registry.choose
def _igemm_refusal(g: ConvGeometry) -> Optional[str]:
    reason = _common_refusal(g)
    if reason:
        return reason
    if g.groups > MAX_GRID_YZ:
        return f"groups={g.groups} exceeds the grid's z limit {MAX_GRID_YZ} (use cuda-direct or cuda-depthwise)"
    cg, kg = g.in_channels // g.groups, g.out_channels // g.groups
    if max(-(-kg // IG_TILE_N), -(-(cg * _taps(g)) // IG_TILE_N), -(-cg // IG_TILE_N)) > MAX_GRID_YZ:
        return "a GEMM dimension of more than 65535 tiles"
    if -(-(g.batch * max(math.prod(g.in_spatial), math.prod(g.out_spatial))) // IG_TILE_M) > MAX_GRID_X:
        return "more GEMM rows than the grid can hold"
    return None


@functools.lru_cache(maxsize=4096)  # asked on every call by registry.choose
def _depthwise_refusal(g: ConvGeometry) -> Optional[str]:
    if g.groups != g.in_channels or g.out_channels % g.in_channels:
        return (f"needs groups == in_channels and out_channels a multiple of in_channels (depthwise); got "
                f"groups={g.groups}, in_channels={g.in_channels}, out_channels={g.out_channels}")
    return _common_refusal(g)


# ------------------------------------------------------------------------------------------- helpers
_HAS_BIAS, _NO_BIAS = i32(1), i32(0)


def _bias_args(bias, w):
    # A kernel pointer cannot be None on every path (CuPy): pass the weight, flagged unused.
    return (bias.contiguous(), _HAS_BIAS) if bias is not None else (w, _NO_BIAS)


@functools.lru_cache(maxsize=4096)
def _plan(kind: str, g: ConvGeometry) -> tuple:
    """(kernel name expression, grid, result shape, geometry scalars) of one pass."""
    kg, cg = g.out_channels // g.groups, g.in_channels // g.groups
    x_shape, y_shape, w_shape = _shapes(g)
    if kind in ("conv_direct_forward", "conv_depthwise_forward"):
        grid, shape = plane_grid(g.batch * g.out_channels, math.prod(g.out_spatial)), y_shape
    elif kind in ("conv_direct_grad_input", "conv_depthwise_grad_input"):
        grid, shape = plane_grid(g.batch * g.in_channels, math.prod(g.in_spatial)), x_shape
    elif kind == "conv_direct_grad_weight":
        grid, shape = (min(math.prod(w_shape), MAX_GRID_X),), w_shape
    elif kind == "igemm_forward":
        grid = (-(-(g.batch * math.prod(g.out_spatial)) // IG_TILE_M), -(-kg // IG_TILE_N), g.groups)
        shape = y_shape
    elif kind == "igemm_grad_input":
        grid = (-(-(g.batch * math.prod(g.in_spatial)) // IG_TILE_M), -(-cg // IG_TILE_N), g.groups)
        shape = x_shape
    else:
        raise ValueError(f"fastconv.cuda: no launch plan {kind!r}")
    if kind.startswith("conv_depthwise_"):   # the direct kernels specialised for groups == C
        name = instance(kind.replace("depthwise", "direct"), g.dtype, "true")
    elif kind.startswith("conv_direct_") and kind != "conv_direct_grad_weight":
        name = instance(kind, g.dtype, "false")
    else:
        name = instance(kind, g.dtype)
    return name, grid, shape, _geom_args(g)


def _forward_plane(prefix: str):
    kind = f"{prefix}_forward"

    def forward(x, w, bias, g: ConvGeometry):
        name, grid, shape, gargs = _plan(kind, g)
        L = Launcher(x)
        y = L.empty(shape, g.dtype)
        if y.numel() == 0:
            return y
        b, has_bias = _bias_args(bias, w)
        L.launch("conv", name, grid, (BLOCK,), (x, w, b, y), (has_bias, *gargs))
        return y
    return forward


def _grad_input_plane(prefix: str):
    kind = f"{prefix}_grad_input"

    def grad_input(gy, w, g: ConvGeometry):
        name, grid, shape, gargs = _plan(kind, g)
        L = Launcher(gy)
        gx = L.empty(shape, g.dtype)
        if gx.numel() == 0:
            return gx
        if gy.numel() == 0:
            return gx.zero_()
        L.launch("conv", name, grid, (BLOCK,), (gy, w, gx), gargs)
        return gx
    return grad_input


def _weight_shape(g: ConvGeometry):
    return _shapes(g)[2]


def direct_grad_weight(gy, x, g: ConvGeometry):
    """One block per weight element, fixed-order reduction (deterministic)."""
    name, grid, shape, gargs = _plan("conv_direct_grad_weight", g)
    L = Launcher(x)
    gw = L.empty(shape, g.dtype)
    if gw.numel() == 0:
        return gw
    if gy.numel() == 0 or x.numel() == 0:
        return gw.zero_()
    L.launch("conv", name, grid, (BLOCK,), (gy, x, gw), gargs)
    return gw


# ------------------------------------------------------------------------------------- implicit GEMM
igemm_forward = _forward_plane("igemm")
igemm_forward.__name__ = igemm_forward.__qualname__ = "igemm_forward"
igemm_grad_input = _grad_input_plane("igemm")
igemm_grad_input.__name__ = igemm_grad_input.__qualname__ = "igemm_grad_input"


def igemm_splits(g: ConvGeometry) -> tuple[int, int]:
    """(splits, chunk) of the weight gradient's reduction over N*OD*OH*OW."""
    reduce = g.batch * math.prod(g.out_spatial)
    kg, cols = g.out_channels // g.groups, (g.in_channels // g.groups) * _taps(g)
    blocks = -(-kg // IG_TILE_M) * -(-cols // IG_TILE_N) * g.groups
    splits = max(1, min(-(-IGEMM_TARGET_BLOCKS // blocks), reduce // max(IGEMM_MIN_SPLIT_LEN, 1),
                        MAX_GRID_YZ // g.groups))
    chunk = -(-reduce // splits)
    chunk = -(-chunk // IG_K_STEP) * IG_K_STEP
    return max(1, -(-reduce // chunk)) if reduce else 1, max(chunk, IG_K_STEP)


def igemm_workspace_bytes(g: ConvGeometry) -> int:
    """Scratch memory beyond the result, the largest of the three passes: the weight gradient's
    split-K partial sums (splits x |W|) when it splits; forward and input gradient need none."""
    splits, _ = igemm_splits(g)
    if g.dtype in _HALF:   # float32 partial sums, even with one split: the gradient is rounded once
        return splits * math.prod(_weight_shape(g)) * 4
    return splits * math.prod(_weight_shape(g)) * g.dtype.itemsize if splits > 1 else 0


def igemm_grad_weight(gy, x, g: ConvGeometry):
    """Split-K GEMM: S partial sums, then a fixed-order reduction (deterministic, no atomics)."""
    L = Launcher(x)
    shape = _weight_shape(g)
    gw = L.empty(shape, g.dtype)
    if gw.numel() == 0:
        return gw
    if gy.numel() == 0 or x.numel() == 0:
        return gw.zero_()
    splits, chunk = igemm_splits(g)
    half = g.dtype in _HALF   # 16-bit: float32 partial sums (the kernel's fc_acc<T>), then one rounding
    partial = gw if splits == 1 and not half else L.empty((splits, *shape), torch.float32 if half else g.dtype)
    kg, cols = g.out_channels // g.groups, (g.in_channels // g.groups) * _taps(g)
    grid = (-(-kg // IG_TILE_M), -(-cols // IG_TILE_N), g.groups * splits)
    L.launch("conv", instance("igemm_grad_weight", g.dtype), grid, (BLOCK,), (gy, x, partial),
             (i32(splits), i64(chunk), *_geom_args(g)))
    if splits > 1 or half:
        L.launch("conv", instance("conv_reduce_splits", g.dtype), flat_grid(gw.numel()), (BLOCK,),
                 (partial, gw), (i32(splits), i64(gw.numel())))
    return gw


# ---------------------------------------------------------------------------------------- heuristic
def heuristic(g: ConvGeometry, pass_: str) -> str:
    """Pick a CUDA algorithm without measuring."""
    if g.is_depthwise and _depthwise_refusal(g) is None:
        return "cuda-depthwise"
    cg, kg = g.in_channels // g.groups, g.out_channels // g.groups
    if _igemm_refusal(g) is not None:
        return "cuda-direct"
    # A GEMM with a thin side wastes most of its 64x64 tile: the direct kernels do less work.
    if pass_ == "forward" and (kg < 8 or cg * _taps(g) < 8):
        return "cuda-direct"
    if pass_ == "grad_input" and (cg < 8 or kg * _taps(g) < 8):
        return "cuda-direct"
    if pass_ == "grad_weight" and kg * cg * _taps(g) < 64:
        return "cuda-direct"
    return "implicit-gemm"


#: The CUDA convolution algorithms for both CUDA targets (registered by :mod:`fastconv.ops.catalog`).
ALGORITHMS = [
    ConvAlgorithm(
        "cuda-direct", TARGETS,
        "CUDA: one thread per output (forward) / input element (input gradient as a gather), coalesced along W; "
        "weight gradient one block per weight element with a fixed-order reduction (deterministic)",
        _forward_plane("conv_direct"), _grad_input_plane("conv_direct"), direct_grad_weight,
        refuse=_direct_refusal, dtypes=DTYPES),
    ConvAlgorithm(
        "implicit-gemm", TARGETS,
        "CUDA: implicit GEMM, 64x64 block tiles built from the tensors on the fly (no im2col), K-step 8, 4x4 "
        "register tiles, double-buffered shared memory; input gradient as the GEMM of the transposed conv; "
        "weight gradient split-K with a deterministic second-pass reduction",
        igemm_forward, igemm_grad_input, igemm_grad_weight, refuse=_igemm_refusal,
        workspace_bytes=igemm_workspace_bytes, dtypes=DTYPES),
    ConvAlgorithm(
        "cuda-depthwise", TARGETS,
        "CUDA: depthwise (groups == in_channels, any multiplier): one thread per output / input element without "
        "a channel loop; weight gradient as cuda-direct's block reduction",
        _forward_plane("conv_depthwise"), _grad_input_plane("conv_depthwise"), direct_grad_weight,
        refuse=_depthwise_refusal, dtypes=DTYPES),
]
#: ``algo='auto'`` without measuring, per target.
HEURISTICS = {target: heuristic for target in TARGETS}
