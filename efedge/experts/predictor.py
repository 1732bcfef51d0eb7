"""The hybrid expert predictor: which experts will layers l+1 … l+H ask for?

Four sources of evidence, each a distribution over the E experts of a future layer m:

* **pre-gating** — the router of layer m applied to the current (ffn-normalised) hidden
  state. The residual stream changes slowly, so this is sharp a layer or two ahead; it
  only exists within the current token (the next token's hidden state is not known).
* **transitions** — how often expert j ran at layer l+d after expert i ran at layer l,
  counted online with exponential decay (optionally seeded from a routing trace). This is
  the model's own routing structure; it also crosses token boundaries.
* **temporal locality** — what the previous tokens chose at layer m: a fast-decaying
  frequency (the last few tokens) and a slow one (the expert's popularity).
* **token memory** — what the router chose at layer m the last times this same token id
  was computed (a shift register of the last 8 occurrences per expert, newest weighing
  most). Routing is largely a function of the token itself (on the demo model's held-out
  text the last occurrence alone finds 63–88% of a layer's experts, against 19–38% for
  the previous token's). It needs the token, so it serves the layers of the pass being
  computed: from every routed layer, and once more at the start of a pass
  (`begin_pass(tokens)` + `predict_pass_start`), before its first layer runs. A
  direct-mapped table with the token id as tag, ≤ 16 MiB.

They are mixed with weights per (target layer, distance) that adapt online by
exponentiated gradient on the log-likelihood of what the router then actually chose
(the "feedback"). The mixture ranks the experts; the rank is turned into a *calibrated*
probability of use by a per (target layer, distance, rank) hit rate, learned from the
same feedback, so the scheduler can weigh a prefetch's expected saving against its cost.
For a batch (prefill) the per-token probabilities are combined into the probability that
*any* token of the batch needs the expert: 1 - Π_t (1 - p_t).

Layers are a cyclic stream: step = pass · L + layer, a pass being one forward call. A
prediction at distance d from layer l targets layer (l + d) mod L, in the next pass when
l + d ≥ L. All hot loops are numba kernels over arrays (predictor_kernels.py); the
class holds the state. The per-layer kernels take microseconds and run on the compute
thread, so they keep the GIL (`nogil=False`): releasing and re-taking it around each call
let the transfer threads in and tripled the measured cost of eviction calls on a loaded
2-core machine. Where a core is spare, a decode step runs on a helper thread instead
(`use_thread`, `post_step` / `wait` or `wait_select`, and a one-token pass's
`begin_pass(post=True)`: efedge/experts/predictor_thread.py), with the same results bit
for bit.
Shapes: L layers, E experts, K active, D width, T tokens in the pass, Dm max distance.
"""

from __future__ import annotations

import time

import numpy as np

from efedge.errors import ArgumentError
from efedge.experts.horizon import select_prefetch
from efedge.experts.options import MAX_HORIZON, expert_ids_problem, number
from efedge.experts.predictor_kernels import (  # noqa: F401  (the sources' indices)
    _P_DRAFTP,
    _P_INC,
    _P_NGUSED,
    _P_REACHF,
    _P_SELMODE,
    N_COMP,
    POPULAR,
    PREGATE,
    SEL_NONE,
    TEMPORAL,
    TOKEN,
    TRANSITION,
    _begin_one,
    _predict,
    _record_context,
    _rescale,
    _seed_kernel,
    _step,
    input_logits,
    tag_one,
)

try:  # the helper thread's hand-over kernels, called here directly (fewer Python
    # calls on the compute thread: predictor_thread.py); absent where futexes are
    from efedge.experts.predictor_thread import DONE_OK, FAILED, PENDING, STOLEN
    from efedge.experts.predictor_thread import _post as _thread_post
    from efedge.experts.predictor_thread import _wait_select as _thread_wait_select
    from efedge.experts.predictor_thread import _wait_steal as _thread_wait_steal
except ImportError:
    _thread_post = _thread_wait_steal = _thread_wait_select = None
    DONE_OK, FAILED, PENDING, STOLEN = 1, 0, 3, 4

_INT32, _FLOAT32 = np.dtype(np.int32), np.dtype(np.float32)  # (compared by identity)
# After the helper was too slow, passes before it is tried again: THREAD_RETRY_FIRST,
# doubled for each time in a row it is given up again within THREAD_RETRY_PASSES
# passes of being tried, up to THREAD_RETRY_PASSES. A busy moment of the machine (a
# laptop's browser, another build) costs a few dozen tokens without the helper, not
# hundreds; a machine that stays busy is not tried more than once in 256 passes.
THREAD_RETRY_FIRST, THREAD_RETRY_PASSES = 16, 256
TOKEN_MEMORY_BYTES = 16 << 20  # the token table's budget: [buckets, L, E] uint8
# The context draft (begin_pass): the tokens that followed the current token's previous
# occurrence in the same context, as far as DRAFT_TOKENS, their experts valued DRAFT_P /
# sqrt(distance) for eviction, and after the DRAFT_OCCURRENCES - 1 occurrences before it
# at half the value each. Simulated over the demo trace's 1024 held-out tokens
# (docs/scheduler.md §6, thirty-second session), 8 and 0.3 did best of 4–16 / 0.3–0.8;
# a second occurrence helped in 23 of 48 settings (3 worse by < 0.006), more little.
DRAFT_TOKENS, DRAFT_P, DRAFT_OCCURRENCES = 8, 0.3, 2
# Of the latest DRAFT_WALK occurrences, the one preceded by most of the same tokens as the
# current pass (up to DRAFT_MATCH; the latest on ties) is drafted first, then the latest:
# simulated, against the latest alone, less stall in 38 of the 48 settings, more in 1 by
# 0.003 (docs/scheduler.md §6, thirty-third session); walking 32 was no better than 8.
DRAFT_WALK, DRAFT_MATCH = 8, 4
# token ids the context draft records positions for (_last_at: 8 bytes per id up to the
# largest seen; every GGUF vocabulary is far smaller)
_LAST_AT_MAX = 1 << 22



