"""Tensor plans and metadata of the random tiny models whose layout is not Llama-shaped:
deepseek2 (multi-head latent attention, dense leading layers, shared experts), gpt-oss
(attention biases and sinks, sliding-window layers, expert biases), glm4moe (attention
biases, partial rope, post-attention norm, sigmoid routing with a selection bias, shared
expert, trailing MTP layers), ernie4_5-moe (dense leading and interleaved layers,
selection bias, ungated shared expert), dots1 (dense leading layer, qk norm, sigmoid
routing with a selection bias, shared experts), hunyuan-moe (qk norm after rope,
ungated shared expert of its own width) and minimax-m2 (q / k norm over the whole
projection, partial rope, sigmoid routing with a selection bias, no shared expert).
make_tiny calls these for the architectures whose ``ARCHS`` entry has ``plan`` set; names,
keys and shapes are the ones llama.cpp reads (shapes in ggml order, as in make_tiny).
"""

from __future__ import annotations

import gguf

from gguf_tools.make_tiny import QK_GAIN, ROUTER_GAIN, TensorSpec

# deepseek2 test sizes (the "test" preset's width, heads and experts; these are the MLA
# ranks and per-head sizes). kv_lora is a multiple of 32 (value heads of the vector
# attention kernels); real DeepSeek-V2-Lite: kv_lora 512, nope 128, rope 64, v 128.
DS_DIMS = dict(q_lora=128, kv_lora=64, nope=64, rope=32, v=64, dense_lead=1, n_shared=1,
               weights_scale=2.0, n_group=4, group_used=2)
# gpt-oss: sliding window of the even layers (real: 128) and the SwiGLU limits llama.cpp
# hard-codes (alpha 1.702, limit 7)
OSS_WINDOW = 8
# glm4moe: GLM-4.5's layout at test size. Real GLM-4.5-Air: 1 dense layer, 1 shared expert,
# routed_scaling_factor 1 (GLM-4.5: 2.5), weights renormalised, half of each head rotated,
# 1 MTP layer.
GLM_DIMS = dict(dense_lead=1, n_shared=1, weights_scale=2.5, rope_frac=0.5)
# ernie4_5-moe: as ERNIE-4.5-21B-A3B (the first layer dense, then experts in every layer,
# one shared expert, a selection bias); the -interleave variant puts a dense layer between
# every two MoE layers (interleave step 2, no dense lead), without shared expert or bias
ERNIE_DIMS = {"ernie": dict(dense_lead=1, step=1, bias=True),
              "interleave": dict(dense_lead=0, step=2, bias=False)}


def deepseek2_plan(cfg: dict, n_vocab: int, a: dict) -> list[TensorSpec]:
    T, x = TensorSpec, DS_DIMS
    d, h = cfg["n_embd"], cfg["n_head"]
    qk = x["nope"] + x["rope"]
    out = [T("token_embd.weight", (d, n_vocab), "embd")]
    for i in range(cfg["n_layer"]):
        b = f"blk.{i}."
        out.append(T(b + "attn_norm.weight", (d,), "norm", keep_f32=True))
        if a["q_lora"]:
            out += [T(b + "attn_q_a.weight", (d, x["q_lora"]), "proj"),
                    T(b + "attn_q_a_norm.weight", (x["q_lora"],), "norm", keep_f32=True),
                    T(b + "attn_q_b.weight", (x["q_lora"], h * qk), "proj", scale=QK_GAIN)]
        else:
            out.append(T(b + "attn_q.weight", (d, h * qk), "proj", scale=QK_GAIN))
        out += [T(b + "attn_kv_a_mqa.weight", (d, x["kv_lora"] + x["rope"]), "proj",
                  scale=QK_GAIN),
                T(b + "attn_kv_a_norm.weight", (x["kv_lora"],), "norm", keep_f32=True)]
        if a["mla"]:
            out += [T(b + "attn_k_b.weight", (x["nope"], x["kv_lora"], h), "proj"),
                    T(b + "attn_v_b.weight", (x["kv_lora"], x["v"], h), "proj")]
        else:
            out.append(T(b + "attn_kv_b.weight", (x["kv_lora"], h * (x["nope"] + x["v"])),
                         "proj"))
        out += [T(b + "attn_output.weight", (h * x["v"], d), "proj"),
                T(b + "ffn_norm.weight", (d,), "norm", keep_f32=True)]
        if i < x["dense_lead"]:
            out += _dense_ffn(b, d, cfg["n_ff"])
            continue
        e, f, s = cfg["n_expert"], cfg["n_ff_exp"], cfg["n_ff_exp"] * x["n_shared"]
        # DeepSeek-V3's selection bias: a small nudge to the sigmoid scores
        out += _shared_moe_ffn(b, d, e, f, s, a["v3"])
    return out + _head(cfg, n_vocab)


