"""Cache policies: which slot to evict, and what to load ahead of need.

A policy is a small object with these hooks, all called on the compute thread:

* `attach(source)` — once, with the StreamingExperts it drives (for `source.prefetch`).
* `victim(cache, candidates) -> slot` — choose among unpinned READY slots (cond held);
  -1 refuses (only ever during the policy's own prefetch).
* `on_request(layer, experts)` — the layer asked for these experts (cond held).
* `on_demand_issued(layer)` — its missing experts are queued (cond not held): the
  prediction deferred from on_route runs here, while those loads are on the link, and
  the prefetches it plans are issued behind them.
* `on_route(layer, hidden, ids, pregate=None)` — a layer has routed, before its experts
  are requested: a prefetching policy does the cheap part here (which experts the layer
  needs, cancelling prefetches that came due unused, the horizon controller) and defers
  its prediction to on_demand_issued, so that a demand load never waits for the
  predictor. `pregate` [T, n, E]: router logits of layers layer+1..layer+n on this hidden
  state, for sources without router weights (the trace simulator).
* `on_layer_input(layer, hidden, logits=None)` — only where `wants_layer_input`: a MoE
  layer is about to run its attention on `hidden`, its input normalised as its router's
  input is (expertflow:refine re-ranks the layer's queue from it).

Policies only talk to the source through `prefetch(layer, experts, priority=)`,
`cancel_prefetch` (where the source has them, ExpertFlow uses their batched forms
`prefetch_plan` and `cancel_prefetch_keys`), `cache`, `store`, `routers` (and
`selection`), `n_active`, `engine.bandwidth_ewma / latency_ewma`, `counters` and `now()`,
so the simulator runs this same code on a virtual clock.

Here: the base class, `ondemand` (alias `lru`: load on miss, LRU — llama.cpp's
--moe-cache-mib behaviour), `lfu`, the registry and cache-aware routing. In
efedge/experts/policies.py: `next-layer` (mixtral-offloading), `fixed:H` (a fixed
look-ahead step) and `expertflow` (docs/scheduler.md).
"""

from __future__ import annotations

import numpy as np

from efedge.errors import ArgumentError, EfedgeError
from efedge.experts.cache import EMPTY, READY
from efedge.experts.horizon import lru_victim, route_prologue
from efedge.experts.options import MAX_HORIZON


