"""Activation rounding as llama.cpp's CPU backend applies it before a matrix product.

ggml multiplies a quantized weight by activations converted to the weight type's
"vec_dot_type": Q8_0 blocks for the legacy 32-element quants and IQ4_NL, Q8_1 for Q4_1 /
Q5_1, Q8_K blocks for the K-quants and IQ4_XS, F16 for F16 weights, BF16 for BF16. The
rounding moves logits by ~0.5% and, through near-tied routing, can flip which experts a
token uses; rounding our activations the same way keeps efedge on llama.cpp's side of
those ties. round_activations returns the rounded values as float32 (quantize, then
dequantize), so the products that follow are ordinary float dot products.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

# qtype → rounding scheme
_Q8_0 = {Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.IQ4_NL}
_Q8_1 = {Q.Q4_1, Q.Q5_1}
_Q8_K = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS}


def _round_q8_0(x: np.ndarray) -> np.ndarray:
    # blocks of 32: d = amax / 127 stored as fp16, q = round(x / d) (ties to even, as the
    # AVX path rounds)
    t, k = x.shape
    xb = x.reshape(t, k // 32, 32)
    d = np.abs(xb).max(axis=-1) / np.float32(127.0)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    q = np.round(xb * inv[..., None])
    d16 = d.astype(np.float16).astype(np.float32)
    return (q * d16[..., None]).astype(np.float32).reshape(t, k)


def _round_q8_k(x: np.ndarray) -> np.ndarray:
    # blocks of 256: the signed value of largest magnitude sets iscale = -127 / max;
    # q = nearest(iscale · x) capped at 127; d = 1 / iscale kept as float32
    t, k = x.shape
    xb = x.reshape(t, k // 256, 256)
    idx = np.abs(xb).argmax(axis=-1)
    mx = np.take_along_axis(xb, idx[..., None], axis=-1)[..., 0]
    with np.errstate(divide="ignore"):
        iscale = np.where(mx != 0, np.float32(-127.0) / mx, np.float32(0.0)).astype(np.float32)
        d = np.where(mx != 0, np.float32(1.0) / iscale, np.float32(0.0)).astype(np.float32)
    q = np.minimum(np.round(xb * iscale[..., None]), 127)
    return (q * d[..., None]).astype(np.float32).reshape(t, k)


def round_activations(x: np.ndarray, qtype: int) -> np.ndarray:
    """x [T, K] float32 rounded as llama.cpp rounds activations for weights of qtype."""
    qtype = Q(qtype)
    if qtype == Q.F32:
        return x
    if qtype == Q.F16:
        return x.astype(np.float16).astype(np.float32)
    if qtype == Q.BF16:
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) & np.uint32(0xFFFF0000)
        return rounded.view(np.float32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if (qtype in _Q8_0 or qtype in _Q8_1) and x.shape[1] % 32 == 0:
        return _round_q8_0(x)
    if qtype in _Q8_K and x.shape[1] % 256 == 0:
        return _round_q8_k(x)
    return x
