"""The 256-element super-block quants: Q2_K Q3_K Q4_K Q5_K Q6_K and IQ4_XS.

Same contract as ``quant_legacy``: ``deq_*(src, dst)`` decodes one row bit-identically to
``gguf.quants.dequantize`` (gguf-py's float32 operation order), ``matvec_*(w, x, out)``
are the fused paths (Q4_K, Q6_K). Offsets below are bytes inside one super-block.

Q2_K (84):  scales[16] @0 (lo nibble scale, hi nibble min), qs[64] @16, d @80, dmin @82
Q3_K (110): hmask[32] @0, qs[64] @32, scales[12] @96 (16 x 6 bit, minus 32), d @108
Q4_K (144): d @0, dmin @2, scales[12] @4 (8 scales + 8 mins, 6 bit), qs[128] @16
Q5_K (176): d @0, dmin @2, scales[12] @4, qh[32] @16, qs[128] @48
Q6_K (210): ql[128] @0, qh[64] @128, scales[16] int8 @192, d @208
IQ4_XS (136): d @0, scales_h u16 @2, scales_l[4] @4, qs[128] @8 (indices into IQ4_KV)
"""

import numpy as np
from numba import njit, prange

from ._fp import FAST, f16_to_f32, small_f32
from .quant_legacy import IQ4_KV

# ---------------------------------------------------------------- Q2_K


