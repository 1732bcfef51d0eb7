"""The low-bit lattice quants (IQ1_S IQ1_M IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S) and the
ternary TQ1_0 / TQ2_0: 256-element super-blocks.

Same contract as ``quant_legacy`` and ``quant_k``: ``deq_*(src, dst)`` decodes one row of
raw blocks bit-identically to ``gguf.quants.dequantize`` (gguf-py's float32 operation
order: ``(d · scale) · grid`` then the sign, or ``dl · (grid + delta)`` for IQ1). Every
bit pattern of the index and sign fields is valid data, so nothing here can read past a
table. There is no fused or integer path: rows go through ``generic.deq_row`` and a float
dot against activations rounded to Q8_K (llama.cpp's vec_dot_type for all nine types).

The lattices ("grids") are taken from the installed gguf package at import time
(``gguf.quants.<TYPE>.init_grid()``: the tables of llama.cpp's ggml-common.h, packed) and
become constants of the compiled kernels; ``KSIGNS`` is gguf's copy of ggml's ksigns_iq2xs
(7 sign bits + an even-parity 8th).

Block layouts (bytes; u16 / u32 little-endian):
IQ2_XXS (66):  d @0; 8 × (4 grid bytes, u32: 4 × 7-bit sign index, scale in bits 28-31) @2
IQ2_XS (74):   d @0; qs u16[32] @2 (9-bit grid index, 7-bit sign index); scales[8] @66
IQ2_S (82):    d @0; qs[32] @2; signs[32] @34; qh[8] @66 (2 high index bits per group);
               scales[8] @74 (two 4-bit scales per 32 elements)
IQ3_XXS (98):  d @0; qs[64] @2 (grid of 4); 8 × u32 @66 (4 × 7-bit sign index, scale)
IQ3_S (110):   d @0; qs[64] @2; qh[8] @66 (9th index bit); signs[32] @74; scales[4] @106
IQ1_S (50):    d @0; qs[32] @2; qh u16[8] @34 (3 × 4 high index bits, 3-bit scale, delta sign)
IQ1_M (56):    qs[32] @0; qh[16] @32 (3 high index bits + delta sign per nibble);
               scales u16[4] @48 (3-bit scales; the fp16 d in their top nibbles)
TQ1_0 (54):    qs[48] @0 (5 trits per byte), qh[4] @48 (4 trits per byte); d @52
TQ2_0 (66):    qs[64] @0 (2 bits per element, value - 1); d @64
"""

import numpy as np
from gguf import quants as _gq
from numba import njit

from ._fp import f16_to_f32


def _grid(cls) -> np.ndarray:
    """The lattice of a gguf-py quant class as float32 [points, width] (small ints)."""
    cls.init_grid()
    g = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
    assert np.array_equal(np.rint(g), g), cls.__name__
    return np.ascontiguousarray(g)


def _sign_rows(bytes_: np.ndarray) -> np.ndarray:
    """float32 [n, 8]: -1 where bit j of byte i is set, else +1. gguf-py multiplies by
    these, so the decoders do too (no branch: the 8-element loops vectorise)."""
    bits = (bytes_.astype(np.uint8)[:, None] >> np.arange(8, dtype=np.uint8)) & 1
    return np.where(bits == 0, np.float32(1), np.float32(-1)).astype(np.float32)


IQ2XXS_GRID = _grid(_gq.IQ2_XXS)  # [256, 8]  values 8, 25, 43
IQ2XS_GRID = _grid(_gq.IQ2_XS)  # [512, 8]
IQ2S_GRID = _grid(_gq.IQ2_S)  # [1024, 8]
IQ3XXS_GRID = _grid(_gq.IQ3_XXS)  # [256, 4]  values 4 … 62
IQ3S_GRID = _grid(_gq.IQ3_S)  # [512, 4]  values 1 … 15
IQ1S_GRID = _grid(_gq.IQ1_S)  # [2048, 8] values -1, 0, 1 (IQ1_M shares it)
KSIGNS = np.frombuffer(_gq.IQ2_XXS.ksigns, dtype=np.uint8).copy()  # [128]
KSIGN_ROWS = _sign_rows(KSIGNS)  # [128, 8]: a 7-bit sign index → the 8 signs
BYTE_SIGN_ROWS = _sign_rows(np.arange(256))  # [256, 8]: a sign byte → the 8 signs

_HALF = np.float32(0.5)
_QUARTER = np.float32(0.25)
_DELTA = np.float32(_gq.IQ1_S.delta)  # 0.125
_NEG_DELTA = -_DELTA


