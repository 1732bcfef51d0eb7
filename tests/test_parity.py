"""efedge's forward pass against llama.cpp (llama-cpp-python) on the same GGUF files.

F32/F16: max|Δ| / std(logits) ≤ 2e-2 and identical argmax at every position.
Quantized: cosine ≥ 0.995 and argmax agreement ≥ 90% (llama.cpp quantizes activations to
8 bits for its dot products, so near-tied routing can flip; efedge computes exactly).
"""

from __future__ import annotations

import numpy as np
import pytest

import efedge

pytest.importorskip("llama_cpp")
import llama_ref  # noqa: E402  (tests/ is on sys.path under pytest)

ARCHS = ["llama", "mixtral", "qwen2moe", "qwen3moe", "olmoe", "qwen2", "qwen3"]
FLOAT_QUANTS = ["F32", "F16"]
QUANTS = ["Q8_0", "Q4_0", "Q4_K_M", "Q6_K", "Q2_K", "IQ4_NL"]
N_TOKENS = 32


def _tokens(n_vocab: int, n: int = N_TOKENS, seed: int = 7) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_vocab, size=n).tolist()


def _compare(path):
    with efedge.load(path) as m:
        ids = _tokens(m.n_vocab)
        ours = m.logits(ids)
    ref = llama_ref.llama_logits(path, ids)
    assert ours.shape == ref.shape
    assert np.isfinite(ours).all()
    return ours, ref


def _assert_float_match(path) -> None:
    ours, ref = _compare(path)
    rel = np.abs(ours - ref).max() / ref.std()
    assert rel <= 2e-2, f"max|Δ|/std = {rel:.3g}"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def _assert_quantized_match(path) -> None:
    ours, ref = _compare(path)
    cos = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    assert cos.min() >= 0.995, f"min cosine {cos.min():.5f}"
    assert agree >= 0.9, f"argmax agreement {agree:.2f}"


def _assert_greedy_match(path) -> None:
    with efedge.load(path) as m:
        prompt = _tokens(m.n_vocab, 8, seed=3)
        ours = _greedy_ids(m, prompt, 32)
    assert ours == llama_ref.llama_greedy(path, prompt, 32)


