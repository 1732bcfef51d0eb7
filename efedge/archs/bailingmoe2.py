"""bailingmoe2 (inclusionAI Ling 2.0 / Ring 2.0: Ling-mini-2.0 16B-A1.4B, Ling-flash-2.0):
one fused ``attn_qkv`` projection (q rows, then k, then v), a per-head q / k RMS norm, neox
rope on the first ``rope.dimension_count`` dims of each head only (half of them in the real
files), scores scaled by 1/√head size. The first ``leading_dense_block_count`` layers are
dense; the others route by ``expert_gating_func`` (sigmoid in the real files; llama.cpp
requires the key) with the selection bias ``exp_probs_b`` where a layer has one, expert
groups, ``expert_weights_norm`` / ``expert_weights_scale``, and add an ungated shared expert
of ``expert_shared_count`` × (``expert_shared_feed_forward_length`` or the experts'
width). The last ``nextn_predict_layers`` blocks are multi-token-prediction layers that
llama.cpp's normal pass (and ours) never runs: config.py counts them out of n_layer."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="bailingmoe2", rope_style="neox", moe=True, qk_norm="head",
                norm_topk=False, shared_expert=True, shared_gate=False,
                shared_per_count=True, routing="deepseek", dense_lead=True, qkv="fused",
                required_keys=("attention.layer_norm_rms_epsilon",
                               "expert_feed_forward_length", "expert_shared_count",
                               "expert_gating_func"))
