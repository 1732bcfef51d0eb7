"""gpt-oss pieces, as llama.cpp computes them: attention with biases, a learned sink
logit per head and sliding-window layers, and the experts' clamped SwiGLU with biases.

Attention: q / k / v with biases, neox rope, scores scaled by 1/√d over the float16 KV
cache; each head's softmax has one more term, exp(sink − max), that takes a share of
the weight and attends to nothing. Layers il with il % swa_pattern < swa_pattern − 1
(the even layers) see only the last ``sliding_window`` positions (the query's own
included). The output projection has a bias too.

Experts (kernels.moe.moe_ffn_oai for a batch of tokens, kernels.decode.decode_ffn_oai
for one: all of a layer's routed experts in one call): g = gate·x + b_g, u = up·x + b_u,
a = min(g, 7) · σ(1.702 · min(g, 7)) · (clamp(u, −7, 7) + 1), out = down·a + b_d
(ggml_swiglu_oai with llama.cpp's constants, kernels.nn.swiglu_oai).

One token (decode): ``SinkAttention.decode`` runs the attention half and the router as
one parallel region (kernels.decode_oss), the experts go through decode_ffn_oai.
Shapes: T tokens, H heads, Hkv kv heads, d head size, S keys.
"""

from __future__ import annotations

import numpy as np

from efedge.errors import ModelFormatError
from efedge.kernels import decode_oss as dko
from efedge.kernels import prefill as pk
from efedge.kernels.prefill_oss import prefill_attend_sinks


class SinkAttention:
    """One gpt-oss attention layer: weights named as the GGUF tensors."""

    def __init__(self, gf, cfg, il: int):
        from efedge.weights import _qmatrix, _vector

        b, c = f"blk.{il}.", cfg
        d, hd = c.n_embd, c.head_dim
        shapes = {"attn_q": (d, c.n_head * hd), "attn_k": (d, c.n_head_kv * hd),
                  "attn_v": (d, c.n_head_kv * c.v_head_dim),
                  "attn_output": (c.n_head * c.v_head_dim, d)}
        for name, shape in shapes.items():
            ref = gf.tensor(b + name + ".weight")
            if ref.shape != shape:
                raise ModelFormatError(f"tensor {b + name + '.weight'!r}: shape {ref.shape} "
                                       f"does not match the metadata (expected {shape})")
            setattr(self, name, _qmatrix(gf, b + name + ".weight"))
            bias = _vector(gf, b + name + ".bias")
            if bias.shape != (shape[1],):
                raise ModelFormatError(f"tensor {b + name + '.bias'!r}: {bias.shape[0]} "
                                       f"values, expected {shape[1]}")
            setattr(self, name + "_b", bias)
        sinks = b + "attn_sinks.weight" if b + "attn_sinks.weight" in gf.tensors \
            else b + "attn_sinks"
        self.attn_sinks = _vector(gf, sinks)
        if self.attn_sinks.shape != (c.n_head,):
            raise ModelFormatError(f"tensor {sinks!r}: {self.attn_sinks.shape[0]} values, "
                                   f"expected one per head ({c.n_head})")
        self.window = c.sliding_window if c.is_swa_layer(il) else 0
        self.scale = np.float32(c.attn_scale)

    def decode(self, tf, blk, il: int, x: np.ndarray, pos: int, kv, x_out: np.ndarray,
               h_out: np.ndarray, ids: np.ndarray, w: np.ndarray, nt: int) -> None:
        """One token at ``pos`` through the attention half of the layer and the router,
        in one parallel region (kernels.decode_oss): x_out = x + attention, h_out = the
        FFN input, ids / w = its experts and weights."""
        args = getattr(self, "_decode_args", None)
        if args is None:
            mats = [self.attn_q, self.attn_k, self.attn_v, self.attn_output,
                    blk.ffn_gate_inp]
            args = self._decode_args = (
                blk.attn_norm, blk.ffn_norm, np.float32(tf.cfg.norm_eps),
                *(m.raw for m in mats), np.array([m.qtype for m in mats], np.int64),
                np.array([m.scheme for m in mats], np.int64), self.attn_q_b, self.attn_k_b,
                self.attn_v_b, self.attn_output_b, blk.router_bias,
                self.attn_sinks.astype(np.float32), self.window)
        c = tf.cfg
        cos, sin = tf._rope_rows(pos, 1, il)
        dko.decode_attn_sinks(x, *args, cos[0], sin[0], c.n_head, c.n_head_kv, c.head_dim,
                              c.v_head_dim, self.scale, kv.k.view(np.uint16)[il],
                              kv.v.view(np.uint16)[il], pos, ids.shape[0], x_out, h_out,
                              ids, w, nt)

    def __call__(self, tf, il: int, hn: np.ndarray, pos: int, kv) -> np.ndarray:
        c = tf.cfg
        t = hn.shape[0]
        acts: dict = {}
        q = self.attn_q(hn, acts) + self.attn_q_b
        k = self.attn_k(hn, acts) + self.attn_k_b
        v = self.attn_v(hn, acts) + self.attn_v_b
        cos, sin = tf._rope_rows(pos, t, il)  # YaRN folded in; SWA layers' own base
        qh = np.empty((t, c.n_head, c.head_dim), np.float32)
        kc, vc = kv.k.view(np.uint16)[il], kv.v.view(np.uint16)[il]
        # rope (neox), the KV store and q rounded to f16, as for the other archs
        pk.prefill_qk(q, k, v, np.zeros(0, np.float32), np.zeros(0, np.float32), 0,
                      np.float32(c.norm_eps), cos, sin, True, c.n_head, c.n_head_kv,
                      c.head_dim, c.v_head_dim, kc, vc, pos, qh)
        att = prefill_attend_sinks(qh, kc, vc, pos, self.attn_sinks, self.scale, self.window)
        return self.attn_output(att) + self.attn_output_b


def attention_sinks(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: int, sinks: np.ndarray,
                    scale: float, window: int = 0) -> np.ndarray:
    """Causal attention with one sink logit per head (and a sliding window when window >
    0), in numpy: the reference of kernels.prefill_oss (the model's path). q [T, H, d]
    (rounded to f16) at positions pos..pos+T; k, v [S, Hkv, d] float16 with S = pos + T.
    Returns [T, H·dv]; weights rounded to f16 as ggml's F16 V product takes them."""
    k = k.astype(np.float32)
    v = v.astype(np.float32)
    t, h, d = q.shape
    s, hkv, dv = v.shape
    group = h // hkv
    qg = q.reshape(t, hkv, group, d).transpose(1, 2, 0, 3)  # [Hkv, group, T, d]
    scores = np.matmul(qg, k.transpose(1, 2, 0)[:, None]) * np.float32(scale)  # [.., T, S]
    qpos = pos + np.arange(t)[:, None]
    kpos = np.arange(s)[None, :]
    mask = kpos > qpos
    if window > 0:
        mask |= qpos - kpos >= window
    scores[..., mask] = -np.inf
    sk = sinks.astype(np.float32).reshape(hkv, group, 1, 1)
    mx = np.maximum(scores.max(axis=-1, keepdims=True), sk)
    p = np.exp(scores - mx, dtype=np.float32)
    p /= p.sum(axis=-1, keepdims=True) + np.exp(sk - mx, dtype=np.float32)
    p = p.astype(np.float16).astype(np.float32)
    out = np.matmul(p, v.transpose(1, 0, 2)[:, None])  # [Hkv, group, T, dv]
    return np.ascontiguousarray(out.transpose(2, 0, 1, 3).reshape(t, h * dv), dtype=np.float32)
