"""Random-weight GGUF checkpoints for every architecture efedge runs, loadable by llama.cpp.

    python -m gguf_tools.make_tiny --arch qwen3moe --quant Q4_K_M --out x.gguf [--preset test]

Tensor and key names are the GGUF ones (``blk.{i}.ffn_gate_exps.weight``,
``"{arch}.expert_count"``). Shapes below are written in ggml order (fastest dimension
first, as llama.cpp and ``gguf.GGUFReader`` report them); numpy arrays are the reverse.

Weights are drawn per tensor from ``default_rng([seed, crc32(name)])``, so a tensor does
not change when another one is added or resized, and the F32, F16 and quantized files of
one seed hold the same weights (up to rounding). Scales are chosen so that the model is
"decisive": logits have std ≈ 2 with a heavy-ish upper tail (fewer near ties at the
argmax), router logits have std ≈ 3 so top-k routing is rarely a near tie, and attention
scores have std ≈ 1.5 so attention is not a uniform running mean. About half of the
logits' spread comes from the context, the rest from the current token. Sharper
settings make the context matter more but make the random model chaotic: 8-bit noise
(llama.cpp quantizes activations) then flips routing and argmax far more often.

F32/F16 are written here, tensor by tensor (the 1.6 GB bench preset needs well under
1 GB of RAM); other types go through llama.cpp's quantizer (``gguf_tools.quantize``).
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from gguf_tools.vocab import add_vocab

# Model families: general.architecture, and which optional parts each one has.
#   qk_norm: "head" = one [head_dim] norm shared by all heads (qwen3*),
#            "full" = over the whole q / k projection width (olmoe).
ARCHS: dict[str, dict] = {
    "llama":    dict(gguf_arch="llama", moe=False, bias=False, qk_norm=None, shared=False),
    "mixtral":  dict(gguf_arch="llama", moe=True, bias=False, qk_norm=None, shared=False),
    "qwen2":    dict(gguf_arch="qwen2", moe=False, bias=True, qk_norm=None, shared=False),
    "qwen2moe": dict(gguf_arch="qwen2moe", moe=True, bias=True, qk_norm=None, shared=True),
    "qwen3":    dict(gguf_arch="qwen3", moe=False, bias=False, qk_norm="head", shared=False),
    "qwen3moe": dict(gguf_arch="qwen3moe", moe=True, bias=False, qk_norm="head", shared=False),
    "olmoe":    dict(gguf_arch="olmoe", moe=True, bias=False, qk_norm="full", shared=False),
    # granite multipliers (GRANITE_SCALES); the -shared variant has an ungated shared expert
    "granitemoe": dict(gguf_arch="granitemoe", moe=True, bias=False, qk_norm=None,
                       shared=False),
    "granitemoeshared": dict(gguf_arch="granitemoe", moe=True, bias=False, qk_norm=None,
                             shared=True, shared_gate=False),
    # Ling-lite / Ling-plus: every layer MoE, an ungated shared expert of
    # expert_shared_count × the experts' width, routing weights per BAILING_ROUTING
    "bailingmoe": dict(gguf_arch="bailingmoe", moe=True, bias=False, qk_norm=None,
                       shared=True, shared_gate=False),
}
# Layouts written by gguf_tools.tiny_archs ("plan"): deepseek2 as DeepSeek-V2 (softmax
# routing; with a q lora: llama.cpp 0.3.36 takes the lora-less V2-Lite form only at 26 or
# 27 layers), -v3 as DeepSeek-V3 (sigmoid routing with a selection bias and expert
# groups, weights renormalised), -legacy with the unsplit attn_kv_b of older conversions.
for _name, _kw in (("deepseek2", dict(q_lora=True, mla=True, v3=False)),
                   ("deepseek2-v3", dict(q_lora=True, mla=True, v3=True)),
                   ("deepseek2-legacy", dict(q_lora=True, mla=False, v3=False)),
                   # -lite as DeepSeek-V2-Lite (attn_q, no q lora): llama.cpp 0.3.36 loads
                   # that form at 26 or 27 layers only, so tests compare it with efedge's
                   # own paths
                   ("deepseek2-lite", dict(q_lora=False, mla=True, v3=False))):
    ARCHS[_name] = dict(gguf_arch="deepseek2", moe=True, bias=False, qk_norm=None,
                        shared=True, plan="deepseek2", **_kw)
# mistral4 (Mistral Small 4): llama.cpp's deepseek2 loader and graph under its own name, so
# the DeepSeek-V3 layout (q lora, split MLA, sigmoid routing with a selection bias and
# expert groups) with the mistral4.* keys
ARCHS["mistral4"] = dict(gguf_arch="mistral4", moe=True, bias=False, qk_norm=None, shared=True,
                         plan="deepseek2", q_lora=True, mla=True, v3=True)
ARCHS["gpt-oss"] = dict(gguf_arch="gpt-oss", moe=True, bias=True, qk_norm=None, shared=False,
                       plan="gptoss")
# glm4moe as GLM-4.5-Air (no qk norm) and, -qknorm, as GLM-4.5 (per-head q / k norm); both
# with a dense first layer, a shared expert and one trailing MTP layer (nextn: block_count
# counts it, the forward pass skips it)
for _name, _qk in (("glm4moe", None), ("glm4moe-qknorm", "head")):
    ARCHS[_name] = dict(gguf_arch="glm4moe", moe=True, bias=True, qk_norm=_qk, shared=True,
                        shared_gate=False, plan="glm4moe", nextn=1)
# ernie4_5-moe (tiny_archs.ERNIE_DIMS): as ERNIE-4.5-21B-A3B, and -interleave with dense
# layers between the MoE ones (llama.cpp 0.3.36 cannot load that one: its loader gives
# every layer past the dense lead experts, while its graph runs the interleave rule)
ARCHS["ernie4_5-moe"] = dict(gguf_arch="ernie4_5-moe", moe=True, bias=False, qk_norm=None,
                            shared=True, plan="ernie", variant="ernie")
ARCHS["ernie4_5-moe-interleave"] = dict(gguf_arch="ernie4_5-moe", moe=True, bias=False,
                                        qk_norm=None, shared=False, plan="ernie",
                                        variant="interleave")
# dots1 (dots.llm1) and hunyuan-moe (Hunyuan-A13B): tiny_archs.DOTS_DIMS, hunyuan_plan
# (dots1: llama.cpp 0.3.36 sizes attn_k / attn_v by head_count, so no GQA: mha)
ARCHS["dots1"] = dict(gguf_arch="dots1", moe=True, bias=False, qk_norm="head", shared=True,
                      shared_gate=False, plan="dots1", mha=True)
ARCHS["hunyuan-moe"] = dict(gguf_arch="hunyuan-moe", moe=True, bias=False, qk_norm="head",
                            shared=True, shared_gate=False, plan="hunyuan")
# llama4 as Scout (16 experts, so llama.cpp gives it kq norm; experts in every layer, one
# used, rope_freqs) and -maverick as Maverick (128 experts, so no kq norm; experts every
# other layer; two used here, so that each expert's own weighted input is exercised).
# Both have 4 layers: 3 chunked rope layers and a NoPE one. "defaults" override the preset.
ARCHS["llama4"] = dict(gguf_arch="llama4", moe=True, bias=False, qk_norm=None, shared=True,
                       plan="llama4", step=1, window=None,
                       defaults=dict(n_layer=4, n_expert=16, n_expert_used=1,
                                     rope_scaling="llama3"))
ARCHS["llama4-maverick"] = dict(gguf_arch="llama4", moe=True, bias=False, qk_norm=None,
                                shared=True, plan="llama4", step=2, window=None,
                                defaults=dict(n_layer=4, n_expert=128, n_expert_used=2,
                                              n_ff_exp=64))
# bailingmoe2 (tiny_archs.LING2_DIMS): as Ling-mini-2.0, with one trailing MTP layer
ARCHS["bailingmoe2"] = dict(gguf_arch="bailingmoe2", moe=True, bias=False, qk_norm="head",
                           shared=True, plan="bailingmoe2", nextn=1)
# smallthinker: SmallThinker-21B-A3B's Llama-shaped layout (its router reads the layer's
# input, its experts are ReLU-gated: the same tensors) with sigmoid gating and a sliding
# window (ST_SWA); -softmax: softmax gating, no window (llama.cpp then ropes every layer)
for _name, _kw in (("smallthinker", {}), ("smallthinker-softmax", dict(softmax=True,
                                                                       swa=False))):
    ARCHS[_name] = dict(gguf_arch="smallthinker", moe=True, bias=False, qk_norm=None,
                        shared=False, **_kw)
# minimax-m2 (tiny_archs.MINIMAX_DIMS): MiniMax-M2's layout at test size — heads of 128
# (so heads × head size is twice the width, as in the real 48 × 128 over 3072), GQA, the
# q / k norm over the whole projection, half of each head rotated, sigmoid routing with a
# selection bias in every layer, no shared expert
ARCHS["minimax-m2"] = dict(gguf_arch="minimax-m2", moe=True, bias=False, qk_norm="full",
                          shared=False, plan="minimax_m2", defaults=dict(head_dim=128))
# qwen3vlmoe (Qwen3-VL-30B-A3B / 235B-A22B, the text model): qwen3moe's tensors with
# Qwen3-VL's head size (128) and keys: the interleaved M-RoPE sections and the deepstack
# layer count of the real files (QWEN3VL_ROPE)
ARCHS["qwen3vlmoe"] = dict(gguf_arch="qwen3vlmoe", moe=True, bias=False, qk_norm="head",
                           shared=False, defaults=dict(head_dim=128))
# rope.dimension_sections and n_deepstack_layers as convert_hf_to_gguf writes them for
# Qwen3-VL (mrope_section [24, 20, 20] padded to 4; 3 deepstack layers): with 64 rotary
# pairs, llama.cpp's interleaved sectors give pairs 61 and 62 the 4th position, 0 for text
QWEN3VL_ROPE = ((24, 20, 20, 0), 3)
# phimoe (Phi-3.5-MoE; gguf_tools.tiny_phimoe): biased norms, q / k / v, attention output
# and head, LongRoPE factors; 16 experts, top 2 (the real routing)
ARCHS["phimoe"] = dict(gguf_arch="phimoe", moe=True, bias=True, qk_norm=None, shared=False,
                       plan="phimoe", defaults=dict(n_expert_used=2))
# afmoe (Arcee Trinity; gguf_tools.tiny_afmoe): a dense first block, then sigmoid routing
# with a selection bias and a shared expert; attention gate, sandwich norms, window layers
# and a NoPE full-attention layer (4 blocks). deepseek (DeepSeek-MoE-16B): a dense first
# block, softmax top-k beside two shared experts
ARCHS["afmoe"] = dict(gguf_arch="afmoe", moe=True, bias=False, qk_norm="head", shared=True,
                      plan="afmoe", defaults=dict(n_layer=4))
ARCHS["deepseek"] = dict(gguf_arch="deepseek", moe=True, bias=False, qk_norm=None,
                         shared=True, plan="deepseek")
# mimo2 (Xiaomi MiMo-V2-Flash; gguf_tools.tiny_mimo2): a dense first block, then sigmoid
# routing with a selection bias; per-layer window pattern and head counts, sinks on the
# window layers, value heads narrower than the keys, partial rope, a value scale (4
# blocks); mimo2-fused: q / k / v as one attn_qkv
for _name, _fused in (("mimo2", False), ("mimo2-fused", True)):
    ARCHS[_name] = dict(gguf_arch="mimo2", moe=True, bias=False, qk_norm=None, shared=False,
                        plan="mimo2", fused=_fused, defaults=dict(n_layer=4))
# smallthinker's attention.sliding_window and _pattern. llama.cpp keeps of the window only
# "on" (it attends the last 4096 positions on layers il % pattern != 0) and skips rope on
# layers il % 4 == 0: pattern 2 makes layer 0 NoPE, layer 1 a window layer, layer 2 neither
ST_SWA = (8, 2)
# embedding_scale, residual_scale, attention.scale, logit_scale of the granite files: none
# of them 1 (or 1/√d), so each one is exercised; real Granite-3 MoE uses 12, 0.22, 1/64, 6.
GRANITE_SCALES = (2.0, 0.5, 0.1, 0.5)
# bailingmoe's expert_weights_norm and expert_weights_scale: renormalised, then scaled
# (the converter writes norm_topk_prob and a scale of 1; 2 here so the scale is exercised)
BAILING_ROUTING = (True, 2.0)

# head_dim None = n_embd // n_head. Sizes are multiples of 256 so K-quants apply everywhere.
PRESETS: dict[str, dict] = {
    # tests: small but wide enough for K-quants
    "test": dict(n_embd=256, n_layer=3, n_head=4, n_head_kv=2, head_dim=None, n_expert=16,
                 n_expert_used=4, n_ff_exp=256, n_ff_shexp=256, n_ff=512, n_vocab=512,
                 n_ctx=512),
    # quick demos: ~61 MB at F16 for qwen3moe
    "small": dict(n_embd=512, n_layer=8, n_head=8, n_head_kv=2, head_dim=None, n_expert=8,
                  n_expert_used=2, n_ff_exp=256, n_ff_shexp=512, n_ff=1024, n_vocab=512,
                  n_ctx=2048),
    # the project's speed reference: qwen3moe-shaped, ~480 MB at Q4_0, 1.6 GB at F16
    "bench": dict(n_embd=1024, n_layer=16, n_head=16, n_head_kv=4, head_dim=None, n_expert=32,
                  n_expert_used=4, n_ff_exp=512, n_ff_shexp=1024, n_ff=2048, n_vocab=512,
                  n_ctx=4096),
}
_EXTRA_DEFAULTS = dict(rope_base=10000.0, norm_eps=None, vocab_kind="bpe", vocab_pre="gpt-2",
                       tied=False, rope_scaling=None, rope_base_swa=None)
# rope_scaling variants: "yarn" as gpt-oss / DeepSeek-V2 ship it (factor 32, the original
# context = the preset's, so YaRN's ramp falls mid-way through the rope dims; deepseek2
# adds mscale_all_dim 0.707 as yarn_log_multiplier 0.0707), "linear" with an attn_factor,
# "llama3": a rope_freqs.weight of per-pair divisors 1 … 8 (llama / mixtral / granitemoe).
# rope_base_swa: gpt-oss's rope.freq_base_swa (the sliding-window layers' base).
ROPE_SCALINGS = ("yarn", "linear", "llama3")
YARN_FACTOR = 32.0
DS_YARN_LOG_MUL = 0.0707
LINEAR_FACTOR, LINEAR_ATTN_FACTOR = 4.0, 1.1
# Scales of the random weights (see the module docstring).
EMBD_STD = 1.0
QK_GAIN = 1.25  # q and k both scaled: scores have std ≈ QK_GAIN²
ROUTER_GAIN = 3.0  # router logits std
# Source files for the quantizer are F32 up to this size, F16 beyond (bench preset).
_F32_SOURCE_MAX = 1 << 30


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # ggml order (ne0 first)
    init: str  # "proj" (std = scale / sqrt(fan_in)), "output", "embd", "norm" (1 ± noise), "bias"
    scale: float = 1.0
    keep_f32: bool = False  # 1-D tensors and the router stay F32, as convert_hf_to_gguf does

    @property
    def np_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


def resolve_config(arch: str, preset: str = "test", **overrides) -> dict:
    """The hyper-parameters for ``arch`` at ``preset`` with ``overrides`` applied."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    cfg = dict(PRESETS[preset], **_EXTRA_DEFAULTS)
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}; known: {sorted(cfg)}")
    a = ARCHS[arch]
    cfg.update(a.get("defaults", {}))  # the arch's own sizes (llama4's layers and experts)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if cfg["rope_scaling"] not in (None, *ROPE_SCALINGS):
        raise ValueError(f"unknown rope_scaling {cfg['rope_scaling']!r}; known: "
                         f"{', '.join(ROPE_SCALINGS)}")
    if cfg["rope_scaling"] == "llama3" and a["gguf_arch"] not in ("llama", "granitemoe",
                                                                  "llama4"):
        raise ValueError("rope_scaling 'llama3' (rope_freqs.weight) is read by llama.cpp "
                         "for llama, granitemoe and llama4 only")
    if cfg["head_dim"] is None:
        cfg["head_dim"] = cfg["n_embd"] // cfg["n_head"]
    if cfg["norm_eps"] is None:
        cfg["norm_eps"] = 1e-6 if arch.startswith("qwen") else 1e-5
    if a["qk_norm"] == "full" and a["gguf_arch"] == "olmoe":
        # llama.cpp checks olmoe's attn_k_norm against n_embd: no GQA, no odd head size
        # (minimax-m2 sizes its q / k norms by the heads instead).
        if "n_head_kv" in overrides and overrides["n_head_kv"] not in (None, cfg["n_head"]):
            raise ValueError("olmoe needs n_head_kv == n_head (llama.cpp checks attn_k_norm "
                             "against n_embd)")
        cfg["n_head_kv"] = cfg["n_head"]
        if cfg["n_head"] * cfg["head_dim"] != cfg["n_embd"]:
            raise ValueError("olmoe needs n_head * head_dim == n_embd")
    if a.get("mha"):
        if "n_head_kv" in overrides and overrides["n_head_kv"] not in (None, cfg["n_head"]):
            raise ValueError(f"{arch} needs n_head_kv == n_head (llama.cpp sizes attn_k / "
                             "attn_v by head_count)")
        cfg["n_head_kv"] = cfg["n_head"]
    if cfg["n_head"] % cfg["n_head_kv"]:
        raise ValueError(f"n_head {cfg['n_head']} is not a multiple of n_head_kv "
                         f"{cfg['n_head_kv']}")
    if a["moe"] and not 0 < cfg["n_expert_used"] <= cfg["n_expert"]:
        raise ValueError(f"n_expert_used {cfg['n_expert_used']} not in 1..{cfg['n_expert']}")
    if arch == "bailingmoe" and (cfg["n_ff_shexp"] % cfg["n_ff_exp"] or not cfg["n_ff_shexp"]):
        raise ValueError("bailingmoe counts shared experts of the experts' width: n_ff_shexp "
                         f"{cfg['n_ff_shexp']} is not a multiple of n_ff_exp {cfg['n_ff_exp']}")
    cfg["arch"] = arch
    return cfg


