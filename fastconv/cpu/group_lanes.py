"""Grouped 2-D convs with narrow groups, eight groups per vector: the lanes of every vector are eight groups.

Why: RegNet's grouped 3x3 convs have 8 input and 8 output channels per group. The shift kernels (:mod:`.shift`)
multiply whole planes by scalar weights, one plane pass per (output channel, input channel, three taps): on the
4x4 to 16x16 planes of RegNet-Y-400MF their loops are short and the phase planes cost a third to two thirds of
the forward; the layers ran 1.4-2.1x torch's time forward and backward (batch 8). Here a block of eight groups is
packed channels-innermost with the lane order (channel in group, group): at each input position, channel ``c``
of the eight groups is one vector ``X[pos, c]``, and output channel ``j`` of the eight groups is one vector
``Y[pos, j]``. Then ``Y[pos, j] += Wt[t, c, j] * X[pos + off_t, c]`` is a plain lane-wise FMA (the weight vector
holds the eight groups' ``w[j, c, t]``): no broadcasts, no shuffles, every lane busy, and a tile of three
positions by eight output channels (24 accumulators) is summed over every tap and input channel in registers.

The vectors are eight lanes in both dtypes (256-bit float32, 512-bit float64), so a block is eight groups
whatever the dtype; a core that splits 512-bit operations in two (AMD Zen 4) runs 256-bit FMAs at the same
arithmetic rate. Packing and unpacking are 8x8 transposes in registers (:func:`_transpose8_to_rows`,
:func:`_transpose8_from_rows`): the rows of one transpose are the eight groups' channel ``c`` (planes
``Cg * H * W`` apart), its columns eight positions. A last block of fewer groups repeats its last group in the
spare lanes (read, never stored).

Layout of a task's packed input (``nb`` images of one block of eight groups): position-major, each position
``Cg * 8`` elements, the image zero-padded and split by column stride phase as in the depthwise channel-blocked
path (:func:`.depthwise.channel_block_places`): row ``hp``, phase ``b``, column ``q`` at position ``(hp * sw + b)
* Wq + q``. Output position ``(oh, ow)`` reads tap ``(kh, kw)`` at position ``oh * sh * sw * Wq + ow +`` the
tap's offset; a table of every output position's offset lets a tile take any three positions (rows of 4 or 8
outputs do not split into tiles of three).

Passes (all parallel over (block of images, block of eight groups); each task packs, computes and unpacks in its
own buffers):

* forward, and the input gradient as a forward: stride 1 with the flipped, group-transposed weights; strided
  convs with the output gradient spread to every ``s``-th position of a zero plane (a stride-1 correlation),
  each output phase running only the taps that meet non-zero rows and columns (:func:`_forward_plan`: no
  multiply-adds of the spread's zeros);
* weight gradient: ``Acc[t, c, j] += G[pos, j] * X[pos + off_t, c]`` over every output position, tiles of three
  input channels by eight output channels; a task per (block of groups, half of the batch) when there are few
  blocks, the halves' sums added in a fixed order (the same result for any thread count).

Arrays are flat NCHW buffers; ``Cg`` and ``Kg`` (channels per group in and out) multiples of eight
(:func:`refuse_reason`).

Measured (2 threads, batch 8, float32, RegNet-Y-400MF's grouped 3x3 layers at 128x128 input, medians of 30, ms
forward / input grad / weight grad, this / shift / torch): 440 x 4x4 0.11/0.16/0.12, 0.25/0.33/0.27,
0.19/0.25/0.25; 208 x 8x8 0.17/0.18/0.18, 0.26/0.29/0.28, 0.22/0.26/0.28; 104 x 16x16 0.30/0.30/0.34,
0.46/0.51/0.64, 0.37/0.39/0.43; stride 2 from 64x64 (48 channels, 6 groups: one partial block) 0.91/1.02/0.96,
1.63/9.14/2.42, 1.13/9.19/1.03.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from fastconv import config

from . import memory, micro_gemm, parallel
from .arguments import int_tuple
from .depthwise import channel_block_places

__all__ = ["LANES", "forward", "grad_input", "grad_weight", "refuse_reason", "executed_multiplications"]

_JIT = dict(cache=config.CACHE, fastmath=set(config.FASTMATH), nogil=True)

#: Groups per block: the lanes of every vector.
LANES = 8
#: Output positions per forward tile and input channels per weight-gradient tile (each by eight output
#: channels: 24 accumulators of the 32 vector registers, the loads and the next operand in the rest).
TILE = 3
#: Most bytes of one task's packed input (its images of one block of groups); the images per task follow.
TASK_BYTES = 384 << 10


def _lane_vector(context, dtype):
    return ir.VectorType(context.get_value_type(dtype), LANES), (4 if dtype == types.float32 else 8)


@intrinsic
def _transpose8_to_rows(typingctx, src, src_offset, lds, nrows, dst, rows, rows_offset, lane0):
    """``dst[rows[rows_offset + q] + lane0 + r] = src[src_offset + min(r, nrows - 1) * lds + q]`` for ``r, q < 8``:
    eight rows (the last one repeated past ``nrows``) by eight columns, transposed in registers, each column
    stored as one vector at its own place."""
    signature = types.void(src, types.intp, types.intp, types.intp, dst, rows, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        src_v, src_off, lds_v, nrows_v, dst_v, rows_v, rows_off, lane_v = args
        vector, itemsize = _lane_vector(context, dst.dtype)
        intp = context.get_value_type(types.intp)
        src_ptr = builder.gep(context.make_array(src)(context, builder, src_v).data, [src_off])
        last = builder.sub(nrows_v, ir.Constant(intp, 1))
        loaded = []
        for r in range(LANES):
            row = builder.select(builder.icmp_signed("<", ir.Constant(intp, r), nrows_v), ir.Constant(intp, r), last)
            ptr = builder.gep(src_ptr, [builder.mul(row, lds_v)])
            loaded.append(builder.load(builder.bitcast(ptr, vector.as_pointer()), align=itemsize))
        columns = micro_gemm.transposed_rows(builder, loaded)
        dst_ptr = builder.gep(context.make_array(dst)(context, builder, dst_v).data, [lane_v])
        rows_ptr = builder.gep(context.make_array(rows)(context, builder, rows_v).data, [rows_off])
        for q, value in enumerate(columns):
            place = builder.load(builder.gep(rows_ptr, [ir.Constant(intp, q)]))
            builder.store(value, builder.bitcast(builder.gep(dst_ptr, [place]), vector.as_pointer()), align=itemsize)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def _transpose8_from_rows(typingctx, src, rows, rows_offset, lane0, dst, dst_offset, ldd, ncols):
    """``dst[dst_offset + q * ldd + r] = src[rows[rows_offset + r] + lane0 + q]`` for ``r < 8`` and ``q < min(8,
    ncols)``: eight vectors, each from its own place, transposed in registers, the first ``ncols`` columns
    stored (the inverse of :func:`_transpose8_to_rows`)."""
    signature = types.void(src, rows, types.intp, types.intp, dst, types.intp, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        src_v, rows_v, rows_off, lane_v, dst_v, dst_off, ldd_v, ncols_v = args
        vector, itemsize = _lane_vector(context, dst.dtype)
        intp = context.get_value_type(types.intp)
        src_ptr = builder.gep(context.make_array(src)(context, builder, src_v).data, [lane_v])
        rows_ptr = builder.gep(context.make_array(rows)(context, builder, rows_v).data, [rows_off])
        loaded = []
        for r in range(LANES):
            place = builder.load(builder.gep(rows_ptr, [ir.Constant(intp, r)]))
            loaded.append(builder.load(builder.bitcast(builder.gep(src_ptr, [place]), vector.as_pointer()),
                                       align=itemsize))
        columns = micro_gemm.transposed_rows(builder, loaded)
        dst_ptr = builder.gep(context.make_array(dst)(context, builder, dst_v).data, [dst_off])
        for q, value in enumerate(columns):
            with builder.if_then(builder.icmp_signed("<", ir.Constant(intp, q), ncols_v), likely=True):
                target = builder.gep(dst_ptr, [builder.mul(ir.Constant(intp, q), ldd_v)])
                builder.store(value, builder.bitcast(target, vector.as_pointer()), align=itemsize)
        return context.get_dummy_value()

    return signature, codegen


def _fma_function(builder, vector, itemsize):
    """The module's ``llvm.fma`` declaration for 8-lane vectors of ``itemsize``-byte floats."""
    name = f"llvm.fma.v{LANES}f{itemsize * 8}"
    return builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(vector, [vector] * 3),
                                                            name)


