"""The GGUF tokenizer: llama.cpp's byte-level BPE ("gpt2") and SentencePiece ("llama").

Token ids equal llama.cpp's (src/llama-vocab.cpp) for the same file:

* special tokens are split out first, longest text first; control/unknown ones only
  when ``parse_special`` (like ``llama_tokenize(..., parse_special)``), user-defined always;
* BPE: the pre-tokenizer regexes named by ``tokenizer.ggml.pre``, GPT-2 byte → unicode
  mapping, then the lowest-rank merge first (ties: leftmost), ``ignore_merges`` for Llama-3;
* SPM: spaces → "▁", a space prefix on the first fragment and after every special token,
  the highest-score bigram first (ties: leftmost), ``<0xXX>`` byte fallback.

Encoding is pure Python; BPE results are cached per pre-token word.
"""

from __future__ import annotations

import bisect
import codecs
import heapq
import logging
import numbers
from collections.abc import Iterable, Iterator
from typing import Any

import regex

from efedge.errors import ArgumentError, ModelFormatError, UnsupportedModelError
from efedge.tokenizer_tables import (
    _EOG_TEXTS,
    _EOT_TEXTS,
    _FIM_EOG_TEXTS,
    _FIM_TEXTS,
    _LLAMA_UNASSIGNED,
    _PRE_NAMES,
    _PRE_REGEXES,
)

log = logging.getLogger(__name__)

# llama.cpp token attributes (LLAMA_TOKEN_ATTR_*) and the GGUF token types mapping onto them.
UNKNOWN, UNUSED, NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 2, 4, 8, 16, 32
_TYPE_ATTR = {1: NORMAL, 2: UNKNOWN, 3: CONTROL, 4: USER_DEFINED, 5: UNUSED, 6: BYTE}
_SPECIAL = CONTROL | UNKNOWN  # rendered / parsed only on request

def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte → printable character table (index = byte value)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, n = [""] * 256, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


_SURROGATE = regex.compile(r"[\ud800-\udfff]")


def lone_surrogate(text: str):
    """The first lone surrogate in `text` (a match: .group(), .start()), which has no
    UTF-8; None where there is none."""
    return None if text.isascii() else _SURROGATE.search(text)


_B2U = _bytes_to_unicode()
_U2B = {c: b for b, c in enumerate(_B2U)}
_LATIN1_TO_B2U = str.maketrans({chr(b): c for b, c in enumerate(_B2U)})
# mapped char → its byte as a latin-1 char; other chars below 256 → U+FFFF so that the
# latin-1 encode fails and the exact (slow) path handles them
_U2LATIN1 = str.maketrans({**{chr(x): "\uffff" for x in range(256)},
                           **{c: chr(b) for b, c in enumerate(_B2U)}})


# The code points llama.cpp's Unicode table has no category for (it predates the `regex`
# module's): the pre-tokenizer regexes with \p{..} see each as U+FDD0, a noncharacter,
# unassigned in every Unicode version, as llama.cpp sees them. Those inside the ranges
# of llama.cpp's unicode_cpt_is_han become U+FDD1 (as unassigned to every regex): Kimi
# K2's splitter takes them as Han by their code point, and its Han class holds U+FDD1.
_UNASSIGNED_RANGES = [(int(a, 16), int(b or a, 16)) for a, _, b in
                      (r.partition("-") for r in _LLAMA_UNASSIGNED.split())]
_UNASSIGNED_STARTS = [a for a, _ in _UNASSIGNED_RANGES]
_HAN_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF),
               (0x2A700, 0x2EBEF), (0x2F800, 0x2FA1F))


class _MaskTable(dict):
    """str.translate table: code point → itself, or U+FDD0 (U+FDD1 in a Han range) where
    llama.cpp has no category for it; filled as code points are met (a lookup per
    character is ~20x faster than a regex class of the 700 ranges)."""

    def __missing__(self, cp: int) -> int:
        if len(self) > 200_000:  # every code point there is would be ~100 MB
            self.clear()
        i = bisect.bisect_right(_UNASSIGNED_STARTS, cp) - 1
        v = cp
        if i >= 0 and cp <= _UNASSIGNED_RANGES[i][1]:
            v = 0xFDD1 if any(a <= cp <= b for a, b in _HAN_RANGES) else 0xFDD0
        self[cp] = v
        return v


