"""The Numba CPU implementations, declared as data: :data:`ALGORITHMS` and :data:`HEURISTICS`.

One entry per implementation: the conv algorithms (direct, im2col, fft, depthwise, winograd2, winograd4:
name, targets, summary, the three passes, ``refuse(geometry)``, ``mult_ratio`` and ``workspace_bytes``),
the transposed-conv ``patch_gemm`` (family ``conv_transpose``) and the separable op's ``fused`` path
(family ``separable``). This module registers nothing: :mod:`fastconv.ops.catalog` imports it and
registers the entries, so importing a kernel module never changes what ``algo=`` can choose.

The Numba kernels take and return numpy arrays; this module is also the thin torch <-> numpy seam
(``Tensor.numpy()`` and ``torch.from_numpy`` share memory, so no copies are made).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ..spec import CONTIGUOUS_ROUTE, ConvAlgorithm, ConvGeometry, OpImplementation, SeparableGeometry
from . import conv as kernels
from . import (blas, depthwise, depthwise_nhwc, fft, group_lanes, im2col_fused, im2col_nhwc, pointwise, shift,
               thin_input, transposed_gemm, winograd)


def _np(t: torch.Tensor):
    """``t``'s memory as a numpy array: ``detach`` (a new tensor object, a microsecond) only when needed."""
    return t.detach().numpy() if t.requires_grad else t.numpy()


def _entry_passes(forward_entry, grad_input_entry, grad_weight_entry) -> tuple:
    """Numpy passes (each ``(arrays..., geometry) -> array``) of a kernel module's three entry points, which take
    ``(x, w, bias, stride, padding, dilation, groups, out_spatial)``, ``(grad_out, w, ..., in_spatial)`` and
    ``(grad_out, x, ..., kernel)``."""

    def forward(x, w, bias, g: ConvGeometry):
        return forward_entry(x, w, bias, g.stride, g.padding, g.dilation, g.groups, g.out_spatial)

    def grad_input(grad_out, w, g: ConvGeometry):
        return grad_input_entry(grad_out, w, g.stride, g.padding, g.dilation, g.groups, g.in_spatial)

    def grad_weight(grad_out, x, g: ConvGeometry):
        return grad_weight_entry(grad_out, x, g.stride, g.padding, g.dilation, g.groups, g.kernel)

    return forward, grad_input, grad_weight


def _as_result(out, shape) -> torch.Tensor:
    """A numpy pass's C-contiguous 5-D result as the op's tensor of ``shape`` (contiguous, not a view)."""
    if not out.flags.c_contiguous:
        out = out.copy()
    return torch.from_numpy(out.reshape(shape))


