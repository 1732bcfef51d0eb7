"""Model's scoring (a mixin of efedge.api.Model): the logits of a token sequence, and each
token's log probability after those before it — what perplexity (efedge/perplexity.py)
and the server's echoed prompt logprobs read.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np

from efedge.errors import ArgumentError, ContextLengthError
from efedge.logprobs import TokenLogprob, check_top, sequence_logprobs

PROMPT_CHUNK = 256  # prompt_logprobs: tokens per forward call (logits memory: × n_vocab)


class ScoringMixin:
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), n_vocab] for a fresh sequence starting at position 0."""
        ids = self._sequence_ids(ids, "logits()")
        with self._fresh_sequence("logits()") as (session, fwd):
            return fwd(ids, 0, session.kv, all_logits=True)

    def prompt_logprobs(self, ids: Sequence[int], top_n: int = 0, *,
                        first: int = 0) -> list[TokenLogprob]:
        """Each token's log probability after the tokens before it, for a fresh sequence
        from position 0: len(ids) - 1 entries (the first token has none), each with its
        top_n alternatives (0–20); with `first`, only those of ids[first + 1:] (the
        tokens before are context: their logits are not computed where a whole batch of
        them can skip the output head). The logits are taken PROMPT_CHUNK tokens at a
        time, so memory does not grow with len(ids) × n_vocab; the cache keeps the
        sequence, and a generation from the same ids reuses it."""
        top_n = check_top(top_n, "top_n")
        ids = self._sequence_ids(ids, "prompt_logprobs()")
        if isinstance(first, bool) or not isinstance(first, numbers.Integral) or \
                not 0 <= first < len(ids):
            raise ArgumentError(f"first must be an integer in [0, {len(ids) - 1}], got "
                                f"{first!r}")
        first = int(first)  # (numpy's integers too, as max_tokens takes them)
        out: list[TokenLogprob] = []
        with self._fresh_sequence("prompt_logprobs()") as (session, fwd):
            start = 0
            while start < len(ids):
                # (a batch's rows do not depend on its size: the same bits as the whole
                # sequence at once. A last chunk of one token takes the decode kernels,
                # but its row, the last token's, predicts nothing asked for here)
                end = min(start + PROMPT_CHUNK, len(ids))
                if end <= first:  # context only: the last row's logits, which are cheap
                    fwd(ids[start:end], start, session.kv, all_logits=False)
                else:
                    logits = fwd(ids[start:end], start, session.kv, all_logits=True)
                    # row r predicts token r + 1 (the chunk's last row, the next chunk's
                    # first token): rows from `first` on
                    lo = max(first, start)
                    out += sequence_logprobs(logits[lo - start:], ids[lo:end + 1], top_n)
                session.tokens = ids[:end]
                start = end
        return out

    def _sequence_ids(self, ids, what: str) -> list[int]:
        """A sequence to score: valid token ids, at least one, no more than the context."""
        ids = self._token_ids(ids)
        if not ids:
            raise ArgumentError(f"{what} needs at least one token id")
        if len(ids) > self.n_ctx:
            raise ContextLengthError(f"{len(ids)} token ids; the context holds {self.n_ctx} "
                                     "(raise n_ctx, or pass fewer)")
        return ids

    @contextmanager
    def _fresh_sequence(self, what: str):
        """Under the model's lock, once no generation holds it: (the session, emptied, and
        the forward that fills it). The session's own cache: a second one beside it cost
        memory per call, and on device="cuda" sat outside the VRAM the load planned."""
        with self._lock:
            self._check_open()
            self._wait_idle(what)
            self._session.reset()
            yield self._session, (self._forward if self._compute is None
                                  else self._forward_in_turn)
