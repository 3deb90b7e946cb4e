"""fastconv's own single-threaded GEMM for the Numba kernels: a register-tiled AVX-512 (or AVX2) micro-kernel.

Why: the kernels' GEMMs inside their parallel regions ran on torch's MKL (:mod:`.jit_gemm`). On AMD CPUs MKL
takes its AVX2 code path: 8-wide vectors, half of what a core with 512-bit FMA units computes. Measured on this
project's machine (AMD EPYC, Zen 5, one thread, float32, GFLOP/s, this kernel / MKL's ``sgemm``): (M, K, N) =
(64, 576, 4096) 129-161 / 72-82, (128, 1152, 1024) 166-195 / 89-101, the 7x7 stem's (64, 147, 8192) 135-163 /
72-94, (256, 64, 4096) 159-203 / 85-99, (32, 1152, 1024) 147-194 / 67-85, (512, 512, 512) 183-205 / 98-106.

Transposed ``b`` (the weight gradients' ``gy @ columns^T``), same measure, this kernel / MKL: (64, 8192, 576)
166 / 90, (128, 2048, 1152) 184 / 97, (64, 32768, 147) 154 / 76, (64, 100, 64) 189 / 97, (512, 128, 4608) 188 /
102. (Dot products of rows read in place, a vector accumulator per pair of rows summed across lanes at the end,
reached 38-196: the sums across lanes and the second stream of loads cost more than packing.)

How (after the GotoBLAS/BLIS scheme, "Anatomy of High-Performance Matrix Multiplication"): ``c (M, N) = a (M, K) @ b
(K, N)`` in blocks of :data:`KC` reduction steps by :data:`MC` rows by :data:`NC` columns; the micro-kernel computes
one ``MR x NR`` tile of ``c`` from ``MR`` rows of ``a`` (broadcast one value per step; read in place, any strides:
packing them measured slower) and ``KC`` rows of ``NR`` columns of ``b`` (:func:`gemm` and :func:`gemm_taps` run their
whole 64-column panels on a wider tile, :data:`WIDE_MR` x :data:`WIDE_NV` vectors: half the broadcasts per
multiply-add, which a core that splits 512-bit operations in two runs up to a quarter faster). Its ``MR * NV``
accumulators are LLVM vector values (``NV`` vectors of 64 bytes per row: 16 float32 or 8 float64), kept in registers
across the reduction loop: the loop is written in LLVM IR (:func:`_micro_kernel`, a Numba intrinsic) because Numba's
own arrays live in memory, where the compiler cannot keep a tile of them in registers. ``b``'s panels are read where
they are when its columns are adjacent and the panel is full; the last, narrower panel is packed, zero-padded, and a
transposed ``b`` is packed by ``W x W`` blocks transposed in registers (:func:`_transpose_block`). Columns after the
last whole panel run on half-width tiles (:func:`_micro_kernel_half`, ``MR`` rows by one vector), read in place when
exactly one vector wide: a conv's 4x4 map at batch 1 is a 16-column product, which on a whole tile multiplied zero
padding for half its work and packed its panel in every task (512 x 4608 x 16 on two threads: 1431 -> 303 µs;
``torch.mm`` 507-741). :func:`gemm_taps` is the implicit GEMM of a stride-1 conv: its ``b`` rows are windows of the
padded input at each tap's offset, copied panel by panel, so no column matrix is built; :func:`gemm_gather` reads
``a`` in place through two offset tables (rows and reduction steps at listed offsets of one flat array: a conv's
im2col matrix or its transpose, straight from the padded input) against a ``b`` packed once (:func:`pack_b`). Edge
tiles (fewer than ``MR`` rows or ``NR`` columns) are computed whole into a scratch tile and copied.

On a host with AVX2 and FMA but no 512-bit vectors the tiles are built from 32-byte vectors, 6 rows by 2 vectors
(:data:`MR`): the 8 x 2 tile of 64-byte vectors needs 32 registers there and spilled. :data:`HOST_HAS_VECTOR_FMA`
says whether the kernels pay, and :mod:`.jit_gemm` routes to them only then.
"""
from __future__ import annotations

import math

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import config as numba_config
from numba import njit, types
from numba.extending import intrinsic

from fastconv import config

__all__ = ["gemm", "gemm_taps", "gemm_gather", "pack_b", "pack_b_rows", "packed_size", "transpose_into", "transpose_flat", "transpose_to_rows", "register_loop", "HOST_HAS_AVX512", "HOST_HAS_VECTOR_FMA", "VECTOR_BYTES", "MR", "NV", "WIDE_MR", "WIDE_NV", "ROW_GRAIN", "KC", "MC", "NC"]

def _host_has(*features: str) -> bool:
    """Whether Numba compiles for a CPU with all these features (the host, unless NUMBA_CPU_NAME says other)."""
    if numba_config.CPU_NAME not in (None, "", "host"):
        return all(f"+{f}" in (numba_config.CPU_FEATURES or "") for f in features)
    try:
        host = llvm.get_host_cpu_features()
    except RuntimeError:  # the host's features cannot be read
        return False
    return all(bool(host.get(f, False)) for f in features)


def _host_has_avx512() -> bool:
    """Whether Numba compiles for a CPU with 512-bit FMA vectors."""
    return _host_has("avx512f")


HOST_HAS_AVX512 = _host_has_avx512()
#: Whether the own kernels pay on this host: 512-bit vectors, or 256-bit ones with FMA (AVX2), where the tile
#: below is sized for 16 registers. On AVX2 MKL runs the same vector code, and the own kernels still won where
#: they read their operands in place (a conv's taps, 1x1 convs on small planes); see docs/performance-log.md, run AK.
HOST_HAS_VECTOR_FMA = HOST_HAS_AVX512 or _host_has("avx2", "fma")
#: The vector the tiles are built from: a 64-byte register with AVX-512, a 32-byte one else.
VECTOR_BYTES = _VECTOR_BYTES = 64 if HOST_HAS_AVX512 else 32