_MASK = _MaskTable()


def _masked(text: str) -> str | None:
    """`text` with llama.cpp's unassigned code points as U+FDD0 (None: there are none)."""
    masked = text.translate(_MASK)
    return None if masked == text else masked


def _get(meta: dict, key: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    """meta[key] checked against `kinds` (bool is never accepted as an int)."""
    if key not in meta:
        return default
    v = meta[key]
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        want = "/".join(k.__name__ for k in kinds)
        raise ModelFormatError(f"tokenizer metadata key {key!r}: expected {want}, "
                               f"got {type(v).__name__}")
    return v


def _get_list(meta: dict, key: str, kind: type | tuple[type, ...], n_min: int) -> list | None:
    v = meta.get(key)
    if v is None:
        return None
    if hasattr(v, "tolist"):
        v = v.tolist()
    if not isinstance(v, (list, tuple)):
        raise ModelFormatError(f"tokenizer metadata key {key!r}: expected an array, "
                               f"got {type(v).__name__}")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if len(v) < n_min or not set(map(type, v)) <= set(kinds):  # exact types: no bools
        raise ModelFormatError(f"tokenizer metadata key {key!r}: expected at least {n_min} "
                               f"values of type {'/'.join(k.__name__ for k in kinds)}")
    return list(v)


class Tokenizer:
    """Encode/decode with a GGUF file's vocabulary exactly as llama.cpp does.

    Attributes: ``n_vocab``; ``bos_id``/``eos_id``/``eot_id``/``eom_id``/``unk_id`` (None
    when absent); ``add_bos``/``add_eos`` (what ``add_special`` adds); ``eog_ids`` (tokens
    that end generation); ``tokens`` (vocabulary strings); ``token_to_id``; ``pre``.
    """

    def __init__(self, meta: dict) -> None:
        model = _get(meta, "tokenizer.ggml.model", (str,))
        if model is None:
            raise ModelFormatError("tokenizer metadata key 'tokenizer.ggml.model' is missing")
        if model not in ("gpt2", "llama"):
            raise UnsupportedModelError(f"tokenizer model {model!r} (tokenizer.ggml.model) is "
                                        "not supported; efedge reads 'gpt2' and 'llama'")
        self.model = model
        tokens = _get_list(meta, "tokenizer.ggml.tokens", str, 1)
        if tokens is None:
            raise ModelFormatError("tokenizer metadata key 'tokenizer.ggml.tokens' is missing")
        n = self.n_vocab = len(tokens)
        self.tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.token_to_id: dict[str, int] = dict(zip(self.tokens, range(n), strict=True))
        if len(self.token_to_id) != n:
            dup = next(t for i, t in enumerate(self.tokens) if self.token_to_id[t] != i)
            raise ModelFormatError(f"tokenizer metadata key 'tokenizer.ggml.tokens': "
                                   f"duplicate token {dup!r}")
        types = _get_list(meta, "tokenizer.ggml.token_type", int, n)
        self.attrs = [_TYPE_ATTR.get(t, 0) for t in types[:n]] if types else [NORMAL] * n
        scores = _get_list(meta, "tokenizer.ggml.scores", (int, float), n)
        self.scores = [float(s) for s in scores[:n]] if scores else [0.0] * n

        spm = model == "llama"
        if spm:
            self.pre, self.ignore_merges, add_bos = "", False, True
            defaults = {"bos": 1, "eos": 2, "unk": 0}
        else:
            pre = _get(meta, "tokenizer.ggml.pre", (str,), "default")
            if pre not in _PRE_NAMES:
                raise UnsupportedModelError(
                    f"BPE pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported")
            family, self.ignore_merges, add_bos = _PRE_NAMES[pre]
            self.pre = pre
            self._split_res = [regex.compile(p) for p in _PRE_REGEXES[family]]
            # which of them use Unicode categories: those see llama.cpp's table (_masked)
            self._split_cat = [r"\p{" in p for p in _PRE_REGEXES[family]]
            glm = pre in ("glm4", "glm5", "chatglm-bpe")  # llama.cpp: no default BOS / EOS
            defaults = {} if glm else {"bos": 11, "eos": 11}
            merges = _get_list(meta, "tokenizer.ggml.merges", str, 0)
            if merges is None and pre == "kimi-k2":
                merges = []  # llama.cpp loads a Kimi K2 vocab without merges (no merging)
            if merges is None:
                raise ModelFormatError("tokenizer metadata key 'tokenizer.ggml.merges' is "
                                       "missing (required for tokenizer model 'gpt2')")
            self.ranks: dict[tuple[str, str], int] = {}
            for r, m in enumerate(merges):
                i = m.find(" ", 1)
                pair = (m[:i], m[i + 1:]) if i >= 0 else ("", "")
                self.ranks.setdefault(pair, r)
        self.add_space_prefix = spm and bool(
            _get(meta, "tokenizer.ggml.add_space_prefix", (bool, int), True))

        ids: dict[str, int | None] = {}
        for name in ("bos", "eos", "eot", "eom", "unk", "sep", "pad"):
            tid = defaults.get(name)
            tid = tid if tid is not None and tid < n else None
            new = _get(meta, f"tokenizer.ggml.{name}_token_id", (int,))
            if new is not None:
                if 0 <= new < n:
                    tid = new
                else:
                    log.warning("tokenizer.ggml.%s_token_id = %d is out of range, ignored",
                                name, new)
            ids[name] = tid
        self.bos_id, self.eos_id, self.unk_id = ids["bos"], ids["eos"], ids["unk"]
        self.special_ids = ids  # bos, eos, eot, eom, unk, sep, pad as read from the file
        self.add_bos = bool(_get(meta, "tokenizer.ggml.add_bos_token", (bool, int), add_bos))
        self.add_eos = bool(_get(meta, "tokenizer.ggml.add_eos_token", (bool, int), False))
        for flag, tid, what in ((self.add_bos, self.bos_id, "bos"),
                                (self.add_eos, self.eos_id, "eos")):
            if flag and tid is None:
                raise ModelFormatError(f"tokenizer metadata key 'tokenizer.ggml.add_{what}_token'"
                                       f" is true but 'tokenizer.ggml.{what}_token_id' is not set")
        self._init_eog(meta, ids)
        # Special tokens split out before tokenizing, longest text first (as llama.cpp).
        special = [i for i in range(n) if self.attrs[i] & (CONTROL | USER_DEFINED | UNKNOWN)]
        special.sort(key=lambda i: -len(self.tokens[i].encode("utf-8")))
        self._special = [(self.tokens[i], i, bool(self.attrs[i] & _SPECIAL)) for i in special]
        self._pieces = [self._make_piece(i) for i in range(n)]
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_metadata(cls, meta: dict) -> Tokenizer:
        """Build from GGUF metadata (key → Python value, as GGUFFile.metadata gives it)."""
        return cls(meta)

    def _init_eog(self, meta: dict, ids: dict[str, int | None]) -> None:
        eot, eom = ids["eot"], ids["eom"]
        eog: set[int] = set()
        found = {key: _get(meta, key, (int,)) for key, _ in _FIM_EOG_TEXTS}
        vocab = self.token_to_id

        def first(texts: Iterable[str]) -> int | None:  # llama.cpp: any match; we: lowest id
            hits = [vocab[t] for t in texts if t in vocab]
            if hits:
                self.attrs[min(hits)] |= CONTROL  # control-looking text: forced to control
            return min(hits) if hits else None

        # fill-in-the-middle markers (efedge.fim): the file's ids, else found by their text
        self.fim_ids: dict[str, int | None] = {}
        for name, texts in _FIM_TEXTS:
            tid = _get(meta, f"tokenizer.ggml.fim_{name}_token_id", (int,))
            if tid is None:
                legacy = {"pre": "prefix", "suf": "suffix", "mid": "middle"}[name]
                tid = _get(meta, f"tokenizer.ggml.{legacy}_token_id", (int,))
            self.fim_ids[name] = tid if tid is not None and 0 <= tid < self.n_vocab \
                else first(texts)
        if eot is None:
            eot = first(_EOT_TEXTS)
        if eom is None:
            eom = first(("<|eom_id|>",))
        for key, texts in _FIM_EOG_TEXTS:
            if found[key] is None:
                found[key] = first(texts)
        for t in _EOG_TEXTS:
            if t in vocab:
                eog.add(vocab[t])
                self.attrs[vocab[t]] |= CONTROL
        for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            if t in vocab:
                self.attrs[vocab[t]] = USER_DEFINED  # gpt-oss: always rendered
        eog.update(v for v in found.values() if v is not None and 0 <= v < self.n_vocab)
        for key, name in (("tokenizer.ggml.fim_pad_token_id", "pad"),
                          ("tokenizer.ggml.fim_rep_token_id", "rep"),
                          ("tokenizer.ggml.fim_sep_token_id", "sep")):
            v = found[key]
            self.fim_ids[name] = v if v is not None and 0 <= v < self.n_vocab else None
        eog.update(v for v in (self.eos_id, eot, eom) if v is not None)
        by_text = {self.tokens[i]: i for i in eog}
        # o200k_harmony / solar-open: "<|end|>" ends a message, not the generation
        has_call = "<|call|>" in by_text or "<|calls|>" in by_text
        if "<|end|>" in by_text and has_call and ("<|return|>" in by_text
                                                  or "<|flush|>" in by_text):
            eog.discard(by_text["<|end|>"])
            self.attrs[by_text["<|end|>"]] = USER_DEFINED
        if "<|tool_response>" in by_text and "</s>" in by_text:  # gemma4
            eog.discard(by_text["</s>"])
            self.attrs[by_text["</s>"]] = NORMAL
        self.eot_id, self.eom_id = eot, eom
        self.eog_ids: frozenset[int] = frozenset(eog)

    # ---- encoding ------------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`; BOS (and EOS) added per the vocab when `add_special`."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes str, not {type(text).__name__}")
        # a lone surrogate (JSON's "\ud800" gives one) has no UTF-8: name where it is,
        # not the offset in whichever fragment UnicodeEncodeError would report
        bad = lone_surrogate(text)
        if bad:
            raise ArgumentError(f"text has a lone surrogate {bad.group()!r} at index "
                                f"{bad.start()} (not valid Unicode)")
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)  # type: ignore[arg-type]
        prev_special = True  # SPM: a space prefix on the first fragment and after specials
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
            elif self.model == "llama":
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                self._spm(frag.replace(" ", "▁"), out)
                prev_special = False
            else:
                self._bpe_fragment(frag, out)
        if add_special and self.add_eos:
            out.append(self.eos_id)  # type: ignore[arg-type]
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        frags: list[str | int] = [text] if text else []
        for tok_text, tid, needs_parse in self._special:
            if needs_parse and not parse_special or tok_text not in text:
                continue
            new: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or tok_text not in f:
                    new.append(f)
                    continue
                parts = f.split(tok_text)
                for k, p in enumerate(parts):
                    if k:
                        new.append(tid)
                    if p:
                        new.append(p)
            frags = new
        return frags

    def _bpe_fragment(self, text: str, out: list[int]) -> None:
        cache = self._cache
        for w in self._split(text):
            ids = cache.get(w)
            if ids is None:
                if len(cache) > 100_000:
                    cache.clear()
                ids = cache[w] = self._bpe_word(w.encode("utf-8").decode("latin-1")
                                                .translate(_LATIN1_TO_B2U))
            out.extend(ids)

    def _split(self, text: str) -> list[str]:
        """`text` cut into words by the pre-tokenizer regexes in turn. The regexes with
        Unicode categories match the text with the code points llama.cpp has no category
        for masked (see _masked); the others, explicit ranges, the text itself."""
        masked = None if text.isascii() else _masked(text)
        spans = [(0, len(text))]
        for rx, by_category in zip(self._split_res, self._split_cat, strict=True):
            src = masked if by_category and masked is not None else text
            nxt: list[tuple[int, int]] = []
            for start, end in spans:
                pos = start
                part = src if end - start == len(src) else src[start:end]
                for m in rx.finditer(part):
                    a, b = start + m.start(), start + m.end()
                    if a > pos:
                        nxt.append((pos, a))
                    if b > a:
                        nxt.append((a, b))
                    pos = b
                if pos < end:
                    nxt.append((pos, end))
            spans = nxt
        return [text[a:b] for a, b in spans]

    def _bpe_word(self, word: str) -> list[int]:
        vocab = self.token_to_id
        if self.ignore_merges and word in vocab:
            return [vocab[word]]
        sym = list(word)  # symbol texts; "" once merged into its left neighbour
        nxt = list(range(1, len(sym))) + [-1]
        prv = list(range(-1, len(sym) - 1))
        ranks = self.ranks
        heap: list[tuple[int, int, int, str]] = []

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                r = ranks.get((sym[left], sym[right]))
                if r is not None:
                    heapq.heappush(heap, (r, left, right, sym[left] + sym[right]))

        for i in range(len(sym) - 1):
            push(i, i + 1)
        while heap:
            _, left, right, text = heapq.heappop(heap)
            if not sym[left] or not sym[right] or sym[left] + sym[right] != text:
                continue  # stale
            sym[left], sym[right] = text, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        out: list[int] = []
        for s in sym:
            if not s:
                continue
            tid = vocab.get(s)
            if tid is not None:
                out.append(tid)
                continue
            for b in s.encode("utf-8"):  # llama.cpp: look each byte up as a 1-byte string
                tid = vocab.get(chr(b)) if b < 0x80 else None
                if tid is not None:
                    out.append(tid)
        return out

    def _spm(self, text: str, out: list[int]) -> None:
        vocab, scores = self.token_to_id, self.scores
        sym = list(text)
        n = len(sym)
        nxt = list(range(1, n)) + [-1] if n else []
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                tid = vocab.get(sym[left] + sym[right])
                if tid is not None:
                    heapq.heappush(heap, (-scores[tid], left, right,
                                          len(sym[left]) + len(sym[right])))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if not sym[left] or not sym[right] or len(sym[left]) + len(sym[right]) != size:
                continue
            sym[left], sym[right] = sym[left] + sym[right], ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        for s in sym:
            if not s:
                continue
            tid = vocab.get(s)
            if tid is not None:
                out.append(tid)
                continue
            for b in s.encode("utf-8"):  # byte fallback
                tid = vocab.get(f"<0x{b:02X}>")
                if tid is None:
                    tid = vocab.get(chr(b)) if b < 0x80 else None
                if tid is None:
                    tid = self.unk_id
                if tid is not None:
                    out.append(tid)

    # ---- decoding ------------------------------------------------------------------------
    def _make_piece(self, tok: int) -> bytes:
        attr, text = self.attrs[tok], self.tokens[tok]
        if attr & (_SPECIAL | USER_DEFINED):
            return text.encode("utf-8")
        if attr & NORMAL:
            if self.model == "llama":
                return text.replace("▁", " ").encode("utf-8")
            try:
                return text.translate(_U2LATIN1).encode("latin-1")
            except UnicodeEncodeError:  # a character outside GPT-2's byte table
                return b"".join(bytes([_U2B[c]]) if c in _U2B else
                                b"[UNK_BYTE_0x" + c.encode("utf-8").hex().encode() +
                                text.encode("utf-8") + b"]" for c in text)
        if attr & BYTE:
            try:  # "<0xXX>"; llama.cpp refuses the file otherwise, so do we (not a bare ValueError)
                return bytes([int(text[3:5], 16)])
            except ValueError:
                raise ModelFormatError(
                    f"tokenizer metadata key 'tokenizer.ggml.token_type': token {tok} "
                    f"({text!r}) has the byte type but is not <0xXX>") from None
        return b""

    def _check(self, tok: int) -> int:
        if not isinstance(tok, numbers.Integral) or isinstance(tok, bool):
            raise TypeError(f"token id must be an integer, got {type(tok).__name__} {tok!r}")
        tok = int(tok)
        if not 0 <= tok < self.n_vocab:
            raise ArgumentError(f"token id {tok} is out of range [0, {self.n_vocab})")
        return tok

    def token_bytes(self, tok: int) -> bytes:
        """The bytes token `tok` stands for (special tokens as their text)."""
        return self._pieces[self._check(tok)]

    def piece(self, tok: int) -> str:
        """The token's vocabulary string as stored in the file (e.g. "Ġthe", "▁the")."""
        return self.tokens[self._check(tok)]

    def is_special(self, tok: int) -> bool:
        return bool(self.attrs[self._check(tok)] & _SPECIAL)

    def _iter_bytes(self, ids: Iterable[int], skip_special: bool) -> Iterator[bytes]:
        """The bytes of each token of `ids` (one item per id, b"" for a hidden one)."""
        first, after_bos = True, False
        for tok in ids:
            tok = self._check(tok)
            hidden = skip_special and self.attrs[tok] & _SPECIAL
            if first and tok == self.bos_id and self.add_space_prefix:
                if not hidden:  # a normal BOS shows
                    # a rendered BOS keeps the space after it ("<s> hello"), as llama.cpp
                    # (llama_detokenize), llama-cpp-python and HF render it
                    first = False
                    yield self._pieces[tok]
                else:  # a hidden BOS: the space to strip is on the first text after it
                    after_bos = True
                    yield b""
                continue
            b = b"" if hidden else self._pieces[tok]
            if first and self.add_space_prefix and b[:1] == b" ":
                b = b[1:]  # SPM: drop the space prefix encode() added
                first = False
            elif b or not after_bos:
                # after a hidden BOS, tokens that write nothing leave the space to strip to
                # the text after them ("<s></s>▁hi" → "hi", as llama-cpp-python decodes it)
                first = False
            yield b

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; control/unknown tokens as their text unless `skip_special`.

        With a SentencePiece vocab the leading space that encode() prefixed is removed.
        Invalid UTF-8 becomes U+FFFD.
        """
        return b"".join(self._iter_bytes(ids, skip_special)).decode("utf-8", errors="replace")

    def token_offsets(self, ids: Iterable[int], skip_special: bool = False) -> list[int]:
        """Where each token's text starts in decode(ids, skip_special), in characters (a
        token inside a UTF-8 character starts where that character does)."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out, made = [], 0
        for b in self._iter_bytes(ids, skip_special):
            out.append(made)
            made += len(utf8.decode(b))
        return out

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        """An incremental decoder for generated tokens (see StreamDecoder)."""
        return StreamDecoder(self, skip_special)


class StreamDecoder:
    """Feed token ids one at a time; get text that never ends inside a UTF-8 character.

    The pieces are llama.cpp's token_to_piece (as its server and CLI stream them): the
    tokens continue a prompt, so a SentencePiece token keeps its leading space ("▁Paris"
    → " Paris"); only decode() drops the space encode() put at the start of a text.
    """

    def __init__(self, tok: Tokenizer, skip_special: bool = False) -> None:
        self._tok, self._skip = tok, skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, tok: int) -> str:
        t = self._tok
        tok = t._check(tok)
        if t.attrs[tok] & _SPECIAL and self._skip:
            b = b""
        else:
            b = t._pieces[tok]
        return self._utf8.decode(b)

    def flush(self) -> str:
        """Whatever is left (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
