"""deepseek2 (DeepSeek-V2 / V2-Lite / V3-style files): multi-head latent attention
(efedge/mla.py: q lora or plain q, compressed kv, rope on a split part of each head,
adjacent pairs), the first ``leading_dense_block_count`` layers dense, an ungated shared
expert of ``expert_shared_count`` × the routed width, and routing from the metadata:
softmax or sigmoid gating, DeepSeek-V3's selection bias (``exp_probs_b``), expert groups,
optional renormalisation and ``expert_weights_scale``. YaRN (DeepSeek-V2 / V2-Lite) also
scales the attention scores by mscale² from ``rope.scaling.yarn_log_multiplier``
(efedge/rope.py). Decode: the latent attention as one parallel region
(kernels/decode_mla.py, split and legacy layouts), the experts and the shared expert
through the fused one-token kernels."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="deepseek2", rope_style="normal", moe=True, norm_topk=False,
                shared_gate=False, shared_optional=True,
                attention="mla", routing="deepseek", dense_lead=True)
