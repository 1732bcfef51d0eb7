"""A model whose generations write fixed token ids (after the real prefill): for tests of
what is done with the text — UTF-8 pieces, tool-call parsing — that a random tiny model
would never write."""

from __future__ import annotations

from efedge import api_generation
from efedge.logprobs import TokenLogprob


def script_tokens(monkeypatch, ids: list[int], then: Exception | None = None) -> None:
    """Every generation from now on (for the test's duration) prefills its prompt as usual,
    then yields `ids` (at most max_tokens of them) and stops — or raises `then` after
    them (a failure mid-generation). Asked for log probabilities, each token gets an
    entry of -1.0 (the records' shapes and where they go are tested, not the values)."""
    real = api_generation.generate_tokens

    def fake(session, prompt, sampler, *, max_tokens, eog, cancel=None, result=None,
             logprobs=None, constraint=None):
        for _ in real(session, prompt, sampler, max_tokens=0, eog=eog, cancel=cancel,
                      result=result, logprobs=logprobs, constraint=constraint):
            pass
        for tok in ids[:max_tokens]:
            if result is not None:
                result.tokens.append(tok)
                if logprobs is not None:
                    result.logprobs.append(TokenLogprob(tok, -1.0))
            yield tok
        if then is not None:
            raise then
        if result is not None:
            result.finish_reason = "stop" if max_tokens >= len(ids) else "length"

    monkeypatch.setattr(api_generation, "generate_tokens", fake)