def _forward_tile_intrinsic(positions: int):
    """An intrinsic ``tile(src, poff, m0, taps, nsteps, wts, wstep, bias, out, out_base, ostep)``: for ``p <
    positions`` and ``j < 8``, ``out[out_base + p*ostep + j*8 : +8] = bias[j*8 : +8] + sum over i < nsteps of
    wts[i*wstep + j*8 : +8] * src[poff[m0 + p] + taps[i] : +8]`` (vectors of eight lanes). ``taps[i]``: step
    ``i``'s (tap, input channel) offset in the packed input. No bounds checks: the caller's indices are exact."""

    @intrinsic
    def tile(typingctx, src, poff, m0, taps, nsteps, wts, wstep, bias, out, out_base, ostep):
        signature = types.void(src, poff, types.intp, taps, types.intp, wts, types.intp, bias, out, types.intp,
                               types.intp)

        def codegen(context, builder, sig, args):
            src_v, poff_v, m0_v, taps_v, nsteps_v, wts_v, wstep_v, bias_v, out_v, out_base_v, ostep_v = args
            vector, itemsize = _lane_vector(context, out.dtype)
            intp = context.get_value_type(types.intp)
            fma = _fma_function(builder, vector, itemsize)
            src_ptr = context.make_array(src)(context, builder, src_v).data
            poff_ptr = builder.gep(context.make_array(poff)(context, builder, poff_v).data, [m0_v])
            taps_ptr = context.make_array(taps)(context, builder, taps_v).data
            wts_ptr = context.make_array(wts)(context, builder, wts_v).data
            out_ptr = builder.gep(context.make_array(out)(context, builder, out_v).data, [out_base_v])

            def vec(ptr, offset):
                return builder.bitcast(builder.gep(ptr, [offset]), vector.as_pointer())

            bases = [builder.gep(src_ptr, [builder.load(builder.gep(poff_ptr, [ir.Constant(intp, p)]))])
                     for p in range(positions)]
            bias_ptr = context.make_array(bias)(context, builder, bias_v).data
            biases = [builder.load(vec(bias_ptr, ir.Constant(intp, j * LANES)), align=itemsize)
                      for j in range(LANES)]

            def step(i, acc):  # acc[p * 8 + j]: position p, output channel block j
                tap = builder.load(builder.gep(taps_ptr, [i]))
                xs = [builder.load(vec(base, tap), align=itemsize) for base in bases]
                wrow = builder.gep(wts_ptr, [builder.mul(i, wstep_v)])
                updated = list(acc)
                for j in range(LANES):
                    wj = builder.load(vec(wrow, ir.Constant(intp, j * LANES)), align=itemsize)
                    for p in range(positions):
                        updated[p * LANES + j] = builder.call(fma, [wj, xs[p], acc[p * LANES + j]])
                return updated

            flat = micro_gemm.register_loop(builder, intp, nsteps_v, biases * positions, step, "lanes_tile")
            results = [flat[p * LANES:(p + 1) * LANES] for p in range(positions)]
            for p in range(positions):
                row = builder.gep(out_ptr, [builder.mul(ir.Constant(intp, p), ostep_v)])
                for j in range(LANES):
                    builder.store(results[p][j], vec(row, ir.Constant(intp, j * LANES)), align=itemsize)
            return context.get_dummy_value()

        return signature, codegen

    return tile


