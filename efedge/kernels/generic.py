"""Type-generic kernels: dequantize rows, matvec through a row buffer, and the tiled matmul.

``deq_row`` dispatches on the integer quant type (``gguf.GGMLQuantizationType`` values)
inside numba, so each generic kernel below is compiled once for every type instead of
once per type. The per-row branch costs nothing next to decoding a row.
"""

import numpy as np
from gguf import GGMLQuantizationType as Q
from numba import njit, prange

from . import _calls
from . import quant_iq as iq
from . import quant_k as k
from . import quant_legacy as lg
from ._fp import FAST, dot

F32, F16, BF16 = int(Q.F32), int(Q.F16), int(Q.BF16)
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = int(Q.Q4_0), int(Q.Q4_1), int(Q.Q5_0), int(Q.Q5_1), int(Q.Q8_0)
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = int(Q.Q2_K), int(Q.Q3_K), int(Q.Q4_K), int(Q.Q5_K), int(Q.Q6_K)
IQ4_NL, IQ4_XS, MXFP4 = int(Q.IQ4_NL), int(Q.IQ4_XS), int(Q.MXFP4)
IQ2_XXS, IQ2_XS, IQ2_S = int(Q.IQ2_XXS), int(Q.IQ2_XS), int(Q.IQ2_S)
IQ3_XXS, IQ3_S, IQ1_S, IQ1_M = int(Q.IQ3_XXS), int(Q.IQ3_S), int(Q.IQ1_S), int(Q.IQ1_M)
TQ1_0, TQ2_0 = int(Q.TQ1_0), int(Q.TQ2_0)

ROWS_PER_TASK = 16  # rows one prange iteration of matvec_generic handles (one buffer each)


@njit(cache=True, nogil=True, fastmath=False)
def deq_row(qt, src, dst):
    """Decode one row of raw blocks ``src`` (uint8) of quant type ``qt`` into ``dst``."""
    if qt == Q4_0:
        lg.deq_q4_0(src, dst)
    elif qt == Q8_0:
        lg.deq_q8_0(src, dst)
    elif qt == Q4_K:
        k.deq_q4_k(src, dst)
    elif qt == Q6_K:
        k.deq_q6_k(src, dst)
    elif qt == Q5_K:
        k.deq_q5_k(src, dst)
    elif qt == Q3_K:
        k.deq_q3_k(src, dst)
    elif qt == Q2_K:
        k.deq_q2_k(src, dst)
    elif qt == IQ4_XS:
        k.deq_iq4_xs(src, dst)
    elif qt == IQ4_NL:
        lg.deq_iq4_nl(src, dst)
    elif qt == MXFP4:
        lg.deq_mxfp4(src, dst)
    elif qt == Q4_1:
        lg.deq_q4_1(src, dst)
    elif qt == Q5_0:
        lg.deq_q5_0(src, dst)
    elif qt == Q5_1:
        lg.deq_q5_1(src, dst)
    elif qt == F32:
        lg.deq_f32(src, dst)
    elif qt == F16:
        lg.deq_f16(src, dst)
    elif qt == BF16:
        lg.deq_bf16(src, dst)
    elif qt == IQ2_XXS:
        iq.deq_iq2_xxs(src, dst)
    elif qt == IQ2_XS:
        iq.deq_iq2_xs(src, dst)
    elif qt == IQ2_S:
        iq.deq_iq2_s(src, dst)
    elif qt == IQ3_XXS:
        iq.deq_iq3_xxs(src, dst)
    elif qt == IQ3_S:
        iq.deq_iq3_s(src, dst)
    elif qt == IQ1_S:
        iq.deq_iq1_s(src, dst)
    elif qt == IQ1_M:
        iq.deq_iq1_m(src, dst)
    elif qt == TQ1_0:
        iq.deq_tq1_0(src, dst)
    elif qt == TQ2_0:
        iq.deq_tq2_0(src, dst)


@njit(cache=True, nogil=True, parallel=True, fastmath=False)
def dequantize_rows(qt, raw, out):
    """raw: uint8 [rows, row_bytes] -> out: float32 [rows, row_len]."""
    for r in prange(raw.shape[0]):
        _calls.deq_row(qt, raw[r], out[r])


@njit(cache=True, nogil=True, parallel=True, fastmath=False)
def matvec_generic(qt, w, x, out):
    """out[r] = dot(dequant(w[r]), x), through one row buffer per task."""
    rows = w.shape[0]
    n_tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for c in prange(n_tasks):
        buf = np.empty(x.shape[0], np.float32)
        for r in range(c * ROWS_PER_TASK, min(rows, (c + 1) * ROWS_PER_TASK)):
            _calls.deq_row(qt, w[r], buf)
            out[r] = dot(buf, x)


