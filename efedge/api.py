"""The public Model: load a GGUF file, score, generate, stream and chat.

Thread safety: one Model runs one request at a time. Calls from several threads are
serialised by a lock (the second waits); `cancel()` may be called from any thread and
stops the generation in progress at the next token.
"""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from efedge import demo, kernels
from efedge.config import ModelConfig, config_from_gguf
from efedge.errors import (
    ArgumentError,
    ContextLengthError,
    EfedgeError,
    ModelClosedError,
    UnsupportedModelError,
)
from efedge.experts.stats import Counters
from efedge.experts.store import ResidentExperts
from efedge.generate import GenerationResult, Session, StopStringFilter, generate_tokens
from efedge.gguf_file import GGUFFile
from efedge.json_mode import constraint_for
from efedge.logprobs import TokenLogprob, check_top, sequence_logprobs
from efedge.model import Transformer
from efedge.sampling import Sampler, SamplingParams
from efedge.tokenizer import Tokenizer
from efedge.tool_calls import (
    check_template,
    check_tools,
    forced_call_grammar,
    parse_tool_calls,
    render_messages,
    resolve_choice,
)

log = logging.getLogger("efedge")
DEFAULT_CTX = 4096
PROMPT_CHUNK = 256  # prompt_logprobs: tokens per forward call (logits memory: × n_vocab)
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                 "repeat_last_n", "seed", "frequency_penalty", "presence_penalty")


ROUTINGS = ("exact", "cache-aware")

# numba's workqueue threading layer — what pip's numba falls back to without OpenMP or
# TBB, as on many Macs — aborts the whole process when parallel kernels run in two threads
# at once ("Concurrent access has been detected"); OpenMP and TBB do not mind. Where
# numba runs on it, every Model's compute (the load-time warm-up, each forward pass)
# takes this lock, so two Models in two threads take turns instead of crashing. Elsewhere
# it is never taken.
_WORKQUEUE_LOCK = threading.RLock()


def _compute_lock() -> threading.RLock | None:
    """_WORKQUEUE_LOCK where numba's threading layer is workqueue, else None."""
    import numba

    numba.get_num_threads()  # loads the threading layer (numba picks it at first use)
    try:
        return _WORKQUEUE_LOCK if numba.threading_layer() == "workqueue" else None
    except ValueError:  # no layer loaded after all: nothing known to serialise
        return None


def _check_policy(policy) -> None:
    """A policy name that names none is an error even where no expert cache will use it
    (cache=None, a dense model): `--policy expertflw` must not pass unnoticed."""
    from efedge.experts.scheduler import Policy, policy_class

    if not isinstance(policy, Policy):
        policy_class(policy)


def _check_workers(workers) -> None:
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise ArgumentError(f"transfer_workers must be a positive integer (or None: "
                            f"chosen for the link), got {workers!r}")


def _routing_slack(routing: str, slack, cache, cuda: bool) -> float:
    """The slack the forward pass uses: 0 for exact routing (outputs identical to
    llama.cpp), `slack` (a router probability, 0 < slack < 1) for cache-aware routing."""
    if routing not in ROUTINGS:
        raise ArgumentError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
    if routing == "exact":
        return 0.0
    if isinstance(slack, bool) or not isinstance(slack, int | float) or not 0 < slack < 1:
        raise ArgumentError(f"routing_slack must be a router probability in (0, 1), "
                         f"got {slack!r}")
    if cuda:
        raise UnsupportedModelError("routing='cache-aware' is implemented for device='cpu' "
                                    "only")
    if cache is None:
        log.warning("routing='cache-aware' has no effect without an expert cache (cache=...): "
                    "every expert is resident")
    return float(slack)


