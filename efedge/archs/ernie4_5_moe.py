"""ernie4_5-moe (Baidu ERNIE-4.5-21B-A3B, ERNIE-4.5-300B-A47B): Llama-style attention
(adjacent-pair rope; q / k / v biases only where a file has them, which the released ones
do not; llama.cpp loads but never adds an ``attn_output.bias``, nor does efedge), the first
``leading_dense_block_count`` layers dense and, past them, experts only every
``interleave_moe_layer_step``-th layer (the released files use 1: every layer); an
ungated shared expert of ``expert_shared_feed_forward_length`` when that key is set
(llama.cpp does not read ``expert_shared_count`` for it).
Routing is fixed by llama.cpp rather than read from the file: softmax over all experts,
the top k chosen by probability + ``exp_probs_b`` (the e_score_correction_bias) where a
layer has one, the weights the unbiased probabilities renormalised to sum 1."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="ernie4_5-moe", rope_style="normal", moe=True, norm_topk=True,
                shared_gate=False, shared_optional=True, shared_by_count=False,
                routing="softmax_bias",
                dense_lead=True, moe_step=True, output_bias_unused=True)