def _head(cfg: dict, n_vocab: int) -> list[TensorSpec]:
    d = cfg["n_embd"]
    out = [TensorSpec("output_norm.weight", (d,), "norm", keep_f32=True)]
    if not cfg["tied"]:
        out.append(TensorSpec("output.weight", (d, n_vocab), "output", scale=2.0))
    return out


def deepseek2_metadata(w: gguf.GGUFWriter, cfg: dict, a: dict) -> None:
    x = DS_DIMS
    w.add_head_count(cfg["n_head"])
    if a["mla"]:  # the cache holds the latent: one kv head of kv_lora + rope
        w.add_head_count_kv(1)
        w.add_key_length(x["kv_lora"] + x["rope"])
        w.add_value_length(x["kv_lora"])
        w.add_key_length_mla(x["nope"] + x["rope"])
        w.add_value_length_mla(x["v"])
    else:
        w.add_head_count_kv(cfg["n_head"])
        w.add_key_length(x["nope"] + x["rope"])
        w.add_value_length(x["v"])
    w.add_rope_dimension_count(x["rope"])
    if a["q_lora"]:
        w.add_q_lora_rank(x["q_lora"])
    w.add_kv_lora_rank(x["kv_lora"])
    w.add_leading_dense_block_count(x["dense_lead"])
    w.add_feed_forward_length(cfg["n_ff"])
    w.add_expert_feed_forward_length(cfg["n_ff_exp"])
    w.add_expert_count(cfg["n_expert"])
    w.add_expert_used_count(cfg["n_expert_used"])
    w.add_expert_shared_count(x["n_shared"])
    w.add_expert_weights_scale(x["weights_scale"])
    if a["v3"]:  # DeepSeek-V3 routing: sigmoid scores, groups, weights renormalised
        w.add_expert_weights_norm(True)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_group_count(x["n_group"])
        w.add_expert_group_used_count(x["group_used"])
    else:
        w.add_expert_weights_norm(False)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)


def biased_attention(b: str, d: int, q_out: int, kv_out: int) -> list[TensorSpec]:
    """q / k / v / output projections of layer prefix b, each with its bias (gpt-oss,
    phimoe)."""
    T = TensorSpec
    return [T(b + "attn_q.weight", (d, q_out), "proj", scale=QK_GAIN),
            T(b + "attn_q.bias", (q_out,), "bias", keep_f32=True),
            T(b + "attn_k.weight", (d, kv_out), "proj", scale=QK_GAIN),
            T(b + "attn_k.bias", (kv_out,), "bias", keep_f32=True),
            T(b + "attn_v.weight", (d, kv_out), "proj"),
            T(b + "attn_v.bias", (kv_out,), "bias", keep_f32=True),
            T(b + "attn_output.weight", (q_out, d), "proj"),
            T(b + "attn_output.bias", (d,), "bias", keep_f32=True)]


