"""Plain float rows and the 32-element GGUF blocks: F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 IQ4_NL.

``deq_*(src, dst)`` decodes one row of raw blocks (uint8) into float32 with the float32
operation order of gguf-py's ``quants.py``, so the result is bit-identical to
``gguf.quants.dequantize``. ``matvec_*(w, x, out)`` are the fused decode paths: every row
is dotted with ``x`` block by block, without materialising the dequantized matrix.
The callers in ``efedge.kernels`` validate shapes first; nothing here bounds-checks.

Block layouts (bytes): Q4_0 = d f16, qs[16] (low nibbles are elements 0-15, high 16-31).
Q4_1 = d, m, qs[16]. Q5_0 = d, qh u32 (bit j = 5th bit of element j), qs[16].
Q5_1 = d, m, qh, qs[16]. Q8_0 = d, qs[32] int8. IQ4_NL = d, qs[16] indices into IQ4_KV.
"""

import numpy as np
from numba import njit, prange

from ._fp import FAST, bits_to_f32, f16_to_f32, f32_from_bytes

IQ4_KV = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                  dtype=np.float32)


# ---------------------------------------------------------------- plain float rows


@njit(cache=True, nogil=True)
def deq_f32(src, dst):
    for i in range(dst.shape[0]):
        dst[i] = f32_from_bytes(src, 4 * i)


@njit(cache=True, nogil=True)
def deq_f16(src, dst):
    for i in range(dst.shape[0]):
        dst[i] = f16_to_f32(src[2 * i], src[2 * i + 1])


@njit(cache=True, nogil=True)
def deq_bf16(src, dst):
    for i in range(dst.shape[0]):
        dst[i] = bits_to_f32((np.int64(src[2 * i + 1]) << 24) | (np.int64(src[2 * i]) << 16))


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
    """w: uint16 [rows, n] (the raw bytes viewed as uint16). Decodes 256 halves at a time."""
    n = x.shape[0]
    rows = w.shape[0]
    chunk = 16
    for c in prange((rows + chunk - 1) // chunk):
        buf = np.empty(256, np.float32)
        for r in range(c * chunk, min(rows, (c + 1) * chunk)):
            acc = 0.0
            for i0 in range(0, n, 256):
                m = min(256, n - i0)
                for i in range(m):
                    h = np.int64(w[r, i0 + i])
                    buf[i] = f16_to_f32(h & 0xFF, h >> 8)
                s = np.float32(0.0)
                for i in range(m):
                    s += buf[i] * x[i0 + i]
                acc += s
            out[r] = acc


# ---------------------------------------------------------------- Q4_0 (18 bytes)


@njit(cache=True, nogil=True)
def deq_q4_0(src, dst):
    for b in range(src.shape[0] // 18):
        o = b * 18
        e = b * 32
        d = f16_to_f32(src[o], src[o + 1])
        for j in range(16):
            q = src[o + 2 + j]
            dst[e + j] = d * np.float32(np.int32(q & 15) - 8)
            dst[e + 16 + j] = d * np.float32(np.int32(q >> 4) - 8)


@njit(cache=True, nogil=True, fastmath=FAST)
def _dot_q4_0(row, x):
    acc = 0.0
    for b in range(row.shape[0] // 18):
        o = b * 18
        e = b * 32
        s = np.float32(0.0)
        for j in range(16):
            q = np.int32(row[o + 2 + j])
            s += np.float32((q & 15) - 8) * x[e + j] + np.float32((q >> 4) - 8) * x[e + 16 + j]
        acc += f16_to_f32(row[o], row[o + 1]) * s
    return acc


@njit(cache=True, nogil=True, parallel=True)
def matvec_q4_0(w, x, out):
    for r in prange(w.shape[0]):
        out[r] = _dot_q4_0(w[r], x)


# ---------------------------------------------------------------- Q4_1 (20 bytes)


@njit(cache=True, nogil=True)
def deq_q4_1(src, dst):
    for b in range(src.shape[0] // 20):
        o = b * 20
        e = b * 32
        d = f16_to_f32(src[o], src[o + 1])
        m = f16_to_f32(src[o + 2], src[o + 3])
        for j in range(16):
            q = src[o + 4 + j]
            dst[e + j] = d * np.float32(q & 15) + m
            dst[e + 16 + j] = d * np.float32(q >> 4) + m


# ---------------------------------------------------------------- Q5_0 (22 bytes), Q5_1 (24)


@njit(cache=True, nogil=True)
def _qh32(src, o):
    """The 32 fifth bits of a Q5 block (little-endian uint32 at ``src[o:o+4]``)."""
    return ((np.int64(src[o + 3]) << 24) | (np.int64(src[o + 2]) << 16)
            | (np.int64(src[o + 1]) << 8) | np.int64(src[o]))


@njit(cache=True, nogil=True)
def deq_q5_0(src, dst):
    for b in range(src.shape[0] // 22):
        o = b * 22
        e = b * 32
        d = f16_to_f32(src[o], src[o + 1])
        qh = _qh32(src, o + 2)
        for j in range(16):
            q = src[o + 6 + j]
            lo = (q & 15) | (((qh >> j) & 1) << 4)
            hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
            dst[e + j] = d * np.float32(np.int32(lo) - 16)
            dst[e + 16 + j] = d * np.float32(np.int32(hi) - 16)


@njit(cache=True, nogil=True)
def deq_q5_1(src, dst):
    for b in range(src.shape[0] // 24):
        o = b * 24
        e = b * 32
        d = f16_to_f32(src[o], src[o + 1])
        m = f16_to_f32(src[o + 2], src[o + 3])
        qh = _qh32(src, o + 4)
        for j in range(16):
            q = src[o + 8 + j]
            lo = (q & 15) | (((qh >> j) & 1) << 4)
            hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
            dst[e + j] = d * np.float32(lo) + m
            dst[e + 16 + j] = d * np.float32(hi) + m


# ---------------------------------------------------------------- Q8_0 (34 bytes)


@njit(cache=True, nogil=True)
def deq_q8_0(src, dst):
    for b in range(src.shape[0] // 34):
        o = b * 34
        e = b * 32
        d = f16_to_f32(src[o], src[o + 1])
        for j in range(32):
            dst[e + j] = np.float32(np.int8(src[o + 2 + j])) * d


@njit(cache=True, nogil=True, fastmath=FAST)
def _dot_q8_0(row, x):
    acc = 0.0
    for b in range(row.shape[0] // 34):
        o = b * 34
        e = b * 32
        s = np.float32(0.0)
        for j in range(32):
            s += np.float32(np.int8(row[o + 2 + j])) * x[e + j]
        acc += f16_to_f32(row[o], row[o + 1]) * s
    return acc


@njit(cache=True, nogil=True, parallel=True)
def matvec_q8_0(w, x, out):
    for r in prange(w.shape[0]):
        out[r] = _dot_q8_0(w[r], x)


# ---------------------------------------------------------------- IQ4_NL (18 bytes)


@njit(cache=True, nogil=True)
def deq_iq4_nl(src, dst):
    for b in range(src.shape[0] // 18):
        o = b * 18
        e = b * 32
        d = f16_to_f32(src[o], src[o + 1])
        for j in range(16):
            q = src[o + 2 + j]
            dst[e + j] = d * IQ4_KV[q & 15]
            dst[e + 16 + j] = d * IQ4_KV[q >> 4]
