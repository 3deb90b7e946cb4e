"""Host side of ``kernels/conv_tc.cu``: the tensor-core implicit-GEMM convolution ("implicit-gemm-tc").

float16 and bfloat16 with float32 accumulation (``mma.sync`` m16n8k16), float32 as TF32 (m16n8k8)
when ``torch.backends.cudnn.allow_tf32`` allows it (torch's own rule for convolutions; when it is
False this algorithm refuses float32 and the float32 SIMT algorithms run). float64 is refused.

The kernels read and write channels-last tensors (N, D, H, W, C); the functions here take the
registry's 5-D (N, C, D, H, W) tensors, permute them (no copy when they are channels_last already,
i.e. ``x.permute(0, 2, 3, 4, 1)`` is contiguous) and hand the result back in the memory format of
the input: channels_last in, channels_last out; contiguous in, contiguous out.

Kernel argument order is that of ``kernels/conv.cu`` (``CONV_PARAMS``: 22 int32 geometry scalars).
``g`` below is a :class:`fastconv.registry.ConvGeometry` (not imported: kernels stay below dispatch).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from . import conv as simt
from . import loader
from ..spec import ConvAlgorithm
from .launch import INT32_MAX, MAX_GRID_X, MAX_GRID_YZ, Launcher, i32, i64

NAME = "implicit-gemm-tc"
FAMILY = "conv_tc"
TARGETS = frozenset({"cuda", "cuda-emu"})
TILE_M = TILE_N = 128     #: TC_BM, TC_BN in kernels/conv_tc.cu
THREADS = 256             #: TC_THREADS
STAGES = 3                #: TC_STAGES
K_BYTES = 64              #: TC_KBYTES: one stage's K-step in bytes
#: Dynamic shared memory per block: STAGES x (A + B tile). K-major tiles (forward, input gradient):
#: 128 rows x (64 + 16) bytes each; MN-major (weight gradient): (64 / elem) rows x (128 + 8) elements.
SMEM_KMAJOR = STAGES * 2 * TILE_M * (K_BYTES + 16)
SMEM_MNMAJOR = {2: STAGES * 2 * (K_BYTES // 2) * (TILE_M + 8) * 2, 4: STAGES * 2 * (K_BYTES // 4) * (TILE_M + 8) * 4}
_KIND = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "tf32"}
#: Split-K of the weight gradient: aim for about this many blocks, each split at least this long
#: (a multiple of the K-step of every dtype); tests lower the length to force splits.
TARGET_BLOCKS = 256
MIN_SPLIT_LEN = 2048
SPLIT_ALIGN = 32


def tf32_allowed() -> bool:
    """Whether float32 convolutions may use TF32 tensor cores (torch's switch for cuDNN convs)."""
    return bool(torch.backends.cudnn.allow_tf32)


def _vec(dtype: torch.dtype) -> int:
    """Elements in one 16-byte chunk (one cp.async)."""
    return 16 // dtype.itemsize


def _taps(g: "ConvGeometry") -> int:
    return math.prod(g.kernel)


# ------------------------------------------------------------------------------------------ refusals
@functools.lru_cache(maxsize=4096)
def _refusal(g: "ConvGeometry", tf32: bool) -> Optional[str]:
    if g.dtype == torch.float64:
        return "float64 has no tensor-core path (implicit-gemm and cuda-direct run float64)"
    if g.dtype not in _KIND:
        return f"supports float16, bfloat16 and float32 (as TF32), not {str(g.dtype).replace('torch.', '')}"
    if g.dtype == torch.float32 and not tf32:
        return ("float32 would run as TF32, which torch.backends.cudnn.allow_tf32 = False forbids "
                "(the float32 algorithms implicit-gemm and cuda-direct run it)")
    cg, kg, taps = g.in_channels // g.groups, g.out_channels // g.groups, _taps(g)
    if max(math.prod(g.in_spatial), math.prod(g.out_spatial)) > INT32_MAX:
        return "a spatial plane of 2**31 elements or more (the kernels index within a plane in 32 bits)"
    if g.out_channels * cg * taps > INT32_MAX or g.in_channels * kg * taps > INT32_MAX:
        return "a weight of 2**31 elements or more"
    if g.groups > MAX_GRID_YZ:
        return f"groups={g.groups} exceeds the grid's z limit {MAX_GRID_YZ}"
    if max(-(-kg // TILE_N), -(-cg // TILE_N), -(-(cg * taps) // TILE_N)) > MAX_GRID_YZ:
        return "a GEMM dimension of more than 65535 tiles"
    if -(-(g.batch * max(math.prod(g.in_spatial), math.prod(g.out_spatial))) // TILE_M) > MAX_GRID_X:
        return "more GEMM rows than the grid can hold"
    return None


@functools.lru_cache(maxsize=None)
def _capability(device: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _gpu_capability() -> Optional[tuple[int, int]]:
    """The current GPU's compute capability; None when there is no GPU to ask (geometries made
    for target "cuda" on a machine without one: plans, counters, tests)."""
    if not torch.cuda.is_available():
        return None
    try:
        return _capability(torch.cuda.current_device())
    except (RuntimeError, AssertionError):   # a CPU-only torch that was told a GPU exists
        return None


def refuse(g: "ConvGeometry") -> Optional[str]:
    """Why the tensor-core algorithm cannot run ``g`` (None: it can). Reads allow_tf32 at each call;
    on a GPU older than sm_80 (no mma.sync on bf16/tf32, no cp.async) it refuses everything."""
    cc = _gpu_capability() if g.target == "cuda" else None
    if cc is not None:
        major, minor = cc
        if major < 8:
            return f"needs an sm_80 or newer GPU (mma.sync on f16/bf16/tf32, cp.async); this one is sm_{major}{minor}"
    return _refusal(g, tf32_allowed())


# ------------------------------------------------------------------------------------------- helpers
def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """(N, C, D, H, W) -> a contiguous (N, D, H, W, C) tensor (a view when t is channels_last)."""
    return t.permute(0, 2, 3, 4, 1).contiguous()


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 5 and t.permute(0, 2, 3, 4, 1).is_contiguous() and not t.is_contiguous()


def _result(buf_cl: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The channels-last buffer as a logical (N, C, D, H, W) tensor in ``like``'s memory format."""
    out = buf_cl.permute(0, 4, 1, 2, 3)
    return out if _is_channels_last(like) else out.contiguous()


def _aligned(*tensors) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


#: The CUDA driver's ``CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`` (CUfunction_attribute 8), for a CuPy without
#: the named constant.
_MAX_DYNAMIC_SHARED_ATTRIBUTE = 8
#: function pointer -> the dynamic shared memory it was opted in to (loaded modules stay loaded, see :mod:`.loader`)
_SHARED_OPT_IN: dict = {}


def _opt_in_shared(fn, smem: int) -> None:
    """Let ``fn`` launch with ``smem`` bytes of dynamic shared memory (above 48 KiB a kernel must opt in; sm_80
    allows 163 KiB, sm_90 227 KiB).

    The CPU harness's functions (and CuPy's ``RawKernel``) carry a settable ``max_dynamic_shared_size_bytes``;
    CuPy's ``cupy.cuda.function.Function``, which the loader hands out on a GPU, has only ``ptr``: on the first
    real H200 every tensor-core call above 48 KiB failed with "'cupy.cuda.function.Function' object has no
    attribute 'max_dynamic_shared_size_bytes'". There the driver's ``cuFuncSetAttribute`` sets it, once per
    function and size."""
    if hasattr(fn, "max_dynamic_shared_size_bytes"):
        if fn.max_dynamic_shared_size_bytes < smem:
            fn.max_dynamic_shared_size_bytes = smem
        return
    if _SHARED_OPT_IN.get(fn.ptr, 0) >= smem:
        return
    from cupy.cuda import driver

    attribute = getattr(driver, "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES", _MAX_DYNAMIC_SHARED_ATTRIBUTE)
    driver.funcSetAttribute(fn.ptr, attribute, smem)
    _SHARED_OPT_IN[fn.ptr] = smem


def _launch(L: Launcher, name: str, grid, tensors, scalars, smem: int) -> None:
    fn = loader.function(L.target, FAMILY, name, L.device_id)
    if smem > 48 * 1024:
        _opt_in_shared(fn, smem)
    L.launch(FAMILY, name, grid, (THREADS,), tensors, scalars, shared_mem=smem)


def _entry(stem: str, dtype: torch.dtype, vec: bool) -> str:
    return f"tc_{stem}_{_KIND[dtype]}" + ("_vec" if vec else "")


# ------------------------------------------------------------------------------------------- passes
def tc_forward(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], g: "ConvGeometry") -> torch.Tensor:
    """x (N, C, D, H, W), w (K, C/groups, KD, KH, KW), bias (K,) or None -> y (N, K, OD, OH, OW)."""
    L = Launcher(x)
    y_cl = L.empty((g.batch, *g.out_spatial, g.out_channels), g.dtype)
    if y_cl.numel() == 0:
        return _result(y_cl, x)
    cg, kg, taps = g.in_channels // g.groups, g.out_channels // g.groups, _taps(g)
    if cg * taps == 0:      # nothing to reduce: the bias alone
        y_cl.zero_()
        if bias is not None:
            y_cl += bias.to(g.dtype)
        return _result(y_cl, x)
    xl, wl = _channels_last(x), _channels_last(w)          # w: (K, KD, KH, KW, C/groups)
    b, has_bias = (bias.to(g.dtype).contiguous(), i32(1)) if bias is not None else (wl, i32(0))
    vec = cg % _vec(g.dtype) == 0 and _aligned(xl, wl)
    grid = (-(-(g.batch * math.prod(g.out_spatial)) // TILE_M), -(-kg // TILE_N), g.groups)
    _launch(L, _entry("forward", g.dtype, vec), grid, (xl, wl, b, y_cl), (has_bias, *simt._geom_args(g)),
            SMEM_KMAJOR)
    return _result(y_cl, x)


def tc_grad_input(gy: torch.Tensor, w: torch.Tensor, g: "ConvGeometry") -> torch.Tensor:
    """gy (N, K, OD, OH, OW), w (K, C/groups, KD, KH, KW) -> grad of the input (N, C, D, H, W)."""
    L = Launcher(gy)
    gx_cl = L.empty((g.batch, *g.in_spatial, g.in_channels), g.dtype)
    if gx_cl.numel() == 0:
        return _result(gx_cl, gy)
    cg, kg, taps = g.in_channels // g.groups, g.out_channels // g.groups, _taps(g)
    if gy.numel() == 0 or kg * taps == 0:
        return _result(gx_cl.zero_(), gy)
    gyl = _channels_last(gy)
    # (K, C/groups, taps) -> (C, taps, K/groups): the reduction (tap, kk) contiguous per input channel
    w3 = w.reshape(g.groups, kg, cg, taps).permute(0, 2, 3, 1).contiguous()
    vec = kg % _vec(g.dtype) == 0 and _aligned(gyl, w3)
    grid = (-(-(g.batch * math.prod(g.in_spatial)) // TILE_M), -(-cg // TILE_N), g.groups)
    _launch(L, _entry("grad_input", g.dtype, vec), grid, (gyl, w3, gx_cl), simt._geom_args(g), SMEM_KMAJOR)
    return _result(gx_cl, gy)


def splits(g: "ConvGeometry") -> tuple[int, int]:
    """(splits, chunk) of the weight gradient's reduction over N*OD*OH*OW (chunk: a K-step multiple)."""
    reduce = g.batch * math.prod(g.out_spatial)
    kg, cols = g.out_channels // g.groups, (g.in_channels // g.groups) * _taps(g)
    blocks = -(-kg // TILE_M) * -(-cols // TILE_N) * g.groups
    n = max(1, min(-(-TARGET_BLOCKS // blocks), reduce // max(MIN_SPLIT_LEN, 1), MAX_GRID_YZ // g.groups))
    chunk = -(-max(reduce, 1) // n)
    chunk = -(-chunk // SPLIT_ALIGN) * SPLIT_ALIGN
    return max(1, -(-reduce // chunk)), chunk


def workspace_bytes(g: "ConvGeometry") -> int:
    """Scratch beyond the results: the weight gradient's float32 partial sums (splits x |W|), and the
    channels-last copies of inputs that are not channels_last already (counted: the worst case)."""
    s, _ = splits(g)
    weight = g.out_channels * (g.in_channels // g.groups) * _taps(g)
    acts = g.batch * (g.in_channels * math.prod(g.in_spatial) + g.out_channels * math.prod(g.out_spatial))
    return s * weight * 4 + (acts + weight) * g.dtype.itemsize


def tc_grad_weight(gy: torch.Tensor, x: torch.Tensor, g: "ConvGeometry") -> torch.Tensor:
    """gy (N, K, OD, OH, OW), x (N, C, D, H, W) -> grad of the weight (K, C/groups, KD, KH, KW).
    Split-K into float32 partial sums, then a fixed-order reduction (deterministic, no atomics)."""
    L = Launcher(x)
    cg, kg, taps = g.in_channels // g.groups, g.out_channels // g.groups, _taps(g)
    gw = L.empty((g.out_channels, cg, *g.kernel), g.dtype)
    if gw.numel() == 0:
        return gw
    if gy.numel() == 0 or x.numel() == 0:
        return gw.zero_()
    gyl, xl = _channels_last(gy), _channels_last(x)
    s, chunk = splits(g)
    partial = L.empty((s, g.out_channels, taps * cg), torch.float32)
    v = _vec(g.dtype)
    vec = kg % v == 0 and cg % v == 0 and _aligned(gyl, xl)
    grid = (-(-kg // TILE_M), -(-(cg * taps) // TILE_N), g.groups * s)
    _launch(L, _entry("grad_weight", g.dtype, vec), grid, (gyl, xl, partial),
            (i32(s), i64(chunk), *simt._geom_args(g)), SMEM_MNMAJOR[g.dtype.itemsize])
    L.launch(FAMILY, f"tc_wgrad_reduce_{_KIND[g.dtype]}", (max(1, min(-(-gw.numel() // 256), MAX_GRID_X)),), (256,),
             (partial, gw), (i32(s), i32(g.out_channels), i32(cg), i32(taps)))
    return gw


# ---------------------------------------------------------------------------------------- heuristic
def heuristic(g: "ConvGeometry", pass_: str) -> str:
    """The CUDA heuristic with tensor cores first: float16/bfloat16 always, float32 on a GPU when
    TF32 is allowed (torch's default for convolutions). On the harness ("cuda-emu") auto keeps
    float32 on the exact SIMT algorithms, so the float32 correctness suite keeps float32 tolerances;
    ``algo="implicit-gemm-tc"`` runs TF32 there."""
    if refuse(g) is None and (g.dtype != torch.float32 or g.target == "cuda"):
        return NAME
    return simt.heuristic(g, pass_)


#: Declared as data (fastconv.spec types) for fastconv.ops.catalog, which registers them.
SUMMARY = ("CUDA tensor cores (sm_80+): implicit GEMM on channels-last tiles, mma.sync with float32 accumulation "
           "(float16/bfloat16; float32 as TF32 when torch.backends.cudnn.allow_tf32), 128x128 block tiles, "
           "3-stage cp.async pipeline, ldmatrix fragments; weight gradient split-K with a deterministic reduction")
DTYPES = ("float16", "bfloat16", "float32")
LAYOUTS = ("channels_last", "contiguous")


ALGORITHMS = [ConvAlgorithm(NAME, TARGETS, SUMMARY, tc_forward, tc_grad_input, tc_grad_weight, refuse=refuse,
                            workspace_bytes=workspace_bytes, dtypes=DTYPES, layouts=LAYOUTS)]
#: Replaces the SIMT heuristic on both CUDA targets (it falls back to it).
HEURISTICS = {target: heuristic for target in TARGETS}
