"""gpt-oss's attention on a torch device: efedge/oss.py's SinkAttention, op for op.

q / k / v with biases, neox rope from the host's per-layer tables (the sliding-window
layers may have their own base and YaRN: Transformer._rope_rows, uploaded by
GpuTransformer._forward_ubatch), the float16 KV cache, scores scaled by cfg.attn_scale,
one learned sink logit per head that takes a share of each softmax and attends to
nothing, and on the sliding-window layers only the last ``window`` keys (the query's own
included). The output projection has a bias too. The roundings are those of
efedge.oss.attention_sinks (q and the softmax weights to f16).
Shapes: T tokens, H heads, Hkv kv heads, d head size, S keys.
"""

from __future__ import annotations

import torch

from efedge.gpu.model import ATTN_BYTES, GpuMatrix, _vec, apply_rope


class GpuSinkAttention:
    """One gpt-oss attention layer on the device, built from the host block's
    SinkAttention (its weights keep their GGUF names)."""

    MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output")

    def __init__(self, sa, device, dense_names: set[str]):
        for name in self.MATRICES:
            qm = getattr(sa, name)
            setattr(self, name, GpuMatrix(qm.raw, qm.qtype, qm.name, device,
                                          qm.name in dense_names))
            setattr(self, name + "_b", _vec(getattr(sa, name + "_b"), device))
        self.attn_sinks = _vec(sa.attn_sinks, device)
        self.window, self.scale = int(sa.window), float(sa.scale)

    def matrices(self) -> list[GpuMatrix]:
        return [getattr(self, n) for n in self.MATRICES]

    def __call__(self, tf, il: int, h: torch.Tensor, pos: int, kv, rope) -> torch.Tensor:
        """h [T, D] (the normed input) at positions pos..pos+T → [T, D]; writes the
        layer's KV cache rows pos..pos+T. tf: the GpuTransformer; rope: this layer's cos /
        sin [T, rope_dim/2] on the device (the host's Transformer._rope_rows: YaRN folded
        in, the sliding-window layers' own base)."""
        c = tf.cfg
        t = h.shape[0]
        q = (self.attn_q(h) + self.attn_q_b).reshape(t, c.n_head, c.head_dim)
        k = (self.attn_k(h) + self.attn_k_b).reshape(t, c.n_head_kv, c.head_dim)
        v = (self.attn_v(h) + self.attn_v_b).reshape(t, c.n_head_kv, c.v_head_dim)
        q, k = apply_rope(q, *rope, "neox"), apply_rope(k, *rope, "neox")
        kv.store(il, pos, k.to(torch.float16), v.to(torch.float16))
        keys, values = kv.view(il, pos + t)
        att = attention_sinks(q, keys, values, pos, self.attn_sinks, self.scale, self.window)
        return self.attn_output(att) + self.attn_output_b


def attention_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int,
                    sinks: torch.Tensor, scale: float, window: int = 0) -> torch.Tensor:
    """Causal GQA attention with a sink logit per head (efedge.oss.attention_sinks on the
    device). q [T, H, d] at positions pos..pos+T, k / v [S, Hkv, d] float16 with S =
    pos + T, sinks [H]; window > 0: each query sees its last `window` keys. Queries go in
    chunks so the float32 scores stay within ATTN_BYTES. Returns [T, H·dv]."""
    t, h, d = q.shape
    s, hkv, dv = v.shape
    g = h // hkv
    # keys before the window of the batch's first query are seen by none: skip them
    k0 = max(0, pos - window + 1) if window > 0 else 0
    kt = k[k0:].to(torch.float32).permute(1, 2, 0)[:, None]  # [Hkv, 1, d, S']
    vv = v[k0:].to(torch.float32).permute(1, 0, 2)[:, None]  # [Hkv, 1, S', dv]
    q = q.to(torch.float16).to(torch.float32)
    sk = sinks.reshape(hkv, g, 1, 1)
    n_keys = s - k0
    step = max(1, ATTN_BYTES // (4 * h * n_keys))
    out = torch.empty((t, h * dv), dtype=torch.float32, device=q.device)
    kpos = k0 + torch.arange(n_keys, device=q.device)
    for lo in range(0, t, step):
        qc = q[lo:lo + step]
        tc = qc.shape[0]
        qg = qc.reshape(tc, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, g, tc, d]
        scores = torch.matmul(qg, kt) * scale
        qpos = pos + lo + torch.arange(tc, device=q.device)
        mask = kpos[None, :] > qpos[:, None]
        if window > 0:
            mask |= qpos[:, None] - kpos[None, :] >= window
        scores.masked_fill_(mask, float("-inf"))
        mx = torch.maximum(scores.amax(dim=-1, keepdim=True), sk)
        p = torch.exp(scores - mx)
        p = p / (p.sum(dim=-1, keepdim=True) + torch.exp(sk - mx))
        p = p.to(torch.float16).to(torch.float32)  # ggml's F16 V product takes f16 weights
        o = torch.matmul(p, vv)  # [Hkv, g, tc, dv]
        out[lo:lo + tc] = o.permute(2, 0, 1, 3).reshape(tc, h * dv)
    return out
