"""llama: dense Llama, and Mixtral when `llama.expert_count` is set.

Rope rotates adjacent pairs (the converter permuted Q/K for it); Mixtral renormalises the
top-k softmax weights.
"""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="llama", rope_style="normal", moe=False, moe_optional=True, norm_topk=True,
                rope_freqs=True)
