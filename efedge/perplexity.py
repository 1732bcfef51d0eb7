"""Perplexity of a model on a text, measured as llama.cpp's `llama-perplexity` measures it,
so the figures of the two can be compared on the same file (`efedge perplexity`).

The text is tokenized whole (with the vocab's BOS) and cut into chunks of n_ctx tokens;
each chunk is evaluated from an empty cache with its first token replaced by BOS where the
vocab adds one, and only the tokens of its second half are scored — each then has at least
n_ctx / 2 tokens of context. PPL = exp(mean negative log-likelihood over the scored
tokens); its ± is the standard error of that mean carried through exp (llama.cpp's
"Final estimate: PPL = X +/- Y"). A text needs at least 2 · n_ctx tokens.

Through an expert cache the figure is the same as with every expert resident (exact
routing gives the same logits); with `routing="cache-aware"` it measures what the
substitutions cost.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from efedge.errors import ArgumentError

MIN_CTX = 4  # a chunk's second half must hold a token to score


@dataclass
class PerplexityResult:
    ppl: float  # exp(mean negative log-likelihood)
    ppl_err: float  # its standard error (NaN with a single scored token)
    n_ctx: int  # tokens per chunk
    n_chunks: int
    n_tokens: int  # the text's tokens
    n_scored: int  # tokens scored: n_chunks · (n_ctx − 1 − n_ctx // 2)
    seconds: float
    running: list[float] = field(default_factory=list)  # the estimate after each chunk


def perplexity(model, text: str | Sequence[int], *, n_chunks: int | None = None,
               on_chunk: Callable[[int, int, float, float], None] | None = None
               ) -> PerplexityResult:
    """Perplexity of `model` (an efedge.Model) on `text` (a string, or token ids used as
    they are), in chunks of model.n_ctx tokens; at most `n_chunks` of them. `on_chunk(i,
    n, running_ppl, seconds)` after each chunk (a progress display)."""
    n_ctx = model.n_ctx
    if n_ctx < MIN_CTX:
        raise ArgumentError(f"perplexity needs a context of at least {MIN_CTX} tokens, got "
                            f"{n_ctx}")
    if isinstance(text, str):
        ids = model.tokenize(text)
    else:
        ids = model._token_ids(text)
    if len(ids) < 2 * n_ctx:
        raise ArgumentError(f"the text has {len(ids)} tokens; perplexity with a context of "
                            f"{n_ctx} needs at least {2 * n_ctx} (a longer text, or a "
                            "smaller context: -c / n_ctx)")
    if n_chunks is not None and (isinstance(n_chunks, bool)
                                 or not isinstance(n_chunks, numbers.Integral)
                                 or n_chunks < 1):  # (numpy's integers too, as max_tokens)
        raise ArgumentError(f"n_chunks must be a positive integer or None, got {n_chunks!r}")
    total = len(ids) // n_ctx
    n = total if n_chunks is None else min(int(n_chunks), total)
    tok = model.tokenizer
    bos = tok.bos_id if tok.add_bos else None
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    running: list[float] = []
    t0 = time.perf_counter()
    for i in range(n):
        chunk = ids[i * n_ctx:(i + 1) * n_ctx]
        if bos is not None:  # every chunk starts as a text does
            chunk[0] = bos
        for e in model.prompt_logprobs(chunk, first=first):
            nll -= e.logprob
            nll2 += e.logprob * e.logprob
            count += 1
        running.append(math.exp(nll / count))
        if on_chunk is not None:
            on_chunk(i, n, running[-1], time.perf_counter() - t0)
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    err = ppl * math.sqrt(max(var, 0.0) / (count - 1)) if count > 1 else math.nan
    return PerplexityResult(ppl, err, n_ctx, n, len(ids), count,
                            time.perf_counter() - t0, running)
