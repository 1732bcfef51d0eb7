"""The routed experts of a MoE layer over a batch of tokens (prefill), in one call.

Prompt processing sends each token to K of E experts. Per expert a call of its own
(quantize, gate, up, SiLU, quantize, down) costs ~6 parallel regions per expert, and on
a machine whose cores are shared each region's start measured 0.1-0.3 ms: more than
the products of a small expert. Here the whole layer is 5 regions:

    slots (t, k) sorted by expert (counting sort; each expert's tokens are adjacent)
    1. x quantized once per token for gate / up, gathered into expert order
    2. gate and up: work items (expert, tile of rows), the tiled product (``gemm``)
    3. SiLU(gate) · up, quantized for down, per slot
    4. down: work items (expert, tile of rows)
    5. slots[t, k] = y · w[t, k]

``moe_ffn_oai``: the same with gpt-oss's per-expert biases (gate and up added before
its clamped SwiGLU in 3, down's added in 5, before the routing weight).

Every row is the same product ``prefill.matmul_q8`` computes for that expert on those
tokens (the tiled product's result does not depend on which tokens share a call), so
this gives the same bits as one call per expert, which is how the expert cache runs.
Weights: gate / up / down [E, rows, row_bytes] of any supported type: Q4_0, Q8_0, MXFP4,
IQ4_NL, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_XS through the tiled integer product
(``rowdot.has_int``), the others (F16, Q4_1, the IQ1 / IQ2 / IQ3 types …) through float
activations rounded as llama.cpp rounds them and ``generic``'s tile product.

Run it through ``kernels.dynamic`` (work handed out in small chunks, not one equal
share per thread: see there).
"""

import numpy as np
from numba import njit, prange

from ._calls import deq_row, gemm_rows
from .activations import quantize_row, round_row
from .generic import _gemm_tile
from .nn import ACT_RELU, ACT_SILU, relu_mul, silu_mul, swiglu_oai
from .prefill import gemm_acts_row
from .rowdot import has_int

