"""Log probabilities of tokens: what `logprobs=` asks of generate / stream / chat and the
server's `logprobs` / `top_logprobs` fields.

A token's log probability is taken from the model's own distribution — the log-softmax of
its logits, before any sampling setting (temperature, top-k, penalties) reshapes it — as
llama-cpp-python and OpenAI's API report it, so it does not depend on how the token was
chosen. Sums run in float64 over the float32 logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from efedge.errors import ArgumentError

MAX_TOP_LOGPROBS = 20  # the most alternatives per token (OpenAI's top_logprobs limit)


@dataclass
class TokenLogprob:
    """One token's log probability, and the `top` most probable tokens at its position as
    (token id, log probability), most probable first (ties: lower id first). `offset`: where
    the token's text starts in the generated text (characters)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    offset: int = 0


def check_top(n, name: str = "logprobs") -> int | None:
    """A logprobs request: None (none wanted) or how many alternatives per token, 0–20."""
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or \
            not 0 <= n <= MAX_TOP_LOGPROBS:
        raise ArgumentError(f"{name} must be None or an integer in [0, {MAX_TOP_LOGPROBS}], "
                            f"got {n!r}")
    return int(n)


def _log_norm(row: np.ndarray) -> float:
    """log Σ exp(row), in float64 (the log-softmax's normaliser)."""
    finite = row[np.isfinite(row)]
    if finite.size == 0:
        return math.inf
    top = float(finite.max())
    x = np.asarray(row, dtype=np.float64) - top
    return top + math.log(float(np.exp(x).sum()))


def token_logprob(row: np.ndarray, token: int, top_n: int = 0, offset: int = 0) -> TokenLogprob:
    """`token`'s log probability under logits `row` [n_vocab], with the top_n alternatives."""
    row = np.asarray(row)
    norm = _log_norm(row)
    top: list[tuple[int, float]] = []
    if top_n > 0:
        n = min(top_n, row.shape[0])
        cand = np.argpartition(-row, n - 1)[:n]
        cand = cand[np.lexsort((cand, -row[cand]))]  # most probable first, then lower id
        top = [(int(t), float(row[t]) - norm) for t in cand]
    return TokenLogprob(int(token), float(row[token]) - norm, top, offset)


def sequence_logprobs(logits: np.ndarray, ids, top_n: int = 0) -> list[TokenLogprob]:
    """Entries for ids[1:] from the logits [len(ids), n_vocab] of a sequence: row i
    predicts token i + 1 (the first token has no log probability; callers show None)."""
    return [token_logprob(logits[i], int(ids[i + 1]), top_n) for i in range(len(ids) - 1)]
