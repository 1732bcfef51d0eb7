"""deepseek2's latent attention for one token as one parallel region (efedge/mla.py's
split layout, ``attn_k_b`` / ``attn_v_b`` over the latent cache, and the legacy one,
``attn_kv_b`` decompressing per-head keys and values), in stages as
``decode.decode_attn`` runs the standard attention: a decode step otherwise made a
dozen kernel calls per layer, each waking the threads, with numpy between them.

    stage 0: rows of q (or of the q lora's q_a) and of kv_a (the latent + the rope key)
    stage 1: (q lora) rows of q_b from the normalised q_a
    stage 2: per head, q_nope absorbed into latent space (k_b rows); one more item:
             the cache row — the normalised latent and the rotated key, stored as f16
    stage 3: per head, rope on q_pe, attention over the latent cache, then v_b rows
             (the legacy ``attn_kv_b`` layout instead, in stage 2: per head, its k_nope
             and v rows from the latent, its cache row, its attention)
    stage 4: output projection rows; then the residual and the FFN norm, published once

Rows go through ``rowdot.dot_rows`` with activations rounded as llama.cpp rounds them
for each weight type (``rowdot.prep``), as in the other decode kernels.
"""

import numpy as np
from numba import njit, prange

from ._fp import round_f16
from ._sync import claim, finish, wait_stage
from .decode import CH, _chunks, _rows, stage_rows
from .nn import attend_head, rms_norm_into, rope_into, store_f16
from .rowdot import pack_of, prep