@njit(cache=True, nogil=True, fastmath=False)
def deq_q2_k(src, dst):
    nb = src.shape[0] // 84
    n32 = dst.shape[0] // max(nb, 1) // 8  # 32, a runtime trip count (see quant_legacy)
    for b in range(nb):
        o = b * 84
        d = f16_to_f32(src[o + 80], src[o + 81])
        dmin = f16_to_f32(src[o + 82], src[o + 83])
        for p in range(8):  # elements 32p .. 32p+31 = sub-blocks 2p, 2p+1: bits 2s, 2s+1
            # (s = p % 4) of the bytes qs[32 (p // 4) + l]
            sa = src[o + 2 * p]
            sb = src[o + 2 * p + 1]
            dla = d * np.float32(sa & 15)
            dlb = d * np.float32(sb & 15)
            mla = dmin * np.float32(sa >> 4)
            mlb = dmin * np.float32(sb >> 4)
            q0 = o + 16 + (p // 4) * 32
            s = 2 * (p % 4)
            e = b * 256 + p * 32
            for l in range(n32):
                dl = dla if l < 16 else dlb
                ml = mla if l < 16 else mlb
                dst[e + l] = dl * small_f32((src[q0 + l] >> s) & 3, 0) - ml


# ---------------------------------------------------------------- Q3_K


@njit(cache=True, nogil=True, fastmath=False)
def _q3_scale(src, o, i):
    """Signed 6-bit scale ``i`` (0..15) of the Q3_K scales at ``src[o:o+12]``."""
    lo = (src[o + i % 8] >> (4 * (i // 8))) & 15
    hi = (src[o + 8 + i % 4] >> (2 * (i // 4))) & 3
    return np.int32(lo | (hi << 4)) - 32


@njit(cache=True, nogil=True, fastmath=False)
def deq_q3_k(src, dst):
    nb = src.shape[0] // 110
    n32 = dst.shape[0] // max(nb, 1) // 8
    for b in range(nb):
        o = b * 110
        d = f16_to_f32(src[o + 108], src[o + 109])
        for p in range(8):  # elements 32 p .. 32 p + 31 = sub-blocks 2p, 2p+1
            dla = d * np.float32(_q3_scale(src, o + 96, 2 * p))
            dlb = d * np.float32(_q3_scale(src, o + 96, 2 * p + 1))
            q0 = o + 32 + (p // 4) * 32  # low 2 bits: bits 2s..2s+1 of qs[32 (p // 4) + l]
            s = 2 * (p % 4)
            e = b * 256 + p * 32
            for l in range(n32):
                dl = dla if l < 16 else dlb
                # high bit: bit p of hmask[l]; the offset is 4 when that bit is 0
                q = ((src[q0 + l] >> s) & 3) + 4 * ((src[o + l] >> p) & 1)
                dst[e + l] = dl * small_f32(q, 4)


# ---------------------------------------------------------------- Q4_K and Q5_K


@njit(cache=True, nogil=True, fastmath=False)
def k_scale_min(src, o, j):
    """(scale, min) of sub-block ``j`` (0..7) from the 12 packed bytes at ``src[o:]``."""
    if j < 4:
        return src[o + j] & 63, src[o + 4 + j] & 63
    sc = (src[o + 4 + j] & 15) | ((src[o + j - 4] >> 2) & 0x30)
    m = (src[o + 4 + j] >> 4) | ((src[o + j] >> 2) & 0x30)
    return sc, m


@njit(cache=True, nogil=True, fastmath=False)
def deq_q4_k(src, dst):
    nb = src.shape[0] // 144
    n32 = dst.shape[0] // max(nb, 1) // 8
    for b in range(nb):
        o = b * 144
        d = f16_to_f32(src[o], src[o + 1])
        dmin = f16_to_f32(src[o + 2], src[o + 3])
        for j in range(8):  # sub-block j: nibble j % 2 of the 32 bytes of group j // 2
            sc, m = k_scale_min(src, o + 4, j)
            dl = d * np.float32(sc)
            ml = dmin * np.float32(m)
            q0 = o + 16 + (j // 2) * 32
            s = 4 * (j % 2)
            e = b * 256 + j * 32
            for l in range(n32):
                dst[e + l] = dl * small_f32((src[q0 + l] >> s) & 15, 0) - ml


# The fused dots follow quant_legacy: float32 lanes in ``acc`` with the sub-block scales
# folded in per lane, no horizontal sums inside the row.
ROWS_PER_TASK = 8


@njit(cache=True, nogil=True, fastmath=FAST)
def _dot_q4_k(row, x, xsum, acc):
    """xsum[i] = sum(x[32 i : 32 i + 32]): the mins need only the sub-block sums of x."""
    acc[:] = 0.0
    mins = 0.0
    for b in range(row.shape[0] // 144):
        o = b * 144
        d = f16_to_f32(row[o], row[o + 1])
        dmin = f16_to_f32(row[o + 2], row[o + 3])
        for g in range(0, 4, 2):  # groups g, g+1 of 32 bytes = sub-blocks 2g .. 2g+3
            sc0, m0 = k_scale_min(row, o + 4, 2 * g)
            sc1, m1 = k_scale_min(row, o + 4, 2 * g + 1)
            sc2, m2 = k_scale_min(row, o + 4, 2 * g + 2)
            sc3, m3 = k_scale_min(row, o + 4, 2 * g + 3)
            d0 = d * np.float32(sc0)
            d1 = d * np.float32(sc1)
            d2 = d * np.float32(sc2)
            d3 = d * np.float32(sc3)
            q = o + 16 + g * 32
            e = b * 256 + g * 64
            for l in range(32):
                qa = row[q + l]
                qb = row[q + 32 + l]
                acc[l] += (d0 * (small_f32(qa & 15, 0) * x[e + l])
                           + d1 * (small_f32(qa >> 4, 0) * x[e + 32 + l]))
                acc[32 + l] += (d2 * (small_f32(qb & 15, 0) * x[e + 64 + l])
                                + d3 * (small_f32(qb >> 4, 0) * x[e + 96 + l]))
            s = e // 32
            mins += dmin * (np.float32(m0) * xsum[s] + np.float32(m1) * xsum[s + 1]
                            + np.float32(m2) * xsum[s + 2] + np.float32(m3) * xsum[s + 3])
    return acc.sum() - mins


@njit(cache=True, nogil=True, fastmath=FAST)
def block_sums(x, out):
    """out[i] = sum of x[32 i : 32 i + 32]."""
    for i in range(out.shape[0]):
        s = np.float32(0.0)
        for j in range(32):
            s += x[32 * i + j]
        out[i] = s


@njit(cache=True, nogil=True, parallel=True, fastmath=False)
def matvec_q4_k(w, x, out):
    rows = w.shape[0]
    xsum = np.empty(x.shape[0] // 32, np.float32)
    block_sums(x, xsum)
    for c in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        acc = np.empty(64, np.float32)
        for r in range(c * ROWS_PER_TASK, min(rows, (c + 1) * ROWS_PER_TASK)):
            out[r] = _dot_q4_k(w[r], x, xsum, acc)


@njit(cache=True, nogil=True, fastmath=False)
def deq_q5_k(src, dst):
    nb = src.shape[0] // 176
    n32 = dst.shape[0] // max(nb, 1) // 8
    for b in range(nb):
        o = b * 176
        d = f16_to_f32(src[o], src[o + 1])
        dmin = f16_to_f32(src[o + 2], src[o + 3])
        for j in range(8):  # as Q4_K, plus bit j of qh[l] as the 5th bit
            sc, m = k_scale_min(src, o + 4, j)
            dl = d * np.float32(sc)
            ml = dmin * np.float32(m)
            q0 = o + 48 + (j // 2) * 32
            s = 4 * (j % 2)
            e = b * 256 + j * 32
            for l in range(n32):
                q = ((src[q0 + l] >> s) & 15) | (((src[o + 16 + l] >> j) & 1) << 4)
                dst[e + l] = dl * small_f32(q, 0) - ml


# ---------------------------------------------------------------- Q6_K


@njit(cache=True, nogil=True, fastmath=False)
def deq_q6_k(src, dst):
    nb = src.shape[0] // 210
    n32 = dst.shape[0] // max(nb, 1) // 8
    for b in range(nb):
        o = b * 210
        d = f16_to_f32(src[o + 208], src[o + 209])
        for h in range(2):  # two halves of 128 elements
            qh = o + 128 + h * 32
            for c in range(4):  # elements c*32 .. c*32+31 of the half
                ql = o + h * 64 + (c % 2) * 32  # low nibble (c < 2) or high (c >= 2)
                sl = 4 * (c // 2)
                i = o + 192 + h * 8 + c * 2  # int8 scales of sub-blocks i, i+1
                dla = d * np.float32(np.int8(src[i]))
                dlb = d * np.float32(np.int8(src[i + 1]))
                e = b * 256 + h * 128 + c * 32
                for l in range(n32):
                    dl = dla if l < 16 else dlb
                    q = ((src[ql + l] >> sl) & 15) | (((src[qh + l] >> (2 * c)) & 3) << 4)
                    dst[e + l] = dl * small_f32(q, 32)


@njit(cache=True, nogil=True, fastmath=FAST)
def _dot_q6_k(row, x, acc):
    acc[:] = 0.0
    for b in range(row.shape[0] // 210):
        o = b * 210
        d = f16_to_f32(row[o + 208], row[o + 209])
        for h in range(2):  # 128 elements: ql[64], qh[32], scales[8]
            ql = o + h * 64
            qh = o + 128 + h * 32
            sc = o + 192 + h * 8
            e = b * 256 + h * 128
            for half in range(2):  # bytes l < 16 and l >= 16 use different scales
                d0 = d * np.float32(np.int8(row[sc + half]))
                d1 = d * np.float32(np.int8(row[sc + 2 + half]))
                d2 = d * np.float32(np.int8(row[sc + 4 + half]))
                d3 = d * np.float32(np.int8(row[sc + 6 + half]))
                for l in range(half * 16, half * 16 + 16):
                    a = row[ql + l]
                    c = row[ql + 32 + l]
                    hb = row[qh + l]
                    acc[l] += (d0 * (small_f32((a & 15) | ((hb & 3) << 4), 32) * x[e + l])
                               + d1 * (small_f32((c & 15) | ((hb & 12) << 2), 32) * x[e + 32 + l])
                               + d2 * (small_f32((a >> 4) | (hb & 48), 32) * x[e + 64 + l])
                               + d3 * (small_f32((c >> 4) | ((hb >> 2) & 48), 32)
                                       * x[e + 96 + l]))
    return acc.sum()


@njit(cache=True, nogil=True, parallel=True, fastmath=False)
def matvec_q6_k(w, x, out):
    rows = w.shape[0]
    for c in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        acc = np.empty(32, np.float32)
        for r in range(c * ROWS_PER_TASK, min(rows, (c + 1) * ROWS_PER_TASK)):
            out[r] = _dot_q6_k(w[r], x, acc)


# ---------------------------------------------------------------- IQ4_XS


@njit(cache=True, nogil=True, fastmath=False)
def deq_iq4_xs(src, dst):
    for b in range(src.shape[0] // 136):
        o = b * 136
        d = f16_to_f32(src[o], src[o + 1])
        sh = np.int64(src[o + 2]) | (np.int64(src[o + 3]) << 8)
        for j in range(8):
            lo = (src[o + 4 + j // 2] >> (4 * (j % 2))) & 15
            hi = (sh >> (2 * j)) & 3
            dl = d * np.float32(np.int32(lo | (hi << 4)) - 32)
            q0 = o + 8 + j * 16
            e = b * 256 + j * 32
            for l in range(16):
                q = src[q0 + l]
                dst[e + l] = dl * IQ4_KV[q & 15]
                dst[e + 16 + l] = dl * IQ4_KV[q >> 4]
