"""The server's model thread: every generation runs on one thread that owns the model,
in arrival order, while the HTTP threads wait for its events (efedge/server.py).

A request is a `Job`: the worker puts ("start", n_prompt, echo_text, prompt_logprobs),
("text", piece, logprobs, n_generated) … (n_generated: the tokens generated when the piece
went out; and for a thinking model's reasoning ("reasoning", piece, logprobs) …, first),
then ("done", usage, finish_reason, logprobs, tool_calls) or
("error", exception) on its queue. With tools, the text is the reply's content
(efedge.tool_calls.CallStream holds back a <tool_call> block from its start), tool_calls
the calls parsed from it (None without tools) and the finish reason "tool_calls" when
there are some. The logprobs are efedge.server_logprobs records (None when the
request asked for none): the echoed prompt's tokens, then those generated tokens whose
text has been sent (a token's record goes with the piece its text starts in; what is
left, with "done"). A job whose
client left is skipped, or its generation cancelled; `stop()` cancels the generation in
progress and answers every waiting request 503 `server_shutting_down`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

from efedge.api import Model
from efedge.context_fit import OLLAMA_NUM_KEEP, cut_middle, fit_turns, reply_room
from efedge.errors import EfedgeError, UnsupportedModelError
from efedge.fim import IndentStop
from efedge.generate import GenerationResult
from efedge.reasoning import ReasoningSplitter, is_harmony_template, prompt_opens_thinking
from efedge.server_logprobs import prompt_records, records
from efedge.server_requests import APIError, GenRequest
from efedge.tool_calls import CallStream, harmony_call, tool_names

log = logging.getLogger("efedge.server")


def fit_ollama(m: Model, req: GenRequest, ids: list[int]) -> list[int]:
    """An Ollama request's prompt made to fit the context, as Ollama does rather than
    refuse it (efedge.context_fit): a chat's oldest turns dropped (never its system prompt
    or newest message) until the reply has room, as `efedge chat` does; a prompt that does
    not fit at all even so — one long message, a raw prompt, a `context` — cut to its first
    tokens and its end, leaving the reply that room. Logged, as Ollama logs it."""
    n_ctx = m.n_ctx
    room = reply_room(n_ctx, req.max_tokens)
    if len(ids) + room <= n_ctx:
        return ids
    if req.messages is not None and not req.context:
        def render(msgs):
            return m.chat_prompt(msgs, tools=req.tools, template_kwargs=req.template_kwargs)
        fit = fit_turns(render, req.messages, n_ctx, room)
        if fit is not None:
            msgs, fitted, dropped = fit
            if dropped:
                log.warning("the conversation outgrew the %d-token context: dropped the "
                            "oldest %d turn(s), %d -> %d tokens", n_ctx, dropped, len(ids),
                            len(fitted))
            req.messages, ids = msgs, fitted
    if len(ids) < n_ctx:
        return ids
    limit = n_ctx - room
    log.warning("truncating input prompt: limit=%d prompt=%d keep=%d new=%d", limit,
                len(ids), OLLAMA_NUM_KEEP, limit)
    return cut_middle(ids, limit)
MAX_QUEUE = 64  # requests waiting for the model before new ones get 503


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", "server_shutting_down",
                    type_="server_error")


class Job:
    def __init__(self, req: GenRequest):
        self.req = req
        # ("start", n_prompt, echo_text, recs) ("text", s, recs, n_generated)
        # ("reasoning", s, recs) ("done", usage, finish, recs, tool_calls) ("error", exc):
        # see the module docstring
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.finish: str | None = None  # the finish reason, once the generation has ended
        # the generated ids: while it runs the growing list (read up to a "text" event's
        # count), once it has ended a copy
        self.tokens: list[int] = []
        self.prompt_ids: list[int] = []  # the prompt's ids, once it has run
        self.stopping_word: str | None = None  # the stop string that ended it, if one did


class ModelWorker:
    """One thread that runs every generation on the model, in arrival order."""

    def __init__(self, model: Model, max_queue: int = MAX_QUEUE):
        self.model = model
        self._max_queue = max_queue
        self._jobs: deque[Job | None] = deque()  # waiting, in arrival order; None: stop
        self._current: Job | None = None
        self._lock = threading.Lock()
        self._queued = threading.Condition(self._lock)
        self._stopping = False
        self.n_cancelled = 0  # generations cut short (client gone, shutdown)
        self._harmony: bool | None = None  # whether the tools template is gpt-oss's
        self._thread = threading.Thread(target=self._loop, name="efedge-model", daemon=True)
        self._thread.start()

    def _harmony_tools(self) -> bool:
        """Whether the model's tools template writes harmony messages (gpt-oss): asked
        once, by the first request with tools (the server has checked that template)."""
        if self._harmony is None:
            self._harmony = is_harmony_template(self.model.chat_template(tools=True).source)
        return self._harmony

    def submit(self, req: GenRequest) -> Job:
        job = Job(req)
        with self._lock:  # under the lock: nothing is queued once stop() has drained
            if self._stopping:
                raise _shutting_down()
            if len(self._jobs) >= self._max_queue:
                # requests whose clients left while they waited hold no place in the line
                # (a burst of them would otherwise answer new ones 503)
                self._jobs = deque(j for j in self._jobs if not j.cancelled.is_set())
                if len(self._jobs) >= self._max_queue:
                    raise APIError(503, f"{len(self._jobs)} requests are already waiting; "
                                        "try again later", "server_busy", type_="server_error",
                                   headers={"Retry-After": "1"})
            self._jobs.append(job)
            self._queued.notify()
        return job

    def waiting(self) -> int:
        """Requests waiting for the model (not those whose clients have left)."""
        with self._lock:
            return sum(1 for j in self._jobs if j is not None and not j.cancelled.is_set())

    def processing(self) -> int:
        """Requests the model is running now (0 or 1: one at a time)."""
        with self._lock:
            return int(self._current is not None)

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        with self._lock:
            if self._current is job:
                self.model.cancel()

    def stop(self) -> None:
        """Cancel the generation in progress (it ends with finish_reason "cancelled"),
        answer the waiting requests 503 instead of running them, and end the thread."""
        with self._lock:
            self._stopping = True
            if self._current is not None:
                self._current.cancelled.set()
                self.model.cancel()
            for job in self._jobs:
                if job is not None:
                    job.events.put(("error", _shutting_down()))
            self._jobs.clear()
            self._jobs.append(None)
            self._queued.notify()
        self._thread.join(timeout=10)

    def _next_job(self) -> Job | None:
        """The next request to run (None: stop), waiting for one; a request whose client
        has left is skipped."""
        with self._lock:
            while True:
                while not self._jobs:
                    self._queued.wait()
                job = self._jobs.popleft()
                if job is None or not job.cancelled.is_set():
                    self._current = job
                    return job

    def _loop(self) -> None:
        while (job := self._next_job()) is not None:
            try:
                self._run(job)
            except (APIError, EfedgeError, ValueError, TypeError) as exc:
                job.events.put(("error", exc))
            except Exception as exc:  # keep serving whatever one request did
                log.exception("request failed")
                job.events.put(("error", exc))
            finally:
                with self._lock:
                    self._current = None

    def _run(self, job: Job) -> None:
        m, req = self.model, job.req
        if req.messages is not None:
            ids = m.chat_prompt(req.messages, tools=req.tools,
                                template_kwargs=req.template_kwargs)
            if req.context:  # the conversation so far, then this turn (the context's BOS)
                bos = m.tokenizer.add_bos and ids[:1] == [m.tokenizer.bos_id]
                ids = req.context + (ids[1:] if bos else ids)
        elif req.infill is not None:
            try:  # laid out for the server's n_predict (none), as llama-server lays out
                # /infill's: the request's bounds the answer only
                ids = m.infill_prompt(**req.infill)
            except UnsupportedModelError as exc:
                raise APIError(400, str(exc), "unsupported", param="input_prefix"
                               if req.native else "suffix") from None
        elif isinstance(req.prompt, str):
            ids = m.tokenize(req.prompt)
        else:  # token ids; a text piece among them (llama-server's mixed prompt) is
            # tokenized where it stands, the BOS only for a first piece, as llama-server
            ids = [t for i, piece in enumerate(req.prompt) for t in (
                m.tokenize(piece, add_special=i == 0) if isinstance(piece, str) else (piece,))]
            bad = [t for t in ids if not 0 <= t < m.n_vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary "
                                    f"[0, {m.n_vocab})", "invalid_value", param="prompt")
        if req.ollama is not None:
            ids = fit_ollama(m, req, ids)
        n_prompt, job.prompt_ids = len(ids), list(ids)
        if not n_prompt:  # "" where the vocab adds no BOS: nothing to continue
            raise APIError(400, "the prompt is empty (and the model adds no BOS token)",
                           "invalid_value", param="prompt")
        if n_prompt >= m.n_ctx:
            raise APIError(400, f"the prompt has {n_prompt} tokens; the context holds "
                                f"{m.n_ctx}", "context_length_exceeded",
                           param="prompt" if req.messages is None else "messages")
        room = m.n_ctx - n_prompt
        max_tokens = room if req.max_tokens is None else min(req.max_tokens, room)
        echo = ""
        if req.echo:  # the prompt as given, or the text of its token ids
            echo = req.prompt if isinstance(req.prompt, str) else m.detokenize(ids)
        if job.cancelled.is_set():
            if self._stopping:  # the client still waits for an answer
                raise _shutting_down()
            return  # the client is gone: nobody reads the events
        lp, tok = req.logprobs, m.tokenizer
        prompt_recs = None
        if req.echo and lp is not None:  # the prompt's own log probabilities first (its
            # evaluation stays in the cache: the generation below reuses it)
            prompt_recs = prompt_records(tok, ids, m.prompt_logprobs(ids, lp),
                                         skip_special=isinstance(req.prompt, str))
        started = False
        # the model fills in how the generation really ended ("stop", "length" or
        # "cancelled"); it keeps "cancelled" when we stop reading early (below)
        result = GenerationResult([], "cancelled")
        job.tokens = result.tokens
        it = m.stream(ids, max_tokens=max_tokens, stop=req.stop, result=result,
                      logprobs=lp, format=req.format, **req.sampling)
        # characters of the generated text written, and of those decided (sent, or dropped
        # as reasoning tags); generated tokens whose records went
        written = sent = released = 0
        calls = CallStream(req.tools) if req.tools is not None else None
        # a thinking model's reasoning goes apart ("reasoning" events), the rest on; a
        # format (JSON, a schema, a forced call) constrains the reply from its first token,
        # so what follows a <think> the template opened is the answer, not reasoning
        # (deepseek-legacy, streamed: the reasoning in its tags goes out as content, around
        # the tool-call parser all the same: a <tool_call> in it is no call)
        splitter = ReasoningSplitter(req.format is None and prompt_opens_thinking(
            m.detokenize(ids[-8:])), tags=req.reasoning_in_content) \
            if req.reasoning else None
        # gpt-oss with tools: its calls are harmony messages the splitter finds, so it
        # reads the reply whatever the reasoning format (none: the analysis left out)
        drop = req.drop_reasoning
        if splitter is None and calls is not None and self._harmony_tools():
            splitter, drop = ReasoningSplitter(), True
        harmony_calls: list[dict] = []
        names = tool_names(req.tools) if req.tools is not None else []

        def release() -> list[dict] | None:
            """The records of the tokens whose text starts in what has been sent."""
            nonlocal released
            if lp is None:
                return None
            entries, first = result.logprobs, released
            while released < len(entries) and entries[released].offset < sent:
                released += 1
            return records(tok, entries[first:released], len(echo))

        def emit(parts: list[tuple[str, str]], upto: int) -> None:
            """Put the parts' events; `upto`: the generated text they end (what the
            reasoning splitter holds back excluded), whose tokens' records go with them."""
            nonlocal sent
            for kind, piece in parts:
                if kind == "call":  # a harmony message to a recipient: a call, or content
                    call = harmony_call(piece, names) if calls is not None else None
                    if call is not None:
                        harmony_calls.append(call)
                        continue
                if kind == "reasoning":  # (its tokens' records with it, not the answer's)
                    sent = upto
                    if drop:
                        release()
                        continue
                    job.events.put(("text", piece, release(), len(result.tokens))
                                   if req.reasoning_in_content
                                   else ("reasoning", piece, release()))
                    continue
                if calls is not None:
                    piece = calls.push(piece)
                    if not piece:
                        continue
                sent = upto - (len(calls.held) if calls is not None else 0)
                job.events.put(("text", piece, release(), len(result.tokens)))

        # (native) llama-server's code-completion stops: an indentation limit, and a time
        # limit checked at each newline, counted from the first piece
        indent = IndentStop(req.n_indent) if req.n_indent > 0 else None
        t_first = None
        limited = False  # one of them ended the reply ("length": llama-server's "limit")
        try:
            for piece in it:
                if not started:
                    job.events.put(("start", n_prompt, echo, prompt_recs))
                    started = True
                if job.cancelled.is_set():
                    break
                now = time.monotonic()
                t_first = t_first or now
                if indent is not None:
                    piece = indent.push(piece)
                limited = (indent is not None and indent.stopped) or (
                    0 < req.t_max_predict_ms < 1e3 * (now - t_first) and "\n" in piece)
                written += len(piece)
                if splitter is not None:
                    emit(splitter.push(piece), written - len(splitter.buf))
                elif piece:
                    emit([("content", piece)], written)
                if limited:
                    break
        finally:
            it.close()
        if not started:
            job.events.put(("start", n_prompt, echo, prompt_recs))
        if indent is not None and (tail := indent.finish()):
            written += len(tail)
            emit([("content", tail)], written)
        if splitter is not None:
            emit(splitter.finish(), written)
        n_gen, job.finish = len(result.tokens), "length" if limited else result.finish_reason
        job.tokens = list(result.tokens)
        if job.finish == "stop" and req.stop and not (
                result.tokens and result.tokens[-1] in tok.eog_ids):
            full = m.detokenize(result.tokens)  # the stop string is in the ids' text
            hits = [(full.find(s), s) for s in req.stop if s and s in full]
            job.stopping_word = min(hits)[1] if hits else None
        if job.finish == "cancelled":
            self.n_cancelled += 1
        found = None
        if calls is not None:
            tail, found = calls.finish()
            found = found + harmony_calls
            found = found[:1] if not req.parallel_tool_calls else found
            if tail:
                # (its tokens' records go with "done")
                job.events.put(("text", tail, None, n_gen))
            if found and job.finish == "stop":  # as llama.cpp: "length" stays "length"
                job.finish = "tool_calls"
        # what is left: the model has dropped the records of a stop string's tokens
        rest = None if lp is None else records(tok, result.logprobs[released:], len(echo))
        job.events.put(("done", {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
                                 "total_tokens": n_prompt + n_gen}, job.finish, rest,
                        found))
