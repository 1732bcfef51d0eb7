"""The non-quantized pieces of a transformer block, on float32 arrays: RMS norm, rope,
causal attention with GQA, SwiGLU, routing. Shapes: T tokens, D width, H heads."""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x [..., D] * rsqrt(mean(x²) + eps) * w — as ggml_rms_norm then mul."""
    ms = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True, dtype=np.float32)
    return (x * (1.0 / np.sqrt(ms + np.float32(eps)))).astype(np.float32) * w


def rope_tables(positions: np.ndarray, rope_dim: int, base: float) -> tuple[np.ndarray, ...]:
    """cos / sin [T, rope_dim/2] for the given positions (theta_i = pos · base^(-2i/dim))."""
    inv = base ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    ang = positions.astype(np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, style: str) -> np.ndarray:
    """Rotate x [T, H, hd] in place-free fashion; only the first 2·len(cos[0]) dims rotate.

    "normal" rotates adjacent pairs (x0,x1),(x2,x3)…; "neox" rotates (x_i, x_{i+half}).
    """
    half = cos.shape[1]
    out = x.copy()
    c, s = cos[:, None, :], sin[:, None, :]
    if style == "neox":
        a, b = x[..., :half], x[..., half:2 * half]
        out[..., :half] = a * c - b * s
        out[..., half:2 * half] = a * s + b * c
    else:
        a, b = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        out[..., 0:2 * half:2] = a * c - b * s
        out[..., 1:2 * half:2] = a * s + b * c
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: int) -> np.ndarray:
    """Causal attention. q [T, H, d] at positions pos..pos+T; k, v [S, Hkv, d] with
    S = pos + T (float16 from the KV cache). Returns [T, H·dv].

    q is rounded to float16 as ggml does before its F16 K·Q product, so scores carry the
    same rounding as llama.cpp's."""
    q = q.astype(np.float16).astype(np.float32)
    k = k.astype(np.float32)
    v = v.astype(np.float32)
    t, h, d = q.shape
    s, hkv, dv = v.shape
    group = h // hkv
    scale = np.float32(1.0 / np.sqrt(d))
    # [Hkv, group, T, d] @ [Hkv, d, S] → [Hkv, group, T, S]
    qg = q.reshape(t, hkv, group, d).transpose(1, 2, 0, 3)
    scores = np.matmul(qg, k.transpose(1, 2, 0)[:, None]) * scale
    # token i (absolute pos+i) sees keys 0..pos+i
    mask = np.arange(s)[None, :] > (pos + np.arange(t))[:, None]
    scores[..., mask] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores, dtype=np.float32)
    p /= p.sum(axis=-1, keepdims=True)
    p = p.astype(np.float16).astype(np.float32)  # ggml multiplies F16 V by F16 weights
    out = np.matmul(p, v.transpose(1, 0, 2)[:, None])  # [Hkv, group, T, dv]
    return np.ascontiguousarray(out.transpose(2, 0, 1, 3).reshape(t, h * dv), dtype=np.float32)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def route(router_logits: np.ndarray, k: int, renormalise: bool) -> tuple[np.ndarray, ...]:
    """Softmax over all experts, top-k. Returns (ids [T, K] int32, weights [T, K] float32,
    probs [T, E]). Ties break towards the lower expert id; ids are sorted by weight."""
    probs = softmax(router_logits.astype(np.float32))
    # stable argsort of -p keeps lower ids first among equals
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k].astype(np.int32)
    w = np.take_along_axis(probs, ids, axis=-1)
    if renormalise:
        w = w / w.sum(axis=-1, keepdims=True)
    return ids, w.astype(np.float32), probs
