"""glm4moe (GLM-4.5 / 4.5-Air / 4.6) beyond the per-arch parity lists of test_parity.py:
llama.cpp's logits and greedy tokens through the expert cache, the trailing MTP layer
left out of the pass, and bad files refused by name.

The tiny file (gguf_tools.tiny_archs.glm4moe_plan) has 3 trunk blocks (a dense first one,
then two MoE blocks with a shared expert and a selection bias) and one MTP block after
them; its rope turns half of each head.
"""

from __future__ import annotations

import gguf
import llama_ref  # tests/ is on sys.path under pytest; it imports llama_cpp lazily
import numpy as np
import pytest

import efedge
from gguf_tools import make_tiny, tiny_archs


def _tokens(n: int, seed: int = 7) -> list[int]:
    return np.random.default_rng(seed).integers(0, 512, size=n).tolist()


@pytest.mark.requires_llama_cpp
@pytest.mark.parametrize("quant", ["F16", "Q4_K_M"])
def test_streamed_experts_match_llama_cpp(tiny_gguf, quant, monkeypatch):
    """cache="50%": the experts stream through the cache, and the logits are the resident
    ones bit for bit and llama.cpp's (F16: max|Δ|/std ≤ 2e-2, the same argmax; Q4_K_M:
    cosine ≥ 0.995); greedy decoding through the cache (the one-token path) gives
    llama.cpp's tokens."""
    from test_parity import _assert_float_match, _assert_quantized_match, resident_and_streamed

    path = tiny_gguf("glm4moe", quant)
    ids = _tokens(32)
    (resident, greedy), (streamed, greedy_streamed), s, store = resident_and_streamed(
        path, ids, 24)
    assert np.array_equal(streamed, resident)
    assert greedy_streamed == greedy
    assert s["misses"] > 0 and s["bytes_loaded"] > 0  # the cache did load experts
    assert store.expert_bytes(0) == 0 and store.moe_layers == [1, 2]  # dense first layer
    # the parity checks of test_parity.py, on a model loaded with the cache
    real_load = efedge.load
    monkeypatch.setattr(efedge, "load", lambda p, **kw: real_load(p, cache="50%", **kw))
    if quant == "F16":
        _assert_float_match(path)
        assert greedy == llama_ref.llama_greedy(path, ids[:8], 24)
    else:
        _assert_quantized_match(path)


def test_mtp_layer_is_counted_out(tiny_gguf):
    """block_count 4 with nextn_predict_layers 1: three blocks run, the KV cache and the
    expert store hold three layers, the MTP block's experts are never cache traffic."""
    path = tiny_gguf("glm4moe", "F32")
    with efedge.load(path, cache="50%") as m:
        c = m.config
        assert (c.n_layer, c.n_nextn, c.n_dense_lead) == (3, 1, 1)
        assert len(m._tf.blocks) == 3 and m._tf.store.n_layer == 3
        assert (c.rope_dim, c.head_dim) == (32, 64)  # partial rotary
        assert (c.gating, c.expert_weights_norm, c.expert_weights_scale) == ("sigmoid", True, 2.5)
        assert c.n_ff_shexp == c.n_ff_exp  # expert_shared_count 1
        assert [b.qk_norm for b in m._tf.blocks] == ["none"] * 3  # GLM-4.5-Air: none
        m.logits(_tokens(8))
        assert m.stats()["expert_requests"] > 0
    with efedge.load(tiny_gguf("glm4moe-qknorm", "F32")) as m:
        assert [b.qk_norm for b in m._tf.blocks] == ["head"] * 3  # GLM-4.5: per head
    # efedge inspect: three layers, the MTP block's bytes apart from the ones that run
    from efedge.cli.inspect import describe
    from efedge.gguf_file import GGUFFile

    info = describe(path)
    gf = GGUFFile(path)
    mtp = sum(t.nbytes for t in gf.tensors.values() if t.name.startswith("blk.3."))
    total = sum(t.nbytes for t in gf.tensors.values())
    gf.close()
    assert (info["layers"], info["mtp_layers"], info["mtp_bytes"]) == (3, 1, mtp) and mtp > 0
    assert info["expert_bytes"] + info["non_expert_bytes"] + mtp == total
    assert info["features"]["rope_dims"] == "32 of 64"


