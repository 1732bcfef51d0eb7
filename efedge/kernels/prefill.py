"""Kernels for a batch of T tokens (prompt processing): products with 8-bit activations,
RMS norm, qk-norm + rope + KV store, and causal attention over the float16 KV cache.

``matmul_q8`` is the tiled product of ``gemm`` (8 rows unpacked once, then 8 tokens per
step, one vector lane per row); tasks of row tiles are spread over threads. A row's
result does not depend on how many tokens share the call; it agrees with the one-token
decode kernels (``rowdot``) to float rounding, not bit for bit (another summation order).

Attention converts the layer's cached keys / values to float32 once (keys transposed to
[d, S], so that one query's scores are a vector over keys), then works through blocks of
4 queries of one head (``simd_attn``); each query's softmax covers its causal prefix.
Value widths that are not a multiple of 32 are not supported here (the model checks).
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import _calls
from . import gemm as gm
from . import generic as g
from ._fp import FAST, dot, half_to_f32, round_f16
from ._ir import F16C
from .nn import exp_f32, rms_norm_into, rope_into, silu_mul, store_f16, sum_squares
from .simd_attn import NQ, attn_scores_q4, attn_values_q4

if F16C:
    @intrinsic
    def _round_half(typingctx, x):
        """float32 x rounded to the nearest half (vcvtps2ph / vcvtph2ps: loops over it
        vectorise); the same value as _fp.round_f16."""
        if not isinstance(x, types.Float) or x.bitwidth != 32:
            return None

        def codegen(context, builder, sig, args):
            return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(x), codegen
else:  # pragma: no cover - hosts without F16C: the portable bit arithmetic
    _round_half = round_f16

GNT = gm.NT


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _q8_0_acts(qt):
    """Whether rows of qt meet Q8_0 activations (32-element blocks)."""
    return qt == g.Q4_0 or qt == g.Q8_0 or qt == g.MXFP4 or qt == g.IQ4_NL


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def gemm_acts_row(qt, xq, xd, xs, xdb, xsum):
    """One token's activations for the tiled product (gemm) from its 8-bit activations
    made for qt (xq, xd, xs): xdb = the scale of each activation block, xsum = the sum of
    xq over each sub-block (arrays may be longer than needed)."""
    n = xq.shape[0]
    if _q8_0_acts(qt):
        for b in range(n // 32):
            xdb[b] = xd[8 * b]
            s = 0
            for j in range(32 * b, 32 * b + 32):
                s += xq[j]
            xsum[b] = s
    else:
        for b in range(n // 256):
            xdb[b] = xd[b]
        if qt == g.Q4_K or qt == g.Q5_K or qt == g.IQ4_XS:  # sub-blocks of 32
            for j in range(n // 32):
                xsum[j] = xs[2 * j] + xs[2 * j + 1]
        else:
            for j in range(n // 16):
                xsum[j] = xs[j]


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def gemm_acts(qt, xq, xd, xs):
    """gemm_acts_row for every token: (xdb [T, n/32], xsum [T, n/16])."""
    n_tok, n = xq.shape
    xdb = np.empty((n_tok, n // 32), np.float32)
    xsum = np.empty((n_tok, n // 16), np.int32)
    for t in range(n_tok):
        gemm_acts_row(qt, xq[t], xd[t], xs[t], xdb[t], xsum[t])
    return xdb, xsum


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _unpack(qt, w, r, wt, ws, wm):
    if qt == g.Q4_0:
        gm.unpack_q4_0(w, r, wt, ws, wm)
    elif qt == g.Q4_K:
        gm.unpack_q4_k(w, r, wt, ws, wm)
    elif qt == g.Q6_K:
        gm.unpack_q6_k(w, r, wt, ws, wm)
    elif qt == g.MXFP4:
        gm.unpack_mxfp4(w, r, wt, ws, wm)
    elif qt == g.IQ4_NL:
        gm.unpack_iq4_nl(w, r, wt, ws, wm)
    elif qt == g.Q5_K:
        gm.unpack_q5_k(w, r, wt, ws, wm)
    elif qt == g.IQ4_XS:
        gm.unpack_iq4_xs(w, r, wt, ws, wm)
    elif qt == g.Q3_K:
        gm.unpack_q3_k(w, r, wt, ws, wm)
    elif qt == g.Q2_K:
        gm.unpack_q2_k(w, r, wt, ws, wm)
    else:
        gm.unpack_q8_0(w, r, wt, ws, wm)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _gemm(qt, nt, wt, ws, wm, nb, xq, xdb, xsum, out, ldo):
    """out[t, 0:8] for tokens 0 .. nt-1 (nt in gemm.TOKEN_STEPS) of the views given."""
    a, b, c = xq.shape[1], xdb.shape[1], xsum.shape[1]
    if qt == g.Q4_0:
        if nt == 8:
            gm.gemm_q4_0_8(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        elif nt == 4:
            gm.gemm_q4_0_4(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        elif nt == 2:
            gm.gemm_q4_0_2(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        else:
            gm.gemm_q4_0_1(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
    elif qt == g.Q4_K:
        if nt == 8:
            gm.gemm_q4_k_8(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        elif nt == 4:
            gm.gemm_q4_k_4(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        elif nt == 2:
            gm.gemm_q4_k_2(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        else:
            gm.gemm_q4_k_1(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
    elif qt == g.Q6_K:
        if nt == 8:
            gm.gemm_q6_k_8(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        elif nt == 4:
            gm.gemm_q6_k_4(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        elif nt == 2:
            gm.gemm_q6_k_2(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        else:
            gm.gemm_q6_k_1(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
    elif qt == g.MXFP4:
        if nt == 8:
            gm.gemm_mxfp4_8(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        elif nt == 4:
            gm.gemm_mxfp4_4(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        elif nt == 2:
            gm.gemm_mxfp4_2(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        else:
            gm.gemm_mxfp4_1(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
    elif qt == g.IQ4_NL:
        if nt == 8:
            gm.gemm_iq4_nl_8(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        elif nt == 4:
            gm.gemm_iq4_nl_4(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        elif nt == 2:
            gm.gemm_iq4_nl_2(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        else:
            gm.gemm_iq4_nl_1(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
    elif qt == g.Q5_K:
        if nt == 8:
            gm.gemm_q5_k_8(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        elif nt == 4:
            gm.gemm_q5_k_4(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        elif nt == 2:
            gm.gemm_q5_k_2(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        else:
            gm.gemm_q5_k_1(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
    elif qt == g.IQ4_XS:
        if nt == 8:
            gm.gemm_iq4_xs_8(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        elif nt == 4:
            gm.gemm_iq4_xs_4(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        elif nt == 2:
            gm.gemm_iq4_xs_2(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        else:
            gm.gemm_iq4_xs_1(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
    elif qt == g.Q3_K:
        if nt == 8:
            gm.gemm_q3_k_8(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        elif nt == 4:
            gm.gemm_q3_k_4(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        elif nt == 2:
            gm.gemm_q3_k_2(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        else:
            gm.gemm_q3_k_1(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
    elif qt == g.Q2_K:
        if nt == 8:
            gm.gemm_q2_k_8(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        elif nt == 4:
            gm.gemm_q2_k_4(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        elif nt == 2:
            gm.gemm_q2_k_2(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        else:
            gm.gemm_q2_k_1(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
    else:
        if nt == 8:
            gm.gemm_q8_0_8(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        elif nt == 4:
            gm.gemm_q8_0_4(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        elif nt == 2:
            gm.gemm_q8_0_2(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)
        else:
            gm.gemm_q8_0_1(wt, ws, wm, nb, xq, a, xdb, b, xsum, c, out, ldo)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def gemm_rows(qt, w, r0, r1, xq, xdb, xsum, out):
    """out[:, r0:r1] for every token: tiles of 8 rows unpacked once (gemm), then GNT
    tokens per step. r0 is a multiple of 8; a last tile of fewer rows is padded."""
    rows = w.shape[0]
    n_tok, n = xq.shape
    nb = n // 32 if _q8_0_acts(qt) else n // 256
    wt = np.empty(8 * n, np.uint8)
    ws = np.empty(n // 16 * 8, np.float32)
    wm = np.empty(n // 16 * 8, np.float32)
    tmp = np.empty((GNT, 8), np.float32)
    for r in range(r0, r1, 8):
        m = min(8, rows - r)
        if m == 8:
            _unpack(qt, w, r, wt, ws, wm)
        else:
            pad = np.zeros((8, w.shape[1]), np.uint8)
            pad[:m] = w[r:rows]
            _unpack(qt, pad, np.int64(0), wt, ws, wm)  # not a literal 0: one build
        t = 0
        while t < n_tok:
            left = n_tok - t
            nt = GNT if left >= GNT else 4 if left >= 4 else 2 if left >= 2 else 1
            if m == 8:
                _gemm(qt, nt, wt, ws, wm, nb, xq[t:], xdb[t:], xsum[t:], out[t:, r:], rows)
            else:
                # typed as the call above (any layout, int64 stride): one build of _gemm
                _gemm(qt, nt, wt, ws, wm, nb, xq[t:], xdb[t:], xsum[t:], tmp[:, :],
                      np.int64(8))
                for i in range(nt):
                    for j in range(m):
                        out[t + i, r + j] = tmp[i, j]
            t += nt


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def matmul_q8(qt, w, xq, xd, xs, out, tile):
    """out[T, rows] = x · dequant(w).T for rows of the integer types (rowdot.has_int)
    and activations quantized for them (activations.quantize_activations): the tiled product of
    ``gemm``, rows in tasks of ``tile`` (rounded up to a multiple of 8)."""
    rows = w.shape[0]
    xdb, xsum = gemm_acts(qt, xq, xd, xs)
    tile = max(8, (tile + 7) // 8 * 8)
    n_tiles = (rows + tile - 1) // tile
    for c in prange(n_tiles):
        r0 = c * tile
        _calls.gemm_rows(qt, w, r0, min(rows, r0 + tile), xq, xdb, xsum, out)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def row_dots(x, v):
    """[T] = x [T, n] · v [n], every row by the same dot: its value does not depend on T
    (numpy's product of a matrix and a vector may block the rows differently by T)."""
    out = np.empty(x.shape[0], np.float32)
    for t in range(x.shape[0]):
        out[t] = dot(x[t], v)
    return out


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def rms_norm_rows(x, w, eps, out):
    for t in prange(x.shape[0]):
        rms_norm_into(x[t], w, eps, out[t])


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def silu_mul_rows(gt, up, out):
    """out = silu(gt) · up, [T, F] (the same SiLU as the decode kernels)."""
    for t in prange(gt.shape[0]):
        for i in range(gt.shape[1]):
            out[t, i] = silu_mul(gt[t, i], up[t, i])


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _full_scale(x, eps):
    ms = np.float32(np.float64(sum_squares(x)) / x.shape[0])
    return np.float32(1.0) / np.sqrt(ms + eps)


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def prefill_qk(q, k, v, q_norm, k_norm, qk_mode, eps, cos, sin, neox, n_head, n_head_kv,
               head_dim, v_dim, kc, vc, pos, qh):
    """Per token t (position pos + t): qk-norm and rope of q [T, H·d] and k [T, Hkv·d]; k
    and v [T, Hkv·dv] stored as float16 bits in kc / vc [n_ctx, Hkv, d] at row pos + t;
    qh [T, H, d] = the rotated queries rounded to float16 (as ggml rounds them).
    qk_mode: 0 none, 1 per head, 2 over the whole projection, 3 per head after rope
    (decode.QK_*)."""
    for t in prange(q.shape[0]):
        qs = ks = np.float32(1.0)
        if qk_mode == 2:
            qs = _full_scale(q[t], eps)
            ks = _full_scale(k[t], eps)
        kh = np.empty(head_dim, np.float32)
        for gi in range(n_head_kv):
            k0 = gi * head_dim
            for j in range(head_dim):
                kh[j] = k[t, k0 + j]
            if qk_mode == 1:
                rms_norm_into(kh, k_norm, eps, kh)
            elif qk_mode == 2:
                for j in range(head_dim):
                    kh[j] = (kh[j] * ks) * k_norm[k0 + j]
            rope_into(kh, cos[t], sin[t], neox)
            if qk_mode == 3:
                rms_norm_into(kh, k_norm, eps, kh)
            store_f16(kh, kc[pos + t, gi])
            store_f16(v[t, gi * v_dim:(gi + 1) * v_dim], vc[pos + t, gi])
        for hq in range(n_head):
            q0 = hq * head_dim
            qv = qh[t, hq]
            for j in range(head_dim):
                qv[j] = q[t, q0 + j]
            if qk_mode == 1:
                rms_norm_into(qv, q_norm, eps, qv)
            elif qk_mode == 2:
                for j in range(head_dim):
                    qv[j] = (qv[j] * qs) * q_norm[q0 + j]
            rope_into(qv, cos[t], sin[t], neox)
            if qk_mode == 3:
                rms_norm_into(qv, q_norm, eps, qv)
            for j in range(head_dim):
                qv[j] = _round_half(qv[j])


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def _kv_to_f32(kc, vc, n_keys, kt, vf):
    """kt [Hkv, d, S8] (keys transposed, zero past n_keys), vf [Hkv, S8, dv] from the
    float16 cache."""
    for gi in prange(kc.shape[1]):
        for j in range(kt.shape[1]):
            for s in range(n_keys, kt.shape[2]):
                kt[gi, j, s] = 0.0
        for s in range(n_keys):
            for j in range(kt.shape[1]):
                kt[gi, j, s] = half_to_f32(np.int64(kc[s, gi, j]))
            for j in range(vf.shape[2]):
                vf[gi, s, j] = half_to_f32(np.int64(vc[s, gi, j]))
        for s in range(n_keys, vf.shape[1]):
            for j in range(vf.shape[2]):
                vf[gi, s, j] = 0.0


@njit(cache=True, nogil=True, fastmath=FAST, error_model="numpy")
def _softmax_f16(scores, n_valid, n_all):
    """scores[:n_valid] → softmax weights rounded to f16 (ggml multiplies F16 V by F16
    weights); scores[n_valid:n_all] → 0 (keys after this query)."""
    mx = np.float32(-np.inf)
    for s in range(n_valid):
        mx = max(mx, scores[s])
    tot = np.float32(0.0)
    for s in range(n_valid):
        e = exp_f32(scores[s] - mx)
        scores[s] = e
        tot += e
    inv = np.float32(1.0) / tot
    for s in range(n_valid):
        scores[s] = _round_half(scores[s] * inv)
    for s in range(n_valid, n_all):
        scores[s] = 0.0


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def prefill_attend(qh, kc, vc, pos, n_head_kv, v_dim, scale, out):
    """Causal attention of T queries qh [T, H, d] at positions pos..pos+T-1 over the
    cache rows 0..pos+T-1 (kc / vc uint16 [n_ctx, Hkv, d]); out [T, H·dv].

    Queries go 4 at a time (simd_attn): the block's scores are computed up to its last
    query's keys, each query then takes a softmax over its own causal prefix."""
    n_tok, n_head, d = qh.shape
    n_keys = pos + n_tok
    s8 = (n_keys + 7) // 8 * 8
    kt = np.empty((n_head_kv, d, s8), np.float32)
    vf = np.empty((n_head_kv, s8, v_dim), np.float32)
    _kv_to_f32(kc, vc, n_keys, kt, vf)
    group = n_head // n_head_kv
    n_blk = (n_tok + NQ - 1) // NQ
    for i in prange(n_head * n_blk):
        hq = i // n_blk
        t0 = (i % n_blk) * NQ
        gi = hq // group
        q4 = np.zeros((NQ, d), np.float32)
        for r in range(min(NQ, n_tok - t0)):
            q4[r] = qh[t0 + r, hq]
        nk = min(pos + t0 + NQ, n_keys)  # keys the block's last query sees
        n8 = (nk + 7) // 8
        sc = np.empty((NQ, n8 * 8), np.float32)
        attn_scores_q4(kt[gi], s8, n8, q4, d, d, scale, sc, n8 * 8)
        for r in range(NQ):
            _softmax_f16(sc[r], min(pos + t0 + r + 1, nk), n8 * 8)
        o4 = np.zeros((NQ, v_dim), np.float32)
        attn_values_q4(sc, n8 * 8, nk, vf[gi], v_dim, o4, v_dim)
        for r in range(min(NQ, n_tok - t0)):
            out[t0 + r, hq * v_dim:(hq + 1) * v_dim] = o4[r]


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def matmul_f32(w, x, out):
    """out[T, rows] = x · w.T for an F32 matrix given as its raw bytes [rows, 4·n]."""
    for r in prange(w.shape[0]):
        row = w[r].view(np.float32)
        for t in range(x.shape[0]):
            out[t, r] = dot(row, x[t])
