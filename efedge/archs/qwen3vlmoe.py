"""qwen3vlmoe (Qwen3-VL-30B-A3B / 235B-A22B), the text model: qwen3moe's layers (RMS norm
over each q / k head before rope, no biases, top-k softmax weights renormalised) with
llama.cpp's interleaved multi-section rope (IMROPE) over ``rope.dimension_sections``.

For text tokens llama.cpp gives every pair of a head the token's position but for the
pairs whose sector falls past the interleaved t / h / w sections, which take the 4th
position, 0 for text: they are not rotated (the real files' [24, 20, 20, 0] over 64 pairs:
pairs 61 and 62). The deepstack layers (``n_deepstack_layers``) add slices of the input
embedding that llama.cpp pads with zeros for text tokens, so they add nothing here and
are not read. Images are not supported: their features come from the separate mmproj
file, which efedge does not load; a text GGUF needs nothing from it."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="qwen3vlmoe", rope_style="neox", moe=True, qk_norm="head", norm_topk=True,
                mrope="imrope", required_keys=("rope.dimension_sections",
                                               "attention.layer_norm_rms_epsilon"))
