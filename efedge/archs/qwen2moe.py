"""qwen2moe (Qwen1.5-MoE, Qwen2-57B-A14B): attention biases, a shared expert scaled by
sigmoid(ffn_gate_inp_shexp · x), top-k softmax weights used as they are (no renormalising)."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="qwen2moe", rope_style="neox", moe=True, attn_bias=True,
                shared_expert=True, norm_topk=False)
