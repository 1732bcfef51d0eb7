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

Every row is the same product ``prefill.matmul_q8`` computes for that expert on those
tokens (the tiled product's result does not depend on which tokens share a call), so
this gives the same bits as one call per expert, which is how the expert cache runs.
Weights: gate / up / down [E, rows, row_bytes] of Q4_0, Q8_0, Q4_K or Q6_K.

Run it through ``kernels.dynamic`` (work handed out in small chunks, not one equal
share per thread: see there).
"""

import numpy as np
from numba import njit, prange

from .activations import quantize_row
from .nn import silu_mul
from .prefill import gemm_acts_row, gemm_rows


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def _quantize_rows(qt, scheme, x, xq, xd, xs, xdb, xsum):
    for t in prange(x.shape[0]):
        quantize_row(scheme, x[t], xq[t], xd[t], xs[t])
        gemm_acts_row(qt, xq[t], xd[t], xs[t], xdb[t], xsum[t])


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _acts(n_tok, n):
    return (np.empty((n_tok, n), np.int8), np.empty((n_tok, n // 4 + 8), np.float32),
            np.empty((n_tok, n // 16 + 1), np.int32), np.empty((n_tok, n // 32), np.float32),
            np.empty((n_tok, n // 16), np.int32))


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


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def _up_gate(qt_g, qt_u, gate, up, off, ie, ir, tile, gq, gd, gs, uq, ud, us, g_out, u_out):
    n_items = ie.shape[0]
    rows = gate.shape[1]
    for j in prange(2 * n_items):
        i = j % n_items
        e = ie[i]
        a, b = off[e], off[e + 1]
        r0 = ir[i]
        r1 = min(rows, r0 + tile)
        if j < n_items:
            gemm_rows(qt_g, gate[e], r0, r1, gq[a:b], gd[a:b], gs[a:b], g_out[a:b])
        else:
            gemm_rows(qt_u, up[e], r0, r1, uq[a:b], ud[a:b], us[a:b], u_out[a:b])


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def _swiglu_quantize(qt, scheme, g_in, u_in, act, aq, ad, as_, adb, asum):
    for i in prange(g_in.shape[0]):
        for j in range(g_in.shape[1]):
            act[i, j] = silu_mul(g_in[i, j], u_in[i, j])
        quantize_row(scheme, act[i], aq[i], ad[i], as_[i])
        gemm_acts_row(qt, aq[i], ad[i], as_[i], adb[i], asum[i])


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def _down(qt, down, off, ie, ir, tile, aq, adb, asum, y):
    rows = down.shape[1]
    for i in prange(ie.shape[0]):
        e = ie[i]
        a, b = off[e], off[e + 1]
        r0 = ir[i]
        gemm_rows(qt, down[e], r0, min(rows, r0 + tile), aq[a:b], adb[a:b], asum[a:b],
                  y[a:b])


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def _scatter(order, k_used, wts, y, slots):
    for i in prange(order.shape[0]):
        t = order[i] // k_used
        k = order[i] % k_used
        wk = wts[t, k]
        for j in range(y.shape[1]):
            slots[t, k, j] = y[i, j] * wk


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def moe_ffn(x, ids, wts, gate, up, down, qt, sc, slots, tile):
    """slots[t, k] = wts[t, k] · expert ids[t, k] applied to x[t], for every slot with
    0 <= ids[t, k] < E (others are left alone). x [T, D] float32, ids / wts [T, K],
    gate / up / down [E, rows, row_bytes], qt / sc: their quant types and activation
    schemes, slots [T, K, D]; tile: rows per work item (a multiple of 8)."""
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
    ie, ir = _items(off, f, tile)
    # 1. activations of x for gate (and up, when its type differs), in expert order
    xq, xd, xs, xdb, xsum = _acts(n_tok, d)
    _quantize_rows(qt[0], sc[0], x, xq, xd, xs, xdb, xsum)
    gq, gd, gs = np.empty((n, d), np.int8), np.empty((n, d // 32), np.float32), \
        np.empty((n, d // 16), np.int32)
    _gather(order, k_used, xq, gq)
    _gather(order, k_used, xdb, gd)
    _gather(order, k_used, xsum, gs)
    uq, ud, us = gq, gd, gs
    if qt[1] != qt[0] or sc[1] != sc[0]:
        _quantize_rows(qt[1], sc[1], x, xq, xd, xs, xdb, xsum)
        uq, ud, us = np.empty_like(gq), np.empty_like(gd), np.empty_like(gs)
        _gather(order, k_used, xq, uq)
        _gather(order, k_used, xdb, ud)
        _gather(order, k_used, xsum, us)
    # 2. gate and up
    g_out = np.empty((n, f), np.float32)
    u_out = np.empty((n, f), np.float32)
    _up_gate(qt[0], qt[1], gate, up, off, ie, ir, tile, gq, gd, gs, uq, ud, us, g_out, u_out)
    # 3. SiLU(gate) · up, quantized for down
    act = np.empty((n, f), np.float32)
    aq, ad, as_, adb, asum = _acts(n, f)
    _swiglu_quantize(qt[2], sc[2], g_out, u_out, act, aq, ad, as_, adb, asum)
    # 4. down
    ie, ir = _items(off, down.shape[1], tile)
    y = np.empty((n, down.shape[1]), np.float32)
    _down(qt[2], down, off, ie, ir, tile, aq, adb, asum, y)
    # 5. weighted, into the slots
    _scatter(order, k_used, wts, y, slots)
