"""Exact IEEE behaviour of the convolution passes on non-finite operands (NaN, +-Inf).

Every convolution pass is a bilinear form ``out[o] = sum over the existing pairs (i, j) of a[i] * b[j]``
(forward: input x weight; input gradient: output gradient x weight; weight gradient: output gradient
x input). Padding adds no pair: torch's float32 kernels (oneDNN) skip it, so a NaN weight tap only
reaches the outputs whose window really covers an input element with it. The fast kernels instead
read padding as stored zeros (phase-split rows, im2col columns, Winograd tiles) and multiply them, so
``0 * NaN`` or ``0 * Inf`` would put NaN where no term is NaN, and Winograd's transforms mix every
element of a tile into every output of it (one Inf becomes NaN over the whole tile).

What an exact summation gives when some factor is not finite: every pair with a non-finite factor is
itself ``+Inf``, ``-Inf`` or NaN (``Inf * 0`` and anything with NaN), and then the finite pairs do not
matter: the result is NaN if any pair is NaN or both infinities occur, else the infinity that occurs.
:func:`exact` computes exactly that, with the same pass applied to 0/1 masks (which count pairs of each
kind, padding counting none because the masks are zero there) plus one pass over the operands with
their non-finite elements zeroed for the outputs no special pair reaches. It costs a few extra passes,
paid only by calls whose operands hold a non-finite value. Finite calls pay one read of the *result*
(:func:`all_finite`, an integer max over the bit patterns, about 0.3 ms per 6 MB here), or of the operands
when they are smaller (an expanding layer; finite operands form finite pairs only): a kernel that
forms every pair torch forms (plus padding pairs) leaves a non-finite value in some output as soon as
one pair is non-finite, so a finite result needs no look at the operands. Reading the result instead
of the operands saved 0.47 ms per call on ResNet-18's 512-channel 3x3 layers at batch 1 (9.4 MB of
weight, 32 KB of output). Kernels that form only torch's pairs plus padding zeros times weights need less:
a finite weight alone proves their forward and input gradient exact (:func:`exact`'s ``finite_b_suffices``),
so those passes read the weight or the result, whichever is smaller.
"""
from __future__ import annotations

import functools

import numba
import numpy as np
from numba import njit, prange

from fastconv import config

from . import parallel, task_queue

__all__ = ["max_abs", "all_finite", "exact"]

_UINT = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64, np.dtype(np.float16): np.uint16}
_ABS_MASK = {np.uint16: 0x7FFF, np.uint32: 0x7FFFFFFF, np.uint64: 0x7FFFFFFFFFFFFFFF}


@njit(cache=config.CACHE, nogil=True)
def _max_bits(u, mask):
    """Largest ``u[i] & mask`` (the bit pattern of ``|x[i]|``): integer max vectorises, and for IEEE
    floats it orders like ``|x|``, with Inf above every finite value and every NaN above Inf."""
    m = u[0] & mask
    for i in range(u.size):
        m = max(m, u[i] & mask)  # the max() form vectorises (an if-assignment did not)
    return m


