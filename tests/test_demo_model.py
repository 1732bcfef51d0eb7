"""The embedded demo model (efedge/data/demo.gguf): size, metadata, and quality through llama.cpp.

The llama.cpp parts skip when llama-cpp-python is not installed. Held-out bits per byte are
measured on ``gguf_tools.corpus.heldout_sample()`` (~500 tokens of a held-out stdlib file),
predicting every token after a leading <|endoftext|>, in windows of the training context.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import llama_ref
import pytest

from gguf_tools.corpus import EOT, heldout_sample

# EFEDGE_DEMO_GGUF checks another file (e.g. a retrained candidate) with the same tests.
DEMO = Path(os.environ.get("EFEDGE_DEMO_GGUF")
            or Path(__file__).resolve().parents[1] / "efedge" / "data" / "demo.gguf")
MAX_BYTES = 40 * 1000 * 1000


@pytest.fixture(scope="module")
def reader():
    if not DEMO.exists():
        pytest.fail(f"{DEMO} is missing: train it with python -m gguf_tools.train")
    return gguf.GGUFReader(DEMO)


def _field(r: gguf.GGUFReader, key: str):
    f = r.fields[key]
    return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()


def _llama(**kw):
    pytest.importorskip("llama_cpp")
    return llama_ref.make_llama(DEMO, verbose=False, n_threads=2, **kw)


def test_file_size():
    assert DEMO.exists()
    assert DEMO.stat().st_size <= MAX_BYTES


def test_metadata(reader):
    assert _field(reader, "general.architecture") == "qwen3moe"
    assert _field(reader, "qwen3moe.expert_count") == 64
    assert _field(reader, "qwen3moe.expert_used_count") == 8
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert "<|im_start|>" in _field(reader, "tokenizer.chat_template")
    names = {t.name for t in reader.tensors}
    n_layer = _field(reader, "qwen3moe.block_count")
    for i in range(n_layer):
        for t in ("attn_q_norm", "attn_k_norm", "ffn_gate_inp", "ffn_gate_exps",
                  "ffn_up_exps", "ffn_down_exps"):
            assert f"blk.{i}.{t}.weight" in names


def test_greedy_fib_is_code_like():
    llm = _llama(n_ctx=256)
    try:
        out = llm.create_completion("def fib(n):", max_tokens=48, temperature=0.0, top_k=1,
                                    top_p=1.0, min_p=0.0, repeat_penalty=1.0)
    finally:
        llm.close()
    text = out["choices"][0]["text"]
    assert "\n" in text, text
    assert any(s in text for s in ("return", "(", ":", "=")), text


def test_heldout_bits_per_byte(reader):
    n_ctx = int(_field(reader, "qwen3moe.context_length"))
    text = heldout_sample()
    vocab = _llama(vocab_only=True)
    eot = vocab.tokenize(EOT.encode(), add_bos=False, special=True)
    vocab.close()
    assert len(eot) == 1
    # the training report's measure (every text token predicted once, windows of the
    # training context after a leading <|endoftext|>); imported here: it brings torch
    from gguf_tools.train_eval import llama_bits_per_byte

    bpb, n_tokens = llama_bits_per_byte(DEMO, text, eot[0], n_ctx)
    assert 300 <= n_tokens + 1 <= 800
    assert bpb <= 2.5, bpb
