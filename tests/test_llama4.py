"""llama4 (Llama 4 Scout 17B-16E / Maverick 17B-128E, the text path) against llama.cpp.

The tiny files (gguf_tools.tiny_archs.llama4_plan) have 4 layers: llama.cpp's layout makes
layers 0-2 chunked rope layers and layer 3 a NoPE layer with full attention. ``llama4`` is
Scout-shaped (16 experts, so llama.cpp gives it the unweighted q / k norm; experts in every
layer, one used; rope_freqs), ``llama4-maverick`` Maverick-shaped (128 experts, so no kq
norm; experts in layers 1 and 3, dense FFNs in 0 and 2; two used, so each expert's own
weighted input shows). Every expert has a shared expert beside it.

Chunked attention and the NoPE layers' query temperature only act past position 8191:
the unit tests below shrink the chunk to see the mask and the scale at work in a few
tokens; test_past_one_chunk_matches_llama_cpp runs 8300 tokens on a narrow file against
llama.cpp (4 s on an idle 2-core machine).
"""

from __future__ import annotations

import dataclasses

import llama_ref  # tests/ is on sys.path under pytest; it imports llama_cpp lazily
import numpy as np
import pytest
from test_gguf_file import _rewrite

import efedge
from efedge import layers
from efedge.config import LLAMA4_TEMP
from efedge.errors import ModelFormatError, UnsupportedModelError

ARCHS = ["llama4", "llama4-maverick"]


def _tokens(n: int, seed: int = 7) -> list[int]:
    return np.random.default_rng(seed).integers(0, 512, size=n).tolist()


# -- the mask and the temperature, directly ----------------------------------------------
def test_attention_temperature_formula():
    """llama.cpp's log(floor((pos + 1) / 8192) + 1) · 0.1 + 1: 1 up to position 8190, then
    a step at every 8192 positions, the first at 8191."""
    pos = np.array([0, 1, 8190, 8191, 8192, 16382, 16383, 100_000])
    got = layers.attn_temperature(pos, LLAMA4_TEMP)
    want = np.log(np.floor((pos + 1.0) / 8192) + 1) * 0.1 + 1
    assert got.dtype == np.float32
    assert np.allclose(got, want, rtol=0, atol=1e-7)
    assert (got[:3] == 1).all() and got[3] == got[4] < got[6]
    assert (layers.attn_temperature(pos, (0, 0.0, 0.0)) == 1).all()  # none


def test_attention_runs_split_at_chunks_and_temperature_steps():
    # a chunked layer: keys from the query's chunk start, runs cut at 8192
    assert layers.attention_runs(8100, 200, 8192, LLAMA4_TEMP, False) == [
        (0, 92, 0, 1.0), (92, 200, 8192, 1.0)]
    assert layers.attention_runs(3, 4, 0, (0, 0.0, 0.0), False) == [(0, 4, 0, 1.0)]
    # the NoPE layer: every key, runs cut where the temperature steps (at 8191)
    runs = layers.attention_runs(8189, 4, 0, LLAMA4_TEMP, True)
    assert [r[:3] for r in runs] == [(0, 2, 0), (2, 4, 0)]
    assert runs[0][3] == 1.0 and runs[1][3] == pytest.approx(1 + 0.1 * np.log(2))


def _small_layout(m, **kw):
    """m with llama4's attention layout shrunk (chunk, temperature floor) for the test."""
    m._tf.cfg = dataclasses.replace(m._tf.cfg, **kw)
    return m


