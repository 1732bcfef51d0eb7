"""bailingmoe (inclusionAI Ling-lite, Ling-plus): Llama-style attention (adjacent-pair
rope, scores scaled by 1/√rope dims, which llama.cpp requires to equal the head size),
experts in every layer (llama.cpp ignores ``leading_dense_block_count``), an ungated shared
expert of ``expert_shared_count`` × the experts' width, and softmax routing whose top-k
weights are renormalised when ``expert_weights_norm`` is set and then multiplied by
``expert_weights_scale`` (the converter writes 1: none). The routing keys are read as for
deepseek2 (routing="deepseek"); bailingmoe files carry no gating-function or group keys."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="bailingmoe", rope_style="normal", moe=True, norm_topk=False,
                shared_gate=False, shared_optional=True, routing="deepseek")