def gptoss_plan(cfg: dict, n_vocab: int, a: dict) -> list[TensorSpec]:
    T = TensorSpec
    d, hd = cfg["n_embd"], cfg["head_dim"]
    q_out, kv_out = cfg["n_head"] * hd, cfg["n_head_kv"] * hd
    e, f = cfg["n_expert"], cfg["n_ff_exp"]
    out = [T("token_embd.weight", (d, n_vocab), "embd")]
    for i in range(cfg["n_layer"]):
        b = f"blk.{i}."
        out += [T(b + "attn_norm.weight", (d,), "norm", keep_f32=True),
                *biased_attention(b, d, q_out, kv_out),
                # sink logits ≈ 2: they take a visible share of each head's attention
                T(b + "attn_sinks.weight", (cfg["n_head"],), "norm", 2.0, keep_f32=True),
                T(b + "post_attention_norm.weight", (d,), "norm", keep_f32=True),
                T(b + "ffn_gate_inp.weight", (d, e), "proj", scale=ROUTER_GAIN, keep_f32=True),
                T(b + "ffn_gate_inp.bias", (e,), "bias", keep_f32=True),
                # gate / up pre-activations of std ≈ 4: the ±7 clamp of the SwiGLU bites
                T(b + "ffn_gate_exps.weight", (d, f, e), "proj", scale=4.0),
                T(b + "ffn_gate_exps.bias", (f, e), "bias", keep_f32=True),
                T(b + "ffn_up_exps.weight", (d, f, e), "proj", scale=4.0),
                T(b + "ffn_up_exps.bias", (f, e), "bias", keep_f32=True),
                T(b + "ffn_down_exps.weight", (f, d, e), "proj", scale=0.25),
                T(b + "ffn_down_exps.bias", (d, e), "bias", keep_f32=True)]
    return out + _head(cfg, n_vocab)


