"""The one-token forward pass (decode): two parallel regions per layer, attention + router
then the experts, for efedge.model.Transformer (a mixin: its cfg, blocks, _rope_rows,
_route, _logits and the rest come from there)."""

from __future__ import annotations

import numba
import numpy as np

from efedge import layers
from efedge.experts.scheduler import cache_aware_reroute
from efedge.experts.store import ResidentExperts
from efedge.ffn import (
    _ONE_ID,
    _ffn_sum,
    _none,
    experts_token,
    stream_experts_token,
)
from efedge.kernels import decode as dk
from efedge.kv_cache import KVCache
from efedge.model_block import Block

_ONE_W = np.ones(1, np.float32)


class DecodeMixin:
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
        on_input = None if early else self.on_layer_input
        input_all = self.layer_input_all
        for il, blk in enumerate(self.blocks):
            if on_input is not None and blk.moe and (input_all or il == 0):
                on_input(il, self._norm(x[None], blk.ffn_norm, blk.ffn_norm_b))
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
