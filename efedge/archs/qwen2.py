"""qwen2 (dense): attention biases, neox rope."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="qwen2", rope_style="neox", moe=False, attn_bias=True)
