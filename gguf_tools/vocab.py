"""Deterministic tiny vocabularies for test and demo GGUF files.

Two kinds, both learned by a small pure-Python BPE trainer on text that ships with
the running interpreter (the source of a fixed list of stdlib modules, capped at
~200 KB, plus a short multilingual sample so that accents and CJK get pieces):

* ``bpe_vocab``: byte-level BPE as GPT-2 writes it (``tokenizer.ggml.model = "gpt2"``):
  256 byte tokens (id == byte value), learned merges, then the control tokens
  ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``.
* ``spm_vocab``: SentencePiece-style llama vocab (``tokenizer.ggml.model = "llama"``):
  ``<unk>``, ``<s>``, ``</s>``, 256 ``<0xXX>`` byte tokens, single characters, then merged
  pieces with "▁" for spaces and score ``-rank``.

``add_vocab(writer, ...)`` writes either into a ``gguf.GGUFWriter``. Results are cached;
both kinds train in well under a second at the default size.
"""

from __future__ import annotations

import sysconfig
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import gguf
import regex

# Fixed list, read in this order; the text is the same on every run of one interpreter.
_STDLIB_FILES = (
    "textwrap.py", "string.py", "json/decoder.py", "json/encoder.py", "heapq.py",
    "bisect.py", "fractions.py", "calendar.py", "difflib.py", "argparse.py",
)
_TEXT_CAP = 200_000
# Short multilingual sample so non-ASCII characters become pieces too.
_SAMPLE = (
    "The café serves crème brûlée to a naïve señor. Où est la gare? Ça va très bien.\n"
    "Füße, Straße, schön, Grüße. Ελληνικά γράμματα. Русский текст для примера.\n"
    "日本語のテキストです。中文文本示例。한국어 텍스트입니다.\n"
    "Numbers: 12345 3.14159 2024-01-01, emoji 🤖👍 ok.\n"
)

GPT2_SPLIT = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)

