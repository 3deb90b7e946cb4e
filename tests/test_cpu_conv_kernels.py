"""Numba CPU convolution kernels (fastconv.cpu.conv, and fastconv.cpu.shift for 1-D/2-D) against torch,
forward and both gradients.

Reference: torch autograd through ``F.pad`` (asymmetric / cropping padding) + ``F.conv1d/2d/3d``
with padding 0, in float64. Every kernel is called on 5-D arrays exactly as the op layer does.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastconv.cpu import conv as cc
from fastconv.cpu import im2col_fused, jit_gemm, shift, thin_input
from helpers import assert_close, tolerance

ALGOS = ("direct", "im2col", "im2col-fused", "im2col-taps", "im2col-gather", "im2col-thin", "im2col-per-group")
#: The kernels that run 1-D and 2-D convs only (3-D is refused by their algorithm's declaration).
PLANAR_ALGOS = ALGOS + ("shift",)


def _kernels(algo):
    if algo == "shift":
        return shift.forward, shift.grad_input, shift.grad_weight
    return (getattr(cc, f"{algo}_forward"), getattr(cc, f"{algo}_grad_input"),
            getattr(cc, f"{algo}_grad_weight"))


def _assert_kernel_close(got, ref, what):
    """The table's tolerance for ``ref``'s dtype, as an absolute bound scaled by max(1, max |ref|): these
    kernels sum whole receptive fields, so an output near zero carries the rounding of its large terms."""
    assert got.flags.c_contiguous, f"{what}: result not C-contiguous"
    scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
    tol = tolerance(torch.from_numpy(ref[:0]).dtype)
    assert_close(got, ref, what=what, rtol=0.0, atol=(tol["atol"] + tol["rtol"]) * scale)


def _reference(x, w, b, stride, pad_before, pad_after, dilation, groups):
    """torch forward and gradients; x is (N, C, *sp) with 1-3 spatial dims."""
    nd = x.dim() - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    pads = []
    for i in reversed(range(nd)):
        pads += [pad_before[i], pad_after[i]]
    y = conv(F.pad(x, pads), w, b, stride, 0, dilation, groups)
    go = torch.randn_like(y)
    if y.numel():
        gx, gw = torch.autograd.grad(y, (x, w), go)
    else:
        gx, gw = torch.zeros_like(x), torch.zeros_like(w)
    return y.detach(), go, gx, gw


def _to5(a, nd):
    """(N, C, *sp) numpy -> (N, C, D, H, W) with size-1 leading spatial dims."""
    return np.ascontiguousarray(a.reshape(a.shape[:2] + (1,) * (3 - nd) + a.shape[2:]))


def _pad3(v, nd, fill):
    return (fill,) * (3 - nd) + tuple(v)


def _is_pointwise_case(ksz, stride, pad_before, pad_after):
    """A 1x1 stride-1 unpadded conv: a plain GEMM, which no column, taps or gather kernel runs."""
    return all(k == 1 for k in ksz) and all(s == 1 for s in stride) and not any(pad_before) and not any(pad_after)


def _fused_applies(nd, ksz, groups):
    return nd <= 2 and groups == 1 and int(np.prod(ksz)) > 1


class _fused_everywhere:
    """Context: the fused im2col path for every size (no channel, weight or column-length limits, the parallel
    region from the first multiply-add, chunks of about one output row) and a list of its forward calls; with
    ``taps``, its forwards on the taps kernel (the own GEMM switched on; strided ones through their phases at any
    depth; a list of those calls as ``.taps``), else on the column fills; the weight gradients on the column fills."""

    def __init__(self, taps: bool = False):
        self.use_taps = taps
        self.taps = []

    def __enter__(self):
        self.saved = {k: getattr(im2col_fused, k) for k in ("MIN_IN_CHANNELS", "MAX_WEIGHT_BYTES",
                                                            "PARALLEL_MIN_MACS", "CHUNK_BYTES", "forward",
                                                            "MIN_CHUNK_COLUMNS", "MIN_GRAD_WEIGHT_CHUNK_COLUMNS",
                                                            "TAPS", "TAPS_CHUNK_BYTES", "TAPS_MIN_OW",
                                                            "TAPS_STRIDED_MAX_IN_CHANNELS", "_forward_taps",
                                                            "GATHER")}
        im2col_fused.GATHER = False  # the column fills and the taps kernel here; the gather row has its own
        self.thin, thin_input.ENABLED = thin_input.ENABLED, False  # (and the thin-input row)
        self.own = jit_gemm.use_own_gemm(True) if self.use_taps else jit_gemm.own_gemm_in_use()
        im2col_fused.TAPS = self.use_taps
        im2col_fused.TAPS_CHUNK_BYTES = 64  # one output row per chunk: many chunks and tasks
        im2col_fused.TAPS_MIN_OW = 1
        im2col_fused.TAPS_STRIDED_MAX_IN_CHANNELS = 1 << 30  # strided convs of any depth through their phases
        real_taps = self.saved["_forward_taps"]
        im2col_fused._forward_taps = lambda *a: self.taps.append("forward") or real_taps(*a)
        self.min_positions = cc.FUSED_GRAD_INPUT_MIN_POSITIONS, cc.FUSED_GRAD_INPUT_MAX_EXPANSION
        cc.FUSED_GRAD_INPUT_MIN_POSITIONS, cc.FUSED_GRAD_INPUT_MAX_EXPANSION = 0, 1 << 30
        calls = []
        real = self.saved["forward"]
        im2col_fused.MIN_IN_CHANNELS, im2col_fused.MAX_WEIGHT_BYTES = 0, 1 << 62
        im2col_fused.PARALLEL_MIN_MACS, im2col_fused.CHUNK_BYTES = 0, 64
        im2col_fused.MIN_CHUNK_COLUMNS = im2col_fused.MIN_GRAD_WEIGHT_CHUNK_COLUMNS = 0
        im2col_fused.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
        return calls

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(im2col_fused, k, v)
        jit_gemm.use_own_gemm(self.own)
        cc.FUSED_GRAD_INPUT_MIN_POSITIONS, cc.FUSED_GRAD_INPUT_MAX_EXPANSION = self.min_positions
        thin_input.ENABLED = self.thin


class _gather_everywhere:
    """Context: the gather kernels (:func:`.im2col_fused.forward_gather`, :func:`.im2col_fused.grad_weight_gather`)
    for every dense 1-D/2-D conv, on the own GEMM, in parallel from the first multiply-add, with jobs of one
    micro-kernel's rows (forward) and chunks of the output gradient as short as that (weight gradient), so jobs
    span images and the weight gradient accumulates over many chunks; the stride-1 input gradient through the
    fused path's flipped forward, so it takes the gather forward too. Yields the list of passes that ran on it."""

    _NAMES = ("GATHER", "GATHER_MAX_WEIGHT_BYTES", "GATHER_GRAD_MAX_WEIGHT_BYTES", "GATHER_TAPS_MIN_OUT_CHANNELS",
              "TAPS_NARROW_MAX_OUT_CHANNELS", "GATHER_CHUNK_BYTES",
              "GATHER_GRAD_CHUNK_BYTES", "PARALLEL_MIN_MACS", "MIN_IN_CHANNELS", "MAX_WEIGHT_BYTES",
              "MIN_CHUNK_COLUMNS", "forward_gather", "grad_weight_gather", "ENABLED")

    def __enter__(self):
        self.saved = {k: getattr(im2col_fused, k) for k in self._NAMES}
        self.own = jit_gemm.use_own_gemm(True)
        self.min_positions = cc.FUSED_GRAD_INPUT_MIN_POSITIONS, cc.FUSED_GRAD_INPUT_MAX_EXPANSION
        cc.FUSED_GRAD_INPUT_MIN_POSITIONS, cc.FUSED_GRAD_INPUT_MAX_EXPANSION = 0, 1 << 30
        im2col_fused.GATHER = im2col_fused.ENABLED = True
        self.thin, thin_input.ENABLED = thin_input.ENABLED, False  # the thin-input row has its own
        im2col_fused.GATHER_MAX_WEIGHT_BYTES = im2col_fused.GATHER_GRAD_MAX_WEIGHT_BYTES = 1 << 62
        im2col_fused.MAX_WEIGHT_BYTES = 1 << 62
        im2col_fused.GATHER_TAPS_MIN_OUT_CHANNELS = 1 << 30
        im2col_fused.TAPS_NARROW_MAX_OUT_CHANNELS = 0
        im2col_fused.GATHER_CHUNK_BYTES = im2col_fused.GATHER_GRAD_CHUNK_BYTES = 1
        im2col_fused.PARALLEL_MIN_MACS = im2col_fused.MIN_IN_CHANNELS = im2col_fused.MIN_CHUNK_COLUMNS = 0
        ran = []
        real_forward, real_grad_weight = self.saved["forward_gather"], self.saved["grad_weight_gather"]
        im2col_fused.forward_gather = lambda *a: ran.append("forward") or real_forward(*a)
        im2col_fused.grad_weight_gather = lambda *a: ran.append("grad_weight") or real_grad_weight(*a)
        return ran

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(im2col_fused, k, v)
        jit_gemm.use_own_gemm(self.own)
        cc.FUSED_GRAD_INPUT_MIN_POSITIONS, cc.FUSED_GRAD_INPUT_MAX_EXPANSION = self.min_positions
        thin_input.ENABLED = self.thin


