"""mimo2 (Xiaomi MiMo-V2-Flash) against llama.cpp: logits (prefill) and greedy tokens (the
one-token path), resident and through an expert cache of half the experts; decode steps
across the sliding window; q / k / v fused in one attn_qkv; each quirk shown to move the
logits; bad files refused by name.

The tiny file (gguf_tools.tiny_mimo2) has 4 blocks: a dense first one, then MoE blocks
with a selection bias; blocks 1 and 2 attend a window of 8 positions with their own rope
base, 8 heads / 2 kv heads and a sink logit per head, blocks 0 and 3 everything with 4 / 1;
keys 128 wide, values 64, rope on 32 dims, a value scale of 0.707.
"""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest

import efedge
from gguf_tools import make_tiny
from gguf_tools.tiny_mimo2 import MIMO2_DIMS, MIMO2_LAYERS, MIMO2_SWA

pytest.importorskip("llama_cpp")
import llama_ref  # noqa: E402  (tests/ is on sys.path under pytest)
import test_parity  # noqa: E402
from test_parity import (  # noqa: E402
    _assert_decode_steps_match,
    _assert_streamed_match,
    _tokens,
)


@pytest.mark.parametrize("quant", ["F32", "Q4_K_M"])
def test_mimo2_resident_and_streamed_match_llama_cpp(tiny_gguf, quant):
    """Logits and greedy tokens within test_parity's tolerances of llama.cpp's, resident
    and (bit for bit) through a 50% cache (_assert_streamed_match); the dense first block
    never cache traffic."""
    path = tiny_gguf("mimo2", quant)
    _assert_streamed_match(path, quant)
    with efedge.load(path, cache="50%") as m:
        c = m.config
        assert c.head_counts == tuple((h, kv) for _, h, kv in MIMO2_LAYERS)
        assert (c.n_head, c.n_head_kv, c.head_dim, c.v_head_dim, c.rope_dim) == (
            8, 2, MIMO2_DIMS["k_dim"], MIMO2_DIMS["v_dim"], MIMO2_DIMS["rope_dim"])
        assert c.swa_layers == tuple(swa for swa, _, _ in MIMO2_LAYERS)
        assert c.moe_layers == (False, True, True, True)
        assert (c.gating, c.expert_weights_norm, c.expert_weights_scale) == (
            "sigmoid", True, 0.0)
        assert c.rope_swa is not None and c.rope_swa[0] == MIMO2_SWA[1]
        assert m._tf.store.moe_layers == [1, 2, 3]


def test_mimo2_decode_steps_match_llama_cpp(tiny_gguf):
    """One token at a time past the window: every step's logits are llama.cpp's."""
    _assert_decode_steps_match(tiny_gguf("mimo2", "F32"), MIMO2_SWA[0] + 16)


def test_mimo2_prefill_at_an_offset_matches_llama_cpp(tiny_gguf):
    test_parity.test_prefill_at_an_offset_matches_llama_cpp(tiny_gguf, "mimo2")


def test_mimo2_fused_qkv_matches_llama_cpp(tiny_gguf):
    """q / k / v as row ranges of one attn_qkv (llama.cpp's create_tensor_qkv)."""
    path = tiny_gguf("mimo2-fused", "F32")
    ids = _tokens(512)
    ref = llama_ref.llama_logits(path, ids)
    with efedge.load(path) as m:
        assert "attn_qkv" in m._tf.blocks[1].custom_attn.attn_q.name
        got = m.logits(ids)
    assert np.abs(got - ref).max() / ref.std() <= 2e-2
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def _off(m, ids, ref) -> float:
    return float(np.abs(m.logits(ids) - ref).max() / ref.std())


QUIRKS = ["value_scale", "sinks", "window", "rope_swa", "exp_probs_b", "weights_norm",
          "weights_scale"]


def test_mimo2_quirks_decide(tiny_gguf):
    """Without the value scale, the sinks, the window, the window layers' rope base, the
    selection bias or the weights' renormalisation — or with the file's
    expert_weights_scale, which llama.cpp never reads — efedge is off from llama.cpp by far
    more than the tolerance: the parity tests above see each of them. (The per-layer head
    counts and value heads are shapes: a file read otherwise does not load.)"""
    path = tiny_gguf("mimo2", "F32")
    ids = _tokens(512)
    ref = llama_ref.llama_logits(path, ids)
    with efedge.load(path) as m:
        tf, c = m._tf, m.config
        assert _off(m, ids, ref) <= 2e-2
        for quirk in QUIRKS:
            saved = [(b, dict(vars(b)), dict(vars(b.custom_attn))) for b in tf.blocks]
            attns = [b.custom_attn for b in tf.blocks]
            if quirk == "value_scale":
                for a in attns:
                    a.value_scale = np.float32(0.0)
            elif quirk == "sinks":
                for a in attns:
                    a.sinks = np.full_like(a.sinks, -np.inf)
            elif quirk == "window":
                for a in attns:
                    a.window = 0
            elif quirk == "exp_probs_b":
                for b in tf.blocks:
                    b.exp_probs_b = None
            else:
                tf.cfg = dataclasses.replace(c, **{
                    "rope_swa": dict(rope_swa=None),
                    "weights_norm": dict(expert_weights_norm=False),
                    "weights_scale": dict(expert_weights_scale=2.0)}[quirk])
                tf._rope.clear()
            assert _off(m, ids, ref) > 0.1, quirk
            tf.cfg = c
            tf._rope.clear()
            for b, attrs, attn in saved:
                vars(b).update(attrs)
                vars(b.custom_attn).update(attn)


def _write(tmp_path, monkeypatch, method: str, value=None):
    """The tiny mimo2 file with one GGUFWriter call dropped (value None) or replaced."""
    monkeypatch.setattr(gguf.GGUFWriter, method,
                        lambda w, *a: None if value is None else value(w))
    return make_tiny.write_tiny(tmp_path / "bad.gguf", "mimo2", "F32")


@pytest.mark.parametrize("method, key", [
    ("add_sliding_window", "mimo2.attention.sliding_window"),
    ("add_sliding_window_pattern", "mimo2.attention.sliding_window_pattern"),
    ("add_expert_feed_forward_length", "mimo2.expert_feed_forward_length")])
def test_mimo2_missing_key_is_named(tmp_path, monkeypatch, method, key):
    """Keys llama.cpp's mimo2 loader requires: a file without one is refused by name."""
    path = _write(tmp_path, monkeypatch, method)
    with pytest.raises(efedge.ModelFormatError, match=key):
        efedge.load(path)


def test_mimo2_bad_head_counts_are_refused(tmp_path, monkeypatch):
    """A head_count array of the wrong length, or a layer whose heads are no multiple of
    its kv heads, is refused by key."""
    path = _write(tmp_path, monkeypatch, "add_head_count",
                  lambda w: w.add_array("mimo2.attention.head_count", [4, 8, 8]))
    with pytest.raises(efedge.ModelFormatError, match="head_count"):
        efedge.load(path)
    monkeypatch.undo()
    path = _write(tmp_path, monkeypatch, "add_head_count_kv",
                  lambda w: w.add_array("mimo2.attention.head_count_kv", [1, 3, 2, 1]))
    with pytest.raises(efedge.ModelFormatError, match="layer 1"):
        efedge.load(path)


def test_mimo2_on_cuda_is_refused_by_name(tiny_gguf):
    from efedge.gpu import load_cuda_model

    pytest.importorskip("torch")
    with pytest.raises(efedge.UnsupportedModelError, match="mimo2"):
        load_cuda_model(tiny_gguf("mimo2", "F32"), device="cpu")
