"""afmoe (Arcee Trinity) against llama.cpp: logits (prefill) and greedy tokens (the
one-token path), resident and through an expert cache of half the experts; decode steps
across the sliding window; each quirk shown to move the logits; bad files refused by name.

The tiny file (gguf_tools.tiny_afmoe) has 4 blocks: a dense first one, then MoE blocks
with a selection bias and a shared expert; blocks 0-2 attend a window of 8 positions
with their own rope base, block 3 everything without rope.
"""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest

import efedge
from gguf_tools import make_tiny
from gguf_tools.tiny_afmoe import AFMOE_SWA

pytest.importorskip("llama_cpp")
import llama_ref  # noqa: E402  (tests/ is on sys.path under pytest)
import test_parity  # noqa: E402
from test_parity import (  # noqa: E402
    _assert_decode_steps_match,
    _assert_streamed_match,
    _tokens,
)


@pytest.mark.parametrize("quant", ["F32", "Q4_K_M"])
def test_afmoe_resident_and_streamed_match_llama_cpp(tiny_gguf, quant):
    """Logits and greedy tokens within test_parity's tolerances of llama.cpp's, resident
    and (bit for bit) through a 50% cache (_assert_streamed_match)."""
    _assert_streamed_match(tiny_gguf("afmoe", quant), quant)


def test_afmoe_decode_steps_match_llama_cpp(tiny_gguf):
    """One token at a time past the window: every step's logits are llama.cpp's."""
    _assert_decode_steps_match(tiny_gguf("afmoe", "F32"), AFMOE_SWA[0] + 16)


def test_afmoe_prefill_at_an_offset_matches_llama_cpp(tiny_gguf):
    """Prefills that reuse the KV cache's prefix (grow, shrink, regrow) start past the
    window: each one's last logits are llama.cpp's."""
    test_parity.test_prefill_at_an_offset_matches_llama_cpp(tiny_gguf, "afmoe")


def _off(m, ids, ref) -> float:
    return float(np.abs(m.logits(ids) - ref).max() / ref.std())


QUIRKS = ["attn_gate", "post_norms", "mup", "exp_probs_b", "nope", "window", "rope_swa",
          "weights_scale"]


def test_afmoe_quirks_decide(tiny_gguf):
    """The tiny file shows every quirk: without the attention gate, the post norms, the
    √n_embd embedding scale, the selection bias, the NoPE layer, the window, the window
    layers' rope base or the weights scale, efedge is off from llama.cpp by far more than
    the tolerance — so the parity tests above see each of them."""
    path = tiny_gguf("afmoe", "F32")
    ids = _tokens(512)
    ref = llama_ref.llama_logits(path, ids)
    with efedge.load(path) as m:
        tf, c = m._tf, m.config
        assert (c.n_layer, c.n_dense_lead, c.sliding_window, c.swa_pattern) == (4, 1, 8, 4)
        assert [c.is_swa_layer(il) for il in range(4)] == [True, True, True, False]
        assert [c.is_nope_layer(il) for il in range(4)] == [False, False, False, True]
        assert (c.gating, c.expert_weights_norm, c.embd_scale) == ("sigmoid", True, 16.0)
        assert c.rope_swa is not None and c.rope_swa[0] == AFMOE_SWA[2]
        assert c.n_ff_shexp == c.n_ff_exp
        assert _off(m, ids, ref) <= 2e-2
        for quirk in QUIRKS:
            saved = [(b, dict(vars(b))) for b in tf.blocks]
            if quirk == "attn_gate":
                for b in tf.blocks:
                    b.attn_gate = None
            elif quirk == "post_norms":
                for b in tf.blocks:
                    b.attn_post_norm = b.ffn_post_norm = None
            elif quirk == "exp_probs_b":
                for b in tf.blocks:
                    b.exp_probs_b = None
            else:
                tf.cfg = dataclasses.replace(c, **{
                    "mup": dict(embd_scale=1.0), "nope": dict(nope_step=0),
                    "window": dict(sliding_window=0), "rope_swa": dict(rope_swa=None),
                    "weights_scale": dict(expert_weights_scale=0.0)}[quirk])
                tf._rope.clear()
            assert _off(m, ids, ref) > 0.1, quirk
            tf.cfg = c
            tf._rope.clear()
            for b, attrs in saved:
                vars(b).update(attrs)


def _write(tmp_path, monkeypatch, method: str, value=None):
    """The tiny afmoe file with one GGUFWriter call dropped (value None) or given value."""
    monkeypatch.setattr(gguf.GGUFWriter, method,
                        lambda w, *a: None if value is None else value(w))
    return make_tiny.write_tiny(tmp_path / "bad.gguf", "afmoe", "F32")


@pytest.mark.parametrize("method, key", [
    ("add_sliding_window", "afmoe.attention.sliding_window"),
    ("add_expert_shared_count", "afmoe.expert_shared_count")])
def test_afmoe_missing_key_is_named(tmp_path, monkeypatch, method, key):
    """llama.cpp cannot run an afmoe file without a window (its graph needs the
    sliding-window cache: it crashes) or without expert_shared_count (it refuses it)."""
    path = _write(tmp_path, monkeypatch, method)
    with pytest.raises(efedge.ModelFormatError, match=key):
        efedge.load(path)


def test_afmoe_zero_window_is_refused(tmp_path, monkeypatch):
    path = _write(tmp_path, monkeypatch, "add_sliding_window",
                  lambda w: w.add_uint32("afmoe.attention.sliding_window", 0))
    with pytest.raises(efedge.ModelFormatError, match="sliding_window"):
        efedge.load(path)


def test_afmoe_on_cuda_is_refused_by_name(tiny_gguf):
    from efedge.gpu import load_cuda_model

    pytest.importorskip("torch")
    with pytest.raises(efedge.UnsupportedModelError, match="afmoe"):
        load_cuda_model(tiny_gguf("afmoe", "F32"), device="cpu")