class _thin_everywhere:
    """Context: the thin-input forward and weight gradient (:mod:`fastconv.cpu.thin_input`) for every dense 1-D/2-D
    conv they can run (any reduction, any row width: every tile size and the element tail); yields the list of the
    passes that ran there."""

    def __enter__(self):
        self.saved = {k: getattr(thin_input, k) for k in ("ENABLED", "GRAD_WEIGHT", "MAX_REDUCTION", "MIN_ROW_VECTORS",
                                                          "MAX_GRAD_WEIGHT_REDUCTION", "WHOLE_VECTOR_ROWS", "forward",
                                                          "grad_weight")}
        thin_input.ENABLED = thin_input.GRAD_WEIGHT = True
        thin_input.WHOLE_VECTOR_ROWS = False
        thin_input.MAX_REDUCTION = thin_input.MAX_GRAD_WEIGHT_REDUCTION = 1 << 30
        thin_input.MIN_ROW_VECTORS = 0
        calls = []
        real_forward, real_grad_weight = self.saved["forward"], self.saved["grad_weight"]
        thin_input.forward = lambda *a: calls.append("forward") or real_forward(*a)
        thin_input.grad_weight = lambda *a: calls.append("grad_weight") or real_grad_weight(*a)
        return calls

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            setattr(thin_input, k, v)


def _fused_for_any_size(monkeypatch, on: bool):
    monkeypatch.setattr(im2col_fused, "ENABLED", on)
    monkeypatch.setattr(im2col_fused, "MIN_IN_CHANNELS", 0)


@pytest.mark.parametrize("ksz,stride,pad", [((7, 7), 2, 3), ((3, 3), 2, 1), ((4, 4), 4, 0)],
                         ids=["resnet-7x7-s2", "mobilenet-3x3-s2", "convnext-4x4-s4"])
