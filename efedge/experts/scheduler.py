"""Cache policies: which slot to evict, and what to load ahead of need.

A policy is a small object with four hooks, all called on the compute thread:

* `attach(source)` — once, with the StreamingExperts it drives (for `source.prefetch`).
* `victim(cache, candidates) -> slot` — choose among unpinned READY slots (cond held);
  -1 refuses (only ever during the policy's own prefetch).
* `on_request(layer, experts)` — the layer asked for these experts (cond held).
* `on_route(layer, hidden, ids, pregate=None)` — a layer has routed; a predictor may
  prefetch here. `pregate` [T, n, E]: router logits of layers layer+1..layer+n on this
  hidden state, for sources without router weights (the trace simulator).

Policies only talk to the source through `prefetch`, `cache`, `store`, `routers`,
`n_active`, `engine.bandwidth_ewma / latency_ewma`, `counters` and `now()`, so the
simulator runs this same code on a virtual clock.

* `ondemand` (alias `lru`): load on miss, LRU (llama.cpp --moe-cache-mib behaviour).
* `lfu`: load on miss, evict the least frequently requested.
* `next-layer`: mixtral-offloading — the next layer's router on the current hidden state,
  prefetch its top-k; LRU.
* `fixed:H`: the hybrid predictor's top-k for each of the next H layers; LRU (a fixed
  step, as ProMoE / HOBBIT).
* `expertflow`: the hybrid predictor with the adaptive horizon controller and
  prediction-aware eviction (docs/scheduler.md).
"""

from __future__ import annotations

import numpy as np

from efedge.errors import EfedgeError
from efedge.experts.cache import EMPTY, READY
from efedge.experts.horizon import (
    HorizonController,
    lru_victim,
    route_prologue,
    select_prefetch,
    use_value,
    value_victim,
)
from efedge.experts.predictor import HybridPredictor


