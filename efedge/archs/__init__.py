"""Architecture registry: the folder is the registry, one module per general.architecture.

Each module defines `SPEC`, an ArchSpec holding that architecture's quirks and nothing
else; the forward pass in model.py is shared.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

from efedge.errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    name: str
    rope_style: str  # "normal": adjacent pairs rotate (llama); "neox": the two halves rotate
    moe: bool  # has routed experts (dense archs: False)
    qk_norm: str = "none"  # "none" | "head" (RMS over each head) | "full" (RMS over all of q / k)
    # … | "head_post": RMS over each head after rope instead of before it (hunyuan-moe)
    attn_bias: bool = False  # q/k/v projections carry biases (qwen2 family)
    shared_expert: bool = False  # a dense expert beside the routed ones, gated by sigmoid
    norm_topk: bool = True  # renormalise the top-k routing weights to sum 1
    # Dense archs whose metadata can still declare experts (llama → Mixtral-style)
    moe_optional: bool = False
    # the shared expert's output is scaled by sigmoid(ffn_gate_inp_shexp · x) (qwen2moe);
    # False: added as it is (granitemoe, deepseek2)
    shared_gate: bool = True
    # a shared expert exists when "{arch}.expert_shared_feed_forward_length" is set
    shared_optional: bool = False
    # … or, without that key, "{arch}.expert_shared_count" × the experts' width (deepseek2,
    # bailingmoe); False: llama.cpp reads the width key only (ernie4_5-moe)
    shared_by_count: bool = True
    # granite multipliers: embedding_scale, residual_scale, attention.scale, logit_scale
    scales: bool = False
    # the fused one-token kernels (kernels.decode) fit this arch; False: decode runs the
    # T-token path with T = 1
    fused_decode: bool = True
    # "standard" (q / k / v projections), "mla" (deepseek2 multi-head latent attention),
    # "sinks" (gpt-oss: biases, a learned sink logit per head, sliding-window layers),
    # "mimo2" (efedge/mimo2.py: per-layer heads, optional sinks, no biases, a value scale)
    attention: str = "standard"
    # "softmax": softmax over all experts, top-k (norm_topk renormalises); "deepseek":
    # gating function, selection bias, expert groups, weights norm and scale from the
    # metadata; "topk_softmax": top-k router logits, then softmax over those k (gpt-oss);
    # "softmax_bias": softmax over all experts, the top k chosen by probability + the
    # layer's selection bias (exp_probs_b) where it has one, weights the unbiased
    # probabilities (norm_topk renormalises; ernie4_5-moe, no routing keys read);
    # "sigmoid": sigmoid over all experts, top k, the weights as they are (llama4);
    # "sigmoid_norm": sigmoid, top k by probability + the selection bias where a layer has
    # one, the k weights renormalised, not scaled (mimo2: llama.cpp passes its
    # expert_weights_scale, which its mimo2 loader never reads)
    # "gating": "{arch}.expert_gating_func" (required), the k weights always renormalised,
    # no scale (smallthinker: llama.cpp reads neither weights key); "softmax_scale":
    # softmax over all experts, top k, the weights times "{arch}.expert_weights_scale"
    # (0: none), norm_topk renormalising first, expert groups as for every arch (deepseek:
    # llama.cpp fixes the gating and the norm, reads the scale)
    routing: str = "softmax"
    dense_lead: bool = False  # the first "{arch}.leading_dense_block_count" layers are dense
    # past the dense lead, only layers il with (il + 1) % "{arch}.interleave_moe_layer_step"
    # == 0 have experts, the others a dense FFN (ernie4_5-moe; the key is required)
    moe_step: bool = False
    expert_bias: bool = False  # biases on the router and on each expert's gate / up / down
    # "silu": silu(gate)·up; "swiglu_oai": gpt-oss clamped SwiGLU; "relu": relu(gate)·up
    expert_act: str = "silu"
    ffn_norm: str = "ffn_norm"  # the FFN's norm tensor (gpt-oss: post_attention_norm)
    # llama.cpp divides rope frequencies by the optional rope_freqs.weight (llama-3 files)
    rope_freqs: bool = False
    # the qk-norm tensors may be absent (glm4moe: GLM-4.5 has them, GLM-4.5-Air does not);
    # a layer without them has no qk norm
    qk_norm_optional: bool = False
    # the "{arch}."-relative key of the routed experts' width (hunyuan-moe: llama.cpp sizes
    # them by feed_forward_length, though it requires expert_feed_forward_length too)
    expert_width: str = "expert_feed_forward_length"
    # llama.cpp sizes attn_k / attn_v by head_count (dots1): a file with fewer kv heads is
    # one it cannot load, refused by name
    mha_only: bool = False
    # llama.cpp loads an attn_output.bias but never adds it (ernie4_5-moe): efedge ignores
    # it too; False: a file with one is refused (llama.cpp adds it, or cannot load it)
    output_bias_unused: bool = False
    # routing="deepseek": the gating function when "{arch}.expert_gating_func" is absent
    # or 0 (llama.cpp's per-arch default; glm4moe: "sigmoid"; "": none, such a file is
    # refused — dots1, whose graph llama.cpp aborts without one)
    default_gating: str = "softmax"
    # every MoE layer must carry the selection bias exp_probs_b.bias (glm4moe); False:
    # used when present (deepseek2)
    sel_bias: bool = False
    # "{arch}."-relative keys llama.cpp requires for this arch: a file without one is
    # refused by name instead of run with a default
    required_keys: tuple[str, ...] = ()
    # the routing weight multiplies the expert's input, not its output (llama.cpp's
    # build_moe_ffn for llama4: silu is not linear, so the two differ)
    weight_before_ffn: bool = False
    # llama4's attention: NoPE layers every no-rope step with a per-position query
    # temperature, chunked attention on the other layers of the swa pattern, an
    # unweighted per-head q / k RMS norm after rope where the model uses kq norm
    irope: bool = False
    # q / k / v weights: "split" (attn_q / attn_k / attn_v), "fused" (one attn_qkv, q rows
    # then k then v: bailingmoe2), "either" (attn_qkv where the file has it, else split:
    # llama.cpp's create_tensor_qkv)
    qkv: str = "split"
    # the shared expert's width is ("{arch}.expert_shared_feed_forward_length" or the
    # experts' width) × "{arch}.expert_shared_count" (bailingmoe2)
    shared_per_count: bool = False
    # "ffn": the router reads the FFN's normalised input; "layer": the layer's input,
    # before attention (smallthinker: a layer's experts are known an attention ahead)
    router_input: str = "ffn"
    # llama.cpp's smallthinker rule: "{arch}.attention.sliding_window" > 0 makes layers
    # il % "{arch}.attention.sliding_window_pattern" (default 4) != 0 attend the last
    # 4096 positions, and layers il % 4 == 0 skip rope (NoPE); without it every layer
    # attends everything with rope
    iswa_nope: bool = False
    # the torch path (efedge/gpu) runs this arch; False: device="cuda" is refused by name
    gpu: bool = True
    # "imrope": llama.cpp's interleaved multi-section rope (qwen3vl*) from the required
    # "{arch}.rope.dimension_sections"; text tokens have positions (p, p, p, 0), so the
    # pairs whose sector falls to the 4th section do not rotate (efedge/rope.py)
    mrope: str = ""
    # attn_norm / ffn_norm / output_norm each carry a bias added after the RMS norm (phimoe:
    # llama.cpp's phi3 graph, an RMS norm where Phi-3.5-MoE's own code has a LayerNorm)
    norm_bias: bool = False
    # attn_output.bias after the attention's output projection and output.bias after the
    # head, both required (phimoe)
    out_bias: bool = False
    # "longrope": rope_factors_long / _short.weight divide theta, the long ones when the
    # context exceeds rope.scaling.original_context_length (llama.cpp's get_rope_factors)
    rope_factors: str = ""
    # afmoe (llama_model_afmoe): the attention's output times sigmoid(attn_gate · x), per
    # element, before attn_output (x: the attention's normalised input)
    attn_gate: bool = False
    # afmoe: RMS norms of the attention's and the FFN's outputs (post_attention_norm,
    # post_ffw_norm) before each is added to the residual stream
    post_norms: bool = False
    # afmoe: the embeddings times √n_embd (llama.cpp's graph fixes it: Trinity's muP)
    mup_embd: bool = False
    # afmoe's layers: "{arch}.attention.sliding_window" (required: llama.cpp's afmoe graph
    # needs its sliding-window cache) on layers il % "{arch}.attention.sliding_window_pattern"
    # (default 4) < pattern - 1, with "{arch}.rope.freq_base_swa" where set; layers
    # (il + 1) % 4 == 0 skip rope (NoPE: llama.cpp's default n_no_rope_layer_step)
    iswa_std: bool = False
    # mimo2: head_count / head_count_kv may be per-layer arrays, the window layers come from
    # the "{arch}.attention.sliding_window_pattern" array, a layer has experts where it has
    # ffn_gate_inp (ModelConfig.head_counts / swa_layers / moe_layers)
    per_layer: bool = False


def _modules() -> list[str]:
    import efedge.archs as pkg

    return [m.name for m in pkgutil.iter_modules(pkg.__path__)]


def available() -> list[str]:
    """The general.architecture values efedge runs (each module's SPEC.name: a module
    name cannot hold every character of one, e.g. ernie4_5-moe)."""
    return sorted(importlib.import_module(f"efedge.archs.{m}").SPEC.name for m in _modules())


def get(arch: str) -> ArchSpec:
    """The spec of a general.architecture value; UnsupportedModelError names it if unknown."""
    module_name = arch.replace("-", "_")
    if module_name.isidentifier() and module_name in _modules():
        spec = importlib.import_module(f"efedge.archs.{module_name}").SPEC
        if spec.name == arch:
            return spec
    raise UnsupportedModelError(
        f"architecture {arch!r} is not supported (supported: {', '.join(available())})")
