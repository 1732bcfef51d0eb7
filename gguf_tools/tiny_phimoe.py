"""The random tiny phimoe (Phi-3.5-MoE) layout, as llama.cpp's phimoe loader reads it:
biases on every norm (attn_norm, ffn_norm, output_norm), on q / k / v (the converter
writes them: Phi-3.5-MoE's attention_bias), on attn_output and on the output head; 16
experts of ``feed_forward_length``, top 2; LongRoPE's per-pair divisors
``rope_factors_long`` / ``rope_factors_short`` with ``rope.scaling.attn_factor`` and
``rope.scaling.original_context_length`` as convert_hf_to_gguf writes them (no scaling
type, no factor). make_tiny calls these for ARCHS entries with plan "phimoe"; shapes in
ggml order."""

from __future__ import annotations

import math

import gguf

from gguf_tools.make_tiny import ROUTER_GAIN, TensorSpec
from gguf_tools.tiny_archs import biased_attention

# the original context: half the file's context_length (real: 4096 of 131072), 256 at the
# test preset, so llama.cpp takes the long factors above it (the tests' default n_ctx 512)
# and the short ones at or below it (it pads the context to a multiple of 256 first);
# attn_factor as the converter computes it from the two
PHI_ORIG_FRACTION = 2


def phimoe_attn_factor(n_ctx: int) -> float:
    """sqrt(1 + ln(scale) / ln(original context)), scale = context / original."""
    orig = n_ctx // PHI_ORIG_FRACTION
    return math.sqrt(1.0 + math.log(PHI_ORIG_FRACTION) / math.log(orig))


def phimoe_plan(cfg: dict, n_vocab: int, a: dict) -> list[TensorSpec]:
    T, d, hd = TensorSpec, cfg["n_embd"], cfg["head_dim"]
    q_out, kv_out = cfg["n_head"] * hd, cfg["n_head_kv"] * hd
    e, f = cfg["n_expert"], cfg["n_ff_exp"]
    out = [T("token_embd.weight", (d, n_vocab), "embd")]
    for i in range(cfg["n_layer"]):
        b = f"blk.{i}."
        out += [T(b + "attn_norm.weight", (d,), "norm", keep_f32=True),
                T(b + "attn_norm.bias", (d,), "bias", keep_f32=True),
                *biased_attention(b, d, q_out, kv_out),
                T(b + "ffn_norm.weight", (d,), "norm", keep_f32=True),
                T(b + "ffn_norm.bias", (d,), "bias", keep_f32=True),
                T(b + "ffn_gate_inp.weight", (d, e), "proj", scale=ROUTER_GAIN, keep_f32=True),
                T(b + "ffn_gate_exps.weight", (d, f, e), "proj"),
                T(b + "ffn_up_exps.weight", (d, f, e), "proj"),
                T(b + "ffn_down_exps.weight", (f, d, e), "proj")]
    return out + [T("output_norm.weight", (d,), "norm", keep_f32=True),
                  T("output_norm.bias", (d,), "bias", keep_f32=True),
                  T("output.weight", (d, n_vocab), "output", scale=2.0),
                  T("output.bias", (n_vocab,), "bias", keep_f32=True),
                  T("rope_factors_long.weight", (hd // 2,), "rope_freqs", keep_f32=True),
                  T("rope_factors_short.weight", (hd // 2,), "rope_short", keep_f32=True)]


def phimoe_metadata(w: gguf.GGUFWriter, cfg: dict, a: dict) -> None:
    w.add_head_count(cfg["n_head"])
    w.add_head_count_kv(cfg["n_head_kv"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_feed_forward_length(cfg["n_ff_exp"])  # llama.cpp sizes the experts by it
    w.add_expert_count(cfg["n_expert"])
    w.add_expert_used_count(cfg["n_expert_used"])
    w.add_rope_scaling_orig_ctx_len(cfg["n_ctx"] // PHI_ORIG_FRACTION)
    w.add_rope_scaling_attn_factors(phimoe_attn_factor(cfg["n_ctx"]))