#: Rows of ``a`` per tile, and vectors of ``b``'s columns per tile row. AVX-512: 8 x 2 (16 accumulators of the 32
#: vector registers); measured (same shapes as above): 8 x 2 and 12 x 2 level, 6 x 4 level but wasteful on
#: channel counts that are multiples of 8, 8 x 3 slower wherever N is not a multiple of 48 (packed panels).
#: AVX2: 6 x 2 (12 accumulators of the 16 registers, the shape of BLIS's Haswell kernel; 8 x 2 as 64-byte
#: vectors, each two registers there, spilled: 89-100 GFLOP/s on two Zen 2 cores against MKL's 140-146, 6 x 2
#: 186-195 on batched 1x1-conv products, 4 x 2 level with 6 x 2).
MR = 8 if HOST_HAS_AVX512 else 6
NV = 2
#: Vectors per row of a packed panel (:func:`pack_b`'s panels are ``NR = PACKED_NV`` vectors wide).
PACKED_NV = NV
#: Whether the ``MR x NR`` tiles (and the gather kernel's) order their rows' loads with a compiler barrier between
#: rows (:func:`_emit_tile`). Without it LLVM hoisted every row's broadcast of ``a`` to the top of the reduction
#: step, for the gather tiles of two steps (their addresses all known from the step's one table load): 16-24
#: broadcasts live beside the accumulators, 26-35 stack accesses per unrolled step pair of the 8 x 2 tile and the
#: wide gather tile's accumulators spilled outright. With it: no stack access in any of those loops. Measured on the
#: AVX-512 host only (2 threads, batch 8, weight gradient / torch's): ResNet's 256 -> 256 3x3 at 8x8 1.13 -> 0.82,
#: 64 -> 128 stride 2 1.16 -> 0.85, 128 -> 128 at 16x16 1.20 -> 0.93, DenseNet's 128 -> 32 1.25 -> 0.99; the wide
#: strided tile's loop kept its registers without it and is left as it was.
ROW_BARRIERS = HOST_HAS_AVX512
#: The wide tile (AVX-512 only): ``WIDE_MR`` rows by ``WIDE_NV`` vectors (6 x 4,
#: 24 accumulators, a broadcast of ``a`` per four FMAs instead of two). Measured on a Zen 4 host (32 KB L1d,
#: 512-bit operations split in two), one thread, float32, GFLOP/s, 8 x 2 / 6 x 4 medians of 6 interleaved runs:
#: (M, K, N) = (192, 1600, 1792) 79 / 89, (256, 2304, 1024) 81 / 92, (128, 1152, 1024) 86 / 91, (64, 576, 4096)
#: 85 / 87; on a Zen 5 host 6 x 4 had measured level with 8 x 2. :func:`gemm` (in place or packed) and
#: :func:`gemm_taps` run their whole 64-column panels on it; narrower products (a DenseNet layer's 32 outputs, 4x4
#: maps) and the columns left over keep the 8 x 2 and half-width tiles; :func:`gemm_gather` runs the wide tile on
#: each pair of whole packed panels (:func:`pack_b`'s format is unchanged: the tile reads its two panels).
WIDE_MR = 6
WIDE_NV = 4 if HOST_HAS_AVX512 else 0
#: Rows a caller's split of ``a`` between tasks is a multiple of, so that no block ends in a short tile of either
#: height (24: 4 wide tiles, 3 of ``MR`` rows).
ROW_GRAIN = MR * WIDE_MR // math.gcd(MR, WIDE_MR) if WIDE_NV else MR
#: Reduction steps per block (a ``KC x NR`` panel of ``b`` is 32 KB in float32 with AVX-512: the core's L1),
#: rows of ``a`` per block (its ``MC x KC`` rows stay in L2 while the panels of ``b`` pass) and columns per block.
KC, MC, NC = 256, 96, 1024
#: Pack ``b``'s panels even when they could be read in place, where its rows lie a multiple of 2 KB apart (a
#: 32x32 or larger plane's pixels): the rows of a panel then share a handful of L1 sets and evict each other.
#: AVX2 hosts only (measured there, two Zen 2 cores: 1024^3 109 -> 157-173 GFLOP/s, ResNet's stride-2 3x3 input
#: gradient 8.6 -> 6.3 ms); the AVX-512 kernels, whose panel rows are two cache lines wide, were tuned without it.
PACK_ALIASED_B = not HOST_HAS_AVX512


def vector_ir(context, builder, dtype):
    """What every register kernel's IR needs for ``dtype`` (float32 or float64): ``(itemsize, width, vector type,
    the FMA intrinsic, a zero vector, splat)``, ``width`` elements per vector of :data:`VECTOR_BYTES`,
    ``splat(value)`` the scalar broadcast to every lane."""
    itemsize = 4 if dtype == types.float32 else 8
    width = _VECTOR_BYTES // itemsize
    scalar = context.get_value_type(dtype)
    vector = ir.VectorType(scalar, width)
    i32 = ir.IntType(32)
    fma_name = f"llvm.fma.v{width}f{itemsize * 8}"
    fma = builder.module.globals.get(fma_name) or ir.Function(
        builder.module, ir.FunctionType(vector, [vector] * 3), fma_name)
    zero = ir.Constant(vector, [ir.Constant(scalar, 0.0)] * width)
    undef = ir.Constant(vector, ir.Undefined)
    splat_mask = ir.Constant(ir.VectorType(i32, width), [0] * width)

    def splat(value):
        return builder.shuffle_vector(builder.insert_element(undef, value, ir.Constant(i32, 0)), undef, splat_mask)

    return itemsize, width, vector, fma, zero, splat


