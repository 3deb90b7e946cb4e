"""``out[i] = sum over t < T of wts[t] * src[offs[t] + i]``: a many-tap sum over shifted copies of one flat array,
with the partial sums held in registers across all the taps.

Why: the depthwise kernels (:mod:`.depthwise`) compute each output plane as this sum, with ``src`` a padded copy of
the input plane and one offset per tap. Written as Numba loops it made one pass over ``out`` per three taps
(load, add, store): a 7x7 kernel (ConvNeXt) made 17 passes, and the loop ran at half the rate of torch's depthwise
conv. Here a tile of ``FIR_VECTORS`` 64-byte vectors of ``out`` (128 float32 outputs) is accumulated over every
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

__all__ = ["fir", "FIR_VECTORS"]

_JIT = dict(cache=config.CACHE, nogil=True)
_VECTOR_BYTES = 64

#: 64-byte vectors of ``out`` per tile: eight independent FMA chains keep both FMA units busy (four cycles of
#: latency each).
FIR_VECTORS = 8


def _fir_tile_intrinsic(vectors: int):
    """An intrinsic ``tile(src, src_base, offs, wts, T, out, out_base)``: ``out[out_base + j] = sum over t < T of
    wts[t] * src[src_base + offs[t] + j]`` for ``j < vectors * W`` (``W`` elements per 64-byte vector). No bounds
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

            entry = builder.block
            loop = builder.function.append_basic_block("fir_loop")
            done = builder.function.append_basic_block("fir_done")
            builder.cbranch(builder.icmp_signed(">", T_v, ir.Constant(intp, 0)), loop, done)
            builder.position_at_end(loop)
            t = builder.phi(intp)
            t.add_incoming(ir.Constant(intp, 0), entry)
            accumulators = []
            for _ in range(vectors):
                phi = builder.phi(vector)
                phi.add_incoming(zero, entry)
                accumulators.append(phi)
            offset = builder.load(builder.gep(offs_ptr, [t]))
            weight = builder.load(builder.gep(wts_ptr, [t]))
            weight_splat = splat(weight)
            row = builder.gep(src_ptr, [offset])
            updated = []
            for v in range(vectors):
                ptr = builder.bitcast(builder.gep(row, [ir.Constant(intp, v * width)]), vector.as_pointer())
                updated.append(builder.call(fma, [weight_splat, builder.load(ptr, align=itemsize), accumulators[v]]))
            t_next = builder.add(t, ir.Constant(intp, 1))
            loop_end = builder.block
            t.add_incoming(t_next, loop_end)
            for phi, value in zip(accumulators, updated):
                phi.add_incoming(value, loop_end)
            builder.cbranch(builder.icmp_signed("<", t_next, T_v), loop, done)
            builder.position_at_end(done)
            results = []
            for value in updated:  # (every phi first: LLVM wants them at the top of the block)
                phi = builder.phi(vector)
                phi.add_incoming(zero, entry)
                phi.add_incoming(value, loop_end)
                results.append(phi)
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