@pytest.mark.parametrize("kw", [{}, {"head_dim": 16}], ids=["kernel", "numpy"])
def test_chunked_layers_see_only_their_chunk(tiny_gguf, kw):
    """Every layer chunked (chunks of 8, no NoPE layer): a position's logits depend on its
    own chunk only, whatever came before it — through the batched path (runs cut at the
    chunk boundaries; value heads of 16 take the numpy attention) and one token at a time
    (the decode kernel given the cache from the chunk start); with chunking off the
    earlier chunks change them."""
    path = tiny_gguf("llama4", "F32", **kw)
    a, b = _tokens(24, seed=1), _tokens(24, seed=2)
    b[16:] = a[16:]  # the third chunk holds the same tokens
    with efedge.load(path) as m:
        _small_layout(m, sliding_window=8, swa_pattern=5, nope_step=0)
        la, lb = m.logits(a), m.logits(b)
        s = m._session
        s.reset()
        s.prefill(b[:3])
        steps = np.stack([s.decode(t) for t in b[3:23]])
        _small_layout(m, swa_chunked=False)
        lc = m.logits(b)
    assert np.array_equal(la[16:], lb[16:])
    assert not np.allclose(la[:16], lb[:16])
    assert np.abs(steps - lb[3:23]).max() <= 1e-2 * lb.std()  # decode = batched, to rounding
    assert np.abs(lc[16:] - lb[16:]).max() > 0.1 * lb.std()


def test_nope_layer_temperature_starts_at_its_floor(tiny_gguf):
    """The temperature (floor 8 instead of 8192) leaves positions 0-6 alone and scales the
    NoPE layer's queries from position 7 on ((7 + 1) / 8 = 1), in the batched path and
    one token at a time alike."""
    path = tiny_gguf("llama4", "F32")
    ids = _tokens(20, seed=3)
    with efedge.load(path) as m:
        plain = m.logits(ids)
        _small_layout(m, attn_temp=(8, 0.5, 1.0))
        hot = m.logits(ids)
        s = m._session
        s.reset()
        s.prefill(ids[:2])
        steps = np.stack([s.decode(t) for t in ids[2:20]])
    assert np.array_equal(hot[:7], plain[:7])
    assert (np.abs(hot[7:] - plain[7:]).max(-1) > 1e-3 * plain.std()).all()
    assert np.abs(steps - hot[2:20]).max() <= 1e-2 * hot.std()


def test_batches_split_anywhere_give_the_whole_prompts_logits(tiny_gguf, monkeypatch):
    """test_batch_invariance's splits with chunks of 8 and the temperature floor at 8:
    batches that cross chunk and temperature boundaries give the whole prompt's logits
    bit for bit."""
    from test_batch_invariance import _check_splits

    import efedge.api

    real = efedge.api.config_from_gguf
    monkeypatch.setattr(efedge.api, "config_from_gguf", lambda gf: dataclasses.replace(
        real(gf), sliding_window=8, attn_temp=(8, 0.5, 1.0)))
    _check_splits(tiny_gguf("llama4", "F32"))


# -- llama.cpp parity ----------------------------------------------------------------------
@pytest.mark.requires_llama_cpp
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", ["F32", "F16"])
def test_float_logits_match_llama_cpp(tiny_gguf, arch, quant):
    from test_parity import _assert_float_match

    _assert_float_match(tiny_gguf(arch, quant))


@pytest.mark.requires_llama_cpp
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_continuation_matches_llama_cpp(tiny_gguf, arch):
    from test_parity import _assert_greedy_match

    _assert_greedy_match(tiny_gguf(arch, "F32"))


def _router_gaps(monkeypatch) -> list:
    """Records, per routed layer, each token's gap between its k-th and (k+1)-th router
    logit (sigmoid is monotonic: the same order as the probabilities)."""
    from efedge.model import Transformer

    gaps, route = [], Transformer.route_logits

    def recorded(self, blk, logits):
        k = self.cfg.n_expert_used
        top = np.sort(logits, axis=-1)[:, ::-1]
        gaps.append(top[:, k - 1] - top[:, k])
        return route(self, blk, logits)

    monkeypatch.setattr(Transformer, "route_logits", recorded)
    return gaps


