"""Transformer: the weights of a GGUF model and forward(tokens, pos) → logits.

One forward pass serves every architecture in efedge/archs/; each ArchSpec switches its
quirks on. Big matrices stay quantized in the mapped file and go through the numba
kernels; norms and biases are small and are dequantized to float32 once at load.
Routed experts come from an expert source (resident mapping or the expert cache) so
streaming never changes the arithmetic: each expert's output lands in its own
(token, k) slot and the slots are summed in a fixed order, whatever order experts
arrive in, so logits are bitwise identical for any cache budget.

Two paths, the same rounding (products as llama.cpp computes them: activations rounded
to 8 bits, integer dots where the weight type has a kernel; the paths sum in different
orders, so they agree to float rounding):

* one token (decode, efedge/model_decode.py): ``kernels.decode`` runs each half of a
  layer as one parallel region — attention + router, then the experts (all K at once
  when resident, one call per expert as the expert cache hands them out);
* T tokens (prefill): tiled products (``kernels.qmatmul`` → ``kernels.gemm``), all routed
  experts of a layer in one call (``kernels.moe``; the expert cache runs the same kernel
  per expert) and ``kernels.prefill`` for norms, rope and causal attention.
"""

from __future__ import annotations

import time

import numba
import numpy as np

from efedge import kernels, layers, rope
from efedge.config import ModelConfig
from efedge.experts.scheduler import cache_aware_reroute
from efedge.experts.store import ExpertStore
from efedge.ffn import (
    _ONE_ID,
    _expert,
    _resident_moe,
    _StandInExperts,
    swiglu,
)
from efedge.gguf_file import GGUFFile
from efedge.kernels import decode as dk
from efedge.kernels import prefill as pk
from efedge.kernels.prefill_oss import prefill_attend_sinks
from efedge.kv_cache import KVCache
from efedge.model_block import Block, embedding_rows  # noqa: F401 (re-exported)
from efedge.model_decode import DecodeMixin
from efedge.weights import _FFN, _qmatrix, _vector


def new_kv_cache(cfg, n_ctx: int) -> KVCache:
    """The CPU path's KV cache for a model of this config (before its weights are read:
    efedge.load sizes the expert cache with it)."""
    return KVCache(cfg.n_layer, n_ctx, cfg.n_head_kv, cfg.head_dim, cfg.v_head_dim)


