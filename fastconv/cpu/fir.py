"""``out[i] = sum over t < T of wts[t] * src[offs[t] + i]``: a many-tap sum over shifted copies of one flat array,
with the partial sums held in registers across all the taps.

Why: the depthwise kernels (:mod:`.depthwise`) compute each output plane as this sum, with ``src`` a padded copy of
the input plane and one offset per tap. Written as Numba loops it made one pass over ``out`` per three taps
(load, add, store): a 7x7 kernel (ConvNeXt) made 17 passes, and the loop ran at half the rate of torch's depthwise
conv. Here a tile of ``FIR_VECTORS`` vectors of ``out`` (64 bytes each with AVX-512, 32 with AVX2: :data:`.micro_gemm.VECTOR_BYTES`) is accumulated over every
tap in registers (LLVM vector values, as in :mod:`.micro_gemm`, whose arrays Numba would keep in memory) and
stored once: per tap one broadcast of the weight, one vector load and one FMA per vector. Shorter tails take
tiles of fewer vectors, the last partial vector element by element.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from fastconv import config

from . import micro_gemm

__all__ = ["fir", "FIR_VECTORS", "channel_rows", "channel_rows_by_position", "channel_rows_by_window", "WINDOW_WIDTHS"]

_JIT = dict(cache=config.CACHE, nogil=True)
_VECTOR_BYTES = micro_gemm.VECTOR_BYTES  # the vectors micro_gemm.vector_ir builds

#: Vectors of ``out`` per tile: eight independent FMA chains keep both FMA units busy (four cycles of
#: latency each).
FIR_VECTORS = 8


def _fir_tile_intrinsic(vectors: int):
    """An intrinsic ``tile(src, src_base, offs, wts, T, out, out_base)``: ``out[out_base + j] = sum over t < T of
    wts[t] * src[src_base + offs[t] + j]`` for ``j < vectors * W`` (``W`` elements per vector). No bounds
    checks: the caller's indices are exact."""

    @intrinsic
    def tile(typingctx, src, src_base, offs, wts, T, out, out_base):
        signature = types.void(src, types.intp, offs, wts, types.intp, out, types.intp)
        dtype = out.dtype

        def codegen(context, builder, sig, args):
            src_v, src_base_v, offs_v, wts_v, T_v, out_v, out_base_v = args
            itemsize, width, vector, fma, zero, splat = micro_gemm.vector_ir(context, builder, dtype)
            intp = context.get_value_type(types.intp)
            src_ptr = builder.gep(context.make_array(src)(context, builder, src_v).data, [src_base_v])
            offs_ptr = context.make_array(offs)(context, builder, offs_v).data
            wts_ptr = context.make_array(wts)(context, builder, wts_v).data
            out_ptr = builder.gep(context.make_array(out)(context, builder, out_v).data, [out_base_v])

            def step(t, accumulators):
                offset = builder.load(builder.gep(offs_ptr, [t]))
                weight_splat = splat(builder.load(builder.gep(wts_ptr, [t])))
                row = builder.gep(src_ptr, [offset])
                updated = []
                for v in range(vectors):
                    ptr = builder.bitcast(builder.gep(row, [ir.Constant(intp, v * width)]), vector.as_pointer())
                    updated.append(builder.call(fma, [weight_splat, builder.load(ptr, align=itemsize),
                                                      accumulators[v]]))
                return updated

            results = micro_gemm.register_loop(builder, intp, T_v, [zero] * vectors, step, "fir")
            for v, value in enumerate(results):
                ptr = builder.bitcast(builder.gep(out_ptr, [ir.Constant(intp, v * width)]), vector.as_pointer())
                builder.store(value, ptr, align=itemsize)
            return context.get_dummy_value()

        return signature, codegen

    return tile


_tile8 = _fir_tile_intrinsic(FIR_VECTORS)
_tile2 = _fir_tile_intrinsic(2)
_tile1 = _fir_tile_intrinsic(1)


