"""Plain float rows and the 32-element GGUF blocks: F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 IQ4_NL.

``deq_*(src, dst)`` decodes one row of raw blocks (uint8) into float32 with the float32
operation order of gguf-py's ``quants.py``, so the result is bit-identical to
``gguf.quants.dequantize``. ``matvec_*(w, x, out)`` are the fused decode paths: every row
is dotted with ``x`` block by block, without materialising the dequantized matrix.
The callers in ``efedge.kernels`` validate shapes first; nothing here bounds-checks.

Two LLVM habits shape the loops (each worth 2-5x on a 2048 x 2048 matrix):
* In ``deq_*`` the per-block element count is read from the array shapes (``half`` = 16)
  instead of written as a constant. A constant inner trip count gets the loop fully
  unrolled and then left scalar (src and dst might alias); a runtime count goes to the
  loop vectorizer, which checks aliasing once and runs 16 lanes at a time.
* The fused dots accumulate into float32 lanes in ``acc`` rather than one scalar per
  block; a scalar reduction lets LLVM vectorise across blocks with gathers instead.

Block layouts (bytes): Q4_0 = d f16, qs[16] (low nibbles are elements 0-15, high 16-31).
Q4_1 = d, m, qs[16]. Q5_0 = d, qh u32 (bit j = 5th bit of element j), qs[16].
Q5_1 = d, m, qh, qs[16]. Q8_0 = d, qs[32] int8. IQ4_NL = d, qs[16] indices into IQ4_KV.
"""

import numpy as np
from numba import njit, prange
from numba.extending import overload

from . import simd_f16
from ._fp import FAST, bits_to_f32, f16_to_f32, half_to_f32, small_f32

IQ4_KV = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                  dtype=np.float32)


# ---------------------------------------------------------------- plain float rows


@njit(cache=True, nogil=True, fastmath=False)
def deq_f32(src, dst):
    v = src.view(np.float32)
    for i in range(dst.shape[0]):
        dst[i] = v[i]


def _convert_f16(src, dst):
    """dst = the halves in src's bytes (numba only; chosen by the arrays' types)."""
    raise NotImplementedError("_convert_f16 runs inside numba kernels only")


@overload(_convert_f16, jit_options={"cache": True})
def _convert_f16_impl(src, dst):
    if simd_f16.AVAILABLE and simd_f16.contiguous_rows(src, dst):
        return lambda src, dst: simd_f16.f16_to_f32_row(src, dst)  # 8 at a time (F16C)

    def one_by_one(src, dst):
        v = src.view(np.uint16)
        for i in range(dst.shape[0]):
            dst[i] = half_to_f32(np.int64(v[i]))

    return one_by_one


@njit(cache=True, nogil=True, fastmath=False)
def deq_f16(src, dst):
    _convert_f16(src, dst)


@njit(cache=True, nogil=True, fastmath=False)
def deq_bf16(src, dst):
    v = src.view(np.uint16)
    for i in range(dst.shape[0]):
        dst[i] = bits_to_f32(np.int64(v[i]) << 16)


@njit(cache=True, nogil=True, parallel=True, fastmath=FAST)
def matvec_f32(w, x, out):
    """w: float32 [rows, n] (the raw bytes viewed as float32)."""
    n = x.shape[0]
    for r in prange(w.shape[0]):
        s = np.float32(0.0)
        for i in range(n):
            s += w[r, i] * x[i]
        out[r] = s


@njit(cache=True, nogil=True, parallel=True, fastmath=FAST)
def matvec_f16(w, x, out):
    """w: uint16 [rows, n] (the raw bytes viewed as uint16)."""
    n = x.shape[0]
    for r in prange(w.shape[0]):
        s = np.float32(0.0)
        for i in range(n):
            s += half_to_f32(np.int64(w[r, i])) * x[i]
        out[r] = s


@njit(cache=True, nogil=True, parallel=True, fastmath=False)
def matvec_f16_rows(w, x, out):
    """w: uint8 [rows, 2n], the raw F16 rows; each row dotted with x by
    simd_f16.dot_f16_row (8 halves per vcvtph2ps, four FMA accumulators): ~4x the scalar
    matvec_f16 on the demo model's output head, with the sum in another order. Only
    compiled where the CPU has F16C (efedge.kernels registers it then)."""
    n = x.shape[0]
    for r in prange(w.shape[0]):
        out[r] = simd_f16.dot_f16_row(w, r, x, n)