@njit(cache=True, nogil=True, fastmath=False)
def _u16(src, o):
    return np.int64(src[o]) | (np.int64(src[o + 1]) << 8)


@njit(cache=True, nogil=True, fastmath=False)
def _u32(src, o):
    return _u16(src, o) | (_u16(src, o + 2) << 16)


@njit(cache=True, nogil=True, fastmath=False)
def _put8(dst, e, db, grid, g, signs, s):
    """dst[e:e+8] = (db · grid[g]) · signs[s] (signs: a table of ±1 rows)."""
    for j in range(8):
        dst[e + j] = (db * grid[g, j]) * signs[s, j]


@njit(cache=True, nogil=True, fastmath=False)
def _put4x2(dst, e, db, grid, g0, g1, signs, s):
    """dst[e:e+8] = (db · grid points g0 then g1 of a 4-wide lattice) · signs[s]."""
    for j in range(4):
        dst[e + j] = (db * grid[g0, j]) * signs[s, j]
        dst[e + 4 + j] = (db * grid[g1, j]) * signs[s, 4 + j]


# ---------------------------------------------------------------- IQ2_XXS, IQ2_XS, IQ2_S


@njit(cache=True, nogil=True, fastmath=False)
def deq_iq2_xxs(src, dst):
    for b in range(src.shape[0] // 66):
        o = b * 66
        d = f16_to_f32(src[o], src[o + 1])
        for ib in range(8):
            q = o + 2 + 8 * ib
            aux = _u32(src, q + 4)
            db = d * (_HALF + np.float32(aux >> 28)) * _QUARTER
            for l in range(4):
                _put8(dst, b * 256 + 32 * ib + 8 * l, db, IQ2XXS_GRID, src[q + l],
                      KSIGN_ROWS, (aux >> (7 * l)) & 127)


@njit(cache=True, nogil=True, fastmath=False)
def deq_iq2_xs(src, dst):
    for b in range(src.shape[0] // 74):
        o = b * 74
        d = f16_to_f32(src[o], src[o + 1])
        for k in range(16):  # 16 groups of 16 elements, one 4-bit scale each
            s = (src[o + 66 + k // 2] >> (4 * (k % 2))) & 15
            db = d * (_HALF + np.float32(s)) * _QUARTER
            for h in range(2):
                q = _u16(src, o + 2 + 2 * (2 * k + h))
                _put8(dst, b * 256 + 16 * k + 8 * h, db, IQ2XS_GRID, q & 511,
                      KSIGN_ROWS, q >> 9)


@njit(cache=True, nogil=True, fastmath=False)
def deq_iq2_s(src, dst):
    for b in range(src.shape[0] // 82):
        o = b * 82
        d = f16_to_f32(src[o], src[o + 1])
        for k in range(16):
            s = (src[o + 74 + k // 2] >> (4 * (k % 2))) & 15
            db = d * (_HALF + np.float32(s)) * _QUARTER
            for h in range(2):
                i = 2 * k + h  # group of 8 elements
                g = np.int64(src[o + 2 + i]) | (((np.int64(src[o + 66 + i // 4])
                                                  >> (2 * (i % 4))) & 3) << 8)
                _put8(dst, b * 256 + 8 * i, db, IQ2S_GRID, g, BYTE_SIGN_ROWS, src[o + 34 + i])


# ---------------------------------------------------------------- IQ3_XXS, IQ3_S


@njit(cache=True, nogil=True, fastmath=False)
def deq_iq3_xxs(src, dst):
    for b in range(src.shape[0] // 98):
        o = b * 98
        d = f16_to_f32(src[o], src[o + 1])
        for ib in range(8):
            aux = _u32(src, o + 66 + 4 * ib)
            db = d * (_HALF + np.float32(aux >> 28)) * _HALF
            q = o + 2 + 8 * ib
            for l in range(4):
                _put4x2(dst, b * 256 + 32 * ib + 8 * l, db, IQ3XXS_GRID, src[q + 2 * l],
                        src[q + 2 * l + 1], KSIGN_ROWS, (aux >> (7 * l)) & 127)


@njit(cache=True, nogil=True, fastmath=False)
def deq_iq3_s(src, dst):
    for b in range(src.shape[0] // 110):
        o = b * 110
        d = f16_to_f32(src[o], src[o + 1])
        for ib in range(8):
            s = (src[o + 106 + ib // 2] >> (4 * (ib % 2))) & 15
            db = d * np.float32(1 + 2 * s)
            for l in range(4):
                i = 4 * ib + l  # group of 8 elements: grid points 2i, 2i + 1
                qh = np.int64(src[o + 66 + i // 4]) >> (2 * (i % 4))  # their 9th bits
                g0 = np.int64(src[o + 2 + 2 * i]) | ((qh & 1) << 8)
                g1 = np.int64(src[o + 3 + 2 * i]) | (((qh >> 1) & 1) << 8)
                _put4x2(dst, b * 256 + 8 * i, db, IQ3S_GRID, g0, g1, BYTE_SIGN_ROWS,
                        src[o + 74 + i])


# ---------------------------------------------------------------- IQ1_S, IQ1_M


@njit(cache=True, nogil=True, fastmath=False)
def _put_iq1(dst, e, dl, g, delta):
    for j in range(8):
        dst[e + j] = dl * (IQ1S_GRID[g, j] + delta)


@njit(cache=True, nogil=True, fastmath=False)
def deq_iq1_s(src, dst):
    for b in range(src.shape[0] // 50):
        o = b * 50
        d = f16_to_f32(src[o], src[o + 1])
        for ib in range(8):
            qh = _u16(src, o + 34 + 2 * ib)
            dl = d * np.float32(2 * ((qh >> 12) & 7) + 1)
            delta = _NEG_DELTA if qh & 0x8000 else _DELTA
            for l in range(4):
                g = np.int64(src[o + 2 + 4 * ib + l]) | (((qh >> (3 * l)) & 7) << 8)
                _put_iq1(dst, b * 256 + 32 * ib + 8 * l, dl, g, delta)


@njit(cache=True, nogil=True, fastmath=False)
def deq_iq1_m(src, dst):
    for b in range(src.shape[0] // 56):
        o = b * 56
        sc0, sc1 = _u16(src, o + 48), _u16(src, o + 50)
        sc2, sc3 = _u16(src, o + 52), _u16(src, o + 54)
        h = (sc0 >> 12) | ((sc1 >> 8) & 0xF0) | ((sc2 >> 4) & 0xF00) | (sc3 & 0xF000)
        d = f16_to_f32(h & 0xFF, h >> 8)
        for k in range(16):  # 16 elements per 3-bit scale: bits 3 (k % 4) of word k // 4
            s = (_u16(src, o + 48 + 2 * (k // 4)) >> (3 * (k % 4))) & 7
            dl = d * np.float32(2 * s + 1)
            for h2 in range(2):
                i = 2 * k + h2  # group of 8: nibble i % 2 of qh[i // 2]
                nib = (np.int64(src[o + 32 + i // 2]) >> (4 * (i % 2))) & 15
                g = np.int64(src[o + i]) | ((nib & 7) << 8)
                _put_iq1(dst, b * 256 + 8 * i, dl, g, _NEG_DELTA if nib & 8 else _DELTA)


# ---------------------------------------------------------------- TQ1_0, TQ2_0


@njit(cache=True, nogil=True, fastmath=False)
def _trit(byte, pow3):
    """Trit of a TQ1_0 byte: (byte · 3^m mod 256) · 3 >> 8, minus 1."""
    return np.float32(((((np.int64(byte) * pow3) & 255) * 3) >> 8) - 1)


@njit(cache=True, nogil=True, fastmath=False)
def deq_tq1_0(src, dst):
    for b in range(src.shape[0] // 54):
        o = b * 54
        d = f16_to_f32(src[o + 52], src[o + 53])
        e = b * 256
        pow3 = 1
        for m in range(5):
            for j in range(32):  # qs[0:32]: elements 32 m + j
                dst[e + 32 * m + j] = d * _trit(src[o + j], pow3)
            for j in range(16):  # qs[32:48]: elements 160 + 16 m + j
                dst[e + 160 + 16 * m + j] = d * _trit(src[o + 32 + j], pow3)
            if m < 4:
                for j in range(4):  # qh[0:4]: elements 240 + 4 m + j
                    dst[e + 240 + 4 * m + j] = d * _trit(src[o + 48 + j], pow3)
            pow3 *= 3


@njit(cache=True, nogil=True, fastmath=False)
def deq_tq2_0(src, dst):
    for b in range(src.shape[0] // 66):
        o = b * 66
        d = f16_to_f32(src[o + 64], src[o + 65])
        for c in range(2):
            for m in range(4):
                e = b * 256 + 128 * c + 32 * m
                for j in range(32):
                    q = (np.int64(src[o + 32 * c + j]) >> (2 * m)) & 3
                    dst[e + j] = d * np.float32(q - 1)