def tensor_plan(cfg: dict, n_vocab: int) -> list[TensorSpec]:
    """Every tensor of the model, in file order."""
    a = ARCHS[cfg["arch"]]
    if "plan" in a:
        from gguf_tools import tiny_archs

        return getattr(tiny_archs, a["plan"] + "_plan")(cfg, n_vocab, a)
    d, hd = cfg["n_embd"], cfg["head_dim"]
    q_out, kv_out = cfg["n_head"] * hd, cfg["n_head_kv"] * hd
    T = TensorSpec
    out = [T("token_embd.weight", (d, n_vocab), "embd")]
    for i in range(cfg["n_layer"]):
        b = f"blk.{i}."
        out += [
            T(b + "attn_norm.weight", (d,), "norm", keep_f32=True),
            T(b + "attn_q.weight", (d, q_out), "proj", scale=QK_GAIN),
            T(b + "attn_k.weight", (d, kv_out), "proj", scale=QK_GAIN),
            T(b + "attn_v.weight", (d, kv_out), "proj"),
        ]
        if a["bias"]:
            out += [T(b + "attn_q.bias", (q_out,), "bias", keep_f32=True),
                    T(b + "attn_k.bias", (kv_out,), "bias", keep_f32=True),
                    T(b + "attn_v.bias", (kv_out,), "bias", keep_f32=True)]
        if a["qk_norm"]:
            qn, kn = (hd, hd) if a["qk_norm"] == "head" else (q_out, kv_out)
            out += [T(b + "attn_q_norm.weight", (qn,), "norm", QK_GAIN, keep_f32=True),
                    T(b + "attn_k_norm.weight", (kn,), "norm", QK_GAIN, keep_f32=True)]
        out += [T(b + "attn_output.weight", (q_out, d), "proj"),
                T(b + "ffn_norm.weight", (d,), "norm", keep_f32=True)]
        if a["moe"]:
            e, f = cfg["n_expert"], cfg["n_ff_exp"]
            out += [
                # router: larger std so top-k is decisive
                T(b + "ffn_gate_inp.weight", (d, e), "proj", scale=ROUTER_GAIN, keep_f32=True),
                T(b + "ffn_gate_exps.weight", (d, f, e), "proj"),
                T(b + "ffn_up_exps.weight", (d, f, e), "proj"),
                T(b + "ffn_down_exps.weight", (f, d, e), "proj"),
            ]
            if a["shared"]:
                s = cfg["n_ff_shexp"]
                if a.get("shared_gate", True):
                    out.append(T(b + "ffn_gate_inp_shexp.weight", (d,), "proj", keep_f32=True))
                out += [
                    T(b + "ffn_gate_shexp.weight", (d, s), "proj"),
                    T(b + "ffn_up_shexp.weight", (d, s), "proj"),
                    T(b + "ffn_down_shexp.weight", (s, d), "proj"),
                ]
        else:
            f = cfg["n_ff"]
            out += [T(b + "ffn_gate.weight", (d, f), "proj"),
                    T(b + "ffn_up.weight", (d, f), "proj"),
                    T(b + "ffn_down.weight", (f, d), "proj")]
    out.append(T("output_norm.weight", (d,), "norm", keep_f32=True))
    if not cfg["tied"]:
        # logits std ≈ 2 with a unit-RMS final hidden state
        out.append(T("output.weight", (d, n_vocab), "output", scale=2.0))
    if cfg["rope_scaling"] == "llama3":
        out.append(T("rope_freqs.weight", (hd // 2,), "rope_freqs", keep_f32=True))
    return out


def _generate(spec: TensorSpec, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    shape = spec.np_shape
    if spec.init == "rope_freqs":  # llama-3's shape: 1 for high frequencies … 8 for low
        return np.clip(np.linspace(-1.0, 9.0, shape[0]), 1.0, 8.0).astype(np.float32)
    if spec.init == "rope_short":  # LongRoPE's short factors: 1 … 1.5
        return np.linspace(1.0, 1.5, shape[0]).astype(np.float32)
    if spec.init == "norm":
        return spec.scale * (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32))
    if spec.init == "bias":
        return 0.2 * rng.standard_normal(shape, dtype=np.float32)
    if spec.init == "embd":
        return EMBD_STD * rng.standard_normal(shape, dtype=np.float32)
    fan_in = spec.shape[0]  # ggml ne0 is the input (row) dimension
    w = rng.standard_normal(shape, dtype=np.float32)
    w *= np.float32(spec.scale / np.sqrt(fan_in))
    if spec.init == "output":
        # Log-normal row norms give the logits a heavier upper tail, as token frequencies
        # do in a trained model: the top-2 gap is ~2x wider than for Gaussian logits, so
        # argmax comparisons against llama.cpp rarely sit on a near tie.
        rows = np.exp(0.3 * rng.standard_normal((shape[0], 1))) / np.exp(0.09)
        w *= rows.astype(np.float32)
    return w


def _write_metadata(w: gguf.GGUFWriter, cfg: dict, dtype: str, name: str,
                    blocks: tuple[str, str] | None = None) -> int:
    a, arch = ARCHS[cfg["arch"]], ARCHS[cfg["arch"]]["gguf_arch"]
    w.add_name(name)
    if blocks is not None:
        from gguf_tools.random_quant import file_type

        w.add_file_type(file_type(blocks))
    else:
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "F32"
                        else gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(cfg["n_ctx"])
    w.add_embedding_length(cfg["n_embd"])
    w.add_block_count(cfg["n_layer"] + a.get("nextn", 0))  # + MTP layers after the trunk
    if "plan" in a:
        from gguf_tools import tiny_archs

        w.add_rope_freq_base(float(cfg["rope_base"]))
        w.add_layer_norm_rms_eps(float(cfg["norm_eps"]))
        _write_rope_scaling(w, cfg, arch)
        getattr(tiny_archs, a["plan"] + "_metadata")(w, cfg, a)
        return add_vocab(w, kind=cfg["vocab_kind"], n_vocab=cfg["n_vocab"],
                         pre=cfg["vocab_pre"])
    w.add_head_count(cfg["n_head"])
    w.add_head_count_kv(cfg["n_head_kv"])
    hd = cfg["head_dim"]
    if hd != cfg["n_embd"] // cfg["n_head"] or arch in ("qwen3", "qwen3moe", "qwen3vlmoe"):
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(float(cfg["rope_base"]))
    w.add_layer_norm_rms_eps(float(cfg["norm_eps"]))
    _write_rope_scaling(w, cfg, arch)
    if a["moe"]:
        w.add_expert_count(cfg["n_expert"])
        w.add_expert_used_count(cfg["n_expert_used"])
        if arch in ("qwen2moe", "qwen3moe", "qwen3vlmoe", "bailingmoe"):
            # like the real files: feed_forward_length is the (unused) dense width,
            # the experts' width has its own key
            w.add_feed_forward_length(cfg["n_ff"])
            w.add_expert_feed_forward_length(cfg["n_ff_exp"])
        else:  # llama (Mixtral) and olmoe size their experts by feed_forward_length
            w.add_feed_forward_length(cfg["n_ff_exp"])
        if arch == "bailingmoe":  # a count of shared experts, and the routing weights
            w.add_expert_shared_count(cfg["n_ff_shexp"] // cfg["n_ff_exp"])
            w.add_expert_weights_norm(BAILING_ROUTING[0])
            w.add_expert_weights_scale(BAILING_ROUTING[1])
        elif a["shared"]:
            w.add_expert_shared_feed_forward_length(cfg["n_ff_shexp"])
        if arch == "smallthinker":  # as the converter: the experts' width under both keys
            w.add_expert_feed_forward_length(cfg["n_ff_exp"])
            w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX if a.get("softmax")
                                     else gguf.ExpertGatingFuncType.SIGMOID)
            if a.get("swa", True):
                w.add_sliding_window(ST_SWA[0])
                w.add_sliding_window_pattern(ST_SWA[1])
        if arch == "qwen3vlmoe":
            w.add_rope_dimension_sections(list(QWEN3VL_ROPE[0]))
            w.add_num_deepstack_layers(QWEN3VL_ROPE[1])
        if arch == "granitemoe":
            emb, res, att, logit = GRANITE_SCALES
            w.add_embedding_scale(emb)
            w.add_residual_scale(res)
            w.add_attention_scale(att)
            w.add_logit_scale(logit)
    else:
        w.add_feed_forward_length(cfg["n_ff"])
    return add_vocab(w, kind=cfg["vocab_kind"], n_vocab=cfg["n_vocab"], pre=cfg["vocab_pre"])


def _write_rope_scaling(w: gguf.GGUFWriter, cfg: dict, arch: str) -> None:
    """The rope scaling keys of cfg["rope_scaling"] (see ROPE_SCALINGS)."""
    kind = cfg["rope_scaling"]
    if kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(YARN_FACTOR)
        w.add_rope_scaling_orig_ctx_len(cfg["n_ctx"])
        if arch in ("deepseek2", "mistral4"):
            w.add_rope_scaling_yarn_log_mul(DS_YARN_LOG_MUL)
    elif kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(LINEAR_FACTOR)
        w.add_rope_scaling_attn_factors(LINEAR_ATTN_FACTOR)
    if cfg["rope_base_swa"] is not None:
        w.add_rope_freq_base_swa(float(cfg["rope_base_swa"]))


def _write_float(path: Path, cfg: dict, dtype: str, seed: int, name: str,
                 blocks: tuple[str, str] | None = None) -> None:
    """Write an F32 or F16 file, generating each tensor just before it is written;
    ``blocks``: a random-block spec (gguf_tools.random_quant) for the matrices instead."""
    from gguf_tools import random_quant as rq

    w = gguf.GGUFWriter(path, ARCHS[cfg["arch"]]["gguf_arch"])
    n_vocab = _write_metadata(w, cfg, dtype, name, blocks)
    plan = tensor_plan(cfg, n_vocab)
    types = [("F32" if t.keep_f32 else dtype) if blocks is None else
             rq.tensor_type(blocks, t.name, t.init, t.keep_f32, t.shape[0], len(t.shape))
             for t in plan]
    for t, ty in zip(plan, types, strict=True):
        if ty in ("F32", "F16"):
            dt = np.dtype(np.float32 if ty == "F32" else np.float16)
            w.add_tensor_info(t.name, t.np_shape, dt, int(np.prod(t.shape)) * dt.itemsize)
        else:
            rq.add_tensor_info(w, t.name, t.np_shape, ty)
    try:
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t, ty in zip(plan, types, strict=True):
            rng = np.random.default_rng([seed, zlib.crc32(t.name.encode())])
            w.write_tensor_data(
                _generate(t, seed).astype(np.float32 if ty == "F32" else np.float16, copy=False)
                if ty in ("F32", "F16") else
                rq.random_blocks(ty, t.np_shape, t.scale / np.sqrt(t.shape[0]), rng))
    finally:
        w.close()


def _float_nbytes(cfg: dict, itemsize: int) -> int:
    return sum(int(np.prod(t.shape)) * (4 if t.keep_f32 else itemsize)
               for t in tensor_plan(cfg, cfg["n_vocab"]))


def write_tiny(path: str | os.PathLike, arch: str, quant: str = "F32", *,
               preset: str = "test", seed: int = 0, nthread: int = 2, **overrides) -> Path:
    """Write a random-weight ``arch`` model at ``preset`` size to ``path`` as ``quant``.

    ``arch``: a key of ``ARCHS`` (llama, mixtral, qwen2, qwen2moe, qwen3, qwen3moe, olmoe,
    granitemoe, granitemoeshared, bailingmoe, deepseek2* (-v3, -legacy, -lite), gpt-oss, glm4moe*,
    ernie4_5-moe*, llama4, llama4-maverick, minimax-m2, qwen3vlmoe, phimoe, afmoe, deepseek,
    mistral4, mimo2*, …). ``quant``:
    F32 and F16 are written directly, anything else (Q8_0, Q4_K_M, IQ4_NL, …) by
    llama.cpp's quantizer from an F32 source (F16 above 1 GiB).
    ``overrides``: any preset key (n_layer, n_expert, n_expert_used, n_embd, n_head,
    n_head_kv, head_dim, n_ff_exp, n_ff_shexp, n_ff, n_vocab, n_ctx) and rope_base,
    norm_eps, vocab_kind, vocab_pre, tied, rope_scaling ("yarn", "linear", "llama3": see
    ROPE_SCALINGS), rope_base_swa.
    The file appears atomically (written under a temporary name, then renamed).

    The low-bit types (IQ1_S IQ1_M IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S TQ1_0 TQ2_0) are
    written directly as random valid blocks: ``quant`` "IQ2_XXS", or "IQ1_S/IQ3_S" for
    the routed experts / the other matrices (see gguf_tools.random_quant).
    """
    path = Path(path)
    cfg = resolve_config(arch, preset, **overrides)
    quant = quant.upper()
    name = f"efedge-tiny-{arch}-{preset}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    src = path.with_name(f".{path.name}.{os.getpid()}.src")
    try:
        from gguf_tools.random_quant import parse_spec

        if quant in ("F32", "F16"):
            _write_float(tmp, cfg, quant, seed, name)
        elif (blocks := parse_spec(quant)) is not None:
            _write_float(tmp, cfg, "F32", seed, name, blocks)
        else:
            from gguf_tools.quantize import quantize

            a = ARCHS[arch]
            if a.get("plan") == "deepseek2" and not a["q_lora"] and \
                    cfg["n_layer"] not in (26, 27):  # (it asks for q_lora_rank otherwise)
                raise ValueError(f"llama.cpp's quantizer reads {arch} (no q lora) only at 26 "
                                 f"or 27 layers, as DeepSeek-V2-Lite's: write it as F32 or "
                                 f"F16, or with --layers 27")
            src_type = "F32" if _float_nbytes(cfg, 4) <= _F32_SOURCE_MAX else "F16"
            _write_float(src, cfg, src_type, seed, name)
            quantize(src, tmp, quant, nthread=nthread)
        os.replace(tmp, path)
    finally:
        for p in (tmp, src):
            p.unlink(missing_ok=True)
    return path


def default_model_path() -> Path:
    root = os.environ.get("EFEDGE_CACHE") or Path.home() / ".cache" / "efedge"
    return Path(root) / "tiny-qwen3moe-f16.gguf"


def ensure_default_model() -> Path:
    """The placeholder default model (qwen3moe, "small" preset, F16), written once.

    Lives in ``$EFEDGE_CACHE`` (a directory) or ``~/.cache/efedge``. Needs no llama.cpp.
    """
    path = default_model_path()
    if not path.is_file():
        write_tiny(path, "qwen3moe", "F16", preset="small", seed=0)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gguf_tools.make_tiny",
                                 description="Write a random-weight GGUF model")
    ap.add_argument("--arch", required=True, choices=sorted(ARCHS))
    ap.add_argument("--quant", default="F32",
                    help="F32, F16, a llama.cpp type (Q4_K_M, …) or random IQ1 / IQ2 / IQ3 / "
                         "TQ blocks (IQ2_XXS, IQ1_S/IQ3_S: experts / the rest)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--preset", default="test", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="quantizer threads")
    for flag, key in (("--layers", "n_layer"), ("--experts", "n_expert"),
                      ("--experts-used", "n_expert_used"), ("--embd", "n_embd"),
                      ("--heads", "n_head"), ("--kv-heads", "n_head_kv"),
                      ("--head-dim", "head_dim"), ("--ff", "n_ff"), ("--ff-exp", "n_ff_exp"),
                      ("--ff-shexp", "n_ff_shexp"), ("--vocab", "n_vocab"), ("--ctx", "n_ctx")):
        ap.add_argument(flag, dest=key, type=int, default=None)
    ap.add_argument("--vocab-kind", dest="vocab_kind", choices=("bpe", "spm"), default=None)
    ap.add_argument("--tied", action="store_true", default=None, help="no output.weight")
    ap.add_argument("--rope-scaling", dest="rope_scaling", choices=ROPE_SCALINGS, default=None)
    args = vars(ap.parse_args(argv))
    keys = ("arch", "quant", "out", "preset", "seed", "threads")
    arch, quant, out, preset, seed, threads = (args.pop(k) for k in keys)
    try:
        path = write_tiny(out, arch, quant, preset=preset, seed=seed, nthread=threads, **args)
    except (ValueError, RuntimeError, OSError) as exc:  # (a bad type, the quantizer's refusal)
        print(f"make_tiny: error: {exc}", file=sys.stderr)
        return 2
    print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