# ---------------------------------------------------------------- Q4_0 (18 bytes)


@njit(cache=True, nogil=True, fastmath=False)
def deq_q4_0(src, dst):
    nb = src.shape[0] // 18
    half = dst.shape[0] // max(nb, 1) // 2  # 16, as a runtime trip count (module docstring)
    for b in range(nb):
        o = b * 18
        e = b * 32
        d = f16_to_f32(src[o], src[o + 1])
        for j in range(half):
            q = src[o + 2 + j]
            dst[e + j] = d * small_f32(q & 15, 8)
            dst[e + 16 + j] = d * small_f32(q >> 4, 8)


# The fused dots keep 32 float32 lanes per block in ``acc`` and fold the block scale in
# per lane, so there is no horizontal sum per block; two blocks go to two halves of
# ``acc`` per step so the load-add-store chains of consecutive blocks overlap.
ROWS_PER_TASK = 8  # rows one prange iteration handles (one ``acc`` scratch each)


@njit(cache=True, nogil=True, fastmath=FAST)
def _dot_q4_0(row, x, acc):
    acc[:] = 0.0
    nb = row.shape[0] // 18
    b = 0
    while b + 2 <= nb:
        o = b * 18
        e = b * 32
        d0 = f16_to_f32(row[o], row[o + 1])
        d1 = f16_to_f32(row[o + 18], row[o + 19])
        for j in range(16):
            q0 = row[o + 2 + j]
            q1 = row[o + 20 + j]
            acc[j] += d0 * (small_f32(q0 & 15, 8) * x[e + j]
                            + small_f32(q0 >> 4, 8) * x[e + 16 + j])
            acc[16 + j] += d1 * (small_f32(q1 & 15, 8) * x[e + 32 + j]
                                 + small_f32(q1 >> 4, 8) * x[e + 48 + j])
        b += 2
    if b < nb:  # odd block count
        o = b * 18
        e = b * 32
        d0 = f16_to_f32(row[o], row[o + 1])
        for j in range(16):
            q0 = row[o + 2 + j]
            acc[j] += d0 * (small_f32(q0 & 15, 8) * x[e + j]
                            + small_f32(q0 >> 4, 8) * x[e + 16 + j])
    return acc.sum()


@njit(cache=True, nogil=True, parallel=True, fastmath=False)
def matvec_q4_0(w, x, out):
    rows = w.shape[0]
    for c in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        acc = np.empty(32, np.float32)
        for r in range(c * ROWS_PER_TASK, min(rows, (c + 1) * ROWS_PER_TASK)):
            out[r] = _dot_q4_0(w[r], x, acc)


# ---------------------------------------------------------------- Q4_1 (20 bytes)


@njit(cache=True, nogil=True, fastmath=False)
def deq_q4_1(src, dst):
    nb = src.shape[0] // 20
    half = dst.shape[0] // max(nb, 1) // 2
    for b in range(nb):
        o = b * 20
        e = b * 32
        d = f16_to_f32(src[o], src[o + 1])
        m = f16_to_f32(src[o + 2], src[o + 3])
        for j in range(half):
            q = src[o + 4 + j]
            dst[e + j] = d * small_f32(q & 15, 0) + m
            dst[e + 16 + j] = d * small_f32(q >> 4, 0) + m


# ---------------------------------------------------------------- Q5_0 (22 bytes), Q5_1 (24)


@njit(cache=True, nogil=True, fastmath=False)
def _qh32(src, o):
    """The 32 fifth bits of a Q5 block (little-endian uint32 at ``src[o:o+4]``)."""
    return ((np.int64(src[o + 3]) << 24) | (np.int64(src[o + 2]) << 16)
            | (np.int64(src[o + 1]) << 8) | np.int64(src[o]))


@njit(cache=True, nogil=True, fastmath=False)
def deq_q5_0(src, dst):
    nb = src.shape[0] // 22
    half = dst.shape[0] // max(nb, 1) // 2
    for b in range(nb):
        o = b * 22
        e = b * 32
        d = f16_to_f32(src[o], src[o + 1])
        qh = _qh32(src, o + 2)
        for j in range(half):
            q = src[o + 6 + j]
            lo = (q & 15) | (((qh >> j) & 1) << 4)
            hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
            dst[e + j] = d * small_f32(lo, 16)
            dst[e + 16 + j] = d * small_f32(hi, 16)


