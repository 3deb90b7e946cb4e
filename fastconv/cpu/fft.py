"""FFT convolution: all three passes as pointwise products of spectra (torch's FFT: pocketfft/MKL).

Why it pays: a K x C convolution with an R-tap kernel costs R multiply-accumulates per output and
channel pair directly, but one complex product per frequency through the FFT, whatever R is. Large
kernels win: AlexNet's 11x11, 7x7 stems, ConvNeXt's 7x7 depthwise, 80-tap audio front ends.

How stride and dilation fit in (per spatial dim; all three at once): the kernel is dilated (zeros
between taps), then input and kernel are split into ``stride`` phases — ``x_p[i] = x[i*s + p]`` and
``w_p[q] = w[q*s + p]`` — and the phases become extra channels. What remains is one stride-1,
dilation-1 "valid" cross-correlation with ``C * prod(stride)`` input channels (Lavin's polyphase
trick), computed exactly as ``y[o] = IFFT(FFT(x) * conj(FFT(w)))[o]`` with transforms of length
``O + Q - 1`` (rounded up to a 2/3/5-smooth size) so that no product wraps around:

- forward      Y[n,k] = sum_c X[n,c] conj(W[k,c])       (correlation)
- grad_input  GX[n,c] = sum_k GY[n,k] W[k,c]           (full convolution, then the phases merged back)
- grad_weight GW[k,c] = sum_n X[n,c] conj(GY[n,k])      (correlation of the input with the gradient)

The channel sums are batched complex GEMMs over the frequencies. Groups stay block-diagonal.

Exactness: an FFT spreads one non-finite value over every output, and products of values near the
float32 range overflow inside the transform where the exact result is finite. So a call whose
operands are not all finite, or whose magnitudes could overflow, is computed by the exact direct
kernel instead (``exact_fallback``) — torch's NaN/Inf pattern, at the cost of one max-abs pass.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from . import blas

Triple = tuple[int, int, int]

#: Largest |operand| for which float32 spectra cannot overflow: |X| <= L * max|x| and a product of
#: two spectra summed over C channels stays below 3.4e38 for L, C up to ~1e6 each.
_SAFE_ABS = {torch.float32: 1e12, torch.float64: 1e140}


def _next_fast_len(n: int) -> int:
    """Smallest 2/3/5-smooth integer >= n (sizes pocketfft and MKL transform fastest)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _plan(kernel: Triple, stride: Triple, dilation: Triple, out_spatial: Triple):
    """Per dim: dilated kernel length T, taps per phase Q, phase-split input length L, FFT size."""
    T = tuple(d * (r - 1) + 1 for r, d in zip(kernel, dilation))
    Q = tuple(-(-t // s) for t, s in zip(T, stride))
    L = tuple(o + q - 1 for o, q in zip(out_spatial, Q))
    size = tuple(_next_fast_len(l) for l in L)
    return T, Q, L, size


def _fit(t: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Zero-pad or cut the last three dims of ``t`` to ``lengths``."""
    pads = []
    for dim, n in zip((4, 3, 2), reversed(lengths)):
        pads += [0, max(0, n - t.shape[dim])]
    if any(pads):
        t = torch.nn.functional.pad(t, pads)
    return t[..., :lengths[0], :lengths[1], :lengths[2]]


def _split_phases(t: torch.Tensor, stride: Triple, per_phase: Triple) -> torch.Tensor:
    """(A, B, s*n per dim) -> (A, B * prod(stride), n per dim): ``out[:, b*P + p, i] = t[:, b, i*s + p]``."""
    A, B = t.shape[:2]
    sd, sh, sw = stride
    nd, nh, nw = per_phase
    t = _fit(t, (sd * nd, sh * nh, sw * nw)).reshape(A, B, nd, sd, nh, sh, nw, sw)
    return t.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(A, B * sd * sh * sw, nd, nh, nw)


def _merge_phases(t: torch.Tensor, channels: int, stride: Triple) -> torch.Tensor:
    """Adjoint of :func:`_split_phases`: (A, B * P, n...) -> (A, B, s*n per dim)."""
    A = t.shape[0]
    sd, sh, sw = stride
    nd, nh, nw = t.shape[2:]
    t = t.reshape(A, channels, sd, sh, sw, nd, nh, nw).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return t.reshape(A, channels, nd * sd, nh * sh, nw * sw)


def _dilate(w: torch.Tensor, dilation: Triple) -> torch.Tensor:
    if dilation == (1, 1, 1):
        return w
    K, C, R1, R2, R3 = w.shape
    out = w.new_zeros((K, C) + tuple(d * (r - 1) + 1 for r, d in zip((R1, R2, R3), dilation)))
    out[:, :, ::dilation[0], ::dilation[1], ::dilation[2]] = w
    return out


def _spectrum(t: torch.Tensor, size: Triple) -> torch.Tensor:
    return torch.fft.rfftn(t, s=size, dim=(2, 3, 4))


def _by_frequency(spec: torch.Tensor, groups: int) -> torch.Tensor:
    """(A, G*B, f...) -> (F, G, A, B): one small matrix per frequency and group, for batched GEMMs."""
    A, GB = spec.shape[:2]
    return spec.reshape(A, groups, GB // groups, -1).permute(3, 1, 0, 2)


def _weight_by_frequency(spec: torch.Tensor, groups: int) -> torch.Tensor:
    """(G*Kg, B, f...) -> (F, G, Kg, B): the weight's output channels split by group."""
    K, B = spec.shape[:2]
    return spec.reshape(groups, K // groups, B, -1).permute(3, 0, 1, 2)


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched complex GEMM on materialised operands: a lazily conjugated or permuted view makes torch's
    bmm copy one slice per batch entry (thousands of small copies, measured at 40% of a pass)."""
    return blas.torch_matmul(a.resolve_conj().contiguous(), b.resolve_conj().contiguous())


def _from_frequency(prod: torch.Tensor, freq_shape: Sequence[int]) -> torch.Tensor:
    """(F, G, A, B) -> (A, G*B, f...)."""
    F, G, A, B = prod.shape
    return prod.permute(2, 1, 3, 0).reshape(A, G * B, *freq_shape)


def _padded_input(x: torch.Tensor, padding: Triple, padding_end: Triple) -> torch.Tensor:
    pads = []
    for b, e in zip(reversed(padding), reversed(padding_end)):
        pads += [b, e]
    return torch.nn.functional.pad(x, pads) if any(pads) else x


def forward(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], stride: Triple, padding: Triple,
            padding_end: Triple, dilation: Triple, groups: int, out_spatial: Triple) -> torch.Tensor:
    """x (N, C, D, H, W), w (K, C/groups, KD, KH, KW), bias (K,) or None -> y (N, K, *out_spatial)."""
    N, C = x.shape[:2]
    K = w.shape[0]
    y_shape = (N, K) + tuple(out_spatial)
    if min(y_shape) == 0:
        return x.new_zeros(y_shape)
    T, Q, L, size = _plan(tuple(w.shape[2:]), stride, dilation, out_spatial)
    xs = _split_phases(_padded_input(x, padding, padding_end), stride, L)
    ws = _split_phases(_dilate(w, dilation), stride, Q)
    X = _spectrum(xs, size)
    W = _spectrum(ws, size)
    freq = X.shape[2:]
    Y = _matmul(_by_frequency(X, groups), _weight_by_frequency(W, groups).conj().transpose(-1, -2))
    y = torch.fft.irfftn(_from_frequency(Y, freq), s=size, dim=(2, 3, 4))
    y = y[..., :out_spatial[0], :out_spatial[1], :out_spatial[2]]
    if bias is not None:
        y = y + bias.reshape(1, K, 1, 1, 1)
    return y.contiguous()


def grad_input(grad_out: torch.Tensor, w: torch.Tensor, stride: Triple, padding: Triple, padding_end: Triple,
               dilation: Triple, groups: int, in_spatial: Triple) -> torch.Tensor:
    """grad_out (N, K, OD, OH, OW), w (K, C/groups, ...) -> grad_x (N, C, *in_spatial)."""
    N, K = grad_out.shape[:2]
    C = w.shape[1] * groups
    out_spatial = tuple(grad_out.shape[2:])
    if min((N, C) + tuple(in_spatial)) == 0 or min(out_spatial + (K,)) == 0:
        return grad_out.new_zeros((N, C) + tuple(in_spatial))
    T, Q, L, size = _plan(tuple(w.shape[2:]), stride, dilation, out_spatial)
    ws = _split_phases(_dilate(w, dilation), stride, Q)
    GY = _spectrum(grad_out, size)
    W = _spectrum(ws, size)
    freq = GY.shape[2:]
    GX = _matmul(_by_frequency(GY, groups), _weight_by_frequency(W, groups))
    gxs = torch.fft.irfftn(_from_frequency(GX, freq), s=size, dim=(2, 3, 4))[..., :L[0], :L[1], :L[2]]
    gxp = _merge_phases(gxs, C, stride)
    padded = tuple(b + n + e for b, n, e in zip(padding, in_spatial, padding_end))
    gxp = _fit(gxp, padded)
    return gxp[..., padding[0]:padding[0] + in_spatial[0], padding[1]:padding[1] + in_spatial[1],
               padding[2]:padding[2] + in_spatial[2]].contiguous()


def grad_weight(grad_out: torch.Tensor, x: torch.Tensor, stride: Triple, padding: Triple, padding_end: Triple,
                dilation: Triple, groups: int, kernel: Triple) -> torch.Tensor:
    """grad_out (N, K, OD, OH, OW), x (N, C, D, H, W) -> grad_w (K, C/groups, *kernel)."""
    N, C = x.shape[:2]
    K = grad_out.shape[1]
    out_spatial = tuple(grad_out.shape[2:])
    w_shape = (K, C // groups) + tuple(kernel)
    if min(w_shape) == 0 or N == 0 or min(out_spatial) == 0:
        return x.new_zeros(w_shape)
    T, Q, L, size = _plan(tuple(kernel), stride, dilation, out_spatial)
    xs = _split_phases(_padded_input(x, padding, padding_end), stride, L)
    X = _spectrum(xs, size)
    GY = _spectrum(grad_out, size)
    freq = X.shape[2:]
    # (F, G, Kg, N) @ (F, G, N, Cg*P): the sum over the batch is the GEMM's inner dimension.
    GW = _matmul(_by_frequency(GY, groups).conj().transpose(-1, -2), _by_frequency(X, groups))
    GW = GW.permute(1, 2, 3, 0).reshape(K, GW.shape[-1], *freq)  # (F, G, Kg, Cg*P) -> (K, Cg*P, f...)
    gws = torch.fft.irfftn(GW, s=size, dim=(2, 3, 4))[..., :Q[0], :Q[1], :Q[2]]
    gwd = _merge_phases(gws, C // groups, stride)[..., :T[0], :T[1], :T[2]]
    return gwd[..., ::dilation[0], ::dilation[1], ::dilation[2]].contiguous()


def needs_exact(*operands: torch.Tensor) -> bool:
    """True when an operand holds NaN/Inf or magnitudes whose spectra could overflow (see module doc)."""
    for t in operands:
        if t is None or t.numel() == 0:
            continue
        peak = t.abs().amax()
        if not bool(torch.isfinite(peak)) or float(peak) > _SAFE_ABS.get(t.dtype, 1e12):
            return True
    return False


def spectra_bytes(batch: int, in_channels: int, out_channels: int, groups: int, kernel: Triple, stride: Triple,
                  dilation: Triple, out_spatial: Triple, itemsize: int) -> int:
    """Workspace of one pass: the input, weight and output spectra (complex, two floats per bin)."""
    _, _, _, size = _plan(kernel, stride, dilation, out_spatial)
    bins = size[0] * size[1] * (size[2] // 2 + 1)
    phases = math.prod(stride)
    complex_bytes = 2 * itemsize
    spectra = (batch * in_channels * phases + out_channels * (in_channels // groups) * phases
               + batch * out_channels) * bins
    return spectra * complex_bytes


def executed_multiplications(batch: int, in_channels: int, out_channels: int, groups: int, kernel: Triple,
                             stride: Triple, dilation: Triple, out_spatial: Triple) -> int:
    """Real multiplications one pass performs: 4 per complex product in the channel GEMMs, plus the
    transforms (a real FFT of n points costs about (n/2) log2(n) complex multiplications, 2 real each,
    counted as n log2 n)."""
    _, _, _, size = _plan(kernel, stride, dilation, out_spatial)
    n = math.prod(size)
    bins = size[0] * size[1] * (size[2] // 2 + 1)
    phases = math.prod(stride)
    cg = in_channels // groups * phases
    products = 4 * bins * batch * out_channels * cg
    transforms = (batch * in_channels * phases + out_channels * cg + batch * out_channels) * n * math.log2(max(n, 2))
    return int(products + transforms)


def with_exact_fallback(fast: Callable, exact: Callable, operand_positions: Sequence[int]) -> Callable:
    """``fast(*args)``, or ``exact(*args)`` when an operand at ``operand_positions`` needs exact arithmetic."""
    def call(*args):
        if needs_exact(*(args[i] for i in operand_positions)):
            return exact(*args)
        return fast(*args)

    return call
