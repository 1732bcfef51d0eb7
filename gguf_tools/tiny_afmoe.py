"""The random tiny afmoe (Arcee Trinity) and deepseek (DeepSeek-MoE-16B) layouts, as
llama.cpp's loaders read them. make_tiny calls these for ARCHS entries with plan "afmoe" /
"deepseek" (tiny_archs re-exports them); shapes in ggml order.

afmoe at test size: 4 blocks, the first dense (leading_dense_block_count 1, as Trinity
Mini's first two), then MoE blocks of sigmoid routing with the ``exp_probs_b`` selection bias,
the k weights renormalised and scaled by 2.826 (Trinity's route_scale), one ungated shared
expert of the routed width; an attention gate ``attn_gate`` (sigmoid, per output element,
before attn_output), a per-head q / k RMS norm, four RMS norms per block (attn_norm,
post_attention_norm, ffn_norm, post_ffw_norm); a sliding window of AFMOE_SWA[0] positions on
the first three blocks of every four (the fourth attends everything, without rope) with its
own rope base. The embeddings are drawn at std 1/√n_embd, the scale at which llama.cpp's
fixed √n_embd multiplier (Trinity's muP) gives the residual stream unit RMS.

deepseek at test size: 3 blocks, the first dense, then MoE blocks routed by softmax top-k
(weights not renormalised), beside DS1_SHARED shared experts of the routed width (ungated,
one FFN of expert_shared_count × expert_feed_forward_length), normal (GPT-J) rope.
``expert_weights_scale`` is written as 2 here: llama.cpp requires the key for deepseek but
its graph never applies it.
"""

from __future__ import annotations

import gguf

from gguf_tools.make_tiny import QK_GAIN, TensorSpec

# afmoe: window, window pattern, rope base of the window layers (real Trinity Mini: 2048,
# 4, the global base), dense lead, shared experts, route_scale
AFMOE_SWA = (8, 4, 5000.0)
AFMOE_DIMS = dict(dense_lead=1, n_shared=1, weights_scale=2.826)
# deepseek: DeepSeek-MoE-16B has 1 dense layer, 2 shared experts, routed_scaling_factor 1
DS1_DIMS = dict(dense_lead=1, n_shared=2, weights_scale=2.0)


def _head(cfg: dict, n_vocab: int) -> list[TensorSpec]:
    from gguf_tools.tiny_archs import _head  # (tiny_archs re-exports this module)

    return _head(cfg, n_vocab)


def _ffn(b: str, cfg: dict, moe: bool, n_shared: int, sel_bias: bool) -> list[TensorSpec]:
    """A dense FFN, or router (+ selection bias), routed experts and shared experts."""
    T, d = TensorSpec, cfg["n_embd"]
    if not moe:
        f = cfg["n_ff"]
        return [T(b + "ffn_gate.weight", (d, f), "proj"), T(b + "ffn_up.weight", (d, f), "proj"),
                T(b + "ffn_down.weight", (f, d), "proj")]
    from gguf_tools.tiny_archs import _shared_moe_ffn  # (tiny_archs re-exports this module)

    f = cfg["n_ff_exp"]
    return _shared_moe_ffn(b, d, cfg["n_expert"], f, f * n_shared, sel_bias)


def _qkv(b: str, cfg: dict) -> list[TensorSpec]:
    T, d, hd = TensorSpec, cfg["n_embd"], cfg["head_dim"]
    q_out, kv_out = cfg["n_head"] * hd, cfg["n_head_kv"] * hd
    return [T(b + "attn_q.weight", (d, q_out), "proj", scale=QK_GAIN),
            T(b + "attn_k.weight", (d, kv_out), "proj", scale=QK_GAIN),
            T(b + "attn_v.weight", (d, kv_out), "proj")]


