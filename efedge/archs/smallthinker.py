"""smallthinker (PowerInfer SmallThinker-21B-A3B, SmallThinker-4B-A0.6B): every layer MoE,
with its router on the layer's INPUT (the residual before attention: a layer's experts
are known a whole attention ahead, and the expert cache is asked for them then), experts
gated by ReLU (relu(gate) · up), ``expert_gating_func`` (sigmoid or softmax; llama.cpp
requires it) with the k weights always renormalised and never scaled (llama.cpp reads no
weights key for this arch). q / k / v split or one fused attn_qkv, optional q / k / v
biases, neox rope over the whole head. With ``attention.sliding_window`` set, llama.cpp
gives layers il % ``attention.sliding_window_pattern`` (default 4) != 0 a window of 4096
positions (whatever the file says) with ``rope.freq_base_swa`` where set, and skips rope
on layers il % 4 == 0 (NoPE); without it every layer ropes and sees everything. The
output head may be tied to the embedding."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="smallthinker", rope_style="neox", moe=True, norm_topk=False,
                routing="gating", expert_act="relu", router_input="layer", qkv="either",
                iswa_nope=True, gpu=False,
                required_keys=("attention.layer_norm_rms_epsilon",
                               "expert_feed_forward_length", "expert_gating_func"))
