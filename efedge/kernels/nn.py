"""Small numba building blocks of a transformer block on float32 vectors: RMS norm, rope,
one head of causal attention over the float16 KV cache, SwiGLU, softmax + top-k.

They follow ``efedge.layers`` (the numpy reference) operation by operation. Kernels use
numba's numpy error model (no ZeroDivisionError check on float division: the check is a
branch that keeps loops like SiLU's from vectorising). Norm sums use
a fixed order (explicit lanes, no fast-math), so a norm never depends on its caller; the
attention dots use fast-math (they are private to one kernel, so still deterministic).
KV caches are float16 stored as their uint16 bits (numba has no float16 type).
"""

import numpy as np
from numba import njit

from ._fp import FAST, bits_to_f32, f32_to_f16, half_to_f32, round_f16

_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def sum_squares(x):
    """sum(x²) in float32 over 8 fixed lanes (vectorises without reassociation)."""
    n = x.shape[0]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = _ZERO
    i = 0
    while i + 8 <= n:
        s0 += x[i] * x[i]
        s1 += x[i + 1] * x[i + 1]
        s2 += x[i + 2] * x[i + 2]
        s3 += x[i + 3] * x[i + 3]
        s4 += x[i + 4] * x[i + 4]
        s5 += x[i + 5] * x[i + 5]
        s6 += x[i + 6] * x[i + 6]
        s7 += x[i + 7] * x[i + 7]
        i += 8
    s = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    while i < n:
        s += x[i] * x[i]
        i += 1
    return s


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def rms_norm_into(x, w, eps, out):
    """out = x * rsqrt(mean(x²) + eps) * w (x, out may be the same array)."""
    ms = np.float32(np.float64(sum_squares(x)) / x.shape[0])
    scale = _ONE / np.sqrt(ms + eps)
    for i in range(x.shape[0]):
        out[i] = (x[i] * scale) * w[i]


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def rope_into(x, cos, sin, neox):
    """Rotate one head x [hd] in place; only the first 2·len(cos) dims rotate."""
    half = cos.shape[0]
    if neox:
        for i in range(half):
            a = x[i]
            b = x[i + half]
            x[i] = a * cos[i] - b * sin[i]
            x[i + half] = a * sin[i] + b * cos[i]
    else:
        for i in range(half):
            a = x[2 * i]
            b = x[2 * i + 1]
            x[2 * i] = a * cos[i] - b * sin[i]
            x[2 * i + 1] = a * sin[i] + b * cos[i]


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def store_f16(x, dst):
    """dst (uint16 bits) = x rounded to float16."""
    for i in range(x.shape[0]):
        dst[i] = f32_to_f16(x[i])


@njit(cache=True, nogil=True, fastmath=FAST, error_model="numpy")
def attend_head(q, kc, vc, g, n_keys, scale, scores, out):
    """One query head q [d] (already rounded to f16) over keys / values 0..n_keys-1 of KV
    head g: kc [S, Hkv, d], vc [S, Hkv, dv] (uint16 bits). out [dv] = softmax(q·K·scale)
    rounded to f16, times V. ``scores``: scratch of at least n_keys floats."""
    d = q.shape[0]
    dv = out.shape[0]
    mx = np.float32(-np.inf)
    for s in range(n_keys):
        acc = _ZERO
        for j in range(d):
            acc += q[j] * half_to_f32(np.int64(kc[s, g, j]))
        v = acc * scale
        scores[s] = v
        mx = max(mx, v)
    tot = _ZERO
    for s in range(n_keys):
        p = exp_f32(scores[s] - mx)
        scores[s] = p
        tot += p
    for j in range(dv):
        out[j] = _ZERO
    for s in range(n_keys):
        p = round_f16(scores[s] / tot)
        for j in range(dv):
            out[j] += p * half_to_f32(np.int64(vc[s, g, j]))


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)
_LN2_LO = np.float32(1.428606765330187e-06)
_EXP_C = (np.float32(1.0 / 5040), np.float32(1.0 / 720), np.float32(1.0 / 120),
          np.float32(1.0 / 24), np.float32(1.0 / 6), np.float32(0.5))


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def exp_f32(x):
    """e**x in float32 within 1.2 ulp, in plain arithmetic so that loops over it vectorise
    (libm's expf is a call per element). x is clamped to [-87.3, 88.7]: no subnormal
    results, no overflow to inf (the callers only need e**x for softmax and SiLU)."""
    x = min(max(x, np.float32(-87.3)), np.float32(88.7))
    k = np.float32(np.rint(x * _LOG2E))
    r = (x - k * _LN2_HI) - k * _LN2_LO  # |r| <= ln2 / 2
    c7, c6, c5, c4, c3, c2 = _EXP_C
    p = ((((((c7 * r + c6) * r + c5) * r + c4) * r + c3) * r + c2) * r + _ONE) * r + _ONE
    ki = np.int32(k)
    k1 = ki >> 1  # 2^k in two factors: k reaches 128 just below float32's overflow
    return (p * bits_to_f32((k1 + 127) << 23)) * bits_to_f32((ki - k1 + 127) << 23)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def silu_mul(g, u):
    """silu(g) · u as layers.silu does it: g / (1 + exp(-g)) · u."""
    return (g / (_ONE + exp_f32(-g))) * u