BPE_CONTROL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'system' %}{{ '<<SYS>>\\n' + message['content'] + "
    "'\\n<</SYS>>\\n\\n' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

# gguf token types (llama.cpp's LLAMA_TOKEN_TYPE_*)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class BPEVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]  # "a b", rank = position
    bos_id: int
    eos_id: int
    pad_id: int


@dataclass(frozen=True)
class SPMVocab:
    tokens: list[str]
    token_types: list[int]
    scores: list[float]
    unk_id: int
    bos_id: int
    eos_id: int


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable unicode character mapping."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


@lru_cache(maxsize=1)
def training_text() -> str:
    """The fixed training text: stdlib sources (≤ ~200 KB) plus a multilingual sample."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = [_SAMPLE]
    size = len(_SAMPLE)
    for name in _STDLIB_FILES:
        path = root / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text[: max(0, _TEXT_CAP - size)])
        size += len(parts[-1])
        if size >= _TEXT_CAP:
            break
    return "".join(parts)


def _train_bpe(
    words: Counter, n_merges: int, allowed: set[str] | None = None
) -> list[tuple[str, str]]:
    """Classic BPE: repeatedly merge the most frequent adjacent pair (ties → smallest pair).

    ``words`` maps tuples of symbols to counts. Pairs with a symbol outside ``allowed``
    (when given) are never merged. Pair counts are updated incrementally.
    """
    syms = [list(w) for w in words]
    counts = list(words.values())
    pair_counts: defaultdict[tuple[str, str], int] = defaultdict(int)
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)

    def ok(a: str, b: str) -> bool:
        return allowed is None or (a in allowed and b in allowed)

    for wi, s in enumerate(syms):
        for a, b in zip(s, s[1:], strict=False):
            if ok(a, b):
                pair_counts[a, b] += counts[wi]
                where[a, b].add(wi)

    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges and pair_counts:
        # the most frequent pair; ties go to the smallest pair, so the result is deterministic
        best_count = max(pair_counts.values())
        if best_count <= 0:
            break
        best = min(p for p, c in pair_counts.items() if c == best_count)
        merges.append(best)
        merged = best[0] + best[1]
        if allowed is not None:
            allowed.add(merged)
        for wi in sorted(where.pop(best, ())):
            s, c = syms[wi], counts[wi]
            for a, b in zip(s, s[1:], strict=False):
                if ok(a, b) or (a, b) == best:
                    pair_counts[a, b] -= c
            out: list[str] = []
            i = 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == best[0] and s[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            syms[wi] = out
            for a, b in zip(out, out[1:], strict=False):
                if ok(a, b):
                    pair_counts[a, b] += c
                    where[a, b].add(wi)
        pair_counts.pop(best, None)
        for p in [p for p, c in pair_counts.items() if c <= 0]:
            del pair_counts[p]
            where.pop(p, None)
    return merges


@lru_cache(maxsize=8)
def bpe_vocab(n_vocab: int = 512) -> BPEVocab:
    """A GPT-2 style byte-level BPE vocab of exactly ``n_vocab`` tokens (if text allows)."""
    n_ctrl = len(BPE_CONTROL)
    if n_vocab < 256 + n_ctrl:
        raise ValueError(f"n_vocab must be at least {256 + n_ctrl}, got {n_vocab}")
    b2u = bytes_to_unicode()
    words: Counter = Counter()
    for w in regex.findall(GPT2_SPLIT, training_text()):
        words[tuple(b2u[b] for b in w.encode("utf-8"))] += 1
    tokens = [b2u[b] for b in range(256)]
    seen = set(tokens)
    merges: list[str] = []
    want = n_vocab - n_ctrl - 256
    # A merge can rebuild a string that already exists; ask for a few extra and stop
    # once the vocab is full.
    for a, b in _train_bpe(words, want + want // 4 + 8):
        if len(tokens) >= n_vocab - n_ctrl:
            break
        merges.append(f"{a} {b}")
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    types = [NORMAL] * len(tokens) + [CONTROL] * n_ctrl
    first_ctrl = len(tokens)
    tokens += BPE_CONTROL
    return BPEVocab(
        tokens=tokens, token_types=types, merges=merges,
        bos_id=first_ctrl, eos_id=first_ctrl + 2, pad_id=first_ctrl,
    )


@lru_cache(maxsize=8)
def spm_vocab(n_vocab: int = 512) -> SPMVocab:
    """A SentencePiece-style llama vocab: specials, byte tokens, characters, merged pieces."""
    base = 3 + 256
    if n_vocab < base + 8:
        raise ValueError(f"n_vocab must be at least {base + 8}, got {n_vocab}")
    text = "▁" + training_text().replace(" ", "▁")
    # Pieces start at a run of "▁"; newlines and tabs stay out (byte fallback covers them).
    words = Counter(tuple(w) for w in regex.findall(r"▁*[^▁\n\t]+|▁+", text))
    char_freq = Counter()
    for w, c in words.items():
        for ch in w:
            char_freq[ch] += c
    budget = n_vocab - base
    n_chars = min(budget // 2, len(char_freq))
    chars = [ch for ch, _ in sorted(char_freq.items(), key=lambda kv: (-kv[1], kv[0]))]
    chars = chars[:n_chars]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    scores = [0.0] * base
    seen = set(tokens)
    pieces: list[str] = []
    for a, b in _train_bpe(words, budget - n_chars + 16, allowed=set(chars)):
        if len(pieces) >= budget - n_chars:
            break
        if a + b not in seen and a + b not in chars:
            seen.add(a + b)
            pieces.append(a + b)
    for rank, p in enumerate(pieces):
        tokens.append(p)
        types.append(NORMAL)
        scores.append(-float(rank))
    for rank, ch in enumerate(chars):
        tokens.append(ch)
        types.append(NORMAL)
        scores.append(-float(len(pieces) + rank))
    return SPMVocab(tokens=tokens, token_types=types, scores=scores, unk_id=0, bos_id=1,
                    eos_id=2)


def add_vocab(
    writer: gguf.GGUFWriter,
    kind: str = "bpe",
    n_vocab: int = 512,
    pre: str = "gpt-2",
    *,
    add_bos: bool | None = None,
    chat_template: str | None = None,
) -> int:
    """Write a tokenizer into ``writer``; returns the vocab size written.

    ``kind`` is "bpe" (``tokenizer.ggml.model = "gpt2"``, pre-tokenizer ``pre``) or "spm"
    (``"llama"``). ``add_bos`` defaults to False for BPE and True for SPM and is always
    written explicitly. ``chat_template`` defaults to ChatML (BPE) / Llama-2 (SPM).
    """
    if kind == "bpe":
        v = bpe_vocab(n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(v.tokens)
        writer.add_token_types(v.token_types)
        writer.add_token_merges(v.merges)
        writer.add_bos_token_id(v.bos_id)
        writer.add_eos_token_id(v.eos_id)
        writer.add_pad_token_id(v.pad_id)
        writer.add_add_bos_token(bool(add_bos) if add_bos is not None else False)
        writer.add_chat_template(chat_template or CHATML_TEMPLATE)
        return len(v.tokens)
    if kind == "spm":
        s = spm_vocab(n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(s.tokens)
        writer.add_token_types(s.token_types)
        writer.add_token_scores(s.scores)
        writer.add_unk_token_id(s.unk_id)
        writer.add_bos_token_id(s.bos_id)
        writer.add_eos_token_id(s.eos_id)
        writer.add_add_bos_token(bool(add_bos) if add_bos is not None else True)
        writer.add_chat_template(chat_template or LLAMA2_TEMPLATE)
        return len(s.tokens)
    raise ValueError(f"unknown vocab kind {kind!r} (expected 'bpe' or 'spm')")