class Policy:
    name = "base"
    prefetches = False
    # which layers' inputs on_layer_input wants: None (the decode loop makes no call),
    # "all" (before each MoE layer's attention) or "first" (layer 0's, one-token passes
    # only); and whether the model calls on_layer_input (set where it is wired)
    layer_inputs: str | None = None
    layer_input_wired = False
    wants_layer_input = property(lambda self: self.layer_inputs is not None)
    seeds_from_trace = False  # trace= seeds a predictor (expertflow, fixed:H)

    def wants_spare_core(self) -> bool:
        """Whether this policy would run work on a core the compute threads leave free
        (expertflow's predictor helper): then a model with no threads= given computes
        with one core fewer while its experts stream (efedge/api.py)."""
        return False

    def attach(self, source) -> None:
        self.source = source
        store = source.store
        self.n_layer, self.n_expert = store.n_layer, store.n_expert
        self.n_active = int(source.n_active or 1)
        self.cur_layer = -1
        self.needed = np.zeros(self.n_expert, dtype=np.bool_)  # current layer's experts
        self.tick0 = 0
        self.overhead_s = 0.0  # time spent in on_route (the predictor's cost)
        self._h_sum, self._h_n, self._h_written = 0.0, 0, 0.0
        self._step = -1
        self._last_layer = self.n_layer
        self.fetched_at = np.zeros(0, dtype=np.int64)  # per slot: cache tick when prefetched
        # per (layer, expert): the step a queued prefetch was fetched for (-1: none)
        self._due = np.full((self.n_layer, self.n_expert), -1, dtype=np.int64)
        # where route_prologue writes the keys of those that came due unused (_note_route)
        self._stale = np.empty(self.n_layer * self.n_expert, dtype=np.int64)
        self._plan: list[tuple] = []  # prefetches decided in on_route, issued after demand
        # on_route's prediction, run by on_demand_issued: (function, *arguments) or None
        self._deferred: tuple | None = None
        self._evict_limit = np.inf  # while issuing a prefetch: evict only what is worth less
        self._evict_p_limit = np.inf  # … and only victims less likely to be used than this
        self._spans = _moe_spans(source)

    def _span(self, layer: int, n: int) -> int:
        """The layer distance from `layer` that takes in the next n MoE layers (cyclic:
        the next pass follows the last layer). Look-ahead is counted in MoE layers, as the
        horizon controller measures compute from one routed layer to the next, while the
        predictor and the cache address layers by index: dense layers between them
        (deepseek2's lead, ernie4_5-moe's interleaved ones) hold nothing to load. n when
        every layer has experts."""
        if self._spans is None or n <= 0:
            return n
        return int(self._spans[layer % self.n_layer, min(n, self._spans.shape[1] - 1)])

    def victim(self, cache, candidates: np.ndarray) -> int:
        raise NotImplementedError

    def on_request(self, layer: int, experts: list[int]) -> None:
        pass

    def has_deferred_work(self) -> bool:
        """Whether on_demand_issued has anything to do: a deferred prediction or planned
        prefetches (the source hands its demand loads to the workers first, then)."""
        return self._deferred is not None or bool(self._plan)

    def on_demand_issued(self, layer: int) -> None:
        """The layer's own missing experts are queued: now run the prediction on_route
        deferred (the loads are on the link meanwhile) and issue the prefetches it plans,
        so that none of them starts on the link ahead of a load the layer is about to wait
        for."""
        if self.has_deferred_work():
            t0 = self.source.now()
            self._catch_up()
            self.overhead_s += self.source.now() - t0

    def _defer(self, fn, *args) -> None:
        """Leave fn(*args) — on_route's prediction and planning — to on_demand_issued."""
        self._deferred = (fn, *args)

    def _catch_up(self) -> None:
        """Run the deferred prediction, then issue every planned prefetch."""
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            deferred[0](*deferred[1:])
        self._flush_plan()

    def on_route(self, layer: int, hidden: np.ndarray, ids: np.ndarray,
                 pregate: np.ndarray | None = None) -> None:
        pass

    def on_pass(self, tokens: np.ndarray, pos: int | None = None) -> None:
        """A forward pass over `tokens` is about to start (before its first layer); `pos`:
        its first token's position in its context (0: a new one; None: not known)."""

    def on_layer_input(self, layer: int, hidden, logits=None) -> None:
        """Layer `layer` is about to run its attention on `hidden` (its input, normalised
        as its router's input is; `logits`: its router's selection logits on it, from a
        source without router weights)."""

    # -- helpers for prefetching policies ---------------------------------------------------
    def _note_route(self, layer: int, ids: np.ndarray) -> np.ndarray:
        """Remember the layer being computed and the experts it still needs; returns the
        keys (m * E + e) of queued prefetches that came due without being needed."""
        if self.has_deferred_work():  # a source that never called on_demand_issued:
            self._catch_up()  # predict and issue late
        if layer <= self._last_layer:
            self._step = (self._step // self.n_layer + 1) * self.n_layer
        self._step = self._step - self._step % self.n_layer + layer
        self._last_layer = layer
        self.cur_layer = layer
        self.tick0 = self.source.cache.tick
        n = route_prologue(self.needed, np.asarray(ids), self._due, self._step, layer,
                           self._stale)
        if n < 0:  # (sized at attach for every layer's experts: never)
            raise RuntimeError(f"route_prologue's scratch of {self._stale.size} is too short")
        return self._stale[:n]

    def _record_horizon(self, h: float) -> None:
        c = self.source.counters
        if c.horizon_mean != self._h_written:  # the counters were reset
            self._h_sum, self._h_n = 0.0, 0
        self._h_sum += h
        self._h_n += 1
        self._h_written = c.horizon_mean = self._h_sum / self._h_n

    def _lru_victim(self, cache, candidates: np.ndarray) -> int:
        self._fit_fetched_at(cache.n_slots)
        return int(lru_victim(candidates, cache.slot_owner, cache.slot_last_use,
                              self.fetched_at, self.cur_layer, self.needed, self.tick0,
                              self.n_expert, cache.tick))

    def _routers_dense(self, width: int) -> np.ndarray | None:
        """The routers as one float32 [L, E, D] array when they are plain matrices
        (QMatrix: `raw` + `qtype`), else None (callables are used as they are)."""
        routers = getattr(self.source, "routers", None)
        if not routers or not all(hasattr(r, "raw") and hasattr(r, "qtype") for r in routers):
            return None
        from efedge import kernels

        W = np.stack([kernels.dequantize(np.ascontiguousarray(r.raw), r.qtype)
                      .reshape(self.n_expert, -1) for r in routers]).astype(np.float32)
        return W if W.shape[2] == width else None

    def _selection(self):
        """How the source's routers select (selection.RouterSelection), or None."""
        return getattr(self.source, "selection", None)

    def _pregate_logits(self, layer: int, hidden, n: int) -> np.ndarray | None:
        """Selection logits (selection.py) of layers layer+1..layer+n on `hidden` by
        calling the routers (the generic path; NaN beyond the last layer)."""
        routers = getattr(self.source, "routers", None)
        if not routers or hidden is None or n <= 0:
            return None
        sel = self._selection()
        t = hidden.shape[0]
        out = np.full((t, n, self.n_expert), np.nan, dtype=np.float32)
        for d in range(1, n + 1):
            m = layer + d
            if m < self.n_layer:
                logits = np.asarray(routers[m](hidden), dtype=np.float32)
                out[:, d - 1] = logits if sel is None else sel.apply(m, logits)
        return out

    def _room(self) -> np.ndarray:
        """Per size class, how many slots prefetches may take now: empty or evictable ones,
        less those the current layer's not yet resident experts will need."""
        cache = self.source.cache
        with cache.cond:
            free = (cache.slot_pins == 0) & ((cache.slot_state == READY) |
                                             (cache.slot_state == EMPTY))
            room = np.bincount(cache.slot_class[free], minlength=len(cache.class_slots))
            if self.cur_layer >= 0:
                missing = int((cache.where[self.cur_layer, self.needed] < 0).sum())
                room[cache.layer_class[self.cur_layer]] -= missing
        return room

    def _prefetch_within(self, room: np.ndarray, layer: int, experts, priority: int) -> int:
        """Prefetch at most the room left in the layer's size class (updates room)."""
        c = int(self.source.cache.layer_class[layer])
        take = list(experts)[:max(0, int(room[c]))]
        if not take:
            return 0
        room[c] -= len(take)
        return self._prefetch(layer, take, priority)

    def _prefetch(self, layer: int, experts, priority: int, limit: float = np.inf,
                  p_limit: float = np.inf) -> int:
        """Plan a prefetch (issued by on_demand_issued, right after the current layer's
        demand loads); `limit`: evict only experts valued below it, `p_limit`: and less
        likely to be used than it. Returns how many."""
        experts = np.asarray(experts, dtype=np.int64).reshape(-1)
        if experts.size:
            self._plan.append((int(layer), experts, int(priority), float(limit),
                               float(p_limit)))
        return int(experts.size)

    def _flush_plan(self) -> None:
        plan, self._plan = self._plan, []
        for entry in plan:
            self._issue_entry(entry)

    def _issue_entry(self, entry) -> None:
        """Issue one planned prefetch: (layer, experts, priority, limit, p_limit)."""
        layer, experts, priority, limit, p_limit = entry
        src, cache = self.source, self.source.cache
        self._evict_limit, self._evict_p_limit = limit, p_limit
        try:
            n = src.prefetch(layer, experts, priority=priority)
        except TypeError:  # a source without priorities
            n = src.prefetch(layer, experts)
        finally:
            self._evict_limit = self._evict_p_limit = np.inf
        if not n:
            return
        slots = cache.where[layer, experts]
        got = slots >= 0
        self._due[layer, experts[got]] = priority - 1  # the step it is needed at
        # when each was fetched: the LRU clock of the baselines
        self._fit_fetched_at(cache.n_slots)
        self.fetched_at[slots[got]] = cache.tick

    def _fit_fetched_at(self, n_slots: int) -> None:
        if self.fetched_at.shape[0] != n_slots:
            self.fetched_at = np.zeros(n_slots, dtype=np.int64)


def _moe_spans(source) -> np.ndarray | None:
    """[layer, n] → the distance to the n-th MoE layer after `layer` (cyclic), or None
    when every layer has experts (the distance is n)."""
    cache = getattr(source, "cache", None)
    lc = getattr(cache, "layer_class", None)
    if lc is None or (np.asarray(lc) >= 0).all():
        return None
    moe = np.flatnonzero(np.asarray(lc) >= 0)
    n_layer = len(lc)
    out = np.zeros((n_layer, len(moe) + 1), dtype=np.int64)
    for il in range(n_layer):
        ahead = np.sort((moe - il - 1) % n_layer) + 1  # distances 1..n_layer, nearest first
        out[il, 1:] = ahead
    return out


class OnDemandLRU(Policy):
    """Load on miss, evict the least recently used slot."""

    name = "ondemand"

    def victim(self, cache, candidates: np.ndarray) -> int:
        return int(candidates[np.argmin(cache.slot_last_use[candidates])])


class LFU(Policy):
    """Load on miss, evict the expert requested least often (decayed counts; ties → LRU)."""

    name = "lfu"
    decay = 0.999  # per request, so old popularity fades over a few thousand tokens

    def attach(self, source) -> None:
        super().attach(source)
        self.freq = np.zeros((self.n_layer, self.n_expert), dtype=np.float64)

    def on_request(self, layer: int, experts: list[int]) -> None:
        self.freq[layer] *= self.decay
        self.freq[layer, experts] += 1.0

    def victim(self, cache, candidates: np.ndarray) -> int:
        owners = cache.slot_owner[candidates]
        f = self.freq[owners // self.n_expert, owners % self.n_expert]
        order = np.lexsort((cache.slot_last_use[candidates], f))
        return int(candidates[order[0]])


# efedge/experts/policies.py adds next-layer, fixed (fixed:H) and expertflow when imported
# (at the end of this module)
POLICIES: dict[str, type[Policy]] = {"ondemand": OnDemandLRU, "lru": OnDemandLRU, "lfu": LFU}
# named variants of a registered policy: NAME:VARIANT → its constructor's options
# (expertflow:refine re-ranks each layer's queue from its router on the layer's input:
# docs/scheduler.md §6, opt-in as its per-layer cost outweighs its gain on small models)
VARIANTS: dict[str, dict] = {"expertflow:refine": {"refine": True}}


def make_policy(name, **kwargs) -> Policy:
    """A policy by name: ondemand | lru | lfu | next-layer | fixed:H | expertflow |
    expertflow:refine (VARIANTS).
    Keyword arguments go to the policy (e.g. expertflow's trace= to seed its predictor).
    A Policy instance not yet serving a model is used as it is (tuned knobs from the
    Python API: `efedge.load(path, cache="25%", policy=ExpertFlow(p_floor=0.3))`)."""
    if isinstance(name, Policy):
        if kwargs:
            raise EfedgeError("policy options go to the policy's constructor, not with an "
                              "instance")
        if getattr(name, "source", None) is not None:
            raise EfedgeError(f"this {name.name!r} policy instance already serves a model: "
                              "give each model its own")
        return name
    cls, horizon = policy_class(name)
    if kwargs.get("trace") is not None and not cls.seeds_from_trace:
        raise EfedgeError(f"a routing trace seeds the predictor of expertflow and fixed:H; "
                          f"policy {name!r} has none")
    kwargs = {**VARIANTS.get(str(name).strip().lower(), {}), **kwargs}
    return cls(**kwargs) if horizon is None else cls(horizon, **kwargs)


def policy_class(name: str) -> tuple[type[Policy], int | None]:
    """The policy class a name selects, and fixed:H's look-ahead (None for the others);
    an unknown name or a bad H is an ArgumentError (an EfedgeError) naming it. efedge.load
    checks a name this way even where no expert cache will use it: a typo is never silent."""
    key = str(name).strip().lower()
    fixed = key.startswith("fixed")
    cls = POLICIES["fixed"] if fixed else POLICIES.get(key)
    if key in VARIANTS:
        cls = POLICIES[key.partition(":")[0]]
    if cls is None:
        raise ArgumentError(f"unknown cache policy {name!r} (available: "
                          f"{', '.join(sorted(POLICIES))}, fixed:H, "
                          f"{', '.join(sorted(VARIANTS))})")
    if not fixed:
        return cls, None
    if key != "fixed" and not key.startswith("fixed:"):  # fixedfoo, fixed32: a typo, run
        # as plain fixed (H = 2) until found by an audit
        raise ArgumentError(f"unknown cache policy {name!r}: use fixed:H with a look-ahead "
                            f"H from 1 to {MAX_HORIZON} layers")
    _, _, h = key.partition(":")
    try:
        horizon = int(h) if key != "fixed" else 2  # (plain fixed: H = 2)
    except ValueError:
        horizon = 0
    if not 1 <= horizon <= MAX_HORIZON:
        raise ArgumentError(f"bad policy {name!r}: use fixed:H with a look-ahead H from 1 "
                            f"to {MAX_HORIZON} layers")
    return cls, horizon


def cache_aware_route(ids: np.ndarray, probs: np.ndarray, resident: np.ndarray,
                      slack: float) -> tuple[np.ndarray, int]:
    """Opt-in cache-aware routing: a selected expert that is not resident is replaced by
    the most probable resident expert not already selected for that token, if its router
    probability is within `slack` of the one it replaces (probabilities over all experts,
    before top-k renormalisation). ids [T, K], probs [T, E], resident [E] bool.
    Returns (new ids [T, K] ordered by probability, number of substitutions)."""
    ids = np.array(ids, dtype=np.int32, copy=True)
    if slack <= 0:
        return ids, 0
    probs = np.asarray(probs)
    resident = np.asarray(resident, dtype=bool)
    n_sub = 0
    for t in range(ids.shape[0]):
        row = ids[t]
        chosen = np.zeros(probs.shape[1], dtype=bool)
        chosen[row] = True
        # resident experts not selected, most probable first
        spare = np.flatnonzero(resident & ~chosen)
        spare = spare[np.argsort(-probs[t, spare], kind="stable")]
        si = 0
        for kk in np.argsort(probs[t, row], kind="stable"):  # least probable miss first
            e = row[kk]
            if resident[e] or si >= spare.size:
                continue
            cand = spare[si]
            if probs[t, cand] >= probs[t, e] - slack:
                row[kk] = cand
                si += 1
                n_sub += 1
        ids[t] = row[np.argsort(-probs[t, row], kind="stable")]
    return ids, n_sub


def cache_aware_reroute(source, layer: int, ids: np.ndarray, w: np.ndarray,
                        probs: np.ndarray, slack: float,
                        renormalise: bool) -> tuple[np.ndarray, np.ndarray]:
    """The model-side hook of cache-aware routing: `cache_aware_route` against what the
    source's cache holds (resident or on its way) for `layer`, then the expert weights
    recomputed from the router probabilities (renormalised over the top-k when the
    architecture does). ids [T, K], w [T, K], probs [T, E]. Counts substitutions. A source
    without a cache (everything resident) is returned unchanged."""
    cache = getattr(source, "cache", None)
    if cache is None or slack <= 0:
        return ids, w
    new, n_sub = cache_aware_route(ids, probs, cache.where[layer] >= 0, slack)
    if n_sub == 0:
        return ids, w
    nw = np.take_along_axis(np.asarray(probs), new, axis=1).astype(np.float32)
    if renormalise:
        nw /= nw.sum(axis=1, keepdims=True)
    source.counters.substitutions += n_sub
    return new.astype(ids.dtype), nw


from efedge.experts import policies as _policies  # noqa: E402  (registers its policies)


def __getattr__(name: str):
    """ExpertFlow, FixedHorizon and NextLayer are importable from here as well."""
    if name in ("ExpertFlow", "FixedHorizon", "NextLayer"):
        return getattr(_policies, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["POLICIES", "Policy", "OnDemandLRU", "LFU", "make_policy", "cache_aware_route",
           "cache_aware_reroute"]