@pytest.mark.parametrize("quant", FLOAT_QUANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_float_logits_match_llama_cpp(tiny_gguf, arch, quant):
    _assert_float_match(tiny_gguf(arch, quant))


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_logits_match_llama_cpp(tiny_gguf, arch, quant):
    _assert_quantized_match(tiny_gguf(arch, quant))


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_continuation_matches_llama_cpp(tiny_gguf, arch):
    _assert_greedy_match(tiny_gguf(arch, "F32"))


def _greedy_ids(m: efedge.Model, prompt: list[int], n: int) -> list[int]:
    """Greedy ids through the same prefill / decode path that generate() uses (EOG ignored,
    as llama_greedy does)."""
    session = m._session
    session.reset()
    logits = session.prefill(prompt)
    out = []
    for _ in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        logits = session.decode(tok)
    return out


# -- issue 10: granitemoe, deepseek2, gpt-oss --------------------------------------------
# Each at F32 / F16 and at the quant type its real checkpoints use (Q4_K_M; gpt-oss: MXFP4
# experts with Q8_0 elsewhere, llama.cpp's MXFP4_MOE). The variants at F32 only: granite
# with a shared expert, DeepSeek-V3-style routing (sigmoid, selection bias, groups) and the
# legacy unsplit attn_kv_b layout.
NEW_ARCHS = ["granitemoe", "deepseek2", "gpt-oss"]
NEW_FLOAT = [(a, q) for a in NEW_ARCHS for q in FLOAT_QUANTS] + [
    ("granitemoeshared", "F32"), ("deepseek2-v3", "F32"), ("deepseek2-legacy", "F32")]
NEW_QUANT = [("granitemoe", "Q4_K_M"), ("deepseek2", "Q4_K_M"), ("gpt-oss", "MXFP4_MOE")]


@pytest.mark.parametrize("arch, quant", NEW_FLOAT)
def test_new_arch_float_logits_match_llama_cpp(tiny_gguf, arch, quant):
    _assert_float_match(tiny_gguf(arch, quant))


@pytest.mark.parametrize("arch, quant", NEW_QUANT)
def test_new_arch_quantized_logits_match_llama_cpp(tiny_gguf, arch, quant):
    _assert_quantized_match(tiny_gguf(arch, quant))


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_new_arch_greedy_continuation_matches_llama_cpp(tiny_gguf, arch):
    _assert_greedy_match(tiny_gguf(arch, "F32"))


@pytest.mark.parametrize("arch", ["deepseek2", "gpt-oss"])
def test_new_arch_expert_cache_is_exact(tiny_gguf, arch):
    """Through a small expert cache the logits are the resident ones bit for bit: the
    dense leading layer and the shared experts (deepseek2) are never cache traffic, the
    expert biases (gpt-oss) stay resident beside the router."""
    path = tiny_gguf(arch, "F32")
    ids = _tokens(512, 24, seed=5)
    with efedge.load(path) as m:
        want = m.logits(ids)
    with efedge.load(path, cache="30%", policy="expertflow") as m:
        got = m.logits(ids)
        store, stats = m._tf.store, m.stats()
    assert np.array_equal(got, want)
    dense = [il for il in range(m.config.n_layer) if not m.config.is_moe_layer(il)]
    assert all(store.expert_bytes(il) == 0 for il in dense)
    assert dense == ([0] if arch == "deepseek2" else [])
    per_expert = store.expert_bytes(store.moe_layers[0])  # one size: an F32 file
    assert stats["bytes_loaded"] > 0 and stats["bytes_loaded"] % per_expert == 0


# -- rope scaling (llama.cpp applies it to every architecture) ---------------------------
# YaRN as DeepSeek-V2(-Lite) (with yarn_log_multiplier: scores scaled by mscale²), gpt-oss
# (cos / sin scaled by mscale; here also its own rope base on the sliding-window layers)
# and qwen3moe files carry it; linear scaling with an attn_factor; llama-3's
# rope_freqs.weight. The tiny files put YaRN's ramp mid-way through the rope dims.
ROPE_CASES = [("deepseek2", dict(rope_scaling="yarn")),
              ("gpt-oss", dict(rope_scaling="yarn", rope_base_swa=5000.0)),
              ("qwen3moe", dict(rope_scaling="yarn")),
              ("mixtral", dict(rope_scaling="linear")),
              ("mixtral", dict(rope_scaling="llama3"))]


def _case_id(case) -> str:
    return f"{case[0]}-{case[1]['rope_scaling']}"


@pytest.mark.parametrize("arch, kw", ROPE_CASES, ids=[_case_id(c) for c in ROPE_CASES])
def test_rope_scaling_logits_match_llama_cpp(tiny_gguf, arch, kw):
    _assert_float_match(tiny_gguf(arch, "F32", n_layer=2, **kw))


@pytest.mark.parametrize("arch, kw", ROPE_CASES[:3], ids=[_case_id(c) for c in ROPE_CASES[:3]])
def test_rope_scaling_greedy_matches_llama_cpp(tiny_gguf, arch, kw):
    _assert_greedy_match(tiny_gguf(arch, "F32", n_layer=2, **kw))


def test_unsupported_rope_scaling_is_refused(tmp_path, monkeypatch):
    """A rope scaling type efedge does not compute (longrope) is named, not ignored."""
    import gguf

    from gguf_tools import make_tiny

    plain = make_tiny._write_rope_scaling

    def longrope(w, cfg, arch):
        plain(w, cfg, arch)
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)

    monkeypatch.setattr(make_tiny, "_write_rope_scaling", longrope)
    path = make_tiny.write_tiny(tmp_path / "longrope.gguf", "gpt-oss", "F32", n_layer=1)
    with pytest.raises(efedge.UnsupportedModelError, match="rope.scaling.type.*longrope"):
        efedge.load(path)


@pytest.mark.parametrize("arch", ["deepseek2", "gpt-oss"])
def test_cache_aware_routing_is_refused_for_non_softmax_routing(tiny_gguf, arch):
    """Cache-aware routing swaps experts by router probability: deepseek2's and gpt-oss's
    routing has no such single probability, so asking for it is refused by name."""
    path = tiny_gguf(arch, "F32")
    with pytest.raises(efedge.UnsupportedModelError, match="cache-aware.*" + arch):
        efedge.load(path, cache="30%", routing="cache-aware")


# -- prompts at an offset, and long prompts ----------------------------------------------
# A chat turn prefills only what is new: T > 1 tokens at a position > 0 (the cached prefix
# reused), through every attention kind (fused, deepseek2's MLA, gpt-oss's sinks with the
# sliding window crossed). The last logits equal llama.cpp's for the whole sequence.
@pytest.mark.parametrize("arch", ["qwen3moe", "deepseek2", "gpt-oss"])
def test_prefill_at_an_offset_matches_llama_cpp(tiny_gguf, arch):
    path = tiny_gguf(arch, "F32")
    ids = _tokens(512, 40, seed=9)
    ref = llama_ref.llama_logits(path, ids)
    with efedge.load(path) as m:
        s = m._session
        s.reset()
        got = {n: s.prefill(ids[:n]) for n in (5, 17, 40, 12, 33)}  # grow, shrink, regrow
    for n, row in got.items():
        rel = np.abs(row - ref[n - 1]).max() / ref.std()
        assert rel <= 2e-2 and row.argmax() == ref[n - 1].argmax(), f"n={n}: {rel:.3g}"


