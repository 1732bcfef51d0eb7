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

* one token (decode): ``kernels.decode`` runs each half of a layer as one parallel
  region — attention + router, then the experts (all K at once when resident, one call
  per expert as the expert cache hands them out);
* T tokens (prefill): tiled products (``kernels.qmatmul`` → ``kernels.gemm``), all routed
  experts of a layer in one call (``kernels.moe``; the expert cache runs the same kernel
  per expert) and ``kernels.prefill`` for norms, rope and causal attention.
"""

from __future__ import annotations

import time

import numba
import numpy as np
from gguf import GGMLQuantizationType

from efedge import kernels, layers, rope
from efedge.config import ModelConfig, fused_qkv, qk_norm_of, qkv_widths
from efedge.experts.scheduler import cache_aware_reroute
from efedge.experts.store import ExpertStore, ResidentExperts
from efedge.ffn import (
    _ONE_ID,
    _expert,
    _ffn_sum,
    _none,
    _resident_moe,
    _StandInExperts,
    experts_token,
    stream_experts_token,
    swiglu,
)
from efedge.gguf_file import GGUFFile
from efedge.kernels import decode as dk
from efedge.kernels import prefill as pk
from efedge.kernels.nn import ACT_RELU, ACT_SILU
from efedge.kernels.prefill_oss import prefill_attend_sinks
from efedge.kv_cache import KVCache
from efedge.weights import _FFN, QMatrix, _qmatrix, _vector

_EMPTY = np.zeros(0, np.float32)
_EMPTY_RAW = np.zeros((0, 1), np.uint8)
_ONE_W = np.ones(1, np.float32)
_QK_MODE = {"none": dk.QK_NONE, "head": dk.QK_HEAD, "full": dk.QK_FULL,
            "head_post": dk.QK_HEAD_POST}


# token embeddings stored as floats: the dtype to view their raw rows as (BF16 is not here:
# numpy has no bfloat16)
_FLOAT_ROWS = {int(GGMLQuantizationType.F32): np.float32,
               int(GGMLQuantizationType.F16): np.float16}


def embedding_rows(rows: np.ndarray, qtype: int) -> np.ndarray:
    """Raw embedding rows uint8 [T, row_bytes] as float32 [T, n_embd]: kernels.dequantize's
    values. F32 and F16 rows convert exactly in numpy: a decode step starts here with the
    caches the previous token's output head left, and the generic dequantizer's dispatch
    and code, fetched cold, took ~55 µs per token (demo decode 1.05× paired without it)."""
    view = _FLOAT_ROWS.get(qtype)
    if view is not None:
        return rows.view(view).astype(np.float32)
    return kernels.dequantize(rows, qtype).astype(np.float32)


class Block:
    """One transformer layer's weights; attribute names follow the GGUF tensor names."""

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, il: int):
        b, spec = f"blk.{il}.", cfg.spec
        self.attn_norm = _vector(gf, b + "attn_norm.weight")
        self.ffn_norm = _vector(gf, b + spec.ffn_norm + ".weight")
        # attention the fused kernels do not cover (deepseek2's MLA, gpt-oss's sinks):
        # an object called as custom_attn(transformer, il, hn, pos, kv) → [T, D]
        self.custom_attn = None
        if spec.attention == "mla":
            from efedge.mla import MLAAttention

            self.custom_attn = MLAAttention(gf, cfg, il)
        elif spec.attention == "sinks":
            from efedge.oss import SinkAttention

            self.custom_attn = SinkAttention(gf, cfg, il)
        else:
            self._standard_attention(gf, cfg, il)
        self.moe = cfg.is_moe_layer(il)  # False for dense models and leading dense layers
        self.shared = None
        self.exp_bias = None  # gpt-oss: (gate [E, F], up [E, F], down [E, D]) biases
        self.router_bias = None
        if self.moe:
            self._moe_ffn(gf, cfg, b)
        else:
            self.ffn_gate = _qmatrix(gf, b + "ffn_gate.weight")
            self.ffn_up = _qmatrix(gf, b + "ffn_up.weight")
            self.ffn_down = _qmatrix(gf, b + "ffn_down.weight")
            m = (self.ffn_gate, self.ffn_up, self.ffn_down)
            self.dense = _FFN(*(x.raw for x in m), tuple(x.qtype for x in m))
            if cfg.is_moe:  # a leading dense layer: a router of zeros stands in for the
                # expert runtime's per-layer router lists; it is never asked to route
                z = np.zeros((cfg.n_expert, 4 * cfg.n_embd), np.uint8)
                self.ffn_gate_inp = QMatrix(z, int(GGMLQuantizationType.F32), "(dense layer)")
        if self.custom_attn is None:
            self._decode_args(cfg)

    def _standard_attention(self, gf: GGUFFile, cfg: ModelConfig, il: int) -> None:
        spec, b = cfg.spec, f"blk.{il}."
        self.bias = None
        if fused_qkv(gf, cfg, il):
            self._fused_qkv(gf, cfg, b)
        else:
            self.attn_q = _qmatrix(gf, b + "attn_q.weight")
            self.attn_k = _qmatrix(gf, b + "attn_k.weight")
            self.attn_v = _qmatrix(gf, b + "attn_v.weight")
        self.attn_output = _qmatrix(gf, b + "attn_output.weight")
        # llama.cpp adds each q / k / v bias a file has, whatever the arch (qwen2 requires
        # them); one that is absent adds zeros here
        names = [b + f"attn_{p}.bias" for p in "qkv"]
        if self.bias is None and (spec.attn_bias or any(n in gf.tensors for n in names)):
            rows = (self.attn_q, self.attn_k, self.attn_v)
            self.bias = tuple(_vector(gf, n) if n in gf.tensors or spec.attn_bias
                              else np.zeros(m.raw.shape[0], np.float32)
                              for n, m in zip(names, rows, strict=True))
        self.q_norm = self.k_norm = None
        self.qk_norm = qk_norm_of(gf, cfg, il)  # the spec's, or "none" where it is optional
        if self.qk_norm != "none":
            self.q_norm = _vector(gf, b + "attn_q_norm.weight")
            self.k_norm = _vector(gf, b + "attn_k_norm.weight")
        if cfg.kq_norm and not cfg.is_nope_layer(il):
            # llama4's rope layers: an unweighted RMS norm of each q / k head after rope;
            # rope rotates every pair of the head, so normed before rope it is the same
            self.qk_norm = "head"
            self.q_norm = self.k_norm = np.ones(cfg.head_dim, np.float32)

    def _fused_qkv(self, gf: GGUFFile, cfg: ModelConfig, b: str) -> None:
        """q, k and v as row ranges of one attn_qkv tensor (each output row is its own
        dot product, so a view of the rows computes what llama.cpp's fused product and
        its split views do)."""
        qkv = _qmatrix(gf, b + "attn_qkv.weight")
        ends = np.cumsum((0, *qkv_widths(cfg)))
        for p, r0, r1 in zip("qkv", ends[:-1], ends[1:], strict=True):
            setattr(self, "attn_" + p, QMatrix(qkv.raw[r0:r1], qkv.qtype, f"{qkv.name}[{p}]"))
        if b + "attn_qkv.bias" in gf.tensors:
            full = _vector(gf, b + "attn_qkv.bias")
            self.bias = tuple(full[r0:r1].copy() for r0, r1 in zip(ends[:-1], ends[1:],
                                                                   strict=True))

    def _moe_ffn(self, gf: GGUFFile, cfg: ModelConfig, b: str) -> None:
        spec = cfg.spec
        self.ffn_gate_inp = _qmatrix(gf, b + "ffn_gate_inp.weight")
        parts = [f"{b}ffn_{p}_exps.weight" for p in ("gate", "up", "down")]
        for name in parts:
            kernels.check_qtype(gf.tensor(name).qtype, f"tensor {name}")
        self.experts = _FFN(*(gf.raw(n) for n in parts),
                            tuple(gf.tensor(n).qtype for n in parts),
                            ACT_RELU if spec.expert_act == "relu" else ACT_SILU)
        if spec.expert_bias:  # small: resident beside the router, never cache traffic
            self.router_bias = _vector(gf, b + "ffn_gate_inp.bias")
            self.exp_bias = tuple(
                _vector(gf, f"{b}ffn_{p}_exps.bias").reshape(cfg.n_expert, -1)
                for p in ("gate", "up", "down"))
        self.exp_probs_b = None  # DeepSeek-V3's selection bias
        if b + "exp_probs_b.bias" in gf.tensors:
            self.exp_probs_b = _vector(gf, b + "exp_probs_b.bias")
        if cfg.has_shared:
            self.ffn_gate_inp_shexp = None  # ungated (granitemoe, deepseek2)
            if spec.shared_gate:
                self.ffn_gate_inp_shexp = _vector(gf, b + "ffn_gate_inp_shexp.weight")
            self.ffn_gate_shexp = _qmatrix(gf, b + "ffn_gate_shexp.weight")
            self.ffn_up_shexp = _qmatrix(gf, b + "ffn_up_shexp.weight")
            self.ffn_down_shexp = _qmatrix(gf, b + "ffn_down_shexp.weight")
            m = (self.ffn_gate_shexp, self.ffn_up_shexp, self.ffn_down_shexp)
            self.shared = _FFN(*(x.raw for x in m), tuple(x.qtype for x in m))

    def _decode_args(self, cfg: ModelConfig) -> None:
        """decode_attn's per-layer arguments, built once."""
        mats = [self.attn_q, self.attn_k, self.attn_v, self.attn_output]
        # the kernel routes by softmax top-k; other routings run after it (_decode)
        routes = self.moe and cfg.spec.routing == "softmax"
        if routes:
            mats.append(self.ffn_gate_inp)
        router = self.ffn_gate_inp.raw if routes else _EMPTY_RAW
        qt = np.array([m.qtype for m in mats] + [0] * (5 - len(mats)), np.int64)
        sc = np.array([m.scheme for m in mats] + [0] * (5 - len(mats)), np.int64)
        bq, bk, bv = self.bias if self.bias is not None else (_EMPTY, _EMPTY, _EMPTY)
        qn, kn = (self.q_norm, self.k_norm) if self.q_norm is not None else (_EMPTY, _EMPTY)
        self.decode_args = (self.attn_norm, self.ffn_norm, np.float32(cfg.norm_eps),
                            self.attn_q.raw, self.attn_k.raw, self.attn_v.raw,
                            self.attn_output.raw, router, qt, sc, bq, bk, bv, qn, kn,
                            _QK_MODE[self.qk_norm])


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
        # and with the token ids [T] before the first layer of every forward pass
        self.on_pass = None
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
        # llama-3 style per-pair frequency divisors (llama, granitemoe) or None
        self.rope_freqs = rope.freq_factors(gf, cfg, _vector)
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
        return time.perf_counter() - t0

    def new_kv_cache(self, n_ctx: int) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layer, n_ctx, c.n_head_kv, c.head_dim, c.v_head_dim)

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
        out = self.output(self._norm(np.ascontiguousarray(x), self.output_norm))
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
            tab = self._rope[swa] = layers.rope_tables(np.arange(n), c.rope_dim, base,
                                                       scaling, self.rope_freqs)
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
            return blk.attn_output(att)
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

    def _norm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        out = np.empty_like(x)
        pk.rms_norm_rows(x, w, np.float32(self.cfg.norm_eps), out)
        return out

    # -- one token: two parallel regions per layer ------------------------------------------
    def _decode(self, token: int, pos: int, kv: KVCache, experts) -> np.ndarray:
        c = self.cfg
        cos, sin = self._rope_rows(pos, 1)
        kc_all, vc_all = kv.k.view(np.uint16), kv.v.view(np.uint16)
        geom = (cos[0], sin[0], c.spec.rope_style == "neox", c.n_head, c.n_head_kv,
                c.head_dim, c.v_head_dim, np.float32(c.attn_scale),
                np.float32(c.residual_scale))
        rs = np.float32(c.residual_scale)
        k_used = c.n_expert_used if c.is_moe else 1
        x = self.embed(np.array([token]))[0]
        x2 = np.empty_like(x)
        h = np.empty_like(x)
        ids = np.zeros(k_used, np.int32)
        w = np.ones(k_used, np.float32)
        y = np.empty((k_used + 1, c.n_embd), np.float32)  # expert slots (+ shared expert)
        # every request to resident experts is a hit: count them as acquire() would,
        # without building K ExpertWeights views per layer
        resident = isinstance(experts, ResidentExperts)
        counters = experts.counters if resident else None
        nt = numba.get_num_threads()
        early = c.spec.router_input == "layer"
        per_layer = c.nope_step > 0 or c.sliding_window > 0  # smallthinker's layers differ
        for il, blk in enumerate(self.blocks):
            if early and blk.moe:  # smallthinker: routed on the layer's input
                r_ids, r_w = self.route_early(blk, il, x[None], experts)
                ids[:], w[:] = r_ids[0], r_w[0]
            if blk.custom_attn is not None:  # gpt-oss's sinks, deepseek2's MLA: routes too
                blk.custom_attn.decode(self, blk, il, x, pos, kv, x2, h, ids, w, nt)
            elif c.spec.irope:  # llama4: the layer's rope, chunk and temperature
                g, k0 = self._irope_geom(il, pos, geom)
                dk.decode_attn(x, *blk.decode_args, *g, kc_all[il][k0:], vc_all[il][k0:],
                               pos - k0, k_used, c.spec.norm_topk, x2, h, ids, w, nt)
            elif per_layer:
                self._decode_attn_layer(blk, il, x, pos, kv, geom, x2, h, ids, w, nt)
            else:
                dk.decode_attn(x, *blk.decode_args, *geom, kc_all[il], vc_all[il], pos,
                               k_used, c.spec.norm_topk, x2, h, ids, w, nt)
            if not blk.moe:  # a dense model, or a dense layer of a MoE one (glm4moe's
                # leading one, ernie4_5-moe's leading and interleaved ones)
                f = blk.dense
                dk.decode_ffn(h, _ONE_ID, _ONE_W, f.gate, f.up, f.down, f.qt, f.sc, y, nt)
                _ffn_sum(x2, y, 1, rs, x)
                continue
            if c.spec.routing != "softmax" and blk.custom_attn is None and not early:
                # decode_attn had no router: route here
                r_ids, r_w, _ = self._route(blk, h[None])
                ids[:], w[:] = r_ids[0], r_w[0]
            if self.routing_slack > 0 and not resident:
                _, _, probs = layers.route(blk.ffn_gate_inp(h[None]), k_used,
                                           c.spec.norm_topk)
                new, nw = cache_aware_reroute(experts, il, ids[None], w[None], probs,
                                              self.routing_slack, c.spec.norm_topk)
                ids, w = new[0].astype(np.int32), nw[0].astype(np.float32)
            if self.on_route is not None and not early:
                self.on_route(il, h[None], ids[None])
            n = k_used
            f = blk.experts  # quant types and schemes: the same for every expert
            if c.spec.weight_before_ffn:  # llama4: each expert on its own weighted input
                for kk in range(k_used):
                    experts_token(experts, il, h * w[kk], ids[kk:kk + 1], _ONE_W, f,
                                  y[kk:kk + 1], nt)
            elif blk.exp_bias is not None:  # gpt-oss
                experts_token(experts, il, h, ids, w, f, y, nt, blk.exp_bias)
            elif resident:  # all K in one call
                counters.expert_requests += k_used
                counters.hits += k_used
                dk.decode_ffn(h, ids, w, f.gate, f.up, f.down, f.qt, f.sc, y, nt, *f.act_args)
            else:
                # all K already in the cache: one call over the slot pool, as resident
                ready = getattr(experts, "ready_pool", _none)(il, ids)
                if ready is not None:
                    dk.decode_ffn(h, ready[0], w, *ready[1], f.qt, f.sc, y, nt, *f.act_args)
                else:
                    stream_experts_token(experts, il, h, ids, w, f, y, nt)
            if blk.shared is not None:
                f = blk.shared
                scale = np.ones(1, np.float32)  # ungated (granitemoe, deepseek2, glm4moe, …)
                if blk.ffn_gate_inp_shexp is not None:
                    scale = 1.0 / (1.0 + np.exp(-(h[None] @ blk.ffn_gate_inp_shexp)))
                dk.decode_ffn(h, _ONE_ID, scale.astype(np.float32), f.gate, f.up, f.down,
                              f.qt, f.sc, y[n:n + 1], nt)
                n += 1
            _ffn_sum(x2, y, n, rs, x)
        kv.n_past = pos + 1
        return self._logits(x[None])

    def _irope_geom(self, il: int, pos: int, geom: tuple) -> tuple[tuple, int]:
        """decode_attn's geometry for llama4's layer il at pos, and the first key the
        query sees (the kernel is given the cache from there, positions counted from it:
        rope comes from the cos / sin rows, not from the position)."""
        ((_, _, k0, temp),) = self._attention_runs(il, pos, 1)
        cos, sin = self._rope_rows(pos, 1, il)
        c = self.cfg
        return (cos[0], sin[0], *geom[2:7], np.float32(c.attn_scale * temp), geom[8]), k0

    def _decode_attn_layer(self, blk: Block, il: int, x, pos: int, kv: KVCache, geom, x2, h,
                           ids, w, nt) -> None:
        """decode_attn for a layer with its own rope (NoPE: cos 1, sin 0) or a window
        (smallthinker): the window's keys are the KV cache's rows pos + 1 − window .. pos,
        given to the kernel as a view that starts there (row pos − k0 of the view is row
        pos, where the kernel stores the new key)."""
        c = self.cfg
        cos, sin = self._rope_rows(pos, 1, il)
        window = c.window_of(il)
        k0 = max(0, pos + 1 - window) if window else 0
        kc, vc = kv.k.view(np.uint16)[il][k0:], kv.v.view(np.uint16)[il][k0:]
        dk.decode_attn(x, *blk.decode_args, cos[0], sin[0], *geom[2:], kc, vc, pos - k0,
                       ids.shape[0], c.spec.norm_topk, x2, h, ids, w, nt)

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
        if self.on_pass is not None:
            self.on_pass(tokens)
        if t == 1 and c.spec.fused_decode:
            return self._decode(int(tokens[0]), pos, kv, experts)
        x = self.embed(tokens)
        rs = np.float32(c.residual_scale)  # granite; 1 elsewhere
        early = c.spec.router_input == "layer"
        for il, blk in enumerate(self.blocks):
            routed = self.route_early(blk, il, x, experts) if early and blk.moe else None
            a = self._attention(blk, il, self._norm(x, blk.attn_norm), pos, kv)
            x = x + (a * rs if rs != 1 else a)
            h = self._norm(x, blk.ffn_norm)
            if blk.moe:
                f = self._moe(blk, il, h, experts, routed)
            else:
                f = swiglu(h, blk.ffn_gate, blk.ffn_up, blk.ffn_down)
            x = x + (f * rs if rs != 1 else f)
        kv.n_past = pos + t
        if not all_logits:
            x = x[-1:]
        return self._logits(x)
