"""The public Model: load a GGUF file, score, generate, stream and chat. Here: loading,
the expert source, the locking every call shares, tokenizing, stats and close(); the rest
in mixins — generation (efedge/api_generation.py), scoring (efedge/api_scoring.py) and
chat (efedge/api_chat.py).

Thread safety: one Model runs one request at a time. Calls from several threads are
serialised by a lock (the second waits); `cancel()` may be called from any thread and
stops the generation in progress at the next token.
"""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from efedge import demo, held, kernels
from efedge.api_chat import ChatMixin
from efedge.api_generation import GenerationMixin
from efedge.api_scoring import ScoringMixin
from efedge.api_state import StateMixin
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
from efedge.generate import GenerationResult, Session
from efedge.gguf_file import EXPERT_TENSORS, GGUFFile
from efedge.model import Transformer, new_kv_cache
from efedge.tokenizer import Tokenizer

log = logging.getLogger("efedge")
DEFAULT_CTX = 4096
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


def _compute_threads(threads: int | None) -> int:
    """A model's compute threads: threads= (at most numba's pool), else the pool's size
    (NUMBA_NUM_THREADS: every core unless the environment says otherwise)."""
    import numba

    pool = numba.config.NUMBA_NUM_THREADS
    return pool if threads is None else min(threads, pool)


class _ThreadCount:
    """numba's compute threads in this thread set to n for a block, then as they were
    (numba keeps the count per thread: one model's must not leak into another's, or
    into the caller's own numba code)."""

    __slots__ = ("n", "prev")

    def __init__(self, n: int):
        self.n, self.prev = n, None

    def __enter__(self):
        import numba

        self.prev = numba.get_num_threads()
        if self.prev != self.n:
            numba.set_num_threads(self.n)
        return self

    def __exit__(self, *exc) -> None:
        import numba

        if self.prev is not None and numba.get_num_threads() != self.prev:
            numba.set_num_threads(self.prev)
        self.prev = None


def _check_policy(policy) -> None:
    """A policy name that names none is an error even where no expert cache will use it
    (cache=None, a dense model): `--policy expertflw` must not pass unnoticed."""
    from efedge.experts.scheduler import Policy, policy_class

    if not isinstance(policy, Policy):
        policy_class(policy)


def _not_expert(name: str) -> bool:
    return not any(f".{t}." in name for t in EXPERT_TENSORS)


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
    if cache is None:  # (cache="auto" is checked once it is decided: Model.__init__)
        log.warning(_ROUTING_WITHOUT_CACHE)
    return float(slack)


_ROUTING_WITHOUT_CACHE = ("routing='cache-aware' has no effect without an expert cache "
                          "(cache=...): every expert is resident")


