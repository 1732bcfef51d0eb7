"""Transformer: the weights of a GGUF model and forward(tokens, pos) → logits.

One forward pass serves every architecture in efedge/archs/; each ArchSpec switches its
quirks on. Big matrices stay quantized in the mapped file and go through the numba
kernels; norms and biases are small and are dequantized to float32 once at load.
Routed experts come from an expert source (resident mapping or the expert cache) so
streaming never changes the arithmetic: each expert's output lands in its own
(token, k) slot and the slots are summed in a fixed order, whatever order experts
arrive in, so logits are bitwise identical for any cache budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from efedge import kernels, layers
from efedge.config import ModelConfig
from efedge.experts.store import ExpertStore, ExpertWeights
from efedge.gguf_file import GGUFFile
from efedge.kernels.activations import round_activations
from efedge.kv_cache import KVCache


@dataclass
class QMatrix:
    """A quantized matrix: uint8 view [rows, row_bytes] of the file and its ggml type."""

    raw: np.ndarray
    qtype: int
    name: str

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x [T, K] → [T, rows], activations rounded as llama.cpp rounds them."""
        return kernels.matmul(self.raw, self.qtype, round_activations(x, self.qtype))


def _qmatrix(gf: GGUFFile, name: str) -> QMatrix:
    ref = gf.tensor(name)
    kernels.check_qtype(ref.qtype, f"tensor {name!r}")
    return QMatrix(gf.raw(name), ref.qtype, name)


def _vector(gf: GGUFFile, name: str) -> np.ndarray:
    ref = gf.tensor(name)
    kernels.check_qtype(ref.qtype, f"tensor {name!r}")
    return kernels.dequantize(np.ascontiguousarray(gf.raw(name)), ref.qtype).reshape(-1)


class Block:
    """One transformer layer's weights; attribute names follow the GGUF tensor names."""

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, il: int):
        b, spec = f"blk.{il}.", cfg.spec
        self.attn_norm = _vector(gf, b + "attn_norm.weight")
        self.attn_q = _qmatrix(gf, b + "attn_q.weight")
        self.attn_k = _qmatrix(gf, b + "attn_k.weight")
        self.attn_v = _qmatrix(gf, b + "attn_v.weight")
        self.attn_output = _qmatrix(gf, b + "attn_output.weight")
        self.ffn_norm = _vector(gf, b + "ffn_norm.weight")
        self.bias = None
        if spec.attn_bias:
            self.bias = tuple(_vector(gf, b + f"attn_{p}.bias") for p in "qkv")
        self.q_norm = self.k_norm = None
        if spec.qk_norm != "none":
            self.q_norm = _vector(gf, b + "attn_q_norm.weight")
            self.k_norm = _vector(gf, b + "attn_k_norm.weight")
        if cfg.is_moe:
            self.ffn_gate_inp = _qmatrix(gf, b + "ffn_gate_inp.weight")
            for part in ("gate", "up", "down"):
                kernels.check_qtype(gf.tensor(b + f"ffn_{part}_exps.weight").qtype,
                                    f"tensor {b}ffn_{part}_exps.weight")
            if spec.shared_expert:
                self.ffn_gate_inp_shexp = _vector(gf, b + "ffn_gate_inp_shexp.weight")
                self.ffn_gate_shexp = _qmatrix(gf, b + "ffn_gate_shexp.weight")
                self.ffn_up_shexp = _qmatrix(gf, b + "ffn_up_shexp.weight")
                self.ffn_down_shexp = _qmatrix(gf, b + "ffn_down_shexp.weight")
        else:
            self.ffn_gate = _qmatrix(gf, b + "ffn_gate.weight")
            self.ffn_up = _qmatrix(gf, b + "ffn_up.weight")
            self.ffn_down = _qmatrix(gf, b + "ffn_down.weight")


def swiglu(x: np.ndarray, gate: QMatrix, up: QMatrix, down: QMatrix) -> np.ndarray:
    """down(silu(gate·x) * (up·x)) for a dense FFN or a shared expert."""
    return down(layers.silu(gate(x)) * up(x))


def expert_ffn(x: np.ndarray, w: ExpertWeights) -> np.ndarray:
    """One routed expert on the tokens sent to it: x [t, D] → [t, D]."""
    xg = round_activations(x, w.gate_qtype)
    xu = xg if w.up_qtype == w.gate_qtype else round_activations(x, w.up_qtype)
    g = kernels.matmul(w.gate, w.gate_qtype, xg)
    u = kernels.matmul(w.up, w.up_qtype, xu)
    a = round_activations(layers.silu(g) * u, w.down_qtype)
    return kernels.matmul(w.down, w.down_qtype, a)