_OAI_ALPHA = np.float32(1.702)
_OAI_LIMIT = np.float32(7.0)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def swiglu_oai(g, u):
    """ggml_swiglu_oai(g, u) with gpt-oss's alpha 1.702 and limit 7, as ggml-cpu's loop:
    x = min(g, 7), y = clamp(u, -7, 7), x / (1 + exp(alpha · -x)) · (y + 1)."""
    x = min(g, _OAI_LIMIT)
    y = min(max(u, -_OAI_LIMIT), _OAI_LIMIT)
    return (x / (_ONE + exp_f32(_OAI_ALPHA * -x))) * (y + _ONE)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def silu_mul_into(g, u, out):
    """out = silu(g) · u elementwise (a loop the compiler vectorises)."""
    for i in range(out.shape[0]):
        out[i] = silu_mul(g[i], u[i])


# the experts' activation of gate and up (decode_ffn's and moe_ffn's ``act``)
ACT_SILU, ACT_RELU = 0, 1


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def relu_mul(g, u):
    """relu(g) · u as ggml_reglu computes it: g · u where g > 0, else 0 (smallthinker)."""
    return g * u if g > _ZERO else _ZERO


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def act_mul_into(act, g, u, out):
    """out = act(g) · u elementwise: silu (ACT_SILU) or relu (ACT_RELU)."""
    if act == ACT_RELU:
        for i in range(out.shape[0]):
            out[i] = relu_mul(g[i], u[i])
    else:
        silu_mul_into(g, u, out)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def topk_into(x, k, ids):
    """ids [k] = the indices of the k largest x, largest first (ties → lower index)."""
    e = x.shape[0]
    taken = np.zeros(e, np.bool_)
    for j in range(k):
        best = -1
        for i in range(e):
            if not taken[i] and (best < 0 or x[i] > x[best]):
                best = i
        taken[best] = True
        ids[j] = best


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def softmax_topk(logits, k, renorm, ids, w):
    """Softmax over all experts, then the k largest (ties → lower id), weights optionally
    renormalised to sum 1. ids [k] int32, w [k] float32 are filled."""
    e = logits.shape[0]
    mx = logits[0]
    for i in range(1, e):
        mx = max(mx, logits[i])
    p = np.empty(e, np.float32)
    tot = _ZERO
    for i in range(e):
        p[i] = np.exp(logits[i] - mx)
        tot += p[i]
    for i in range(e):
        p[i] = p[i] / tot
    topk_into(p, k, ids)
    for j in range(k):
        w[j] = p[ids[j]]
    if renorm:
        s = _ZERO
        for j in range(k):
            s += w[j]
        for j in range(k):
            w[j] = w[j] / s