@njit(cache=True, nogil=True, fastmath=False)
def deq_q5_1(src, dst):
    nb = src.shape[0] // 24
    half = dst.shape[0] // max(nb, 1) // 2
    for b in range(nb):
        o = b * 24
        e = b * 32
        d = f16_to_f32(src[o], src[o + 1])
        m = f16_to_f32(src[o + 2], src[o + 3])
        qh = _qh32(src, o + 4)
        for j in range(half):
            q = src[o + 8 + j]
            lo = (q & 15) | (((qh >> j) & 1) << 4)
            hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
            dst[e + j] = d * small_f32(lo, 0) + m
            dst[e + 16 + j] = d * small_f32(hi, 0) + m


# ---------------------------------------------------------------- Q8_0 (34 bytes)


@njit(cache=True, nogil=True, fastmath=False)
def deq_q8_0(src, dst):
    nb = src.shape[0] // 34
    n = dst.shape[0] // max(nb, 1)
    for b in range(nb):
        o = b * 34
        e = b * 32
        d = f16_to_f32(src[o], src[o + 1])
        for j in range(n):
            dst[e + j] = np.float32(np.int8(src[o + 2 + j])) * d


@njit(cache=True, nogil=True, fastmath=FAST)
def _dot_q8_0(row, x, acc):
    acc[:] = 0.0
    nb = row.shape[0] // 34
    b = 0
    while b + 2 <= nb:
        o = b * 34
        e = b * 32
        d0 = f16_to_f32(row[o], row[o + 1])
        d1 = f16_to_f32(row[o + 34], row[o + 35])
        for j in range(32):
            acc[j] += d0 * (np.float32(np.int8(row[o + 2 + j])) * x[e + j])
            acc[32 + j] += d1 * (np.float32(np.int8(row[o + 36 + j])) * x[e + 32 + j])
        b += 2
    if b < nb:
        o = b * 34
        e = b * 32
        d0 = f16_to_f32(row[o], row[o + 1])
        for j in range(32):
            acc[j] += d0 * (np.float32(np.int8(row[o + 2 + j])) * x[e + j])
    return acc.sum()


@njit(cache=True, nogil=True, parallel=True, fastmath=False)
def matvec_q8_0(w, x, out):
    rows = w.shape[0]
    for c in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        acc = np.empty(64, np.float32)
        for r in range(c * ROWS_PER_TASK, min(rows, (c + 1) * ROWS_PER_TASK)):
            out[r] = _dot_q8_0(w[r], x, acc)


# ---------------------------------------------------------------- IQ4_NL (18 bytes)


@njit(cache=True, nogil=True, fastmath=False)
def deq_iq4_nl(src, dst):
    for b in range(src.shape[0] // 18):  # constant trip count: the table lookups
        o = b * 18                         # vectorise worse than they unroll
        e = b * 32
        d = f16_to_f32(src[o], src[o + 1])
        for j in range(16):
            q = src[o + 2 + j]
            dst[e + j] = d * IQ4_KV[q & 15]
            dst[e + 16 + j] = d * IQ4_KV[q >> 4]


# MXFP4 (gpt-oss experts): 32 e2m1 values (doubled: the table below) and one E8M0
# exponent per block; the scale is 2^(e-128), ggml_e8m0_to_fp32_half, as a table.
MXFP4_KV = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float32)
_E = np.arange(256, dtype=np.uint32)
E8M0_HALF = np.where(_E < 2, np.uint32(0x00200000) << _E,
                     (_E - np.uint32(1)) << np.uint32(23)).astype(np.uint32).view(np.float32)


@njit(cache=True, nogil=True, fastmath=FAST)
def deq_mxfp4(src, dst):
    for b in range(src.shape[0] // 17):
        o = b * 17
        e = b * 32
        d = E8M0_HALF[src[o]]
        for j in range(16):
            q = src[o + 1 + j]
            dst[e + j] = d * MXFP4_KV[q & 15]
            dst[e + 16 + j] = d * MXFP4_KV[q >> 4]