@pytest.mark.parametrize("arch", ["qwen3moe", "deepseek2", "gpt-oss", "granitemoe"])
def test_long_prompt_matches_llama_cpp(tiny_gguf, arch):
    """1000 tokens (past every tile of 8, 256 and llama.cpp's batch of 512), then greedy
    decode. A random model has a few near-tied routings in 1000 positions (a gap of 1e-5
    between the k-th and k+1-th router logit), where 1e-6 of rounding picks another expert:
    those rows may differ, no more than 1% of them."""
    path = tiny_gguf(arch, "F32", n_ctx=2048)
    ids = _tokens(512, 1000, seed=11)
    ref = llama_ref.llama_logits(path, ids, n_ctx=1100)
    with efedge.load(path, n_ctx=1100) as m:
        ours = m.logits(ids)
        greedy = _greedy_ids(m, ids[:513], 12)
    rel = np.abs(ours - ref).max(-1) / ref.std()
    assert (rel > 2e-2).mean() <= 0.01, f"rows off: {np.flatnonzero(rel > 2e-2)}"
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.99
    assert greedy == llama_ref.llama_greedy(path, ids[:513], 12, n_ctx=1100)


# -- gpt-oss's experts in one kernel call (moe_ffn_oai / decode_ffn_oai) -------------------
def _prefill_and_decode(m: efedge.Model, prompt: list[int], n: int):
    """(prompt logits [T, V], greedy ids, the decode steps' logits [n, V])."""
    want = m.logits(prompt)
    session = m._session
    session.reset()
    logits = session.prefill(prompt)
    ids, steps = [], []
    for _ in range(n):
        tok = int(np.argmax(logits))
        ids.append(tok)
        logits = session.decode(tok)
        steps.append(np.array(logits, np.float32).reshape(-1))
    return want, ids, np.stack(steps)


@pytest.mark.parametrize("budget", ["25%", "100%"])
def test_gpt_oss_mxfp4_streamed_equals_resident_and_llama_cpp(tiny_gguf, budget):
    """gpt-oss with MXFP4 experts (llama.cpp's MXFP4_MOE): the resident experts (every
    expert of a layer in one kernel call, prefill and decode) and the expert cache at
    25% / 100% of the expert bytes (experts as the cache hands them out) give the same
    logits bit for bit, prompt and every decode step; the greedy tokens are llama.cpp's."""
    path = tiny_gguf("gpt-oss", "MXFP4_MOE")
    with efedge.load(path) as m:
        prompt = _tokens(m.n_vocab, 12, seed=9)
        want = _prefill_and_decode(m, prompt, 16)
    with efedge.load(path, cache=budget, policy="expertflow") as m:
        got = _prefill_and_decode(m, prompt, 16)
        loaded = m.stats()["bytes_loaded"]
    assert np.array_equal(got[0], want[0])
    assert got[1] == want[1]
    assert np.array_equal(got[2], want[2])
    assert loaded > 0
    _assert_greedy_until_tie(want[1], want[2], llama_ref.llama_greedy(path, prompt, 16))


def _assert_greedy_until_tie(ours: list[int], steps: np.ndarray, ref: list[int]) -> None:
    """Quantized greedy runs: our tokens are llama.cpp's until a step where llama.cpp's
    token is tied with ours in our logits (within 2% of their std). llama.cpp sums the
    MXFP4 products in another order; on a random tiny model a decode step's top two
    logits can be closer than that (seen: 0.006 apart, std 2)."""
    # steps[i]: the logits after token i, which choose token i + 1
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        if a != b:
            assert i > 0, "the first token differs"
            row = steps[i - 1]
            assert row[a] - row[b] <= 0.02 * row.std(), (i, a, b, float(row[a] - row[b]))
            return


def test_gpt_oss_decode_steps_match_llama_cpp(tiny_gguf):
    """gpt-oss's fused one-token step (sinks, the sliding window crossed, biases, router
    top-k then softmax, the experts' kernel): every decode step's logits are llama.cpp's
    for the same sequence."""
    from gguf_tools.tiny_archs import OSS_WINDOW

    path = tiny_gguf("gpt-oss", "F32")
    ids = _tokens(512, OSS_WINDOW + 24, seed=13)
    ref = llama_ref.llama_logits(path, ids)
    with efedge.load(path) as m:
        s = m._session
        s.reset()
        rows = [np.asarray(s.prefill(ids[:4])).reshape(-1)]
        rows += [np.asarray(s.decode(t)).reshape(-1) for t in ids[4:-1]]
    got = np.stack(rows)
    ref = ref[3:-1]  # the logits after ids[3] .. ids[-2]
    rel = np.abs(got - ref).max(-1) / ref.std()
    assert (rel <= 2e-2).all(), f"steps off: {np.flatnonzero(rel > 2e-2)} {rel.max():.3g}"
    assert (got.argmax(-1) == ref.argmax(-1)).all()
