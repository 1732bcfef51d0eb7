"""A qwen3moe language model in torch, computed exactly as llama.cpp computes the architecture.

Parameter names are the GGUF tensor names with "." → "_" inside a block, so export is a
rename (see ``gguf_tools/export.py``). Per block:

    h = x + attn_output(attention(rope(q_norm(q)), rope(k_norm(k)), v))   # on attn_norm(x)
    y = h + sum_k w_k * down_k(silu(gate_k(n)) * up_k(n)),  n = ffn_norm(h)

with neox rope (rotate the two halves of a head), GQA (query head h reads kv head
h // (n_head / n_head_kv)), scale 1/sqrt(head_dim), router softmax over all experts, top-k,
weights renormalised to sum 1. Only used by the training tools, never by efedge.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    n_vocab: int = 4096
    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64
    n_expert: int = 64
    n_expert_used: int = 8
    n_ff_exp: int = 64
    n_ctx: int = 256
    rope_base: float = 10000.0
    norm_eps: float = 1e-6

    def to_dict(self) -> dict:
        return asdict(self)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_tables(n_ctx: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    # llama.cpp: theta_i = pos * base^(-2i/d), i < d/2; neox pairs element i with i + d/2.
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(n_ctx, dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def apply_rope_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, H, T, hd]; cos/sin [T, hd]
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos + rot * sin


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        d, hd = a.n_embd, a.head_dim
        self.attn_norm = nn.Parameter(torch.ones(d))
        self.attn_q = nn.Linear(d, a.n_head * hd, bias=False)
        self.attn_k = nn.Linear(d, a.n_head_kv * hd, bias=False)
        self.attn_v = nn.Linear(d, a.n_head_kv * hd, bias=False)
        self.attn_output = nn.Linear(a.n_head * hd, d, bias=False)
        self.attn_q_norm = nn.Parameter(torch.ones(hd))
        self.attn_k_norm = nn.Parameter(torch.ones(hd))
        self.ffn_norm = nn.Parameter(torch.ones(d))
        self.ffn_gate_inp = nn.Linear(d, a.n_expert, bias=False)
        e, f = a.n_expert, a.n_ff_exp
        # Gate and up of every expert in one tensor [E, 2F, D] (one matmul per expert);
        # exported as ffn_gate_exps = [:, :F] and ffn_up_exps = [:, F:].
        self.ffn_gate_up_exps = nn.Parameter(torch.randn(e, 2 * f, d) / math.sqrt(d))
        self.ffn_down_exps = nn.Parameter(torch.randn(e, d, f) / math.sqrt(f))

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        a = self.a
        B, T, _ = x.shape
        q = self.attn_q(x).view(B, T, a.n_head, a.head_dim)
        k = self.attn_k(x).view(B, T, a.n_head_kv, a.head_dim)
        v = self.attn_v(x).view(B, T, a.n_head_kv, a.head_dim)
        q = rms_norm(q, self.attn_q_norm, a.norm_eps).transpose(1, 2)
        k = rms_norm(k, self.attn_k_norm, a.norm_eps).transpose(1, 2)
        q = apply_rope_neox(q, cos[:T], sin[:T])
        k = apply_rope_neox(k, cos[:T], sin[:T])
        rep = a.n_head // a.n_head_kv
        k = k.repeat_interleave(rep, dim=1)
        v = v.transpose(1, 2).repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           scale=1.0 / math.sqrt(a.head_dim))
        return self.attn_output(o.transpose(1, 2).reshape(B, T, a.n_head * a.head_dim))

    def route(self, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n [N, D] → (probs [N, E], weights [N, K], experts [N, K])."""
        probs = torch.softmax(self.ffn_gate_inp(n).float(), dim=-1)
        w, idx = probs.topk(self.a.n_expert_used, dim=-1)
        return probs, w / w.sum(-1, keepdim=True), idx

    def moe(self, n: torch.Tensor, force: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n [N, D] normalised tokens → (output [N, D], probs [N, E], experts [N, K]).
        ``force`` [N, K]: use these experts instead of the top-K (to replay another
        implementation's routing); their weights are still this router's, renormalised."""
        K = self.a.n_expert_used
        probs, w, idx = self.route(n)
        if force is not None:
            idx = force.to(idx.device, torch.int64)
            w = probs.gather(1, idx)
            w = w / w.sum(-1, keepdim=True)
        # Sort the N*K assignments by expert so that each expert runs one dense matmul
        # over exactly the tokens routed to it.
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // K
        counts = torch.bincount(flat, minlength=self.a.n_expert).tolist()
        xs = n.index_select(0, tok)
        # unbind, not indexing: its backward is one stack, where W[e] would zero-fill a
        # full-size gradient for every expert; split, not slicing, likewise for xs.
        w_gu = self.ffn_gate_up_exps.unbind(0)
        w_down = self.ffn_down_exps.unbind(0)
        outs = []
        for e, xe in enumerate(xs.split(counts)):
            if xe.shape[0] == 0:
                continue
            g, u = (xe @ w_gu[e].t()).chunk(2, dim=-1)
            outs.append((F.silu(g) * u) @ w_down[e].t())
        out = torch.cat(outs) * w.reshape(-1)[order, None].to(n.dtype)  # [N*K, D]
        y = torch.zeros_like(n).index_add_(0, tok, out)
        return y, probs, idx

    def forward(self, x, cos, sin, force=None):
        a = self.a
        x = x + self.attention(rms_norm(x, self.attn_norm, a.norm_eps), cos, sin)
        B, T, D = x.shape
        n = rms_norm(x, self.ffn_norm, a.norm_eps).reshape(B * T, D)
        y, probs, idx = self.moe(n, force)
        return x + y.view(B, T, D), probs, idx


class MoELM(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        self.token_embd = nn.Embedding(a.n_vocab, a.n_embd)
        self.blk = nn.ModuleList(Block(a) for _ in range(a.n_layer))
        self.output_norm = nn.Parameter(torch.ones(a.n_embd))
        self.output = nn.Linear(a.n_embd, a.n_vocab, bias=False)
        cos, sin = rope_tables(a.n_ctx, a.head_dim, a.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._init()

    def _init(self):
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, std)
            if name.endswith(("attn_output.weight", "ffn_down_exps")):
                # GPT-2 style: residual writers scaled down with depth.
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.a.n_layer))
            elif name.endswith("ffn_gate_up_exps"):
                nn.init.normal_(p, 0.0, std)

    def forward(self, ids: torch.Tensor, *, keep_hidden: bool = False, force=None):
        """ids [B, T] → (logits [B, T, V], routing: list per layer of (probs [B*T, E],
        experts [B*T, K]), hidden: the residual stream entering each layer, if
        ``keep_hidden``). ``force``: per layer [B*T, K] experts to use (see ``Block.moe``)."""
        x = self.token_embd(ids)
        routing, hidden = [], []
        for li, blk in enumerate(self.blk):
            if keep_hidden:
                hidden.append(x)
            x, probs, idx = blk(x, self.cos, self.sin, None if force is None else force[li])
            routing.append((probs, idx))
        logits = self.output(rms_norm(x, self.output_norm, self.a.norm_eps))
        return logits, routing, hidden


def load_balance_loss(probs: torch.Tensor, idx: torch.Tensor, n_expert: int) -> torch.Tensor:
    """Switch / OLMoE auxiliary loss: E * sum_e f_e * P_e, where f_e is the share of the
    N*K assignments that went to expert e and P_e the mean router probability of e.
    Equals 1 when routing is uniform; gradients flow through P only."""
    N, K = idx.shape
    f = torch.bincount(idx.reshape(-1), minlength=n_expert).float() / (N * K)
    return n_expert * (f * probs.mean(0)).sum()