def is_path(x) -> bool:
    """Whether a routing trace was given as a file name rather than an array."""
    return isinstance(x, str | bytes) or hasattr(x, "__fspath__")


def trace_experts(trace):
    """The expert ids a routing trace holds: `trace` itself, or the "experts" array of the
    .npz file it names (a ValueError when the file holds none; numpy's errors when it
    cannot be read)."""
    if not is_path(trace):
        return trace
    with np.load(trace, allow_pickle=False) as z:
        if "experts" not in z.files:
            raise ValueError("it holds no 'experts' array: not a routing trace (write one "
                             "with efedge trace)")
        return z["experts"]

class HybridPredictor:
    """Online state of the hybrid predictor; `step()` once per routed MoE layer.

    After `step(layer, ids, …, n_pred=n)`, `p_use[d-1]` holds, for the layer d steps ahead,
    each expert's calibrated probability of being used (by any token of the pass) and
    `order[d-1]` the experts by that probability, for d = 1..n. `p_next[m, e]` is the
    latest such estimate for the next use of layer m, or the context draft's value where
    that is higher (begin_pass: what followed the pass's token earlier in its context);
    the eviction score reads it.
    """

    # the keyword options and their ranges (options.number's arguments); `adapt` is a flag
    OPTIONS = {
        "max_distance": dict(lo=1, hi=MAX_HORIZON, integer=True),
        "decay": dict(lo=0.0, hi=1.0, lo_open=True),  # per token, of the transitions
        "recent_rate": dict(lo=0.0, hi=1.0, lo_open=True),
        "eta": dict(lo=0.0),  # the fusion weights' learning rate (0: fixed weights)
        "calibration_rate": dict(lo=0.0, hi=1.0, lo_open=True),
        "eps": dict(lo=0.0, hi=1.0, hi_open=True),
        "weight_floor": dict(lo=0.0, hi=1.0, hi_open=True),
        "popularity_rate": dict(lo=0.0, hi=1.0, lo_open=True),
        "n_sources": dict(lo=1, integer=True),
        "token_weight": dict(lo=0.0),
        "draft_tokens": dict(lo=0, integer=True),
        "draft_p": dict(lo=0.0, hi=1.0),
    }

    @classmethod
    def check_options(cls, kw: dict) -> None:
        """An ArgumentError for an option the predictor does not take or a value out of
        its range (a policy checks its predictor's options when it is made, before any
        model loads)."""
        for k, v in kw.items():
            if k == "adapt":
                continue
            spec = cls.OPTIONS.get(k)
            if spec is None:
                raise ArgumentError(f"unknown option {k!r}: neither the policy's nor its "
                                    f"predictor's (the predictor takes "
                                    f"{', '.join(sorted([*cls.OPTIONS, 'adapt']))})")
            number(k, v, **spec)

    def __init__(self, n_layer: int, n_expert: int, n_active: int, max_distance: int = 8,
                 decay: float = 0.998, recent_rate: float = 0.3, eta: float = 0.3,
                 calibration_rate: float = 0.05, eps: float = 0.01,
                 weight_floor: float = 0.02, popularity_rate: float = 0.02,
                 n_sources: int = 1, adapt: bool = True, token_weight: float = 1.0,
                 draft_tokens: int = DRAFT_TOKENS, draft_p: float = DRAFT_P):
        self.check_options(dict(
            max_distance=max_distance, decay=decay, recent_rate=recent_rate, eta=eta,
            calibration_rate=calibration_rate, eps=eps, weight_floor=weight_floor,
            popularity_rate=popularity_rate, n_sources=n_sources, token_weight=token_weight,
            draft_tokens=draft_tokens, draft_p=draft_p))
        L, E, K, dm = n_layer, n_expert, n_active, int(max_distance)
        self.n_layer, self.n_expert, self.n_active, self.max_distance = L, E, K, dm
        self.adapt = adapt
        self.n_sources = int(n_sources)  # routed layers the transitions start from
        # _P_REACHF: how far predictions reached lately; transitions are learned that far
        # + LEARN_MARGIN (the step kernel keeps it); the last three: how the routers select
        # (mode, expert groups, groups used: efedge/experts/selection.py)
        self.params = np.array([1.0, decay, recent_rate, eta, calibration_rate, eps,
                                weight_floor, 0.1, popularity_rate, dm, SEL_NONE, 0, 0,
                                draft_p], dtype=np.float64)
        self.trans = np.zeros((L, dm, E, E), dtype=np.float32)  # [src layer, d-1, i, j]
        self.rowsum = np.zeros((L, dm, E), dtype=np.float32)
        self.recent = np.zeros((2, L, E), dtype=np.float32)  # fast, slow frequency
        # fusion weights per (target layer, distance): pre-gating leads near, the
        # model's statistics further out (priors; feedback moves them)
        self.weights = np.empty((L, dm, N_COMP), dtype=np.float64)
        # token memory: as much as all the others together where the token was seen
        for d in range(1, dm + 1):
            pg = 0.7 / d
            self.weights[:, d - 1] = (pg, (1 - pg) * 0.5, (1 - pg) * 0.3, (1 - pg) * 0.2,
                                      token_weight)
        # calibration prior: the top-K ranks are used half the time, the rest rarely
        self.prec = np.full((L, dm, E), 0.5 * K / E, dtype=np.float64)
        self.prec[:, :, :K] = 0.5
        self.prec_n = np.zeros((L, dm), dtype=np.int64)
        self.recall = np.zeros((dm, 2), dtype=np.float64)  # EWMA recall@K per distance, n
        ring = dm + 1  # stored predictions, keyed by target step mod ring
        self.ring_q = np.zeros((ring, dm, N_COMP, E), dtype=np.float32)
        self.ring_avail = np.zeros((ring, dm, N_COMP), dtype=np.bool_)
        self.ring_rank = np.zeros((ring, dm, E), dtype=np.int32)
        self.ring_made = np.full((ring, dm), -1, dtype=np.int64)
        passes = (dm + L - 1) // L + 1
        self.last_hist = np.full((passes, L, K), -1, dtype=np.int32)
        self.hist_pass = np.full(passes, -1, dtype=np.int64)
        self.cur_ids = np.zeros((L, 1, K), dtype=np.int32)
        self.p_use = np.zeros((dm, E), dtype=np.float32)
        self.order = np.zeros((dm, E), dtype=np.int32)
        self.p_next = np.zeros((L, E), dtype=np.float32)
        # router weights [L, E, D] if known, as int8 with a scale per row [L, E]: four
        # times less memory to stream per prediction (the decode has just flushed caches)
        self.W = np.zeros((0, 0, 0), dtype=np.int8)
        self.W_scale = np.zeros((0, 0), dtype=np.float32)
        self._w_width = -1  # no router weights: pre-gating logits come from the caller
        # the routers' biases [L, E] (router bias, selection bias), as selection.py reads them
        self.sel_rb = np.zeros((L, E), dtype=np.float32)
        self.sel_sb = np.zeros((L, E), dtype=np.float32)
        # per (target layer, distance): EWMA recall@K of the mixture and of pre-gating alone
        # (the kernels rank by pre-gating alone where it leads)
        self.switch = np.zeros((L, dm, 2), dtype=np.float64)
        self.pass_no = -1
        self.step_no = -1
        self._last_layer = L
        self._pass_tokens = 1
        self._no_h = np.zeros((1, 1), dtype=np.float32)
        self._no_pg = np.zeros((1, 0, E), dtype=np.float32)
        # a one-token pass start's pre-gating: row 0 its first layer's router on that
        # layer's input (predict_pass_start's `hidden` / `logits`), NaN where unknown
        # (the helper thread reads it for its pass-start jobs; its steps never do)
        self._pass_pg = np.full((1, dm, E), np.nan, dtype=np.float32)
        # token memory: bucket = token id mod B, the id itself as tag (a collision resets
        # the bucket rather than mixing two tokens' histories)
        n_buckets = int(min(65536, max(256, TOKEN_MEMORY_BYTES // (L * E))))
        self.tok_tags = np.full(n_buckets, -1, dtype=np.int64)
        self.tok_hist = np.zeros((n_buckets, L, E), dtype=np.uint8)
        self.cur_tok = np.full(1, -1, dtype=np.int64)  # the pass's tokens' buckets (-1: none)
        self._tok1 = np.full(1, -1, dtype=np.int64)  # cur_tok of a one-token pass
        self._pass_args: tuple = (0, None, None)  # t_n, and predict_pass_start's dummies
        # the context draft (begin_pass, _draft_kernel): the current context's tokens by
        # position, where each token last occurred in it, and the draft's eviction values
        self.draft_tokens, self.draft_p = int(draft_tokens), float(draft_p)
        self._ctx = np.full(256, -1, dtype=np.int64)
        self._prev = np.full(256, -1, dtype=np.int64)  # each position's token's previous one
        self._ctx_n = 0  # positions known
        # each token id's latest position: room for 64 Ki ids at once (512 KiB), most
        # vocabularies — growing it rebinds a helper thread (_helper), ~2 ms the first time
        self._last_at = np.full(1 << 16, -1, dtype=np.int64)
        self.draft = np.zeros((L, E), dtype=np.float32)
        # whether `draft` holds anything (to clear at the next pass): _drafted; an array,
        # as the helper thread's begin (post_begin) writes it
        self._draft_flag = np.zeros(1, dtype=np.int64)
        # the kernels' persistent state, in their argument order: one tuple to splat per
        # call instead of 19 attribute lookups (these arrays are only ever changed in place)
        # p_next as the kernels write it: p_next itself, or with a helper thread its own
        # copy, published into p_next by wait() (the eviction values the compute thread
        # reads while a step runs there stay those of the step before, as without one)
        self._p_next_k = self.p_next
        self._thread = None  # predictor_thread.PredictorThread, once one is started
        # whether posted steps run on a helper thread (use_thread; a plain attribute: it is
        # read once per routed layer, right after the layer kernels)
        self.threaded = False
        self._workers_ctl = None
        self._posted = False  # a step is on the helper thread
        self._thread_retry = -1  # the pass at which to try a helper again (-1: none)
        self._retry_wait = 0  # passes waited before the last try (0: none yet)
        self._tried_at = -1  # the pass at which the helper was last tried again
        self.thread_fallbacks = 0  # times waiting for the helper cost too much
        self._posts_closed = 0  # jobs the helper threads closed so far had run
        self._stolen_closed = 0  # …and of those, the ones their callers ran (finish)
        # the callers' time in wait_select's waits that the live helper's clock does not
        # hold: closed helpers' totals, and the waits made on in Python after a hand-back
        self._sel_wait_other = 0.0
        self._bind_state()

    @property
    def _drafted(self) -> bool:
        return bool(self._draft_flag[0])

    @_drafted.setter
    def _drafted(self, on: bool) -> None:
        self._draft_flag[0] = on

    def _bind_state(self) -> None:
        self._state = (self.last_hist, self.hist_pass, self.trans, self.rowsum, self.recent,
                       self.weights, self.prec, self.prec_n, self.recall, self.ring_q,
                       self.ring_avail, self.ring_rank, self.ring_made, self.p_use, self.order,
                       self._p_next_k, self.tok_hist, self.params, self.sel_rb, self.sel_sb,
                       self.switch, self.draft)

    # -- the helper thread (efedge/experts/predictor_thread.py) ---------------------------
    def use_thread(self, on: bool, workers_ctl: np.ndarray | None = None) -> None:
        """Run single-token steps posted with post_step() on a helper thread (True, where
        predictor_thread.available()), or on the caller's (False). `workers_ctl`: native
        transfer workers' control words — the helper wakes them while it spins."""
        from efedge.experts import predictor_thread

        self.close()
        self._workers_ctl = workers_ctl
        self.threaded = bool(on) and predictor_thread.available()
        self._thread_retry = -1
        self._p_next_k = self.p_next.copy() if self.threaded else self.p_next
        self._bind_state()

    @property
    def thread_posts(self) -> int:
        """Jobs posted to helper threads so far (steps and pass starts), all of them."""
        return self._posts_closed + (0 if self._thread is None else self._thread.posts)

    @property
    def thread_stolen(self) -> int:
        """Of thread_posts, the jobs the compute thread ran itself: its helper had not
        begun them STEAL_NS after their post (off its core)."""
        return self._stolen_closed + (0 if self._thread is None else self._thread.stolen)

    def _join(self) -> None:
        """Until a posted step is done, then publish its eviction values (p_next). Every
        read of the predictor's outputs after a post_step() comes after this (`wait`)."""
        if self._posted:
            self._posted = False
            th = self._thread
            r = _thread_wait_steal(th.ctl, th.job, self.p_next, self._p_next_k)
            if r == STOLEN:  # (the helper was off its core: the job is run here)
                r = th.finish(r, self.p_next, self._p_next_k)
            if r != DONE_OK:
                self._not_done(th, r)

    def _not_done(self, th, r: int) -> None:
        """A wait for the helper `th` answered `r`, not DONE_OK: raise what a helper that
        FAILED raised, else (SLOW) give the helper up for a while."""
        if r == FAILED:
            th.fail()
        self._thread_too_slow()

    def _thread_too_slow(self) -> None:
        """Waiting for the helper costs more than the step would (it shares its core with
        other busy threads): take the steps back onto this thread, and try the helper
        again THREAD_RETRY_FIRST passes later — twice as long each time it is given up
        again soon after a try (within THREAD_RETRY_PASSES passes), at most
        THREAD_RETRY_PASSES."""
        self.thread_fallbacks += 1
        again_soon = self._tried_at >= 0 and self.pass_no - self._tried_at < THREAD_RETRY_PASSES
        wait = min(2 * self._retry_wait, THREAD_RETRY_PASSES) if again_soon and \
            self._retry_wait else THREAD_RETRY_FIRST
        self._retry_wait = wait
        self.use_thread(False, self._workers_ctl)
        self._thread_retry = self.pass_no + wait

    def wait_select(self, *select_args):
        """wait(), then horizon.select_prefetch(*select_args) — the plan that reads this
        step's p_use and order —, returning its outputs: after a post_step() both in one
        kernel call, a Python call fewer per routed layer on the compute thread (its
        time waiting is counted in select_wait_s)."""
        if not self._posted:
            return select_prefetch(*select_args)
        self._posted = False
        th = self._thread
        r, out = _thread_wait_select(th.ctl, th.job, self.p_next, self._p_next_k,
                                     *select_args)
        if r == PENDING or r == STOLEN:  # (a long wait, on without the GIL, or a job
            t0 = time.perf_counter()  # the helper left unclaimed run here; then the plan)
            r = th.finish(r, self.p_next, self._p_next_k)
            self._sel_wait_other += time.perf_counter() - t0
            if r != FAILED:
                out = select_prefetch(*select_args)
        if r != DONE_OK:
            self._not_done(th, r)
        return out

    @property
    def select_wait_s(self) -> float:
        """The compute thread's time in the waits wait_select() made, all helpers'."""
        th = self._thread
        return self._sel_wait_other + (0.0 if th is None else th.select_wait_s)

    wait = _join  # (the public name; the class's own calls use _join, so that a timer
    # put on an instance's wait — benchmarks/policies.py --cost — sees the caller's waits)

    def close(self) -> None:
        """Stop the helper thread, if one runs (a posted step finishes first)."""
        if self._thread is not None:
            self._join()  # (which may itself give the helper up and close it)
        th = self._thread
        if th is not None:
            th.close()
            self._posts_closed += th.posts
            self._stolen_closed += th.stolen
            self._sel_wait_other += th.select_wait_s
            self._thread = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass

    def _helper(self, width: int):
        """A helper thread on the arrays a step reads now: the running one, rebound to
        them, or a new one (router weights arrive with the first hidden state; a longer
        pass grows cur_ids, a longer context or a larger token id the context draft's
        tables; nothing else is ever replaced while a thread runs — use_thread rebinds
        the state and closes the thread)."""
        from efedge.experts.predictor_thread import PredictorThread

        bound = (self.W, self.W_scale, self._pass_pg, self.cur_ids, self._tok1, *self._state,
                 self.tok_tags, self._ctx, self._prev, self._last_at, self._draft_flag)
        th = self._thread
        if th is not None and th.h.shape[1] == width:  # the same thread, other arrays
            self._join()
            if self._thread is th:  # (not given up by that wait)
                th.rebind(bound)
                return th
        self.close()
        self._thread = PredictorThread(bound, self.n_active, width, self.max_distance,
                                       self.n_layer, self.n_sources, self.adapt,
                                       self._workers_ctl,
                                       (self.draft_tokens, DRAFT_OCCURRENCES, DRAFT_WALK,
                                        DRAFT_MATCH))
        return self._thread

    def _begin_helper(self):
        """(begin_pass) The helper thread to run a one-token pass's beginning on — the
        running one where it is bound to the tables as they are now, else that one
        rebound to them (the context's tables grew: rare, as they double; or a longer
        pass grew cur_ids) — or None where no helper is to run it (none wanted, or no
        router weights yet: the first step brings them)."""
        if not self.threaded or self._w_width <= 0:
            return None
        th = self._thread
        if th is None or th.bound[0] is not self.W or th.bound[3] is not self.cur_ids or \
                th.bound[-4] is not self._ctx or th.bound[-2] is not self._last_at:
            th = self._helper(self._w_width)  # (_prev grows with _ctx)
        return th

    # -- inputs ---------------------------------------------------------------------------
    def set_router_weights(self, W: np.ndarray, selection=None) -> None:
        """Routers as dense matrices [L, E, D] (router logits = W[m] @ h); `selection`
        (a selection.RouterSelection): how the routers turn logits into their choice —
        biases, sigmoid gating, expert groups — so that pre-gating ranks experts as the
        router will (None: by the logits, a plain softmax router)."""
        self._join()
        W = np.asarray(W, dtype=np.float32)
        if W.ndim != 3 or W.shape[:2] != (self.n_layer, self.n_expert):
            raise ValueError(f"router weights must be [{self.n_layer}, {self.n_expert}, D], "
                             f"got {list(W.shape)}")
        if not np.isfinite(W).all():  # (a broken file: the forward pass names the NaN;
            # cast to int8 here it only warned, and pre-gated from garbage)
            W = np.where(np.isfinite(W), W, np.float32(0.0))
        scale = np.abs(W).max(axis=2) / 127.0
        scale[scale == 0] = 1.0
        self.W = np.ascontiguousarray(np.round(W / scale[:, :, None]), dtype=np.int8)
        self.W_scale = np.ascontiguousarray(scale, dtype=np.float32)
        self._w_width = self.W.shape[2]  # a hidden state this wide is pre-gated
        if selection is not None:
            self.sel_rb[:] = selection.router_bias
            self.sel_sb[:] = selection.select_bias
            self.params[_P_SELMODE:_P_NGUSED + 1] = (selection.mode, selection.n_groups,
                                                     selection.n_group_used)

    def seed(self, experts, weight: float = 1.0) -> None:
        """Transition counts from a routing trace: an array [n_tokens, n_layer, K] of
        expert ids, or a path to a .npz holding one under "experts"."""
        ex = np.asarray(trace_experts(experts))
        if ex.ndim != 3 or ex.shape[1] != self.n_layer or ex.size == 0:
            raise ValueError(f"a trace must be [n_tokens, {self.n_layer}, K], got "
                             f"{list(ex.shape)}")
        problem = expert_ids_problem(ex, self.n_expert)  # (before the cast truncates floats)
        if problem:
            raise ValueError(problem)
        ex = np.ascontiguousarray(ex, dtype=np.int32)
        self._join()
        _seed_kernel(self.trans, self.rowsum, ex, float(weight) * self.params[_P_INC])
        if self.params[_P_INC] > 1e20:
            _rescale(self.trans, self.rowsum, self.params)

    def _fit_tokens(self, t_n: int) -> None:
        """Room for t_n tokens per layer in cur_ids (a longer pass than any before)."""
        if t_n > self.cur_ids.shape[1]:
            grown = np.zeros((self.n_layer, t_n, self.n_active), dtype=np.int32)
            grown[:, :self.cur_ids.shape[1]] = self.cur_ids
            self.cur_ids = grown

    # -- the start of a pass (the tokens are known before any layer runs) ----------------
    def begin_pass(self, tokens, pos: int | None = None, post: bool = False) -> None:
        """A forward pass over `tokens` begins: token memory can serve its layers. Without
        this call a pass starts at its first step() and token memory stays unused.
        `pos`: the position of its first token in its context (0: a new context; None:
        right after the last pass's) — for the context draft (_draft_kernel): a one-token
        pass whose token occurred earlier in the same context values the experts of the
        tokens that followed it there for eviction (draft, p_next).
        `post`: a one-token pass's kernel may run on the helper thread (use_thread):
        wait() — or predict_pass_start, which waits — before anything reads p_next,
        which gets the draft's values only then."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        t_n = tokens.shape[0]
        if t_n == 0:
            return
        if self._posted:  # (the helper reads the token tables)
            self._join()
        if t_n == 1 and self.draft_tokens:  # decode: one kernel call (_begin_one)
            tok = int(tokens[0])
            if pos is None:
                pos = self._ctx_n
            if pos != self._ctx_n or pos >= self._ctx.shape[0]:
                self._context_moved(pos, 1)
            self._ctx_n = pos + 1
            if tok >= self._last_at.shape[0]:
                self._fit_last_at(tok)
            th = self._begin_helper() if post else None
            if th is not None:  # the kernel on the helper, beside the pass's first work
                self.params[_P_DRAFTP] = self.draft_p
                th.post_begin(tok, pos)
                self._posted = True
            else:
                self._drafted = _begin_one(self._ctx, self._prev, self._last_at, tok, pos,
                                           self._drafted, self.draft_tokens,
                                           DRAFT_OCCURRENCES, DRAFT_WALK, DRAFT_MATCH,
                                           self.draft_p, self.tok_tags, self.tok_hist,
                                           self.draft, self.p_next, self._p_next_k,
                                           self._tok1)
            self.cur_tok = self._tok1
        else:
            if self.draft_tokens:  # (one token without a draft: nothing to record)
                self._draft_batch(tokens, pos)
            self._tag_tokens(tokens)
        self.pass_no += 1
        self._last_layer = -1  # the next step(0) is in this pass
        self._pass_tokens = int(tokens.size)
        if self._thread_retry >= 0 and self.pass_no >= self._thread_retry:
            self.use_thread(True, self._workers_ctl)  # the machine may have calmed down
            self._tried_at = self.pass_no

    def _tag_tokens(self, tokens: np.ndarray) -> None:
        """(begin_pass) The token memory's buckets for the pass's tokens into cur_tok; a
        bucket another token held is reset (a collision resets rather than mixes)."""
        if tokens.shape[0] == 1:  # (decode without the context draft: one kernel call)
            tag_one(int(tokens[0]), self.tok_tags, self.tok_hist, self._tok1)
            self.cur_tok = self._tok1
            return
        b = tokens % self.tok_tags.shape[0]
        new = np.flatnonzero(self.tok_tags[b] != tokens)
        if new.size:
            self.tok_tags[b[new]] = tokens[new]
            self.tok_hist[b[new]] = 0
        self.cur_tok = np.ascontiguousarray(b)

    def _fit_last_at(self, tok: int) -> None:
        """Room in _last_at for token id `tok` (ids past _LAST_AT_MAX are not recorded:
        they find no earlier occurrence, and cost no memory)."""
        if tok >= _LAST_AT_MAX:
            return
        size = min(_LAST_AT_MAX, max(tok + 1, 2 * self._last_at.shape[0]))
        grown = np.full(size, -1, dtype=np.int64)
        grown[:self._last_at.shape[0]] = self._last_at
        self._last_at = grown

    def _draft_batch(self, tokens: np.ndarray, pos: int | None) -> None:
        """(begin_pass) A batch's tokens (prefill) into the context: each position's
        token, its previous occurrence, each token's latest position. Nothing is drafted,
        and the last pass's draft is over."""
        t_n = tokens.shape[0]
        if pos is None:
            pos = self._ctx_n
        if pos != self._ctx_n or pos + t_n > self._ctx.shape[0]:
            self._context_moved(pos, t_n)
        self._ctx_n = pos + t_n
        top = int(tokens.max())
        if top >= self._last_at.shape[0]:
            self._fit_last_at(top)
        _record_context(self._ctx, self._prev, self._last_at, tokens, pos)
        if self._drafted:
            self.draft[:] = 0.0
            self._drafted = False

    def _context_moved(self, pos: int, t_n: int) -> None:
        """A context begun again (pos 0), rewound, or continued past positions never seen
        (a restored state); and room for t_n more tokens."""
        n = self._ctx_n
        if pos < n:  # (occurrences there no longer count: _last_at and _prev are checked
            self._ctx[pos:n] = -1  # against _ctx before use)
            self._prev[pos:n] = -1
        if pos == 0:
            self._last_at.fill(-1)
        need = pos + t_n
        if need > self._ctx.shape[0]:
            size = max(need, 2 * self._ctx.shape[0])
            self._ctx, self._prev = (np.concatenate([a, np.full(size - a.shape[0], -1, a.dtype)])
                                     for a in (self._ctx, self._prev))

    def predict_pass_start(self, n_pred: int, hidden: np.ndarray | None = None,
                           logits: np.ndarray | None = None, wait: bool = True) -> None:
        """After begin_pass: predict this pass's layers 0..n_pred-1 (into p_use / order at
        distances 1..n_pred, and p_next) before any has routed: from the token memory,
        the transitions out of the previous pass's last layer and temporal locality. For a
        single token the prediction replaces the one made at the previous pass's last
        layer for the same steps (feedback scores this one). With layer 0's input known
        (a one-token pass, its attention not yet run): `hidden` [1, D], normalised as the
        router's input is (router weights set), or that router's selection logits
        `logits` [1, E] (a trace's) — layer 0 is pre-gated from it too.
        `wait=False`: on the helper thread the prediction is left posted, as after
        post_step — the next wait_select() (the pass start's plan) or wait() waits for it
        in its own call — a hand-over fewer on the compute thread; given `logits`, it
        waits (their row is reset here after)."""
        n = max(0, min(int(n_pred), self.max_distance, self.n_layer))
        th = self._thread
        if n == 0 or th is None or self.cur_tok is not self._tok1 or \
                th.bound[0] is not self.W or th.bound[3] is not self.cur_ids:
            th = None
            if self._posted:  # (a begin_pass on the helper thread, at least)
                self._join()
            if n == 0:
                return
        t_n = self.cur_tok.shape[0]
        if th is not None:
            # on the helper thread, whose caches hold the tables (the compute thread's
            # were flushed by the layers): posted and waited for at once — after the
            # pass's beginning, where that is posted there — as the plan for the pass's
            # first layers reads it next. Layer 0's pre-gating from its input is computed
            # there too (a trace's logits are copied here)
            gated = logits is not None and self._gate_first(None, logits)
            h = None if logits is not None else self._first_input(hidden)
            after, self._posted = self._posted, False
            wait = wait or gated
            r = th.pass_start(after, self.pass_no * self.n_layer - 1, self.pass_no, n, h,
                              self.p_next, self._p_next_k, wait)
            if not wait and r != FAILED:
                self._posted = True  # (its wait comes with the plan: wait_select)
            if r != DONE_OK:
                self._not_done(th, r)
        else:
            gated = t_n == 1 and self._gate_first(hidden, logits)
            self._fit_tokens(t_n)
            self.params[_P_REACHF] = max(self.params[_P_REACHF], float(n))
            if self._pass_args[0] != t_n:  # (kept: two allocations fewer per pass)
                self._pass_args = (t_n, np.zeros((t_n, self.n_active), dtype=np.int32),
                                   np.zeros((t_n, 0, self.n_expert), dtype=np.float32))
            _, ids, pg = self._pass_args  # only their shapes are read
            _predict(-1, self.pass_no * self.n_layer - 1, self.pass_no, n, 0, self.n_sources,
                     ids, self._no_h, self.W, self.W_scale, False,
                     self._pass_pg if gated else pg, self.cur_ids, self.cur_tok,
                     *self._state)
            if self._p_next_k is not self.p_next:
                self.p_next[:] = self._p_next_k
        if gated:
            self._pass_pg[0, 0] = np.nan  # (the next pass start may have no input)

    def _gate_first(self, hidden, logits) -> bool:
        """(predict_pass_start) Layer 0's selection logits from its input into the pass
        start's pre-gating row; whether there are any."""
        row = self._pass_pg[0, 0]
        if logits is not None:
            z = np.asarray(logits, dtype=np.float32).reshape(-1)
            if z.shape[0] != self.n_expert or not np.isfinite(z).all():
                return False
            row[:] = z
            return True
        h = self._first_input(hidden)
        if h is None:
            return False
        input_logits(0, h[0], self.W, self.W_scale, self.params, self.sel_rb, self.sel_sb,
                     row)
        return True

    def _first_input(self, hidden) -> np.ndarray | None:
        """Layer 0's input as its router takes it ([1, D] float32, contiguous, D the
        routers' width), or None where there is none to pre-gate from (or no routers)."""
        if hidden is None or self._w_width <= 0 or type(hidden) is not np.ndarray or \
                hidden.shape != (1, self._w_width):
            return None
        return hidden if hidden.dtype is _FLOAT32 and hidden.flags.c_contiguous else \
            np.ascontiguousarray(hidden, dtype=np.float32)

    # -- the per-layer step -----------------------------------------------------------------
    def step(self, layer: int, ids: np.ndarray, hidden: np.ndarray | None = None,
             pregate: np.ndarray | None = None, n_pred: int | None = None,
             also: int = 0) -> int:
        """Learn from `ids` [T, K] chosen at `layer`, then predict n_pred layers ahead from
        the hidden state [T, D] (with router weights set) or pre-gating logits
        [T, n, E] for layers layer+1..layer+n (NaN rows: unknown); `also`: one more
        distance to predict (its p_next only, e.g. this layer's next turn). Returns the
        step."""
        if self._posted:
            self._join()
        # Runs once per layer right after the layer kernels have flushed the CPU caches:
        # every attribute and numpy call here costs a cache miss or several (measured:
        # this wrapper took 13 µs of a 48 µs step), hence identity checks of dtypes and
        # the reach bookkeeping left to the kernel.
        dm = self.max_distance
        if type(ids) is not np.ndarray or ids.dtype is not _INT32 or ids.ndim != 2 or \
                ids.shape[1] != self.n_active or not ids.flags.c_contiguous:
            # (the kernels index by these shapes unchecked: a wrong width must fail here)
            ids = np.ascontiguousarray(ids, dtype=np.int32).reshape(-1, self.n_active)
        t_n = ids.shape[0]
        if layer <= self._last_layer:  # a pass begun without begin_pass: no token memory
            self.pass_no += 1
            self._pass_tokens = t_n
            self.cur_tok = np.full(t_n, -1, dtype=np.int64)
        elif self.cur_tok.shape[0] != t_n:
            self.cur_tok = np.full(t_n, -1, dtype=np.int64)
        self._last_layer = layer
        step = self.pass_no * self.n_layer + layer
        self.step_no = step
        self._fit_tokens(t_n)
        n = dm if n_pred is None else max(0, min(int(n_pred), dm))
        also = also if 0 < also <= dm else 0
        pg = self._no_pg
        if hidden is not None and hidden.ndim == 2 and hidden.shape[1] == self._w_width:
            has_w = True
            h = hidden if hidden.dtype is _FLOAT32 and hidden.flags.c_contiguous else \
                np.ascontiguousarray(hidden, dtype=np.float32)
        else:
            has_w = False
            h = self._no_h
            if pregate is not None:
                pg = np.ascontiguousarray(pregate, dtype=np.float32).reshape(t_n, -1,
                                                                             self.n_expert)
        _step(layer, step, self.pass_no, n, also, self.n_sources, self.adapt and t_n == 1,
              ids, h, self.W, self.W_scale, has_w, pg, self.cur_ids, self.cur_tok,
              *self._state)
        if self._p_next_k is not self.p_next:
            self.p_next[:] = self._p_next_k
        return step

    def post_step(self, layer: int, ids: np.ndarray, hidden: np.ndarray, n_pred: int,
                  also: int = 0) -> bool:
        """step(layer, ids, hidden, n_pred=n_pred, also=also) on the helper thread
        (use_thread(True)) for a single token ([1, K] int32 ids, [1, D] float32 hidden
        state, D the routers' width) within a pass begun with begin_pass: True once
        posted — wait() before reading any output. False, with nothing done, for any other
        step (the caller runs step() then).
        The compute thread's whole share of a step, so as few Python operations as will
        do: the kernel checks the shapes and clamps the distances."""
        if self._posted:
            self._join()
        if layer <= self._last_layer or self.cur_tok is not self._tok1 or \
                not self.threaded or hidden is None or hidden.dtype is not _FLOAT32:
            return False  # (a float16 state — the GPU path's — takes step()'s conversion)
        th = self._thread
        if th is None or th.bound[0] is not self.W or th.bound[3] is not self.cur_ids:
            if self._w_width <= 0:
                return False
            th = self._helper(self._w_width)
        if not _thread_post(th.ctl, th.job, th.ids, th.h, ids, hidden, layer, self.pass_no,
                            n_pred, also):
            return False
        self._last_layer = layer
        self.step_no = self.pass_no * self.n_layer + layer
        self._posted = True
        return True

    # -- reporting ---------------------------------------------------------------------------
    def recall_at_k(self) -> np.ndarray:
        """Recall of the top-K predictions per distance 1..Dm (NaN where never scored)."""
        self._join()
        r = self.recall[:, 0].copy()
        r[self.recall[:, 1] == 0] = np.nan
        return r

    def mean_weights(self) -> np.ndarray:
        """Fusion weights per distance, averaged over layers [Dm, 5] (pre-gating,
        transitions, recent, popular, token memory), each row normalised."""
        self._join()
        w = self.weights.mean(axis=0)
        return w / w.sum(axis=1, keepdims=True)
