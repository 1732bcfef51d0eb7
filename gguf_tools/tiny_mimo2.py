"""The random tiny mimo2 (Xiaomi MiMo-V2-Flash) layout, as llama.cpp's llama_model_mimo2
reads it. make_tiny calls these for the ARCHS entry with plan "mimo2" (tiny_archs
re-exports them); shapes in ggml order.

At test size: 4 blocks, the first dense (MiMo-V2-Flash's first layer is too), the others
MoE with sigmoid routing, the ``exp_probs_b`` selection bias, the k weights renormalised,
no shared expert. ``expert_weights_scale`` is written as 2: llama.cpp's mimo2 loader never
reads it (its graph passes the unset 0: no scale), and neither does efedge. Blocks 1 and 2
attend a window of MIMO2_SWA[0] positions (a per-layer ``attention.sliding_window_pattern``
array) with their own rope base, more heads than the full-attention blocks 0 and 3 (per-layer
``head_count`` / ``head_count_kv`` arrays) and a learned sink logit per head
(``attn_sinks.weight``, no biases: only the window layers have one, as in the real
model). Keys are 128 wide, values 64 (``attention.value_length``), rope turns the first 32
dims (neox), and the attention's output is multiplied by ``attention.value_scale``.
The ``mimo2-fused`` entry writes q / k / v as one ``attn_qkv`` (llama.cpp's create_tensor_qkv takes
either).
"""

from __future__ import annotations

import gguf

from gguf_tools.make_tiny import QK_GAIN, ROUTER_GAIN, TensorSpec

# window, rope base of the window layers (real: 128 and 10000, the global base 5e6)
MIMO2_SWA = (8, 500.0)
# per block: window?, heads, kv heads (real: 64 / 4 on full layers, 64 / 8 on window ones)
MIMO2_LAYERS = ((False, 4, 1), (True, 8, 2), (True, 8, 2), (False, 4, 1))
# key / value head sizes and rotated dims (real: 192 / 128 / 64), value scale (real 0.707),
# routing weights scale (written, never read: see the module docstring)
MIMO2_DIMS = dict(k_dim=128, v_dim=64, rope_dim=32, value_scale=0.707, weights_scale=2.0,
                  dense_lead=1)


def mimo2_plan(cfg: dict, n_vocab: int, a: dict) -> list[TensorSpec]:
    T, x, d = TensorSpec, MIMO2_DIMS, cfg["n_embd"]
    kd, vd = x["k_dim"], x["v_dim"]
    out = [T("token_embd.weight", (d, n_vocab), "embd")]
    for i, (swa, nh, nkv) in enumerate(MIMO2_LAYERS[:cfg["n_layer"]]):
        b = f"blk.{i}."
        out.append(T(b + "attn_norm.weight", (d,), "norm", keep_f32=True))
        if a.get("fused"):
            # one init for all rows: v's share gets QK_GAIN too (harmless at this size)
            out.append(T(b + "attn_qkv.weight", (d, (nh + nkv) * kd + nkv * vd), "proj",
                         scale=QK_GAIN))
        else:
            out += [T(b + "attn_q.weight", (d, nh * kd), "proj", scale=QK_GAIN),
                    T(b + "attn_k.weight", (d, nkv * kd), "proj", scale=QK_GAIN),
                    T(b + "attn_v.weight", (d, nkv * vd), "proj")]
        if swa:  # sink logits near 1: a share of each head's weight goes nowhere
            out.append(T(b + "attn_sinks.weight", (nh,), "norm", keep_f32=True))
        out += [T(b + "attn_output.weight", (nh * vd, d), "proj"),
                T(b + "ffn_norm.weight", (d,), "norm", keep_f32=True)]
        if i < x["dense_lead"]:
            f = cfg["n_ff"]
            out += [T(b + "ffn_gate.weight", (d, f), "proj"),
                    T(b + "ffn_up.weight", (d, f), "proj"),
                    T(b + "ffn_down.weight", (f, d), "proj")]
        else:
            e, f = cfg["n_expert"], cfg["n_ff_exp"]
            out += [T(b + "ffn_gate_inp.weight", (d, e), "proj", scale=ROUTER_GAIN,
                      keep_f32=True),
                    T(b + "exp_probs_b.bias", (e,), "bias", keep_f32=True),
                    T(b + "ffn_gate_exps.weight", (d, f, e), "proj"),
                    T(b + "ffn_up_exps.weight", (d, f, e), "proj"),
                    T(b + "ffn_down_exps.weight", (f, d, e), "proj")]
    out.append(T("output_norm.weight", (d,), "norm", keep_f32=True))
    out.append(T("output.weight", (d, n_vocab), "output", scale=2.0))
    return out


def mimo2_metadata(w: gguf.GGUFWriter, cfg: dict, a: dict) -> None:
    x, layers = MIMO2_DIMS, MIMO2_LAYERS[:cfg["n_layer"]]
    w.add_head_count([nh for _, nh, _ in layers])
    w.add_head_count_kv([nkv for _, _, nkv in layers])
    w.add_key_length(x["k_dim"])
    w.add_value_length(x["v_dim"])
    w.add_rope_dimension_count(x["rope_dim"])
    w.add_feed_forward_length(cfg["n_ff"])  # the dense first block
    w.add_expert_feed_forward_length(cfg["n_ff_exp"])
    w.add_expert_count(cfg["n_expert"])
    w.add_expert_used_count(cfg["n_expert_used"])
    w.add_expert_weights_scale(x["weights_scale"])
    w.add_sliding_window(MIMO2_SWA[0])
    w.add_sliding_window_pattern([swa for swa, _, _ in layers])
    w.add_rope_freq_base_swa(MIMO2_SWA[1])
    w.add_float32(f"{w.arch}.attention.value_scale", x["value_scale"])