def afmoe_plan(cfg: dict, n_vocab: int, a: dict) -> list[TensorSpec]:
    T, x = TensorSpec, AFMOE_DIMS
    d, hd = cfg["n_embd"], cfg["head_dim"]
    q_out = cfg["n_head"] * hd
    # std 1/√d: times llama.cpp's √d the rows have unit RMS (see the module docstring)
    out = [T("token_embd.weight", (d, n_vocab), "proj")]
    for i in range(cfg["n_layer"]):
        b = f"blk.{i}."
        out += [T(b + "attn_norm.weight", (d,), "norm", keep_f32=True),
                *_qkv(b, cfg),
                T(b + "attn_q_norm.weight", (hd,), "norm", QK_GAIN, keep_f32=True),
                T(b + "attn_k_norm.weight", (hd,), "norm", QK_GAIN, keep_f32=True),
                # gate pre-activations of std ≈ 2: sigmoid spreads over (0.1, 0.9)
                T(b + "attn_gate.weight", (d, q_out), "proj", scale=2.0),
                T(b + "attn_output.weight", (q_out, d), "proj"),
                T(b + "post_attention_norm.weight", (d,), "norm", keep_f32=True),
                T(b + "ffn_norm.weight", (d,), "norm", keep_f32=True),
                *_ffn(b, cfg, i >= x["dense_lead"], x["n_shared"], sel_bias=True),
                T(b + "post_ffw_norm.weight", (d,), "norm", keep_f32=True)]
    return out + _head(cfg, n_vocab)


def afmoe_metadata(w: gguf.GGUFWriter, cfg: dict, a: dict) -> None:
    x, hd = AFMOE_DIMS, cfg["head_dim"]
    w.add_head_count(cfg["n_head"])
    w.add_head_count_kv(cfg["n_head_kv"])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_feed_forward_length(cfg["n_ff"])  # the dense leading block
    w.add_expert_feed_forward_length(cfg["n_ff_exp"])
    w.add_expert_count(cfg["n_expert"])
    w.add_expert_used_count(cfg["n_expert_used"])
    w.add_leading_dense_block_count(x["dense_lead"])
    w.add_expert_shared_count(x["n_shared"])
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_norm(True)
    w.add_expert_weights_scale(x["weights_scale"])
    if a.get("swa", True):
        window, pattern, base_swa = AFMOE_SWA
        w.add_sliding_window(window)
        w.add_sliding_window_pattern(pattern)
        w.add_rope_freq_base_swa(base_swa)


def deepseek_plan(cfg: dict, n_vocab: int, a: dict) -> list[TensorSpec]:
    T, x, d = TensorSpec, DS1_DIMS, cfg["n_embd"]
    out = [T("token_embd.weight", (d, n_vocab), "embd")]
    for i in range(cfg["n_layer"]):
        b = f"blk.{i}."
        out += [T(b + "attn_norm.weight", (d,), "norm", keep_f32=True),
                *_qkv(b, cfg),
                T(b + "attn_output.weight", (cfg["n_head"] * cfg["head_dim"], d), "proj"),
                T(b + "ffn_norm.weight", (d,), "norm", keep_f32=True),
                *_ffn(b, cfg, i >= x["dense_lead"], x["n_shared"], sel_bias=False)]
    return out + _head(cfg, n_vocab)


def deepseek_metadata(w: gguf.GGUFWriter, cfg: dict, a: dict) -> None:
    x = DS1_DIMS
    w.add_head_count(cfg["n_head"])
    w.add_head_count_kv(cfg["n_head_kv"])
    w.add_rope_dimension_count(cfg["head_dim"])  # llama.cpp asserts n_rot == head size
    w.add_feed_forward_length(cfg["n_ff"])
    w.add_expert_feed_forward_length(cfg["n_ff_exp"])
    w.add_expert_count(cfg["n_expert"])
    w.add_expert_used_count(cfg["n_expert_used"])
    w.add_leading_dense_block_count(x["dense_lead"])
    w.add_expert_shared_count(x["n_shared"])
    w.add_expert_weights_scale(x["weights_scale"])