class Transformer:
    """Weights + forward pass. Holds no KV cache and no expert cache of its own."""

    def __init__(self, gf: GGUFFile, cfg: ModelConfig):
        self.gf, self.cfg = gf, cfg
        self.token_embd = _qmatrix(gf, "token_embd.weight")
        self.output_norm = _vector(gf, "output_norm.weight")
        # llama.cpp ties the output head to the embedding when output.weight is absent
        name = "output.weight" if "output.weight" in gf.tensors else "token_embd.weight"
        self.output = _qmatrix(gf, name)
        self.blocks = [Block(gf, cfg, il) for il in range(cfg.n_layer)]
        self.store = ExpertStore(gf, cfg.n_layer, cfg.n_expert) if cfg.is_moe else None
        # Hook for the expert runtime: called with (layer, normalised hidden [T, D], ids)
        # before the layer's experts are requested, so a predictor can look ahead.
        self.on_route = None

    def new_kv_cache(self, n_ctx: int) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layer, n_ctx, c.n_head_kv, c.head_dim, c.v_head_dim)

    # -- pieces -------------------------------------------------------------------------
    def embed(self, tokens: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(self.token_embd.raw[tokens])
        return kernels.dequantize(rows, self.token_embd.qtype).astype(np.float32)

    def _attention(self, blk: Block, il: int, h: np.ndarray, pos: int, kv: KVCache,
                   rope: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        c = self.cfg
        t = h.shape[0]
        q, k, v = blk.attn_q(h), blk.attn_k(h), blk.attn_v(h)
        if blk.bias is not None:
            q, k, v = q + blk.bias[0], k + blk.bias[1], v + blk.bias[2]
        if c.spec.qk_norm == "full":
            q = layers.rms_norm(q, blk.q_norm, c.norm_eps)
            k = layers.rms_norm(k, blk.k_norm, c.norm_eps)
        q = q.reshape(t, c.n_head, c.head_dim)
        k = k.reshape(t, c.n_head_kv, c.head_dim)
        v = v.reshape(t, c.n_head_kv, c.v_head_dim)
        if c.spec.qk_norm == "head":
            q = layers.rms_norm(q, blk.q_norm, c.norm_eps)
            k = layers.rms_norm(k, blk.k_norm, c.norm_eps)
        q = layers.apply_rope(q, *rope, c.spec.rope_style)
        k = layers.apply_rope(k, *rope, c.spec.rope_style)
        kv.store(il, pos, k, v)
        keys, values = kv.view(il, pos + t)
        return blk.attn_output(layers.attention(q, keys, values, pos))

    def _moe(self, blk: Block, il: int, h: np.ndarray, experts) -> np.ndarray:
        # T tokens, E experts, K active, D width
        c = self.cfg
        t = h.shape[0]
        ids, w, _ = layers.route(blk.ffn_gate_inp(h), c.n_expert_used, c.spec.norm_topk)
        if self.on_route is not None:
            self.on_route(il, h, ids)
        slots = np.zeros((t, c.n_expert_used, c.n_embd), dtype=np.float32)  # [T, K, D]
        for e, ew in experts.acquire(il, np.unique(ids)):
            tok, kk = np.nonzero(ids == e)
            slots[tok, kk] = expert_ffn(np.ascontiguousarray(h[tok]), ew) * w[tok, kk, None]
        out = slots[:, 0].copy()
        for kk in range(1, c.n_expert_used):  # fixed summation order → bitwise stable
            out += slots[:, kk]
        if c.spec.shared_expert:
            shared = swiglu(h, blk.ffn_gate_shexp, blk.ffn_up_shexp, blk.ffn_down_shexp)
            scale = 1.0 / (1.0 + np.exp(-(h @ blk.ffn_gate_inp_shexp)))
            out += shared * scale[:, None].astype(np.float32)
        return out

    # -- forward ------------------------------------------------------------------------
    def forward(self, tokens, pos: int, kv: KVCache, experts=None,
                all_logits: bool = True) -> np.ndarray:
        """Run T tokens at positions pos..pos+T; returns logits [T, n_vocab] (or [1, V]
        for the last token only when all_logits is False). Advances kv.n_past."""
        c = self.cfg
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        t = tokens.shape[0]
        if t == 0:
            raise ValueError("forward needs at least one token")
        if tokens.min() < 0 or tokens.max() >= c.n_vocab:
            bad = int(tokens[(tokens < 0) | (tokens >= c.n_vocab)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{c.n_vocab - 1})")
        kv.check_room(pos, t)
        rope = layers.rope_tables(np.arange(pos, pos + t), c.rope_dim, c.rope_base)
        x = self.embed(tokens)
        for il, blk in enumerate(self.blocks):
            h = layers.rms_norm(x, blk.attn_norm, c.norm_eps)
            x = x + self._attention(blk, il, h, pos, kv, rope)
            h = layers.rms_norm(x, blk.ffn_norm, c.norm_eps)
            if c.is_moe:
                x = x + self._moe(blk, il, h, experts)
            else:
                x = x + swiglu(h, blk.ffn_gate, blk.ffn_up, blk.ffn_down)
        kv.n_past = pos + t
        if not all_logits:
            x = x[-1:]
        x = layers.rms_norm(x, self.output_norm, c.norm_eps)
        return self.output(np.ascontiguousarray(x, dtype=np.float32))