def _grad_weight_tile_intrinsic(channels: int):
    """An intrinsic ``tile(src, poff, npos, xoff, g, gstep, acc, acc_base, acc_cstep)``: for ``c < channels`` and
    ``j < 8``, ``acc[acc_base + c*acc_cstep + j*8 : +8] += sum over m < npos of g[m*gstep + j*8 : +8] *
    src[poff[m] + xoff + c*8 : +8]`` (vectors of eight lanes), the sums held in registers over every position."""

    @intrinsic
    def tile(typingctx, src, poff, npos, xoff, g, gstep, acc, acc_base, acc_cstep):
        signature = types.void(src, poff, types.intp, types.intp, g, types.intp, acc, types.intp, types.intp)

        def codegen(context, builder, sig, args):
            src_v, poff_v, npos_v, xoff_v, g_v, gstep_v, acc_v, acc_base_v, acc_cstep_v = args
            vector, itemsize = _lane_vector(context, acc.dtype)
            intp = context.get_value_type(types.intp)
            fma = _fma_function(builder, vector, itemsize)
            src_ptr = builder.gep(context.make_array(src)(context, builder, src_v).data, [xoff_v])
            poff_ptr = context.make_array(poff)(context, builder, poff_v).data
            g_ptr = context.make_array(g)(context, builder, g_v).data
            acc_ptr = builder.gep(context.make_array(acc)(context, builder, acc_v).data, [acc_base_v])

            def vec(ptr, offset):
                return builder.bitcast(builder.gep(ptr, [offset]), vector.as_pointer())

            places = [[vec(builder.gep(acc_ptr, [builder.mul(ir.Constant(intp, c), acc_cstep_v)]),
                           ir.Constant(intp, j * LANES)) for j in range(LANES)] for c in range(channels)]
            start = [[builder.load(places[c][j], align=itemsize) for j in range(LANES)] for c in range(channels)]

            def step(m, sums):  # sums[c * 8 + j]: input channel c, output channel block j
                base = builder.gep(src_ptr, [builder.load(builder.gep(poff_ptr, [m]))])
                xs = [builder.load(vec(base, ir.Constant(intp, c * LANES)), align=itemsize)
                      for c in range(channels)]
                grow = builder.gep(g_ptr, [builder.mul(m, gstep_v)])
                updated = list(sums)
                for j in range(LANES):
                    gj = builder.load(vec(grow, ir.Constant(intp, j * LANES)), align=itemsize)
                    for c in range(channels):
                        updated[c * LANES + j] = builder.call(fma, [gj, xs[c], sums[c * LANES + j]])
                return updated

            flat = micro_gemm.register_loop(builder, intp, npos_v, [v for row in start for v in row], step, "lanes_gw")
            results = [flat[c * LANES:(c + 1) * LANES] for c in range(channels)]
            for c in range(channels):
                for j in range(LANES):
                    builder.store(results[c][j], places[c][j], align=itemsize)
            return context.get_dummy_value()

        return signature, codegen

    return tile


