"""deepseek2's multi-head latent attention on a torch device: efedge/mla.py (MLAAttention)
step by step, from the same weights, with the same float16 roundings of q and the cache.

Both GGUF layouts, as on the CPU path:

* split (``attn_k_b`` / ``attn_v_b``): the cache holds one key head [latent, k_pe] and the
  latent as value; each head's q_nope is absorbed into latent space by its own k_b matrix,
  attention runs over the latent (one kv head, GQA with a group of H) and each head's
  result goes back through its own v_b matrix before attn_output;
* legacy (``attn_kv_b``): the latent is decompressed to per-head keys and values, then
  plain multi-head attention.

The per-head stacks [H, rows, row_bytes] are uploaded as one [H·rows, row_bytes] matrix
(dense float32 or quantized, as the memory plan decides by name) and applied head by head
with batched products. Shapes: T tokens, H heads, L kv_lora, R rope dims, N nope dims,
V value dims.
"""

from __future__ import annotations

import torch

from efedge.gpu import kernels as tk
from efedge.mla import MLAAttention
from efedge.weights import QMatrix

MATRICES = ("attn_q", "attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_kv_b", "attn_output")
HEADS = {"k_b": "attn_k_b", "v_b": "attn_v_b"}  # MLAAttention's attribute → tensor name


def host_matrices(attn: MLAAttention, il: int) -> list[QMatrix]:
    """The layer's matrices as the memory plan and the upload see them: the per-head
    stacks flattened to [H·rows, row_bytes] under their tensor names."""
    out = [m for n in MATRICES if (m := getattr(attn, n, None)) is not None]
    for attr, tensor in HEADS.items():
        if (stack := getattr(attn, attr, None)) is not None:
            raw, qt = stack
            out.append(QMatrix(raw.reshape(-1, raw.shape[-1]), qt, f"blk.{il}.{tensor}.weight"))
    return out


def act_floats(cfg) -> int:
    """float32 values per token the latent attention holds at its peak (q and its rotary
    part, the absorbed or decompressed heads and their float16-rounded copy, the result
    before and after v_b), a bound on what the scratch plan adds per micro-batch token."""
    h, r, lora = cfg.n_head, cfg.rope_dim, cfg.kv_lora_rank
    qk = cfg.k_head_dim_mla or cfg.head_dim  # nope + rope in both layouts
    v = cfg.v_head_dim_mla or cfg.v_head_dim
    wide = max(lora + r, qk + v)  # the split layout's latent heads, the legacy kv_b rows
    return h * (3 * qk + 4 * wide + v)


def per_head(m, n_head: int, x: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    """x [T, H, K] → [T, H, rows]: head h through rows h·rows..(h+1)·rows of the GpuMatrix
    m (ggml's mul_mat batched over heads; MLAAttention._per_head). x is rounded for m's
    weight type row by row, as each head's product rounds it."""
    t, _, k = x.shape
    rows = m.rows // n_head
    xr = tk.round_activations(x.reshape(t * n_head, k), m.qtype)
    xr = xr.reshape(t, n_head, k).transpose(0, 1)  # [H, T, K]
    if m.dense is not None:
        return torch.bmm(xr, m.dense.view(n_head, rows, k).transpose(1, 2)).transpose(0, 1)
    # quantized: decode a few heads at a time (at most chunk_bytes of float32)
    out = torch.empty((n_head, t, rows), dtype=torch.float32, device=x.device)
    step = max(1, chunk_bytes // (4 * rows * k))
    raw = m.raw.view(n_head, rows, -1)
    for lo in range(0, n_head, step):
        w = tk.dequantize(raw[lo:lo + step], m.qtype)  # [h, rows, K]
        out[lo:lo + step] = torch.bmm(xr[lo:lo + step], w.transpose(1, 2))
    return out.transpose(0, 1)


class GpuMLA:
    """One layer's latent attention on the device, built from the host block's
    MLAAttention; called as attn(h, il, pos, kv, rope) → [T, D] like the standard
    attention of GpuTransformer."""

    def __init__(self, attn: MLAAttention, il: int, device, dense_names: set[str]):
        from efedge.gpu.model import GpuMatrix, _vec

        self.h, self.nope, self.r, self.v, self.lora = (attn.h, attn.nope, attn.r, attn.v,
                                                        attn.lora)
        self.split, self.eps = attn.split, float(attn.eps)
        self.scale = float(attn.scale)  # 1/√(N + R), times mscale² under YaRN
        mats = {m.name: GpuMatrix(m.raw, m.qtype, m.name, device, m.name in dense_names)
                for m in host_matrices(attn, il)}
        for n in MATRICES:
            qm = getattr(attn, n, None)
            setattr(self, n, None if qm is None else mats[qm.name])
        self.k_b = mats.get(f"blk.{il}.attn_k_b.weight")
        self.v_b = mats.get(f"blk.{il}.attn_v_b.weight")
        self.attn_q_a_norm = _vec(getattr(attn, "attn_q_a_norm", None), device)
        self.attn_kv_a_norm = _vec(attn.attn_kv_a_norm, device)

    def matrices(self) -> list:
        return [m for n in (*MATRICES, "k_b", "v_b") if (m := getattr(self, n)) is not None]

    def __call__(self, hn: torch.Tensor, il: int, pos: int, kv, rope) -> torch.Tensor:
        """The attention output [T, D] of normalised hidden states hn [T, D] at positions
        pos..pos+T (rope: the device cos / sin of those positions); writes the cache."""
        from efedge.gpu.model import CHUNK_BYTES, apply_rope, attention, rms_norm

        t, h, nope, r, lora = hn.shape[0], self.h, self.nope, self.r, self.lora
        if self.attn_q is not None:
            q = self.attn_q(hn)
        else:
            q = self.attn_q_b(rms_norm(self.attn_q_a(hn), self.attn_q_a_norm, self.eps))
        q = q.reshape(t, h, nope + r)
        ckv = self.attn_kv_a_mqa(hn)  # [T, L + R]
        q_pe = apply_rope(q[:, :, nope:], *rope, "normal")
        k_pe = apply_rope(ckv[:, None, lora:], *rope, "normal")[:, 0]  # one head for all
        latent = rms_norm(ckv[:, :lora], self.attn_kv_a_norm, self.eps)
        if self.split:
            q_lat = per_head(self.k_b, h, q[:, :, :nope], CHUNK_BYTES)  # [T, H, L]
            qh = torch.cat([q_lat, q_pe], dim=-1)
            key = torch.cat([latent, k_pe], dim=-1)[:, None]
            kv.store(il, pos, key.to(torch.float16), latent[:, None].to(torch.float16))
        else:
            kvb = self.attn_kv_b(latent).reshape(t, h, nope + self.v)
            qh = torch.cat([q[:, :, :nope], q_pe], dim=-1)
            key = torch.cat([kvb[:, :, :nope], k_pe[:, None].expand(t, h, r)], dim=-1)
            kv.store(il, pos, key.to(torch.float16), kvb[:, :, nope:].to(torch.float16))
        keys, values = kv.view(il, pos + t)
        att = attention(qh, keys, values, pos, scale=self.scale)  # q rounded to f16 there
        if self.split:
            att = per_head(self.v_b, h, att.reshape(t, h, lora), CHUNK_BYTES).reshape(t, -1)
        return self.attn_output(att)
