"""The non-quantized pieces of a transformer block, on float32 arrays: RMS norm, rope,
causal attention with GQA, SwiGLU, routing. Shapes: T tokens, D width, H heads."""

from __future__ import annotations

import numpy as np

from efedge import rope


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x [..., D] * rsqrt(mean(x²) + eps) * w — as ggml_rms_norm then mul."""
    ms = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True, dtype=np.float32)
    return (x * (1.0 / np.sqrt(ms + np.float32(eps)))).astype(np.float32) * w


def rope_tables(positions: np.ndarray, rope_dim: int, base: float, scaling=None,
                freq_factors: np.ndarray | None = None,
                still: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """cos / sin [T, rope_dim/2] for the given positions (theta_i = pos · base^(-2i/dim)),
    with linear / YaRN scaling (scaling: a rope.RopeScaling) folded in; still: pairs that
    do not turn (rope.tables)."""
    return rope.tables(positions, rope_dim, base, scaling, freq_factors, still)


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


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: int,
              scale: float | None = None) -> np.ndarray:
    """Causal attention. q [T, H, d] at positions pos..pos+T; k, v [S, Hkv, d] with
    S = pos + T (float16 from the KV cache). Returns [T, H·dv]. scale: of the scores
    (default 1/√d).

    q is rounded to float16 as ggml does before its F16 K·Q product, so scores carry the
    same rounding as llama.cpp's."""
    q = q.astype(np.float16).astype(np.float32)
    k = k.astype(np.float32)
    v = v.astype(np.float32)
    t, h, d = q.shape
    s, hkv, dv = v.shape
    group = h // hkv
    scale = np.float32(1.0 / np.sqrt(d) if scale is None else scale)
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


def attn_temperature(positions: np.ndarray, temp: tuple[int, float, float]) -> np.ndarray:
    """llama4's query scale on its NoPE layers (llm_graph_input_attn_temp), float32 per
    position: log(floor((pos + offset) / floor_scale) + 1) · scale + 1; 1 below the first
    floor_scale positions. temp = (floor_scale, scale, offset); floor_scale 0: none."""
    floor_scale, scale, offset = temp
    pos = np.asarray(positions, np.float32)
    if not floor_scale:
        return np.ones(pos.shape, np.float32)
    steps = np.floor((pos + np.float32(offset)) / np.float32(floor_scale)).astype(np.float64)
    return (np.log(steps + 1.0) * np.float32(scale) + 1.0).astype(np.float32)


def attention_runs(pos: int, t: int, chunk: int, temp: tuple[int, float, float],
                   nope: bool) -> list[tuple[int, int, int, float]]:
    """The queries at positions pos..pos+t of a layer as runs (first row, end row, first
    key, temperature) that attend alike. chunk > 0 (llama4's chunked layers, llama.cpp's
    LLAMA_SWA_TYPE_CHUNKED): a query at p sees only keys p // chunk · chunk .. p; nope
    (llama4's NoPE layers): its scores are scaled by attn_temperature(p, temp)."""
    p = np.arange(pos, pos + t)
    first = p // chunk * chunk if chunk else np.zeros(t, np.int64)
    scale = attn_temperature(p, temp) if nope else np.ones(t, np.float32)
    cut = np.flatnonzero((first[1:] != first[:-1]) | (scale[1:] != scale[:-1])) + 1
    bounds = [0, *cut.tolist(), t]
    return [(a, b, int(first[a]), float(scale[a]))
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


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


def route_ext(logits: np.ndarray, k: int, gating: str, sel_bias: np.ndarray | None = None,
              n_groups: int = 0, n_group_used: int = 0, norm: bool = False,
              scale: float = 0.0) -> tuple[np.ndarray, ...]:
    """llama.cpp's general MoE routing (build_moe_ffn), for deepseek2 and gpt-oss.

    gating: "softmax" / "sigmoid" turn logits [T, E] into probs; "softmax_weight" keeps
    the logits and takes the softmax of the k selected ones. sel_bias (DeepSeek-V3) is
    added for the selection only; with n_groups > 1 only the n_group_used groups whose two
    best scores sum highest compete. norm renormalises the k weights to sum 1 (the sum
    clamped at 2^-14 as llama.cpp does), scale (if not 0) multiplies them. Returns (ids,
    weights, probs) as route() does; ties break towards the lower id."""
    x = logits.astype(np.float32)
    if gating == "softmax":
        probs = softmax(x)
    elif gating == "sigmoid":
        probs = (np.float32(1.0) / (np.float32(1.0) + np.exp(-x))).astype(np.float32)
    else:
        probs = x
    sel = probs + sel_bias if sel_bias is not None else probs
    t, e = sel.shape
    if n_groups > 1:
        g = sel.reshape(t, n_groups, e // n_groups)
        best2 = np.sort(g, axis=-1)[..., -2:]
        score = best2[..., 1] + best2[..., 0]
        keep = np.argsort(-score, axis=-1, kind="stable")[:, :n_group_used]
        masked = np.full_like(g, -np.inf)
        rows = np.arange(t)[:, None]
        masked[rows, keep] = g[rows, keep]
        sel = masked.reshape(t, e)
    ids = np.argsort(-sel, axis=-1, kind="stable")[:, :k].astype(np.int32)
    w = np.take_along_axis(probs, ids, axis=-1)
    if gating == "softmax_weight":
        w = softmax(w)
    if norm:
        w = w / np.maximum(w.sum(axis=-1, keepdims=True), np.float32(6.103515625e-5))
    if scale:
        w = w * np.float32(scale)
    return ids, w.astype(np.float32), probs
