"""deepseek (DeepSeek-MoE-16B) against llama.cpp: logits (prefill) and greedy tokens (the
fused one-token path), resident and through an expert cache of half the experts; the
routing keys llama.cpp reads (the weights scale, expert groups) and those it ignores
(gating function, weights norm); the torch path against the CPU path.

The tiny file (gguf_tools.tiny_afmoe.deepseek_plan) has 3 blocks: a dense first one,
then MoE blocks of softmax top-4 beside two shared experts of the routed width, the
weights scaled by 2.
"""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest

import efedge
from gguf_tools import make_tiny, tiny_archs

pytest.importorskip("llama_cpp")
import llama_ref  # noqa: E402  (tests/ is on sys.path under pytest)
import test_parity  # noqa: E402
from test_parity import (  # noqa: E402
    _assert_float_match,
    _assert_streamed_match,
    _assert_torch_path_matches_cpu,
    _tokens,
)


@pytest.mark.parametrize("quant", ["F32", "Q4_K_M"])
def test_deepseek_resident_and_streamed_match_llama_cpp(tiny_gguf, quant):
    """Prefill logits within test_parity's tolerance, greedy decoding llama.cpp's tokens
    (F32) or its argmax at ≥ 90% of the steps (Q4_K_M); cache="50%" repeats the resident
    logits and tokens bit for bit, the dense first block never cache traffic."""
    path = tiny_gguf("deepseek", quant)
    _assert_streamed_match(path, quant)
    with efedge.load(path, cache="50%") as m:
        c, store = m.config, m._tf.store
        assert (c.n_dense_lead, c.n_ff_shexp, c.gating) == (1, 2 * c.n_ff_exp, "softmax")
        assert (c.expert_weights_norm, c.expert_weights_scale) == (False, 2.0)
        assert store.expert_bytes(0) == 0 and store.moe_layers == [1, 2]


def test_deepseek_prefill_at_an_offset_matches_llama_cpp(tiny_gguf):
    test_parity.test_prefill_at_an_offset_matches_llama_cpp(tiny_gguf, "deepseek")


def _variant(tmp_path, monkeypatch, name: str, extra) -> str:
    """The tiny deepseek F32 file with extra(w) written after its metadata."""
    metadata = tiny_archs.deepseek_metadata
    monkeypatch.setattr(tiny_archs, "deepseek_metadata",
                        lambda w, *a: (metadata(w, *a), extra(w)))
    return make_tiny.write_tiny(tmp_path / f"{name}.gguf", "deepseek", "F32")


def test_deepseek_routing_keys(tiny_gguf, tmp_path, monkeypatch):
    """The weights scale moves the logits far past the tolerance (so the parity tests see
    it); expert groups are read (llama.cpp's logits with them, efedge's too); a gating
    function or weights norm in the file changes nothing, in llama.cpp or here."""
    path = tiny_gguf("deepseek", "F32")
    ids = _tokens(512)
    ref = llama_ref.llama_logits(path, ids)
    with efedge.load(path) as m:
        base = m.logits(ids)
        tf = m._tf
        tf.cfg = dataclasses.replace(m.config, expert_weights_scale=0.0)
        assert np.abs(m.logits(ids) - ref).max() / ref.std() > 0.1
    groups = _variant(tmp_path, monkeypatch, "groups", lambda w: (
        w.add_expert_group_count(4), w.add_expert_group_used_count(2)))
    _assert_float_match(groups)
    with efedge.load(groups) as m:
        assert (m.config.n_expert_groups, m.config.n_group_used) == (4, 2)
        assert np.abs(m.logits(ids) - base).max() / ref.std() > 0.1
    monkeypatch.undo()
    ignored = _variant(tmp_path, monkeypatch, "ignored", lambda w: (
        w.add_expert_weights_norm(True),
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)))
    assert np.array_equal(llama_ref.llama_logits(ignored, ids), ref)
    with efedge.load(ignored) as m:
        assert np.array_equal(m.logits(ids), base)


def test_deepseek_torch_path_matches_cpu_path(tiny_gguf):
    """device="cuda"'s path on torch's CPU device: resident, and streamed with misses
    computed on the host (hybrid), the CPU path's logits (cosine ≥ 0.99999, same argmax)."""
    _assert_torch_path_matches_cpu(tiny_gguf("deepseek", "F32"), "35%")