class Policy:
    name = "base"
    prefetches = False

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

    def victim(self, cache, candidates: np.ndarray) -> int:
        raise NotImplementedError

    def on_request(self, layer: int, experts: list[int]) -> None:
        pass

    def on_route(self, layer: int, hidden: np.ndarray, ids: np.ndarray,
                 pregate: np.ndarray | None = None) -> None:
        pass

    # -- helpers for prefetching policies ---------------------------------------------------
    def _note_route(self, layer: int, ids: np.ndarray) -> np.ndarray:
        """Remember the layer being computed and the experts it still needs; returns the
        keys (m * E + e) of queued prefetches that came due without being needed."""
        if layer <= self._last_layer:
            self._step = (self._step // self.n_layer + 1) * self.n_layer
        self._step = self._step - self._step % self.n_layer + layer
        self._last_layer = layer
        self.cur_layer = layer
        self.tick0 = self.source.cache.tick
        return route_prologue(self.needed, np.asarray(ids), self._due, self._step, layer)

    def _record_horizon(self, h: float) -> None:
        c = self.source.counters
        if c.horizon_mean != self._h_written:  # the counters were reset
            self._h_sum, self._h_n = 0.0, 0
        self._h_sum += h
        self._h_n += 1
        self._h_written = c.horizon_mean = self._h_sum / self._h_n

    def _lru_victim(self, cache, candidates: np.ndarray) -> int:
        if self.fetched_at.shape[0] != cache.n_slots:
            self.fetched_at = np.zeros(cache.n_slots, dtype=np.int64)
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

    def _pregate_logits(self, layer: int, hidden, n: int) -> np.ndarray | None:
        """Router logits of layers layer+1..layer+n on `hidden` by calling the routers
        (the generic path; NaN beyond the last layer)."""
        routers = getattr(self.source, "routers", None)
        if not routers or hidden is None or n <= 0:
            return None
        t = hidden.shape[0]
        out = np.full((t, n, self.n_expert), np.nan, dtype=np.float32)
        for d in range(1, n + 1):
            if layer + d < self.n_layer:
                out[:, d - 1] = np.asarray(routers[layer + d](hidden), dtype=np.float32)
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

    def _prefetch(self, layer: int, experts, priority: int) -> int:
        try:
            n = self.source.prefetch(layer, experts, priority=priority)
        except TypeError:  # a source without priorities
            n = self.source.prefetch(layer, experts)
        if n:  # remember when each was fetched (the LRU clock of the baselines)
            cache = self.source.cache
            if self.fetched_at.shape[0] != cache.n_slots:
                self.fetched_at = np.zeros(cache.n_slots, dtype=np.int64)
            slots = cache.where[layer, np.asarray(list(experts), dtype=np.int64)]
            self.fetched_at[slots[slots >= 0]] = cache.tick
        return n


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


class NextLayer(Policy):
    """mixtral-offloading: apply the next layer's router to the current hidden state and
    prefetch its top-k experts (the union over the batch's tokens); LRU eviction."""

    name = "next-layer"
    prefetches = True

    def attach(self, source) -> None:
        super().attach(source)
        self.W: np.ndarray | None = None
        self._dense_checked = False

    def victim(self, cache, candidates: np.ndarray) -> int:
        return self._lru_victim(cache, candidates)

    def on_route(self, layer, hidden, ids, pregate=None) -> None:
        t0 = self.source.now()
        self._note_route(layer, ids)
        nxt = layer + 1
        if nxt < self.n_layer:
            logits = None
            if hidden is not None and not self._dense_checked and hidden.ndim == 2:
                self.W = self._routers_dense(hidden.shape[1])
                self._dense_checked = True
            if self.W is not None:
                logits = np.asarray(hidden, dtype=np.float32) @ self.W[nxt].T
            elif pregate is not None and pregate.shape[1] >= 1:
                logits = np.asarray(pregate[:, 0], dtype=np.float32)
            else:
                pg = self._pregate_logits(layer, hidden, 1)
                logits = None if pg is None else pg[:, 0]
            if logits is not None and np.isfinite(logits).all():
                k = self.n_active
                top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
                best = logits.max(axis=0)
                want = np.unique(top)
                want = want[np.argsort(-best[want], kind="stable")]
                self._prefetch_within(self._room(), nxt, want, priority=self._step + 2)
                self._record_horizon(1.0)
            else:
                self._record_horizon(0.0)
        else:
            self._record_horizon(0.0)
        self.overhead_s += self.source.now() - t0


class _Predictive(Policy):
    """Shared by fixed:H and expertflow: the hybrid predictor fed once per layer."""

    prefetches = True
    max_distance = 8

    def __init__(self, trace=None, **predictor_kw):
        self.trace = trace
        self.predictor_kw = predictor_kw

    def attach(self, source) -> None:
        super().attach(source)
        self.predictor = HybridPredictor(self.n_layer, self.n_expert, self.n_active,
                                         max_distance=self.max_distance, **self.predictor_kw)
        if self.trace is not None:
            self.predictor.seed(self.trace)
        self._dense_checked = False

    def _predict(self, layer, hidden, ids, pregate, n_pred: int, also: int = 0) -> None:
        pred = self.predictor
        if hidden is not None and not self._dense_checked and np.ndim(hidden) == 2:
            W = self._routers_dense(hidden.shape[1])
            if W is not None:
                pred.set_router_weights(W)
            self._dense_checked = True
        h = hidden if pred.W.shape[0] else None
        if h is None and pregate is None:
            pregate = self._pregate_logits(layer, hidden, n_pred)
        pred.step(layer, ids, hidden=h, pregate=pregate, n_pred=n_pred, also=also)


class FixedHorizon(_Predictive):
    """The hybrid predictor's top-k for each of the next H layers, every layer (a fixed
    look-ahead step, as ProMoE / HOBBIT), LRU eviction."""

    def __init__(self, horizon: int = 2, **kw):
        super().__init__(**kw)
        self.horizon = max(1, int(horizon))
        self.max_distance = self.horizon
        self.name = f"fixed:{self.horizon}"

    def victim(self, cache, candidates: np.ndarray) -> int:
        return self._lru_victim(cache, candidates)

    def on_route(self, layer, hidden, ids, pregate=None) -> None:
        t0 = self.source.now()
        self._note_route(layer, ids)
        self._predict(layer, hidden, ids, pregate, self.horizon)
        pred, cache = self.predictor, self.source.cache
        n_tok = np.asarray(ids).reshape(-1, self.n_active).shape[0]
        room = self._room()
        for d in range(1, self.horizon + 1):
            m = (layer + d) % self.n_layer
            # one token: its top-k; a batch: as many as it is expected to need
            k = self.n_active if n_tok == 1 else int(round(float(pred.p_use[d - 1].sum())))
            want = [int(e) for e in pred.order[d - 1, :max(k, 1)] if cache.where[m, e] < 0]
            if want:
                self._prefetch_within(room, m, want, priority=self._step + d + 1)
        self._record_horizon(float(self.horizon))
        self.overhead_s += self.source.now() - t0


class ExpertFlow(_Predictive):
    """Adaptive look-ahead from bandwidth, expert bytes, compute per layer and measured
    prediction accuracy; prediction-aware eviction (docs/scheduler.md)."""

    name = "expertflow"

    def __init__(self, max_horizon: int = 8, p_floor: float = 0.05, explore: int = 1,
                 value_all: bool = False, **kw):
        super().__init__(**kw)
        self.explore, self.value_all = int(explore), bool(value_all)
        self.max_distance = max(1, int(max_horizon))
        self.controller = HorizonController(self.max_distance, p_floor=p_floor)
        self._evict_limit = np.inf

    def attach(self, source) -> None:
        super().attach(source)
        self._seen = None
        self.horizon = 1
        self.cancelled = 0
        self._mean_bytes = float(np.mean([source.store.expert_bytes(i)
                                          for i in range(self.n_layer)]))

    def victim(self, cache, candidates: np.ndarray) -> int:
        return int(value_victim(candidates, cache.slot_owner, cache.slot_last_use,
                                cache.slot_uses, self.predictor.p_next, self.cur_layer,
                                self.needed, self.tick0, self.n_expert, self._evict_limit))

    def on_route(self, layer, hidden, ids, pregate=None) -> None:
        src = self.source
        t0 = src.now()
        c = src.counters
        stale = self._note_route(layer, ids)
        ids2 = np.asarray(ids).reshape(-1, self.n_active)
        if stale.size:
            self._cancel(stale)
        loads = c.prefetch_used + c.misses  # what on-demand loading would have loaded
        delta = 0 if self._seen is None or loads < self._seen else loads - self._seen
        self._seen = loads
        ctl = self.controller
        ctl.observe(t0, c.stall_s, delta, batch=ids2.shape[0])
        eng = src.engine
        h_need = ctl.plan(self._mean_bytes, float(eng.bandwidth_ewma), float(eng.latency_ewma))
        # predict as far as the controller looks, and this layer's next turn (eviction
        # values read p_next; the layers in between were valued on earlier steps)
        if self.value_all:
            self._predict(layer, hidden, ids2, pregate,
                          max(h_need + self.explore, min(self.max_distance, self.n_layer)))
        else:
            self._predict(layer, hidden, ids2, pregate,
                          min(h_need + self.explore, self.max_distance), also=self.n_layer)
        pred, cache = self.predictor, src.cache
        # (the kernel keeps the GIL: no transfer thread changes the tables meanwhile)
        n, ms, es, ps, ds, horizon = select_prefetch(
            layer, h_need, ctl.p_min, pred.p_use, pred.order, cache.where, self.needed,
            cache.layer_class, cache.slot_state, cache.slot_class, cache.slot_pins,
            cache.class_slots, self.n_expert)
        self.horizon = max(1, int(horizon))
        i = 0
        while i < n:  # one prefetch call per target layer, nearest first
            j = i
            while j < n and ms[j] == ms[i]:
                j += 1
            # evict only experts worth less than the least valuable one brought in
            self._evict_limit = use_value(float(ps[j - 1]), int(ds[i]), self.n_layer)
            m, due = int(ms[i]), self._step + int(ds[i])
            try:
                src.prefetch(m, es[i:j], priority=due + 1)
            finally:
                self._evict_limit = np.inf
            got = es[i:j][cache.where[m, es[i:j]] >= 0]
            self._due[m, got] = due
            i = j
        self._record_horizon(float(self.horizon))
        self.overhead_s += src.now() - t0

    def _cancel(self, keys: np.ndarray) -> None:
        """Cancel queued prefetches whose layer came without needing them: they would keep
        their early priority and hold the link ahead of useful loads."""
        cancel = getattr(self.source, "cancel_prefetch", None)
        if cancel is None:
            return
        lay = keys // self.n_expert
        for m in np.unique(lay):
            self.cancelled += cancel(int(m), keys[lay == m] % self.n_expert)


POLICIES: dict[str, type[Policy]] = {"ondemand": OnDemandLRU, "lru": OnDemandLRU, "lfu": LFU,
                                     "next-layer": NextLayer, "expertflow": ExpertFlow,
                                     "fixed": FixedHorizon}


def make_policy(name: str, **kwargs) -> Policy:
    """A policy by name: ondemand | lru | lfu | next-layer | fixed:H | expertflow.
    Keyword arguments go to the policy (e.g. expertflow's trace= to seed its predictor)."""
    key = str(name).strip().lower()
    if key.startswith("fixed"):
        _, _, h = key.partition(":")
        try:
            horizon = int(h) if h else 2
        except ValueError:
            horizon = 0
        if horizon < 1:
            raise EfedgeError(f"bad policy {name!r}: use fixed:H with a look-ahead H ≥ 1")
        return FixedHorizon(horizon, **kwargs)
    cls = POLICIES.get(key)
    if cls is None:
        raise EfedgeError(f"unknown cache policy {name!r} (available: "
                          f"{', '.join(sorted(POLICIES))}, fixed:H)")
    return cls(**kwargs)


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
