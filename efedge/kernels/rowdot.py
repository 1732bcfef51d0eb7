"""One row of raw quantized blocks dotted with activations rounded as llama.cpp rounds
them, for any quant type: the unit of work of the fused one-token layer kernels
(``decode``). Prompt processing uses the tiled product (``gemm``) instead.

Activations travel as a *pack*, made once per input vector by ``prep`` for the weight
type it meets:

    pack = (xf, xq, xd, xs)
    Q4_0, Q8_0, MXFP4,
    IQ4_NL, Q2_K, Q3_K,
    Q4_K, Q5_K, Q6_K,
    IQ4_XS:                 xq / xd / xs = 8-bit activations, integer dots (``simd``)
    every other type:       xf = rounded float activations; the row is decoded into a
                            float buffer and dotted (F32 rows are dotted in place, F16
                            rows converted on the fly where the CPU has F16C: simd_f16)

A row's result depends only on the row and the pack, never on which thread computes it
or how rows are grouped, so a decode product is the same for a resident or a streamed
expert.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import generic as g
from . import simd, simd_f16
from ._fp import dot
from .activations import quantize_row, round_row


@njit(cache=True, nogil=True, fastmath=False)
def has_int(qt):
    """Whether rows of qt go through the integer kernels."""
    return (qt == g.Q4_0 or qt == g.Q8_0 or qt == g.Q4_K or qt == g.Q6_K or qt == g.MXFP4
            or qt == g.IQ4_NL or qt == g.Q5_K or qt == g.IQ4_XS or qt == g.Q3_K
            or qt == g.Q2_K)


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


@intrinsic
def prefetch_row(typingctx, w, r):
    """Ask for row r of the 2-D uint8 array w (every 64-byte line of it) to be brought
    into the cache (llvm.prefetch: a hint, no fault past the end)."""
    if not (isinstance(w, types.Array) and w.ndim == 2 and isinstance(r, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        i64, p8 = ir.IntType(64), ir.IntType(8).as_pointer()
        rows = builder.extract_value(arr.shape, 0)
        row_bytes = builder.extract_value(arr.shape, 1)
        stride = builder.extract_value(arr.strides, 0)
        rv = context.cast(builder, args[1], sig.args[1], types.int64)
        fnty = ir.FunctionType(ir.VoidType(), [p8, ir.IntType(32), ir.IntType(32),
                                               ir.IntType(32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        with builder.if_then(builder.icmp_signed("<", rv, rows)):
            base = builder.gep(builder.bitcast(arr.data, p8), [builder.mul(rv, stride)])
            with cgutils.for_range_slice(builder, ir.Constant(i64, 0), row_bytes,
                                         ir.Constant(i64, 64)) as (off, _):
                builder.call(fn, [builder.gep(base, [off]), ir.Constant(ir.IntType(32), 0),
                                  ir.Constant(ir.IntType(32), 3),
                                  ir.Constant(ir.IntType(32), 1)])
        return context.get_dummy_value()

    return types.void(w, r), codegen


PREFETCH_AHEAD = 4  # rows (2 until 2026-11-30: 4 was no better on the file mapping; on held
# weights, efedge.held, a cold stream ran 4% faster with 4 and decode 1.04x, paired)


@njit(cache=True, nogil=True, fastmath=False)
def dot_rows(qt, w, r0, r1, n, pack, buf, out):
    """out[i] = dot(dequantize(w[r0 + i]), x) for r0 <= r0 + i < r1 (rows of quant type qt,
    n activations in ``pack``); buf: n floats of scratch.

    The type is dispatched once per call, not per row: each branch is a tight loop
    around one kernel (a per-row dispatch through a call costs as much as the row)."""
    xf, xq, xd, xs = pack
    if qt == g.Q4_0:
        for r in range(r0, r1):
            prefetch_row(w, r + PREFETCH_AHEAD)
            simd.dot_q4_0_1x1(w, r, xq, xd, xs, out[r - r0:])
    elif qt == g.Q4_K:
        for r in range(r0, r1):
            prefetch_row(w, r + PREFETCH_AHEAD)
            simd.dot_q4_k_1x1(w, r, xq, xd, xs, out[r - r0:])
    elif qt == g.Q6_K:
        for r in range(r0, r1):
            prefetch_row(w, r + PREFETCH_AHEAD)
            simd.dot_q6_k_1x1(w, r, xq, xd, xs, out[r - r0:])
    elif qt == g.Q8_0:
        for r in range(r0, r1):
            prefetch_row(w, r + PREFETCH_AHEAD)
            simd.dot_q8_0_1x1(w, r, xq, xd, xs, out[r - r0:])
    elif qt == g.MXFP4:
        for r in range(r0, r1):
            prefetch_row(w, r + PREFETCH_AHEAD)
            simd.dot_mxfp4_1x1(w, r, xq, xd, xs, out[r - r0:])
    elif qt == g.IQ4_NL:
        for r in range(r0, r1):
            prefetch_row(w, r + PREFETCH_AHEAD)
            simd.dot_iq4_nl_1x1(w, r, xq, xd, xs, out[r - r0:])
    elif qt == g.Q5_K:
        for r in range(r0, r1):
            prefetch_row(w, r + PREFETCH_AHEAD)
            simd.dot_q5_k_1x1(w, r, xq, xd, xs, out[r - r0:])
    elif qt == g.IQ4_XS:
        for r in range(r0, r1):
            prefetch_row(w, r + PREFETCH_AHEAD)
            simd.dot_iq4_xs_1x1(w, r, xq, xd, xs, out[r - r0:])
    elif qt == g.Q3_K:
        for r in range(r0, r1):
            prefetch_row(w, r + PREFETCH_AHEAD)
            simd.dot_q3_k_1x1(w, r, xq, xd, xs, out[r - r0:])
    elif qt == g.Q2_K:
        for r in range(r0, r1):
            prefetch_row(w, r + PREFETCH_AHEAD)
            simd.dot_q2_k_1x1(w, r, xq, xd, xs, out[r - r0:])
    elif qt == g.F16 and simd_f16.AVAILABLE:
        for r in range(r0, r1):
            prefetch_row(w, r + PREFETCH_AHEAD)
            out[r - r0] = simd_f16.dot_f16_row(w, r, xf, n)
    elif qt == g.F32:
        for r in range(r0, r1):
            out[r - r0] = dot(w[r].view(np.float32), xf[:n])
    else:
        for r in range(r0, r1):
            g.deq_row(qt, w[r], buf[:n])
            out[r - r0] = dot(buf[:n], xf[:n])