_forward3 = _forward_tile_intrinsic(TILE)
_forward1 = _forward_tile_intrinsic(1)
_grad_weight3 = _grad_weight_tile_intrinsic(TILE)
_grad_weight2 = _grad_weight_tile_intrinsic(2)
_grad_weight1 = _grad_weight_tile_intrinsic(1)


@njit(**_JIT)
def _pack(src, base, lds, nrows, npos, dst, places, lane0):
    """``dst[places[q] + lane0 + r] = src[base + min(r, nrows - 1) * lds + q]`` for ``r < 8``, ``q < npos``: eight
    planes (``lds`` apart) transposed position by position into their packed places, by 8x8 blocks."""
    q = 0
    while q + LANES <= npos:
        _transpose8_to_rows(src, base + q, lds, nrows, dst, places, q, lane0)
        q += LANES
    for qq in range(q, npos):
        for r in range(LANES):
            dst[places[qq] + lane0 + r] = src[base + min(r, nrows - 1) * lds + qq]


@njit(**_JIT)
def _unpack(src, rows, lane0, npos, dst, dst_base, ldd, ncols):
    """``dst[dst_base + r * ldd + q] = src[rows[q] + lane0 + r]`` for ``r < ncols``, ``q < npos``: position ``q``'s
    vector of lanes (found through ``rows``) to element ``q`` of ``ncols`` planes (``ldd`` apart), by 8x8 blocks
    (the inverse of :func:`_pack`)."""
    q = 0
    while q + LANES <= npos:
        _transpose8_from_rows(src, rows, q, lane0, dst, dst_base + q, ldd, ncols)
        q += LANES
    for qq in range(q, npos):
        for r in range(ncols):
            dst[dst_base + r * ldd + qq] = src[rows[qq] + lane0 + r]


