"""gpt-oss's attention half of a layer for one token, as one parallel region (the
``decode`` scheme: threads claim work items stage by stage, ``_sync``).

    stage 0: q, k, v rows (+ biases)
    stage 1: one KV head per item: rope (neox), KV store, its query heads over the keys
             of their window, each softmax with the head's sink logit as one more term
    stage 2: output projection rows (+ bias)
    stage 3: residual, post-attention norm, router rows (+ bias)
    then:    the top-k router logits and a softmax over those k (llama.cpp's
             softmax_weight gating)

The same arithmetic as efedge/oss.py's T-token path (rounding, f16 KV cache and
weights, the sink's exp(sink − max) in the denominator), summed in another order: the two
agree to float rounding, as decode and prefill do for the other architectures.
"""

import numpy as np
from numba import njit, prange

from ._fp import half_to_f32, round_f16
from ._sync import claim, finish, wait_stage
from .decode import CH, IO, IR, _chunks, _qkv_stage, _rows, stage_rows
from .nn import exp_f32, rms_norm_into, rope_into, store_f16, topk_into
from .rowdot import pack_of, prep

_ZERO = np.float32(0.0)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def attend_head_sink(q, kc, vc, g, k0, n_keys, scale, sink, scores, out):
    """One query head q [d] (rounded to f16) over keys / values k0..n_keys-1 of KV head g
    (uint16 bits of f16), with a sink logit: out [dv] = Σ_s p_s · v_s, p = exp(score −
    m) / (Σ exp(score − m) + exp(sink − m)), m = max(scores, sink), p rounded to f16."""
    d = q.shape[0]
    dv = out.shape[0]
    mx = sink
    for s in range(k0, n_keys):
        acc = _ZERO
        for j in range(d):
            acc += q[j] * half_to_f32(np.int64(kc[s, g, j]))
        v = acc * scale
        scores[s] = v
        mx = max(mx, v)
    tot = _ZERO
    for s in range(k0, n_keys):
        p = exp_f32(scores[s] - mx)
        scores[s] = p
        tot += p
    tot += exp_f32(sink - mx)
    for j in range(dv):
        out[j] = _ZERO
    for s in range(k0, n_keys):
        p = round_f16(scores[s] / tot)
        for j in range(dv):
            out[j] += p * half_to_f32(np.int64(vc[s, g, j]))


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _worker(ctr, x, attn_norm, ffn_norm, eps, wq, wk, wv, wo, wr, qt, sc, bq, bk, bv, bo,
            br, sinks, window, cos, sin, n_head, n_head_kv, head_dim, v_dim, kq_scale,
            kc, vc, pos, q, kk, vv, att, o, logits, x_out, h_out):
    d_model = x.shape[0]
    n_att = n_head * v_dim
    buf = np.empty(max(d_model, n_att), np.float32)
    o1 = np.empty(CH, np.float32)
    # -- stage 0: q, k, v rows (+ biases)
    _qkv_stage(ctr, x, attn_norm, eps, wq, wk, wv, qt, sc, bq, bk, bv, buf, o1, q, kk, vv)
    # -- stage 1: one KV head per item
    group = n_head // n_head_kv
    k0 = max(0, pos + 1 - window) if window > 0 else 0
    kh = np.empty(head_dim, np.float32)
    qh = np.empty(head_dim, np.float32)
    scores = np.empty(pos + 1, np.float32)
    while True:
        g = claim(ctr, 1)
        if g >= n_head_kv:
            break
        for j in range(head_dim):
            kh[j] = kk[g * head_dim + j]
        rope_into(kh, cos, sin, True)
        store_f16(kh, kc[pos, g])
        store_f16(vv[g * v_dim:(g + 1) * v_dim], vc[pos, g])
        for hq in range(g * group, (g + 1) * group):
            for j in range(head_dim):
                qh[j] = q[hq * head_dim + j]
            rope_into(qh, cos, sin, True)
            for j in range(head_dim):
                qh[j] = round_f16(qh[j])
            attend_head_sink(qh, kc, vc, g, k0, pos + 1, kq_scale, sinks[hq], scores,
                             att[hq * v_dim:(hq + 1) * v_dim])
        finish(ctr, 1)
    wait_stage(ctr, 1, n_head_kv)
    # -- stage 2: output projection rows
    pa = pack_of(n_att)
    prep(sc[IO], qt[IO], att, pa)
    stage_rows(ctr, 2, wo, qt[IO], n_att, pa, buf, o1, bo, o)
    # -- private: residual and norm; stage 3: router rows + one item publishing x, h
    xn = np.empty(d_model, np.float32)
    for i in range(d_model):
        xn[i] = x[i] + o[i]
    hh = np.empty(d_model, np.float32)
    rms_norm_into(xn, ffn_norm, eps, hh)
    pr = pack_of(d_model)
    prep(sc[IR], qt[IR], hh, pr)
    cr = _chunks(wr.shape[0])
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
            _rows(wr, qt[IR], d_model, pr, buf, o1, br, logits, r0, min(wr.shape[0], r0 + CH))
        finish(ctr, 3)
    wait_stage(ctr, 3, n3)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def topk_softmax(logits, k, ids, w):
    """ids [k] = the k largest logits (ties → lower id), w [k] = softmax over those k."""
    topk_into(logits, k, ids)
    mx = logits[ids[0]]
    tot = _ZERO
    for j in range(k):
        w[j] = np.exp(logits[ids[j]] - mx)
        tot += w[j]
    for j in range(k):
        w[j] = w[j] / tot


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def decode_attn_sinks(x, attn_norm, ffn_norm, eps, wq, wk, wv, wo, wr, qt, sc, bq, bk, bv,
                      bo, br, sinks, window, cos, sin, n_head, n_head_kv, head_dim, v_dim,
                      kq_scale, kc, vc, pos, n_used, x_out, h_out, ids, w, nt):
    """gpt-oss's attention half of one layer for one token at ``pos``: x [D] residual in;
    x_out = x + attention; h_out = ffn_norm(x_out); ids / w [n_used] its routed experts.
    bq, bk, bv, bo, br: the q, k, v, output and router biases; sinks [n_head]; window:
    keys seen (0: all). qt / sc: quant types and schemes of q, k, v, output, router. kc /
    vc: this layer's KV cache as uint16 [n_ctx, n_head_kv, d]; row ``pos`` is written."""
    ctr = np.zeros(8, np.int64)
    q = np.empty(wq.shape[0], np.float32)
    kk = np.empty(wk.shape[0], np.float32)
    vv = np.empty(wv.shape[0], np.float32)
    att = np.empty(n_head * v_dim, np.float32)
    o = np.empty(wo.shape[0], np.float32)
    logits = np.empty(wr.shape[0], np.float32)
    for _t in prange(nt):
        _worker(ctr, x, attn_norm, ffn_norm, eps, wq, wk, wv, wo, wr, qt, sc, bq, bk, bv, bo,
                br, sinks, window, cos, sin, n_head, n_head_kv, head_dim, v_dim, kq_scale,
                kc, vc, pos, q, kk, vv, att, o, logits, x_out, h_out)
    topk_softmax(logits, n_used, ids, w)
