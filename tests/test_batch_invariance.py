"""A prompt's logits do not depend on how it was batched: split into chunks of two tokens
or more, or with a prefix reused from the KV cache, they are bit for bit those of the
whole prompt evaluated at once (a repeated greedy request gives the same text)."""

from __future__ import annotations

import numpy as np
import pytest

import efedge
from efedge import kernels
from efedge.demo import demo_model_path

N = 19  # prompt tokens: splits below leave tails of 1-3 tokens beside full groups of 4
SPLITS = ([N - 2, 2], [N - 3, 3], [7, N - 7], [5, 6, N - 11])


def _last_logits(m, ids, splits) -> np.ndarray:
    tf = m._tf
    kv = tf.new_kv_cache(64)
    pos = 0
    for s in splits:
        out = tf.forward(ids[pos:pos + s], pos, kv, m._experts, all_logits=False)
        pos += s
    return out[-1]


def _check_splits(path, **load_kw) -> None:
    with efedge.load(path, **load_kw) as m:
        ids = np.random.default_rng(3).integers(3, m.n_vocab, N).tolist()
        whole = _last_logits(m, ids, [N])
        for splits in SPLITS:
            got = _last_logits(m, ids, splits)
            assert np.array_equal(got, whole), (
                f"{splits}: max |Δ| {np.abs(got - whole).max():.3g}")


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "deepseek2", "mixtral"])
def test_a_prompt_split_into_batches_gives_the_logits_of_the_whole(tiny_gguf, arch):
    # F32: the float tiled product (its last tokens and rows padded into the same 4 x 4
    # kernel); qwen2moe: the shared expert's gate; deepseek2: the per-head products
    _check_splits(tiny_gguf(arch, "F32"))


def test_the_demo_model_split_into_batches_resident_and_streamed():
    _check_splits(demo_model_path())  # F16 rows
    _check_splits(demo_model_path(), cache="30%", policy="expertflow")


@pytest.mark.requires_llama_cpp
def test_a_quantized_prompt_split_into_batches(tiny_gguf):
    _check_splits(tiny_gguf("qwen3moe", "Q4_K_M"))  # the integer tiled product


@pytest.mark.parametrize("qtype", [0, 1, 30])  # F32, F16, BF16: the generic float product
def test_the_float_product_of_a_token_does_not_depend_on_the_batch(qtype):
    rng = np.random.default_rng(qtype)
    rows, n = 37, 96  # rows not a multiple of 4
    w32 = rng.standard_normal((rows, n)).astype(np.float32)
    if qtype == 0:
        raw = w32.view(np.uint8)
    elif qtype == 1:
        raw = w32.astype(np.float16).view(np.uint8)
    else:
        raw = (w32.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    x = rng.standard_normal((11, n)).astype(np.float32)
    whole = kernels.matmul(raw, qtype, x)
    for t in range(2, 11):
        for start in (0, 11 - t):
            part = kernels.matmul(raw, qtype, np.ascontiguousarray(x[start:start + t]))
            assert np.array_equal(part, whole[start:start + t]), (t, start)


def test_a_repeated_prompt_gives_the_logits_of_a_fresh_session():
    with efedge.load(demo_model_path()) as m:
        ids = m.tokenize("The old lighthouse keeper counted the ships that passed")
        fresh = m._session.prefill(ids).copy()
        m.generate(ids, max_tokens=6, temperature=0.0)  # the cache holds prompt + output
        again = m._session.prefill(ids)
        assert np.array_equal(again, fresh), np.abs(again - fresh).max()
        assert m._session.tokens == ids
        # a longer prompt that starts with this one reuses its prefix the same way
        longer = ids + m.tokenize(" and the", add_special=False)
        m._session.reset()
        ref = m._session.prefill(longer).copy()
        m._session.reset()
        m._session.prefill(ids)
        assert np.array_equal(m._session.prefill(longer), ref)


def test_a_repeated_greedy_request_gives_the_same_text():
    with efedge.load(demo_model_path()) as m:
        prompt = "Once upon a time, in a small village by the sea,"
        first = m.generate(prompt, max_tokens=24, temperature=0.0)
        for _ in range(2):
            assert m.generate(prompt, max_tokens=24, temperature=0.0) == first
