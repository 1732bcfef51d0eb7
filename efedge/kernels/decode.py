"""Fused one-token layer kernels: a decode step costs two parallel regions per layer.

A decode step multiplies one token by ~10 small matrices per layer. One numba parallel
region per product (plus the numpy glue between them) costs more than the products on a
model of a few hundred MB, so each half of a layer runs as one region whose threads work
through *stages* (``_sync``): the threads claim work items (16 rows of a matrix, one KV
head of attention) and move to the next stage when every item of this one is done.
Small per-token steps (RMS norm, activation rounding) are repeated by every thread on
private buffers instead of being synchronised.

    decode_attn: norm → q, k, v → qk-norm, rope, KV store, attention → output projection
                 → residual → FFN norm → router logits → softmax / top-k
    decode_ffn:  gate and up rows of each expert → SiLU·up, rounded → down rows × weight
                 (decode_ffn_oai: gpt-oss's biases and clamped SwiGLU)
    ffn_sum:     residual + the experts' outputs summed in slot order

decode_ffn serves routed experts (all K at once when they are resident, or one at a time
as the expert cache hands them out), shared experts and dense FFNs alike; every output
row comes from ``rowdot.row_dot`` and the sum is in slot order, so the logits do not
depend on which of those paths ran. Rows are the GGUF rows; activations are rounded as
llama.cpp rounds them (``activations``).
"""

import numpy as np
from numba import njit, prange

from ._calls import dot_rows
from ._fp import round_f16
from ._sync import claim, finish, wait_stage
from .nn import (
    ACT_SILU,
    act_mul_into,
    attend_head,
    rms_norm_into,
    rope_into,
    softmax_topk,
    store_f16,
    sum_squares,
    swiglu_oai,
)
from .rowdot import pack_of, prep

CH = 32  # matrix rows per work item

