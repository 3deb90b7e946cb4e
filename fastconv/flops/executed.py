"""What each convolution algorithm really executes: multiplications and workspace, per algorithm name.

The nominal MAC count of a convolution (``N * K * prod(out) * (C/groups) * prod(kernel)``, taps over zero
padding included) is what fvcore, thop, ptflops and torch report. The algorithms do a different amount of
arithmetic: Winograd fewer multiplications, kernels that compute padded rows and drop them more, kernels
that skip padding taps fewer. :data:`EXECUTED` is one table keyed by algorithm name, with for each
algorithm a one-line description of what it executes and the formula, in the algorithm's own terms.

Why here and not in the registry: :class:`fastconv.registry.ConvAlgorithm` carries a ``mult_ratio`` hook
(used by the Winograd entries) and a ``workspace_bytes`` hook, but no exact per-geometry multiplication
count, and the registry belongs to the dispatch layer another part of the project owns. Until it grows an
``executed_multiplications(geometry)`` hook, the formulas live in this one table; each is checked in
``tests/test_flops_executed.py`` against the kernels' own tallies (the direct kernel's counting mode) or
the registry's ``mult_ratio``.

Counts are for the **forward** pass (what ``fastconv flops --measure`` times). For the gradient passes
:func:`executed_multiplications` returns the registry's ``mult_ratio x MACs`` (Winograd) or the nominal MACs.
Transform stages (Winograd's input/output/filter transforms: additions and multiplications by small
constants) are not multiplications of data by weights and are not counted, as in Lavin & Gray (2016).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from ..registry import ConvGeometry

__all__ = ["EXECUTED", "Executed", "executed_multiplications", "workspace_bytes", "in_range_pairs"]


def in_range_pairs(n_out: int, n_in: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Number of (output index, tap) pairs along one dim whose input index ``o*stride - padding + t*dilation``
    lies in ``[0, n_in)`` (closed form per tap; no kernel runs)."""
    total = 0
    for t in range(kernel):
        lo = padding - t * dilation            # o * stride >= lo
        hi = n_in - 1 + padding - t * dilation  # o * stride <= hi
        o_min = max(0, -(-lo // stride))
        o_max = min(n_out - 1, hi // stride) if hi >= 0 else -1
        total += max(0, o_max - o_min + 1)
    return total


def _per_pair(g: ConvGeometry) -> int:
    return g.batch * g.out_channels * (g.in_channels // g.groups)


def _direct(g: ConvGeometry) -> int:
    # depth and height walk only in-range (tap, row) pairs; along width every tap runs over the whole
    # output row of a zero-padded copy (multiplications by zero over the padding are executed)
    pd = in_range_pairs(g.out_spatial[0], g.in_spatial[0], g.kernel[0], g.stride[0], g.padding[0], g.dilation[0])
    ph = in_range_pairs(g.out_spatial[1], g.in_spatial[1], g.kernel[1], g.stride[1], g.padding[1], g.dilation[1])
    return _per_pair(g) * pd * ph * g.kernel[2] * g.out_spatial[2]


def _im2col(g: ConvGeometry) -> int:
    try:  # the kernel module's own predicates decide which path runs
        from ..cpu import im2col_fused, thin_input
        from ..cpu.conv import _is_pointwise, _wide_ok
    except ImportError:  # pragma: no cover - kernels unavailable: the plain column GEMM
        return g.macs
    kg = g.out_channels // g.groups
    if _is_pointwise(g.kernel, g.stride, g.padding, g.in_spatial, g.out_spatial):
        return g.macs
    if thin_input.applies(g.groups, g.in_channels, g.kernel, g.stride, g.dilation, g.in_spatial, g.out_spatial,
                          g.padding, g.dtype.itemsize):
        return g.macs  # every tap of every output position, over the zero-padded input's phases
    if im2col_fused.applies(g.kernel, g.groups, g.in_channels, g.out_channels, g.in_spatial, g.out_spatial,
                            g.dtype.itemsize):
        return g.macs  # columns of exactly the output positions, chunk by chunk
    if _wide_ok(g.kernel, g.stride, g.padding, g.dilation, g.in_spatial, g.out_spatial, kg):
        # wide rows: each output row is computed at the padded row length OW + (KW-1)*dw, extra dropped
        wq = g.out_spatial[2] + (g.kernel[2] - 1) * g.dilation[2]
        return _per_pair(g) * math.prod(g.kernel) * g.out_spatial[1] * wq
    return g.macs  # every column entry (padding zeros included) meets every filter of its group


def _winograd(m: int) -> Callable[[ConvGeometry], int]:
    def mults(g: ConvGeometry) -> int:
        a = m + 2
        tiles = -(-g.out_spatial[1] // m) * -(-g.out_spatial[2] // m)  # border tiles are whole tiles
        return _per_pair(g) * tiles * a * a
    return mults


def _depthwise(g: ConvGeometry) -> int:
    (_, OH, OW), (KD, KH, KW), (_, sh, sw) = g.out_spatial, g.kernel, g.stride
    taps = g.batch * g.out_channels * KD * KH * KW  # one input channel per filter
    if g.in_spatial[0] == 1 and g.out_spatial[0] == 1 and KD == 1 and min(g.padding[1:]) >= 0 and OH * OW:
        # fast 2-D path: row pitch exactly OW, every input row from the first to the last output's is
        # computed and every sh-th kept (stride 2 in H doubles the arithmetic)
        return taps * OW * ((OH - 1) * sh + 1)
    # padded-plane path: rows of pitch OW + ((KW-1)*dw)//sw, depth pairs in range only
    wq = OW + ((KW - 1) * g.dilation[2]) // sw
    pd = in_range_pairs(g.out_spatial[0], g.in_spatial[0], KD, g.stride[0], g.padding[0], g.dilation[0])
    return g.batch * g.out_channels * pd * KH * KW * OH * wq


def _tiled_gemm(m_rows: int, n_cols: int, k_red: int, groups: int) -> int:
    bm, bn, bk = 64, 64, 8  # IG_BM, IG_BN, IG_BK of kernels/conv.cu (fastconv.cuda.conv.IG_TILE_M ...)
    return groups * (-(-m_rows // bm) * bm) * (-(-n_cols // bn) * bn) * (-(-k_red // bk) * bk)


def _implicit_gemm(g: ConvGeometry) -> int:
    # forward GEMM: M = N*prod(out), N = K/groups, K = C/groups * prod(kernel), per group; partial tiles
    # are computed in full (their out-of-range lanes multiply zeros)
    return _tiled_gemm(g.batch * math.prod(g.out_spatial), g.out_channels // g.groups,
                       (g.in_channels // g.groups) * math.prod(g.kernel), g.groups)


def _implicit_gemm_tc(g: ConvGeometry) -> int:
    # kernels/conv_tc.cu: 128x128 block tiles, a K-step of 64 bytes (32 halves, 16 floats as TF32)
    bk = 64 // g.dtype.itemsize
    m, n, k = g.batch * math.prod(g.out_spatial), g.out_channels // g.groups, (g.in_channels // g.groups) * math.prod(g.kernel)
    return g.groups * (-(-m // 128) * 128) * (-(-n // 128) * 128) * (-(-k // bk) * bk)


def _fft(g: ConvGeometry) -> int:
    from ..cpu import fft  # the algorithm's own count: transform sizes are its choice

    return fft.executed_multiplications(g.batch, g.in_channels, g.out_channels, g.groups, g.kernel, g.stride,
                                        g.dilation, g.out_spatial)


def _fft_workspace(g: ConvGeometry) -> int:
    from ..cpu import fft

    return fft.spectra_bytes(g.batch, g.in_channels, g.out_channels, g.groups, g.kernel, g.stride, g.dilation,
                             g.out_spatial, g.dtype.itemsize)


def _shift(g: ConvGeometry) -> int:
    from ..cpu import shift

    return shift.executed_multiplications(g.batch, g.in_channels, g.out_channels, g.groups, g.kernel, g.stride,
                                          g.dilation, g.out_spatial, g.padding, g.in_spatial)


def _group_lanes(g: ConvGeometry) -> int:
    from ..cpu import group_lanes

    return group_lanes.executed_multiplications(g.batch, g.in_channels, g.out_channels, g.groups, g.kernel,
                                                g.out_spatial)


@dataclass(frozen=True)
class Executed:
    """What one algorithm executes: ``mults(geom)`` for the forward pass, ``workspace(geom)`` in bytes
    (None: ask the registry's ``workspace_bytes`` hook)."""

    description: str
    mults: Callable[[ConvGeometry], int]
    workspace: Optional[Callable[[ConvGeometry], int]] = None


#: algorithm name -> what it executes (forward pass). Keep one entry per registered algorithm.
EXECUTED: dict[str, Executed] = {
    "direct": Executed(
        "loop nest: taps over padding rows (D, H) skipped, over padding columns (W) executed as x0",
        _direct, lambda g: 0),
    "im2col": Executed(
        "column GEMM: nominal MACs (padding taps multiply zeros); stride-1 wide rows compute the "
        "OW+(KW-1)*dw padded row and drop the extra (dense 1-D/2-D layers take the fused path's exact "
        "columns instead); 1x1 stride 1 is a plain GEMM", _im2col),
    "winograd2": Executed(
        "F(2x2,3x3): 16 multiplies per 2x2 output tile per (k, c) (2.25x fewer than 36), border "
        "tiles computed whole; transforms not counted", _winograd(2)),
    "winograd4": Executed(
        "F(4x4,3x3): 36 multiplies per 4x4 output tile per (k, c) (4x fewer than 144), border tiles "
        "computed whole; transforms not counted", _winograd(4)),
    "depthwise": Executed(
        "one input channel per filter; 2-D: flat rows of pitch OW over every input row from the first "
        "to the last output's (stride sh in H: about sh x the outputs' work)", _depthwise, lambda g: 0),
    "shift": Executed(
        "shifted planes: every output channel over the whole N x Hq x Wq plane grid (output pixels plus the "
        "extra columns and rows of the stride-phase planes, computed and dropped), every tap", _shift),
    "group_lanes": Executed(
        "eight groups per vector: every output pixel, tap and input channel of whole blocks of 8 groups (a last "
        "block of fewer groups computes its spare lanes too)", _group_lanes),
    "patch_gemm": Executed(
        "transposed conv with kernel == stride: one GEMM of exactly the nominal products, then a "
        "scatter without accumulation", lambda g: g.macs),  # workspace: its declaration's hook
    "fft": Executed(
        "FFT: 4 real multiplications per complex product of spectra in the channel GEMMs (stride phases "
        "as channels), plus the transforms (about n log2 n each)", _fft, _fft_workspace),
    "cuda-direct": Executed(
        "CUDA: one thread per output element, every tap (padding taps multiply zeros)", lambda g: g.macs,
        lambda g: 0),
    "implicit-gemm": Executed(
        "CUDA: 64x64 block tiles, K-step 8: M, N and K rounded up to whole tiles", _implicit_gemm, lambda g: 0),
    "implicit-gemm-tc": Executed(
        "CUDA tensor cores: 128x128 block tiles, K-step 32 (16-bit) or 16 (TF32): M, N and K rounded up to whole "
        "tiles", _implicit_gemm_tc),
    "cuda-depthwise": Executed(
        "CUDA: one thread per output element of one channel, every tap", lambda g: g.macs, lambda g: 0),
    "torch": Executed("torch's own kernel (oneDNN/cuDNN): not modelled, nominal MACs", lambda g: g.macs,
                      lambda g: 0),
}


def executed_multiplications(algorithm: str, geom: ConvGeometry, pass_: str = "forward",
                             registry_alg=None) -> int:
    """Multiplications ``algorithm`` executes for one pass of ``geom``.

    Forward: the :data:`EXECUTED` formula. Other passes: ``round(mult_ratio(geom) * macs)`` from the
    registry entry when one is given (Winograd), else the nominal MACs. Unknown names: nominal MACs.
    """
    if pass_ == "forward" and algorithm in EXECUTED:
        return int(EXECUTED[algorithm].mults(geom))
    if registry_alg is not None:
        return round(registry_alg.mult_ratio(geom) * geom.macs)
    return geom.macs


def workspace_bytes(algorithm: str, geom: ConvGeometry, registry_alg=None) -> int:
    """Extra bytes ``algorithm`` allocates for ``geom``: the table's formula, else the registry's hook."""
    entry = EXECUTED.get(algorithm)
    if entry is not None and entry.workspace is not None:
        return int(entry.workspace(geom))
    if registry_alg is not None:
        return int(registry_alg.workspace_bytes(geom))
    return 0
