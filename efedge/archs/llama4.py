"""llama4 (Llama 4 Scout 17B-16E, Maverick 17B-128E; the text path): Llama attention
(adjacent-pair rope, llama-3 ``rope_freqs.weight`` factors where a file has them) with
llama.cpp's iRoPE layout — every ``no_rope_layer_step``-th layer (4, fixed by llama.cpp)
has no rope and multiplies its queries by a temperature growing with the position, the
layers of the swa pattern (3 of every 4) attend only within their 8192-token chunk, and
the rope layers take an unweighted per-head RMS norm of q and k unless the model has 128
experts (llama.cpp's rule for Maverick); the file's window size is not read, and a window
of 0 (no chunks) is refused: llama.cpp aborts on it. Experts every
``interleave_moe_layer_step``-th layer (Scout 1, Maverick 2), the others a dense FFN;
sigmoid routing without renormalisation, the routing weight applied to the expert's
input, and an ungated shared expert of the experts' width."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="llama4", rope_style="normal", moe=True, norm_topk=False, shared_expert=True,
                shared_gate=False, routing="sigmoid", moe_step=True, rope_freqs=True,
                weight_before_ffn=True, irope=True,
                required_keys=("expert_feed_forward_length", "interleave_moe_layer_step",
                               "attention.layer_norm_rms_epsilon"))
