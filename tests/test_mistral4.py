"""mistral4 (Mistral Small 4) against llama.cpp: logits (prefill) and greedy tokens (the
fused one-token path), resident and through an expert cache of half the experts; the one
quirk that sets it apart from deepseek2, whose loader and graph llama.cpp runs it with
(YaRN's attention factor), shown to move the logits; files refused as deepseek2's are.

The tiny file (make_tiny --arch mistral4, gguf_tools.tiny_archs.deepseek2_plan) is the
DeepSeek-V3 layout under the mistral4.* keys: 3 blocks, a dense first one, then q lora,
split latent attention (attn_k_b / attn_v_b), sigmoid routing with a selection bias and
expert groups, the weights renormalised and scaled, one ungated shared expert.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import efedge
from gguf_tools import make_tiny, tiny_archs

pytest.importorskip("llama_cpp")
import llama_ref  # noqa: E402  (tests/ is on sys.path under pytest)
from test_parity import (  # noqa: E402
    _assert_float_match,
    _assert_greedy_match,
    _assert_streamed_match,
    _assert_torch_path_matches_cpu,
    _tokens,
)


@pytest.mark.parametrize("quant", ["F32", "Q4_K_M"])
def test_mistral4_resident_and_streamed_match_llama_cpp(tiny_gguf, quant):
    """Logits and greedy tokens within test_parity's tolerances of llama.cpp's, resident
    and (bit for bit) through a 50% cache (_assert_streamed_match); the dense first block
    never cache traffic."""
    path = tiny_gguf("mistral4", quant)
    _assert_streamed_match(path, quant)
    with efedge.load(path, cache="50%") as m:
        c, store = m.config, m._tf.store
        assert (c.arch, c.spec.attention, c.n_dense_lead, c.gating) == (
            "mistral4", "mla", 1, "sigmoid")
        assert (c.expert_weights_norm, c.expert_weights_scale) == (True, 2.0)
        assert (c.n_expert_groups, c.n_group_used, c.n_ff_shexp) == (4, 2, c.n_ff_exp)
        assert all(b.exp_probs_b is not None for b in m._tf.blocks if b.moe)
        assert store.expert_bytes(0) == 0 and store.moe_layers == [1, 2]


def test_mistral4_without_yarn_is_deepseek2(tiny_gguf):
    """The same weights written as deepseek2 (make_tiny's deepseek2-v3): llama.cpp gives
    both files the same logits, and efedge the same bits."""
    ids = _tokens(512, 16)
    m4, ds = tiny_gguf("mistral4", "F32"), tiny_gguf("deepseek2-v3", "F32")
    assert np.array_equal(llama_ref.llama_logits(m4, ids), llama_ref.llama_logits(ds, ids))
    with efedge.load(m4) as a, efedge.load(ds) as b:
        assert np.array_equal(a.logits(ids), b.logits(ids))


def test_mistral4_yarn_attention_factor(tiny_gguf):
    """With YaRN and yarn_log_multiplier 0.0707 (mscale_all_dim 0.707), llama_context
    takes mscale = mscale_all_dim for deepseek2 only: a mistral4 file's rope carries
    get_mscale(32, 1) / get_mscale(32, 0.707) where deepseek2's carries 1 (both over
    rope_yarn's own 1 + 0.1 ln 32). The mistral4 file's logits and greedy tokens are
    llama.cpp's (deepseek2's: test_parity's rope cases), and the two files' logits differ
    far past the tolerance: the rule decides."""
    kw = dict(n_layer=2, rope_scaling="yarn")
    m4, ds = tiny_gguf("mistral4", "F32", **kw), tiny_gguf("deepseek2-v3", "F32", **kw)
    f, log_mul = make_tiny.YARN_FACTOR, make_tiny.DS_YARN_LOG_MUL / 0.1

    def get_mscale(mscale: float) -> float:
        return 0.1 * mscale * math.log(f) + 1.0

    cancel = 1.0 + 0.1 * math.log(f)
    want = {m4: get_mscale(1.0) / get_mscale(log_mul) / cancel, ds: 1.0 / cancel}
    _assert_float_match(m4)
    _assert_greedy_match(m4)
    for path in (m4, ds):
        with efedge.load(path) as m:
            assert m.config.rope_scaling.attn_factor == pytest.approx(want[path], rel=1e-6)
    ids = _tokens(512, 32)
    a, b = llama_ref.llama_logits(m4, ids), llama_ref.llama_logits(ds, ids)
    assert np.abs(a - b).max() / a.std() > 0.5


def test_mistral4_temperature_scale_is_refused(tmp_path, monkeypatch):
    """attention.temperature_scale (llama.cpp's optional query temperature of the deepseek2
    graph, Mistral-Large-3's) is not computed: refused by name, as for deepseek2."""
    metadata = tiny_archs.deepseek2_metadata
    monkeypatch.setattr(tiny_archs, "deepseek2_metadata", lambda w, *a: (
        metadata(w, *a), w.add_attn_temperature_scale(0.1)))
    path = make_tiny.write_tiny(tmp_path / "temp.gguf", "mistral4", "F32", n_layer=1)
    with pytest.raises(efedge.UnsupportedModelError, match="mistral4.attention.temperature"):
        efedge.load(path)


def test_mistral4_torch_path_matches_cpu_path(tiny_gguf):
    """device="cuda"'s path (efedge/gpu/mla.py) on torch's CPU device, with YaRN so that
    mistral4's attention factor reaches its rope tables and score scale: resident, and
    streamed with misses computed on the host (hybrid), the CPU path's logits (cosine ≥
    0.99999, same argmax)."""
    path = tiny_gguf("mistral4", "F32", n_layer=2, rope_scaling="yarn")
    _assert_torch_path_matches_cpu(path, "40%")