@njit(**_JIT)
def fir(src, offs, wts, T, out, L):
    """``out[i] = sum over t < T of wts[t] * src[offs[t] + i]`` for ``i < L``, on the calling thread.

    src, out: 1-D, contiguous, one float dtype (float32 or float64); offs: int64, wts: ``out``'s dtype, at least
    ``T`` long; every ``offs[t] + i`` inside ``src``."""
    W = _VECTOR_BYTES // out.itemsize
    i = 0
    big = FIR_VECTORS * W
    while i + big <= L:
        _tile8(src, i, offs, wts, T, out, i)
        i += big
    while i + 2 * W <= L:
        _tile2(src, i, offs, wts, T, out, i)
        i += 2 * W
    if i + W <= L:
        _tile1(src, i, offs, wts, T, out, i)
        i += W
    zero = np.zeros(1, out.dtype)[0]
    for j in range(i, L):
        s = zero
        for t in range(T):
            s += wts[t] * src[offs[t] + j]
        out[j] = s


def _channel_tile_pointers(context, builder, sig, args):
    """The data pointers of a channel tile's operands ``(src, src_base, offs, wts, w_base, _, out, out_base, _)``:
    ``src`` at ``src_base``, ``offs``, ``wts`` at ``w_base`` and ``out`` at ``out_base``."""
    def data(i):
        return context.make_array(sig.args[i])(context, builder, args[i]).data

    return (builder.gep(data(0), [args[1]]), data(2), builder.gep(data(3), [args[4]]),
            builder.gep(data(6), [args[7]]))


def _channel_tile_intrinsic(positions: int):
    """An intrinsic ``tile(src, src_base, offs, wts, w_base, T, out, out_base, step)`` for channel-innermost data
    (``step`` elements per position, one vector of channels at each): ``out[out_base + j*step + l] =
    wts[w_base + T*step + l] + sum over t < T of wts[w_base + t*step + l] * src[src_base + offs[t] + j*step + l]``
    for ``j < positions`` and the ``W`` lanes ``l`` of one vector (a per-channel weight vector per tap, the bias
    vector after the last). No bounds checks: the caller's indices are exact."""

    @intrinsic
    def tile(typingctx, src, src_base, offs, wts, w_base, T, out, out_base, step):
        signature = types.void(src, types.intp, offs, wts, types.intp, types.intp, out, types.intp, types.intp)
        dtype = out.dtype

        def codegen(context, builder, sig, args):
            T_v, step_v = args[5], args[8]
            itemsize, width, vector, fma, zero, splat = micro_gemm.vector_ir(context, builder, dtype)
            intp = context.get_value_type(types.intp)
            src_ptr, offs_ptr, wts_ptr, out_ptr = _channel_tile_pointers(context, builder, sig, args)

            def vec(ptr, offset):
                return builder.bitcast(builder.gep(ptr, [offset]), vector.as_pointer())

            bias = builder.load(vec(wts_ptr, builder.mul(T_v, step_v)), align=itemsize)

            def step(t, accumulators):
                row = builder.gep(src_ptr, [builder.load(builder.gep(offs_ptr, [t]))])
                weight = builder.load(vec(wts_ptr, builder.mul(t, step_v)), align=itemsize)
                updated = []
                for j in range(positions):
                    x = builder.load(vec(row, builder.mul(ir.Constant(intp, j), step_v)), align=itemsize)
                    updated.append(builder.call(fma, [weight, x, accumulators[j]]))
                return updated

            results = micro_gemm.register_loop(builder, intp, T_v, [bias] * positions, step, "channel_tile")
            for j, value in enumerate(results):
                builder.store(value, vec(out_ptr, builder.mul(ir.Constant(intp, j), step_v)), align=itemsize)
            return context.get_dummy_value()

        return signature, codegen

    return tile


_channel8 = _channel_tile_intrinsic(8)
_channel4 = _channel_tile_intrinsic(4)
_channel2 = _channel_tile_intrinsic(2)
_channel1 = _channel_tile_intrinsic(1)


