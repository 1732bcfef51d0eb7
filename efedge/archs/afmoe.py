"""afmoe (Arcee Trinity Nano / Mini / Large) as llama.cpp's llama_model_afmoe runs it: the
embeddings times √n_embd; a per-head q / k RMS norm before neox rope; the attention's
output times sigmoid(attn_gate · x) before attn_output; RMS norms on both sides of the
attention and of the FFN (attn_norm / post_attention_norm, ffn_norm / post_ffw_norm); a
sliding window (``attention.sliding_window``, required: llama.cpp's graph cannot run
without one) on the first pattern - 1 layers of every ``attention.sliding_window_pattern``
(default 4), their rope base ``rope.freq_base_swa`` where set, and no rope on layers
(il + 1) % 4 == 0. The first ``leading_dense_block_count`` layers are dense; the others
route by ``expert_gating_func`` (sigmoid by default) with the selection bias
``exp_probs_b`` (required in every MoE layer) added for the choice only, renormalise the
k weights when ``expert_weights_norm`` is set, scale them by ``expert_weights_scale``, and
add an ungated shared expert of ``expert_shared_count`` × the routed width."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="afmoe", rope_style="neox", moe=True, qk_norm="head", norm_topk=False,
                shared_gate=False, shared_optional=True, routing="deepseek",
                default_gating="sigmoid", sel_bias=True, dense_lead=True, attn_gate=True,
                post_norms=True, mup_embd=True, iswa_std=True, fused_decode=False,
                gpu=False,
                required_keys=("attention.layer_norm_rms_epsilon",
                               "expert_feed_forward_length", "expert_shared_count",
                               "attention.sliding_window"))