class Model:
    """A loaded GGUF model. Prefer `efedge.load(...)`; use as a context manager or call
    `close()` to release the mapping."""

    def __init__(self, path: str | Path | None = None, *, device: str = "cpu",
                 cache: int | str | None = None, policy: str = "expertflow",
                 threads: int | None = None, n_ctx: int | None = None,
                 link: str | None = None, chat_template: str | None = None,
                 progress: Callable[[float, str], None] | None = None,
                 transfer_workers: int | None = None, vram: int | str | None = None,
                 hybrid: str = "auto", routing: str = "exact",
                 routing_slack: float = 0.05, host_cache: int | str | None = None,
                 disk_link: str | None = None):
        # "cuda:N" with N an index: anything else after "cuda:" ("cuda:x", "cuda:-1")
        # reached torch.device, whose RuntimeError was a traceback instead of this error
        cuda = isinstance(device, str) and (
            device == "cuda" or (device.startswith("cuda:") and device[5:].isascii()
                                 and device[5:].isdigit()))
        if device != "cpu" and not cuda:
            raise UnsupportedModelError(f"device {device!r} is not available in this build "
                                        "(supported: 'cpu', 'cuda', 'cuda:N')")
        if vram is not None and not cuda:
            raise EfedgeError("vram= is the device memory budget of device='cuda'")
        if host_cache is not None and not cuda:
            raise EfedgeError("host_cache= is a second expert-cache level in pinned host memory "
                              "for device='cuda' (on the CPU the expert cache itself is in "
                              "host memory: use cache=)")
        if disk_link is not None and not cuda:
            raise EfedgeError("disk_link= emulates the disk behind host_cache= of "
                              "device='cuda' (on the CPU, link= emulates the disk)")
        if threads is not None:
            import numba

            if not isinstance(threads, int) or threads < 1:
                raise ArgumentError(f"threads must be a positive integer, got {threads!r}")
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        slack = _routing_slack(routing, routing_slack, cache, cuda)
        _check_workers(transfer_workers)
        _check_policy(policy)
        # `~` expanded here: Windows shells pass it through, and API callers write it too
        self.path = Path(path).expanduser() if path is not None else demo.demo_model_path()
        self.policy = policy
        self.routing = routing
        self.link = None
        self._progress = progress or (lambda frac, msg: None)
        self._progress(0.0, f"mapping {self.path.name}")
        self._gf = GGUFFile(self.path)
        self._compute = _compute_lock()
        computing = self._compute or nullcontext()
        try:
            self.config: ModelConfig = config_from_gguf(self._gf)
            if slack > 0 and self.config.spec.routing != "softmax":
                # deepseek2's groups / selection bias / sigmoid weights and gpt-oss's
                # softmax over the k chosen logits have no "router probability" to swap by
                raise UnsupportedModelError(
                    f"routing='cache-aware' is not supported for architecture "
                    f"{self.config.arch!r} (its routing is {self.config.spec.routing!r}); "
                    "use routing='exact'")
            self.tokenizer = Tokenizer.from_metadata(self._gf.metadata)
            self._progress(0.3, "reading weights")
            self.counters = Counters()
            ctx = n_ctx if n_ctx is not None else min(self.config.n_ctx_train, DEFAULT_CTX)
            if not isinstance(ctx, int) or isinstance(ctx, bool) or ctx < 1:
                raise ContextLengthError(f"n_ctx must be a positive integer, got {n_ctx!r}")
            if ctx > self.config.n_ctx_train > 0:  # allowed (llama.cpp too), but say so
                log.warning("n_ctx %d is larger than the %d tokens the model was trained on: "
                            "quality falls beyond them", ctx, self.config.n_ctx_train)
            self.n_ctx = ctx
            self._experts = None
            # the warm-up compiles the kernels on the first run after an install
            notice = kernels.compile_notice(lambda: self._progress(
                0.3, "compiling kernels for this CPU (first run only: 1-3 min)"))
            if cuda:
                from efedge.experts.transfer import LINK_WORKERS
                from efedge.gpu import load_cuda_model

                with computing, notice:
                    self._tf = load_cuda_model(
                        self._gf, config=self.config, device=device,
                        cache=cache, policy=policy, link=link, vram=vram, n_ctx=ctx,
                        counters=self.counters,
                        workers=LINK_WORKERS if transfer_workers is None else transfer_workers,
                        hybrid=hybrid,
                        host_cache=host_cache, disk_link=disk_link)
                self.link = self._tf.link  # the device model owns its expert cache
            else:
                with computing, notice:
                    self._tf = Transformer(self._gf, self.config)
                self._experts = self._expert_source(cache, policy, link, transfer_workers)
                self._tf.routing_slack = slack
            self._session = Session(self._forward if self._compute is None
                                    else self._forward_in_turn,
                                    self._tf.new_kv_cache(ctx), self.counters)
            self._chat_template_name = chat_template
            self._template = None
            self._tool_template = None  # the GGUF's tool_use variant (chat_template())
        except BaseException:
            for part in (getattr(self, "_experts", None), getattr(self, "_tf", None)):
                if part is not None and hasattr(part, "close"):
                    part.close()
            self._gf.close()
            raise
        # _lock guards short sections; a generation does not hold it across its yields
        # (a generator abandoned mid-way would keep it, owned by a thread that may be
        # gone, and its finalizer — run by the garbage collector in any thread — could not
        # release it). It owns the model through _owner instead: any thread can free that.
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)  # _owner became None
        self._owner: threading.Thread | None = None  # the thread whose generation runs
        self._owned_by: object | None = None  # … and that generation's token
        self._paused_by: object | None = None  # the token of one paused at a yield
        self._cancel_lock = threading.Lock()
        self._active_cancels: set[threading.Event] = set()
        self.last_result: GenerationResult | None = None
        self._closed = False
        # a Model dropped without close() stops its workers when it is collected: they
        # hold the engine, and through it a file descriptor, the mapping and the cache's
        # memory, for the life of the process (an app that reloads models leaked each).
        # Not at exit: those threads are daemons, and the process frees it all anyway
        self._finalizer = weakref.finalize(self, _close_parts, self._experts, self._tf)
        self._finalizer.atexit = False
        self._progress(1.0, "ready")

    # -- internals ----------------------------------------------------------------------
    def _expert_source(self, cache, policy, link, workers):
        """Resident experts (cache=None) or the streaming cache within a byte budget."""
        if not self.config.is_moe:
            if cache is not None or link is not None:
                log.info("dense model: cache= and link= have no effect")
            return None
        store = self._tf.store
        if cache is None:
            if link is not None:
                raise EfedgeError("link= emulates expert transfers and needs an expert cache "
                                  "(cache=...)")
            return ResidentExperts(store, self.counters)
        from efedge.experts.cache import ExpertCache, parse_budget
        from efedge.experts.link import parse_link
        from efedge.experts.native_engine import make_engine
        from efedge.experts.scheduler import make_policy
        from efedge.experts.selection import RouterSelection
        from efedge.experts.streaming import StreamingExperts

        budget = parse_budget(cache, store.total_bytes())
        pol = make_policy(policy)
        link_obj = parse_link(link)
        ecache = ExpertCache(store, budget, self.config.n_expert_used)
        if link_obj is None:  # experts reach compute only through the slots now; an
            store.drop_page_cache()  # emulated link reads them from the page cache
        engine = make_engine(self.path, store, ecache, self.counters, link_obj, workers)
        try:  # (the policy's attach can refuse, e.g. a trace of another model)
            source = StreamingExperts(store, ecache, engine, pol, self.counters,
                                      routers=[b.ffn_gate_inp for b in self._tf.blocks],
                                      n_active=self.config.n_expert_used,
                                      selection=RouterSelection.of_model(self._tf))
        except BaseException:
            engine.close()  # its threads and file descriptors
            raise
        self._tf.on_route = source.on_route
        self._tf.on_pass = source.on_pass
        self.link = link_obj
        return source

    def _forward(self, tokens, pos, kv, all_logits=True):
        return self._tf.forward(tokens, pos, kv, self._experts, all_logits=all_logits)

    def _forward_in_turn(self, tokens, pos, kv, all_logits=True):
        """_forward under _WORKQUEUE_LOCK (numba's workqueue layer: see there)."""
        with self._compute:
            return self._forward(tokens, pos, kv, all_logits=all_logits)

    def _check_open(self) -> None:
        if self._closed:
            raise ModelClosedError("this model has been closed")

    def _wait_idle(self, what: str) -> None:
        """With the lock held: wait until no generation owns the session. Another
        thread's generation is waited for; this thread's own, paused mid-way (its
        iterator not finished), is an error — the call would reset the session under
        it and both outputs would be wrong."""
        while self._owner is not None:
            if self._owner is threading.current_thread():
                raise EfedgeError(f"{what}: a generation on this Model is still in progress "
                                  "in this thread (its iterator is not finished): exhaust or "
                                  "close it first, or use one Model per concurrent generation")
            if not self._owner.is_alive():  # abandoned by a thread that has ended
                self._owner = self._owned_by = None
                break
            self._idle.wait(0.5)
            self._check_open()

    def _release(self, token) -> None:
        """A generation ends (also from a garbage-collector finalizer, in any thread)."""
        with self._lock:
            if self._owned_by is token:
                self._owner = self._owned_by = None
                self._idle.notify_all()

    # -- public API ---------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self.config.n_vocab

    def tokenize(self, text: str, add_special: bool = True,
                 parse_special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), n_vocab] for a fresh sequence starting at position 0."""
        ids = self._token_ids(ids)
        if not ids:
            raise ArgumentError("logits() needs at least one token id")
        if len(ids) > self.n_ctx:
            raise ContextLengthError(f"{len(ids)} token ids; the context holds {self.n_ctx} "
                                     "(raise n_ctx, or pass fewer)")
        with self._lock:
            self._check_open()
            self._wait_idle("logits()")
            # the session's own cache, emptied: a second one beside it cost memory per
            # call, and on device="cuda" sat outside the VRAM the load planned
            self._session.reset()
            fwd = self._forward if self._compute is None else self._forward_in_turn
            return fwd(ids, 0, self._session.kv, all_logits=True)

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
        ids = self._token_ids(ids)
        if not ids:
            raise ArgumentError("prompt_logprobs() needs at least one token id")
        if isinstance(first, bool) or not isinstance(first, int) or \
                not 0 <= first < len(ids):
            raise ArgumentError(f"first must be an integer in [0, {len(ids) - 1}], got "
                                f"{first!r}")
        if len(ids) > self.n_ctx:
            raise ContextLengthError(f"{len(ids)} token ids; the context holds {self.n_ctx} "
                                     "(raise n_ctx, or pass fewer)")
        out: list[TokenLogprob] = []
        with self._lock:
            self._check_open()
            self._wait_idle("prompt_logprobs()")
            session = self._session
            session.reset()
            fwd = self._forward if self._compute is None else self._forward_in_turn
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
        if not isinstance(max_tokens, int | np.integer) or isinstance(max_tokens, bool) \
                or max_tokens < 0:
            raise ArgumentError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")
        max_tokens = int(max_tokens)
        sampler = Sampler(self._params(sampling))
        logprobs = check_top(logprobs)
        constraint = constraint_for(format, self.tokenizer)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s_, str) for s_ in stops):
            raise TypeError("stop must be a string or a list of strings")
        self._check_open()
        result = result if result is not None else GenerationResult([], "length")
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

    def chat_template(self, tools: bool = False):
        """The ChatTemplate chat_prompt renders with: the one given at load
        (chat_template=), else the GGUF's — for a prompt with tools its
        `tokenizer.chat_template.tool_use` variant where the file has one — else chatml."""
        from efedge.chat_template import ChatTemplate, get_template

        tok = self.tokenizer
        with self._lock:
            if self._template is None:
                if self._chat_template_name is not None:
                    # a built-in or given template writes the model's own BOS / EOS text
                    self._template = get_template(self._chat_template_name,
                                                  bos_token=self._token_text(tok.bos_id),
                                                  eos_token=self._token_text(tok.eos_id))
                else:
                    self._template = (ChatTemplate.from_metadata(self._gf.metadata)
                                      or get_template("chatml"))
            if not tools or self._chat_template_name is not None:
                return self._template
            if self._tool_template is None:
                self._tool_template = ChatTemplate.from_metadata(
                    self._gf.metadata, name="tool_use") or self._template
            return self._tool_template

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template; `tools`
        (OpenAI's list) are rendered by the template. Assistant messages may carry
        `tool_calls` (arguments a JSON string or an object) and `role: "tool"` messages
        their results (efedge.tool_calls.render_messages)."""
        tools = check_tools(tools)
        tok = self.tokenizer
        tpl = self.chat_template(tools=tools is not None)
        text = tpl.render(render_messages(messages),
                          add_generation_prompt=add_generation_prompt, tools=tools)
        # as llama.cpp: a BOS the template writes first (an EOS it writes last) is dropped
        # where the vocab adds one, and then the vocab's are added, so the prompt starts
        # with exactly one BOS whether the template writes it or not (never two)
        if tok.add_bos and tpl.bos_token and text.startswith(tpl.bos_token):
            text = text[len(tpl.bos_token):]
        if tok.add_eos and tpl.eos_token and text.endswith(tpl.eos_token):
            text = text[:-len(tpl.eos_token)]
        return self.tokenize(text, add_special=True, parse_special=True)

    def _token_text(self, tid: int | None) -> str:
        """A special token's text as the vocab stores it, as templates from the file get
        it ("" when the vocab has none)."""
        return "" if tid is None else self.tokenizer.piece(tid)

    def chat(self, messages: list[dict], *, stream: bool = False, max_tokens: int = 512,
             stop=None, result: GenerationResult | None = None,
             cancel: threading.Event | None = None, logprobs: int | None = None,
             format: str | dict | None = None, tools: list[dict] | None = None,  # noqa: A002
             tool_choice: str | dict = "auto", **sampling) -> str | Iterator[str]:
        """Reply to a conversation ([{"role": ..., "content": ...}, ...]); `result`,
        `logprobs` and `format` as for stream().

        `tools` (OpenAI's [{"type": "function", "function": {"name", "description",
        "parameters"}}]) are rendered by a chat template in the Hermes <tool_call> format
        (efedge.tool_calls; another template is an UnsupportedModelError). The reply is
        still text; `result.tool_calls` receives the calls parsed from it
        (efedge.tool_calls.parse_tool_calls). `tool_choice`: "auto" (the model decides),
        "none" (no tools rendered), "required" (exactly one call of an offered tool) or
        {"type": "function", "function": {"name": N}} (one call of N), the last two by
        constraining the output to the call's grammar, its arguments an instance of the
        tool's parameters schema."""
        if isinstance(messages, list | tuple) and not messages:
            raise ArgumentError("messages is empty: a conversation needs at least one message")
        tools = check_tools(tools)
        mode, names = resolve_choice(tool_choice, tools)
        shown = tools if mode != "none" else None
        if shown is not None:
            check_template(self.chat_template(tools=True))
        if mode == "forced":
            if format is not None:
                raise ArgumentError("format= cannot be combined with a forced tool_choice")
            format = forced_call_grammar(tools, names)  # noqa: A001
        ids = self._prompt_ids(self.chat_prompt(messages, tools=shown))
        result = result if result is not None else GenerationResult([], "length")
        it = self._stream_ids(ids, max_tokens, stop, sampling, result, cancel, logprobs,
                              format)
        if shown is not None:
            it = _parsing_calls(it, result, shown)
        return it if stream else "".join(it)

    def cancel(self) -> None:
        """Stop every generation in progress or already requested (safe from any thread)."""
        with self._cancel_lock:
            for ev in list(self._active_cancels):  # a finalizer may discard one meanwhile
                ev.set()

    def stats(self) -> dict:
        reap = getattr(self._experts, "reap", None)
        if reap is not None:  # copies native workers finished: their bytes counted
            reap()
        out = self.counters.as_dict()
        extra = getattr(self._tf, "extra_stats", None)
        if extra is not None:  # device="cuda": memory, hybrid misses, link
            out["device"] = extra()
        return out

    def reset_stats(self) -> None:
        self.counters.reset()
        reset = getattr(self._tf, "reset_stats", None)
        if reset is not None:  # device="cuda": its own figures (stats()["device"]) too
            reset()

    def close(self) -> None:
        """Release the mapping. Safe to call twice."""
        if getattr(self, "_closed", True):
            return
        self.cancel()
        with self._lock:
            # a generation of another thread stops at its next token (cancelled above);
            # one paused at a yield (this thread's or another's) ends when resumed (it
            # sees _closed)
            while self._owner is not None and self._owner is not threading.current_thread() \
                    and self._owner.is_alive() and self._paused_by is not self._owned_by:
                self._idle.wait(0.5)
            self._closed = True
            self._finalizer()  # stops the transfer workers (device="cuda": frees VRAM)
            # drop every holder of views into the mapping (the expert store, the policy's
            # reference cycle), so the mapping really closes now, not at collection
            self._tf = None
            self._session = None
            self._experts = None
            gc.collect()
            self._gf.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self.config
        return (f"<efedge.Model {self.path.name}: {c.arch}, {c.n_layer} layers, "
                f"{c.n_expert} experts ({c.n_expert_used} active)>")


def _parsing_calls(it: Iterator[str], result: GenerationResult,
                   tools: list[dict]) -> Iterator[str]:
    """The pieces of `it`; once it ends, result.tool_calls holds the calls of the reply."""
    parts = []
    try:
        for piece in it:
            parts.append(piece)
            yield piece
    finally:
        it.close()
    result.tool_calls = parse_tool_calls("".join(parts), tools)[1]


def _close_parts(experts, tf) -> None:
    """Close a Model's expert source and (device="cuda") its device model, which stops
    their worker threads: from close(), or when a Model dropped without it is collected."""
    for part in (experts, tf):
        if part is not None and hasattr(part, "close"):
            part.close()


def load(path: str | Path | None = None, **kwargs) -> Model:
    """Load a GGUF model (None → the embedded demo model). See Model for the keywords."""
    return Model(path, **kwargs)
