"""Tiny llama-architecture GGUF files carrying a test vocabulary, for tokenizer tests.

llama.cpp needs an architecture and its hyper-parameters even for a vocab-only load, so
each file is a complete 1-layer, 64-wide model with random F32 weights.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from gguf_tools.vocab import BPE_CONTROL, CHATML_TEMPLATE, BPEVocab, bpe_vocab


def write_vocab_model(path: Path, kind: str = "bpe", pre: str | None = "gpt-2",
                      n_vocab: int = 512, add_bos: bool | None = None,
                      extra_tokens: list[tuple[str, int]] | None = None,
                      bpe: BPEVocab | None = None,
                      extra_ids: dict[str, int] | None = None) -> Path:
    """Write a tiny llama model with a "bpe" or "spm" vocab.

    add_bos None leaves `tokenizer.ggml.add_bos_token` out (llama.cpp's defaults apply);
    extra_tokens (text, token type) are appended to a BPE vocab (e.g. user-defined ones);
    pre None leaves `tokenizer.ggml.pre` out; bpe replaces the trained BPE vocab;
    extra_ids are more uint32 keys (e.g. tokenizer.ggml.fim_pre_token_id).
    """
    from gguf_tools.vocab import add_vocab

    w = gguf.GGUFWriter(str(path), "llama")
    d, n_ff, n_head = 64, 128, 2
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d // n_head)
    if kind == "bpe" and (extra_tokens or add_bos is None or pre is None or bpe):
        v = bpe or bpe_vocab(n_vocab)
        tokens, types = list(v.tokens), list(v.token_types)
        for text, ttype in extra_tokens or []:
            tokens.append(text)
            types.append(ttype)
        w.add_tokenizer_model("gpt2")
        if pre is not None:
            w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(v.merges)
        w.add_bos_token_id(tokens.index(BPE_CONTROL[0]))
        w.add_eos_token_id(tokens.index(BPE_CONTROL[2]))
        if add_bos is not None:
            w.add_add_bos_token(add_bos)
        w.add_chat_template(CHATML_TEMPLATE)
        nv = len(tokens)
    elif kind == "spm" and add_bos is None:
        # add_vocab always writes add_bos_token; write the rest and leave it out
        from gguf_tools.vocab import spm_vocab

        s = spm_vocab(n_vocab)
        w.add_tokenizer_model("llama")
        w.add_token_list(s.tokens)
        w.add_token_types(s.token_types)
        w.add_token_scores(s.scores)
        w.add_unk_token_id(s.unk_id)
        w.add_bos_token_id(s.bos_id)
        w.add_eos_token_id(s.eos_id)
        nv = len(s.tokens)
    else:
        nv = add_vocab(w, kind=kind, n_vocab=n_vocab, pre=pre or "gpt-2", add_bos=add_bos)

    for key, value in (extra_ids or {}).items():
        w.add_uint32(key, value)
    rng = np.random.default_rng(0)

    def t(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    t("token_embd.weight", nv, d)
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    t("output.weight", nv, d)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(d, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(d, np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        t(f"blk.0.{name}.weight", d, d)
    t("blk.0.ffn_gate.weight", n_ff, d)
    t("blk.0.ffn_up.weight", n_ff, d)
    t("blk.0.ffn_down.weight", d, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def pair_vocab(text: str) -> BPEVocab:
    """A byte-level BPE vocab in which every pair of the bytes of `text` merges (ranks in
    a fixed shuffled order). Word boundaries show in its ids, so a pre-tokenizer that
    splits a text differently gives different ids (a vocab trained on text hides most
    of that: it has few merges across the characters tests probe)."""
    import random

    from gguf_tools.vocab import bytes_to_unicode

    b2u = bytes_to_unicode()
    syms = [b2u[b] for b in sorted(set(text.encode("utf-8")))]
    pairs = [(a, b) for a in syms for b in syms]
    random.Random(0).shuffle(pairs)
    tokens = [b2u[b] for b in range(256)] + [a + b for a, b in pairs] + list(BPE_CONTROL)
    n = len(tokens) - len(BPE_CONTROL)
    return BPEVocab(tokens=tokens, token_types=[1] * n + [3] * len(BPE_CONTROL),
                    merges=[f"{a} {b}" for a, b in pairs], bos_id=n, eos_id=n + 2, pad_id=n)
