"""granitemoe (IBM Granite 3.x MoE): Llama-style attention and routing (softmax, top-k
renormalised) with four multipliers from the metadata: the embeddings are scaled by
``embedding_scale``, each block's attention and FFN outputs by ``residual_scale`` before
the residual add, attention scores by ``attention.scale`` (instead of 1/√d) and the
logits divided by ``logit_scale``. A shared expert (Granite-MoE-shared) is optional and
ungated."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="granitemoe", rope_style="normal", moe=True, norm_topk=True,
                shared_gate=False, shared_optional=True, scales=True,
                rope_freqs=True)