@njit(**_JIT)
def channel_rows(src, src_base, row_step, offs, wts, T, rows, cols, step, out):
    """The channel-innermost form of :func:`fir`, for blocks of ``step`` channels stored innermost (the depthwise
    channel-blocked path): for every output position ``(r, q)`` (``r < rows``, ``q < cols``) and channel ``l <
    step``, ``out[(r*cols + q)*step + l] = wts[T*step + l] + sum over t < T of wts[t*step + l] * src[src_base +
    r*row_step + offs[t] + q*step + l]``. Tiles of up to eight positions by one vector of channels are
    summed over every tap in registers (per tap one weight vector, one load and one FMA per position).

    ``step`` a multiple of the vector width (16 float32, 8 float64); src, wts, out: 1-D, contiguous, one dtype;
    offs: int64 (T,)."""
    W = _VECTOR_BYTES // out.itemsize
    for r in range(rows):
        sb = src_base + r * row_step
        ob = r * cols * step
        for lane in range(0, step, W):
            q = 0
            while q + 8 <= cols:
                _channel8(src, sb + q * step + lane, offs, wts, lane, T, out, ob + q * step + lane, step)
                q += 8
            if q + 4 <= cols:
                _channel4(src, sb + q * step + lane, offs, wts, lane, T, out, ob + q * step + lane, step)
                q += 4
            if q + 2 <= cols:
                _channel2(src, sb + q * step + lane, offs, wts, lane, T, out, ob + q * step + lane, step)
                q += 2
            if q < cols:
                _channel1(src, sb + q * step + lane, offs, wts, lane, T, out, ob + q * step + lane, step)


@njit(inline="always", **_JIT)
def _position_tail(src, sb, offs, wts, T, out, ob, step, q, cols, W):
    """The last ``cols - q`` (< 8) positions of a row for every vector of channels, on the 4-, 2- and 1-position
    tiles: the end of a row in :func:`channel_rows_by_position` and :func:`channel_rows_by_window`."""
    if q + 4 <= cols:
        for lane in range(0, step, W):
            _channel4(src, sb + q * step + lane, offs, wts, lane, T, out, ob + q * step + lane, step)
        q += 4
    if q + 2 <= cols:
        for lane in range(0, step, W):
            _channel2(src, sb + q * step + lane, offs, wts, lane, T, out, ob + q * step + lane, step)
        q += 2
    if q < cols:
        for lane in range(0, step, W):
            _channel1(src, sb + q * step + lane, offs, wts, lane, T, out, ob + q * step + lane, step)


@njit(**_JIT)
def channel_rows_by_position(src, src_base, row_step, offs, wts, T, rows, cols, step, out):
    """:func:`channel_rows` with the tile loops the other way round: every vector of channels of a tile of
    positions before the next tile, for wide ``step`` (all of a layer's channels innermost, the channels-last
    kernels of :mod:`.depthwise_nhwc`). A tile's input window (the taps' rows, a few positions wide, every
    channel) then stays in L1 while its channel vectors are summed; with the lanes outermost, each lane swept the
    whole rows from L2 again (ConvNeXt's 96-channel 7x7 rows: 15 KB each, seven per output row)."""
    W = _VECTOR_BYTES // out.itemsize
    for r in range(rows):
        sb = src_base + r * row_step
        ob = r * cols * step
        q = 0
        while q + 8 <= cols:
            for lane in range(0, step, W):
                _channel8(src, sb + q * step + lane, offs, wts, lane, T, out, ob + q * step + lane, step)
            q += 8
        _position_tail(src, sb, offs, wts, T, out, ob, step, q, cols, W)


