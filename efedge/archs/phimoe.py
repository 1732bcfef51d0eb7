"""phimoe (Phi-3.5-MoE-instruct, 42B total / 6.6B active) as llama.cpp runs it (its phi3
graph): every norm an RMS norm plus a bias (attn_norm, ffn_norm, output_norm: llama.cpp
uses RMS where the model's own code has a LayerNorm, and efedge follows llama.cpp), q /
k / v biases where the file has them (split or fused attn_qkv), an attention output bias
and an output-head bias, neox rope with LongRoPE's per-pair divisors (the long factors
when the context exceeds ``rope.scaling.original_context_length``, else the short ones)
and ``rope.scaling.attn_factor`` on cos / sin; experts of ``feed_forward_length`` routed
by softmax top-k with the k weights renormalised — llama.cpp's approximation of
Phi-3.5-MoE's SparseMixer routing, which neither it nor efedge computes.
Fused one-token kernels have no norm or output biases: decode runs the T-token path with
T = 1; the torch path (device="cuda") is refused by name."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="phimoe", rope_style="neox", moe=True, norm_topk=True, qkv="either",
                expert_width="feed_forward_length", norm_bias=True, out_bias=True,
                rope_factors="longrope", fused_decode=False, gpu=False,
                required_keys=("attention.layer_norm_rms_epsilon", "feed_forward_length"))