# indices into the qtype / scheme arrays of decode_attn
IQ, IK, IV, IO, IR = 0, 1, 2, 3, 4
# qk_mode (QK_HEAD_POST: per head, after rope — hunyuan-moe)
QK_NONE, QK_HEAD, QK_FULL, QK_HEAD_POST = 0, 1, 2, 3


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _rows(w, qt, n, pack, buf, tmp, bias, out, r0, r1):
    dot_rows(qt, w, r0, r1, n, pack, buf, tmp)
    for r in range(r0, r1):
        v = tmp[r - r0]
        if bias.shape[0] > 0:
            v += bias[r]
        out[r] = v


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _chunks(n):
    return (n + CH - 1) // CH


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def stage_rows(ctr, stage, w, qt, n, pack, buf, o1, bias, out):
    """One stage: the rows of w (+ bias, when it has any) on pack, CH rows per item, into
    out; returns when every item is done."""
    c = _chunks(w.shape[0])
    while True:
        i = claim(ctr, stage)
        if i >= c:
            break
        r0 = i * CH
        _rows(w, qt, n, pack, buf, o1, bias, out, r0, min(w.shape[0], r0 + CH))
        finish(ctr, stage)
    wait_stage(ctr, stage, c)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _full_scale(x, eps):
    """rsqrt(mean(x²) + eps), as rms_norm_into computes it."""
    ms = np.float32(np.float64(sum_squares(x)) / x.shape[0])
    return np.float32(1.0) / np.sqrt(ms + eps)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _qkv_stage(ctr, x, attn_norm, eps, wq, wk, wv, qt, sc, bq, bk, bv, buf, o1, q, kk, vv):
    """Stage 0 of an attention half (decode_attn, decode_oss): the normalised input
    rounded for q / k / v (private to the thread), then the q, k, v rows (+ biases) item
    by item. Returns the thread's q pack, for reuse as a scratch pack."""
    d_model = x.shape[0]
    hn = np.empty(d_model, np.float32)
    rms_norm_into(x, attn_norm, eps, hn)
    pq = pack_of(d_model)
    prep(sc[IQ], qt[IQ], hn, pq)
    pk = pq
    if qt[IK] != qt[IQ]:
        pk = pack_of(d_model)
        prep(sc[IK], qt[IK], hn, pk)
    pv = pq
    if qt[IV] != qt[IQ]:
        pv = pk if qt[IV] == qt[IK] else pack_of(d_model)
        if qt[IV] != qt[IK]:
            prep(sc[IV], qt[IV], hn, pv)
    cq, ck, cv = _chunks(wq.shape[0]), _chunks(wk.shape[0]), _chunks(wv.shape[0])
    n0 = cq + ck + cv
    while True:
        i = claim(ctr, 0)
        if i >= n0:
            break
        if i < cq:
            r0 = i * CH
            _rows(wq, qt[IQ], d_model, pq, buf, o1, bq, q, r0, min(wq.shape[0], r0 + CH))
        elif i < cq + ck:
            r0 = (i - cq) * CH
            _rows(wk, qt[IK], d_model, pk, buf, o1, bk, kk, r0, min(wk.shape[0], r0 + CH))
        else:
            r0 = (i - cq - ck) * CH
            _rows(wv, qt[IV], d_model, pv, buf, o1, bv, vv, r0, min(wv.shape[0], r0 + CH))
        finish(ctr, 0)
    wait_stage(ctr, 0, n0)
    return pq


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _attn_worker(ctr, x, attn_norm, ffn_norm, eps, wq, wk, wv, wo, wr, qt, sc,
                 bq, bk, bv, q_norm, k_norm, qk_mode, cos, sin, neox,
                 n_head, n_head_kv, head_dim, v_dim, kq_scale, res_scale, kc, vc, pos,
                 q, kk, vv, att, o, logits, x_out, h_out):
    d_model = x.shape[0]
    n_att = n_head * v_dim
    width = max(d_model, n_att)
    buf = np.empty(width, np.float32)
    o1 = np.empty(CH, np.float32)
    # -- stage 0: q, k, v rows (the input normalised and rounded per thread)
    pq = _qkv_stage(ctr, x, attn_norm, eps, wq, wk, wv, qt, sc, bq, bk, bv, buf, o1, q, kk, vv)
    # -- stage 1: one KV head per item: k norm + rope, KV store, its query heads
    group = n_head // n_head_kv
    q_full = k_full = np.float32(1.0)
    if qk_mode == QK_FULL:
        q_full = _full_scale(q, eps)
        k_full = _full_scale(kk, eps)
    kh = np.empty(head_dim, np.float32)
    qh = np.empty(head_dim, np.float32)
    scores = np.empty(pos + 1, np.float32)
    while True:
        g = claim(ctr, 1)
        if g >= n_head_kv:
            break
        k0 = g * head_dim
        for j in range(head_dim):
            kh[j] = kk[k0 + j]
        if qk_mode == QK_HEAD:
            rms_norm_into(kh, k_norm, eps, kh)
        elif qk_mode == QK_FULL:
            for j in range(head_dim):
                kh[j] = (kh[j] * k_full) * k_norm[k0 + j]
        rope_into(kh, cos, sin, neox)
        if qk_mode == QK_HEAD_POST:
            rms_norm_into(kh, k_norm, eps, kh)
        store_f16(kh, kc[pos, g])
        store_f16(vv[g * v_dim:(g + 1) * v_dim], vc[pos, g])
        for hq in range(g * group, (g + 1) * group):
            q0 = hq * head_dim
            for j in range(head_dim):
                qh[j] = q[q0 + j]
            if qk_mode == QK_HEAD:
                rms_norm_into(qh, q_norm, eps, qh)
            elif qk_mode == QK_FULL:
                for j in range(head_dim):
                    qh[j] = (qh[j] * q_full) * q_norm[q0 + j]
            rope_into(qh, cos, sin, neox)
            if qk_mode == QK_HEAD_POST:
                rms_norm_into(qh, q_norm, eps, qh)
            for j in range(head_dim):
                qh[j] = round_f16(qh[j])  # ggml rounds q to f16 for its F16 K·Q product
            attend_head(qh, kc, vc, g, pos + 1, kq_scale, scores,
                        att[hq * v_dim:(hq + 1) * v_dim])
        finish(ctr, 1)
    wait_stage(ctr, 1, n_head_kv)
    # -- stage 2: output projection rows (input rounded privately)
    pa = pack_of(n_att)
    prep(sc[IO], qt[IO], att, pa)
    stage_rows(ctr, 2, wo, qt[IO], n_att, pa, buf, o1, bq[:0], o)
    # -- private: residual and FFN norm; stage 3: router rows, plus one item that
    # publishes the residual and the normalised hidden state
    xn = np.empty(d_model, np.float32)
    for i in range(d_model):
        xn[i] = x[i] + o[i] * res_scale  # res_scale: granite's residual_scale, else 1
    hh = np.empty(d_model, np.float32)
    rms_norm_into(xn, ffn_norm, eps, hh)
    cr = _chunks(wr.shape[0]) if wr.shape[0] > 0 else 0
    if cr > 0:
        prep(sc[IR], qt[IR], hh, pq)
    n3 = cr + 1
    while True:
        i = claim(ctr, 3)
        if i >= n3:
            break
        if i == cr:
            for j in range(d_model):
                x_out[j] = xn[j]
                h_out[j] = hh[j]
        else:
            r0 = i * CH
            _rows(wr, qt[IR], d_model, pq, buf, o1, bq[:0], logits, r0,
                  min(wr.shape[0], r0 + CH))
        finish(ctr, 3)
    wait_stage(ctr, 3, n3)


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def decode_attn(x, attn_norm, ffn_norm, eps, wq, wk, wv, wo, wr, qt, sc,
                bq, bk, bv, q_norm, k_norm, qk_mode, cos, sin, neox,
                n_head, n_head_kv, head_dim, v_dim, kq_scale, res_scale, kc, vc, pos,
                n_used, renorm, x_out, h_out, ids, w, nt):
    """The attention half of one layer for one token at position ``pos``.

    x [D] residual in; x_out = x + res_scale · attention; h_out = ffn_norm(x_out). wr: router rows
    (0 rows for a dense layer), then ids / w [n_used] = its top-k. qt / sc: quant types
    and rounding schemes of q, k, v, output, router. kc / vc: this layer's KV cache as
    uint16 [n_ctx, n_head_kv, d]; row ``pos`` is written. Optional biases and norms are
    empty arrays when absent. nt: numba.get_num_threads() (read in Python: called from
    here it would make the function uncacheable)."""
    ctr = np.zeros(8, np.int64)
    q = np.empty(wq.shape[0], np.float32)
    kk = np.empty(wk.shape[0], np.float32)
    vv = np.empty(wv.shape[0], np.float32)
    att = np.empty(n_head * v_dim, np.float32)
    o = np.empty(wo.shape[0], np.float32)
    logits = np.empty(wr.shape[0], np.float32)
    for _t in prange(nt):
        _attn_worker(ctr, x, attn_norm, ffn_norm, eps, wq, wk, wv, wo, wr, qt, sc,
                     bq, bk, bv, q_norm, k_norm, qk_mode, cos, sin, neox,
                     n_head, n_head_kv, head_dim, v_dim, kq_scale, res_scale, kc, vc, pos,
                     q, kk, vv, att, o, logits, x_out, h_out)
    if wr.shape[0] > 0:
        softmax_topk(logits, n_used, renorm, ids, w)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _ffn_worker(ctr, h, ids, wts, gate, up, down, qt, sc, bid, bg, bu, bd, a, af, aq, ad,
                as_, y, act):
    # bg / bu / bd: gpt-oss's biases [E, F] / [E, F] / [E, D], rows bid[k] for slot k, and
    # its clamped SwiGLU; no rows: act(gate) · up (act: nn.ACT_SILU or ACT_RELU)
    k_used = ids.shape[0]
    d_model = h.shape[0]
    n_ff = gate.shape[1]
    oai = bg.shape[0] > 0
    buf = np.empty(max(d_model, n_ff), np.float32)
    tg = np.empty(CH, np.float32)
    tu = np.empty(CH, np.float32)
    tz = np.empty(CH, np.float32)
    pg = pack_of(d_model)
    prep(sc[0], qt[0], h, pg)
    pu = pg
    if qt[1] != qt[0]:
        pu = pack_of(d_model)
        prep(sc[1], qt[1], h, pu)
    # -- stage 0: gate and up rows → a = silu(gate) · up
    cf = _chunks(n_ff)
    n0 = k_used * cf
    while True:
        i = claim(ctr, 0)
        if i >= n0:
            break
        k = i // cf
        e = ids[k]
        r0 = (i % cf) * CH
        r1 = min(n_ff, r0 + CH)
        dot_rows(qt[0], gate[e], r0, r1, d_model, pg, buf, tg)
        dot_rows(qt[1], up[e], r0, r1, d_model, pu, buf, tu)
        if oai:
            b = bid[k]
            for r in range(r0, r1):
                a[k, r] = swiglu_oai(tg[r - r0] + bg[b, r], tu[r - r0] + bu[b, r])
        else:
            act_mul_into(act, tg, tu, tz)
            for r in range(r0, r1):
                a[k, r] = tz[r - r0]
        finish(ctr, 0)
    wait_stage(ctr, 0, n0)
    # -- stage 1: round each expert's activation for the down rows
    while True:
        k = claim(ctr, 1)
        if k >= k_used:
            break
        prep(sc[2], qt[2], a[k], (af[k], aq[k], ad[k], as_[k]))
        finish(ctr, 1)
    wait_stage(ctr, 1, k_used)
    # -- stage 2: down rows (+ bias) × the routing weight
    cd = _chunks(d_model)
    n2 = k_used * cd
    while True:
        i = claim(ctr, 2)
        if i >= n2:
            break
        k = i // cd
        e = ids[k]
        r0 = (i % cd) * CH
        r1 = min(d_model, r0 + CH)
        dot_rows(qt[2], down[e], r0, r1, n_ff, (af[k], aq[k], ad[k], as_[k]), buf, tg)
        if oai:
            b = bid[k]
            for r in range(r0, r1):
                y[k, r] = (tg[r - r0] + bd[b, r]) * wts[k]
        else:
            for r in range(r0, r1):
                y[k, r] = tg[r - r0] * wts[k]
        finish(ctr, 2)
    wait_stage(ctr, 2, n2)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _ffn_scratch(k_used, n_ff):
    """The activations a [K, F] and each expert's activation pack (rowdot.pack_of), as
    rows of 2-D arrays."""
    return (np.empty((k_used, n_ff), np.float32), np.empty((k_used, n_ff), np.float32),
            np.empty((k_used, n_ff), np.int8), np.empty((k_used, n_ff // 4 + 8), np.float32),
            np.empty((k_used, n_ff // 16 + 1), np.int32))


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def decode_ffn(h, ids, wts, gate, up, down, qt, sc, y, nt, act=ACT_SILU):
    """y[k] = down_e(round(act(gate_e·h) · up_e·h)) · wts[k] for e = ids[k].

    h [D] (the FFN-normalised hidden state); gate / up [E, F, row_bytes], down
    [E, D, row_bytes] stacked raw experts (E = 1 for one expert or a dense FFN); qt / sc:
    quant types and rounding schemes of gate, up, down; y [K, D]; act: silu
    (nn.ACT_SILU) or relu (ACT_RELU, smallthinker's experts)."""
    ctr = np.zeros(6, np.int64)
    a, af, aq, ad, as_ = _ffn_scratch(ids.shape[0], gate.shape[1])
    nob = np.zeros((0, 0), np.float32)
    for _t in prange(nt):
        _ffn_worker(ctr, h, ids, wts, gate, up, down, qt, sc, ids, nob, nob, nob,
                    a, af, aq, ad, as_, y, act)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def decode_ffn_serial(h, ids, wts, gate, up, down, qt, sc, y, act=ACT_SILU):
    """decode_ffn on the calling thread alone (the same rows, so the same bits): for one
    expert at a time, where waking the other threads costs more than they bring."""
    ctr = np.zeros(6, np.int64)
    a, af, aq, ad, as_ = _ffn_scratch(ids.shape[0], gate.shape[1])
    nob = np.zeros((0, 0), np.float32)
    _ffn_worker(ctr, h, ids, wts, gate, up, down, qt, sc, ids, nob, nob, nob,
                a, af, aq, ad, as_, y, act)


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def decode_ffn_oai(h, ids, bid, wts, gate, up, down, qt, sc, bg, bu, bd, y, nt):
    """decode_ffn for gpt-oss's experts: y[k] = (down_e(round(swiglu_oai(gate_e·h + bg[b],
    up_e·h + bu[b]))) + bd[b]) · wts[k] for e = ids[k], b = bid[k] (ids index the stacked
    weights, a slot pool's too; bid the layer's bias tables [E, F] / [E, F] / [E, D])."""
    ctr = np.zeros(6, np.int64)
    a, af, aq, ad, as_ = _ffn_scratch(ids.shape[0], gate.shape[1])
    for _t in prange(nt):
        _ffn_worker(ctr, h, ids, wts, gate, up, down, qt, sc, bid, bg, bu, bd,
                    a, af, aq, ad, as_, y, ACT_SILU)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def decode_ffn_oai_serial(h, ids, bid, wts, gate, up, down, qt, sc, bg, bu, bd, y):
    """decode_ffn_oai on the calling thread alone (the same bits)."""
    ctr = np.zeros(6, np.int64)
    a, af, aq, ad, as_ = _ffn_scratch(ids.shape[0], gate.shape[1])
    _ffn_worker(ctr, h, ids, wts, gate, up, down, qt, sc, bid, bg, bu, bd,
                a, af, aq, ad, as_, y, ACT_SILU)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def ffn_sum(x, y, n, out):
    """out = x + (y[0] + y[1] + … + y[n-1]), summed in slot order."""
    for r in range(x.shape[0]):
        s = y[0, r]
        for k in range(1, n):
            s += y[k, r]
        out[r] = x[r] + s


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def ffn_sum_scaled(x, y, n, scale, out):
    """out = x + (y[0] + … + y[n-1]) · scale: ffn_sum with granite's residual_scale."""
    for r in range(x.shape[0]):
        s = y[0, r]
        for k in range(1, n):
            s += y[k, r]
        out[r] = x[r] + s * scale
