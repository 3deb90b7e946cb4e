"""Output positions with all of their channels (stored innermost), each summed over its own listed taps in registers.

Why: a channels-last depthwise conv on a small map (ConvNeXt's 7x7 on 8x8 and 4x4 maps, padding 3) spends a large
share of its multiply-adds on the zero padding when each window is read from a padded copy: at 4x4 67% of the taps
of a 7x7 window lie outside the input, at 8x8 38%, and the padded copy of a 4x4 map is six times its size. Listing
only the taps that fall inside the input, per output position, reads the input where it lies (no copy) and does
only the multiply-adds torch's kernel does. A tile holds eight channel vectors of one position (eight independent
accumulators keep both FMA units busy); per tap two table reads, then a weight and an input vector load per FMA.
:func:`row_taps` runs a row of positions one block of channels at a time, so that the block's weights and input
rows stay in L1.
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from fastconv import config

from . import micro_gemm

__all__ = ["inside_fraction", "row_taps", "row_window_taps", "window_taps"]

_JIT = dict(cache=config.CACHE, nogil=True)
_VECTOR_BYTES = micro_gemm.VECTOR_BYTES


def _position_tile_intrinsic(vectors: int):
    """An intrinsic ``tile(src, src_base, soffs, wts, w_base, woffs, T, bias_base, out, out_base)``: for the
    ``vectors * W`` lanes ``l`` (``W`` elements per vector) ``out[out_base + l] = wts[bias_base + l] + sum over
    t < T of wts[w_base + woffs[t] + l] * src[src_base + soffs[t] + l]``. No bounds checks: the caller's indices
    are exact."""

    @intrinsic
    def tile(typingctx, src, src_base, soffs, wts, w_base, woffs, T, bias_base, out, out_base):
        signature = types.void(src, types.intp, soffs, wts, types.intp, woffs, types.intp, types.intp, out,
                               types.intp)
        dtype = out.dtype

        def codegen(context, builder, sig, args):
            def data(i):
                return context.make_array(sig.args[i])(context, builder, args[i]).data

            itemsize, width, vector, fma, zero, splat = micro_gemm.vector_ir(context, builder, dtype)
            intp = context.get_value_type(types.intp)
            src_ptr = builder.gep(data(0), [args[1]])
            soffs_ptr, wts_data, woffs_ptr = data(2), data(3), data(5)
            wts_ptr = builder.gep(wts_data, [args[4]])
            out_ptr = builder.gep(data(8), [args[9]])

            def vec(ptr, v):
                return builder.bitcast(builder.gep(ptr, [ir.Constant(intp, v * width)]), vector.as_pointer())

            bias_ptr = builder.gep(wts_data, [args[7]])
            initial = [builder.load(vec(bias_ptr, v), align=itemsize) for v in range(vectors)]

            def step(t, accumulators):
                s = builder.gep(src_ptr, [builder.load(builder.gep(soffs_ptr, [t]))])
                w = builder.gep(wts_ptr, [builder.load(builder.gep(woffs_ptr, [t]))])
                return [builder.call(fma, [builder.load(vec(w, v), align=itemsize),
                                           builder.load(vec(s, v), align=itemsize), accumulators[v]])
                        for v in range(vectors)]

            results = micro_gemm.register_loop(builder, intp, args[6], initial, step, "position_taps")
            for v, value in enumerate(results):
                builder.store(value, vec(out_ptr, v), align=itemsize)
            return context.get_dummy_value()

        return signature, codegen

    return tile


_tile8 = _position_tile_intrinsic(8)
_tile4 = _position_tile_intrinsic(4)
_tile2 = _position_tile_intrinsic(2)
_tile1 = _position_tile_intrinsic(1)


@njit(**_JIT)
def row_taps(src, soffs, wts, woffs, counts, P, T, bias_base, out, out_base, C):
    """``out[out_base + j*C + c] = wts[bias_base + c] + sum over t < counts[j] of wts[woffs[j*T + t] + c] *
    src[soffs[j*T + t] + c]`` for positions ``j < P`` (a row of outputs, each with its own ``counts[j]`` listed
    taps, 0 meaning the bias alone) and every channel ``c < C``. The channel blocks are the outer loop: a block's
    weights (``T`` rows of eight vectors, 25 KB for a 7x7 float32 kernel) stay in L1 while its positions run,
    where position by position, all channels, a 384-channel 7x7 window reads 75 KB of weights and as much input.
    Measured on ConvNeXt's 384 x 8x8 at batch 8, 2 threads: position by position 0.197 ms, by channel block
    0.187; with ``wts`` starting on a cache line (the caller's table) 0.145.

    src, wts, out: 1-D, one dtype (float32 or float64); soffs, woffs: int64, ``P*T`` long; ``C`` a multiple of
    the vector width (16 float32, 8 float64 with AVX-512)."""
    W = _VECTOR_BYTES // out.itemsize
    c = 0
    while c + 8 * W <= C:
        for j in range(P):
            _tile8(src, c, soffs[j * T:], wts, c, woffs[j * T:], counts[j], bias_base + c, out, out_base + j * C + c)
        c += 8 * W
    if c + 4 * W <= C:
        for j in range(P):
            _tile4(src, c, soffs[j * T:], wts, c, woffs[j * T:], counts[j], bias_base + c, out, out_base + j * C + c)
        c += 4 * W
    if c + 2 * W <= C:
        for j in range(P):
            _tile2(src, c, soffs[j * T:], wts, c, woffs[j * T:], counts[j], bias_base + c, out, out_base + j * C + c)
        c += 2 * W
    if c + W <= C:
        for j in range(P):
            _tile1(src, c, soffs[j * T:], wts, c, woffs[j * T:], counts[j], bias_base + c, out, out_base + j * C + c)


@njit(**_JIT)
def row_window_taps(n, oh, OW, H, W, C, KH, KW, sh, sw, ph, pw, dh, dw, soffs, woffs, counts):
    """:func:`window_taps` for every position of output row ``oh`` of image ``n``: position ``ow``'s taps at
    ``soffs[ow*T:]``/``woffs[ow*T:]`` (``T = KH*KW``), their count in ``counts[ow]``."""
    T = KH * KW
    for ow in range(OW):
        counts[ow] = window_taps(n, oh, ow, H, W, C, KH, KW, sh, sw, ph, pw, dh, dw, soffs[ow * T:], woffs[ow * T:])


@njit(**_JIT)
def window_taps(n, oh, ow, H, W, C, KH, KW, sh, sw, ph, pw, dh, dw, soffs, woffs):
    """Fill ``soffs``/``woffs`` with the taps of output position ``(oh, ow)`` of image ``n`` that fall inside the
    (N, H, W, C) input: each tap's input position and weight row (``(kh*KW + kw) * C``) as flat offsets. Returns
    their count."""
    kh0, kh1 = _inside(oh * sh - ph, dh, KH, H)
    kw0, kw1 = _inside(ow * sw - pw, dw, KW, W)
    t = 0
    for kh in range(kh0, kh1):
        row = (n * H + oh * sh - ph + kh * dh) * W + ow * sw - pw
        for kw in range(kw0, kw1):
            soffs[t] = (row + kw * dw) * C
            woffs[t] = (kh * KW + kw) * C
            t += 1
    return t


@njit(inline="always", **_JIT)
def _inside(i0, d, K, size):
    """The taps ``k`` in ``[k0, k1)`` of a window starting at input index ``i0`` with dilation ``d`` whose index
    ``i0 + k*d`` lies in ``[0, size)`` (the rest are the zero padding)."""
    k0 = 0 if i0 >= 0 else (-i0 + d - 1) // d
    k1 = 0 if i0 >= size else min(K, (size - 1 - i0) // d + 1)
    return k0, max(k0, k1)


@njit(**_JIT)
def inside_fraction(size, out, K, stride, pad, dilation):
    """The mean fraction of a window's ``K`` taps along one dim that fall inside ``[0, size)``, over the ``out``
    output positions (1.0 without padding)."""
    inside = 0
    for o in range(out):
        k0, k1 = _inside(o * stride - pad, dilation, K, size)
        inside += k1 - k0
    return inside / max(1, out * K)
