"""olmoe (OLMoE-1B-7B): RMS norm over the whole q and k projections (not per head), top-k
softmax weights not renormalised."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="olmoe", rope_style="neox", moe=True, qk_norm="full", norm_topk=False)
