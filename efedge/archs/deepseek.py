"""deepseek (DeepSeek-MoE-16B base / chat; not deepseek2's latent attention): Llama's
attention (normal rope), the first ``leading_dense_block_count`` layers dense, the others
softmax top-k over the routed experts, the k weights not renormalised but scaled by
``expert_weights_scale`` where set (1 in the released files; llama.cpp reads neither
``expert_gating_func`` nor ``expert_weights_norm`` for this arch), expert groups
where a file sets them, beside an ungated shared expert of ``expert_shared_count`` × the
routed width."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="deepseek", rope_style="normal", moe=True, norm_topk=False,
                shared_gate=False, shared_optional=True, dense_lead=True,
                routing="softmax_scale",
                required_keys=("attention.layer_norm_rms_epsilon", "expert_feed_forward_length",
                               "expert_shared_count"))
