"""Model's generation (a mixin of efedge.api.Model, whose lock, session and cancel registry
it uses): a request's arguments checked when it is made, the token loop turned into text
pieces — UTF-8 kept whole, stop strings held back and cut, log-probability offsets, the
JSON / schema constraint — and each piece handed out marked as paused, so close() from
another thread never waits on a consumer that has gone. stream() and generate() here;
chat() in efedge/api_chat.py, scoring in efedge/api_scoring.py.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from efedge.errors import ArgumentError, ContextLengthError
from efedge.fim import infill_ids
from efedge.generate import GenerationResult, StopStringFilter, generate_tokens
from efedge.json_mode import constraint_for
from efedge.logprobs import check_top
from efedge.sampling import Sampler, SamplingParams, check_logit_bias

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                 "repeat_last_n", "seed", "frequency_penalty", "presence_penalty",
                 "logit_bias")


def _max_tokens(max_tokens) -> int:
    """max_tokens checked: a non-negative integer (ArgumentError naming it if not)."""
    if not isinstance(max_tokens, int | np.integer) or isinstance(max_tokens, bool) \
            or max_tokens < 0:
        raise ArgumentError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")
    return int(max_tokens)


class GenerationMixin:
    def _token_ids(self, ids, check_range: bool = True) -> list[int]:
        """Validated token ids: integers inside the vocabulary, named when not."""
        if not isinstance(ids, list | tuple | np.ndarray):
            raise TypeError(f"token ids must be a list of integers, got {type(ids).__name__}")
        out = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int | np.integer):
                raise TypeError(f"token id {i!r} is not an integer")
            i = int(i)
            if check_range and not 0 <= i < self.config.n_vocab:
                raise ArgumentError(f"token id {i} is outside the vocabulary "
                                 f"(0..{self.config.n_vocab - 1})")
            out.append(i)
        return out

    def _params(self, kw: dict[str, Any]) -> SamplingParams:
        unknown = set(kw) - set(SAMPLING_KEYS)
        if unknown:
            raise TypeError(f"unknown sampling argument(s): {', '.join(sorted(unknown))}")
        p = SamplingParams(**kw)
        p.validate()
        check_logit_bias(p.logit_bias, self.config.n_vocab)
        return p

    def _prompt_ids(self, prompt: str | Sequence[int], add_special: bool = True,
                    parse_special: bool = False) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt, add_special=add_special, parse_special=parse_special)
        elif isinstance(prompt, list | tuple | np.ndarray):
            ids = self._token_ids(prompt, check_range=False)  # the context check first
        else:
            raise TypeError(f"prompt must be a string or a list of token ids, got "
                            f"{type(prompt).__name__}")
        if not ids:
            raise ArgumentError("the prompt is empty (and the model adds no BOS token)")
        if len(ids) >= self.n_ctx:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens; the context holds "
                                     f"{self.n_ctx} (raise n_ctx / -c, or shorten it)")
        return self._token_ids(ids)

    def _stream_ids(self, ids: list[int], max_tokens: int, stop, sampling: dict,
                    result: GenerationResult | None,
                    cancel: threading.Event | None, logprobs=None,
                    format=None) -> Iterator[str]:  # noqa: A002 (ollama's name)
        """Validate now (errors surface at call time, not at the first next()), then
        return the generator. The cancel event is registered now too, so a cancel()
        between the call and the first token is not lost."""
        max_tokens = _max_tokens(max_tokens)
        sampler = Sampler(self._params(sampling))
        logprobs = check_top(logprobs)
        constraint = constraint_for(format, self.tokenizer)
        if stop is None or isinstance(stop, str):
            stops = [] if stop is None else [stop]
        elif isinstance(stop, list | tuple) and all(isinstance(s_, str) for s_ in stop):
            stops = list(stop)
        else:
            raise ArgumentError(f"stop must be a string or a list of strings, got {stop!r}")
        self._check_open()
        if result is None:
            result = GenerationResult([], "length")
        else:  # one result object reused for call after call reports this call only (its
            # finish reason is the caller's starting value: the server starts "cancelled")
            del result.tokens[:]
            result.logprobs = result.tool_calls = None
        ev = cancel if cancel is not None else threading.Event()
        with self._cancel_lock:
            self._active_cancels.add(ev)
        gen = self._generate_text(ids, max_tokens, stops, sampler, result, ev, logprobs,
                                  constraint)
        # a generator dropped before its first next() never runs its finally: forget its
        # event when it is collected, or each such call stays registered for good (the
        # set only grew in an app that builds streams it may not consume). set.discard is
        # atomic, so the finalizer needs no lock wherever the collector runs it
        weakref.finalize(gen, self._active_cancels.discard, ev)
        return gen

    def _generate_text(self, ids, max_tokens, stops, sampler, result, ev,
                       logprobs=None, constraint=None) -> Iterator[str]:
        try:
            with self._lock:
                self._check_open()
                self._wait_idle("generate()/stream()/chat()")
                self._owner = threading.current_thread()
                self._owned_by = token = object()  # this generation's claim
                session = self._session
            sent = 0  # characters handed to the caller
            filt = StopStringFilter(stops)
            try:
                self.last_result = result
                decoder = self.tokenizer.stream_decoder()
                made = 0  # characters the decoder made: where the next token's text starts
                for tok in generate_tokens(session, ids, sampler, max_tokens=max_tokens,
                                           eog=self.tokenizer.eog_ids, cancel=ev,
                                           result=result, logprobs=logprobs,
                                           constraint=constraint):
                    piece = decoder.push(tok)
                    if logprobs is not None:
                        result.logprobs[-1].offset = made
                    made += len(piece)
                    text = filt.push(piece)
                    sent += len(text)
                    if text:
                        yield from self._pause(token, text)
                        if self._closed or self._owned_by is not token:
                            # closed while paused here (the model is gone), or resumed
                            # after the thread that ran it ended and another took over
                            result.finish_reason = "cancelled"
                            return
                    if filt.stopped:
                        result.finish_reason = "stop"
                        return
                tail = filt.push(decoder.flush())
                tail += filt.flush()
                sent += len(tail)
                if tail:
                    yield from self._pause(token, tail)
            finally:
                if result.logprobs is not None and (filt.stopped or
                                                    result.finish_reason == "cancelled"):
                    # only the tokens whose text was handed out: not those of the stop
                    # string, nor those whose text a cancel left unsent
                    result.logprobs = [e for e in result.logprobs if e.offset < sent]
                self._release(token)
        finally:
            with self._cancel_lock:
                self._active_cancels.discard(ev)

    def _pause(self, token, text: str) -> Iterator[str]:
        """Yield one piece, marked as paused: close() from another thread then goes ahead
        instead of waiting for a consumer that may never come back (a worker blocked on a
        full queue the closing UI no longer reads hung close() for good). The mark goes
        under the lock before the generation looks at _closed again, so either close()
        waits for it or it sees the model closed and touches nothing."""
        with self._lock:
            self._paused_by = token
            self._idle.notify_all()
        try:
            yield text
        finally:
            with self._lock:
                if self._paused_by is token:
                    self._paused_by = None

    def stream(self, prompt: str | Sequence[int], *, max_tokens: int = 128, stop=None,
               result: GenerationResult | None = None,
               cancel: threading.Event | None = None, logprobs: int | None = None,
               format: str | dict | None = None, **sampling) -> Iterator[str]:  # noqa: A002
        """Yield text pieces as they are generated (never half a UTF-8 character).

        `result` (a GenerationResult) receives the token ids and the finish reason
        ("stop", "length" or "cancelled"), and with `logprobs=N` (0–20) each generated
        token's log probability under the model (log-softmax of its logits, before any
        sampling setting) with its N most probable alternatives (efedge.logprobs); `cancel`
        is an Event that stops this call only (Model.cancel() stops every call in
        progress). `format="json"`: the output is one JSON object (efedge.json_mode); a
        dict: a JSON schema, the output one instance of it (efedge.json_schema says which
        keywords are taken). Either ends as the value closes, unless max_tokens or a stop
        string cut it first."""
        ids = self._prompt_ids(prompt)
        return self._stream_ids(ids, max_tokens, stop, sampling, result, cancel, logprobs,
                                format)

    def generate(self, prompt: str | Sequence[int], *, max_tokens: int = 128, stop=None,
                 result: GenerationResult | None = None, logprobs: int | None = None,
                 format: str | dict | None = None, **sampling) -> str:  # noqa: A002
        """Generated text (without the prompt); `result`, `logprobs` and `format` as for
        stream()."""
        return "".join(self.stream(prompt, max_tokens=max_tokens, stop=stop, result=result,
                                   logprobs=logprobs, format=format, **sampling))

    def infill_prompt(self, prefix: str, suffix: str = "", *, prompt: str = "",
                      extra=None, max_tokens: int = 0) -> list[int]:
        """The token ids of a fill-in-the-middle request, as llama.cpp's /infill builds them
        (efedge.fim: the markers of the model's vocab, the prefix / suffix / extra files
        cut to fit); UnsupportedModelError for a model without FIM tokens."""
        return infill_ids(self.tokenizer, prefix, suffix, prompt=prompt, extra=extra,
                          n_ctx=self.n_ctx, n_predict=_max_tokens(max_tokens))

    def infill(self, prefix: str, suffix: str = "", *, prompt: str = "", extra=None,
               max_tokens: int = 128, stream: bool = False, stop=None,
               result: GenerationResult | None = None, cancel: threading.Event | None = None,
               logprobs: int | None = None, **sampling) -> str | Iterator[str]:
        """The code between `prefix` and `suffix` (the middle a code model trained for
        fill-in-the-middle writes, until its end-of-generation token); `prompt` is the
        start of the middle already typed, `extra` other files as context ([{"text",
        "filename"}], llama.cpp's input_extra). The text, or with stream=True an iterator
        of pieces; the other arguments as for stream()."""
        ids = self.infill_prompt(prefix, suffix, prompt=prompt, extra=extra,
                                 max_tokens=max_tokens)
        pieces = self.stream(ids, max_tokens=max_tokens, stop=stop, result=result,
                             cancel=cancel, logprobs=logprobs, **sampling)
        return pieces if stream else "".join(pieces)
