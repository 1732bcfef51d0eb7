"""efedge against llama.cpp where test_parity.py's prompts are short: long prompts on the
archs and quant types it checks at 32 tokens, rope scaling past the original context,
gpt-oss at its real window of 128, prompts in pieces and through generate()'s prefix
reuse, and long greedy runs.

Tolerances are test_parity's. At F32 a random tiny model has a few near-tied routings
in hundreds of positions (a router gap of ~1e-5, where float summation order picks the
other expert): such a row may be off, no more than 1% of them. Quantized files: llama.cpp
and efedge round activations to 8 bits alike, so the first rows agree to the last bits;
once attention sums differ in the last place, the 8-bit rounding turns that into
differences of a few % of the logits' spread (measured: a median of 0.04-0.1 of the std,
flat from position 32 to 600), and a near-tied routing, which now flips more often, moves
a row by up to a few spreads (≤3% of the rows on llama4 / glm4moe Q4_K_M). What would be a
fault: the error growing with position, or whole stretches off.
"""

from __future__ import annotations

import numpy as np
import pytest

import efedge

pytest.importorskip("llama_cpp")
import llama_ref  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.requires_llama_cpp


def _tokens(n: int, seed: int = 11) -> list[int]:
    return np.random.default_rng(seed).integers(0, 512, size=n).tolist()


def _rel(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """max|Δ| / std(ref) per row."""
    return np.abs(ours - ref).max(-1) / ref.std()


def _assert_float_rows(ours: np.ndarray, ref: np.ndarray) -> None:
    rel = _rel(ours, ref)
    off = rel > 2e-2
    assert off.mean() <= 0.01, f"rows off: {np.flatnonzero(off)} (worst {rel.max():.3g})"
    assert (ours.argmax(-1) == ref.argmax(-1))[~off].mean() >= 0.99


def _pieces_and_steps(m: efedge.Model, ids: list[int], cuts: tuple[int, ...], n_steps: int):
    """The last logits of ids[:c] for each cut (the KV cache reused between them: prefill
    at an offset), then one-token decode steps over the last n_steps tokens but one."""
    s = m._session
    s.reset()
    pieces = [np.asarray(s.prefill(ids[:c])).reshape(-1) for c in cuts]
    start = len(ids) - n_steps
    rows = [np.asarray(s.prefill(ids[:start])).reshape(-1)]
    rows += [np.asarray(s.decode(t)).reshape(-1) for t in ids[start:-1]]
    return pieces, np.stack(rows)


def _check_long(path, n: int, n_ctx: int) -> None:
    """n tokens in one call, in three growing pieces and the last 16 one at a time: all
    llama.cpp's logits for the whole sequence (F32 tolerances)."""
    ids = _tokens(n)
    ref = llama_ref.llama_logits(path, ids, n_ctx=n_ctx)
    cuts = (n // 3, 2 * n // 3 + 1, n)
    with efedge.load(path, n_ctx=n_ctx) as m:
        ours = m.logits(ids)
        pieces, steps = _pieces_and_steps(m, ids, cuts, 16)
    _assert_float_rows(ours, ref)
    for c, row in zip(cuts, pieces, strict=True):
        assert _rel(row, ref[c - 1]) <= 2e-2, f"prefill of {c} tokens in pieces"
    # (a near-tied routing may flip one of these 16 steps where the batched row did not)
    _assert_float_rows(steps, ref[n - 17:n - 1])


# -- long prompts on the archs test_long_prompt_matches_llama_cpp does not run -----------
# (700 tokens: llama.cpp's ubatch of 512 crossed; llama4's chunks and NoPE temperature
# only act past 8191, test_llama4 runs those)
LONG_ARCHS = ["mixtral", "qwen3vlmoe"]
LONG_ARCHS_SLOW = ["llama4", "minimax-m2", "qwen2moe", "phimoe", "olmoe", "qwen2", "qwen3",
                   "llama", "granitemoeshared",
                   "bailingmoe", "bailingmoe2", "deepseek2-v3", "deepseek2-legacy", "dots1",
                   "ernie4_5-moe", "glm4moe-qknorm", "hunyuan-moe", "smallthinker",
                   "smallthinker-softmax", "llama4-maverick"]


@pytest.mark.parametrize("arch", LONG_ARCHS + [pytest.param(a, marks=pytest.mark.slow)
                                               for a in LONG_ARCHS_SLOW])
def test_long_prompt_in_pieces_matches_llama_cpp(tiny_gguf, arch):
    _check_long(tiny_gguf(arch, "F32", n_ctx=2048), 700, 768)


# -- rope scaling past the original context (256 here) ------------------------------------
ROPE_LONG = [("deepseek2", dict(rope_scaling="yarn")),
             ("gpt-oss", dict(rope_scaling="yarn", rope_base_swa=5000.0)),
             ("qwen3moe", dict(rope_scaling="yarn")),
             ("mixtral", dict(rope_scaling="llama3")),
             ("glm4moe", dict(rope_scaling="yarn"))]
ROPE_LONG_SLOW = [("mixtral", dict(rope_scaling="linear"))]


@pytest.mark.parametrize("arch, kw", ROPE_LONG + [
    pytest.param(a, kw, marks=pytest.mark.slow) for a, kw in ROPE_LONG_SLOW],
    ids=[f"{a}-{kw['rope_scaling']}" for a, kw in ROPE_LONG + ROPE_LONG_SLOW])
def test_rope_scaling_past_the_original_context(tiny_gguf, arch, kw):
    """Files whose original context is 256, run to 600 (YaRN's ramp, linear scaling's
    factor and llama-3's frequency factors at positions the model was not trained on)."""
    _check_long(tiny_gguf(arch, "F32", n_layer=2, n_ctx=256, **kw), 600, 640)


# -- gpt-oss at its real sliding window ---------------------------------------------------
def test_gpt_oss_window_of_128_matches_llama_cpp(tiny_gguf, tmp_path):
    """The tiny files' window is 8; real gpt-oss has 128. With 128: 400 tokens (the window
    crossed three times, and by llama.cpp's 256-row KV padding), in pieces cut inside and
    past the window, and decode steps from position 384 on."""
    from test_parity import _copy_with

    path = tmp_path / "oss-128.gguf"
    _copy_with(tiny_gguf("gpt-oss", "F32", n_ctx=2048), path, {},
               {"gpt-oss.attention.sliding_window": 128})
    with efedge.load(path) as m:
        assert m.config.sliding_window == 128
    _check_long(path, 400, 512)


# -- generate(): a second prompt sharing a prefix with the cached sequence ----------------
@pytest.mark.parametrize("arch", ["gpt-oss", "deepseek2",
                                  pytest.param("qwen3moe", marks=pytest.mark.slow)])
def test_generate_reusing_a_prefix_matches_llama_cpp(tiny_gguf, arch):
    """generate() keeps the KV cache of its prompt and output; the next prompt reuses
    the common prefix (grown past it, then cut back inside the first prompt). Each run's
    greedy tokens are llama.cpp's for the whole prompt, and a fresh model's."""
    path = tiny_gguf(arch, "F32", n_ctx=2048)
    ids = _tokens(400, seed=21)
    with efedge.load(path, n_ctx=768) as m:
        m.generate(ids[:300], max_tokens=12, temperature=0)
        grown = list(m._session.tokens) + ids[300:330]
        prompts = [grown, ids[:150] + ids[350:400]]
        reused = []
        for p in prompts:
            m.generate(p, max_tokens=12, temperature=0)
            reused.append(list(m._session.tokens)[len(p):])
    with efedge.load(path, n_ctx=768) as m:
        fresh = []
        for p in prompts:
            m._session.reset()
            m.generate(p, max_tokens=12, temperature=0)
            fresh.append(list(m._session.tokens)[len(p):])
    for p, a, b in zip(prompts, reused, fresh, strict=True):
        assert a == b
        assert a == llama_ref.llama_greedy(path, p, 13, n_ctx=768)[:len(a)]


# -- greedy decoding, long ----------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt-oss", "deepseek2",
                                  pytest.param("qwen3moe", marks=pytest.mark.slow),
                                  pytest.param("llama4", marks=pytest.mark.slow),
                                  pytest.param("glm4moe", marks=pytest.mark.slow),
                                  pytest.param("minimax-m2", marks=pytest.mark.slow),
                                  pytest.param("phimoe", marks=pytest.mark.slow),
                                  pytest.param("mixtral", marks=pytest.mark.slow)])
