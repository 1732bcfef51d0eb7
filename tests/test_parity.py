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


@pytest.mark.parametrize("quant", FLOAT_QUANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_float_logits_match_llama_cpp(tiny_gguf, arch, quant):
    ours, ref = _compare(tiny_gguf(arch, quant))
    rel = np.abs(ours - ref).max() / ref.std()
    assert rel <= 2e-2, f"max|Δ|/std = {rel:.3g}"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_logits_match_llama_cpp(tiny_gguf, arch, quant):
    ours, ref = _compare(tiny_gguf(arch, quant))
    cos = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    assert cos.min() >= 0.995, f"min cosine {cos.min():.5f}"
    assert agree >= 0.9, f"argmax agreement {agree:.2f}"


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_continuation_matches_llama_cpp(tiny_gguf, arch):
    path = tiny_gguf(arch, "F32")
    with efedge.load(path) as m:
        prompt = _tokens(m.n_vocab, 8, seed=3)
        ours = []
        for piece_tok in _greedy_ids(m, prompt, 32):
            ours.append(piece_tok)
    ref = llama_ref.llama_greedy(path, prompt, 32)
    assert ours == ref


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