def _numpy_routes(numpy_passes) -> tuple:
    """Contiguous routes (``ConvAlgorithm``'s ``contiguous_route``) of numpy passes: the operands' memory as 5-D
    arrays (no tensor views), the result reshaped in numpy. What they save a small call: the 5-D tensor views of
    the operands, their ``detach``, the result's tensor reshape and ``detach`` and the layout check, 30 µs of a
    batch-1 depthwise conv's 120 (measured, 2-core Zen 2)."""
    np_forward, np_grad_input, np_grad_weight = numpy_passes

    def forward(x, w, bias, g: ConvGeometry, shape):
        return _as_result(np_forward(_np(x).reshape(g.batch, g.in_channels, *g.in_spatial),
                                     _np(w).reshape(g.out_channels, g.in_channels // g.groups, *g.kernel),
                                     None if bias is None else _np(bias), g), shape)

    def grad_input(grad_out, w, g: ConvGeometry, shape):
        return _as_result(np_grad_input(_np(grad_out).reshape(g.batch, g.out_channels, *g.out_spatial),
                                        _np(w).reshape(g.out_channels, g.in_channels // g.groups, *g.kernel), g),
                          shape)

    def grad_weight(grad_out, x, g: ConvGeometry, shape):
        return _as_result(np_grad_weight(_np(grad_out).reshape(g.batch, g.out_channels, *g.out_spatial),
                                         _np(x).reshape(g.batch, g.in_channels, *g.in_spatial), g), shape)

    return forward, grad_input, grad_weight


def _with_routes(tensor_passes, route_selectors) -> tuple:
    """``tensor_passes``, each carrying its contiguous route's selector (geometry -> route or None)."""
    for tensor_pass, select in zip(tensor_passes, route_selectors):
        setattr(tensor_pass, CONTIGUOUS_ROUTE, select)
    return tensor_passes


def _every_geometry(route):
    """The selector of a route that takes every geometry its algorithm runs."""
    return lambda g: route


def _tensor_passes(numpy_passes) -> tuple:
    """The tensor passes (``ConvAlgorithm.forward`` ...) of numpy passes that take every call: the thin seam,
    each carrying the numpy passes' contiguous route."""
    np_forward, np_grad_input, np_grad_weight = numpy_passes
    from_numpy = torch.from_numpy

    def forward(x, w, bias, g: ConvGeometry):
        return from_numpy(np_forward(_np(x), _np(w), None if bias is None else _np(bias), g))

    def grad_input(grad_out, w, g: ConvGeometry):
        return from_numpy(np_grad_input(_np(grad_out), _np(w), g))

    def grad_weight(grad_out, x, g: ConvGeometry):
        return from_numpy(np_grad_weight(_np(grad_out), _np(x), g))

    return _with_routes((forward, grad_input, grad_weight), [_every_geometry(r) for r in _numpy_routes(numpy_passes)])


def _wrap(prefix: str):
    """Tensor passes of :mod:`.conv`'s ``{prefix}_forward`` / ``_grad_input`` / ``_grad_weight``."""
    return _tensor_passes(_kernel_passes(prefix))


def _kernel_passes(prefix: str) -> tuple:
    """Numpy passes of :mod:`.conv`'s ``{prefix}_*`` entry points."""
    return _entry_passes(getattr(kernels, f"{prefix}_forward"), getattr(kernels, f"{prefix}_grad_input"),
                         getattr(kernels, f"{prefix}_grad_weight"))


def _im2col_workspace(g: ConvGeometry) -> int:
    """What the im2col forward allocates for its GEMMs: the column buffer and the GEMM result buffer,
    ``(ck + K/groups) x qmax`` elements, with ``qmax`` the largest chunk of ``cpu.conv._chunks`` (whole
    images while they fit ``COL_BUFFER_BYTES``, else row chunks of one image) over output rows that are
    ``OW`` wide, or the padded row wide on the stride-1 wide-row path; on the fused path
    (:mod:`.im2col_fused`) a column chunk and a GEMM result per task (on the gather kernel: the padded input,
    the packed weights and a result per task; on the taps kernel: the padded input or its
    phases, and a GEMM result per task; on the thin-input kernel, :mod:`.thin_input`: the input's padded
    phases; grouped convs of few wide groups, one dense conv per group: a group's workspace and its input and
    output slices). 1x1 stride-1 convs are a plain GEMM
    and need none. (Elsewhere the input's padded or phase-split copy is not counted.)"""
    if g.is_pointwise:
        return 0
    item = g.dtype.itemsize
    kg = g.out_channels // g.groups
    ck = (g.in_channels // g.groups) * math.prod(g.kernel)
    if kernels._per_group(g.groups, g.in_channels // g.groups, kg, g.kernel):
        # one dense conv per group (cpu.conv._per_group), in turn: one group's workspace, and its input slice and
        # result, copied out and in
        group = dataclasses.replace(g, in_channels=g.in_channels // g.groups, out_channels=kg, groups=1)
        slices = g.batch * (group.in_channels * math.prod(g.in_spatial) + kg * math.prod(g.out_spatial)) * item
        return _im2col_workspace(group) + slices
    if thin_input.applies(g.groups, g.in_channels, g.kernel, g.stride, g.dilation, g.in_spatial, g.out_spatial,
                          g.padding, item):
        return thin_input.workspace_bytes(g.batch, g.in_channels, g.kernel[1:], g.stride[1:], g.out_spatial[1:], item)
    small = im2col_fused.small_for_own(g.out_channels, ck, g.kernel[1:], g.stride[1:], item,
                                       g.batch * math.prod(g.out_spatial))
    if (im2col_fused.gather_applies(g.kernel, g.groups, g.in_spatial, g.out_spatial, small)
            and im2col_fused.takes_gather_forward(g.kernel[1:], g.stride[1:], g.in_channels, g.out_channels,
                                                  g.out_spatial[2], item, g.batch * math.prod(g.out_spatial))):
        return im2col_fused.gather_workspace_bytes(g.batch, g.in_channels, g.out_channels, g.kernel[1:],
                                                   g.stride[1:], g.dilation[1:], g.out_spatial[1:], item)
    if im2col_fused.applies(g.kernel, g.groups, g.in_channels, g.out_channels, g.in_spatial, g.out_spatial, item):
        taps = ((g.in_channels, g.kernel[1], g.kernel[2], g.stride[1], g.stride[2], g.dilation[1], g.dilation[2])
                if im2col_fused.takes_taps(g.kernel[1:], g.stride[1:], g.in_channels, g.out_spatial[2], small)
                else None)
        return im2col_fused.workspace_bytes(g.batch, g.out_channels, ck, g.out_spatial[1], g.out_spatial[2], item,
                                            taps)
    width = g.out_spatial[2]
    if kernels._wide_ok(g.kernel, g.stride, g.padding, g.dilation, g.in_spatial, g.out_spatial, kg):
        width += (g.kernel[2] - 1) * g.dilation[2]
    per_row = max(1, ck * width)
    rows = g.out_spatial[0] * g.out_spatial[1]
    cap = max(1, kernels.COL_BUFFER_BYTES // item)
    if per_row * rows <= cap:
        qmax = min(max(g.batch, 1), max(1, cap // (per_row * rows))) * rows * width
    else:
        qmax = min(rows, max(1, cap // per_row)) * width
    return (ck + kg) * qmax * item


DIRECT = ConvAlgorithm(
    "direct", frozenset({"numba"}),
    "loop nest: output row innermost (vectorised), output channels register-blocked, parallel over "
    "batch x channel blocks; no workspace",
    *_wrap("direct"))

# The 1x1 paths on tensors (:mod:`.pointwise`), named here so that tests can watch which calls take them.
_pointwise_forward = pointwise.forward
_pointwise_grad_input = pointwise.grad_input
_pointwise_grad_weight = pointwise.grad_weight


def _im2col_passes():
    """im2col's three passes: channels-last operands go to :mod:`.im2col_nhwc` as they are (no copy in, a
    channels-last result out), anything else to the NCDHW kernels."""
    nchw_forward, nchw_grad_input, nchw_grad_weight = _wrap("im2col")
    nhwc = im2col_nhwc
    gemm_on_tensors = blas.GEMM_LIBRARY == "torch"

    def forward(x, w, bias, g: ConvGeometry):
        if gemm_on_tensors and pointwise.applies(g):
            y = _pointwise_forward(x, w, bias, g)
            if y is not None:
                return y
        xa = x.detach().numpy()
        if not nhwc.is_channels_last(xa):
            return nchw_forward(x, w, bias, g)
        b = None if bias is None else bias.detach().numpy()
        return torch.from_numpy(nhwc.forward(xa, w.detach().numpy(), b, g.stride, g.padding, g.dilation, g.groups,
                                             g.out_spatial))

    def grad_input(grad_out, w, g: ConvGeometry):
        if gemm_on_tensors and pointwise.applies(g):
            gx = _pointwise_grad_input(grad_out, w, g)
            if gx is not None:
                return gx
        ga = grad_out.detach().numpy()
        if not nhwc.is_channels_last(ga):
            return nchw_grad_input(grad_out, w, g)
        return torch.from_numpy(nhwc.grad_input(ga, w.detach().numpy(), g.stride, g.padding, g.dilation, g.groups,
                                                g.in_spatial))

    def grad_weight(grad_out, x, g: ConvGeometry):
        if gemm_on_tensors and pointwise.applies(g):
            gw = _pointwise_grad_weight(grad_out, x, g)
            if gw is not None:
                return gw
        ga, xa = grad_out.detach().numpy(), x.detach().numpy()
        if not (nhwc.is_channels_last(xa) or nhwc.is_channels_last(ga)):
            return nchw_grad_weight(grad_out, x, g)
        return torch.from_numpy(nhwc.grad_weight(ga, xa, g.stride, g.padding, g.dilation, g.groups, g.kernel))

    return forward, grad_input, grad_weight


def _not_a_view(t):
    return t.detach() if t._is_view() else t


def _five_d(t: torch.Tensor, channels: int, spatial) -> torch.Tensor:
    """A contiguous operand of the op's own rank viewed as (N, channels, D, H, W): pointwise's strided paths
    slice the pixels a stride reads out of 5-D planes."""
    return t if t.dim() == 5 else t.view((t.shape[0], channels) + tuple(spatial))


def _im2col_route_selectors() -> list:
    """Selectors of im2col's contiguous routes: the NCDHW kernels' numpy routes (the operands are C-contiguous),
    and for the 1x1 convs that the tensor passes give to :mod:`.pointwise`, pointwise's GEMMs on the operands as
    they come (no 5-D views at stride 1; a strided conv's input as a 5-D view, which its pixel slicing needs), the
    kernel's numpy route for a call they leave (a non-finite one).

    Strided 1x1 convs (ResNet's and RegNet's projections) take the route too: without one a layer's planned
    repeat call (:mod:`fastconv.ops.repeat_call`) declined every call and the full path ran after it, 213 µs
    against the functional call's 155-166 for RegNet-Y-400MF's 32 -> 48 projection at 64x64, batch 1."""
    numpy_routes = _numpy_routes(_kernel_passes("im2col"))
    on_tensors = pointwise.applies if blas.GEMM_LIBRARY == "torch" else (lambda g: False)
    kernel_forward, kernel_grad_input, kernel_grad_weight = numpy_routes
    unit_stride = (1, 1, 1)

    def forward(x, w, bias, g, shape):
        if g.stride != unit_stride:
            x = _five_d(x, g.in_channels, g.in_spatial)
        out = _pointwise_forward(x, w, bias, g, shape)
        return kernel_forward(x, w, bias, g, shape) if out is None else _not_a_view(out)

    def grad_input(grad_out, w, g, shape):
        out = _pointwise_grad_input(grad_out, w, g, shape)
        return kernel_grad_input(grad_out, w, g, shape) if out is None else _not_a_view(out)

    def grad_weight(grad_out, x, g, shape):
        if g.stride != unit_stride:
            x = _five_d(x, g.in_channels, g.in_spatial)
        out = _pointwise_grad_weight(grad_out, x, g, shape)
        return kernel_grad_weight(grad_out, x, g, shape) if out is None else _not_a_view(out)

    def selector(numpy_route, pointwise_route):
        return lambda g: pointwise_route if on_tensors(g) else numpy_route

    return [selector(r, p) for r, p in zip(numpy_routes, (forward, grad_input, grad_weight))]


IM2COL = ConvAlgorithm(
    "im2col", frozenset({"numba"}),
    "im2col into a bounded, chunked workspace, then GEMM through BLAS (1x1 stride-1 convs skip im2col); "
    "channels_last operands are read and written as they are (columns of channel runs)",
    *_with_routes(_im2col_passes(), _im2col_route_selectors()), workspace_bytes=_im2col_workspace,
    layouts=("contiguous", "channels_last"))


def _fft_algorithm() -> ConvAlgorithm:
    """``fft``: the three passes as products of spectra (:mod:`fastconv.cpu.fft`), exact fallback to direct."""
    exact_forward, exact_grad_input, exact_grad_weight = _wrap("direct")

    def forward(x, w, bias, g: ConvGeometry):
        return fft.forward(x.detach(), w.detach(), None if bias is None else bias.detach(), g.stride, g.padding,
                           g.padding_end, g.dilation, g.groups, g.out_spatial)

    def grad_input(grad_out, w, g: ConvGeometry):
        return fft.grad_input(grad_out.detach(), w.detach(), g.stride, g.padding, g.padding_end, g.dilation,
                              g.groups, g.in_spatial)

    def grad_weight(grad_out, x, g: ConvGeometry):
        return fft.grad_weight(grad_out.detach(), x.detach(), g.stride, g.padding, g.padding_end, g.dilation,
                               g.groups, g.kernel)

    def workspace(g: ConvGeometry) -> int:
        return fft.spectra_bytes(g.batch, g.in_channels, g.out_channels, g.groups, g.kernel, g.stride,
                                 g.dilation, g.out_spatial, g.dtype.itemsize)

    def refuse(g: ConvGeometry):
        taps = math.prod(g.kernel)
        if taps < FFT_MIN_TAPS:
            return (f"kernel of {taps} taps (< {FFT_MIN_TAPS}): direct, im2col and Winograd need fewer "
                    f"operations than the transforms")
        if workspace(g) > FFT_MAX_WORKSPACE_BYTES:
            return (f"its spectra would take {workspace(g) / 2**20:.0f} MiB "
                    f"(> {FFT_MAX_WORKSPACE_BYTES // 2**20} MiB)")
        return None

    def mult_ratio(g: ConvGeometry) -> float:
        executed = fft.executed_multiplications(g.batch, g.in_channels, g.out_channels, g.groups, g.kernel,
                                                g.stride, g.dilation, g.out_spatial)
        return executed / max(g.macs, 1)

    return ConvAlgorithm(
        "fft", frozenset({"numba"}),
        "FFT (torch's pocketfft/MKL): stride and dilation as polyphase channels, channel sums as batched "
        "complex GEMMs per frequency; non-finite or huge operands computed exactly by direct",
        fft.with_exact_fallback(forward, exact_forward, (0, 1, 2)),
        fft.with_exact_fallback(grad_input, exact_grad_input, (0, 1)),
        fft.with_exact_fallback(grad_weight, exact_grad_weight, (0, 1)),
        refuse=refuse, mult_ratio=mult_ratio, workspace_bytes=workspace)


#: The FFT pays only for large kernels (AlexNet 11x11, 7x7 stems and depthwise, 80-tap audio).
FFT_MIN_TAPS = 16
#: Spectra beyond this are refused rather than risk the memory of a whole training step.
FFT_MAX_WORKSPACE_BYTES = 1 << 30

FFT = _fft_algorithm()


def _shift_algorithm() -> ConvAlgorithm:
    """``shift``: the kernels of :mod:`fastconv.cpu.shift` (1-D and 2-D grouped convs, any stride, padding and
    dilation; dense ones are refused, see :func:`fastconv.cpu.shift.refuse_reason`)."""
    numpy_passes = _entry_passes(shift.forward, shift.grad_input, shift.grad_weight)

    def mult_ratio(g: ConvGeometry) -> float:
        executed = shift.executed_multiplications(g.batch, g.in_channels, g.out_channels, g.groups, g.kernel,
                                                  g.stride, g.dilation, g.out_spatial, g.padding, g.in_spatial)
        return executed / max(g.macs, 1)

    def workspace(g: ConvGeometry) -> int:
        # the input's phase planes and the output's wide planes
        return (g.in_channels + g.out_channels) * g.batch * math.prod(g.in_spatial) * 2 * g.dtype.itemsize

    return ConvAlgorithm(
        "shift", frozenset({"numba"}),
        "direct conv as shifted-plane multiply-adds: each tap adds weight x (the padded, stride-phase-split "
        "input planes of the whole batch, at the tap's offset) to the output planes; no columns, for narrow "
        "groups (RegNet, ResNeXt) where im2col's column matrix costs more than its GEMM",
        *_tensor_passes(numpy_passes), refuse=lambda g: shift.refuse_reason(g.kernel, g.out_spatial, g.groups),
        mult_ratio=mult_ratio, workspace_bytes=workspace)


SHIFT = _shift_algorithm()


def _group_lanes_algorithm() -> ConvAlgorithm:
    """``group_lanes``: the kernels of :mod:`fastconv.cpu.group_lanes` (1-D and 2-D grouped convs with multiples
    of 8 channels per group in and out; see :func:`fastconv.cpu.group_lanes.refuse_reason`)."""
    numpy_passes = _entry_passes(group_lanes.forward, group_lanes.grad_input, group_lanes.grad_weight)

    def mult_ratio(g: ConvGeometry) -> float:
        executed = group_lanes.executed_multiplications(g.batch, g.in_channels, g.out_channels, g.groups,
                                                        g.kernel, g.out_spatial)
        return executed / max(g.macs, 1)

    def workspace(g: ConvGeometry) -> int:
        # per task: its images' packed input (at most TASK_BYTES unless one image is larger) and packed output
        image = (g.in_channels // g.groups) * math.prod(g.in_spatial) * 8 * g.dtype.itemsize
        return 2 * (max(group_lanes.TASK_BYTES, 2 * image) + 4 * image)

    def refuse(g: ConvGeometry):
        return group_lanes.refuse_reason(g.kernel, g.groups, g.in_channels, g.out_channels, g.padding, g.dilation)

    return ConvAlgorithm(
        "group_lanes", frozenset({"numba"}),
        "direct conv with eight groups across the vector lanes: a block of eight groups packed channels-innermost "
        "(lane = group), so each (tap, input channel, output channel) step is one lane-wise FMA, tiles of three "
        "positions by eight output channels summed in registers; for groups of 8, 16, ... channels (RegNet)",
        *_tensor_passes(numpy_passes), refuse=refuse, mult_ratio=mult_ratio, workspace_bytes=workspace)


GROUP_LANES = _group_lanes_algorithm()


def _heuristic(g: ConvGeometry, pass_: str) -> str:
    """Pick a CPU algorithm without measuring (the autotuner measures instead for larger convs).

    Rules from the measurements in the issue notes (2 cores, AVX-512, float32): the depthwise kernel
    beats the grouped loops on depthwise layers; F(4x4,3x3) Winograd beats im2col and torch on
    3x3 stride-1 layers (dilated ones too, on their phases: DeepLab's 256 -> 256 at 32x32, dilation 2, batch 4,
    forward / input grad / weight grad 9.8 / 12.1 / 17.8 ms against im2col's 17.7 / 18.3 / 17.1 and torch's
    13.7 / 17.1 / 17.3) with enough channels (>= 32 per group), outputs (>= 8x8 per phase) and output positions
    per channel over the batch (>= 1024, i.e. 64 tiles: below that, building the 36 transformed filters,
    4x the weights, costs more than the GEMMs save; measured one thread per kernel, median ms, forward /
    input grad / weight grad: 8x256x8x8 winograd4 9.8/9.7/20.1, im2col 10.1/6.7/12.7; 1x128x16x16
    winograd4 1.4/2.2/6.9, im2col 1.0/1.2/1.7; 1x64x32x32 winograd4 0.78/0.80/1.18, im2col 1.0/1.1/1.19);
    narrow groups (:data:`SHIFT_MAX_GROUP_WIDTH`) go to the shifted-plane kernels; other tiny per-group
    reductions (3-D, or wider groups with few taps) are too thin for BLAS; everything else is an im2col GEMM (a plain GEMM for 1x1).
    """
    if g.is_depthwise:
        return "depthwise"
    winograd_shape = (g.kernel == (1, 3, 3) and g.stride == (1, 1, 1) and g.groups == 1 and g.ndim == 2
                      and winograd.refuse_reason(g) is None)
    # a dilated conv runs undilated on its phases (1/dilation the size each): the size rule holds for a phase
    phase_out = [-(-n // d) for n, d in zip(g.out_spatial[1:], g.dilation[1:])]
    if (winograd_shape and g.in_channels >= 32 and g.out_channels >= 32 and min(phase_out) >= 8
            and g.batch * g.out_spatial[1] * g.out_spatial[2] >= 1024):
        return "winograd4"
    if g.groups > 1 and g.in_channels // g.groups <= SHIFT_MAX_GROUP_WIDTH:
        if GROUP_LANES.why_not(g) is None:
            return "group_lanes"
        if shift.refuse_reason(g.kernel, g.out_spatial, g.groups) is None:
            return "shift"
    if g.groups > 1 and (g.in_channels // g.groups) * math.prod(g.kernel) < 64:
        return "direct"
    return "im2col"


#: Grouped (not depthwise) 1-D/2-D convs with at most this many input channels per group go to ``shift``.
#: Measured at batch 8, 2 threads, 3x3, ms forward / input grad / weight grad, shift against im2col (torch's
#: forward): RegNet-Y-400MF's 8-wide groups 104x16x16 0.93/0.86/1.09 against 1.32/1.24/1.64 (0.38), 48x64x64
#: stride 2 2.48/2.62/2.80 against 3.59/3.19/3.76 (0.86), 440x4x4 0.54/0.60/0.64 against 0.78/0.86/0.96
#: (0.19); 4-wide 128x16x16 0.87/0.87/0.80 against 1.39/1.33/1.81 (torch 1.29); 16-wide 256x16x16
#: 3.58/2.91/5.02 against 3.87/3.38/8.03; 32- and 64-wide level or slower, so they keep im2col.
SHIFT_MAX_GROUP_WIDTH = 16


def _depthwise_algorithm() -> ConvAlgorithm:
    """``depthwise``: the kernels of :mod:`fastconv.cpu.depthwise` (groups == in_channels, any multiplier)."""
    numpy_passes = _entry_passes(depthwise.depthwise_forward, depthwise.depthwise_grad_input,
                                 depthwise.depthwise_grad_weight)
    tensor_passes = _with_routes(_depthwise_layout_passes(numpy_passes),
                                 [_every_geometry(r) for r in _numpy_routes(numpy_passes)])

    def refuse(g: ConvGeometry):
        if g.groups != g.in_channels:
            return (f"needs groups == in_channels (depthwise); got groups={g.groups} with "
                    f"{g.in_channels} input channels")
        if g.out_channels % g.in_channels != 0:
            return (f"needs out_channels to be a multiple of in_channels (channel multiplier); got "
                    f"{g.out_channels} output channels for {g.in_channels} input channels")
        return None

    return ConvAlgorithm(
        "depthwise", frozenset({"numba"}),
        "depthwise only (groups == in_channels, any multiplier): 2-D planes as per-tap-column shifted "
        "copies at output pitch, one flat exact loop per plane; other shapes one padded, phase-split plane "
        "per task; input gradient as a flipped-kernel forward or gathered per stride phase",
        *tensor_passes, refuse=refuse, layouts=("contiguous", "channels_last"))


def _depthwise_layout_passes(numpy_passes) -> tuple:
    """The depthwise tensor passes on operands of any strides: channels-last ones that
    :func:`.depthwise_nhwc.applies` to (its forward, and its stride-1 input gradient) are read and written as
    they are; every other call copies its operands to NCDHW, as the op did before the algorithm declared
    ``"channels_last"``, and runs the NCDHW kernels (the op lays their result out as the input suggests)."""
    np_forward, np_grad_input, np_grad_weight = numpy_passes
    dense = np.ascontiguousarray

    def nhwc_ok(a, g: ConvGeometry) -> bool:
        return (im2col_nhwc.is_channels_last(a)
                and depthwise_nhwc.applies(g.in_channels, g.out_channels, g.kernel, g.padding, a.itemsize,
                                           g.in_spatial[0]))

    def forward(x, w, bias, g: ConvGeometry):
        xa, wa, ba = _np(x), _np(w), None if bias is None else _np(bias)
        if nhwc_ok(xa, g):
            return torch.from_numpy(depthwise_nhwc.forward(xa, wa, ba, g.stride, g.padding, g.dilation,
                                                           g.out_spatial))
        return torch.from_numpy(np_forward(dense(xa), dense(wa), ba, g))

    def grad_input(grad_out, w, g: ConvGeometry):
        ga, wa = _np(grad_out), _np(w)
        if nhwc_ok(ga, g) and depthwise_nhwc.grad_input_applies(g.stride, g.padding, g.dilation, g.kernel):
            return torch.from_numpy(depthwise_nhwc.grad_input(ga, wa, g.stride, g.padding, g.dilation,
                                                              g.in_spatial))
        return torch.from_numpy(np_grad_input(dense(ga), dense(wa), g))

    def grad_weight(grad_out, x, g: ConvGeometry):
        return torch.from_numpy(np_grad_weight(dense(_np(grad_out)), dense(_np(x)), g))

    return forward, grad_input, grad_weight


def _winograd_algorithm(m: int) -> ConvAlgorithm:
    """``winograd{m}``: F(m x m, 3x3) from :mod:`fastconv.cpu.winograd` on the Numba target."""

    def forward(x, w, bias, g: ConvGeometry):
        return winograd.winograd_forward(x, w, bias, g.padding, g.groups, g.out_spatial, m, g.dilation)

    def grad_input(grad_out, w, g: ConvGeometry):
        return winograd.winograd_grad_input(grad_out, w, g.padding, g.groups, g.in_spatial, m, g.dilation)

    def grad_weight(grad_out, x, g: ConvGeometry):
        return winograd.winograd_grad_weight(grad_out, x, g.padding, g.groups, m, g.dilation)

    numpy_passes = (forward, grad_input, grad_weight)
    a = m + 2
    return ConvAlgorithm(
        f"winograd{m}", frozenset({"numba"}),
        f"Winograd F({m}x{m},3x3) for 3x3 stride-1 2-D convs: {(a / m) ** 2:g} instead of 9 multiplies per "
        f"output ({9 * m * m / (a * a):g}x fewer), chunked tile transforms + BLAS GEMMs; input gradient as "
        f"the flipped conv, weight gradient by F(3x3,{m}x{m}); dilated convs as undilated ones over the "
        f"input's phases",
        *_tensor_passes(numpy_passes), refuse=winograd.refuse_reason,
        mult_ratio=lambda g: winograd.mult_ratio(g, m), workspace_bytes=lambda g: winograd.workspace_bytes(g, m))


DEPTHWISE = _depthwise_algorithm()
WINOGRAD2 = _winograd_algorithm(2)
WINOGRAD4 = _winograd_algorithm(4)



def _patch_gemm_refuse(g: ConvGeometry):
    """Why the kernel == stride GEMM cannot run this transposed conv (``g``: its adjoint convolution)."""
    dims = slice(3 - g.ndim, 3)  # the op's own rank, for the message
    kernel, stride, padding, dilation = g.kernel[dims], g.stride[dims], g.padding[dims], g.dilation[dims]
    if kernel != stride:
        return f"needs kernel == stride (non-overlapping windows), got kernel={kernel}, stride={stride}"
    if any(p != 0 for p in padding):
        return f"needs padding=0, got {padding}"
    if any(d != 1 for d in dilation):
        return f"needs dilation=1, got {dilation}"
    return None


def _patch_gemm_workspace(g: ConvGeometry) -> int:
    """The GEMM's result, (C_out * prod(k)) x (N * prod(I)), before the scatter."""
    return g.in_channels * math.prod(g.kernel) * g.batch * math.prod(g.out_spatial) * g.dtype.itemsize


def _patch_gemm(x, w, bias, g: ConvGeometry):
    # Looked up at call time (tests count the calls by swapping the kernel module's function).
    return transposed_gemm.forward(x, w, bias, g)


#: ``patch_gemm``: transposed convs with kernel == stride, no padding, dilation 1 (U-Net's 2x2/stride-2
#: up-convolution). Declared first for its family, so ``algo='auto'`` takes it wherever it runs (1.25-1.8x
#: faster than torch in our runs) before the adjoint conv's choice is asked.
PATCH_GEMM = OpImplementation(
    "patch_gemm", "conv_transpose", frozenset({"numba"}),
    "transposed convs only, kernel == stride, no padding: windows do not overlap, so one GEMM plus a scatter",
    _patch_gemm, refuse=_patch_gemm_refuse, workspace_bytes=_patch_gemm_workspace)


def _separable_fused(x, dw, pw, db, pb, g: SeparableGeometry):
    """The fused depthwise-separable forward through the torch <-> numpy seam: x (N, C, H, W) -> (N, K, OH, OW)."""
    d = g.depthwise
    as_np = lambda t: None if t is None else t.detach().contiguous().numpy()  # noqa: E731
    K, M = pw.shape[:2]
    y = depthwise.separable_forward_fused(
        as_np(x).reshape(x.shape[0], x.shape[1], 1, *x.shape[2:]),
        as_np(dw).reshape(M, 1, 1, *dw.shape[2:]),
        as_np(db), as_np(pw).reshape(K, M), as_np(pb),
        d.stride, d.padding, d.dilation, d.out_spatial)
    return torch.from_numpy(y.reshape(x.shape[0], K, *d.out_spatial[1:]))


#: ``fused``: the depthwise output made a cache-sized block at a time and consumed by the pointwise GEMM
#: straight away (:func:`fastconv.cpu.depthwise.separable_forward_fused`). Declared before the op layer's
#: ``unfused``, so ``algo='auto'`` takes it on the Numba target. Measured on the 2-core dev machine, one
#: thread, minimum of 11 interleaved runs, N=8, 3x3 pad 1, C -> K channels: 256 -> 256 28x28 torch 44.5 ms,
#: fused 24.1, unfused 60.7; 32 -> 64 112x112: 26.4 / 19.0 / 71.9; 512 -> 512 14x14: 23.0 / 30.1 / 23.5.
#: Weak evidence (a later median-of-21 run had unfused faster on 256 -> 256 28x28, 10.9 vs 13.4 ms: the
#: unfused 1x1 conv runs through BLAS, noisy on this shared machine); re-measure on a quiet machine before
#: refining the rule (for example a minimum intermediate size per image).
SEPARABLE_FUSED = OpImplementation(
    "fused", "separable", frozenset({"numba"}),
    "depthwise-separable conv: depthwise output a cache-sized block at a time, consumed by the pointwise GEMM "
    "at once (the intermediate tensor is never written whole)",
    _separable_fused)

#: Every Numba convolution algorithm and op implementation (registered by :mod:`fastconv.ops.catalog`).
ALGORITHMS = [DIRECT, IM2COL, FFT, DEPTHWISE, WINOGRAD2, WINOGRAD4, SHIFT, GROUP_LANES, PATCH_GEMM,
              SEPARABLE_FUSED]
#: ``algo='auto'`` without measuring, per target this module serves.
HEURISTICS = {"numba": _heuristic}