def test_long_greedy_run_matches_llama_cpp(tiny_gguf, arch):
    """96 greedy tokens after a 200-token prompt: llama.cpp's tokens."""
    from test_parity import _greedy_ids

    path = tiny_gguf(arch, "F32", n_ctx=2048)
    prompt = _tokens(200, seed=5)
    with efedge.load(path, n_ctx=512) as m:
        ours = _greedy_ids(m, prompt, 96)
    assert ours == llama_ref.llama_greedy(path, prompt, 96, n_ctx=512)


# -- quantized files, long ----------------------------------------------------------------
QUANT_LONG = [("qwen3moe", "Q4_K_M"), ("qwen3moe", "Q8_0"), ("gpt-oss", "MXFP4_MOE")]
QUANT_LONG_SLOW = [("qwen3moe", q) for q in ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S",
                                              "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q5_K_S",
                                              "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ2_XXS",
                                              "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S",
                                              "IQ1_M", "TQ1_0", "TQ2_0"]] + [
    ("deepseek2", "Q4_K_M"), ("llama4", "Q4_K_M"), ("glm4moe", "Q4_K_M"),
    ("phimoe", "Q4_K_M"), ("mixtral", "Q4_0")]


@pytest.mark.parametrize("arch, quant", QUANT_LONG + [
    pytest.param(a, q, marks=pytest.mark.slow) for a, q in QUANT_LONG_SLOW])
def test_quantized_long_prompt_does_not_drift(tiny_gguf, arch, quant):
    """600 tokens: the top token llama.cpp's at ≥ 95% of the positions, cosine ≥ 0.995 at
    all but 5% of them (the near-tied routings), and no drift: the median error of the
    last 150 rows within 1.3× that of rows 32-150 (measured: 0.96-1.13×)."""
    path = tiny_gguf(arch, quant, n_ctx=2048)
    ids = _tokens(600)
    ref = llama_ref.llama_logits(path, ids, n_ctx=640)
    with efedge.load(path, n_ctx=640) as m:
        ours = m.logits(ids)
    cos = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    rel = _rel(ours, ref)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
    assert (cos < 0.995).mean() <= 0.05, f"rows under 0.995: {np.flatnonzero(cos < 0.995)}"
    early, late = np.median(rel[32:150]), np.median(rel[-150:])
    assert late <= 1.3 * early + 1e-3, (early, late)