def _window_tile_intrinsic(positions: int, width_taps: int):
    """An intrinsic ``tile(src, src_base, row_offs, wts, w_base, KH, out, out_base, step)``: the channel tile of
    :func:`_channel_tile_intrinsic` for taps that lie in ``KH`` rows of ``width_taps`` adjacent positions (a
    stride-1, undilated row), tap ``(kh, kw)`` at ``row_offs[kh] + kw*step``: ``out[out_base + j*step + l] =
    wts[w_base + KH*width_taps*step + l] + sum over kh, kw of wts[w_base + (kh*width_taps + kw)*step + l] *
    src[src_base + row_offs[kh] + (j + kw)*step + l]`` for ``j < positions`` and the ``W`` lanes ``l`` of one vector.
    Each row's ``positions + width_taps - 1`` input vectors are loaded once and used by all of its taps: for a
    7-wide row 21 loads per 56 FMAs, where the tap-by-tap tile makes 63. No bounds checks."""

    @intrinsic
    def tile(typingctx, src, src_base, row_offs, wts, w_base, KH, out, out_base, step):
        signature = types.void(src, types.intp, row_offs, wts, types.intp, types.intp, out, types.intp, types.intp)
        dtype = out.dtype

        def codegen(context, builder, sig, args):
            KH_v, step_v = args[5], args[8]
            itemsize, width, vector, fma, zero, splat = micro_gemm.vector_ir(context, builder, dtype)
            intp = context.get_value_type(types.intp)
            src_ptr, offs_ptr, wts_ptr, out_ptr = _channel_tile_pointers(context, builder, sig, args)

            def const(v):
                return ir.Constant(intp, v)

            def vec(ptr, offset):
                return builder.bitcast(builder.gep(ptr, [offset]), vector.as_pointer())

            taps_v = builder.mul(KH_v, const(width_taps))
            bias = builder.load(vec(wts_ptr, builder.mul(taps_v, step_v)), align=itemsize)

            def row(kh, accumulators):
                base = builder.gep(src_ptr, [builder.load(builder.gep(offs_ptr, [kh]))])
                xs = [builder.load(vec(base, builder.mul(const(j), step_v)), align=itemsize)
                      for j in range(positions + width_taps - 1)]
                w_row = builder.mul(builder.mul(kh, const(width_taps)), step_v)
                updated = list(accumulators)
                for kw in range(width_taps):
                    weight = builder.load(vec(wts_ptr, builder.add(w_row, builder.mul(const(kw), step_v))),
                                          align=itemsize)
                    for j in range(positions):
                        updated[j] = builder.call(fma, [weight, xs[j + kw], updated[j]])
                return updated

            results = micro_gemm.register_loop(builder, intp, KH_v, [bias] * positions, row, "window_tile")
            for j, value in enumerate(results):
                builder.store(value, vec(out_ptr, builder.mul(const(j), step_v)), align=itemsize)
            return context.get_dummy_value()

        return signature, codegen

    return tile


#: Row widths (taps) that :func:`channel_rows_by_window` has tiles for: the 3x3, 5x5 and 7x7 depthwise kernels.
WINDOW_WIDTHS = (3, 5, 7)
_window8_3 = _window_tile_intrinsic(8, 3)
_window8_5 = _window_tile_intrinsic(8, 5)
_window8_7 = _window_tile_intrinsic(8, 7)


@njit(**_JIT)
def channel_rows_by_window(src, src_base, row_step, row_offs, KH, KW, offs, wts, T, rows, cols, step, out):
    """:func:`channel_rows_by_position` for taps in ``KH`` rows of ``KW`` adjacent positions (``KW`` one of
    :data:`WINDOW_WIDTHS`; tap ``(kh, kw)`` at ``row_offs[kh] + kw*step``, which ``offs`` lists too, ``T = KH*KW``):
    the tiles of eight positions load each row's input vectors once for all of its taps (:func:`_window_tile_intrinsic`;
    32 vector registers hold the 8 sums and a 7-wide row's 14 inputs, so AVX-512 hosts only); the last positions
    of a row take the tap-by-tap tiles."""
    W = _VECTOR_BYTES // out.itemsize
    for r in range(rows):
        sb = src_base + r * row_step
        ob = r * cols * step
        q = 0
        while q + 8 <= cols:
            for lane in range(0, step, W):
                if KW == 7:
                    _window8_7(src, sb + q * step + lane, row_offs, wts, lane, KH, out, ob + q * step + lane, step)
                elif KW == 5:
                    _window8_5(src, sb + q * step + lane, row_offs, wts, lane, KH, out, ob + q * step + lane, step)
                else:
                    _window8_3(src, sb + q * step + lane, row_offs, wts, lane, KH, out, ob + q * step + lane, step)
            q += 8
        _position_tail(src, sb, offs, wts, T, out, ob, step, q, cols, W)