@parallel.kernel(always=True, cache=config.CACHE, nogil=True)
def _max_bits_parallel(u, mask):
    """:func:`_max_bits` in tasks of at least 4M elements."""
    n = u.size
    nt = max(1, min(64, n // (1 << 22)))
    part = np.zeros(nt, u.dtype)
    for t in prange(nt):
        part[t] = _max_bits(u[n * t // nt:n * (t + 1) // nt], mask)
    return part.max()


#: Below this many elements :func:`max_abs` reads serially: starting the parallel tasks cost more than
#: the second core saves (measured here: 1.6M float32 in 0.33 ms serial, 0.8 ms as a prange).
PARALLEL_MIN = 1 << 24


def _flat(a: np.ndarray) -> np.ndarray:
    """The elements of ``a`` as a 1-D array in memory order: a view when ``a`` is dense in any dimension
    order (a channels-last result is a transposed view of a contiguous buffer), else a copy."""
    if a.flags.c_contiguous:
        return a.reshape(-1)
    dense = np.transpose(a, np.argsort(a.strides, kind="stable")[::-1])
    return dense.reshape(-1) if dense.flags.c_contiguous else np.ascontiguousarray(a).reshape(-1)


@config.parallel_entry
def max_abs(a: np.ndarray) -> float:
    """``max |a|``: NaN when ``a`` holds a NaN, Inf when it holds an infinity (and no NaN), 0 when empty."""
    if a.size == 0:
        return 0.0
    ut = _UINT.get(a.dtype)
    if ut is None:  # not a float array we know: the slow, allocating way
        a = np.asarray(a, np.float64)
        return float(np.max(np.abs(a)))
    flat = _flat(a).view(ut)
    bits = (_max_bits_parallel if flat.size >= PARALLEL_MIN else _max_bits)(flat, ut(_ABS_MASK[ut]))
    return float(np.array([bits], ut).view(a.dtype)[0])


_INF_BITS = {np.uint16: 0x7C00, np.uint32: 0x7F800000, np.uint64: 0x7FF0000000000000}
_NO_BITS = {ut: np.zeros(1, ut) for ut in _ABS_MASK}  # stands in for an absent operand


@njit(cache=config.CACHE, nogil=True)
def _finite3(u1, u2, u3, mask, inf_bits):
    """All of three bit-pattern arrays finite: one Numba call for a pass's operands (three calls to
    :func:`max_abs` cost 19 µs of host time per convolution, a tenth of a small layer's call)."""
    return max(_max_bits(u1, mask), _max_bits(u2, mask), _max_bits(u3, mask)) < inf_bits


#: float dtype -> (its bits' unsigned type, the |x| mask, Inf's bits, the stand-in for an absent operand), as the
#: arguments :func:`_finite3` takes
_FINITE3_ARGS = {dt: (ut, ut(_ABS_MASK[ut]), ut(_INF_BITS[ut]), _NO_BITS[ut]) for dt, ut in _UINT.items()}


#: Elements from which :func:`all_finite` reads an array with every thread, in chunks the threads claim
#: (:mod:`.task_queue`: a thread slowed by a busy neighbour takes fewer). Every pass's result is read once more
#: here, usually right after a parallel kernel wrote it, with each core's share in its own cache: a serial read
#: pulled the other core's half across. Measured on the 2-core Xeon (AVX-512), float32 just written by both
#: threads, serial / claimed chunks, µs: 65K 21.9 / 9.1, 346K (AlexNet's 64 -> 192 output at batch 8) 66.8 /
#: 27.8, 2M 372 / 159. Smaller arrays, often written by one thread, stay serial.
FINITE_PARALLEL_MIN = 1 << 17
#: Chunks of such a read.
FINITE_CHUNKS = 8


@parallel.kernel(always=True, cache=config.CACHE, nogil=True)
def _max_bits_claimed(u, mask, part, workers, claimed):
    """``part[c]`` = :func:`_max_bits` of chunk ``c`` of ``u`` (``part.size`` equal chunks, none empty), the
    chunks claimed by ``workers`` threads."""
    n = u.size
    chunks = part.size
    for _ in prange(workers):
        while True:
            c = task_queue.claim(claimed)
            if c >= chunks:
                break
            part[c] = _max_bits(u[n * c // chunks:n * (c + 1) // chunks], mask)


def _finite_claimed(flat, mask, inf_bits) -> bool:
    """Whether the bit patterns ``flat`` (at least :data:`FINITE_CHUNKS` of them) are all finite, read by every
    thread (:func:`_max_bits_claimed`)."""
    part = np.empty(FINITE_CHUNKS, flat.dtype)
    _max_bits_claimed(flat, mask, part, min(FINITE_CHUNKS, numba.get_num_threads()), task_queue.counter())
    return part.max() < inf_bits


def all_finite(*arrays) -> bool:
    """True when every element of every array (``None`` skipped) is finite."""
    present = [a for a in arrays if a is not None]
    if 0 < len(present) <= 3:
        # the common call (a pass's operands, or its result): one Numba call over flat views; written out
        # because every small call pays it (the generic form cost 8 µs, this one 4)
        args = _FINITE3_ARGS.get(present[0].dtype)
        if args is not None:
            ut, mask, inf_bits, absent = args
            dt = present[0].dtype
            views, large = [], []
            for a in present:
                if a.dtype != dt or not 0 < a.size < PARALLEL_MIN:
                    break
                flat = (a.reshape(-1) if a.flags.c_contiguous else _flat(a)).view(ut)
                claimed = flat.size >= max(FINITE_PARALLEL_MIN, FINITE_CHUNKS) and not parallel.SERIAL_ONLY
                (large if claimed else views).append(flat)
            else:
                for flat in large:
                    if not _finite_claimed(flat, mask, inf_bits):
                        return False
                if not views:
                    return True
                while len(views) < 3:
                    views.append(absent)
                return _finite3(views[0], views[1], views[2], mask, inf_bits)
    return all(a is None or np.isfinite(max_abs(a)) for a in arrays)


def _classes(a):
    """0/1 masks of ``a``'s kinds of elements (None where a kind is absent) and ``a`` with its
    non-finite elements zeroed."""
    dt = a.dtype
    fin = np.isfinite(a)
    nan = np.isnan(a)
    pinf = np.isposinf(a)
    minf = np.isneginf(a)

    def m(mask):
        return mask.astype(dt) if mask.any() else None

    return {
        "nan": m(nan), "notnan": m(~nan), "pinf": m(pinf), "minf": m(minf), "inf": m(pinf | minf),
        "fpos": m(fin & (a > 0)), "fneg": m(fin & (a < 0)), "zero": m(a == 0),
        "pos": m(a > 0), "neg": m(a < 0), "ones": np.ones(a.shape, dt),
    }, np.where(fin, a, 0).astype(dt)


def _add(total, part):
    if part is None:
        return total
    return part if total is None else total + part


def _contiguous(a) -> bool:
    return isinstance(a, np.ndarray) and a.flags.c_contiguous


#: Whether passes declared ``finite_b_suffices`` (:func:`exact`) use it (tests and A/B measurements switch it off).
FINITE_B_RULE = True


def exact(fn=None, *, bias: bool = False, finite_b_suffices: bool = False):
    """Decorate a pass ``fn(a, b, *rest)`` (``rest[0]`` the bias when ``bias=True``) so that calls with a
    non-finite operand give the exact IEEE result (see the module docstring); a finite call costs one read of
    its result or of its operands, whichever is smaller, more than ``fn``. ``fn`` must be exact on finite
    operands (no special values created from padding), which every fast kernel is, and must leave a non-finite
    value in some output whenever it forms a non-finite product (true of sums of products, and of Winograd's
    transforms, whose non-finite entries reach at least one kept output of their tile).

    ``finite_b_suffices``: ``fn`` forms, for every output it keeps, only the pairs torch forms and pairs of an
    element of ``b`` with a stored zero standing for ``a``'s padding (or a strided gradient's spread) -- no zero
    weight taps of its own, no transform mixing elements. Then a finite ``b`` proves the result exact whatever
    ``a`` holds: the padding pairs are zeros, and the pairs left are torch's. ``b`` is the weight in the forward
    and input-gradient passes of the pair-forming kernels (direct, im2col's routes, depthwise, shift,
    group_lanes), usually far smaller than the result: a finite call then reads the weight instead of its
    result. Why: that read of an activation-sized result cost the converted models' training steps up to 5%, most
    where the convs are memory-bound. Measured on the 2-core Xeon, batch 8 at 128x128, 10 rounds, one process
    alternating with and without the rule (:data:`FINITE_B_RULE`), median step time with / without: ShuffleNet v2
    0.948, MobileNet v3 large 0.954, EfficientNet-B0 0.969, VGG-11 0.970, ResNet-18 0.972, ConvNeXt-tiny 0.981,
    ResNet-50 0.984, GoogLeNet 0.985, SqueezeNet 0.985, RegNet-Y-400MF 0.989, AlexNet 0.991, MobileNet v2 0.998,
    DenseNet-121 1.008 (noise); geometric mean 0.979."""
    if fn is None:
        return functools.partial(exact, bias=bias, finite_b_suffices=finite_b_suffices)

    @functools.wraps(fn)
    def wrapper(a, b, *rest):
        out = fn(a, b, *rest)
        weight_rule = finite_b_suffices and FINITE_B_RULE and _contiguous(b)
        if weight_rule:
            # the smaller read first: the weight, or the result where that is smaller (a deep layer at a
            # small map); either one proves the call exact
            if b.size <= out.size:
                if all_finite(b) or all_finite(out):
                    return out
            elif all_finite(out) or all_finite(b):
                return out
        # Either read proves the call exact. A finite result: every pair the kernel formed (padding zeros
        # included) was finite, since a non-finite pair leaves Inf or NaN in some output (0 * Inf and
        # Inf - Inf are NaN). Finite operands: every pair was finite, and an Inf in the result is IEEE's own
        # answer to sums that overflowed. The smaller side is read first, the other only when it fails.
        # The result is usually the smaller (a deep layer's weight is megabytes, its output at batch 1
        # kilobytes, and still in cache); an expanding layer's is not (ResNet's 7x7 stem at batch 8: 2.1M
        # output elements against 0.4M input and weight, 0.5 ms of reading saved per call).
        bvec = rest[0] if bias and rest else None
        bvec = None if bvec is None else np.asarray(bvec)
        if weight_rule:
            pass  # both reads above failed: neither proves it, and a non-finite b rules out "finite operands"
        elif (_contiguous(a) and _contiguous(b)  # another layout would be copied to be read
                and a.size + b.size + (0 if bvec is None else bvec.size) < out.size):
            if all_finite(a, b, bvec) or all_finite(out):
                return out
        elif all_finite(out) or all_finite(a, b, bvec):
            return out
        a = np.asarray(a)
        b = np.asarray(b)
        A, a0 = _classes(a)
        B, b0 = _classes(b)
        tail = rest
        if bias and rest:
            bv = None if bvec is None else np.asarray(bvec, a.dtype)
            tail = ((None if bv is None else np.where(np.isfinite(bv), bv, 0).astype(a.dtype)),) + rest[1:]
        out = fn(a0, b0, *tail)
        mask_tail = ((None,) + rest[1:]) if bias and rest else rest

        def pairs(ka, kb):
            ma, mb = A[ka], B[kb]
            if ma is None or mb is None:
                return None
            return fn(ma, mb, *mask_tail)

        pos = neg = nan = None
        for ka, kb in (("pinf", "pos"), ("minf", "neg"), ("fpos", "pinf"), ("fneg", "minf")):
            pos = _add(pos, pairs(ka, kb))
        for ka, kb in (("pinf", "neg"), ("minf", "pos"), ("fpos", "minf"), ("fneg", "pinf")):
            neg = _add(neg, pairs(ka, kb))
        for ka, kb in (("nan", "ones"), ("notnan", "nan"), ("inf", "zero"), ("zero", "inf")):
            nan = _add(nan, pairs(ka, kb))
        if bias and bvec is not None:
            bv = np.asarray(bvec, a.dtype)
            shape = (1, -1) + (1,) * (out.ndim - 2)
            for name, mask in (("pos", np.isposinf(bv)), ("neg", np.isneginf(bv)), ("nan", np.isnan(bv))):
                if mask.any():
                    part = np.broadcast_to(mask.astype(a.dtype).reshape(shape), out.shape)
                    if name == "pos":
                        pos = _add(pos, part)
                    elif name == "neg":
                        neg = _add(neg, part)
                    else:
                        nan = _add(nan, part)
        # the counts are small integers, exact in any of the passes; > 0.5 guards against a kernel
        # that computes them with rounding (Winograd would, but it delegates non-finite calls)
        if pos is not None:
            out[pos > 0.5] = np.inf
        if neg is not None:
            out[neg > 0.5] = -np.inf
        if pos is not None and neg is not None:
            out[(pos > 0.5) & (neg > 0.5)] = np.nan
        if nan is not None:
            out[nan > 0.5] = np.nan
        return out

    return wrapper