@njit(cache=True, nogil=True, fastmath=FAST)
def _gemm_4x4(buf, i, x, t, out, r0):
    """out[t:t+4, r0+i : r0+i+4] from rows buf[i:i+4] and tokens x[t:t+4].

    16 accumulators, each vectorised along n by LLVM: 8 loads feed 16 FMAs.
    """
    a00 = a01 = a02 = a03 = np.float32(0.0)
    a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = np.float32(0.0)
    a30 = a31 = a32 = a33 = np.float32(0.0)
    for j in range(x.shape[1]):
        w0 = buf[i, j]
        w1 = buf[i + 1, j]
        w2 = buf[i + 2, j]
        w3 = buf[i + 3, j]
        x0 = x[t, j]
        x1 = x[t + 1, j]
        x2 = x[t + 2, j]
        x3 = x[t + 3, j]
        a00 += w0 * x0
        a01 += w1 * x0
        a02 += w2 * x0
        a03 += w3 * x0
        a10 += w0 * x1
        a11 += w1 * x1
        a12 += w2 * x1
        a13 += w3 * x1
        a20 += w0 * x2
        a21 += w1 * x2
        a22 += w2 * x2
        a23 += w3 * x2
        a30 += w0 * x3
        a31 += w1 * x3
        a32 += w2 * x3
        a33 += w3 * x3
    c = r0 + i
    out[t, c], out[t, c + 1], out[t, c + 2], out[t, c + 3] = a00, a01, a02, a03
    out[t + 1, c], out[t + 1, c + 1], out[t + 1, c + 2], out[t + 1, c + 3] = a10, a11, a12, a13
    out[t + 2, c], out[t + 2, c + 1], out[t + 2, c + 2], out[t + 2, c + 3] = a20, a21, a22, a23
    out[t + 3, c], out[t + 3, c + 1], out[t + 3, c + 2], out[t + 3, c + 3] = a30, a31, a32, a33


@njit(cache=True, nogil=True, fastmath=False)
def _gemm_tile(buf, nr, x, out, r0):
    """out[t, r0 + i] = dot(buf[i], x[t]) for rows i < nr and every token t.

    Register tiles of 4 rows x 4 tokens; the tile's rows stay in L2 while x streams.
    Every (row, token) pair goes through the same 4 x 4 kernel, the last rows and tokens
    padded with zeros, so its value does not depend on how many rows or tokens share
    the call (a prompt's logits do not depend on how it was split into batches).
    """
    n_tok, n = x.shape
    nr4, nt4 = nr // 4 * 4, n_tok // 4 * 4
    for t in range(0, nt4, 4):
        for i in range(0, nr4, 4):
            _gemm_4x4(buf, i, x, t, out, r0)
    if nt4 == n_tok and nr4 == nr:
        return
    # the blocks at the edges: their tokens (xp) and rows (bp) padded with zeros, into op
    xp = np.zeros((4, n), np.float32)
    bp = np.zeros((4, n), np.float32)
    op = np.empty((4, 4), np.float32)
    for i in range(nr - nr4):
        bp[i] = buf[nr4 + i]
    for t in range(0, n_tok, 4):
        nt = min(4, n_tok - t)
        first = 0 if nt < 4 else nr4  # a full group of tokens: only its last rows are left
        if first >= nr:
            continue
        xp[:nt] = x[t:t + nt]
        xp[nt:] = 0.0
        for i in range(first, nr, 4):
            ni = min(4, nr - i)
            if ni == 4:  # (r0 = -i: the block's columns land in op's 0..3)
                _gemm_4x4(buf, i, xp, 0, op, -i)
            else:
                _gemm_4x4(bp, 0, xp, 0, op, 0)
            out[t:t + nt, r0 + i:r0 + i + ni] = op[:nt, :ni]


@njit(cache=True, nogil=True, parallel=True, fastmath=False)
def matmul_tiled(qt, w, x, out, tile):
    """out[T, rows] = x[T, n] @ dequant(w)[rows, n].T, each weight row decoded once.

    Rows are split into tiles of ``tile`` rows; a task decodes its tile into a private
    float32 buffer and multiplies it with every token.
    """
    rows = w.shape[0]
    n = x.shape[1]
    n_tiles = (rows + tile - 1) // tile
    for c in prange(n_tiles):
        buf = np.empty((tile, n), np.float32)
        r0 = c * tile
        nr = min(rows, r0 + tile) - r0
        for i in range(nr):
            _calls.deq_row(qt, w[r0 + i], buf[i])
        _gemm_tile(buf, nr, x, out, r0)
