"""minimax-m2 (MiniMax-M2 / M2.1, 230B-A10B): every layer MoE, no shared expert. Attention
as llama.cpp's llama_model_minimax_m2 graph: an RMS norm over the WHOLE q projection and
the whole k projection (attn_q_norm [heads × head size], attn_k_norm [kv heads × head
size]; not per head) before rope, neox rope on the first ``rope.dimension_count`` dims of
each head only (64 of 128 in the released files), GQA, scores scaled by 1/√head size; q /
k / v split or one fused attn_qkv (create_tensor_qkv). Routing: ``expert_gating_func``
(sigmoid in the released files; llama.cpp reads it as optional but aborts in
build_moe_ffn without one, so efedge requires it) with the selection bias ``exp_probs_b``
(required in every layer) added for the choice only, expert groups where the file has
them, the k weights always renormalised and never scaled: llama.cpp reads neither
``expert_weights_norm`` nor ``expert_weights_scale`` for this arch. The routed experts are
sized by ``feed_forward_length``; llama.cpp also requires ``expert_feed_forward_length``
(the converter writes both 1536) but does not size them by it."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="minimax-m2", rope_style="neox", moe=True, qk_norm="full",
                norm_topk=False, routing="gating", sel_bias=True, qkv="either",
                expert_width="feed_forward_length",
                required_keys=("attention.layer_norm_rms_epsilon", "feed_forward_length",
                               "expert_feed_forward_length", "expert_gating_func"))