def test_rgb_stems_take_the_fused_path_and_match_torch(ksz, stride, pad, monkeypatch):
    # With the default limits (no test switches) a 3-channel stem's forward and weight gradient run fused
    # (MIN_IN_CHANNELS: faster than the plain path since the flat fills), float64 against torch; where the own
    # GEMM is in use (or the weights are small enough for it on a host whose GEMMs run on MKL: SMALL_ON_OWN), on the
    # gather kernels (faster still: GATHER_MAX_WEIGHT_BYTES).
    small = im2col_fused.small_for_own(8, 3 * ksz[0] * ksz[1], ksz, (stride, stride), 8)
    gather = im2col_fused.gather_applies((1,) + ksz, 1, (1, 24, 24), (1, 8, 8), small)
    ran = []
    for name in ("forward_gather", "grad_weight_gather") if gather else ("forward", "grad_weight"):
        real = getattr(im2col_fused, name)
        monkeypatch.setattr(im2col_fused, name, lambda *a, _real=real, _name=name: ran.append(_name) or _real(*a))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 24, 24, generator=g, dtype=torch.float64)
    w = torch.randn((8, 3) + ksz, generator=g, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    p = (pad, pad)
    y, go, _, gw = _reference(x, w, b, (stride, stride), p, p, (1, 1), 1)
    x5, w5, go5 = (_to5(t.numpy(), 2) for t in (x, w, go))
    st, pb, dl = (1, stride, stride), (0, pad, pad), (1, 1, 1)
    _assert_kernel_close(cc.im2col_forward(x5, w5, b.numpy(), st, pb, dl, 1, _pad3(y.shape[2:], 2, 1)),
                         _to5(y.numpy(), 2), "forward")
    _assert_kernel_close(cc.im2col_grad_weight(go5, x5, st, pb, dl, 1, (1,) + ksz), _to5(gw.numpy(), 2),
                         "grad_weight")
    assert ran == (["forward_gather", "grad_weight_gather"] if gather else ["forward", "grad_weight"]), ran


class _per_group_everywhere:
    """Context: every grouped conv of more than one tap runs as one dense conv per group (cpu.conv._per_group), at
    any width and group count; yields the list of the dense calls' group counts (each 1) made from a grouped one."""

    def __enter__(self):
        self.saved = cc.PER_GROUP_MAX_GROUPS, cc.PER_GROUP_MIN_OUT, cc.PER_GROUP_MIN_REDUCTION, cc._per_group
        cc.PER_GROUP_MAX_GROUPS, cc.PER_GROUP_MIN_OUT, cc.PER_GROUP_MIN_REDUCTION = 1 << 30, 1, 1
        real = self.saved[3]
        runs = []
        cc._per_group = lambda G, *a: (real(G, *a) and (runs.append(G) or True))
        return runs

    def __exit__(self, *exc):
        cc.PER_GROUP_MAX_GROUPS, cc.PER_GROUP_MIN_OUT, cc.PER_GROUP_MIN_REDUCTION, cc._per_group = self.saved


def _check(algo, N, C, K, sp, ksz, stride, pad_before, pad_after, dilation, groups,
           dtype=np.float64, bias=True, seed=0, fused=False):
    """``algo`` "im2col" checks the plain paths (the fused one switched off: the thin inputs of these cases would
    take it), "im2col-fused" the fused path at every size."""
    nd = len(sp)
    if algo == "im2col-gather":
        if not (nd <= 2 and groups == 1):
            pytest.skip("the gather kernels run dense 1-D/2-D convs only")
        with _gather_everywhere() as ran:
            _check("im2col", N, C, K, sp, ksz, stride, pad_before, pad_after, dilation, groups, dtype, bias, seed,
                   fused=True)
        assert {"forward", "grad_weight"} <= set(ran) or N == 0 or _is_pointwise_case(ksz, stride, pad_before,
                                                                                      pad_after), \
            f"the gather kernels did not run both passes: {ran}"
        return
    if algo == "im2col-per-group":
        if groups == 1 or _is_pointwise_case(ksz, stride, pad_before, pad_after) or int(np.prod(ksz)) == 1:
            pytest.skip("one dense conv per group runs grouped convs of more than one tap only")
        with _per_group_everywhere() as groups_run:
            _check("im2col", N, C, K, sp, ksz, stride, pad_before, pad_after, dilation, groups, dtype, bias, seed)
        assert groups_run or N == 0, "the grouped conv did not run as one dense conv per group"
        return
    if algo == "im2col-thin":
        runs = (nd <= 2 and groups == 1 and int(np.prod(ksz)) > 1 and all(d == 1 for d in dilation)
                and min(pad_before) >= 0 and any(k > s for k, s in zip(ksz, stride)))
        if not runs:
            pytest.skip("the thin-input forward runs dense 1-D/2-D convs of overlapping windows, dilation 1, padding "
                        ">= 0 only")
        with _thin_everywhere() as calls:
            _check("im2col", N, C, K, sp, ksz, stride, pad_before, pad_after, dilation, groups, dtype, bias, seed,
                   fused=True)
        assert {"forward", "grad_weight"} <= set(calls) or N == 0, f"the thin-input kernels did not both run: {calls}"
        return
    if algo in ("im2col-fused", "im2col-taps"):
        if not _fused_applies(nd, ksz, groups):
            pytest.skip("the fused im2col path runs dense 1-D/2-D convs of more than one tap only")
        taps = algo == "im2col-taps"
        if taps and any(s != 1 for s in stride) and all(k <= s for k, s in zip(ksz, stride)):
            pytest.skip("a strided window no larger than its stride is one tap per phase: the taps kernel leaves it "
                        "to the column fills ('im2col-fused')")
        context = _fused_everywhere(taps)
        with context as calls:
            _check("im2col", N, C, K, sp, ksz, stride, pad_before, pad_after, dilation, groups, dtype, bias, seed,
                   fused=True)
        assert calls or N == 0, "the fused im2col path did not run"  # an empty batch returns before any path
        assert not taps or "forward" in context.taps or N == 0, f"the taps kernel did not run: {context.taps}"
        return
    if algo == "im2col" and not fused and (im2col_fused.ENABLED or thin_input.ENABLED):
        saved = im2col_fused.ENABLED, thin_input.ENABLED
        im2col_fused.ENABLED = thin_input.ENABLED = False
        try:
            _check(algo, N, C, K, sp, ksz, stride, pad_before, pad_after, dilation, groups, dtype, bias, seed)
        finally:
            im2col_fused.ENABLED, thin_input.ENABLED = saved
        return
    g = torch.Generator().manual_seed(seed)
    tdt = torch.float64
    x = torch.randn((N, C) + tuple(sp), generator=g, dtype=tdt)
    w = torch.randn((K, C // groups) + tuple(ksz), generator=g, dtype=tdt)
    b = torch.randn(K, generator=g, dtype=tdt) if bias else None
    torch.manual_seed(seed)
    y, go, gx, gw = _reference(x, w, b, stride, pad_before, pad_after, dilation, groups)
    cast = lambda t: _to5(t.numpy().astype(dtype), nd)  # noqa: E731
    x5, w5, go5 = cast(x), cast(w), cast(go)
    b5 = None if b is None else b.numpy().astype(dtype)
    st, pb, dl = _pad3(stride, nd, 1), _pad3(pad_before, nd, 0), _pad3(dilation, nd, 1)
    out_sp = _pad3(y.shape[2:], nd, 1)
    in_sp = _pad3(sp, nd, 1)
    k_sp = _pad3(ksz, nd, 1)
    fwd, gin, gwt = _kernels(algo)
    what = f"{algo} {dtype.__name__} N={N} C={C} K={K} sp={sp} k={ksz} s={stride} " \
           f"p={pad_before}/{pad_after} d={dilation} g={groups}"
    _assert_kernel_close(fwd(x5, w5, b5, st, pb, dl, groups, out_sp), cast(y), "forward " + what)
    _assert_kernel_close(gin(go5, w5, st, pb, dl, groups, in_sp), cast(gx), "grad_input " + what)
    _assert_kernel_close(gwt(go5, x5, st, pb, dl, groups, k_sp), cast(gw), "grad_weight " + what)


# ---- the 2-D matrix ------------------------------------------------------------------------

_SP = (7, 9)
_KERNELS = [(1, 1), (2, 2), (3, 3), (3, 5), _SP]
_PADS = {  # name -> (before, after); "asym" = torch's 'same' with an even kernel, "crop" leaves
    "0": ((0, 0), (0, 0)),  # the last input columns untouched by any window
    "1": ((1, 1), (1, 1)),
    "asym": ((0, 1), (1, 0)),
    "crop": ((1, 0), (-1, -2)),
}
_GROUPS = {"g1": (4, 6, 1), "g2": (4, 6, 2), "dw": (4, 4, 4), "dw_mult2": (4, 8, 4)}


def _out_size(n, k, s, pb, pa, d):
    return (n + pb + pa - d * (k - 1) - 1) // s + 1


def _matrix():
    for ksz, s, pname, d, gname in itertools.product(
            _KERNELS, (1, 2, 3), _PADS, (1, 2), _GROUPS):
        pb, pa = _PADS[pname]
        if any(_out_size(n, k, s, b, a, d) < 1 for n, k, b, a in zip(_SP, ksz, pb, pa)):
            continue
        yield pytest.param(ksz, s, pname, d, gname,
                           id=f"k{ksz[0]}x{ksz[1]}-s{s}-p{pname}-d{d}-{gname}")


@pytest.mark.parametrize("algo", PLANAR_ALGOS)
@pytest.mark.parametrize("ksz,s,pname,d,gname", list(_matrix()))
def test_conv2d_matrix_float64(algo, ksz, s, pname, d, gname, monkeypatch):
    C, K, groups = _GROUPS[gname]
    if algo == "im2col" and s == 2:  # also cover the untransposed GEMM orientation
        monkeypatch.setattr(cc, "GEMM_TRANSPOSED_MAX_K", 0)
    pb, pa = _PADS[pname]
    _check(algo, 2, C, K, _SP, ksz, (s, s), pb, pa, (d, d), groups)


@pytest.mark.parametrize("algo", PLANAR_ALGOS)
@pytest.mark.parametrize("ksz,stride,pad,dil,groups", [
    ((3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((3, 5), (2, 1), (2, 0), (1, 2), 2),
    ((1, 1), (1, 1), (0, 0), (1, 1), 1),
    ((5, 5), (3, 3), (2, 2), (1, 1), 4),
])
def test_conv2d_float32(algo, ksz, stride, pad, dil, groups):
    _check(algo, 2, 8, 12, (11, 13), ksz, stride, pad, pad, dil, groups, dtype=np.float32)


@pytest.mark.parametrize("algo", PLANAR_ALGOS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("ksz,pad", [((3, 3), (1, 1)), ((1, 1), (0, 0))])
def test_batch_zero(algo, dtype, ksz, pad):
    _check(algo, 0, 4, 6, (5, 6), ksz, (1, 1), pad, pad, (1, 1), 1, dtype=dtype)


@pytest.mark.parametrize("algo", PLANAR_ALGOS)
def test_no_bias_and_mixed_geometry(algo):
    _check(algo, 3, 6, 9, (10, 8), (2, 3), (2, 1), (1, 0), (0, 2), (2, 1), 3, bias=False)


# ---- 1-D and 3-D ---------------------------------------------------------------------------

@pytest.mark.parametrize("algo", PLANAR_ALGOS)
@pytest.mark.parametrize("k,s,pb,pa,d,g", [
    (3, 1, 1, 1, 1, 1), (4, 2, 1, 2, 1, 2), (5, 3, 0, 0, 2, 6), (1, 1, 0, 0, 1, 1), (2, 1, 0, 1, 1, 1),
])
def test_conv1d(algo, k, s, pb, pa, d, g):
    _check(algo, 2, 6, 6 if g == 6 else 10, (17,), (k,), (s,), (pb,), (pa,), (d,), g)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("ksz,s,pb,pa,d,g", [
    ((3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 1, 1), 1),
    ((2, 3, 1), (2, 1, 3), (1, 0, 0), (0, 1, 0), (1, 2, 1), 2),
    ((1, 1, 1), (1, 1, 1), (0, 0, 0), (0, 0, 0), (1, 1, 1), 1),
    ((3, 2, 3), (1, 2, 2), (0, 1, 1), (1, 0, 1), (2, 1, 1), 4),
])
def test_conv3d(algo, ksz, s, pb, pa, d, g):
    _check(algo, 2, 4, 8, (5, 6, 7), ksz, s, pb, pa, d, g)


@pytest.mark.parametrize("algo", ALGOS)
def test_conv3d_float32(algo):
    _check(algo, 2, 4, 8, (5, 6, 7), (3, 3, 3), (1, 2, 1), (1, 1, 1), (1, 1, 1), (1, 1, 2), 2,
           dtype=np.float32)


# ---- im2col chunking (column buffer cap) ----------------------------------------------------

@pytest.mark.parametrize("transposed_max_k", [0, 1 << 30])
@pytest.mark.parametrize("cap", [1, 4096, 20000, 1 << 30])
def test_im2col_chunking(monkeypatch, cap, transposed_max_k):
    """A tiny cap forces row chunks of one image; a medium cap groups several images per GEMM;
    both GEMM orientations of the forward are exercised."""
    monkeypatch.setattr(im2col_fused, "ENABLED", False)  # the plain paths this test watches
    monkeypatch.setattr(cc, "COL_BUFFER_BYTES", cap)
    monkeypatch.setattr(cc, "GEMM_TRANSPOSED_MAX_K", transposed_max_k)
    _check("im2col", 5, 4, 6, (9, 10), (3, 3), (2, 1), (1, 1), (1, 1), (1, 1), 2)
    _check("im2col", 5, 4, 6, (5, 6, 7), (3, 2, 3), (1, 1, 2), (1, 0, 1), (1, 1, 0), (1, 2, 1), 1)


def _spy(monkeypatch, kernel_name):
    """Replace ``cc.<kernel_name>`` by a wrapper that records each call; returns the (growing) list of calls."""
    calls = []
    kernel = getattr(cc, kernel_name)

    def spy(*args):
        calls.append(1)
        return kernel(*args)

    monkeypatch.setattr(cc, kernel_name, spy)
    return calls


@pytest.mark.parametrize("position_rows", [False, True])
@pytest.mark.parametrize("narrow", [-1, 1 << 30])
@pytest.mark.parametrize("cap", [1, 4096, 1 << 30])
def test_im2col_narrow_gather_and_segment_columns(monkeypatch, narrow, cap, position_rows):
    """Both column builders on the same geometries: the gather from a zero-padded box (every output row
    counted narrow) and the row segments of the phase-split copy (none narrow), chunked and not, and both ways
    back for the input gradient (the scatter into a padded box, then cropped, from columns made as W^T @ go or,
    ``position_rows``, as go^T @ W for dense convs; col2im into the phase-split buffer); spies make sure the
    narrow kernels really ran. 1-D to 3-D, strides, dilation, asymmetric and cropping padding, groups."""
    monkeypatch.setattr(im2col_fused, "ENABLED", False)  # the plain paths this test watches
    monkeypatch.setattr(cc, "GATHER_MAX_OW", narrow)
    monkeypatch.setattr(cc, "COL_BUFFER_BYTES", cap)
    monkeypatch.setattr(cc, "GRAD_INPUT_POSITION_ROWS", position_rows)
    monkeypatch.setattr(cc, "GRAD_INPUT_POSITION_ROWS_MAX_POSITIONS", 1 << 30)
    gathers = _spy(monkeypatch, "_im2col_gather")
    scatters = _spy(monkeypatch, "_col2im_gather")
    row_scatters = _spy(monkeypatch, "_col2im_gather_rows")
    _check("im2col", 3, 4, 6, (9, 10), (3, 3), (2, 1), (1, 1), (1, 1), (1, 1), 2)
    _check("im2col", 2, 4, 6, (5, 6, 7), (3, 2, 3), (1, 2, 2), (1, 0, 1), (1, 1, 0), (1, 2, 1), 1)
    _check("im2col", 2, 3, 4, (11,), (3,), (2,), (2,), (-1,), (2,), 1)
    _check("im2col", 2, 6, 6, (8, 8), (3, 3), (2, 2), (1, 1), (0, 0), (1, 1), 3, dtype=np.float32)
    assert bool(gathers) == (narrow > 0)
    assert bool(scatters) == (narrow > 0)  # the input gradient's narrow scatter ran too (the grouped convs')
    assert bool(row_scatters) == (narrow > 0 and position_rows)  # and from position rows (the dense convs')


def test_im2col_chunk_bounds():
    """The column buffer of the largest advertised layer stays under the cap."""
    ck, R, OW, N = 64 * 9, 224, 224, 8
    for n0, nb, r0, r1 in cc._chunks(N, R, OW, ck, 4):
        assert ck * nb * (r1 - r0) * OW * 4 <= max(cc.COL_BUFFER_BYTES, ck * OW * 4)


def test_grad_input_zero_outside_coverage():
    """Transposed-conv style: in_spatial larger than the conv covers -> exact zeros there."""
    rng = np.random.default_rng(0)
    go = rng.standard_normal((1, 3, 1, 3, 3))
    w = rng.standard_normal((3, 2, 1, 3, 3))
    for algo in ("direct", "im2col"):  # strided: the fused path is a forward (and stride-1 input gradient) only
        gx = getattr(cc, f"{algo}_grad_input")(go, w, (1, 2, 2), (0, 0, 0), (1, 1, 1), 1,
                                               (1, 9, 10))
        assert gx.shape == (1, 2, 1, 9, 10)
        assert np.all(gx[..., 7:, :] == 0) and np.all(gx[..., :, 7:] == 0)
        assert np.abs(gx[..., :7, :7]).sum() > 0


# ---- stride-1 wide-row im2col paths and the one-GEMM 1x1 weight gradient --------------------

def _spy_wide_paths(monkeypatch) -> dict:
    """Count the calls of the wide-row forward ("fwd") and input gradient ("gin") from now on."""
    calls = {"fwd": 0, "gin": 0}
    for key, name in (("fwd", "_forward_wide"), ("gin", "_grad_input_wide")):
        real = getattr(cc, name)

        def spy(*a, key=key, real=real):
            calls[key] += 1
            return real(*a)

        monkeypatch.setattr(cc, name, spy)
    return calls


@pytest.mark.parametrize("transposed_max_k", [0, 1 << 30])
@pytest.mark.parametrize("cap", [1, 4096, 1 << 30])
@pytest.mark.parametrize("flip", [0.0, 1e9])
def test_im2col_stride1_wide_paths(monkeypatch, flip, cap, transposed_max_k):
    """Stride-1 1-D/2-D convs: forward over whole padded rows; input gradient either as a forward
    conv with flipped weights (``flip``) or as GEMM + contiguous col2im; chunked and not, both
    GEMM orientations, groups, dilation, asymmetric and cropping padding."""
    monkeypatch.setattr(im2col_fused, "ENABLED", False)  # the plain paths this test watches
    monkeypatch.setattr(cc, "FLIP_MAX_OVERCOMPUTE", flip)
    monkeypatch.setattr(cc, "WIDE_MAX_OVERCOMPUTE", 1e9)
    monkeypatch.setattr(cc, "WIDE_MAX_EXTRA_MACS", 1e9)
    monkeypatch.setattr(cc, "FLIP_MAX_KG", 1 << 30)
    monkeypatch.setattr(cc, "FLIP_MIN_CG", 0)
    monkeypatch.setattr(cc, "COL_BUFFER_BYTES", cap)
    monkeypatch.setattr(cc, "GEMM_TRANSPOSED_MAX_K", transposed_max_k)
    calls = _spy_wide_paths(monkeypatch)
    _check("im2col", 5, 4, 6, (9, 10), (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), 2)
    _check("im2col", 3, 4, 6, (9, 10), (3, 2), (1, 1), (2, 0), (-1, 1), (2, 1), 1)
    _check("im2col", 3, 6, 4, (17,), (5,), (1,), (2,), (3,), (2,), 1)
    _check("im2col", 2, 3, 5, (8, 7), (5, 5), (1, 1), (0, 0), (0, 0), (1, 1), 1, dtype=np.float32)
    if flip:
        assert calls == {"fwd": 8, "gin": 0}
    else:
        assert calls == {"fwd": 4, "gin": 4}


@pytest.mark.parametrize("short_row_ow", [0, 16])
def test_im2col_short_rows_take_the_wide_layout_whatever_the_channels(monkeypatch, short_row_ow):
    """Stride-1 convs with 8 to 16 output columns and many output channels per group (beyond
    ``WIDE_MAX_EXTRA_MACS``) take the wide-row forward and input gradient, and the row-segment paths when
    that rule is off; both agree with torch. Rows shorter than ``NARROW_OW`` keep the gather."""
    monkeypatch.setattr(im2col_fused, "ENABLED", False)  # the plain paths this test watches
    monkeypatch.setattr(cc, "WIDE_SHORT_ROW_OW", short_row_ow)
    monkeypatch.setattr(cc, "FLIP_MAX_KG", 0)  # the input gradient's wide path, not the flipped forward
    calls = _spy_wide_paths(monkeypatch)
    _check("im2col", 2, 3, 64, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), 1, dtype=np.float32)
    _check("im2col", 1, 4, 100, (14, 16), (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), 2)
    _check("im2col", 1, 3, 64, (6, 6), (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), 1)  # OW 6: gather
    wide = 2 if short_row_ow else 0
    assert calls == {"fwd": wide, "gin": wide}


@pytest.mark.parametrize("fused", [False, True])
def test_im2col_grad_input_zero_outside_coverage_stride1(fused, monkeypatch):
    """Stride 1, in_spatial larger than the conv covers: exact zeros there on both wide paths, and on the fused
    flipped forward."""
    _fused_for_any_size(monkeypatch, fused)
    monkeypatch.setattr(cc, "FUSED_GRAD_INPUT_MIN_POSITIONS", 0)
    monkeypatch.setattr(cc, "FUSED_GRAD_INPUT_MAX_EXPANSION", 2)  # this conv expands 2 -> 3 channels
    rng = np.random.default_rng(0)
    go = rng.standard_normal((2, 3, 1, 3, 4))
    w = rng.standard_normal((3, 2, 1, 3, 3))
    for flip in (0.0, 1e9):
        old = cc.FLIP_MAX_OVERCOMPUTE, cc.FLIP_MIN_CG
        cc.FLIP_MAX_OVERCOMPUTE, cc.FLIP_MIN_CG = flip, 0
        try:
            gx = cc.im2col_grad_input(go, w, (1, 1, 1), (0, 0, 0), (1, 1, 1), 1, (1, 8, 9))
            ref = cc.direct_grad_input(go, w, (1, 1, 1), (0, 0, 0), (1, 1, 1), 1, (1, 8, 9))
        finally:
            cc.FLIP_MAX_OVERCOMPUTE, cc.FLIP_MIN_CG = old
        assert np.all(gx[..., 5:, :] == 0) and np.all(gx[..., :, 6:] == 0)
        np.testing.assert_allclose(gx, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("N,groups", [(1, 1), (3, 1), (3, 2)])
def test_im2col_pointwise_grad_weight_accumulated_per_image(N, groups):
    _check("im2col", N, 4, 6, (5, 7), (1, 1), (1, 1), (0, 0), (0, 0), (1, 1), groups)


@pytest.mark.parametrize("cap", [None, 1 << 12, 1 << 16])
def test_im2col_reported_workspace_is_what_the_forward_allocates(cap, monkeypatch):
    """The registry's im2col workspace equals the column + GEMM buffers the forward sizes from its chunks
    (it once read a constant that did not exist and reported one image where four were allocated)."""
    monkeypatch.setattr(im2col_fused, "ENABLED", False)  # the plain paths this test watches
    from fastconv import registry
    from fastconv.ops.conv import make_geometry

    if cap is not None:
        monkeypatch.setattr(cc, "COL_BUFFER_BYTES", cap)
    alg = registry.choose("im2col", make_geometry(2, 1, 1, 1, 1, (4, 4), (3, 3), None, (1, 1), (0, 0), (0, 0),
                                                  (1, 1), torch.float32, "numba"), "forward")
    for N, C, K, G, size, k, stride in [(4, 16, 8, 1, 12, 3, 2), (3, 6, 4, 2, 9, 5, 1), (1, 8, 8, 1, 7, 3, 3),
                                        (2, 16, 8, 1, 12, 3, 1)]:
        g = make_geometry(2, N, C, K, G, (size, size), (k, k), None, (stride, stride), (1, 1), (1, 1), (1, 1),
                          torch.float32, "numba")
        OH, OW = g.out_spatial[1:]
        ck = (C // G) * k * k
        wide = cc._wide_ok(g.kernel, g.stride, g.padding, g.dilation, g.in_spatial, g.out_spatial, K // G)
        width = OW + (k - 1) if wide else OW  # the wide-row path's GEMM runs over padded rows
        qmax = max(nb * (r1 - r0) * width for _, nb, r0, r1 in cc._chunks(N, OH, width, ck, 4))
        assert alg.workspace_bytes(g) == (ck + K // G) * qmax * 4, (N, C, K, G, size, k, stride, cap)
    # the example, ResNet-50 3x3 64->64 at 56x56 (stride 2 here: the generic, non-wide path), batch 8
    g = make_geometry(2, 8, 64, 64, 1, (112, 112), (3, 3), None, (2, 2), (1, 1), (1, 1), (1, 1),
                      torch.float32, "numba")
    if cap is None:
        per_image = 64 * 9 * 56 * 56 * 4  # 7.2 MB of columns per image; four fit the 32 MiB cap
        assert alg.workspace_bytes(g) == 4 * per_image + 4 * 64 * 56 * 56 * 4


@pytest.mark.parametrize("W,pad,s", [(1, 0, 2), (1, 3, 2), (5, 0, 3), (7, 1, 2), (8, 3, 2), (9, 2, 3), (16, 4, 4),
                                     (4, 5, 2)])
@pytest.mark.parametrize("kw", [1, 3, 7])
def test_phase_split_matches_its_definition(W, pad, s, kw):
    """The stride phase split (``out[..., ph*wq + m] = x[..., m*s + ph - pad]``, 0 outside) against the formula,
    element by element, for paddings wider than the stride, rows shorter than it and kernels of 1-7 taps: its
    interior is copied without a bounds test, so the interior's limits are what this checks. Serial and
    parallel compilations."""
    ow = max(1, (W + 2 * pad - kw) // s + 1)
    wq, _ = cc._row_layout(kw, s, pad, 1, ow)
    x = np.arange(2 * 3 * 1 * 2 * W, dtype=np.float64).reshape(2, 3, 1, 2, W) + 1.0
    want = np.zeros((2, 3, 1, 2, s * wq))
    for ph in range(s):
        for m in range(wq):
            j = m * s + ph - pad
            if 0 <= j < W:
                want[..., ph * wq + m] = x[..., j]
    for compiled in (cc._phase_pad.serial, cc._phase_pad.parallel):
        got = np.full_like(want, np.nan)
        compiled(x, pad, s, wq, got)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("in_shape", [(1, 4, 4), (3, 5, 7), (2, 1, 6)])
@pytest.mark.parametrize("pads", [(0, 1, 1), (1, 0, 2), (2, 2, 0), (0, -1, 1), (-1, 2, -2)])
@pytest.mark.parametrize("box_from", ["full", "short", "tiny"])
def test_pad_box_matches_its_definition(in_shape, pads, box_from):
    """The narrow path's padded box (``out[..., d, h, w] = x[..., d - pd, h - ph, w - pw]``, 0 outside ``x``)
    against the formula, element by element: boxes of the whole padded extent, boxes that end early (windows
    that never reach the last rows) and negative (cropping) padding; it zeroes each plane and copies the rows
    inside ``x`` on flat indices, so the rows' limits are what this checks. Serial and parallel compilations."""
    D, H, W = in_shape
    pd, ph, pw = pads
    shape = {"full": (D + 2 * pd, H + 2 * ph, W + 2 * pw), "short": (D + pd, H + ph + 1, W + 2 * pw - 1),
             "tiny": (1, 2, 3)}[box_from]
    if min(shape) <= 0:
        pytest.skip(f"padding {pads} leaves no box of {in_shape} for the {box_from!r} extent")
    x = np.arange(2 * 3 * D * H * W, dtype=np.float64).reshape(2, 3, D, H, W) + 1.0
    want = np.zeros((2, 3) + shape)
    for d, h, w in itertools.product(*(range(e) for e in shape)):
        if 0 <= d - pd < D and 0 <= h - ph < H and 0 <= w - pw < W:
            want[:, :, d, h, w] = x[:, :, d - pd, h - ph, w - pw]
    for compiled in (cc._pad_box.serial, cc._pad_box.parallel):
        got = np.full(want.shape, np.nan)
        compiled(x, pd, ph, pw, got)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("in_hw", [(4, 4), (5, 7), (1, 6)])
@pytest.mark.parametrize("pads", [(1, 1), (0, 2), (2, 0), (-1, 1), (2, -2)])
@pytest.mark.parametrize("box_from", ["full", "short", "tiny"])
def test_fused_pad_box_matches_its_definition(in_hw, pads, box_from):
    """The gather kernels' 2-D padded box (:func:`.im2col_fused._pad_box`) against its formula, as
    :func:`test_pad_box_matches_its_definition` checks the 3-D one."""
    H, W = in_hw
    ph, pw = pads
    shape = {"full": (H + 2 * ph, W + 2 * pw), "short": (H + ph + 1, W + 2 * pw - 1), "tiny": (2, 3)}[box_from]
    if min(shape) <= 0:
        pytest.skip(f"padding {pads} leaves no box of {in_hw} for the {box_from!r} extent")
    x = np.arange(2 * 3 * H * W, dtype=np.float64).reshape(2, 3, H, W) + 1.0
    want = np.zeros((2, 3) + shape)
    for h, w in itertools.product(*(range(e) for e in shape)):
        if 0 <= h - ph < H and 0 <= w - pw < W:
            want[:, :, h, w] = x[:, :, h - ph, w - pw]
    for compiled in (im2col_fused._pad_box.serial, im2col_fused._pad_box.parallel):
        got = np.full(want.shape, np.nan)
        compiled(x, ph, pw, got)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("K,Cg,G,kernel", [(4, 3, 1, (3, 3)), (6, 2, 3, (1, 5)), (8, 4, 2, (2, 3)), (3, 1, 1, (1, 1))])
def test_flipped_weights_match_the_reversed_transposed_view(K, Cg, G, kernel):
    """The input gradient's forward weights (each group's kernels flipped in H and W, in and out channels
    swapped) against numpy's reversed, transposed view, element for element."""
    KH, KW = kernel
    w = np.arange(K * Cg * KH * KW, dtype=np.float64).reshape(K, Cg, 1, KH, KW)
    want = w.reshape(G, K // G, Cg, KH, KW).transpose(0, 2, 1, 3, 4)[..., ::-1, ::-1].reshape(G * Cg, K // G, 1, KH, KW)
    np.testing.assert_array_equal(cc._flipped_weights(w, G), want)


def test_wide_groups_run_as_dense_convs_and_narrow_ones_do_not():
    """The per-group rule (cpu.conv._per_group): AlexNet's 2 groups of 48 -> 128 5x5, 4 groups of 16 -> 16 3x3 yes;
    ResNeXt's 32 groups of 4, RegNet-like 16 groups of 8 -> 8, 1x1 grouped convs and depthwise no."""
    assert cc._per_group(2, 48, 128, (1, 5, 5)) and cc._per_group(4, 16, 16, (1, 3, 3))
    assert not cc._per_group(32, 4, 4, (1, 3, 3)) and not cc._per_group(16, 8, 8, (1, 3, 3))
    assert not cc._per_group(3, 80, 80, (1, 1, 1)) and not cc._per_group(64, 1, 1, (1, 3, 3))
    assert not cc._per_group(1, 64, 64, (1, 3, 3))


@pytest.mark.parametrize("pass_", ["forward", "grad_input", "grad_weight"])
def test_per_group_route_gradcheck_and_opcheck(pass_):
    import fastconv.functional as FC

    with _per_group_everywhere() as runs:
        x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
        w = torch.randn(6, 2, 3, 2, dtype=torch.float64, requires_grad=True)
        b = torch.randn(6, dtype=torch.float64, requires_grad=True)
        kw = dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
        assert torch.autograd.gradcheck(lambda *t: FC.conv2d(*t, algo="im2col", **kw), (x, w, b))
        geometry = ([2, 1], [1, 0], [1, 0], [1, 2], 2, "im2col")
        y = torch.ops.fastconv.conv2d(x, w, b, *geometry)
        if pass_ == "forward":
            torch.library.opcheck(torch.ops.fastconv.conv2d.default, (x, w, b, *geometry))
        elif pass_ == "grad_input":
            torch.library.opcheck(torch.ops.fastconv.conv2d_grad_input.default,
                                  (torch.randn_like(y), w, list(x.shape[2:]), *geometry))
        else:
            torch.library.opcheck(torch.ops.fastconv.conv2d_grad_weight.default,
                                  (torch.randn_like(y), x.detach(), list(w.shape[2:]), *geometry))
    assert runs, "the grouped conv did not run one dense conv per group"