# indices into decode_mla_attn's qtype / scheme arrays
IQA, IQ, IKV, IKB, IVB, IO = 0, 1, 2, 3, 4, 5
_NO_BIAS = np.zeros(0, np.float32)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _head_rows(w, qt, n, pack, buf, o1, out):
    """All rows of one head's matrix w on pack, into out (one thread)."""
    nb = out[:0]
    for r0 in range(0, w.shape[0], CH):
        _rows(w, qt, n, pack, buf, o1, nb, out, r0, min(w.shape[0], r0 + CH))


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _split_heads(ctr, q, ckv, kv_norm, eps, wkb, wvb, qt, sc, nope, lora, v_dim, cos, sin,
                 scale, kc, vc, pos, buf, o1, qlat, att):
    """Stages 2 and 3 of the split layout (latent cache, k_b / v_b per head)."""
    n_head = wkb.shape[0]
    r = ckv.shape[0] - lora
    hd = nope + r
    # -- stage 2: q_nope into latent space per head; the cache row
    pn = pack_of(nope)
    while True:
        i = claim(ctr, 2)
        if i > n_head:
            break
        if i == n_head:
            kr = np.empty(lora + r, np.float32)
            rms_norm_into(ckv[:lora], kv_norm, eps, kr[:lora])
            kr[lora:] = ckv[lora:]
            rope_into(kr[lora:], cos, sin, False)
            store_f16(kr, kc[pos, 0])
            store_f16(kr[:lora], vc[pos, 0])
        else:
            prep(sc[IKB], qt[IKB], q[i * hd:i * hd + nope], pn)
            _head_rows(wkb[i], qt[IKB], nope, pn, buf, o1, qlat[i * lora:(i + 1) * lora])
        finish(ctr, 2)
    wait_stage(ctr, 2, n_head + 1)
    # -- stage 3: per head, attention over the latent cache, then its v_b rows
    qh = np.empty(lora + r, np.float32)
    scores = np.empty(pos + 1, np.float32)
    ah = np.empty(lora, np.float32)
    pv = pack_of(lora)
    while True:
        h = claim(ctr, 3)
        if h >= n_head:
            break
        qh[:lora] = qlat[h * lora:(h + 1) * lora]
        qh[lora:] = q[h * hd + nope:(h + 1) * hd]
        rope_into(qh[lora:], cos, sin, False)
        for j in range(lora + r):
            qh[j] = round_f16(qh[j])  # ggml rounds q to f16 for its F16 K·Q product
        attend_head(qh, kc, vc, 0, pos + 1, scale, scores, ah)
        prep(sc[IVB], qt[IVB], ah, pv)
        _head_rows(wvb[h], qt[IVB], lora, pv, buf, o1, att[h * v_dim:(h + 1) * v_dim])
        finish(ctr, 3)
    wait_stage(ctr, 3, n_head)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _legacy_heads(ctr, q, ckv, kv_norm, eps, wkvb, qt, sc, nope, lora, v_dim, cos, sin,
                  scale, kc, vc, pos, buf, o1, att):
    """Stage 2 of the legacy layout: per head, its k_nope and v rows of attn_kv_b from the
    normalised latent, its cache row (k_nope + the shared rotated key, v), then its
    attention over its own keys — no head waits for another."""
    n_head = wkvb.shape[0]
    r = ckv.shape[0] - lora
    hd = nope + r
    lat = np.empty(lora, np.float32)
    rms_norm_into(ckv[:lora], kv_norm, eps, lat)
    pl = pack_of(lora)
    prep(sc[IKB], qt[IKB], lat, pl)
    kpe = ckv[lora:].copy()
    rope_into(kpe, cos, sin, False)
    kvh = np.empty(nope + v_dim, np.float32)
    kh = np.empty(hd, np.float32)
    qh = np.empty(hd, np.float32)
    scores = np.empty(pos + 1, np.float32)
    while True:
        h = claim(ctr, 2)
        if h >= n_head:
            break
        _head_rows(wkvb[h], qt[IKB], lora, pl, buf, o1, kvh)
        kh[:nope] = kvh[:nope]
        kh[nope:] = kpe
        store_f16(kh, kc[pos, h])
        store_f16(kvh[nope:], vc[pos, h])
        qh[:] = q[h * hd:(h + 1) * hd]
        rope_into(qh[nope:], cos, sin, False)
        for j in range(hd):
            qh[j] = round_f16(qh[j])
        attend_head(qh, kc, vc, h, pos + 1, scale, scores, att[h * v_dim:(h + 1) * v_dim])
        finish(ctr, 2)
    wait_stage(ctr, 2, n_head)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _mla_worker(ctr, x, attn_norm, ffn_norm, eps, wqa, qa_norm, wq, wkv, kv_norm, wkb, wvb,
                wo, qt, sc, nope, lora, v_dim, cos, sin, scale, kc, vc, pos,
                qa, q, ckv, qlat, att, o, x_out, h_out):
    d = x.shape[0]
    n_head = wkb.shape[0]
    buf = np.empty(max(d, qa.shape[0], lora, n_head * v_dim, nope), np.float32)
    o1 = np.empty(CH, np.float32)
    hn = np.empty(d, np.float32)
    rms_norm_into(x, attn_norm, eps, hn)
    # -- stage 0: q (or q_a) and kv_a rows, one claimable range over both
    lq = wqa.shape[0] > 0
    w0 = wqa if lq else wq
    i0 = IQA if lq else IQ
    out0 = qa if lq else q
    p0 = pack_of(d)
    prep(sc[i0], qt[i0], hn, p0)
    pkv = p0
    if qt[IKV] != qt[i0]:
        pkv = pack_of(d)
        prep(sc[IKV], qt[IKV], hn, pkv)
    c0, c1 = _chunks(w0.shape[0]), _chunks(wkv.shape[0])
    while True:
        i = claim(ctr, 0)
        if i >= c0 + c1:
            break
        if i < c0:
            r0 = i * CH
            _rows(w0, qt[i0], d, p0, buf, o1, _NO_BIAS, out0, r0, min(w0.shape[0], r0 + CH))
        else:
            r0 = (i - c0) * CH
            _rows(wkv, qt[IKV], d, pkv, buf, o1, _NO_BIAS, ckv, r0,
                  min(wkv.shape[0], r0 + CH))
        finish(ctr, 0)
    wait_stage(ctr, 0, c0 + c1)
    # -- stage 1: the q lora's second half
    if lq:
        qan = np.empty(qa.shape[0], np.float32)
        rms_norm_into(qa, qa_norm, eps, qan)
        p1 = pack_of(qa.shape[0])
        prep(sc[IQ], qt[IQ], qan, p1)
        stage_rows(ctr, 1, wq, qt[IQ], qa.shape[0], p1, buf, o1, _NO_BIAS, q)
    # -- stages 2 (and 3): the heads
    if wvb.shape[0] > 0:
        _split_heads(ctr, q, ckv, kv_norm, eps, wkb, wvb, qt, sc, nope, lora, v_dim, cos,
                     sin, scale, kc, vc, pos, buf, o1, qlat, att)
    else:
        _legacy_heads(ctr, q, ckv, kv_norm, eps, wkb, qt, sc, nope, lora, v_dim, cos, sin,
                      scale, kc, vc, pos, buf, o1, att)
    # -- stage 4: output rows; then the residual and FFN norm (private), published once
    n_att = n_head * v_dim
    pa = pack_of(n_att)
    prep(sc[IO], qt[IO], att, pa)
    stage_rows(ctr, 4, wo, qt[IO], n_att, pa, buf, o1, _NO_BIAS, o)
    if claim(ctr, 5) == 0:
        for j in range(d):
            x_out[j] = x[j] + o[j]
        rms_norm_into(x_out, ffn_norm, eps, h_out)


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def decode_mla_attn(x, attn_norm, ffn_norm, eps, wqa, qa_norm, wq, wkv, kv_norm, wkb, wvb,
                    wo, qt, sc, nope, lora, v_dim, cos, sin, scale, kc, vc, pos, x_out, h_out,
                    nt):
    """The latent-attention half of one deepseek2 layer for one token at ``pos``.

    x [D] residual in; x_out = x + attention; h_out = ffn_norm(x_out). wqa: q_a rows (0
    rows without a q lora: then wq is attn_q, else attn_q_b), qa_norm its norm; wkv:
    attn_kv_a_mqa [lora + rope rows]; split layout: wkb [H, lora, ·] / wvb [H, v_dim, ·]
    the per-head stacks, kc / vc this layer's latent cache as uint16 [n_ctx, 1, lora +
    rope] / [n_ctx, 1, lora]; legacy layout: wkb = attn_kv_b as [H, nope + v_dim, ·], wvb
    0 rows, kc / vc per-head keys [n_ctx, H, nope + rope] / values [n_ctx, H, v_dim]. qt /
    sc: quant types and rounding schemes in IQA … IO order (IKB: k_b or kv_b). Row pos
    of the cache is written. Shapes are checked by the caller (efedge/mla.py)."""
    ctr = np.zeros(12, np.int64)
    qa = np.empty(wqa.shape[0], np.float32)
    q = np.empty(wq.shape[0], np.float32)
    ckv = np.empty(wkv.shape[0], np.float32)
    qlat = np.empty(wkb.shape[0] * lora, np.float32)
    att = np.empty(wkb.shape[0] * v_dim, np.float32)
    o = np.empty(wo.shape[0], np.float32)
    for _t in prange(nt):
        _mla_worker(ctr, x, attn_norm, ffn_norm, eps, wqa, qa_norm, wq, wkv, kv_norm, wkb,
                    wvb, wo, qt, sc, nope, lora, v_dim, cos, sin, scale, kc, vc, pos,
                    qa, q, ckv, qlat, att, o, x_out, h_out)