# -- bad files ---------------------------------------------------------------------------
def _glm_file(tmp_path, monkeypatch, *, drop_tensor=None, meta=None, arch="glm4moe"):
    """A 2-block glm4moe file (dense + MoE, then the MTP block) with one thing changed:
    drop_tensor (a name suffix) left out of the plan, meta(w) called after the metadata."""
    plan, metadata = tiny_archs.glm4moe_plan, tiny_archs.glm4moe_metadata
    if drop_tensor:
        monkeypatch.setattr(tiny_archs, "glm4moe_plan", lambda *a: [
            t for t in plan(*a) if not t.name.endswith(drop_tensor)])
    if meta:
        monkeypatch.setattr(tiny_archs, "glm4moe_metadata",
                            lambda w, *a: (metadata(w, *a), meta(w)))
    return make_tiny.write_tiny(tmp_path / "bad.gguf", arch, "F32", n_layer=2)


def test_missing_required_key_is_named(tmp_path, monkeypatch):
    """llama.cpp requires expert_shared_count for glm4moe: without it efedge would run the
    experts without their shared expert."""
    monkeypatch.setattr(gguf.GGUFWriter, "add_expert_shared_count", lambda w, n: None)
    path = _glm_file(tmp_path, monkeypatch)
    with pytest.raises(efedge.ModelFormatError, match="glm4moe.expert_shared_count"):
        efedge.load(path)


def test_missing_selection_bias_is_named(tmp_path, monkeypatch):
    path = _glm_file(tmp_path, monkeypatch, drop_tensor="1.exp_probs_b.bias")
    with pytest.raises(efedge.ModelFormatError, match=r"blk\.1\.exp_probs_b\.bias"):
        efedge.load(path)


def test_half_a_qk_norm_is_named(tmp_path, monkeypatch):
    path = _glm_file(tmp_path, monkeypatch, drop_tensor="0.attn_k_norm.weight",
                     arch="glm4moe-qknorm")
    with pytest.raises(efedge.ModelFormatError, match=r"blk\.0\.attn_k_norm\.weight"):
        efedge.load(path)


def test_mtp_only_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf.GGUFWriter, "add_nextn_predict_layers",
                        lambda w, n: w.add_uint32("glm4moe.nextn_predict_layers", 3))
    path = _glm_file(tmp_path, monkeypatch)
    with pytest.raises(efedge.ModelFormatError, match="nextn_predict_layers"):
        efedge.load(path)


def test_mrope_sections_are_refused(tmp_path, monkeypatch):
    """GLM-4.5V-style M-RoPE sections: llama.cpp rotates by sections, efedge does not."""
    path = _glm_file(tmp_path, monkeypatch,
                     meta=lambda w: w.add_rope_dimension_sections([8, 12, 12, 0]))
    with pytest.raises(efedge.UnsupportedModelError, match="rope.dimension_sections"):
        efedge.load(path)


def test_unknown_gating_function_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf.GGUFWriter, "add_expert_gating_func",
                        lambda w, v: w.add_uint32("glm4moe.expert_gating_func", 4))
    path = _glm_file(tmp_path, monkeypatch)
    with pytest.raises(efedge.UnsupportedModelError, match="expert_gating_func"):
        efedge.load(path)


def test_cuda_takes_glm4moe_and_names_a_missing_gpu(tiny_gguf):
    """The GPU path runs glm4moe (routed on the host by the CPU path's rule:
    tests/test_gpu.py compares the two on torch's CPU device); without a GPU the error
    names the missing GPU, not the architecture."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tests/test_gpu.py's cuda twins run glm4moe on it")
    with pytest.raises(efedge.UnsupportedModelError, match="no GPU") as err:
        efedge.load(tiny_gguf("glm4moe", "F32"), device="cuda")
    assert "architecture" not in str(err.value)
