"""Log probabilities in OpenAI's two wire shapes, for efedge.server.

The model thread turns efedge.logprobs entries into neutral records (`records`): the
token's text, its bytes, its log probability (None for a prompt's first token, which
nothing predicts), its alternatives and where its text starts in the response's text.
The HTTP side shapes those per endpoint:

* completions (`logprobs: N`): {"tokens", "token_logprobs", "top_logprobs" (a dict of
  text → log probability per token, None for the first prompt token), "text_offset"};
* chat (`logprobs: true, top_logprobs: N`): {"content": [{"token", "logprob", "bytes",
  "top_logprobs": [{"token", "logprob", "bytes"}]}], "refusal": None}.

A token's text is its bytes decoded as UTF-8, a byte that is not a whole character
becoming U+FFFD; `bytes` (chat) keeps the exact bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

from efedge.logprobs import TokenLogprob
from efedge.tokenizer import Tokenizer


def _text(tok: Tokenizer, tid: int) -> tuple[str, list[int]]:
    b = tok.token_bytes(tid)
    return b.decode("utf-8", errors="replace"), list(b)


def records(tok: Tokenizer, entries: Sequence[TokenLogprob], base: int = 0) -> list[dict]:
    """Generated tokens' entries as records; `base`: characters before the generated text
    in the response (the echoed prompt)."""
    out = []
    for e in entries:
        text, raw = _text(tok, e.token)
        out.append({"token": text, "bytes": raw, "logprob": e.logprob,
                    "top": [(*_text(tok, t), lp) for t, lp in e.top],
                    "offset": base + e.offset})
    return out


def prompt_records(tok: Tokenizer, ids: Sequence[int], entries: Sequence[TokenLogprob],
                   skip_special: bool) -> list[dict]:
    """An echoed prompt's tokens as records: the first without a log probability, the
    others with entries[i - 1]; offsets into decode(ids, skip_special)."""
    offsets = tok.token_offsets(ids, skip_special)
    first_text, first_raw = _text(tok, ids[0])
    out = [{"token": first_text, "bytes": first_raw, "logprob": None, "top": None,
            "offset": offsets[0]}]
    for e, off in zip(entries, offsets[1:], strict=True):
        out += records(tok, [e], off)
    return out


def as_completion(recs: Sequence[dict]) -> dict:
    """The completions endpoint's logprobs object (several alternatives with one text keep
    the most probable: a JSON object has one value per key)."""
    tops = []
    for r in recs:
        if r["top"] is None:
            tops.append(None)
            continue
        d: dict[str, float] = {}
        for text, _raw, lp in r["top"]:
            d.setdefault(text, lp)
        tops.append(d)
    return {"tokens": [r["token"] for r in recs],
            "token_logprobs": [r["logprob"] for r in recs],
            "top_logprobs": tops,
            "text_offset": [r["offset"] for r in recs]}


def as_chat(recs: Sequence[dict]) -> dict:
    """The chat endpoint's logprobs object."""
    return {"content": [{"token": r["token"], "logprob": r["logprob"], "bytes": r["bytes"],
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": raw}
                                          for t, raw, lp in r["top"]]}
                        for r in recs],
            "refusal": None}