def _assert_quantized_match_but_ties(path, monkeypatch) -> None:
    """test_parity's quantized rule (cosine ≥ 0.995), where a row may differ only if one
    of its layers chose its k-th expert by a router margin under 0.1 (std 3): with one or
    two experts used, 8-bit activations flipping such a choice swaps a whole expert (the
    tiny Q4_K_M files have 1-3 such rows in 32, each a near tie), and at most 10% of rows."""
    from test_parity import _compare

    gaps = _router_gaps(monkeypatch)
    ours, ref = _compare(path)
    near = np.stack([g for g in gaps if len(g) == len(ours)])  # (not the warm-up's)
    cos = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    off = cos < 0.995
    assert off.mean() <= 0.1, f"cosine per row: {np.round(cos, 3)}"
    assert (near.min(0)[off] < 0.1).all(), (np.flatnonzero(off), near.min(0)[off])
    assert (ours.argmax(-1) == ref.argmax(-1))[~off].mean() >= 0.9


@pytest.mark.requires_llama_cpp
@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_quantized_matches_llama_cpp(tiny_gguf, arch, monkeypatch):
    """Q4_K_M through an expert cache of half the experts: logits bit for bit the resident
    ones, greedy tokens the resident ones, and llama.cpp's logits (up to near-tied
    routing, _assert_quantized_match_but_ties); the dense layers of the Maverick file are
    never cache traffic."""
    from test_parity import resident_and_streamed

    path = tiny_gguf(arch, "Q4_K_M")
    (resident, greedy), (streamed, greedy_streamed), s, store = resident_and_streamed(
        path, _tokens(32), 16)
    assert np.array_equal(streamed, resident)
    assert greedy_streamed == greedy
    assert s["misses"] > 0 and s["bytes_loaded"] > 0
    assert store.moe_layers == ([0, 1, 2, 3] if arch == "llama4" else [1, 3])
    real_load = efedge.load
    monkeypatch.setattr(efedge, "load", lambda p, **kw: real_load(p, cache="50%", **kw))
    _assert_quantized_match_but_ties(path, monkeypatch)


@pytest.mark.requires_llama_cpp
@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_any_budget_gives_bitwise_identical_logits(tiny_gguf, arch):
    """test_streaming's check (the smallest budget on demand, 30% lfu, 100% lru: the
    resident logits and greedy text) on the llama4 files."""
    from test_streaming import test_any_budget_gives_bitwise_identical_logits as check

    check(tiny_gguf, arch)


@pytest.mark.requires_llama_cpp
def test_rope_base_of_chunked_layers_matches_llama_cpp(tiny_gguf):
    """rope.freq_base_swa: llama.cpp rotates the chunked layers with it."""
    from test_parity import _assert_float_match

    path = tiny_gguf("llama4", "F32", rope_base_swa=500.0)
    with efedge.load(path) as m:
        assert m.config.rope_swa is not None and m.config.rope_swa[0] == 500.0
    _assert_float_match(path)


@pytest.mark.parametrize("n_expert, kq_norm", [(16, True), (128, False), (8, True)])
def test_kq_norm_follows_llama_cpp_expert_count_rule(tiny_gguf, n_expert, kq_norm):
    """llama.cpp names the model by its expert count: 128 (Maverick) has no kq norm, every
    other count has it (its parity: the two files above). efedge inspect shows it."""
    from efedge.cli.inspect import describe

    path = tiny_gguf("llama4", "F32", n_expert=n_expert, n_layer=1)
    with efedge.load(path) as m:
        assert m.config.kq_norm is kq_norm
        assert (m._tf.blocks[0].qk_norm == "head") is kq_norm
    feats = describe(path)["features"]
    assert feats["kq_norm"] is kq_norm and feats["attention_chunk"] == 8192


