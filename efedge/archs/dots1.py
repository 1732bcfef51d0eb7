"""dots1 (rednote dots.llm1, 142B-A14B): Qwen3-style attention (neox rope, a per-head q / k
RMS norm before rope; llama.cpp sizes K and V by head_count, so files are multi-head), the
first ``leading_dense_block_count`` layers dense, the others routed as DeepSeek-V3: the
gating function from ``expert_gating_func`` (sigmoid in the released files; llama.cpp has
no default and aborts without the key or with 0, so efedge refuses both), the selection bias
``exp_probs_b`` added for the choice only where a layer has one, the k weights
renormalised when ``expert_weights_norm`` is set and scaled by ``expert_weights_scale``
(2.5 in the released files), and an ungated shared expert of ``expert_shared_count`` ×
the routed width."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="dots1", rope_style="neox", moe=True, qk_norm="head", norm_topk=False,
                shared_gate=False, shared_optional=True, routing="deepseek", dense_lead=True,
                mha_only=True, default_gating="",
                required_keys=("attention.layer_norm_rms_epsilon", "leading_dense_block_count",
                               "expert_feed_forward_length", "expert_shared_count",
                               "expert_gating_func"))
