"""Token generation: prefill the prompt as one batch, then decode token by token with the
KV cache, sampling each next token; stop on end-of-generation tokens, stop strings,
max_tokens, the end of the context, or a cancel request from another thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from efedge.experts.stats import Counters
from efedge.kv_cache import KVCache
from efedge.logprobs import TokenLogprob, token_logprob
from efedge.sampling import Sampler


@dataclass
class GenerationResult:
    tokens: list[int]
    finish_reason: str  # "stop" (EOG token or stop string), "length", "cancelled"
    # with logprobs=N: one entry per generated token whose text the caller received
    # (tokens of a stop string that cut the text are left out), else None
    logprobs: list[TokenLogprob] | None = None
    # Model.chat with tools: the calls parsed from the reply (efedge.tool_calls), [] for
    # none; None when no tools were offered
    tool_calls: list[dict] | None = None


class Session:
    """A model plus its KV cache, reusing the cached prefix of the previous prompt (so a
    chat turn only prefills what is new)."""

    def __init__(self, forward: Callable[..., np.ndarray], kv: KVCache, counters: Counters):
        self._forward = forward
        self.kv = kv
        self.counters = counters
        self.tokens: list[int] = []  # what the KV cache holds, in order

    def reset(self) -> None:
        self.tokens = []
        self.kv.clear()

    def _run(self, tokens: Sequence[int], pos: int, all_logits: bool) -> np.ndarray:
        t0 = time.perf_counter()
        stall0 = self.counters.stall_s
        logits = self._forward(tokens, pos, self.kv, all_logits=all_logits)
        dt = time.perf_counter() - t0
        self.counters.wall_s += dt
        self.counters.compute_s += dt - (self.counters.stall_s - stall0)
        self.tokens = self.tokens[:pos] + list(tokens)
        return logits

    def prefill(self, prompt: Sequence[int]) -> np.ndarray:
        """Evaluate the prompt, reusing the longest cached prefix; logits of its last token."""
        n = 0
        # evaluate at least two tokens (one when the prompt has one): a batch of two or
        # more goes through the batched kernels, whose result for a token does not depend
        # on the batch, so the logits equal those of the whole prompt evaluated afresh;
        # one token alone takes the decode kernels, which sum in another order (~1e-4
        # apart: enough to flip a greedy choice at a near-tie when a prompt is repeated)
        limit = min(len(self.tokens), max(len(prompt) - 2, 0))
        while n < limit and self.tokens[n] == prompt[n]:
            n += 1
        self.kv.truncate(n)
        self.tokens = self.tokens[:n]
        self.kv.check_room(n, len(prompt) - n)
        t0 = time.perf_counter()
        logits = self._run(prompt[n:], n, all_logits=False)
        self.counters.prompt_s += time.perf_counter() - t0
        self.counters.tokens_prompt += len(prompt) - n
        return logits[-1]

    def decode(self, token: int) -> np.ndarray:
        t0 = time.perf_counter()
        logits = self._run([token], len(self.tokens), all_logits=False)
        self.counters.decode_s += time.perf_counter() - t0
        self.counters.tokens_generated += 1
        return logits[-1]


def generate_tokens(session: Session, prompt: Sequence[int], sampler: Sampler, *,
                    max_tokens: int, eog: frozenset[int],
                    cancel: threading.Event | None = None,
                    result: GenerationResult | None = None,
                    logprobs: int | None = None, constraint=None) -> Iterator[int]:
    """Yield generated token ids. An EOG token ends generation and is not yielded.
    `result` (if given) receives the tokens and the finish reason; with `logprobs` (the
    number of alternatives, 0 for none) also each yielded token's log probability,
    appended before the token is yielded. `constraint` (json_schema.SchemaConstraint):
    only tokens it allows are drawn, and generation stops ("stop") once it is done."""
    result = result if result is not None else GenerationResult([], "length")
    result.logprobs = [] if logprobs is not None else None
    history = list(prompt)
    logits = session.prefill(prompt)
    n_ctx = session.kv.n_ctx
    for _ in range(max_tokens):
        if cancel is not None and cancel.is_set():
            result.finish_reason = "cancelled"
            return
        tok = sampler(logits, history) if constraint is None else \
            sampler.sample_where(logits, history, constraint.allows)
        if tok in eog:
            result.finish_reason = "stop"
            return
        history.append(tok)
        result.tokens.append(tok)
        if logprobs is not None:  # (the sampler does not change the logits it is given)
            result.logprobs.append(token_logprob(logits, tok, logprobs))
        if constraint is not None:
            constraint.accept(tok)
        yield tok
        if constraint is not None and constraint.done:
            result.finish_reason = "stop"
            return
        if len(history) >= n_ctx:  # prompt + output fill the context (llama.cpp's limit)
            result.finish_reason = "length"
            return
        logits = session.decode(tok)
    result.finish_reason = "length"


def prefix_tail(text: str, s: str) -> int:
    """The length of the longest tail of `text` that is a proper prefix of `s`: what to
    hold back in case `s` is starting."""
    return next((n for n in range(min(len(s) - 1, len(text)), 0, -1)
                 if text.endswith(s[:n])), 0)


class StopStringFilter:
    """Holds back text that might be the start of a stop string; reports when one appears."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        self.buf += text
        # the earliest stop string in the text wins, whatever its place in the list: one
        # piece may hold two (".\n\n" with stops ["\n\n", "."]), and cutting at the later
        # one would put the earlier stop string in the output
        found = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            out, self.buf = self.buf[:min(found)], ""
            return out
        # keep the longest tail that is a prefix of some stop string
        keep = max(prefix_tail(self.buf, s) for s in self.stops)
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return "" if self.stopped else out