@pytest.mark.requires_llama_cpp
def test_past_one_chunk_matches_llama_cpp(tmp_path):
    """8300 tokens on a narrow Scout-shaped file: past position 8191 the chunked layers see
    only the second chunk and the NoPE layer's queries take the first temperature step;
    every position within 1e-2 of the logits' spread (without the chunks the rows past
    8192 are off by whole spreads, without the temperature by up to ~7e-2), the same
    argmax. Then a prompt whose batch crosses the chunk boundary (positions 8100-8249 in
    one call) and decode steps on from there, one token at a time. Through a 50% expert
    cache: the resident logits bit for bit."""
    from gguf_tools.make_tiny import write_tiny

    path = write_tiny(tmp_path / "llama4-narrow.gguf", "llama4", "F32", n_embd=64,
                      n_head=2, n_head_kv=1, head_dim=32, n_ff=64, n_ff_exp=64)
    ids = _tokens(8300, seed=11)
    ctx = 8320
    ref = llama_ref.llama_logits(path, ids, n_ctx=ctx)
    got = []
    for budget in (None, "50%"):
        with efedge.load(path, n_ctx=ctx, cache=budget) as m:
            ours = m.logits(ids)
            s = m._session
            s.reset()
            s.prefill(ids[:8100])
            crossed = s.prefill(ids[:8250])
            steps = np.stack([s.decode(t) for t in ids[8250:8262]])
        got.append((ours, crossed, steps))
    for a, b in zip(got[0], got[1], strict=True):
        assert np.array_equal(a, b)
    ours, crossed, steps = got[0]
    rel = np.abs(ours - ref).max(-1) / ref.std()
    assert rel.max() <= 1e-2, f"rows off: {np.flatnonzero(rel > 1e-2)[:10]}"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(crossed - ref[8249]).max() <= 1e-2 * ref.std()
    assert np.abs(steps - ref[8250:8262]).max() <= 1e-2 * ref.std()
    assert (steps.argmax(-1) == ref[8250:8262].argmax(-1)).all()


# -- refusals ------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["llama4.expert_feed_forward_length",
                                 "llama4.interleave_moe_layer_step",
                                 "llama4.attention.layer_norm_rms_epsilon"])
def test_missing_required_key_is_refused_by_name(tiny_gguf, tmp_path, key):
    path = tmp_path / "missing.gguf"
    _rewrite(tiny_gguf("llama4", "F32"), path, drop_key=key)
    with pytest.raises(ModelFormatError, match=key.replace(".", r"\.")):
        efedge.load(path)


@pytest.mark.parametrize("key", ["llama4.attention.sliding_window",
                                 "llama4.attention.sliding_window_pattern"])
def test_unmatched_layouts_are_refused(tiny_gguf, tmp_path, key):
    """sliding_window 0 (llama.cpp 0.3.36 aborts on it) and a swa pattern of the file's
    own are refused by name."""
    path = tmp_path / "layout.gguf"
    _rewrite(tiny_gguf("llama4", "F32"), path, set_key=(key, 0 if key.endswith("window") else 2))
    with pytest.raises(UnsupportedModelError, match=key.replace(".", r"\.")):
        efedge.load(path)


def test_temperature_keys_are_ignored_as_llama_cpp_does(tiny_gguf, tmp_path):
    """llama.cpp 0.3.36 keeps its fixed temperature for llama4 whatever
    attention.temperature_length says (its logits past 8192 positions do not move)."""
    path = tmp_path / "temp.gguf"
    _rewrite(tiny_gguf("llama4", "F32"), path,
             set_key=("llama4.attention.temperature_length", 4))
    with efedge.load(path) as m:
        assert m.config.attn_temp == LLAMA4_TEMP


def test_cuda_and_cache_aware_routing_are_refused(tiny_gguf):
    path = tiny_gguf("llama4", "F32")
    with pytest.raises(UnsupportedModelError, match="cuda.*llama4"):
        efedge.load(path, device="cuda")
    with pytest.raises(UnsupportedModelError, match="cache-aware.*llama4"):
        efedge.load(path, cache="50%", routing="cache-aware")