class Transformer(DecodeMixin):
    """Weights + forward pass. Holds no KV cache and no expert cache of its own."""

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, n_ctx: int | None = None):
        self.gf, self.cfg = gf, cfg
        self.token_embd = _qmatrix(gf, "token_embd.weight")
        self.output_norm = _vector(gf, "output_norm.weight")
        # phimoe: the final norm's and the head's biases (None elsewhere)
        self.output_norm_b = (_vector(gf, "output_norm.bias") if cfg.spec.norm_bias
                              else None)
        self.output_b = _vector(gf, "output.bias") if cfg.spec.out_bias else None
        # llama.cpp ties the output head to the embedding when output.weight is absent
        name = "output.weight" if "output.weight" in gf.tensors else "token_embd.weight"
        self.output = _qmatrix(gf, name)
        self.blocks = [Block(gf, cfg, il) for il in range(cfg.n_layer)]
        self.store = ExpertStore(gf, cfg.n_layer, cfg.n_expert) if cfg.is_moe else None
        # Hook for the expert runtime: called with (layer, normalised hidden [T, D], ids)
        # before the layer's experts are requested, so a predictor can look ahead.
        self.on_route = None
        # and with the token ids [T] before the first layer of every forward pass
        self.on_pass = None
        # and with (layer, its input normalised as its router's input is [T, D]) before
        # each MoE layer's attention, where the router reads the attention's output: the
        # router on it names the layer's experts earlier than routing does
        self.on_layer_input = None
        # False: only layer 0's input, and only in one-token passes (a policy that wants
        # no more: expertflow's pass start, first_input); True: every MoE layer's
        self.layer_input_all = True
        # Cache-aware routing (opt-in, changes outputs): a selected expert that is not
        # resident is swapped for a resident one whose router probability is within this
        # much of it. 0 = exact routing, identical to llama.cpp.
        self.routing_slack = 0.0
        # a router that reads the layer's input (smallthinker) asks the expert cache for
        # its experts before the layer's attention (route_early); False: when the layer
        # asks for them, as every other arch (for comparing the two: same bits)
        self.early_requests = True
        # cos / sin by position, per rope (gpt-oss's sliding-window layers may differ)
        self._rope: dict[bool | str, tuple[np.ndarray, np.ndarray]] = {}
        # llama-3 style per-pair frequency divisors (llama, granitemoe), LongRoPE's long or
        # short ones by the context (phimoe; n_ctx None: efedge.load's default), or None
        ctx = min(cfg.n_ctx_train, 4096) if n_ctx is None else n_ctx
        self.rope_freqs = rope.freq_factors(gf, cfg, _vector, ctx)
        self.warmup_s = self.warmup()

    def warmup(self) -> float:
        """Bring every kernel the forward pass uses up now (numba compiles it on a first
        run, later loads it from its cache), so that the first token does not pay for
        it: a 3-token prefill (the tiled products) and one decode step on a scratch KV
        cache. Experts are zero-filled stand-ins of the right shapes and types: reading
        the real ones would pull expert pages into memory that an expert cache budget
        must bound. Returns the seconds it took."""
        t0 = time.perf_counter()
        kv = self.new_kv_cache(4)
        experts = _StandInExperts(self.store) if self.store is not None else None
        on_route, self.on_route = self.on_route, None
        on_pass, self.on_pass = self.on_pass, None
        on_input, self.on_layer_input = self.on_layer_input, None
        try:
            self.forward([0, 0, 0], 0, kv, experts, all_logits=False)
            self.forward([0], 3, kv, experts)
            if self.store is not None:  # the all-experts decode kernel (resident experts)
                il = self.store.moe_layers[0]
                d = self.cfg.n_embd
                y, nt = np.empty((1, d), np.float32), numba.get_num_threads()
                f = _FFN(*experts.parts(il), self.store.qtypes(il),
                         self.blocks[il].experts.act)
                dk.decode_ffn(np.zeros(d, np.float32), _ONE_ID, np.ones(1, np.float32),
                              f.gate, f.up, f.down, f.qt, f.sc, y, nt, *f.act_args)
                bias = self.blocks[il].exp_bias
                if bias is not None:  # gpt-oss's
                    dk.decode_ffn_oai(np.zeros(d, np.float32), _ONE_ID, _ONE_ID,
                                      np.ones(1, np.float32), f.gate, f.up, f.down, f.qt, f.sc,
                                      *bias, y, nt)
        finally:
            self.on_route, self.on_pass = on_route, on_pass
            self.on_layer_input = on_input
        return time.perf_counter() - t0

    def new_kv_cache(self, n_ctx: int) -> KVCache:
        return new_kv_cache(self.cfg, n_ctx)

    # -- pieces -------------------------------------------------------------------------
    def embed(self, tokens: np.ndarray) -> np.ndarray:
        x = embedding_rows(np.ascontiguousarray(self.token_embd.raw[tokens]),
                           int(self.token_embd.qtype))
        if self.cfg.embd_scale != 1.0:  # granite
            x *= np.float32(self.cfg.embd_scale)
        return x

    def _logits(self, x: np.ndarray) -> np.ndarray:
        """The output head on the last hidden states x [T, D] (granite divides by
        logit_scale)."""
        out = self.output(self._norm(np.ascontiguousarray(x), self.output_norm,
                                     self.output_norm_b))
        if self.output_b is not None:  # phimoe
            out += self.output_b
        if self.cfg.logit_scale != 1.0:
            out *= np.float32(1.0 / self.cfg.logit_scale)
        return out

    def _rope_rows(self, pos: int, t: int, il: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """cos / sin [t, rope_dim/2] of positions pos..pos+t for layer il (rope scaling
        folded in), from a table grown in powers of two (the same values as
        layers.rope_tables)."""
        c = self.cfg
        if c.is_nope_layer(il):  # llama4's and smallthinker's NoPE layers: cos 1, sin 0
            z = np.zeros((t, c.rope_dim // 2), np.float32)
            return z + np.float32(1.0), z
        swa = c.rope_swa is not None and c.is_swa_layer(il)
        tab = self._rope.get(swa)
        if tab is None or tab[0].shape[0] < pos + t:
            n = 1 << max(8, (pos + t - 1).bit_length())
            base, scaling = c.rope_of(il)
            still = (rope.imrope_fourth_pairs(c.rope_sections, c.rope_dim // 2)
                     if c.rope_sections else None)  # qwen3vl*: a text token's 4th position
            tab = self._rope[swa] = layers.rope_tables(np.arange(n), c.rope_dim, base,
                                                       scaling, self.rope_freqs, still)
        return tab[0][pos:pos + t], tab[1][pos:pos + t]

    def _attention(self, blk: Block, il: int, h: np.ndarray, pos: int, kv: KVCache) -> np.ndarray:
        if blk.custom_attn is not None:  # deepseek2 MLA, gpt-oss sinks
            return blk.custom_attn(self, il, h, pos, kv)
        c = self.cfg
        t = h.shape[0]
        acts: dict = {}
        q, k, v = blk.attn_q(h, acts), blk.attn_k(h, acts), blk.attn_v(h, acts)
        if blk.bias is not None:
            q, k, v = q + blk.bias[0], k + blk.bias[1], v + blk.bias[2]
        cos, sin = self._rope_rows(pos, t, il)
        _, _, eps, *_, qn, kn, qk_mode = blk.decode_args
        qh = np.empty((t, c.n_head, c.head_dim), np.float32)
        kc, vc = kv.k.view(np.uint16)[il], kv.v.view(np.uint16)[il]
        pk.prefill_qk(q, k, v, qn, kn, qk_mode, eps, cos, sin, c.spec.rope_style == "neox",
                      c.n_head, c.n_head_kv, c.head_dim, c.v_head_dim, kc, vc, pos, qh)
        window = c.window_of(il)
        if window and pos + t > window:  # smallthinker's window: a sink that takes nothing
            no_sink = np.full(c.n_head, -np.inf, np.float32)
            att = prefill_attend_sinks(qh, kc, vc, pos, no_sink, np.float32(c.attn_scale),
                                       window)
            return self._attn_out(blk, att, h)
        runs = self._attention_runs(il, pos, t)
        if c.v_head_dim % 32 == 0:
            att = np.empty((t, c.n_head * c.v_head_dim), np.float32)
            for a, b, k0, temp in runs:  # (one run but in llama4's chunked / NoPE layers)
                kernels.dynamic(pk.prefill_attend, qh[a:b], kc[k0:], vc[k0:], pos + a - k0,
                                c.n_head_kv, c.v_head_dim, np.float32(c.attn_scale * temp),
                                att[a:b])
        else:  # value heads the vector kernels do not cover: the numpy reference
            keys, values = kv.view(il, pos + t)
            att = np.concatenate([
                layers.attention(qh[a:b], keys[k0:pos + b], values[k0:pos + b], pos + a - k0,
                                 scale=c.attn_scale * temp) for a, b, k0, temp in runs])
        return self._attn_out(blk, att, h)

    @staticmethod
    def _attn_out(blk: Block, att: np.ndarray, h: np.ndarray) -> np.ndarray:
        """attn_output of the heads' output att [T, H·dv]; afmoe first multiplies it by
        sigmoid(attn_gate · h), h the attention's normalised input."""
        if blk.attn_gate is not None:
            g = blk.attn_gate(h)
            with np.errstate(over="ignore"):  # (a very negative gate: exp → inf, gate 0)
                att = att * (np.float32(1.0) / (np.float32(1.0) + np.exp(-g)))
        return blk.attn_output(att)

    def _attention_runs(self, il: int, pos: int, t: int) -> list[tuple[int, int, int, float]]:
        """Runs of queries (rows a..b, first key, score temperature) of layer il: one
        run of all t from key 0 but in llama4's chunked and NoPE layers. The temperature
        multiplies the score scale, as scaling the query does (llama.cpp)."""
        c = self.cfg
        if not c.spec.irope:
            return [(0, t, 0, 1.0)]
        chunk = c.sliding_window if c.swa_chunked and c.is_swa_layer(il) else 0
        return layers.attention_runs(pos, t, chunk, c.attn_temp, c.is_nope_layer(il))

    def _moe(self, blk: Block, il: int, h: np.ndarray, experts,
             routed: tuple | None = None) -> np.ndarray:
        # T tokens, E experts, K active, D width. routed: (ids, w) of a router that ran
        # before attention (route_early), else the router runs on h here
        c = self.cfg
        t = h.shape[0]
        if routed is not None:
            ids, w = routed
        else:
            ids, w, probs = self._route(blk, h)
            if self.routing_slack > 0 and c.spec.routing == "softmax":
                ids, w = cache_aware_reroute(experts, il, ids, w, probs, self.routing_slack,
                                             c.spec.norm_topk)
            if self.on_route is not None:  # the experts this layer will really use
                self.on_route(il, h, ids)
        slots = np.zeros((t, c.n_expert_used, c.n_embd), dtype=np.float32)  # [T, K, D]
        before = c.spec.weight_before_ffn  # llama4: the weight scales the expert's input
        if not _resident_moe(blk, h, ids, w, experts, slots, before):
            for e, ew in experts.acquire(il, np.unique(ids)):
                tok, kk = np.nonzero(ids == e)
                if before:
                    xe = np.ascontiguousarray(h[tok] * w[tok, kk, None])
                    slots[tok, kk] = _expert(blk, e, xe, ew)
                else:
                    slots[tok, kk] = (_expert(blk, e, np.ascontiguousarray(h[tok]), ew)
                                      * w[tok, kk, None])
        out = slots[:, 0].copy()
        for kk in range(1, c.n_expert_used):  # fixed summation order → bitwise stable
            out += slots[:, kk]
        if blk.shared is not None:
            shared = swiglu(h, blk.ffn_gate_shexp, blk.ffn_up_shexp, blk.ffn_down_shexp)
            if blk.ffn_gate_inp_shexp is None:  # ungated
                out += shared
            else:
                scale = 1.0 / (1.0 + np.exp(-pk.row_dots(h, blk.ffn_gate_inp_shexp)))
                out += shared * scale[:, None].astype(np.float32)
        return out

    def route_early(self, blk: Block, il: int, x: np.ndarray, experts) -> tuple[np.ndarray, ...]:
        """(ids, weights) of a layer whose router reads the layer's input x [T, D]
        (smallthinker), before its attention runs: the expert cache is asked for the
        experts at once (early_requests), so their loads overlap the attention, and
        on_route hears of them then."""
        ids, w, _ = self._route(blk, x)
        request = getattr(experts, "prefetch", None) if self.early_requests else None
        if request is not None:
            request(il, np.unique(ids))
        if self.on_route is not None:
            self.on_route(il, x, ids)
        return ids, w

    def _route(self, blk: Block, h: np.ndarray) -> tuple[np.ndarray, ...]:
        """(ids [T, K], weights [T, K], probs [T, E]) of a MoE layer's router."""
        return self.route_logits(blk, blk.ffn_gate_inp(h))

    def route_logits(self, blk: Block, logits: np.ndarray) -> tuple[np.ndarray, ...]:
        """(ids, weights, probs) from a MoE layer's router logits [T, E] by the
        architecture's rule (the torch path routes its device logits here too)."""
        c = self.cfg
        if c.spec.routing == "softmax":
            return layers.route(logits, c.n_expert_used, c.spec.norm_topk)
        if blk.router_bias is not None:
            logits = logits + blk.router_bias
        return layers.route_ext(logits, c.n_expert_used, c.gating, blk.exp_probs_b,
                                c.n_expert_groups, c.n_group_used, c.expert_weights_norm,
                                c.expert_weights_scale)

    def _norm(self, x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
        """RMS norm of each row times w, plus b where the norm has a bias (phimoe)."""
        out = np.empty_like(x)
        pk.rms_norm_rows(x, w, np.float32(self.cfg.norm_eps), out)
        if b is not None:
            out += b
        return out

    # -- forward ------------------------------------------------------------------------
    def forward(self, tokens, pos: int, kv: KVCache, experts=None,
                all_logits: bool = True) -> np.ndarray:
        """Run T tokens at positions pos..pos+T; returns logits [T, n_vocab] (or [1, V]
        for the last token only when all_logits is False). Advances kv.n_past."""
        c = self.cfg
        tokens = c.token_ids(tokens)
        t = tokens.shape[0]
        kv.check_room(pos, t)
        if self.on_pass is not None:
            self.on_pass(tokens, pos)
        if t == 1 and c.spec.fused_decode:
            return self._decode(int(tokens[0]), pos, kv, experts)
        x = self.embed(tokens)
        rs = np.float32(c.residual_scale)  # granite; 1 elsewhere
        early = c.spec.router_input == "layer"
        for il, blk in enumerate(self.blocks):
            routed = self.route_early(blk, il, x, experts) if early and blk.moe else None
            if self.on_layer_input is not None and blk.moe and not early and \
                    (self.layer_input_all or (il == 0 and t == 1)):
                self.on_layer_input(il, self._norm(x, blk.ffn_norm, blk.ffn_norm_b))
            a = self._attention(blk, il, self._norm(x, blk.attn_norm, blk.attn_norm_b), pos,
                                kv)
            if blk.attn_output_b is not None:  # phimoe
                a += blk.attn_output_b
            if blk.attn_post_norm is not None:  # afmoe
                a = self._norm(a, blk.attn_post_norm)
            x = x + (a * rs if rs != 1 else a)
            h = self._norm(x, blk.ffn_norm, blk.ffn_norm_b)
            if blk.moe:
                f = self._moe(blk, il, h, experts, routed)
            else:
                f = swiglu(h, blk.ffn_gate, blk.ffn_up, blk.ffn_down)
            if blk.ffn_post_norm is not None:  # afmoe
                f = self._norm(f, blk.ffn_post_norm)
            x = x + (f * rs if rs != 1 else f)
        kv.n_past = pos + t
        if not all_logits:
            x = x[-1:]
        return self._logits(x)
