"""qwen3moe (Qwen3-30B-A3B and family): RMS norm over each q / k head before rope, no
biases, top-k softmax weights renormalised to sum 1."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="qwen3moe", rope_style="neox", moe=True, qk_norm="head", norm_topk=True)