class Model(GenerationMixin, ScoringMixin, ChatMixin, StateMixin):
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
                 disk_link: str | None = None, use_mmap: bool = False):
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
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                    or threads < 1):
            raise ArgumentError(f"threads must be a positive integer, got {threads!r}")
        # the model's compute threads, set in whichever thread runs its compute: numba's
        # count is per thread (a model used from the server's worker or an app's thread
        # computed with every core whatever threads= said)
        self.threads = _compute_threads(threads)
        self._threads_given = threads is not None
        if cache == "resident":  # (a name for None: every expert resident)
            cache = None
        slack = _routing_slack(routing, routing_slack, cache, cuda)
        _check_workers(transfer_workers)
        _check_policy(policy)
        # `~` expanded here: Windows shells pass it through, and API callers write it too
        self.path = Path(path).expanduser() if path is not None else demo.demo_model_path()
        self.policy = policy
        self.routing = routing
        self.link = None
        if progress is not None and not callable(progress):  # (else a TypeError mid-load)
            raise ArgumentError(f"progress must be a function (fraction, message), got "
                                f"{progress!r}")
        self._progress = progress or (lambda frac, msg: None)
        self._progress(0.0, f"mapping {self.path.name}")
        self._gf = GGUFFile(self.path)
        self._compute = _compute_lock()
        computing = self._compute or nullcontext()
        loading = _ThreadCount(self.threads)
        loading.__enter__()  # (the warm-up and the policy's helper-thread choice see it)
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
                        # (auto fits the CPU's memory; the GPU path sizes its own)
                        cache=None if cache == "auto" else cache,
                        policy=policy, link=link, vram=vram, n_ctx=ctx,
                        counters=self.counters,
                        workers=LINK_WORKERS if transfer_workers is None else transfer_workers,
                        hybrid=hybrid,
                        host_cache=host_cache, disk_link=disk_link)
                self.link = self._tf.link  # the device model owns its expert cache
                kv = self._tf.new_kv_cache(ctx)
            else:
                kv = new_kv_cache(self.config, ctx)  # (auto counts it)
                if cache == "auto":  # decided before the weights are held or read
                    cache = self._auto_cache(kv.nbytes, link)
                    if cache is None and slack > 0:  # (the CLI's default budget)
                        log.warning(_ROUTING_WITHOUT_CACHE)
                if held.wanted(use_mmap):  # weights in memory stream faster (efedge.held);
                    # with an expert cache the experts stay in the file, read into its slots
                    held.hold(self._gf, None if cache is None else _not_expert)
                with computing, notice:
                    self._tf = Transformer(self._gf, self.config, n_ctx=ctx)
                self._experts = self._expert_source(cache, policy, link, transfer_workers)
                self._tf.routing_slack = slack
            self._session = Session(self._forward if self._compute is None
                                    else self._forward_in_turn, kv, self.counters)
            self._chat_template_name = chat_template
            self._template = None
            self._tool_template = None  # the GGUF's tool_use variant (chat_template())
        except BaseException:
            for part in (getattr(self, "_experts", None), getattr(self, "_tf", None)):
                if part is not None and hasattr(part, "close"):
                    part.close()
            self._gf.close()
            raise
        finally:
            loading.__exit__(None, None, None)
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
    def _auto_cache(self, kv_bytes: int, link) -> int | None:
        """cache="auto": a budget from the memory available (efedge/memory.py), or None
        (every expert resident: a dense model, a model that fits, or a machine that does
        not say how much memory it has). Sized from the file's expert tensors before the
        model is built, so that efedge.held knows whether to copy the experts too."""
        from efedge.experts.cache import minimum_budget
        from efedge.experts.store import ExpertStore
        from efedge.memory import auto_budget, available_memory

        if not self.config.is_moe:
            return None
        if link is not None:
            raise EfedgeError("link= emulates expert transfers and needs an expert cache "
                              "budget (cache=... other than 'auto')")
        store = ExpertStore(self._gf, self.config.n_layer, self.config.n_expert)
        expert_bytes = store.total_bytes()
        budget = auto_budget(available_memory(), self._gf.file_size, expert_bytes, kv_bytes,
                             minimum_budget(store, self.config.n_expert_used))
        if budget is not None:
            log.info("cache='auto': the model does not fit in the memory available; an "
                     "expert cache of %.0f MiB (%.0f%% of the expert bytes)", budget / 2**20,
                     100 * budget / max(expert_bytes, 1))
        else:
            log.info("cache='auto': every expert resident (the model fits in the memory "
                     "available, or this system does not say how much there is)")
        return budget

    def _leave_a_core(self) -> None:
        """No threads= given, experts streaming, and a policy that runs work beside the
        compute (expertflow's predictor helper): compute with one core fewer than the
        machine has, so that the helper and the transfer workers get it (before the
        policy attaches: it looks for a spare core then). On a 2-core machine this decoded
        the demo model 1.01–1.42× and the 16-layer bench model 1.08–1.10× as fast as every
        core did, reading the drive or through emulated links (docs/scheduler.md §6,
        thirty-seventh session); resident runs keep every core."""
        import numba

        from efedge.experts import predictor_thread

        n = predictor_thread.threads_beside_helper()
        if n is not None and n < self.threads:
            self.threads = n
            numba.set_num_threads(n)  # (this thread's: the load restores it at its end)

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
        if not self._threads_given and budget < store.total_bytes() and pol.wants_spare_core():
            self._leave_a_core()
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
        # each MoE layer's input, for a policy that refines its plan from it (expertflow's
        # refine), or layer 0's alone for its pass start (expertflow's first_input); None
        # otherwise: the decode loop then makes no call
        self._tf.on_layer_input = source.on_layer_input if pol.wants_layer_input else None
        self._tf.layer_input_all = pol.layer_inputs != "first"
        # (a model whose routers read the layer's input asks for the experts itself then)
        pol.layer_input_wired = (self._tf.on_layer_input is not None
                                 and self._tf.cfg.spec.router_input != "layer")
        self.link = link_obj
        return source

    def _forward(self, tokens, pos, kv, all_logits=True):
        with _ThreadCount(self.threads):
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

    @property
    def n_tokens(self) -> int:
        """Tokens the KV cache holds (llama-cpp-python's `Llama.n_tokens`): the evaluated
        prompt and reply so far, whose prefix the next prompt reuses; 0 once closed."""
        session = getattr(self, "_session", None)
        return len(session.tokens) if session is not None else 0

    def tokenize(self, text: str, add_special: bool = True,
                 parse_special: bool = False) -> list[int]:
        for name, flag in (("add_special", add_special), ("parse_special", parse_special)):
            if not isinstance(flag, bool | np.bool_):  # ("no" would have been true)
                raise TypeError(f"tokenize(): {name} must be True or False, got {flag!r}")
        return self.tokenizer.encode(text, add_special=bool(add_special),
                                     parse_special=bool(parse_special))

    def detokenize(self, ids: Sequence[int]) -> str:
        if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
            # (a string's characters were taken for ids; None failed in list())
            raise TypeError(f"detokenize() takes a sequence of token ids, got "
                            f"{type(ids).__name__}")
        return self.tokenizer.decode(list(ids))

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


def _close_parts(experts, tf) -> None:
    """Close a Model's expert source and (device="cuda") its device model, which stops
    their worker threads: from close(), or when a Model dropped without it is collected."""
    for part in (experts, tf):
        if part is not None and hasattr(part, "close"):
            part.close()


def load(path: str | Path | None = None, **kwargs) -> Model:
    """Load a GGUF model (None → the embedded demo model). See Model for the keywords."""
    return Model(path, **kwargs)
