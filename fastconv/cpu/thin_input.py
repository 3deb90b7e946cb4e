"""Dense 2-D convs of few input channels (RGB stems: 3 -> 16..64 3x3, stride 1 or 2): a forward as a bank of FIRs.

Why: with a reduction ``C*KH*KW`` of 27 the im2col GEMM is nearly all data movement (columns 9x the input, a
K x 27 GEMM per chunk that MKL runs far below its rate): MobileNet-v2's and EfficientNet's 3 -> 32 3x3 stride-2 stem
at 128x128, batch 8, took 0.76-0.84 ms against torch's 0.37, ShuffleNet's 3 -> 24 0.70 against 0.41, MobileNet-v3's
3 -> 16 0.59-0.67 against 0.20 (2 threads, torch in a clean process).

How: the input is zero-padded and split into its stride phases once (:func:`_phase_pad`: plane ``(c, jh, jw)``
holds ``x[c, jh::sh, jw::sw]`` of the padded input, ``Wq`` wide), so every tap of every output row reads a contiguous
run of its phase plane: output row ``oh`` of channel ``k`` is ``sum over taps t of w[k, t] * plane_t[oh*Wq +
offs[t] + ow]``. One register tile (:func:`_bank_tile_intrinsic`) computes up to four vectors of a row for
:data:`BANK` output channels at once: per tap a vector load per vector, shared by the bank's channels (one
broadcast weight each), so the FMAs, not the loads, set the pace; the sums start at the bias and are stored once,
straight into the NCHW result. Parallel over (image, output row).

The weight gradient reads the same phases: ``gw[k, t] = sum over images and output positions of go[n, k, oh, ow] *
plane_t[oh*Wq + offs[t] + ow]``, a dot product per (channel, tap) pair, in register tiles of :data:`BANK` channels x
:data:`BANK` taps (:func:`_dot_tile_intrinsic`: per row and vector four output-gradient and four input loads for
sixteen FMAs), lane partial sums kept per block between images and summed across lanes at the end.

Scope (:func:`applies`): dense (``groups == 1``), 2-D, reduction at most :data:`MAX_REDUCTION` (weight gradient:
:data:`MAX_GRAD_WEIGHT_REDUCTION`), dilation 1, every
stride, any padding >= 0, float32 and float64. The input gradient stays on im2col's paths (a stem's input needs
none).

Measured (2 threads, same process alternating with im2col's previous route, forward ms, batch 8 at 128x128): 3 -> 32
3x3 stride 2 0.68-0.69 -> 0.50 (torch 0.37 in a clean process), 3 -> 16 0.54-0.55 -> 0.40 (torch 0.20), 3 -> 24
0.61 -> 0.45 (torch 0.41), VGG's 3 -> 64 stride 1 4.8-5.5 -> 3.2-3.3; at 224x224 3 -> 32 stride 2 1.87 -> 1.19-1.49;
batch 1 3 -> 32 0.13-0.14 -> 0.10-0.11, 3 -> 16 0.15 -> 0.09; a 1-D 1 -> 32 80-tap stride-4 conv over 16000 samples
1.26-1.28 -> 0.70. Of a 3 -> 32 stride-2 call's 0.5 ms the phase split takes 0.12 (the stride-2 pair loop; 0.4 with
a test and a signed index per element) and the tiles 0.2 (their FMAs' rate). Converted models, same process
alternating with / without, batch 1 / batch 8 / training step: MobileNet-v2 0.998 / 0.999 / 0.988, MobileNet-v3
0.989 / 1.000 / 0.999, EfficientNet-B0 0.993 / 0.986 / 0.982, ShuffleNet 0.992 / 0.996 / 0.988-1.028, RegNet 0.993 /
0.980 / 0.997, VGG-11 0.990 / 0.996 / 1.003 (a stem is 1-2% of these models' time). Weight gradient ms, im2col's
previous route / here, batch 8: 3 -> 32 stride 2 0.89 / 0.71 (torch 0.39-0.41), 3 -> 16 0.70 / 0.49 (torch 0.22),
3 -> 24 0.78 / 0.59, VGG's 3 -> 64 stride 1 3.35 / 2.71, at 224x224 2.18 / 2.03; batch 2 and 4 0.72-0.90x; batch 1
3 -> 16 0.19 / 0.12 but 3 -> 32 0.146 / 0.173 (too little work for the 2-thread region). Training steps, same process
alternating with / without it: 0.97-1.02 (MobileNet-v2/v3, EfficientNet-B0, ShuffleNet, RegNet: within the noise).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from fastconv import config

from . import memory, micro_gemm, parallel

__all__ = ["applies", "forward", "grad_weight", "workspace_bytes", "MAX_REDUCTION", "MAX_GRAD_WEIGHT_REDUCTION",
           "MIN_ROW_VECTORS",
           "WHOLE_VECTOR_ROWS", "BANK", "ENABLED", "GRAD_WEIGHT"]

_JIT = dict(cache=config.CACHE, nogil=True)

#: Largest reduction ``C*KH*KW`` the forward takes: RGB 3x3 (27), 5x5 (75) and 7x7 (147) stems. Measured on the
#: 3 -> 64 7x7 stride-2 stem, 2 threads, same process alternating, forward ms im2col's taps kernel / here (torch):
#: batch 8 at 128x128 3.64-3.79 / 3.42-3.51 (2.5-3.0), at 224x224 11.05-11.33 / 9.42-9.61 (8.2-10.3), batch 1 at
#: 224x224 1.71 / 1.53 (1.0-1.1), at 128x128 0.70-0.86 / 0.52 (0.36-0.42).
MAX_REDUCTION = 150
#: ... and the weight gradient: its dot-product tiles lose to im2col's gather kernel on the 7x7 stem (weight
#: gradient ms, same runs: 3.57-3.72 / 4.60-4.63 at batch 8 128x128, 10.6-11.1 / 13.3-13.6 at 224x224, 1.5-1.6 /
#: 2.5-2.7 at batch 1), so it keeps the 3x3 and 5x5 stems only.
MAX_GRAD_WEIGHT_REDUCTION = 80
#: Output channels per register tile: each tap's input vectors are loaded once for this many channels.
BANK = 4
#: Whether :func:`applies` says yes at all (tests and A/B measurements switch it off).
ENABLED = True
#: Whether im2col's weight gradient takes :func:`grad_weight` where :func:`applies` says yes.
GRAD_WEIGHT = True


#: Fewest vectors in an output row (LeNet-5's 1 -> 6 5x5 at 28 columns ran 0.18 ms against im2col's 0.12 at batch
#: 8) ...
MIN_ROW_VECTORS = 2
#: ... and rows of whole vectors only (tests switch it off to reach the tails): the part of a row beyond its last
#: whole vector is summed element by element, at a sixteenth of the tiles' rate. Batch 8, 3 -> 32 3x3 stride 2,
#: forward / weight gradient ms, im2col / here: 63 columns 0.70 / 2.26 and 0.71 / 3.34, 60 columns 0.65 / 1.82 and
#: 0.71 / 2.78, 50 columns 0.49 / 0.54 and 0.50 / 0.88 (64 columns: 0.68 / 0.50 and 0.89 / 0.71).
WHOLE_VECTOR_ROWS = True


def applies(groups: int, in_channels: int, kernel, stride, dilation, in_spatial, out_spatial, padding,
            itemsize: int, pass_: str = "forward") -> bool:
    """Whether :func:`forward` and :func:`grad_weight` run this conv (3-D shapes ``(D, H, W)`` as :mod:`.conv` passes
    them): dense, 2-D,
    reduction ``C*KH*KW`` at most :data:`MAX_REDUCTION` (:data:`MAX_GRAD_WEIGHT_REDUCTION` for ``pass_``
    ``"grad_weight"``), overlapping windows (a patchify conv's columns are a plain
    reshuffle: ConvNeXt's 3 -> 96 4x4 stride 4 ran 0.71 ms here against 0.64), dilation 1, padding >= 0, output
    rows of at least :data:`MIN_ROW_VECTORS` whole vectors (:data:`WHOLE_VECTOR_ROWS`)."""
    KD, KH, KW = kernel
    return (ENABLED and groups == 1 and KD == 1 and in_spatial[0] == 1 and out_spatial[0] == 1
            and tuple(dilation) == (1, 1, 1) and KH * KW > 1
            and in_channels * KH * KW <= (MAX_GRAD_WEIGHT_REDUCTION if pass_ == "grad_weight" else MAX_REDUCTION)
            and (KH > stride[1] or KW > stride[2]) and min(padding) >= 0
            and out_spatial[2] * itemsize >= MIN_ROW_VECTORS * micro_gemm.VECTOR_BYTES
            and not (WHOLE_VECTOR_ROWS and out_spatial[2] * itemsize % micro_gemm.VECTOR_BYTES))


def _bank_tile_intrinsic(vectors: int, bank: int):
    """An intrinsic ``tile(src, src_base, offs, wts, w_base, T, bias, k0, out, out_base, out_step)``: for the
    ``bank`` channels ``q``, ``out[out_base + q*out_step + j] = bias[k0 + q] + sum over t < T of wts[w_base + q*T +
    t] * src[src_base + offs[t] + j]`` for ``j < vectors * W`` (``W`` elements per vector). No bounds checks: the
    caller's indices are exact."""

    @intrinsic
    def tile(typingctx, src, src_base, offs, wts, w_base, T, bias, k0, out, out_base, out_step):
        signature = types.void(src, types.intp, offs, wts, types.intp, types.intp, bias, types.intp, out,
                               types.intp, types.intp)
        dtype = out.dtype

        def codegen(context, builder, sig, args):
            (src_v, src_base_v, offs_v, wts_v, w_base_v, T_v, bias_v, k0_v, out_v, out_base_v,
             out_step_v) = args
            itemsize, width, vector, fma, zero, splat = micro_gemm.vector_ir(context, builder, dtype)
            intp = context.get_value_type(types.intp)

            def data(i, value):
                return context.make_array(sig.args[i])(context, builder, value).data

            src_ptr = builder.gep(data(0, src_v), [src_base_v])
            offs_ptr = data(2, offs_v)
            wts_ptr = builder.gep(data(3, wts_v), [w_base_v])
            bias_ptr = builder.gep(data(6, bias_v), [k0_v])
            out_ptr = builder.gep(data(8, out_v), [out_base_v])
            initial = []
            for q in range(bank):
                b = splat(builder.load(builder.gep(bias_ptr, [ir.Constant(intp, q)])))
                initial.extend([b] * vectors)

            def step(t, accumulators):
                row = builder.gep(src_ptr, [builder.load(builder.gep(offs_ptr, [t]))])
                loaded = [builder.load(builder.bitcast(builder.gep(row, [ir.Constant(intp, v * width)]),
                                                       vector.as_pointer()), align=itemsize)
                          for v in range(vectors)]
                updated = []
                for q in range(bank):
                    w_index = builder.add(builder.mul(ir.Constant(intp, q), T_v), t)
                    weight = splat(builder.load(builder.gep(wts_ptr, [w_index])))
                    for v in range(vectors):
                        updated.append(builder.call(fma, [weight, loaded[v], accumulators[q * vectors + v]]))
                return updated

            results = micro_gemm.register_loop(builder, intp, T_v, initial, step, "bank")
            for q in range(bank):
                base = builder.gep(out_ptr, [builder.mul(ir.Constant(intp, q), out_step_v)])
                for v in range(vectors):
                    ptr = builder.bitcast(builder.gep(base, [ir.Constant(intp, v * width)]), vector.as_pointer())
                    builder.store(results[q * vectors + v], ptr, align=itemsize)
            return context.get_dummy_value()

        return signature, codegen

    return tile


def _row_walker(bank: int):
    """An njit ``walk(src, sb, offs, wts, T, bias, k, out, ob, step, OW, W) -> j``: the whole vectors of one output
    row of ``bank`` channels from ``k`` on the 4-, 2- and 1-vector tiles; returns the columns done."""
    tile4, tile2, tile1 = (_bank_tile_intrinsic(v, bank) for v in (4, 2, 1))

    @njit(inline="always", **_JIT)
    def walk(src, sb, offs, wts, T, bias, k, out, ob, step, OW, W):
        j = 0
        while j + 4 * W <= OW:
            tile4(src, sb + j, offs, wts, k * T, T, bias, k, out, ob + j, step)
            j += 4 * W
        if j + 2 * W <= OW:
            tile2(src, sb + j, offs, wts, k * T, T, bias, k, out, ob + j, step)
            j += 2 * W
        if j + W <= OW:
            tile1(src, sb + j, offs, wts, k * T, T, bias, k, out, ob + j, step)
            j += W
        return j

    return walk


_bank_row = _row_walker(BANK)
_single_row = _row_walker(1)


@njit(inline="always", **_JIT)
def _row(src, sb, offs, wts, T, bias, k, kb, out, ob, step, OW, W):
    """One output row of ``kb`` (``BANK`` or 1) channels from ``k``: the register tiles, then the last partial
    vector element by element."""
    if kb == BANK:
        j = _bank_row(src, sb, offs, wts, T, bias, k, out, ob, step, OW, W)
    else:
        j = _single_row(src, sb, offs, wts, T, bias, k, out, ob, step, OW, W)
    for q in range(kb):
        for jj in range(j, OW):
            s = bias[k + q]
            for t in range(T):
                s += wts[(k + q) * T + t] * src[sb + offs[t] + jj]
            out[ob + q * step + jj] = s


@parallel.kernel(always=True, **_JIT)
def _forward_rows(xq, per_image, offs, wts, bias, K, OH, OW, Wq, y):
    """``y`` (flat, (N, K, OH, OW)) from the phase planes ``xq`` (flat, ``per_image`` elements an image): task
    ``(n, oh)`` computes that output row for every channel, ``BANK`` channels a tile."""
    N = y.shape[0] // (K * OH * OW)
    T = offs.shape[0]
    W = micro_gemm.VECTOR_BYTES // y.itemsize
    step = OH * OW
    for task in prange(N * OH):
        n = task // OH
        oh = task - n * OH
        sb = n * per_image + oh * Wq
        k = 0
        while k + BANK <= K:
            _row(xq, sb, offs, wts, T, bias, k, BANK, y, (n * K + k) * step + oh * OW, step, OW, W)
            k += BANK
        while k < K:
            _row(xq, sb, offs, wts, T, bias, k, 1, y, (n * K + k) * step + oh * OW, step, OW, W)
            k += 1


def _dot_tile_intrinsic(vectors: int, bank: int, taps: int):
    """An intrinsic ``tile(go, go_base, go_pitch, xs, x_base, x_pitch, offs, t0, rows, acc)``: for the ``bank``
    channels ``q`` and ``taps`` taps ``r``, ``acc[(q*taps + r)*W .. + W] += sum over rows i < rows and vectors v <
    vectors of go[go_base + q*go_step + i*go_pitch + v*W ..] * xs[x_base + offs[t0 + r] + i*x_pitch + v*W ..]``
    lane by lane, ``go_step`` = ``rows * go_pitch`` (the channel's plane), with the partial sums in registers over
    every row (loaded from and stored back to ``acc`` once). No bounds checks: the caller's indices are exact."""

    @intrinsic
    def tile(typingctx, go, go_base, go_pitch, go_step, xs, x_base, x_pitch, offs, t0, rows, acc):
        signature = types.void(go, types.intp, types.intp, types.intp, xs, types.intp, types.intp, offs,
                               types.intp, types.intp, acc)
        dtype = acc.dtype

        def codegen(context, builder, sig, args):
            (go_v, go_base_v, go_pitch_v, go_step_v, xs_v, x_base_v, x_pitch_v, offs_v, t0_v, rows_v,
             acc_v) = args
            itemsize, width, vector, fma, zero, splat = micro_gemm.vector_ir(context, builder, dtype)
            intp = context.get_value_type(types.intp)

            def data(i, value):
                return context.make_array(sig.args[i])(context, builder, value).data

            go_ptr = builder.gep(data(0, go_v), [go_base_v])
            xs_ptr = builder.gep(data(4, xs_v), [x_base_v])
            offs_ptr = builder.gep(data(7, offs_v), [t0_v])
            acc_ptr = data(10, acc_v)

            def vec(ptr, offset):
                return builder.bitcast(builder.gep(ptr, [offset]), vector.as_pointer())

            go_rows = [builder.gep(go_ptr, [builder.mul(ir.Constant(intp, q), go_step_v)]) for q in range(bank)]
            x_rows = [builder.gep(xs_ptr, [builder.load(builder.gep(offs_ptr, [ir.Constant(intp, r)]))])
                      for r in range(taps)]
            initial = [builder.load(vec(acc_ptr, ir.Constant(intp, j * width)), align=itemsize)
                       for j in range(bank * taps)]

            def step(i, accumulators):
                go_at = builder.mul(i, go_pitch_v)
                x_at = builder.mul(i, x_pitch_v)
                updated = list(accumulators)
                for v in range(vectors):
                    column = ir.Constant(intp, v * width)
                    g = [builder.load(vec(go_rows[q], builder.add(go_at, column)), align=itemsize)
                         for q in range(bank)]
                    x = [builder.load(vec(x_rows[r], builder.add(x_at, column)), align=itemsize)
                         for r in range(taps)]
                    for q in range(bank):
                        for r in range(taps):
                            updated[q * taps + r] = builder.call(fma, [g[q], x[r], updated[q * taps + r]])
                return updated

            results = micro_gemm.register_loop(builder, intp, rows_v, initial, step, "dot")
            for j, value in enumerate(results):
                builder.store(value, vec(acc_ptr, ir.Constant(intp, j * width)), align=itemsize)
            return context.get_dummy_value()

        return signature, codegen

    return tile


def _image_walker(bank: int, taps: int):
    """An njit ``walk(go, gb, xs, xb, offs, t0, OH, OW, Wq, W, acc)``: one image's whole vectors of every row for
    ``bank`` channels x ``taps`` taps, on the 4-, 2- and 1-vector column blocks (:func:`_dot_tile_intrinsic`)."""
    tile4, tile2, tile1 = (_dot_tile_intrinsic(v, bank, taps) for v in (4, 2, 1))

    @njit(inline="always", **_JIT)
    def walk(go, gb, xs, xb, offs, t0, OH, OW, Wq, W, acc):
        step = OH * OW
        j = 0
        while j + 4 * W <= OW:
            tile4(go, gb + j, OW, step, xs, xb + j, Wq, offs, t0, OH, acc)
            j += 4 * W
        if j + 2 * W <= OW:
            tile2(go, gb + j, OW, step, xs, xb + j, Wq, offs, t0, OH, acc)
            j += 2 * W
        if j + W <= OW:
            tile1(go, gb + j, OW, step, xs, xb + j, Wq, offs, t0, OH, acc)

    return walk


_bank_by_taps = _image_walker(BANK, BANK)
_bank_by_tap = _image_walker(BANK, 1)
_channel_by_taps = _image_walker(1, BANK)
_channel_by_tap = _image_walker(1, 1)


@njit(inline="always", **_JIT)
def _image(go, gb, xs, xb, offs, t0, kb, tb, OH, OW, Wq, W, acc):
    """One image's contribution for ``kb`` channels x ``tb`` taps (each ``BANK`` or 1)."""
    if kb == BANK and tb == BANK:
        _bank_by_taps(go, gb, xs, xb, offs, t0, OH, OW, Wq, W, acc)
    elif kb == BANK:
        _bank_by_tap(go, gb, xs, xb, offs, t0, OH, OW, Wq, W, acc)
    elif tb == BANK:
        _channel_by_taps(go, gb, xs, xb, offs, t0, OH, OW, Wq, W, acc)
    else:
        _channel_by_tap(go, gb, xs, xb, offs, t0, OH, OW, Wq, W, acc)


@parallel.kernel(always=True, **_JIT)
def _grad_weight_blocks(go, xs, per_image, offs, K, OH, OW, Wq, accs, gw):
    """``gw`` (flat, (K, T)) ``[k, t] = sum over images n, rows oh, columns ow of go[n, k, oh, ow] * xs[n*per_image
    + offs[t] + oh*Wq + ow]``. A task takes a block of ``BANK`` output channels (the last ones one at a time) and,
    image by image, every block of ``BANK`` taps (the last ones one at a time): the image's output gradient rows of
    the block (``BANK`` planes) stay in cache while every tap block reads them. Each (channel block, tap block)'s
    lane partial sums live in ``accs[task, tap block]`` (``BANK*BANK*W`` long) between images."""
    T = offs.shape[0]
    N = go.shape[0] // (K * OH * OW)
    W = micro_gemm.VECTOR_BYTES // gw.itemsize
    tblocks = -(-T // BANK)
    full = OW // W * W
    for task in prange(-(-K // BANK)):
        k0 = task * BANK
        kend = min(K, k0 + BANK)
        kb = BANK if kend - k0 == BANK else 1
        for k in range(k0, kend, kb):
            for m in range(accs.shape[1] * accs.shape[2]):
                accs[task].reshape(accs.shape[1] * accs.shape[2])[m] = 0
            for n in range(N):
                gb = (n * K + k) * OH * OW
                xb = n * per_image
                for tblock in range(tblocks):
                    t0 = tblock * BANK
                    tend = min(T, t0 + BANK)
                    tb = BANK if tend - t0 == BANK else 1
                    for t in range(t0, tend, tb):
                        # one slot per tap block: a block of singles keeps each single's sums at its own offset
                        acc = accs[task, tblock, (t - t0) * kb * W:]
                        _image(go, gb, xs, xb, offs, t, kb, tb, OH, OW, Wq, W, acc)
            for tblock in range(tblocks):
                t0 = tblock * BANK
                tend = min(T, t0 + BANK)
                tb = BANK if tend - t0 == BANK else 1
                for t in range(t0, tend, tb):
                    acc = accs[task, tblock, (t - t0) * kb * W:]
                    for q in range(kb):
                        for r in range(tb):
                            s = acc[(q * tb + r) * W]
                            for lane in range(1, W):
                                s += acc[(q * tb + r) * W + lane]
                            # the columns beyond the last whole vector, element by element
                            for n in range(N):
                                g0 = (n * K + k + q) * OH * OW
                                x0 = n * per_image + offs[t + r]
                                for oh in range(OH):
                                    for ow in range(full, OW):
                                        s += go[g0 + oh * OW + ow] * xs[x0 + oh * Wq + ow]
                            gw[(k + q) * T + t + r] = s


@parallel.kernel(**_JIT)
def _phase_pad(x, ph, pw, sh, sw, out):
    """``out[n, c, jh, jw, mh, mw] = x[n, c, mh*sh + jh - ph, mw*sw + jw - pw]``, 0 outside ``x`` (the zero-padded
    input split into its stride phases). One (image, channel) per task; flat unsigned indices and each row's
    columns inside ``x`` computed once (a test per element, and signed indices, ran 3 cycles an element)."""
    N, C, H, W = x.shape
    Hq, Wq = out.shape[4], out.shape[5]
    xf = x.reshape(x.size)
    of = out.reshape(out.size)
    for task in prange(N * C):
        xb = task * H * W
        ob = task * sh * sw * Hq * Wq
        for jh in range(sh):
            for mh in range(Hq):
                ih = mh * sh + jh - ph
                o = ob + (jh * sw * Hq + mh) * Wq  # phase (jh, 0)'s row; phase (jh, jw)'s is jw * Hq * Wq on
                if ih < 0 or ih >= H:
                    for jw in range(sw):
                        _zeros(of, o + jw * Hq * Wq, 0, Wq)
                    continue
                row = xb + ih * W - pw  # input column iw sits at row + iw + pw
                if sw == 2:
                    # both phases in one loop over pairs of input columns (LLVM deinterleaves whole vectors)
                    lo0, hi0 = _inside(0, 2, pw, W, Wq)
                    lo1, hi1 = _inside(1, 2, pw, W, Wq)
                    lo, hi = max(lo0, lo1), max(max(lo0, lo1), min(hi0, hi1))
                    o1 = o + Hq * Wq
                    _zeros(of, o, 0, lo0)
                    _zeros(of, o1, 0, lo1)
                    _strided(of, o, xf, row, 2, lo0, lo)
                    _strided(of, o1, xf, row + 1, 2, lo1, lo)
                    for mw in range(lo, hi):
                        of[np.uint64(o + mw)] = xf[np.uint64(row + 2 * mw)]
                        of[np.uint64(o1 + mw)] = xf[np.uint64(row + 2 * mw + 1)]
                    _strided(of, o, xf, row, 2, hi, hi0)
                    _strided(of, o1, xf, row + 1, 2, hi, hi1)
                    _zeros(of, o, hi0, Wq)
                    _zeros(of, o1, hi1, Wq)
                    continue
                for jw in range(sw):
                    lo, hi = _inside(jw, sw, pw, W, Wq)
                    oj = o + jw * Hq * Wq
                    _zeros(of, oj, 0, lo)
                    _strided(of, oj, xf, row + jw, sw, lo, hi)
                    _zeros(of, oj, hi, Wq)


@njit(inline="always", **_JIT)
def _inside(jw, sw, pw, W, Wq):
    """The phase-``jw`` columns ``lo <= mw < hi`` whose input column ``mw*sw + jw - pw`` lies inside ``0 .. W``."""
    lo = min(Wq, max(0, (pw - jw + sw - 1) // sw))
    return lo, max(lo, min(Wq, (W - 1 + pw - jw) // sw + 1))


@njit(inline="always", **_JIT)
def _zeros(of, o, a, b):
    for m in range(a, b):
        of[np.uint64(o + m)] = 0


@njit(inline="always", **_JIT)
def _strided(of, o, xf, src, step, a, b):
    """``of[o + m] = xf[src + m*step]`` for ``a <= m < b``."""
    for m in range(a, b):
        of[np.uint64(o + m)] = xf[np.uint64(src + m * step)]


def _phase_shape(kernel_hw, stride_hw, out_hw) -> tuple[int, int]:
    """``(Hq, Wq)``: a phase plane's rows and columns. Output row ``oh``, tap ``(kh, kw)`` reads phase row ``oh +
    kh // sh`` from column ``kw // sw`` on: every read stays inside its plane."""
    (KH, KW), (sh, sw), (OH, OW) = kernel_hw, stride_hw, out_hw
    return OH + (KH - 1) // sh, OW + (KW - 1) // sw


def _tap_offsets(C, KH, KW, sh, sw, Hq, Wq):
    """Each tap's offset in an image's phase planes from output position (0, 0)'s, tap ``(c, kh, kw)`` at
    ``(c*KH + kh)*KW + kw``: plane ``(c, kh % sh, kw % sw)``, row ``kh // sh``, column ``kw // sw``."""
    offs = np.empty(C * KH * KW, np.int64)
    t = 0
    for c in range(C):
        for kh in range(KH):
            for kw in range(KW):
                offs[t] = ((c * sh + kh % sh) * sw + kw % sw) * Hq * Wq + (kh // sh) * Wq + kw // sw
                t += 1
    return offs


def workspace_bytes(N: int, C: int, kernel_hw, stride_hw, out_hw, itemsize: int) -> int:
    """Bytes :func:`forward` allocates besides its result: the input's padded stride phases."""
    Hq, Wq = _phase_shape(kernel_hw, stride_hw, out_hw)
    return N * C * stride_hw[0] * stride_hw[1] * Hq * Wq * itemsize


def forward(x, w, bias, stride_hw, padding_hw, out_hw, y):
    """x: (N, C, H, W), w: (K, C, KH, KW), bias (K,) or None, y: (N, K, OH, OW) C-contiguous, written. Padding
    >= 0 (before each dim; the ends follow from ``out_hw``), dilation 1."""
    N, C = x.shape[:2]
    K, _, KH, KW = w.shape
    (sh, sw), (ph, pw), (OH, OW) = stride_hw, padding_hw, out_hw
    Hq, Wq = _phase_shape((KH, KW), (sh, sw), (OH, OW))
    xq = memory.scratch("thin_input.phases", (N, C, sh, sw, Hq, Wq), x.dtype)
    _phase_pad(np.ascontiguousarray(x), ph, pw, sh, sw, xq)
    offs = _tap_offsets(C, KH, KW, sh, sw, Hq, Wq)
    wts = np.ascontiguousarray(w, x.dtype).reshape(K * C * KH * KW)
    b = np.zeros(K, x.dtype) if bias is None else np.ascontiguousarray(bias, x.dtype)
    _forward_rows(xq.reshape(xq.size), C * sh * sw * Hq * Wq, offs, wts, b, K, OH, OW, Wq, y.reshape(y.size))
    return y


def grad_weight(go, x, kernel_hw, stride_hw, padding_hw, gw):
    """go: (N, K, OH, OW), x: (N, C, H, W) C-contiguous; gw: (K, C, KH, KW) C-contiguous, written. The conv as
    :func:`forward` runs it (padding >= 0 before each dim, dilation 1)."""
    N, C = x.shape[:2]
    K, OH, OW = go.shape[1:]
    KH, KW = kernel_hw
    (sh, sw), (ph, pw) = stride_hw, padding_hw
    Hq, Wq = _phase_shape((KH, KW), (sh, sw), (OH, OW))
    xq = memory.scratch("thin_input.phases", (N, C, sh, sw, Hq, Wq), x.dtype)
    _phase_pad(np.ascontiguousarray(x), ph, pw, sh, sw, xq)
    offs = _tap_offsets(C, KH, KW, sh, sw, Hq, Wq)
    T = offs.shape[0]
    W = micro_gemm.VECTOR_BYTES // x.itemsize
    accs = memory.scratch("thin_input.lane_sums", (-(-K // BANK), -(-T // BANK), BANK * BANK * W), x.dtype)
    _grad_weight_blocks(np.ascontiguousarray(go).reshape(go.size), xq.reshape(xq.size), C * sh * sw * Hq * Wq,
                        offs, K, OH, OW, Wq, accs, gw.reshape(gw.size))
    return gw