def _emit_tile(context, builder, dtype, kc_v, a_rows, a_step_at, b_ptr, ldb_v, c, c_v, i0_v, j0_v, accumulate_v,
               NV=NV, MR=MR, b_panel_step=None, row_barriers=False):
    """IR of one ``MR x NR`` tile: ``c[i0:i0+MR, j0:j0+NR] (+)= sum over p < kc of a_rows[i][a_step_at(p)] *
    b_ptr[p*ldb + j]``, the ``MR * NV`` accumulators kept in registers across the reduction loop (phi values),
    one broadcast of ``a`` per row and ``NV`` vector loads of ``b`` per step. ``a_rows``: ``MR`` element pointers
    (made before the loop); ``a_step_at(p)``: IR for step ``p``'s offset from each of them, built inside it.
    ``NV`` 1 makes the half-width tile (``MR x NR/2``) of :func:`_micro_kernel_half`; ``MR`` and ``NV``
    :data:`WIDE_MR` and :data:`WIDE_NV` the wide tile of :func:`_micro_kernel_wide`. ``b_panel_step`` (IR, elements;
    None: adjacent): ``b`` as panels of ``NR`` columns that far apart (:func:`pack_b`'s format), vector ``v`` of a
    row read from panel ``v // NV``, so a wide tile spans two packed panels. ``row_barriers``: an empty inline asm
    with a memory clobber after each row's multiply-adds, so no row's load of ``a`` is scheduled above the rows
    before it (see :data:`ROW_BARRIERS`)."""
    itemsize, width, vector, fma, zero, splat = vector_ir(context, builder, dtype)
    intp = context.get_value_type(types.intp)

    def const(v):
        return ir.Constant(intp, v)

    vectors_per_panel = PACKED_NV if b_panel_step is not None else NV
    b_panels = [b_ptr if panel == 0 else builder.gep(b_ptr, [builder.mul(b_panel_step, const(panel))])
                for panel in range(-(-NV // vectors_per_panel))]

    c_arr = context.make_array(c)(context, builder, c_v)
    ldc = builder.sdiv(builder.extract_value(c_arr.strides, 0), const(itemsize))
    c_ptr = builder.gep(c_arr.data, [builder.add(builder.mul(i0_v, ldc), j0_v)])

    # the reduction loop: accumulators are phi values, so they live in registers
    def step(p, accumulators):
        b_step = builder.mul(p, ldb_v)
        b_rows = [builder.gep(panel, [b_step]) for panel in b_panels]
        b_vectors = [builder.load(builder.bitcast(builder.gep(b_rows[v // vectors_per_panel],
                                                              [const(v % vectors_per_panel * width)]),
                                                  vector.as_pointer()), align=itemsize) for v in range(NV)]
        a_p = a_step_at(p)
        updated = []
        for i in range(MR):
            a_splat = splat(builder.load(builder.gep(a_rows[i], [a_p])))
            for v in range(NV):
                updated.append(builder.call(fma, [a_splat, b_vectors[v], accumulators[i * NV + v]]))
            if row_barriers:
                builder.asm(ir.FunctionType(ir.VoidType(), []), "", "~{memory}", [], side_effect=True)
        return updated

    results = register_loop(builder, intp, kc_v, [zero] * (MR * NV), step, "micro_kernel")

    def c_vector_pointer(i, v):
        row = builder.gep(c_ptr, [builder.mul(const(i), ldc)])
        return builder.bitcast(builder.gep(row, [const(v * width)]), vector.as_pointer())

    with builder.if_else(accumulate_v) as (add, overwrite):
        with add:
            for i in range(MR):
                for v in range(NV):
                    q = c_vector_pointer(i, v)
                    builder.store(builder.fadd(builder.load(q, align=itemsize), results[i * NV + v]), q,
                                  align=itemsize)
        with overwrite:
            for i in range(MR):
                for v in range(NV):
                    builder.store(results[i * NV + v], c_vector_pointer(i, v), align=itemsize)


def _tile_rows(builder, intp, rows_v, tile_rows: int) -> list:
    """IR of the ``a`` row each of a tile's ``tile_rows`` rows reads: ``min(i, rows - 1)``. Rows past the edge
    repeat the last one (their results are not stored), so no read leaves the operand."""
    last_row = builder.sub(rows_v, ir.Constant(intp, 1))
    return [builder.select(builder.icmp_signed("<", ir.Constant(intp, i), rows_v), ir.Constant(intp, i), last_row)
            for i in range(tile_rows)]


def _strided_micro_kernel(tile_rows: int, tile_vectors: int, row_barriers: bool):
    """The intrinsic ``(kc, a, a_offset, a_row, a_step, rows, b, b_offset, ldb, c, i0, j0, accumulate)``:
    ``c[i0:i0+R, j0:j0+W] (+)= A_panel @ B_panel`` over ``kc`` steps on a tile of ``R = tile_rows`` rows by
    ``tile_vectors`` 64-byte vectors (``W`` columns), with ``A_panel[i, p] = a[a_offset + min(i, rows - 1)*a_row +
    p*a_step]`` and ``B_panel[p, j] = b[b_offset + p*ldb + j]``: offsets in elements from the first element of ``a``
    and ``b`` (arrays or views of any rank); ``c`` is 2-D with adjacent columns. ``accumulate`` adds to ``c``, else
    overwrites it. No bounds checks: the caller's indices are exact."""

    @intrinsic
    def micro_kernel(typingctx, kc, a, a_offset, a_row, a_step, rows, b, b_offset, ldb, c, i0, j0, accumulate):
        signature = types.void(types.intp, a, types.intp, types.intp, types.intp, types.intp, b, types.intp,
                               types.intp, c, types.intp, types.intp, types.boolean)

        def codegen(context, builder, sig, args):
            kc_v, a_v, a_off, a_row_v, a_step_v, rows_v, b_v, b_off, ldb_v, c_v, i0_v, j0_v, accumulate_v = args
            intp = context.get_value_type(types.intp)
            a_ptr = builder.gep(context.make_array(a)(context, builder, a_v).data, [a_off])
            b_ptr = builder.gep(context.make_array(b)(context, builder, b_v).data, [b_off])
            a_rows = [builder.gep(a_ptr, [builder.mul(row, a_row_v)])
                      for row in _tile_rows(builder, intp, rows_v, tile_rows)]
            _emit_tile(context, builder, c.dtype, kc_v, a_rows, lambda p: builder.mul(p, a_step_v), b_ptr, ldb_v,
                       c, c_v, i0_v, j0_v, accumulate_v, NV=tile_vectors, MR=tile_rows, row_barriers=row_barriers)
            return context.get_dummy_value()

        return signature, codegen

    return micro_kernel


#: The ``MR x NR`` tile (``MR`` rows by ``NV`` vectors).
_micro_kernel = _strided_micro_kernel(MR, NV, ROW_BARRIERS)
#: The half-width tile: ``MR`` rows by one 64-byte vector (half of ``NR`` columns), for the last columns of a
#: product narrower than a whole tile (a conv's 4x4 output at batch 1 is 16 columns): a whole tile there multiplies
#: zero padding for half its work, and its panel must be packed first.
_micro_kernel_half = _strided_micro_kernel(MR, 1, ROW_BARRIERS)
#: The wide tile: :data:`WIDE_MR` rows by :data:`WIDE_NV` vectors.
_micro_kernel_wide = _strided_micro_kernel(WIDE_MR, WIDE_NV, False)


def _gather_micro_kernel(tile_rows: int, tile_vectors: int):
    """The intrinsic ``(kc, a, a_base, row_off, r0, rows, step_off, s0, b, b_offset, ldb, b_panel_step, c, i0, j0,
    accumulate)``: the tile of :func:`_strided_micro_kernel` with ``A_panel[i, p] = a[a_base + row_off[r0 + min(i,
    rows - 1)] + step_off[s0 + p]]``: both the rows and the steps of ``a`` at listed offsets (int64 tables), so a
    conv's ``a`` (output positions x taps, or taps x positions) is read straight from its zero-padded input, no
    columns and no copies; ``b`` packed panels of ``NR`` columns ``b_panel_step`` elements apart (a wide tile reads
    two)."""

    @intrinsic
    def micro_kernel(typingctx, kc, a, a_base, row_off, r0, rows, step_off, s0, b, b_offset, ldb, b_panel_step, c,
                     i0, j0, accumulate):
        signature = types.void(types.intp, a, types.intp, row_off, types.intp, types.intp, step_off, types.intp, b,
                               types.intp, types.intp, types.intp, c, types.intp, types.intp, types.boolean)

        def codegen(context, builder, sig, args):
            (kc_v, a_v, a_base_v, row_off_v, r0_v, rows_v, step_off_v, s0_v, b_v, b_off, ldb_v, panel_step_v, c_v,
             i0_v, j0_v, accumulate_v) = args
            intp = context.get_value_type(types.intp)
            a_ptr = builder.gep(context.make_array(a)(context, builder, a_v).data, [a_base_v])
            b_ptr = builder.gep(context.make_array(b)(context, builder, b_v).data, [b_off])
            rows_table = builder.gep(context.make_array(row_off)(context, builder, row_off_v).data, [r0_v])
            steps_table = builder.gep(context.make_array(step_off)(context, builder, step_off_v).data, [s0_v])
            a_rows = [builder.gep(a_ptr, [builder.load(builder.gep(rows_table, [row]))])
                      for row in _tile_rows(builder, intp, rows_v, tile_rows)]
            _emit_tile(context, builder, c.dtype, kc_v, a_rows,
                       lambda p: builder.load(builder.gep(steps_table, [p])), b_ptr, ldb_v, c, c_v, i0_v, j0_v,
                       accumulate_v, NV=tile_vectors, MR=tile_rows, b_panel_step=panel_step_v,
                       row_barriers=ROW_BARRIERS)
            return context.get_dummy_value()

        return signature, codegen

    return micro_kernel


#: The gather kernel's tiles: ``MR x NR`` on one packed panel, the half-width tile (``MR`` rows by one vector) on a
#: last panel at most half full, and the wide tile on two.
_micro_kernel_gather = _gather_micro_kernel(MR, NV)
_micro_kernel_gather_half = _gather_micro_kernel(MR, 1)
_micro_kernel_gather_wide = _gather_micro_kernel(WIDE_MR, WIDE_NV)


_JIT = dict(cache=config.CACHE, nogil=True)


def register_loop(builder, intp, count, initial, body, name):
    """Emit ``for i in range(count): values = body(i, values)`` with ``values`` (a flat list of vectors) held in
    registers as phis; returns the final values (``initial`` when ``count <= 0``). The register tiles' shared
    skeleton (:func:`_emit_tile`, :mod:`.fir`, :mod:`.group_lanes`): a counter phi, a phi per accumulator, and the exit phis merging
    the no-iteration path. ``body(i, values)`` emits one step at the builder's position and returns the new
    values; ``name`` labels the loop's blocks."""
    entry = builder.block
    loop = builder.function.append_basic_block(f"{name}_loop")
    done = builder.function.append_basic_block(f"{name}_done")
    builder.cbranch(builder.icmp_signed(">", count, ir.Constant(intp, 0)), loop, done)
    builder.position_at_end(loop)
    i = builder.phi(intp)
    i.add_incoming(ir.Constant(intp, 0), entry)
    current = []
    for value in initial:
        phi = builder.phi(value.type)
        phi.add_incoming(value, entry)
        current.append(phi)
    updated = body(i, current)
    i_next = builder.add(i, ir.Constant(intp, 1))
    loop_end = builder.block
    i.add_incoming(i_next, loop_end)
    for phi, value in zip(current, updated):
        phi.add_incoming(value, loop_end)
    builder.cbranch(builder.icmp_signed("<", i_next, count), loop, done)
    builder.position_at_end(done)
    results = []
    for start, value in zip(initial, updated):  # (every phi first: LLVM wants them at the top of the block)
        phi = builder.phi(start.type)
        phi.add_incoming(start, entry)
        phi.add_incoming(value, loop_end)
        results.append(phi)
    return results


def transposed_rows(builder, rows):
    """IR for a ``W x W`` transpose of ``W`` vector values (row ``r`` = ``rows[r]``) in registers: stage ``s`` (W/2,
    ..., 1) swaps the off-diagonal ``s x s`` blocks of every ``2s x 2s`` block with two-vector shuffles; after the
    last stage value ``q`` holds column ``q``."""
    width = len(rows)
    i32 = ir.IntType(32)
    s = width // 2
    while s >= 1:
        low_mask = ir.Constant(ir.VectorType(i32, width), [c if c & s == 0 else width + (c ^ s) for c in range(width)])
        high_mask = ir.Constant(ir.VectorType(i32, width), [(c ^ s) if c & s == 0 else width + c for c in range(width)])
        swapped = list(rows)
        for r in range(width):
            if r & s == 0:
                swapped[r] = builder.shuffle_vector(rows[r], rows[r + s], low_mask)
                swapped[r + s] = builder.shuffle_vector(rows[r], rows[r + s], high_mask)
        rows = swapped
        s //= 2
    return rows


def _transposed_block_ir(context, builder, dtype, src_type, src_v, src_off, lds_v):
    """IR shared by the block transposes: the ``W`` vectors ``src[src_offset + r*lds : ... + W]`` loaded and
    transposed in registers (:func:`transposed_rows`). Returns (columns, vector type, itemsize, intp type)."""
    itemsize = 4 if dtype == types.float32 else 8
    width = _VECTOR_BYTES // itemsize
    vector = ir.VectorType(context.get_value_type(dtype), width)
    intp = context.get_value_type(types.intp)
    src_ptr = builder.gep(context.make_array(src_type)(context, builder, src_v).data, [src_off])
    loaded = [builder.load(builder.bitcast(builder.gep(src_ptr, [builder.mul(ir.Constant(intp, r), lds_v)]),
                                           vector.as_pointer()), align=itemsize) for r in range(width)]
    return transposed_rows(builder, loaded), vector, itemsize, intp


@intrinsic
def _transpose_block(typingctx, src, src_offset, lds, dst, dst_offset, ldd):
    """``dst[dst_offset + q*ldd + r] = src[src_offset + r*lds + q]`` for ``r, q < W`` (the elements of a 64-byte
    vector): one ``W x W`` block transposed in registers, ``W`` vector loads, ``W * log2(W)`` two-vector
    shuffles and ``W`` vector stores. Stage ``s`` (W/2, ..., 1) swaps the off-diagonal ``s x s`` blocks of every
    ``2s x 2s`` block; after the last stage row ``q`` holds column ``q``."""
    signature = types.void(src, types.intp, types.intp, dst, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        src_v, src_off, lds_v, dst_v, dst_off, ldd_v = args
        columns, vector, itemsize, intp = _transposed_block_ir(context, builder, dst.dtype, src, src_v, src_off,
                                                               lds_v)
        dst_ptr = builder.gep(context.make_array(dst)(context, builder, dst_v).data, [dst_off])
        for q, value in enumerate(columns):
            target = builder.gep(dst_ptr, [builder.mul(ir.Constant(intp, q), ldd_v)])
            builder.store(value, builder.bitcast(target, vector.as_pointer()), align=itemsize)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def _transpose_block_to_rows(typingctx, src, src_offset, lds, dst, rows, rows_offset, lane0):
    """:func:`_transpose_block` with each destination row at its own place: ``dst[rows[rows_offset + q] + lane0 +
    r] = src[src_offset + r*lds + q]`` for ``r, q < W``."""
    signature = types.void(src, types.intp, types.intp, dst, rows, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        src_v, src_off, lds_v, dst_v, rows_v, rows_off, lane_v = args
        columns, vector, itemsize, intp = _transposed_block_ir(context, builder, dst.dtype, src, src_v, src_off,
                                                               lds_v)
        dst_ptr = builder.gep(context.make_array(dst)(context, builder, dst_v).data, [lane_v])
        rows_ptr = builder.gep(context.make_array(rows)(context, builder, rows_v).data, [rows_off])
        for q, value in enumerate(columns):
            row = builder.load(builder.gep(rows_ptr, [ir.Constant(intp, q)]))
            builder.store(value, builder.bitcast(builder.gep(dst_ptr, [row]), vector.as_pointer()), align=itemsize)
        return context.get_dummy_value()

    return signature, codegen


@njit(**_JIT)
def _pack_b_panel(b, pc, kc, j0, w, NR, bp, base):
    """``bp[base + p*NR + j] = b[pc + p, j0 + j]`` for ``j < w``, 0 for ``w <= j < NR``."""
    for p in range(kc):
        for j in range(w, NR):
            bp[base + p * NR + j] = 0.0
    if b.strides[0] == b.itemsize:
        # a transposed view (its rows run along the reduction): whole W x W blocks transposed in registers,
        # the edges element by element
        W = _VECTOR_BYTES // b.itemsize
        bt = b.T
        ldt = bt.strides[0] // bt.itemsize
        wb = w - w % W
        kb = kc - kc % W
        for j in range(0, wb, W):
            for p in range(0, kb, W):
                _transpose_block(bt, (j0 + j) * ldt + pc + p, ldt, bp, base + p * NR + j, NR)
        for j in range(wb):
            for p in range(kb, kc):
                bp[base + p * NR + j] = bt[j0 + j, pc + p]
        for j in range(wb, w):
            for p in range(kc):
                bp[base + p * NR + j] = bt[j0 + j, pc + p]
    else:
        for p in range(kc):
            o = base + p * NR
            for j in range(w):
                bp[o + j] = b[pc + p, j0 + j]


@njit(**_JIT)
def gemm(a, b, c, beta, b_transposed):
    """``c = a @ b + beta * c`` on the calling thread, ``b`` read as ``b.T`` when ``b_transposed``.

    a: (m, k); b: (k, n), or (n, k) when ``b_transposed``; c: (m, n); one float dtype (float32 or float64), any
    strides (views included) except that ``c``'s columns must be adjacent. ``b`` is fastest with adjacent
    columns (its panels are then read in place). ``beta`` 0 overwrites ``c`` (whatever it held, NaN included),
    1 accumulates into it.
    """
    _gemm(a, b.T if b_transposed else b, c, beta)


@njit(inline="always", **_JIT)
def _empty_line_aligned(n, like):
    """A 1-D uninitialised array of ``n`` elements of ``like``'s dtype whose first element starts a cache line.
    Why: Numba's ``np.empty`` aligns to 32 bytes, so a packed panel or tile buffer started half a line in about
    half the time, and then every 64-byte vector load of it straddled two lines (cost two)."""
    extra = 64 // like.itemsize
    raw = np.empty(n + extra, like.dtype)
    skip = ((-raw.ctypes.data) % 64) // like.itemsize
    return raw[skip:skip + n]


@njit(**_JIT)
def _gemm(a, b, c, beta):
    m, k = a.shape
    n = c.shape[1]
    itemsize = c.itemsize
    if c.strides[1] != itemsize and n > 1:
        raise ValueError("micro_gemm.gemm: c's columns must be adjacent in memory")
    if b.shape[0] != k or b.shape[1] != n or c.shape[0] != m:
        raise ValueError("micro_gemm.gemm: operand shapes do not match")
    if m == 0 or n == 0:
        return
    if k == 0:
        if beta == 0.0:
            c[:, :] = 0.0
        return
    a_row, a_step = a.strides[0] // itemsize, a.strides[1] // itemsize
    b_row = b.strides[0] // itemsize
    b_in_place = b.strides[1] == itemsize and not (PACK_ALIASED_B and (b_row * itemsize) % 2048 == 0 and m > MR)
    NR = NV * (_VECTOR_BYTES // itemsize)
    HALF = NR // 2
    NRW = WIDE_NV * (_VECTOR_BYTES // itemsize)
    bp = _empty_line_aligned(KC * ((min(NC, n) + NR - 1) // NR) * NR, c)
    tile = _empty_line_aligned(MR * NR, c).reshape((MR, NR))
    wide_tile = _empty_line_aligned(WIDE_MR * max(NRW, 1), c).reshape((WIDE_MR, max(NRW, 1)))
    for jc in range(0, n, NC):
        nc = min(NC, n - jc)
        # the first ``widest`` columns in panels of NRW on the wide tile, then whole panels of NR columns up to
        # ``wide``; the rest (fewer than NR columns) in half-width panels
        wide = nc - nc % NR
        widest = nc - nc % NRW if NRW > 0 else 0
        for pc in range(0, k, KC):
            kc = min(KC, k - pc)
            overwrite = pc == 0 and beta == 0.0
            for jp in range(0, nc, HALF):
                if jp < widest:
                    if jp % NRW == 0 and not b_in_place:
                        _pack_b_panel(b, pc, kc, jc + jp, NRW, NRW, bp, jp * kc)
                    continue
                panel_w = NR if jp < wide else HALF
                if jp < wide and jp % NR != 0:
                    continue
                w = min(panel_w, nc - jp)
                if not b_in_place or w < panel_w:
                    _pack_b_panel(b, pc, kc, jc + jp, w, panel_w, bp, jp * kc)
            for ic in range(0, m, MC):
                mc = min(MC, m - ic)
                for jp in range(0, nc, HALF):
                    if jp < widest:
                        if jp % NRW != 0:
                            pass
                        elif b_in_place:
                            _wide_panel(a, a_row, a_step, pc, b, pc * b_row + jc + jp, b_row, c, ic, mc, jc + jp, kc,
                                        wide_tile, overwrite)
                        else:
                            _wide_panel(a, a_row, a_step, pc, bp, jp * kc, NRW, c, ic, mc, jc + jp, kc, wide_tile,
                                        overwrite)
                        continue
                    panel_w = NR if jp < wide else HALF
                    if jp < wide and jp % NR != 0:
                        continue
                    w = min(panel_w, nc - jp)
                    packed = not b_in_place or w < panel_w
                    b_offset = jp * kc if packed else pc * b_row + jc + jp
                    ldb = panel_w if packed else b_row
                    for ip in range(0, mc, MR):
                        h = min(MR, mc - ip)
                        full = h == MR and w == panel_w
                        out = c if full else tile
                        oi = ic + ip if full else 0
                        oj = jc + jp if full else 0
                        a_offset = (ic + ip) * a_row + pc * a_step
                        if panel_w == NR:
                            if packed:
                                _micro_kernel(kc, a, a_offset, a_row, a_step, h, bp, b_offset, ldb, out, oi, oj,
                                              full and not overwrite)
                            else:
                                _micro_kernel(kc, a, a_offset, a_row, a_step, h, b, b_offset, ldb, out, oi, oj,
                                              full and not overwrite)
                        elif packed:
                            _micro_kernel_half(kc, a, a_offset, a_row, a_step, h, bp, b_offset, ldb, out, oi, oj,
                                               full and not overwrite)
                        else:
                            _micro_kernel_half(kc, a, a_offset, a_row, a_step, h, b, b_offset, ldb, out, oi, oj,
                                               full and not overwrite)
                        if not full:
                            _store_edge(tile, c, ic + ip, jc + jp, h, w, overwrite)


@njit(inline="always", **_JIT)
def _wide_panel(a, a_row, a_step, a_pc, b, b_offset, ldb, c, ic, mc, j0, kc, wide_tile, overwrite):
    """Rows ``ic:ic+mc`` of ``c``'s columns ``j0:j0+NRW`` (``(+)= a[rows, a_pc:a_pc+kc] @ panel``) on the wide
    tile, the ``kc x NRW`` panel at ``b[b_offset + p*ldb + j]`` (``b`` in place, or a packed panel); the last
    rows, fewer than :data:`WIDE_MR`, through ``wide_tile``."""
    for ip in range(0, mc, WIDE_MR):
        h = min(WIDE_MR, mc - ip)
        a_offset = (ic + ip) * a_row + a_pc * a_step
        if h == WIDE_MR:
            _micro_kernel_wide(kc, a, a_offset, a_row, a_step, h, b, b_offset, ldb, c, ic + ip, j0, not overwrite)
        else:
            _micro_kernel_wide(kc, a, a_offset, a_row, a_step, h, b, b_offset, ldb, wide_tile, 0, 0, False)
            _store_edge(wide_tile, c, ic + ip, j0, h, wide_tile.shape[1], overwrite)


@njit(inline="always", **_JIT)
def _store_edge(tile, c, i0, j0, h, w, overwrite):
    """An edge tile's ``h x w`` valid corner into ``c`` at ``(i0, j0)``: written, or added."""
    for i in range(h):
        for j in range(w):
            if overwrite:
                c[i0 + i, j0 + j] = tile[i, j]
            else:
                c[i0 + i, j0 + j] += tile[i, j]


def _panel_row_copier(vectors: int):
    """An intrinsic ``(src, src_offset, dst, dst_offset)`` copying ``vectors`` 64-byte vectors (a panel row of
    that many vectors) from ``src`` to ``dst`` at those element offsets."""

    @intrinsic
    def copy_panel_row(typingctx, src, src_offset, dst, dst_offset):
        signature = types.void(src, types.intp, dst, types.intp)
        dtype = dst.dtype

        def codegen(context, builder, sig, args):
            src_v, src_off, dst_v, dst_off = args
            itemsize = 4 if dtype == types.float32 else 8
            width = _VECTOR_BYTES // itemsize
            vector = ir.VectorType(context.get_value_type(dtype), width)
            intp = context.get_value_type(types.intp)
            src_ptr = builder.gep(context.make_array(src)(context, builder, src_v).data, [src_off])
            dst_ptr = builder.gep(context.make_array(dst)(context, builder, dst_v).data, [dst_off])
            for v in range(vectors):
                offset = ir.Constant(intp, v * width)
                value = builder.load(builder.bitcast(builder.gep(src_ptr, [offset]), vector.as_pointer()),
                                     align=itemsize)
                builder.store(value, builder.bitcast(builder.gep(dst_ptr, [offset]), vector.as_pointer()),
                              align=itemsize)
            return context.get_dummy_value()

        return signature, codegen

    return copy_panel_row


#: ``dst[dst_offset : dst_offset + NR] = src[src_offset : src_offset + NR]``: one row of a ``b`` panel, ``NV``
#: 64-byte vector loads and stores (the scalar loop Numba makes of it ran at a few elements per cycle, as slow as
#: the multiply-adds the panel feeds when ``a`` has few rows); and the same for a wide panel's row.
_copy_panel_row = _panel_row_copier(NV)
_copy_wide_panel_row = _panel_row_copier(WIDE_NV)


@njit(**_JIT)
def gemm_taps(a, x, base, taps, c):
    """``c = a @ B`` on the calling thread with ``B[p, j] = x[base + taps[p] + j]``: an implicit GEMM, whose
    ``k = len(taps)`` rows are windows of one flat array (a stride-1 conv's taps over a zero-padded input: row ``p =
    (channel, kh, kw)`` is the input shifted by that tap); no columns are built.

    Each ``KC x NR`` panel of ``B`` (``KC x NRW`` on the wide tile, see :data:`WIDE_NV`) is copied into a
    contiguous buffer just before the tiles that use it: read in place, the panel's rows sit at irregular offsets
    that the hardware prefetchers do not follow (a 64 -> 64 3x3 layer at 32x32 ran 1.5-1.7x slower than with
    filled columns).

    a: (m, k), any strides; x: 1-D, readable up to ``base + max(taps) + n``; taps: int64 (k,); c: (m, n) with
    adjacent columns, overwritten.
    """
    m, k = a.shape
    n = c.shape[1]
    itemsize = c.itemsize
    if c.strides[1] != itemsize and n > 1:
        raise ValueError("micro_gemm.gemm_taps: c's columns must be adjacent in memory")
    if taps.shape[0] != k or c.shape[0] != m:
        raise ValueError("micro_gemm.gemm_taps: operand shapes do not match")
    if m == 0 or n == 0:
        return
    if k == 0:
        c[:, :] = 0.0
        return
    a_row, a_step = a.strides[0] // itemsize, a.strides[1] // itemsize
    NR = NV * (_VECTOR_BYTES // itemsize)
    NRW = WIDE_NV * (_VECTOR_BYTES // itemsize)
    bp = _empty_line_aligned(KC * max(NR, NRW), c)
    tile = _empty_line_aligned(MR * NR, c).reshape((MR, NR))
    wide_tile = _empty_line_aligned(WIDE_MR * max(NRW, 1), c).reshape((WIDE_MR, max(NRW, 1)))
    for pc in range(0, k, KC):
        kc = min(KC, k - pc)
        overwrite = pc == 0
        for ic in range(0, m, MC):
            mc = min(MC, m - ic)
            # whole panels of NRW columns on the wide tile, then NR-column panels (the last one zero-padded)
            widest = n - n % NRW if NRW > 0 else 0
            for jp in range(0, widest, max(NRW, 1)):
                for p in range(kc):
                    _copy_wide_panel_row(x, base + taps[pc + p] + jp, bp, p * NRW)
                _wide_panel(a, a_row, a_step, pc, bp, 0, NRW, c, ic, mc, jp, kc, wide_tile, overwrite)
            for jp in range(widest, n, NR):
                w = min(NR, n - jp)
                if w == NR:
                    for p in range(kc):
                        _copy_panel_row(x, base + taps[pc + p] + jp, bp, p * NR)
                else:
                    for p in range(kc):
                        row = base + taps[pc + p] + jp
                        o = p * NR
                        for j in range(w):
                            bp[o + j] = x[row + j]
                        for j in range(w, NR):
                            bp[o + j] = 0.0
                for ip in range(0, mc, MR):
                    h = min(MR, mc - ip)
                    full = h == MR and w == NR
                    out = c if full else tile
                    oi = ic + ip if full else 0
                    oj = jp if full else 0
                    a_offset = (ic + ip) * a_row + pc * a_step
                    _micro_kernel(kc, a, a_offset, a_row, a_step, h, bp, 0, NR, out, oi, oj,
                                  full and not overwrite)
                    if not full:
                        _store_edge(tile, c, ic + ip, jp, h, w, overwrite)


@njit(**_JIT)
def packed_size(k, n, itemsize):
    """Elements of :func:`pack_b`'s result for a ``(k, n)`` operand: ``ceil(n / NR)`` panels of ``k x NR``."""
    NR = NV * (_VECTOR_BYTES // itemsize)
    return ((n + NR - 1) // NR) * NR * k


@njit(**_JIT)
def pack_b(b, bp):
    """``b`` (k, n), any strides (a transposed view of a contiguous array is packed by register transposes), into
    the panels :func:`gemm_gather` reads: ``bp[(j // NR * k + p) * NR + j % NR] = b[p, j]``, zero-padded to whole
    panels (``bp`` at least :func:`packed_size` long)."""
    pack_b_rows(b, bp, b.shape[0], 0)


@njit(**_JIT)
def pack_b_rows(b, bp, k, p0):
    """:func:`pack_b` of ``b`` (rows, n) as rows ``p0 <= p < p0 + rows`` of a packed ``(k, n)`` operand (a ``B``
    gathered from pieces: the output gradient's positions of several images)."""
    rows, n = b.shape
    NR = NV * (_VECTOR_BYTES // b.itemsize)
    for jp in range(0, n, NR):
        _pack_b_panel(b, 0, rows, jp, min(NR, n - jp), NR, bp, ((jp // NR) * k + p0) * NR)


@njit(**_JIT)
def gemm_gather(x, base, row_off, step_off, bp, c, beta):
    """``c = A @ B + beta * c`` on the calling thread with ``A[i, p] = x[base + row_off[i] + step_off[p]]`` read in
    place, and ``B`` (k, n) packed by :func:`pack_b` (``k = len(step_off)``). A conv without columns: with output
    positions as rows (``row_off``: each position's window corner in the zero-padded input) and taps as steps
    (``step_off``: each (channel, kh, kw)'s offset from the corner) ``A`` is the im2col matrix and ``B`` the
    transposed weights (the forward, ``y^T``); with the tables swapped, ``A`` is the columns' transpose and ``B``
    the output gradient's (the weight gradient, ``dW^T``). Any stride and dilation (they are in the tables), no
    positions computed and dropped.

    x: 1-D, every ``base + row_off[i] + step_off[p]`` inside; row_off (m,), step_off (k,) int64; bp: packed ``B``;
    c: (m, n) with adjacent columns; ``beta`` 0 overwrites ``c``, 1 accumulates into it.
    """
    m = row_off.shape[0]
    k = step_off.shape[0]
    n = c.shape[1]
    itemsize = c.itemsize
    NR = NV * (_VECTOR_BYTES // itemsize)
    if c.strides[1] != itemsize and n > 1:
        raise ValueError("micro_gemm.gemm_gather: c's columns must be adjacent in memory")
    if c.shape[0] != m or bp.shape[0] < ((n + NR - 1) // NR) * NR * k:
        raise ValueError("micro_gemm.gemm_gather: operand shapes do not match")
    if m == 0 or n == 0:
        return
    if k == 0:
        if beta == 0.0:
            c[:, :] = 0.0
        return
    tile = _empty_line_aligned(MR * NR, c).reshape((MR, NR))
    wide_tile = _empty_line_aligned(WIDE_MR * 2 * NR, c).reshape((WIDE_MR, 2 * NR))
    # the wide tile where two whole panels remain (AVX-512): its columns span panels k * NR elements apart
    wide_end = n - n % (2 * NR) if WIDE_NV else 0
    for pc in range(0, k, KC):
        kc = min(KC, k - pc)
        overwrite = pc == 0 and beta == 0.0
        for ic in range(0, m, MC):
            mc = min(MC, m - ic)
            for jp in range(0, wide_end, 2 * NR):
                b_offset = ((jp // NR) * k + pc) * NR
                for ip in range(0, mc, WIDE_MR):
                    h = min(WIDE_MR, mc - ip)
                    if h == WIDE_MR:
                        _micro_kernel_gather_wide(kc, x, base, row_off, ic + ip, h, step_off, pc, bp, b_offset, NR,
                                                  k * NR, c, ic + ip, jp, not overwrite)
                    else:
                        _micro_kernel_gather_wide(kc, x, base, row_off, ic + ip, h, step_off, pc, bp, b_offset, NR,
                                                  k * NR, wide_tile, 0, 0, False)
                        _store_edge(wide_tile, c, ic + ip, jp, h, 2 * NR, overwrite)
            for jp in range(wide_end, n, NR):
                w = min(NR, n - jp)
                b_offset = ((jp // NR) * k + pc) * NR
                # a last panel at most half full on the half-width tile: a whole tile multiplied its zero padding
                # (16 of 48 columns, a squeeze layer's input gradient: 0.94 -> 0.76-0.84 ms for 784 x 1728 x 48
                # on one core; a 16-column product 0.46-0.49 -> 0.30-0.36). A 3-vector tile for the 48 measured
                # no faster than two whole ones.
                half = w <= NR // 2
                for ip in range(0, mc, MR):
                    h = min(MR, mc - ip)
                    full = h == MR and w == (NR // 2 if half else NR)
                    out = c if full else tile
                    oi = ic + ip if full else 0
                    oj = jp if full else 0
                    if half:
                        _micro_kernel_gather_half(kc, x, base, row_off, ic + ip, h, step_off, pc, bp, b_offset, NR,
                                                  k * NR, out, oi, oj, full and not overwrite)
                    else:
                        _micro_kernel_gather(kc, x, base, row_off, ic + ip, h, step_off, pc, bp, b_offset, NR,
                                             k * NR, out, oi, oj, full and not overwrite)
                    if not full:
                        _store_edge(tile, c, ic + ip, jp, h, w, overwrite)


@njit(**_JIT)
def transpose_into(src, dst):
    """``dst[j, i] = src[i, j]`` for ``src`` (m, n) and ``dst`` (n, m), both with adjacent columns: ``W x W`` blocks
    transposed in registers (:func:`_transpose_block`), the edges element by element (numpy's strided copy of a
    4608 x 512 float32 matrix took 7 ms, a twentieth of the rate of a plain copy)."""
    m, n = src.shape
    if dst.shape[0] != n or dst.shape[1] != m:
        raise ValueError("micro_gemm.transpose_into: operand shapes do not match")
    if (m > 1 and src.strides[1] != src.itemsize) or (n > 1 and dst.strides[1] != dst.itemsize):
        raise ValueError("micro_gemm.transpose_into: rows must be contiguous")
    mb, nb = _transpose_blocks(src, 0, src.strides[0] // src.itemsize, dst, 0, dst.strides[0] // dst.itemsize, m, n)
    for i in range(mb):
        for j in range(nb, n):
            dst[j, i] = src[i, j]
    for i in range(mb, m):
        for j in range(n):
            dst[j, i] = src[i, j]


@njit(**_JIT)
def transpose_flat(src, src_offset, lds, dst, dst_offset, ldd, m, n):
    """``dst[dst_offset + j*ldd + i] = src[src_offset + i*lds + j]`` for ``i < m, j < n``, ``src`` and ``dst`` 1-D and
    contiguous: :func:`transpose_into` for matrices that are pieces of flat buffers (the depthwise kernels' blocks
    of planes). The caller keeps every index inside both arrays (not checked)."""
    mb, nb = _transpose_blocks(src, src_offset, lds, dst, dst_offset, ldd, m, n)
    for i in range(mb):
        for j in range(nb, n):
            dst[dst_offset + j * ldd + i] = src[src_offset + i * lds + j]
    for i in range(mb, m):
        for j in range(n):
            dst[dst_offset + j * ldd + i] = src[src_offset + i * lds + j]


@njit(**_JIT)
def transpose_to_rows(src, src_offset, lds, dst, rows, lane0, m, n):
    """``dst[rows[j] + lane0 + i] = src[src_offset + i*lds + j]`` for ``i < m, j < n``: a transpose whose destination
    rows (one per column ``j`` of the source) lie anywhere, by ``W x W`` blocks in registers (the depthwise kernels
    pack a block of planes channels-innermost straight into a padded, phase-split buffer: ``rows`` maps each
    input position to its place). ``src``, ``dst``: 1-D contiguous; ``rows``: int64 (n,); every index inside
    (not checked)."""
    W = _VECTOR_BYTES // src.itemsize
    mb = m - m % W
    nb = n - n % W
    for i in range(0, mb, W):
        for j in range(0, nb, W):
            _transpose_block_to_rows(src, src_offset + i * lds + j, lds, dst, rows, j, lane0 + i)
    for i in range(mb):
        for j in range(nb, n):
            dst[rows[j] + lane0 + i] = src[src_offset + i * lds + j]
    for i in range(mb, m):
        for j in range(n):
            dst[rows[j] + lane0 + i] = src[src_offset + i * lds + j]


@njit(inline="always", **_JIT)
def _transpose_blocks(src, so, lds, dst, do, ldd, m, n):
    """The whole ``W x W`` blocks of a transpose (element offsets from the arrays' first elements); returns the
    rows and columns they covered, ``(m - m % W, n - n % W)``."""
    W = _VECTOR_BYTES // src.itemsize
    mb = m - m % W
    nb = n - n % W
    for i in range(0, mb, W):
        for j in range(0, nb, W):
            _transpose_block(src, so + i * lds + j, lds, dst, do + j * ldd + i, ldd)
    return mb, nb