@njit(**_JIT)
def _tap_offsets(KH, KW, sw, dh, dw, Wq, step):
    """Each tap's offset in a packed image (rows of ``sw`` phases of ``Wq`` positions of ``step`` elements)."""
    toff = np.empty(KH * KW, np.int64)
    for kh in range(KH):
        for kw in range(KW):
            a = kw * dw
            toff[kh * KW + kw] = ((kh * dh * sw + a % sw) * Wq + a // sw) * step
    return toff


@njit(**_JIT)
def _forward_plan(KH, KW, sh, sw, dh, dw, OH, OW, Hp, Wq, Cg, Kg, uh, uw, th, tw, nb):
    """The order in which a forward task visits its (tap, input channel) steps and output positions.

    Plain forward (``uh == uw == 1``): one phase, every step, the positions in order. Spread input (the strided
    input gradient: the output gradient at every ``uh``-th row and ``uw``-th column of a zero plane, padded by
    ``th, tw`` before): an output position of row phase ``a = oh % uh`` reads a non-zero row through tap row
    ``kh`` only where ``(a + kh * dh - th) % uh == 0`` (likewise in columns), so each of the ``uh * uw`` phases
    runs its own steps (each tap belongs to exactly one phase) over its own positions: no multiply-adds of the
    spread's zeros.

    Returns ``steps`` (T * Cg,) the packed-input offset of each step, phase-major; ``wplaces`` (T * Cg,) where
    the weight vectors of (input channel ``c``, tap ``t``) go (index ``c * T + t``: the weights' own order);
    ``phase_steps``, ``phase_pos`` (phases + 1,) where each phase's steps and positions (per image) start;
    ``poff`` (nb * OH * OW,) the packed-input offset of each position in visiting order (phase, image,
    position); ``rows`` (nb * OH * OW,) where output pixel ``i * OH * OW + oh * OW + ow`` lies in the
    visiting-ordered result (times ``Kg * 8``)."""
    T = KH * KW
    step = Cg * LANES
    ostep = Kg * LANES
    toff = _tap_offsets(KH, KW, sw, dh, dw, Wq, step)
    nph = uh * uw
    tap_phase = np.empty(T, np.int64)
    for kh in range(KH):
        for kw in range(KW):
            tap_phase[kh * KW + kw] = ((th - kh * dh) % uh) * uw + (tw - kw * dw) % uw
    steps = np.empty(T * Cg, np.int64)
    wplaces = np.empty(T * Cg, np.int64)
    phase_steps = np.zeros(nph + 1, np.int64)
    s = 0
    for ph in range(nph):
        phase_steps[ph] = s
        for t in range(T):
            if tap_phase[t] == ph:
                for c in range(Cg):
                    steps[s] = toff[t] + c * LANES
                    wplaces[c * T + t] = s * ostep
                    s += 1
    phase_steps[nph] = s
    P = OH * OW
    image = (Hp * sw * Wq + 1) * step  # an image's positions and its spare (see _forward_lanes)
    phase_pos = np.zeros(nph + 1, np.int64)
    for ph in range(nph):
        a = ph // uw
        b = ph - a * uw
        phase_pos[ph + 1] = phase_pos[ph] + ((OH - a + uh - 1) // uh) * ((OW - b + uw - 1) // uw)
    poff = np.empty(nb * P, np.int64)
    rows = np.empty(nb * P, np.int64)
    for ph in range(nph):
        a = ph // uw
        b = ph - a * uw
        count = phase_pos[ph + 1] - phase_pos[ph]
        for i in range(nb):
            m = nb * phase_pos[ph] + i * count
            for oh in range(a, OH, uh):
                for ow in range(b, OW, uw):
                    poff[m] = i * image + (oh * sh * sw * Wq + ow) * step
                    rows[i * P + oh * OW + ow] = m * ostep
                    m += 1
    return steps, wplaces, phase_steps, phase_pos, poff, rows


@njit(**_JIT)
def _pack_weights(w, g0, cnt, Kg, Cg, T, bias, wplaces, wts, bvec):
    """One block's weights, ``wts[wplaces[c * T + t] + j * 8 + lane] = w[(g0 + lane) * Kg + j, c, t]`` (lanes past
    ``cnt`` repeat the last group), by 8x8 transposes; its bias vectors ``bvec[j * 8 + lane]``."""
    CT = Cg * T
    for j in range(Kg):
        _pack(w, (g0 * Kg + j) * CT, Kg * CT, cnt, CT, wts, wplaces, j * LANES)
        for lane in range(LANES):
            bvec[j * LANES + lane] = bias[(g0 + min(lane, cnt - 1)) * Kg + j]


@parallel.kernel(work_arg=0, compute=True, **_JIT)
def _forward_lanes(x, N, C, H, W, w, bias, K, G, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW, uh, uw, nb, y):
    """The forward, a task per (block of eight groups, block of ``nb`` images): pack the block's weights and
    images, run the tiles phase by phase (:func:`_forward_plan`), unpack.

    x (N*C*H*W,) flat NCHW; w (K*Cg*KH*KW,) flat; bias (K,); y (N*K*OH*OW,) written. Padding before ``ph, pw``
    (>= 0), after implied by the output size. ``uh, uw > 1`` (stride 1 only): the input spread to every
    ``uh``-th row and ``uw``-th column of a zero plane (the strided input gradient)."""
    Cg = C // G
    Kg = K // G
    T = KH * KW
    HW = H * W
    P = OH * OW
    Hp = (OH - 1) * sh + (KH - 1) * dh + 1
    Wq = OW + ((KW - 1) * dw) // sw
    step = Cg * LANES
    ostep = Kg * LANES
    # each image's packed positions, then its own spare position: where channel_block_places sends the input
    # positions no window reads (with the spare after the last image only, an image's unread positions would land
    # on the next image's first position, padding that must stay zero)
    image = (Hp * sw * Wq + 1) * step
    nblocks = (G + LANES - 1) // LANES
    nimg = (N + nb - 1) // nb
    nph = uh * uw
    for task in prange(nblocks * nimg):
        blk = task // nimg
        n0 = (task - blk * nimg) * nb
        n1 = min(N, n0 + nb)
        g0 = blk * LANES
        cnt = min(LANES, G - g0)
        steps, wplaces, phase_steps, phase_pos, poff, rows = _forward_plan(KH, KW, sh, sw, dh, dw, OH, OW, Hp, Wq,
                                                                           Cg, Kg, uh, uw, ph, pw, nb)
        wts = np.empty(T * Cg * ostep, y.dtype)
        bvec = np.empty(ostep, y.dtype)
        _pack_weights(w, g0, cnt, Kg, Cg, T, bias, wplaces, wts, bvec)
        # the padding is never written
        xp = np.zeros((n1 - n0) * image, y.dtype)
        places = channel_block_places(H, W, Hp, min(H, Hp - ph), ph, pw, sw, Wq, uh, uw, step)
        for n in range(n0, n1):
            for c in range(Cg):
                _pack(x, (n * C + g0 * Cg + c) * HW, Cg * HW, cnt, HW, xp, places, (n - n0) * image + c * LANES)
        out = np.empty(nb * P * ostep, y.dtype)
        for f in range(nph):
            s0 = phase_steps[f]
            ns = phase_steps[f + 1] - s0
            m = nb * phase_pos[f]
            mend = m + (n1 - n0) * (phase_pos[f + 1] - phase_pos[f])
            sv = steps[s0:]
            for j0 in range(0, Kg, LANES):
                wj = wts[s0 * ostep + j0 * LANES:]
                bj = bvec[j0 * LANES:]
                mm = m
                while mm + TILE <= mend:
                    _forward3(xp, poff, mm, sv, ns, wj, ostep, bj, out, mm * ostep + j0 * LANES, ostep)
                    mm += TILE
                while mm < mend:
                    _forward1(xp, poff, mm, sv, ns, wj, ostep, bj, out, mm * ostep + j0 * LANES, ostep)
                    mm += 1
        for n in range(n0, n1):
            for j in range(Kg):
                _unpack(out, rows[(n - n0) * P:], j * LANES, P, y, (n * K + g0 * Kg + j) * P, Kg * P, cnt)


@parallel.kernel(work_arg=0, compute=True, **_JIT)
def _grad_weight_lanes(x, N, C, H, W, go, K, G, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw, nb, nsplit, partial):
    """The weight gradient's partial sums, a task per (block of eight groups, one of ``nsplit`` parts of the
    batch), each over its part in blocks of ``nb`` images.

    x (N*C*H*W,) and go (N*K*OH*OW,) flat NCHW; partial (nblocks * nsplit, T * Cg * Kg * 8) written: row
    ``blk * nsplit + s`` holds, at ``((t * Cg + c) * Kg + j) * 8 + lane``, the sum over its images and output
    positions of ``go[n, (g0 + lane) * Kg + j, pos] * x_padded[n, (g0 + lane) * Cg + c, pos + tap t]``."""
    Cg = C // G
    Kg = K // G
    T = KH * KW
    HW = H * W
    P = OH * OW
    Hp = (OH - 1) * sh + (KH - 1) * dh + 1
    Wq = OW + ((KW - 1) * dw) // sw
    step = Cg * LANES
    gstep = Kg * LANES
    image = (Hp * sw * Wq + 1) * step  # with its own spare position, as in _forward_lanes
    nblocks = partial.shape[0] // nsplit
    for task in prange(nblocks * nsplit):
        blk = task // nsplit
        s = task - blk * nsplit
        na = s * N // nsplit
        nz = (s + 1) * N // nsplit
        g0 = blk * LANES
        cnt = min(LANES, G - g0)
        acc = partial[task]
        acc[:] = 0
        toff = _tap_offsets(KH, KW, sw, dh, dw, Wq, step)
        poff = np.empty(nb * P, np.int64)
        for i in range(nb):
            for oh in range(OH):
                for ow in range(OW):
                    poff[i * P + oh * OW + ow] = i * image + (oh * sh * sw * Wq + ow) * step
        xp = np.zeros(nb * image, x.dtype)
        gp = np.empty(nb * P * gstep, x.dtype)
        places = channel_block_places(H, W, Hp, min(H, Hp - ph), ph, pw, sw, Wq, 1, 1, step)
        gplaces = np.arange(P) * gstep
        for n0 in range(na, nz, nb):
            n1 = min(nz, n0 + nb)
            for n in range(n0, n1):
                for c in range(Cg):
                    _pack(x, (n * C + g0 * Cg + c) * HW, Cg * HW, cnt, HW, xp, places, (n - n0) * image + c * LANES)
                for j in range(Kg):
                    _pack(go, (n * K + g0 * Kg + j) * P, Kg * P, cnt, P, gp, gplaces, (n - n0) * P * gstep + j * LANES)
            npos = (n1 - n0) * P
            for t in range(T):
                for j0 in range(0, Kg, LANES):
                    gj = gp[j0 * LANES:]
                    c = 0
                    while c + TILE <= Cg:
                        _grad_weight3(xp, poff, npos, toff[t] + c * LANES, gj, gstep, acc,
                                      ((t * Cg + c) * Kg + j0) * LANES, gstep)
                        c += TILE
                    if c + 2 <= Cg:
                        _grad_weight2(xp, poff, npos, toff[t] + c * LANES, gj, gstep, acc,
                                      ((t * Cg + c) * Kg + j0) * LANES, gstep)
                        c += 2
                    if c < Cg:
                        _grad_weight1(xp, poff, npos, toff[t] + c * LANES, gj, gstep, acc,
                                      ((t * Cg + c) * Kg + j0) * LANES, gstep)


@njit(**_JIT)
def _sum_partials(partial, nsplit, G, Kg, Cg, T, gw):
    """``gw[(g * Kg + j) * Cg * T + c * T + t]``: each block's ``nsplit`` partial sums added in order, then
    unpacked from lanes by 8x8 transposes."""
    nblocks = partial.shape[0] // nsplit
    CT = Cg * T
    rows = np.empty(CT, np.int64)
    for c in range(Cg):
        for t in range(T):
            rows[c * T + t] = (t * Cg + c) * Kg * LANES
    for blk in range(nblocks):
        total = partial[blk * nsplit]
        for part in range(1, nsplit):
            total += partial[blk * nsplit + part]
        g0 = blk * LANES
        cnt = min(LANES, G - g0)
        for j in range(Kg):
            _unpack(total, rows, j * LANES, CT, gw, (g0 * Kg + j) * CT, Kg * CT, cnt)


def _images_per_task(N: int, nblocks: int, image_bytes: int) -> int:
    """Images per task: as many as fit :data:`TASK_BYTES`, fewer while that leaves under four tasks (two per
    thread of the two-core machines), in equal blocks."""
    nb = max(1, min(N, TASK_BYTES // max(1, image_bytes)))
    while nb > 1 and nblocks * -(-N // nb) < 4:
        nb = -(-nb // 2)
    return -(-N // -(-N // nb))


def _forward(x, w, bias, stride, padding, dilation, groups, out_spatial, spread=(1, 1)):
    """x (N, C, H, W), w (K, C // groups, KH, KW), bias (K,) or None -> (N, K, OH, OW), ``out_spatial`` (OH, OW).
    ``stride``, ``padding`` (before; >= 0), ``dilation``: pairs. ``spread`` (stride 1 only): the input placed at
    every ``spread``-th row and column of a zero plane first (the strided input gradient)."""
    N, C, H, W = x.shape
    K, Cg, KH, KW = w.shape
    G = int(groups)
    OH, OW = out_spatial
    y = memory.empty_aligned((N, K, OH, OW), x.dtype)
    if y.size == 0:
        return y
    b = np.zeros(K, x.dtype) if bias is None else np.ascontiguousarray(bias, x.dtype)
    if x.size == 0:
        y[...] = b.reshape(1, K, 1, 1)
        return y
    nblocks = -(-G // LANES)
    sh, sw = stride
    Hp = (OH - 1) * sh + (KH - 1) * dilation[0] + 1
    Wq = OW + ((KW - 1) * dilation[1]) // sw
    nb = _images_per_task(N, nblocks, Hp * sw * Wq * Cg * LANES * x.itemsize)
    _forward_lanes(np.ascontiguousarray(x).reshape(-1), N, C, H, W, np.ascontiguousarray(w).reshape(-1), b, K, G,
                   KH, KW, sh, sw, padding[0], padding[1], dilation[0], dilation[1], OH, OW, spread[0], spread[1], nb,
                   y.reshape(-1))
    return y


def _grad_input(grad_out, w, stride, padding, dilation, groups, in_spatial):
    """grad_out (N, K, OH, OW), w (K, C // groups, KH, KW) -> grad_input (N, C, H, W), ``in_spatial`` (H, W): the
    forward of the output gradient with the flipped, group-transposed weights and padding ``(k - 1) * d - p``
    (>= 0, see :func:`refuse_reason`), spread by the stride first when strided."""
    G = int(groups)
    K, Cg, KH, KW = w.shape
    wt = w.reshape(G, K // G, Cg, KH, KW).transpose(0, 2, 1, 3, 4)[..., ::-1, ::-1]
    wt = np.ascontiguousarray(wt).reshape(G * Cg, K // G, KH, KW)
    tpad = ((KH - 1) * dilation[0] - padding[0], (KW - 1) * dilation[1] - padding[1])
    return _forward(grad_out, wt, None, (1, 1), tpad, dilation, G, in_spatial, spread=tuple(stride))


def _grad_weight(grad_out, x, stride, padding, dilation, groups, kernel_spatial):
    """grad_out (N, K, OH, OW), x (N, C, H, W) -> grad_weight (K, C // groups, KH, KW); pairs as in
    :func:`_forward`."""
    N, K, OH, OW = grad_out.shape
    C, H, W = x.shape[1:]
    G = int(groups)
    Cg, Kg = C // G, K // G
    KH, KW = kernel_spatial
    gw = np.zeros((K, Cg, KH, KW), x.dtype)
    if gw.size == 0 or grad_out.size == 0 or x.size == 0:
        return gw
    nblocks = -(-G // LANES)
    sh, sw = stride
    Hp = (OH - 1) * sh + (KH - 1) * dilation[0] + 1
    Wq = OW + ((KW - 1) * dilation[1]) // sw
    image_bytes = (Hp * sw * Wq * Cg + OH * OW * Kg) * LANES * x.itemsize
    # few blocks of groups: each block's batch in two halves (two tasks), their sums added in a fixed order
    nsplit = min(N, 2) if nblocks < 4 or nblocks % 2 else 1
    nb = max(1, min(-(-N // nsplit), TASK_BYTES // image_bytes))
    partial = np.empty((nblocks * nsplit, KH * KW * Cg * Kg * LANES), x.dtype)
    _grad_weight_lanes(np.ascontiguousarray(x).reshape(-1), N, C, H, W, np.ascontiguousarray(grad_out).reshape(-1),
                       K, G, OH, OW, KH, KW, sh, sw, padding[0], padding[1], dilation[0], dilation[1], nb, nsplit,
                       partial)
    _sum_partials(partial, nsplit, G, Kg, Cg, KH * KW, gw.reshape(-1))
    return gw


# Entry points: 5-D arrays (N, C, 1, H, W) and 3-tuples as in :mod:`.conv` (a 1-D conv has H == 1).

def forward(x, w, bias, stride, padding, dilation, groups, out_spatial):
    """x: (N, C, 1, H, W); w: (K, C // groups, 1, KH, KW); bias: (K,) or None -> (N, K, 1, OH, OW)."""
    config.sync_threads()
    stride, padding, dilation, out_spatial = map(int_tuple, (stride, padding, dilation, out_spatial))
    return _forward(x[:, :, 0], w[:, :, 0], bias, stride[1:], padding[1:], dilation[1:], groups,
                    out_spatial[1:])[:, :, None]


def grad_input(grad_out, w, stride, padding, dilation, groups, in_spatial):
    """grad_out: (N, K, 1, OH, OW); w: (K, C // groups, 1, KH, KW) -> grad_input (N, C, 1, H, W)."""
    config.sync_threads()
    stride, padding, dilation, in_spatial = map(int_tuple, (stride, padding, dilation, in_spatial))
    return _grad_input(grad_out[:, :, 0], w[:, :, 0], stride[1:], padding[1:], dilation[1:], groups,
                       in_spatial[1:])[:, :, None]


def grad_weight(grad_out, x, stride, padding, dilation, groups, kernel_spatial):
    """grad_out: (N, K, 1, OH, OW); x: (N, C, 1, H, W) -> grad_weight (K, C // groups, 1, KH, KW)."""
    config.sync_threads()
    stride, padding, dilation, kernel_spatial = map(int_tuple, (stride, padding, dilation, kernel_spatial))
    return _grad_weight(grad_out[:, :, 0], x[:, :, 0], stride[1:], padding[1:], dilation[1:], groups,
                        kernel_spatial[1:])[:, :, None]


def refuse_reason(kernel, groups: int, in_channels: int, out_channels: int, padding, dilation) -> str | None:
    """Why ``group_lanes`` does not run a conv, or None: 1-D and 2-D grouped convs whose groups have multiples of
    :data:`LANES` channels in and out, padding within the kernel's reach (the input gradient is a forward with
    padding ``(k - 1) * d - p``)."""
    if kernel[0] != 1:
        return f"1-D and 2-D convolutions only, got a 3-D kernel {tuple(kernel)}"
    if groups == 1:
        return "grouped convolutions only (groups > 1): dense convolutions run faster as GEMMs (im2col, winograd)"
    Cg, Kg = in_channels // groups, out_channels // groups
    if Cg % LANES or Kg % LANES:
        return (f"needs a multiple of {LANES} channels per group in and out (the {LANES} lanes of a vector are "
                f"{LANES} groups, {LANES} channels at a time); got {Cg} in and {Kg} out")
    for k, p, d in zip(kernel[1:], padding[1:], dilation[1:]):
        if p > (k - 1) * d:
            return (f"padding {tuple(padding[1:])} reaches past the kernel's extent ((k - 1) * dilation = "
                    f"{tuple((k - 1) * d for k, d in zip(kernel[1:], dilation[1:]))}): its input gradient "
                    f"runs as a forward with padding (k - 1) * dilation - padding")
    return None


def executed_multiplications(batch, in_channels, out_channels, groups, kernel, out_spatial) -> int:
    """Multiplications the forward performs: every output pixel of every output channel of whole blocks of
    :data:`LANES` groups (a last block of fewer groups computes its spare lanes too), every tap and input
    channel of its group."""
    blocks = -(-groups // LANES)
    per_group_out = out_channels // groups
    return (blocks * LANES * per_group_out * batch * int(np.prod(out_spatial)) * (in_channels // groups)
            * int(np.prod(kernel)))


# Non-finite operands: exact IEEE results, as for the other kernels (see fastconv.cpu.nonfinite). The packed
# planes read padding as stored zeros (and the spread input gradient the zeros between outputs), so a finite
# result is exact and a non-finite product always reaches a kept output (the spare lanes repeat a kept group);
# padding zeros times weights being the only pairs torch does not form, a finite weight proves the forward and the
# input gradient exact too (finite_b_suffices).
from . import nonfinite as _nonfinite  # noqa: E402

forward = _nonfinite.exact(forward, bias=True, finite_b_suffices=True)
grad_input = _nonfinite.exact(grad_input, finite_b_suffices=True)
grad_weight = _nonfinite.exact(grad_weight)