# Activations of one matrix input, per row (token or slot): (xq int8, xdb float32, xsum
# int32) for the integer types, xf (rounded float32) for the others; the unused arrays
# have no columns.


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _acts(qt, n_rows, n):
    if has_int(qt):
        return (np.empty((n_rows, n), np.int8), np.empty((n_rows, n // 32), np.float32),
                np.empty((n_rows, n // 16), np.int32), np.empty((n_rows, 0), np.float32))
    return (np.empty((n_rows, 0), np.int8), np.empty((n_rows, 0), np.float32),
            np.empty((n_rows, 0), np.int32), np.empty((n_rows, n), np.float32))


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _prep_row(qt, scheme, x, xq, xdb, xsum, xf):
    """One row's activations for weights of qt (scratch for the 8-bit scales inside)."""
    if has_int(qt):
        n = x.shape[0]
        xd = np.empty(n // 4 + 8, np.float32)
        xs = np.empty(n // 16 + 1, np.int32)
        quantize_row(scheme, x, xq, xd, xs)
        gemm_acts_row(qt, xq, xd, xs, xdb, xsum)
    else:
        round_row(scheme, x, xf)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _rows(qt, w, r0, r1, xq, xdb, xsum, xf, out):
    """out[:, r0:r1] of this expert's tokens."""
    if has_int(qt):
        gemm_rows(qt, w, r0, r1, xq, xdb, xsum, out)
    else:
        buf = np.empty((r1 - r0, xf.shape[1]), np.float32)
        for i in range(r1 - r0):
            deq_row(qt, w[r0 + i], buf[i])
        _gemm_tile(buf, r1 - r0, xf, out, r0)


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def _prep_rows(qt, scheme, x, xq, xdb, xsum, xf):
    for t in prange(x.shape[0]):
        _prep_row(qt, scheme, x[t], xq[t], xdb[t], xsum[t], xf[t])


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _items(off, rows, tile):
    """(expert, first row) of every work item: tiles of ``tile`` rows of each expert
    that has tokens."""
    n_exp = off.shape[0] - 1
    per = (rows + tile - 1) // tile
    n = 0
    for e in range(n_exp):
        if off[e + 1] > off[e]:
            n += per
    ie = np.empty(n, np.int64)
    ir = np.empty(n, np.int64)
    i = 0
    for e in range(n_exp):
        if off[e + 1] > off[e]:
            for c in range(per):
                ie[i] = e
                ir[i] = c * tile
                i += 1
    return ie, ir


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def _gather(order, k_used, src, dst):
    for i in prange(order.shape[0]):
        dst[i] = src[order[i] // k_used]


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _gather_acts(order, k_used, acts, n):
    out = (np.empty((n, acts[0].shape[1]), np.int8), np.empty((n, acts[1].shape[1]), np.float32),
           np.empty((n, acts[2].shape[1]), np.int32), np.empty((n, acts[3].shape[1]), np.float32))
    _gather(order, k_used, acts[0], out[0])
    _gather(order, k_used, acts[1], out[1])
    _gather(order, k_used, acts[2], out[2])
    _gather(order, k_used, acts[3], out[3])
    return out


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def _up_gate(qt_g, qt_u, gate, up, off, ie, ir, tile, ga, ua, g_out, u_out):
    n_items = ie.shape[0]
    rows = gate.shape[1]
    for j in prange(2 * n_items):
        i = j % n_items
        e = ie[i]
        a, b = off[e], off[e + 1]
        r0 = ir[i]
        r1 = min(rows, r0 + tile)
        if j < n_items:
            _rows(qt_g, gate[e], r0, r1, ga[0][a:b], ga[1][a:b], ga[2][a:b], ga[3][a:b],
                  g_out[a:b])
        else:
            _rows(qt_u, up[e], r0, r1, ua[0][a:b], ua[1][a:b], ua[2][a:b], ua[3][a:b],
                  u_out[a:b])


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def _swiglu_prep(qt, scheme, g_in, u_in, se, bg, bu, act, aa, kind):
    oai = bg.shape[0] > 0
    for i in prange(g_in.shape[0]):
        if oai:  # gpt-oss: biases of the slot's expert, clamped SwiGLU
            e = se[i]
            for j in range(g_in.shape[1]):
                act[i, j] = swiglu_oai(g_in[i, j] + bg[e, j], u_in[i, j] + bu[e, j])
        elif kind == ACT_RELU:  # smallthinker's ReLU-gated experts
            for j in range(g_in.shape[1]):
                act[i, j] = relu_mul(g_in[i, j], u_in[i, j])
        else:
            for j in range(g_in.shape[1]):
                act[i, j] = silu_mul(g_in[i, j], u_in[i, j])
        _prep_row(qt, scheme, act[i], aa[0][i], aa[1][i], aa[2][i], aa[3][i])


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def _down(qt, down, off, ie, ir, tile, aa, y):
    rows = down.shape[1]
    for i in prange(ie.shape[0]):
        e = ie[i]
        a, b = off[e], off[e + 1]
        r0 = ir[i]
        _rows(qt, down[e], r0, min(rows, r0 + tile), aa[0][a:b], aa[1][a:b], aa[2][a:b],
              aa[3][a:b], y[a:b])


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def _scatter(order, k_used, wts, y, se, bd, slots):
    for i in prange(order.shape[0]):
        t = order[i] // k_used
        k = order[i] % k_used
        wk = wts[t, k]
        if bd.shape[0] > 0:
            e = se[i]
            for j in range(y.shape[1]):
                slots[t, k, j] = (y[i, j] + bd[e, j]) * wk
        else:
            for j in range(y.shape[1]):
                slots[t, k, j] = y[i, j] * wk


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def moe_ffn(x, ids, wts, gate, up, down, qt, sc, slots, tile, act=ACT_SILU):
    """slots[t, k] = wts[t, k] · expert ids[t, k] applied to x[t], for every slot with
    0 <= ids[t, k] < E (others are left alone). x [T, D] float32, ids / wts [T, K],
    gate / up / down [E, rows, row_bytes], qt / sc: their quant types and activation
    schemes, slots [T, K, D]; tile: rows per work item (a multiple of 8); act: the
    activation of gate (nn.ACT_SILU, or ACT_RELU for smallthinker's experts)."""
    nob = np.zeros((0, 0), np.float32)
    _moe_ffn(x, ids, wts, gate, up, down, qt, sc, nob, nob, nob, slots, tile, act)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def moe_ffn_oai(x, ids, wts, gate, up, down, qt, sc, bg, bu, bd, slots, tile):
    """moe_ffn for gpt-oss's experts: gate / up / down plus expert ids[t, k]'s rows of
    the bias tables bg / bu [E, F], bd [E, D], and the clamped SwiGLU (nn.swiglu_oai):
    slots[t, k] = (down(round(swiglu_oai(gate·x + bg, up·x + bu))) + bd) · wts[t, k]."""
    _moe_ffn(x, ids, wts, gate, up, down, qt, sc, bg, bu, bd, slots, tile, ACT_SILU)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _moe_ffn(x, ids, wts, gate, up, down, qt, sc, bg, bu, bd, slots, tile, kind):
    n_tok, k_used = ids.shape
    n_exp, f = gate.shape[0], gate.shape[1]
    d = x.shape[1]
    # counting sort of the slots by expert
    off = np.zeros(n_exp + 1, np.int64)
    for t in range(n_tok):
        for k in range(k_used):
            e = ids[t, k]
            if 0 <= e < n_exp:
                off[e + 1] += 1
    for e in range(n_exp):
        off[e + 1] += off[e]
    n = off[n_exp]
    if n == 0:
        return
    order = np.empty(n, np.int64)
    fill = off[:n_exp].copy()
    for t in range(n_tok):
        for k in range(k_used):
            e = ids[t, k]
            if 0 <= e < n_exp:
                order[fill[e]] = t * k_used + k
                fill[e] += 1
    se = np.empty(n, np.int64)  # each sorted slot's expert (its bias rows)
    for e in range(n_exp):
        se[off[e]:off[e + 1]] = e
    ie, ir = _items(off, f, tile)
    # 1. activations of x for gate (and up, when its type differs), in expert order
    xa = _acts(qt[0], n_tok, d)
    _prep_rows(qt[0], sc[0], x, *xa)
    ga = _gather_acts(order, k_used, xa, n)
    ua = ga
    if qt[1] != qt[0] or sc[1] != sc[0]:
        xa = _acts(qt[1], n_tok, d)
        _prep_rows(qt[1], sc[1], x, *xa)
        ua = _gather_acts(order, k_used, xa, n)
    # 2. gate and up
    g_out = np.empty((n, f), np.float32)
    u_out = np.empty((n, f), np.float32)
    _up_gate(qt[0], qt[1], gate, up, off, ie, ir, tile, ga, ua, g_out, u_out)
    # 3. SiLU(gate) · up (gpt-oss: biased, clamped; smallthinker: ReLU), made ready for down
    act = np.empty((n, f), np.float32)
    aa = _acts(qt[2], n, f)
    _swiglu_prep(qt[2], sc[2], g_out, u_out, se, bg, bu, act, aa, kind)
    # 4. down
    ie, ir = _items(off, down.shape[1], tile)
    y = np.empty((n, down.shape[1]), np.float32)
    _down(qt[2], down, off, ie, ir, tile, aa, y)
    # 5. weighted, into the slots
    _scatter(order, k_used, wts, y, se, bd, slots)
