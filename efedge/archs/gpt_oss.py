"""gpt-oss (gpt-oss-20b / 120b): attention with q / k / v / output biases, a learned sink
logit per head and sliding-window attention on every other layer (efedge/oss.py), neox
rope; routing takes the top-k router logits (the router has a bias) and a softmax over
those k; experts have biases and a clamped SwiGLU (alpha 1.702, limit 7), usually in
MXFP4. The FFN's norm is post_attention_norm. Real files use YaRN rope scaling (factor 32,
cos / sin × mscale: efedge/rope.py); ``rope.freq_base_swa``, when set, is the
sliding-window layers' rope base. Decode runs fused one-token kernels (kernels.decode_oss,
decode_ffn_oai)."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="gpt-oss", rope_style="neox", moe=True, norm_topk=False,
                fused_decode=True, attention="sinks", routing="topk_softmax",
                expert_bias=True, expert_act="swiglu_oai", ffn_norm="post_attention_norm")
