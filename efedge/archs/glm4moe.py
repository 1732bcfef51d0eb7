"""glm4moe (GLM-4.5, GLM-4.5-Air, GLM-4.6): q / k / v biases, neox rope on the first
``rope.dimension_count`` dims of each head only (half of them in the real files), a per-head
q / k RMS norm in GLM-4.5 / 4.6 but not in Air, and the FFN's norm is post_attention_norm.
The first ``leading_dense_block_count`` layers are dense; the others route by sigmoid
scores (the default when ``expert_gating_func`` is unset) with the selection bias
``exp_probs_b`` added for the choice only, renormalise the k weights
(``expert_weights_norm``) and scale them by ``expert_weights_scale``, and add an ungated
shared expert of ``expert_shared_count`` × the routed width. The last
``nextn_predict_layers`` blocks are multi-token-prediction layers that llama.cpp's normal
pass (and ours) never runs: config.py counts them out of n_layer."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="glm4moe", rope_style="neox", moe=True, attn_bias=True, qk_norm="head",
                qk_norm_optional=True, norm_topk=False, shared_gate=False,
                shared_optional=True, routing="deepseek", default_gating="sigmoid",
                sel_bias=True, dense_lead=True, ffn_norm="post_attention_norm",
                required_keys=("attention.layer_norm_rms_epsilon",
                               "expert_feed_forward_length", "expert_shared_count"))
