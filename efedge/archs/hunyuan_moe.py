"""hunyuan-moe (Tencent Hunyuan-A13B): neox rope with the per-head q / k RMS norm applied
after rope (not before it, as in Qwen3), experts in every layer routed by softmax top-k
with the k weights renormalised (llama.cpp reads no routing keys: a file's
``expert_weights_scale`` is ignored), and an ungated shared expert of
``expert_shared_feed_forward_length`` (``feed_forward_length`` without it) beside them.
llama.cpp sizes the routed experts by ``feed_forward_length`` and requires, but does not
use, ``expert_feed_forward_length`` (the released file has both 3072).
Rope: Hunyuan's NTK "alpha" scaling is folded into the base by the converter
(base · alpha^(d / (d − 2)), written as ``rope.freq_base`` with scaling type "none");
llama.cpp 0.3.36 reads ``rope.scaling.alpha`` for every arch but applies it only to
hunyuan-dense / hunyuan-vl, so a hunyuan-moe file's alpha key changes nothing, here too."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="hunyuan-moe", rope_style="neox", moe=True, qk_norm="head_post",
                norm_topk=True, shared_expert=True, shared_gate=False,
                expert_width="feed_forward_length",
                required_keys=("attention.layer_norm_rms_epsilon", "feed_forward_length",
                               "expert_feed_forward_length"))