def gptoss_metadata(w: gguf.GGUFWriter, cfg: dict, a: dict) -> None:
    w.add_head_count(cfg["n_head"])
    w.add_head_count_kv(cfg["n_head_kv"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_feed_forward_length(cfg["n_ff_exp"])
    w.add_expert_feed_forward_length(cfg["n_ff_exp"])
    w.add_expert_count(cfg["n_expert"])
    w.add_expert_used_count(cfg["n_expert_used"])
    w.add_sliding_window(OSS_WINDOW)


def glm4moe_plan(cfg: dict, n_vocab: int, a: dict) -> list[TensorSpec]:
    """The trunk's n_layer blocks, then a["nextn"] MTP blocks: an MoE block plus the
    nextn.* tensors (llama.cpp's MTP graph reads them; its normal pass skips the block)."""
    T, x = TensorSpec, GLM_DIMS
    d, hd = cfg["n_embd"], cfg["head_dim"]
    q_out, kv_out = cfg["n_head"] * hd, cfg["n_head_kv"] * hd
    e, f, s = cfg["n_expert"], cfg["n_ff_exp"], cfg["n_ff_exp"] * x["n_shared"]
    out = [T("token_embd.weight", (d, n_vocab), "embd")]
    for i in range(cfg["n_layer"] + a["nextn"]):
        b = f"blk.{i}."
        out += [T(b + "attn_norm.weight", (d,), "norm", keep_f32=True),
                T(b + "attn_q.weight", (d, q_out), "proj", scale=QK_GAIN),
                T(b + "attn_q.bias", (q_out,), "bias", keep_f32=True),
                T(b + "attn_k.weight", (d, kv_out), "proj", scale=QK_GAIN),
                T(b + "attn_k.bias", (kv_out,), "bias", keep_f32=True),
                T(b + "attn_v.weight", (d, kv_out), "proj"),
                T(b + "attn_v.bias", (kv_out,), "bias", keep_f32=True)]
        if a["qk_norm"]:
            out += [T(b + "attn_q_norm.weight", (hd,), "norm", QK_GAIN, keep_f32=True),
                    T(b + "attn_k_norm.weight", (hd,), "norm", QK_GAIN, keep_f32=True)]
        out += [T(b + "attn_output.weight", (q_out, d), "proj"),
                T(b + "post_attention_norm.weight", (d,), "norm", keep_f32=True)]
        if i < x["dense_lead"]:
            out += _dense_ffn(b, d, cfg["n_ff"])
            continue
        out += _shared_moe_ffn(b, d, e, f, s, True)
        if i >= cfg["n_layer"]:  # MTP: [embedding; hidden] → n_embd, its norms and head
            out += _nextn(b, d) + [
                T(b + "nextn.embed_tokens.weight", (d, n_vocab), "embd"),
                T(b + "nextn.shared_head_head.weight", (d, n_vocab), "output", scale=2.0)]
    return out + _head(cfg, n_vocab)


def _dense_ffn(b: str, d: int, n_ff: int) -> list[TensorSpec]:
    """A dense layer's FFN (the dense lead of glm4moe / bailingmoe2)."""
    return [TensorSpec(b + "ffn_gate.weight", (d, n_ff), "proj"),
            TensorSpec(b + "ffn_up.weight", (d, n_ff), "proj"),
            TensorSpec(b + "ffn_down.weight", (n_ff, d), "proj")]


def _shared_moe_ffn(b: str, d: int, e: int, f: int, s: int,
                    sel_bias: bool) -> list[TensorSpec]:
    """Router, the selection bias where sel_bias, E routed experts of width f and an
    ungated shared expert of width s (deepseek2, glm4moe, bailingmoe2)."""
    T = TensorSpec
    # the selection bias nudges the sigmoid scores (a real one is ~1e-2..1)
    bias = [T(b + "exp_probs_b.bias", (e,), "bias", keep_f32=True)] if sel_bias else []
    return [T(b + "ffn_gate_inp.weight", (d, e), "proj", scale=ROUTER_GAIN, keep_f32=True),
            *bias,
            T(b + "ffn_gate_exps.weight", (d, f, e), "proj"),
            T(b + "ffn_up_exps.weight", (d, f, e), "proj"),
            T(b + "ffn_down_exps.weight", (f, d, e), "proj"),
            T(b + "ffn_gate_shexp.weight", (d, s), "proj"),
            T(b + "ffn_up_shexp.weight", (d, s), "proj"),
            T(b + "ffn_down_shexp.weight", (s, d), "proj")]


def _nextn(b: str, d: int) -> list[TensorSpec]:
    """An MTP block's required nextn.* tensors: [embedding; hidden] → n_embd, its norms."""
    T = TensorSpec
    return [T(b + "nextn.eh_proj.weight", (2 * d, d), "proj"),
            T(b + "nextn.enorm.weight", (d,), "norm", keep_f32=True),
            T(b + "nextn.hnorm.weight", (d,), "norm", keep_f32=True),
            T(b + "nextn.shared_head_norm.weight", (d,), "norm", keep_f32=True)]


def glm4moe_metadata(w: gguf.GGUFWriter, cfg: dict, a: dict) -> None:
    x, hd = GLM_DIMS, cfg["head_dim"]
    w.add_head_count(cfg["n_head"])
    w.add_head_count_kv(cfg["n_head_kv"])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(int(hd * x["rope_frac"]))  # partial rotary
    w.add_feed_forward_length(cfg["n_ff"])
    w.add_expert_feed_forward_length(cfg["n_ff_exp"])
    w.add_expert_count(cfg["n_expert"])
    w.add_expert_used_count(cfg["n_expert_used"])
    w.add_expert_shared_count(x["n_shared"])
    w.add_leading_dense_block_count(x["dense_lead"])
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(x["weights_scale"])
    w.add_expert_weights_norm(True)
    w.add_nextn_predict_layers(a["nextn"])


def ernie_moe_layer(i: int, a: dict) -> bool:
    """llama.cpp's rule (build_graph): past the dense lead, every step-th layer."""
    x = ERNIE_DIMS[a["variant"]]
    return i >= x["dense_lead"] and (i + 1) % x["step"] == 0


def _llama_block(cfg: dict, b: str, moe: bool) -> list[TensorSpec]:
    """A Llama-layout block's attention and norms, and its dense FFN unless moe (the
    layers of ernie4_5-moe and llama4)."""
    dense = [] if moe else _dense_ffn(b, cfg["n_embd"], cfg["n_ff"])
    return _attention(b, cfg, qk_norm=False) + dense


def _interleaved_metadata(w: gguf.GGUFWriter, cfg: dict, step: int) -> None:
    """Heads, widths, experts and the interleave step (ernie4_5-moe, llama4)."""
    w.add_head_count(cfg["n_head"])
    w.add_head_count_kv(cfg["n_head_kv"])
    w.add_rope_dimension_count(cfg["head_dim"])  # llama.cpp asserts n_rot == head size
    if cfg["head_dim"] != cfg["n_embd"] // cfg["n_head"]:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_feed_forward_length(cfg["n_ff"])  # the dense layers
    w.add_expert_feed_forward_length(cfg["n_ff_exp"])
    w.add_expert_count(cfg["n_expert"])
    w.add_expert_used_count(cfg["n_expert_used"])
    w.add_interleave_moe_layer_step(step)


def ernie_plan(cfg: dict, n_vocab: int, a: dict) -> list[TensorSpec]:
    T, x = TensorSpec, ERNIE_DIMS[a["variant"]]
    d = cfg["n_embd"]
    out = [T("token_embd.weight", (d, n_vocab), "embd")]
    for i in range(cfg["n_layer"]):
        b = f"blk.{i}."
        out += _llama_block(cfg, b, ernie_moe_layer(i, a))
        if not ernie_moe_layer(i, a):
            continue
        e, f = cfg["n_expert"], cfg["n_ff_exp"]
        out += [T(b + "ffn_gate_inp.weight", (d, e), "proj", scale=ROUTER_GAIN, keep_f32=True),
                T(b + "ffn_gate_exps.weight", (d, f, e), "proj"),
                T(b + "ffn_up_exps.weight", (d, f, e), "proj"),
                T(b + "ffn_down_exps.weight", (f, d, e), "proj")]
        if x["bias"]:  # std 0.2 against probabilities ≈ 1/E: it changes the choice
            out.append(T(b + "exp_probs_b.bias", (e,), "bias", keep_f32=True))
        if a["shared"]:
            s = cfg["n_ff_shexp"]
            out += [T(b + "ffn_gate_shexp.weight", (d, s), "proj"),
                    T(b + "ffn_up_shexp.weight", (d, s), "proj"),
                    T(b + "ffn_down_shexp.weight", (s, d), "proj")]
    return out + _head(cfg, n_vocab)


def ernie_metadata(w: gguf.GGUFWriter, cfg: dict, a: dict) -> None:
    x = ERNIE_DIMS[a["variant"]]
    _interleaved_metadata(w, cfg, x["step"])
    w.add_leading_dense_block_count(x["dense_lead"])
    if a["shared"]:  # as the converter writes them: a count and the width
        w.add_expert_shared_count(1)
        w.add_expert_shared_feed_forward_length(cfg["n_ff_shexp"])


# dots1 (rednote dots.llm1) at test size: as the released files, one dense leading layer,
# per-head q / k norm before rope, sigmoid routing with a selection bias, the k weights
# renormalised and scaled (routed_scaling_factor; real: 2.5), and 2 shared experts of the
# routed width (real: 2 × 1408, 128 experts, top 6)
DOTS_DIMS = dict(dense_lead=1, n_shared=2, weights_scale=2.5)
# hunyuan-moe (Hunyuan-A13B) at test size: every layer MoE, the q / k norm after rope,
# softmax top-k renormalised, an ungated shared expert of
# expert_shared_feed_forward_length (here twice the routed width, so the two widths
# differ). Rope as the converter writes it: HF's NTK alpha already folded into the base
# (base · alpha^(d/(d-2))), scaling type "none", factor 1.


def _attention(b: str, cfg: dict, qk_norm: bool) -> list[TensorSpec]:
    """A standard attention block without biases: norm, q / k / v / output, and the
    per-head q / k norm where the arch has one."""
    T, d, hd = TensorSpec, cfg["n_embd"], cfg["head_dim"]
    q_out, kv_out = cfg["n_head"] * hd, cfg["n_head_kv"] * hd
    out = [T(b + "attn_norm.weight", (d,), "norm", keep_f32=True),
           T(b + "attn_q.weight", (d, q_out), "proj", scale=QK_GAIN),
           T(b + "attn_k.weight", (d, kv_out), "proj", scale=QK_GAIN),
           T(b + "attn_v.weight", (d, kv_out), "proj")]
    if qk_norm:
        out += [T(b + "attn_q_norm.weight", (hd,), "norm", QK_GAIN, keep_f32=True),
                T(b + "attn_k_norm.weight", (hd,), "norm", QK_GAIN, keep_f32=True)]
    return out + [T(b + "attn_output.weight", (q_out, d), "proj"),
                  T(b + "ffn_norm.weight", (d,), "norm", keep_f32=True)]


def _moe_ffn(b: str, cfg: dict, n_ff_shexp: int, sel_bias: bool) -> list[TensorSpec]:
    """_shared_moe_ffn with the config's width, experts and routed width."""
    return _shared_moe_ffn(b, cfg["n_embd"], cfg["n_expert"], cfg["n_ff_exp"], n_ff_shexp,
                           sel_bias)


def dots1_plan(cfg: dict, n_vocab: int, a: dict) -> list[TensorSpec]:
    T, x, d = TensorSpec, DOTS_DIMS, cfg["n_embd"]
    out = [T("token_embd.weight", (d, n_vocab), "embd")]
    for i in range(cfg["n_layer"]):
        b = f"blk.{i}."
        out += _attention(b, cfg, qk_norm=True)
        if i < x["dense_lead"]:
            out += _dense_ffn(b, d, cfg["n_ff"])
        else:
            out += _moe_ffn(b, cfg, cfg["n_ff_exp"] * x["n_shared"], sel_bias=True)
    return out + _head(cfg, n_vocab)


def _common_metadata(w: gguf.GGUFWriter, cfg: dict) -> None:
    """Heads, head size (llama.cpp asserts n_rot == head size for these archs) and the
    expert counts."""
    w.add_head_count(cfg["n_head"])
    w.add_head_count_kv(cfg["n_head_kv"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_expert_feed_forward_length(cfg["n_ff_exp"])
    w.add_expert_count(cfg["n_expert"])
    w.add_expert_used_count(cfg["n_expert_used"])


def dots1_metadata(w: gguf.GGUFWriter, cfg: dict, a: dict) -> None:
    x = DOTS_DIMS
    _common_metadata(w, cfg)
    w.add_feed_forward_length(cfg["n_ff"])  # the dense leading layer
    w.add_leading_dense_block_count(x["dense_lead"])
    w.add_expert_shared_count(x["n_shared"])
    w.add_expert_weights_scale(x["weights_scale"])
    w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


def hunyuan_plan(cfg: dict, n_vocab: int, a: dict) -> list[TensorSpec]:
    out = [TensorSpec("token_embd.weight", (cfg["n_embd"], n_vocab), "embd")]
    for i in range(cfg["n_layer"]):
        b = f"blk.{i}."
        out += _attention(b, cfg, qk_norm=True)
        out += _moe_ffn(b, cfg, 2 * cfg["n_ff_exp"], sel_bias=False)
    return out + _head(cfg, n_vocab)


def hunyuan_metadata(w: gguf.GGUFWriter, cfg: dict, a: dict) -> None:
    _common_metadata(w, cfg)
    # the experts' width is feed_forward_length in llama.cpp's loader; the released file
    # has all three widths equal (3072), the tiny one a wider shared expert
    w.add_feed_forward_length(cfg["n_ff_exp"])
    w.add_expert_shared_feed_forward_length(2 * cfg["n_ff_exp"])
    w.add_expert_shared_count(1)
    if cfg["rope_scaling"] is None:
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        w.add_rope_scaling_factor(1.0)


LLAMA4_ROUTER_GAIN = 1.0


def llama4_moe_layer(i: int, a: dict) -> bool:
    """llama.cpp's rule (llama_model_llama4): experts every interleave step-th layer."""
    return (i + 1) % a["step"] == 0


def llama4_plan(cfg: dict, n_vocab: int, a: dict) -> list[TensorSpec]:
    T = TensorSpec
    d, hd = cfg["n_embd"], cfg["head_dim"]
    e, f = cfg["n_expert"], cfg["n_ff_exp"]
    out = [T("token_embd.weight", (d, n_vocab), "embd")]
    for i in range(cfg["n_layer"]):
        b = f"blk.{i}."
        out += _llama_block(cfg, b, llama4_moe_layer(i, a))
        if not llama4_moe_layer(i, a):
            continue
        # router logits of std 1 (sigmoid weights ≈ 0.6-0.9, not ≈ 1) and gate / up
        # pre-activations of std ≈ 2: silu bends, so weighting the input and weighting the
        # output differ
        out += [T(b + "ffn_gate_inp.weight", (d, e), "proj", scale=LLAMA4_ROUTER_GAIN,
                  keep_f32=True),
                T(b + "ffn_gate_exps.weight", (d, f, e), "proj", scale=2.0),
                T(b + "ffn_up_exps.weight", (d, f, e), "proj", scale=2.0),
                T(b + "ffn_down_exps.weight", (f, d, e), "proj"),
                T(b + "ffn_gate_shexp.weight", (d, f), "proj"),
                T(b + "ffn_up_shexp.weight", (d, f), "proj"),
                T(b + "ffn_down_shexp.weight", (f, d), "proj")]
    out += _head(cfg, n_vocab)
    if cfg["rope_scaling"] == "llama3":
        out.append(T("rope_freqs.weight", (hd // 2,), "rope_freqs", keep_f32=True))
    return out


def llama4_metadata(w: gguf.GGUFWriter, cfg: dict, a: dict) -> None:
    _interleaved_metadata(w, cfg, a["step"])
    if a["window"] is not None:  # llama.cpp reads 0 only (no chunks); else 8192
        w.add_sliding_window(a["window"])


# bailingmoe2: Ling-mini-2.0's layout at test size (real: 1 dense layer, 1 shared expert,
# sigmoid routing with a selection bias, 8 groups of which 4 compete, weights renormalised
# and scaled by 2.5, half of each head rotated, 1 MTP layer). Two shared experts of half
# the experts' width here, so llama.cpp's width × count rule shows.
LING2_DIMS = dict(dense_lead=1, n_shared=2, weights_scale=2.5, rope_frac=0.5, n_group=4,
                  group_used=2)


def bailingmoe2_plan(cfg: dict, n_vocab: int, a: dict) -> list[TensorSpec]:
    """The trunk's n_layer blocks (one fused attn_qkv each), then a["nextn"] MTP blocks
    whose tensors llama.cpp loads and its normal pass skips."""
    T, x = TensorSpec, LING2_DIMS
    d, hd = cfg["n_embd"], cfg["head_dim"]
    q_out, kv_out = cfg["n_head"] * hd, cfg["n_head_kv"] * hd
    e, f = cfg["n_expert"], cfg["n_ff_exp"]
    s = f // x["n_shared"] * x["n_shared"]
    out = [T("token_embd.weight", (d, n_vocab), "embd")]
    for i in range(cfg["n_layer"] + a["nextn"]):
        b = f"blk.{i}."
        out += [T(b + "attn_norm.weight", (d,), "norm", keep_f32=True),
                T(b + "attn_qkv.weight", (d, q_out + 2 * kv_out), "proj", scale=QK_GAIN),
                T(b + "attn_q_norm.weight", (hd,), "norm", QK_GAIN, keep_f32=True),
                T(b + "attn_k_norm.weight", (hd,), "norm", QK_GAIN, keep_f32=True),
                T(b + "attn_output.weight", (q_out, d), "proj"),
                T(b + "ffn_norm.weight", (d,), "norm", keep_f32=True)]
        if i < x["dense_lead"]:
            out += _dense_ffn(b, d, cfg["n_ff"])
            continue
        out += _shared_moe_ffn(b, d, e, f, s, True)
        if i >= cfg["n_layer"]:  # MTP (llama.cpp's bailingmoe2 wants layer_output_norm too)
            out += _nextn(b, d) + [T(b + "layer_output_norm.weight", (d,), "norm",
                                     keep_f32=True)]
    return out + _head(cfg, n_vocab)


def bailingmoe2_metadata(w: gguf.GGUFWriter, cfg: dict, a: dict) -> None:
    x, hd = LING2_DIMS, cfg["head_dim"]
    w.add_head_count(cfg["n_head"])
    w.add_head_count_kv(cfg["n_head_kv"])
    w.add_rope_dimension_count(int(hd * x["rope_frac"]))  # partial rotary
    w.add_feed_forward_length(cfg["n_ff"])
    w.add_expert_feed_forward_length(cfg["n_ff_exp"])
    w.add_expert_count(cfg["n_expert"])
    w.add_expert_used_count(cfg["n_expert_used"])
    # as the converter writes them: one shared expert's width and their count
    w.add_expert_shared_feed_forward_length(cfg["n_ff_exp"] // x["n_shared"])
    w.add_expert_shared_count(x["n_shared"])
    w.add_leading_dense_block_count(x["dense_lead"])
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_group_count(x["n_group"])
    w.add_expert_group_used_count(x["group_used"])
    w.add_expert_weights_scale(x["weights_scale"])
    w.add_expert_weights_norm(True)
    w.add_nextn_predict_layers(a["nextn"])



# minimax-m2 (MiniMax-M2) at test size: every layer MoE, sigmoid routing with a selection
# bias in every layer, no shared expert, half of each head rotated (real: 64 of 128), the
# q / k norms over the whole projections. The experts' width under both keys, as the
# converter writes it (llama.cpp sizes them by feed_forward_length).
MINIMAX_DIMS = dict(rope_frac=0.5)


def minimax_m2_plan(cfg: dict, n_vocab: int, a: dict) -> list[TensorSpec]:
    T, d, hd = TensorSpec, cfg["n_embd"], cfg["head_dim"]
    e, f = cfg["n_expert"], cfg["n_ff_exp"]
    out = [T("token_embd.weight", (d, n_vocab), "embd")]
    for i in range(cfg["n_layer"]):
        b = f"blk.{i}."
        out += _attention(b, cfg, qk_norm=False)
        out += [T(b + "attn_q_norm.weight", (cfg["n_head"] * hd,), "norm", QK_GAIN,
                  keep_f32=True),
                T(b + "attn_k_norm.weight", (cfg["n_head_kv"] * hd,), "norm", QK_GAIN,
                  keep_f32=True),
                T(b + "ffn_gate_inp.weight", (d, e), "proj", scale=ROUTER_GAIN, keep_f32=True),
                T(b + "exp_probs_b.bias", (e,), "bias", keep_f32=True),
                T(b + "ffn_gate_exps.weight", (d, f, e), "proj"),
                T(b + "ffn_up_exps.weight", (d, f, e), "proj"),
                T(b + "ffn_down_exps.weight", (f, d, e), "proj")]
    return out + _head(cfg, n_vocab)


def minimax_m2_metadata(w: gguf.GGUFWriter, cfg: dict, a: dict) -> None:
    hd = cfg["head_dim"]
    w.add_head_count(cfg["n_head"])
    w.add_head_count_kv(cfg["n_head_kv"])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(int(hd * MINIMAX_DIMS["rope_frac"]))  # partial rotary
    w.add_feed_forward_length(cfg["n_ff_exp"])
    w.add_expert_feed_forward_length(cfg["n_ff_exp"])
    w.add_expert_count(cfg["n_expert"])
    w.add_expert_used_count(cfg["n_expert_used"])
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


# phimoe's, afmoe's, deepseek's and mimo2's layouts live in their own modules (this one is long
# enough); make_tiny finds their plans here
from gguf_tools.tiny_afmoe import (  # noqa: E402,F401
    afmoe_metadata,
    afmoe_plan,
    deepseek_metadata,
    deepseek_plan,
)
from gguf_tools.tiny_mimo2 import mimo2_metadata, mimo2_plan  # noqa: E402,F401
from gguf_tools.tiny_phimoe import phimoe_metadata, phimoe_plan  # noqa: E402,F401
