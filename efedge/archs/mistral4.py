"""mistral4 (Mistral Small 4, 119B): llama.cpp runs it as deepseek2 under its own name
(llama_model_mistral4 subclasses llama_model_deepseek2: its loader, tensors and graph), so
the same spec: multi-head latent attention, dense leading layers, an ungated shared
expert, DeepSeek-V3 routing from the metadata. The one difference is llama_context's:
with YaRN and a ``rope.scaling.yarn_log_multiplier`` (mscale_all_dim) other than 1, it
takes mscale = mscale_all_dim for deepseek2 only, so a mistral4 file's rope tables carry
get_mscale(factor, 1) / get_mscale(factor, mscale_all_dim) where deepseek2's carry 1
(efedge/rope.py); the scores' mscale² follows from that (mla_kq_scale)."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="mistral4", rope_style="normal", moe=True, norm_topk=False,
                shared_gate=False, shared_optional=True,
                attention="mla", routing="deepseek", dense_lead=True)
