"""mimo2 (Xiaomi MiMo-V2-Flash) as llama.cpp's llama_model_mimo2 runs it: per-layer head
counts (``attention.head_count`` / ``head_count_kv`` arrays), key and value heads of their
own sizes, neox rope on ``rope.dimension_count`` dims, the window of
``attention.sliding_window`` (required) on the layers the ``sliding_window_pattern`` array
(required) marks, with ``rope.freq_base_swa`` where set, a learned sink logit per head on
layers with ``attn_sinks.weight``, the attention's output times ``attention.value_scale``
(efedge/mimo2.py). A layer with ``ffn_gate_inp`` routes by sigmoid (fixed by llama.cpp,
the file's gating key is not read) with the optional ``exp_probs_b`` selection bias, the
k weights renormalised and not scaled (llama.cpp's mimo2 loader never reads
``expert_weights_scale``); the others are dense. No
shared expert; trailing MTP blocks (``nextn_predict_layers``) are skipped."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="mimo2", rope_style="neox", moe=True, attention="mimo2",
                routing="sigmoid_norm", per_layer=True, fused_decode=False, gpu=False,
                required_keys=("attention.layer_norm_rms_epsilon",
                               "expert_feed_forward_length", "attention.sliding_window",
                               "attention.sliding_window_pattern"))
