"""One row of raw quantized blocks dotted with activations rounded as llama.cpp rounds
them, for any quant type: the unit of work of the fused layer kernels (``decode``) and of
``matmul_q8``.

Activations travel as a *pack*, made once per input vector by ``prep`` for the weight
type it meets:

    pack = (xf, xq, xd, xs)
    Q4_0, Q8_0, Q4_K, Q6_K: xq / xd / xs = 8-bit activations, integer dots (``simd``)
    every other type:       xf = rounded float activations; the row is decoded into a
                            float buffer and dotted (F32 rows are dotted in place)

A row's result depends only on the row and the pack, never on which thread computes it
or how rows are grouped; the 1- and 4-token integer kernels give the same bits, so a
product is the same in decode and prefill, for a resident or a streamed expert.
"""

import numpy as np
from numba import njit

from . import generic as g
from . import simd
from ._fp import dot
from .activations import quantize_row, round_row


@njit(cache=True, nogil=True, fastmath=False)
def has_int(qt):
    """Whether rows of qt go through the integer kernels."""
    return qt == g.Q4_0 or qt == g.Q8_0 or qt == g.Q4_K or qt == g.Q6_K


def new_pack(n: int) -> tuple:
    """Scratch for one activation vector of n elements (any scheme)."""
    return (np.empty(n, np.float32), np.empty(n, np.int8), np.empty(n // 4 + 8, np.float32),
            np.empty(n // 16 + 1, np.int32))


@njit(cache=True, nogil=True, fastmath=False)
def pack_of(n):
    """new_pack inside numba."""
    return (np.empty(n, np.float32), np.empty(n, np.int8), np.empty(n // 4 + 8, np.float32),
            np.empty(n // 16 + 1, np.int32))


@njit(cache=True, nogil=True, fastmath=False)
def prep(scheme, qt, x, pack):
    """Fill ``pack`` with x [n] as rows of qt need it (scheme: act_scheme(qt, n))."""
    xf, xq, xd, xs = pack
    n = x.shape[0]
    if has_int(qt):
        quantize_row(scheme, x, xq[:n], xd, xs)
    else:
        round_row(scheme, x, xf[:n])


@njit(cache=True, nogil=True, fastmath=False)
def dot_rows(qt, w, r0, r1, n, pack, buf, out):
    """out[i] = dot(dequantize(w[r0 + i]), x) for r0 <= r0 + i < r1 (rows of quant type qt,
    n activations in ``pack``); buf: n floats of scratch.

    The type is dispatched once per call, not per row: each branch is a tight loop
    around one kernel (a per-row dispatch through a call costs as much as the row)."""
    xf, xq, xd, xs = pack
    if qt == g.Q4_0:
        for r in range(r0, r1):
            simd.dot_q4_0_1x1(w, r, xq, xd, xs, out[r - r0:])
    elif qt == g.Q4_K:
        for r in range(r0, r1):
            simd.dot_q4_k_1x1(w, r, xq, xd, xs, out[r - r0:])
    elif qt == g.Q6_K:
        for r in range(r0, r1):
            simd.dot_q6_k_1x1(w, r, xq, xd, xs, out[r - r0:])
    elif qt == g.Q8_0:
        for r in range(r0, r1):
            simd.dot_q8_0_1x1(w, r, xq, xd, xs, out[r - r0:])
    elif qt == g.F32:
        for r in range(r0, r1):
            out[r - r0] = dot(w[r].view(np.float32), xf[:n])
    else:
        for r in range(r0, r1):
            g.deq_row(qt, w[r], buf[:n])
            out[r - r0] = dot(buf[:n], xf[:n])
