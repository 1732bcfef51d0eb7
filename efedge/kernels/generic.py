"""Type-generic kernels: dequantize rows, matvec through a row buffer, and the tiled matmul.

``deq_row`` dispatches on the integer quant type (``gguf.GGMLQuantizationType`` values)
inside numba, so each generic kernel below is compiled once for every type instead of
once per type. The per-row branch costs nothing next to decoding a row.
"""

import numpy as np
from gguf import GGMLQuantizationType as Q
from numba import njit, prange

from . import quant_k as k
from . import quant_legacy as lg
from ._fp import FAST, dot

F32, F16, BF16 = int(Q.F32), int(Q.F16), int(Q.BF16)
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = int(Q.Q4_0), int(Q.Q4_1), int(Q.Q5_0), int(Q.Q5_1), int(Q.Q8_0)
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = int(Q.Q2_K), int(Q.Q3_K), int(Q.Q4_K), int(Q.Q5_K), int(Q.Q6_K)
IQ4_NL, IQ4_XS = int(Q.IQ4_NL), int(Q.IQ4_XS)

ROWS_PER_TASK = 16  # rows one prange iteration of matvec_generic handles (one buffer each)


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True, parallel=True)
def dequantize_rows(qt, raw, out):
    """raw: uint8 [rows, row_bytes] -> out: float32 [rows, row_len]."""
    for r in prange(raw.shape[0]):
        deq_row(qt, raw[r], out[r])


@njit(cache=True, nogil=True, parallel=True)
def matvec_generic(qt, w, x, out):
    """out[r] = dot(dequant(w[r]), x), through one row buffer per task."""
    rows = w.shape[0]
    n_tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for c in prange(n_tasks):
        buf = np.empty(x.shape[0], np.float32)
        for r in range(c * ROWS_PER_TASK, min(rows, (c + 1) * ROWS_PER_TASK)):
            deq_row(qt, w[r], buf)
            out[r] = dot(buf, x)


@njit(cache=True, nogil=True, fastmath=FAST)
def _gemm_tile(buf, nr, x, out, r0):
    """out[t, r0 + i] = dot(buf[i], x[t]) for i < nr and every token t.

    Four weight rows per pass over x[t], so each x value is loaded once per four
    products; x[t] stays in L1 while the tile's rows stream from L2.
    """
    n = x.shape[1]
    for t in range(x.shape[0]):
        i = 0
        while i + 4 <= nr:
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for j in range(n):
                xv = x[t, j]
                a0 += buf[i, j] * xv
                a1 += buf[i + 1, j] * xv
                a2 += buf[i + 2, j] * xv
                a3 += buf[i + 3, j] * xv
            out[t, r0 + i] = a0
            out[t, r0 + i + 1] = a1
            out[t, r0 + i + 2] = a2
            out[t, r0 + i + 3] = a3
            i += 4
        while i < nr:
            out[t, r0 + i] = dot(buf[i], x[t])
            i += 1


@njit(cache=True, nogil=True, parallel=True)
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
            deq_row(qt, w[r0 + i], buf[i])
        _gemm_tile(buf, nr, x, out, r0)
