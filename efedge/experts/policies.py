"""The prefetching policies: `next-layer` (mixtral-offloading), `fixed:H` (a fixed
look-ahead step, as ProMoE / HOBBIT) and `expertflow` (the adaptive scheduler of
docs/scheduler.md). They register themselves in scheduler.POLICIES; import them from
efedge.experts.scheduler (make_policy) like every other policy."""

from __future__ import annotations

import numpy as np

from efedge.errors import ArgumentError, EfedgeError
from efedge.experts import predictor_thread
from efedge.experts.horizon import (
    HorizonController,
    plan_groups,
    value_victim,
)
from efedge.experts.issue import PlanBuffers, PrefetchPlan
from efedge.experts.link import LinkTiming
from efedge.experts.options import MAX_HORIZON, number, probability
from efedge.experts.predictor import HybridPredictor, is_path, trace_experts
from efedge.experts.predictor_kernels import refine_pick, refine_pick_routed
from efedge.experts.scheduler import POLICIES, Policy


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
        self._defer(self._plan_next, layer, hidden, pregate)  # behind the demand loads
        self.overhead_s += self.source.now() - t0

    def _plan_next(self, layer, hidden, pregate) -> None:
        nxt = layer + self._span(layer, 1)  # the next layer with experts
        if nxt < self.n_layer:
            logits = None
            if hidden is not None and not self._dense_checked and hidden.ndim == 2:
                self.W = self._routers_dense(hidden.shape[1])
                self._dense_checked = True
            if self.W is not None:
                logits = np.asarray(hidden, dtype=np.float32) @ self.W[nxt].T
                sel = self._selection()  # ranked as the router will select
                if sel is not None:
                    logits = sel.apply(nxt, logits)
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


def read_seed_trace(trace) -> np.ndarray:
    """The expert ids of a routing trace, int32 [n_tokens, n_layer, K]: an array, or a
    path to an .npz holding one under "experts" (what `efedge trace` writes). A file that
    cannot be read, or holds no such array, is an EfedgeError naming it."""
    name = trace
    try:
        trace = trace_experts(trace)  # (only a file can fail here)
    except OSError as exc:  # the reason; str(exc) repeats the errno and the path
        raise EfedgeError(f"cannot read the routing trace {name!s}: "
                          f"{exc.strerror or exc}") from None
    except ValueError as exc:
        # np.load's word for a file that is no .npz advises unpickling it (a text file)
        reason = "not a numpy .npz file" if "pickle" in str(exc) else exc
        raise EfedgeError(f"cannot read the routing trace {name!s}: {reason}") from None
    except Exception as exc:  # a bad zip, a truncated file
        raise EfedgeError(f"cannot read the routing trace {name!s}: {exc}") from None
    try:
        ex = np.asarray(trace)
        ok = ex.ndim == 3 and ex.size > 0 and np.issubdtype(ex.dtype, np.integer)
    except Exception:  # noqa: BLE001 - anything that is not an array of ids
        ok = False
    if not ok or ex.min() < 0:
        what = f"{name!s}" if is_path(name) else "the array given"
        raise EfedgeError(f"a routing trace to seed the predictor with holds expert ids ≥ 0 "
                          f"shaped [n_tokens, n_layer, K]; {what} does not")
    return np.ascontiguousarray(ex, dtype=np.int32)


def _latency(engine) -> float:
    """The horizon controller's time for a load's first bytes to land: the link meter's
    service time, or a slow read of the file where that is longer (reads overlapping in a
    drive's queue: TransferEngine.read_tail_s; engines without it, e.g. the simulator's
    link, have only the meter)."""
    return max(float(engine.latency_ewma), float(getattr(engine, "read_tail_s", 0.0)))


def _link_meter(engine) -> np.ndarray | None:
    """The engine's link meter array (bandwidth, latency, read times), read by the horizon
    controller in its own kernel, where the engine's bandwidth and latency are
    link.LinkTiming's own properties over it (the CPU path's engines); else None, and
    the properties are read (the simulator's engine, or one that overrides them)."""
    cls = type(engine)
    if isinstance(engine, LinkTiming) and all(
            getattr(cls, a) is getattr(LinkTiming, a)
            for a in ("bandwidth_ewma", "latency_ewma", "read_tail_s")):
        return engine.meter
    return None


class _Predictive(Policy):
    """Shared by fixed:H and expertflow: the hybrid predictor fed once per layer."""

    prefetches = True
    seeds_from_trace = True
    max_distance = 8

    def __init__(self, trace=None, **predictor_kw):
        if "max_distance" in predictor_kw:  # (attach sets it from the look-ahead)
            raise ArgumentError("max_distance is the policy's to set: give expertflow "
                                "max_horizon, or fixed:H its H")
        HybridPredictor.check_options(predictor_kw)  # (now, not when a model loads)
        # a routing trace to seed the transitions with: read and checked here, before a
        # model's transfer threads start, so a bad file is one clear error
        self.trace = None if trace is None else read_seed_trace(trace)
        self._trace_name = None if trace is None or not is_path(trace) else str(trace)
        self.predictor_kw = predictor_kw

    def attach(self, source) -> None:
        super().attach(source)
        # distances are in layers: reaching max_distance MoE layers may take more
        reach = max(self._span(il, self.max_distance) for il in range(self.n_layer))
        self.predictor = HybridPredictor(self.n_layer, self.n_expert, self.n_active,
                                         max_distance=reach, **self.predictor_kw)
        if self.trace is not None:
            try:
                self.predictor.seed(self.trace)
            except ValueError as exc:  # its shape or ids do not fit this model
                raise EfedgeError(
                    f"the routing trace {self._trace_name or '(an array)'} does not fit this "
                    f"model ({self.n_layer} layers of {self.n_expert} experts): {exc}; "
                    "record it from this model (efedge trace)") from None
        self._dense_checked = False

    def _predict(self, layer, hidden, ids, pregate, n_pred: int, also: int = 0) -> None:
        pred = self.predictor
        if hidden is not None and not self._dense_checked and np.ndim(hidden) == 2:
            W = self._routers_dense(hidden.shape[1])
            if W is not None:
                pred.set_router_weights(W, self._selection())
            self._dense_checked = True
        h = hidden if pred.W.shape[0] else None
        if h is None and pregate is None:
            pregate = self._pregate_logits(layer, hidden, n_pred)
        pred.step(layer, ids, hidden=h, pregate=pregate, n_pred=n_pred, also=also)

    def on_pass(self, tokens, pos: int | None = None) -> None:
        """The pass's tokens: the predictor's token memory serves its layers (and, with
        their position, its context draft values what may follow for eviction)."""
        self.predictor.begin_pass(tokens, pos)

    def close(self) -> None:
        """The source closes: stop the predictor's helper thread, if it has one."""
        pred = getattr(self, "predictor", None)
        if pred is not None:
            pred.close()


class FixedHorizon(_Predictive):
    """The hybrid predictor's top-k for each of the next H layers, every layer (a fixed
    look-ahead step, as ProMoE / HOBBIT), LRU eviction."""

    def __init__(self, horizon: int = 2, **kw):
        kw.setdefault("draft_tokens", 0)  # (its LRU eviction reads no eviction values)
        super().__init__(**kw)
        self.horizon = number("horizon", horizon, 1, MAX_HORIZON, integer=True)
        self.max_distance = self.horizon
        self.name = f"fixed:{self.horizon}"

    def victim(self, cache, candidates: np.ndarray) -> int:
        return self._lru_victim(cache, candidates)

    def on_route(self, layer, hidden, ids, pregate=None) -> None:
        t0 = self.source.now()
        self._note_route(layer, ids)
        self._defer(self._plan_fixed, layer, hidden, ids, pregate)  # behind the demand loads
        self.overhead_s += self.source.now() - t0

    def _plan_fixed(self, layer, hidden, ids, pregate) -> None:
        reach = self._span(layer, self.horizon)  # the next H layers with experts
        self._predict(layer, hidden, ids, pregate, reach)
        pred, cache = self.predictor, self.source.cache
        n_tok = np.asarray(ids).reshape(-1, self.n_active).shape[0]
        room = self._room()
        for d in range(1, reach + 1):
            m = (layer + d) % self.n_layer
            if cache.layer_class[m] < 0:
                continue  # a dense layer: nothing to load
            # one token: its top-k; a batch: as many as it is expected to need
            k = self.n_active if n_tok == 1 else int(round(float(pred.p_use[d - 1].sum())))
            want = [int(e) for e in pred.order[d - 1, :max(k, 1)] if cache.where[m, e] < 0]
            if want:
                self._prefetch_within(room, m, want, priority=self._step + d + 1)
        self._record_horizon(float(self.horizon))


class ExpertFlow(_Predictive):
    """Adaptive look-ahead from bandwidth, expert bytes, compute per layer and measured
    prediction accuracy; prediction-aware eviction (docs/scheduler.md)."""

    name = "expertflow"

    def __init__(self, max_horizon: int = 8, p_floor: float = 0.2, explore: int = 1,
                 explore_every: int = 2, value_all: bool = False, value_next: bool = False,
                 pass_start: bool = True, victim_aware: bool = True, stage_lead: int = 2,
                 stage_floor: float | None = None, refine: bool = False,
                 refine_margin: int = 2, refine_p: float = 0.75,
                 predictor_thread: bool | str | None = None, first_input: bool = True,
                 draft_p_busy: float = 0.5, busy_rho: float = 8.0, **kw):
        super().__init__(**kw)
        # (each option checked where it is kept: out of range is an ArgumentError naming
        # it, efedge/experts/options.py)
        # where the link is heavily over-subscribed (ρ ≥ busy_rho: carrying the loads
        # would take busy_rho times the compute they hide behind) prefetching hides
        # little and what the cache keeps decides: the context draft's experts are then
        # valued at draft_p_busy instead of the predictor's draft_p (simulated,
        # docs/scheduler.md §6, thirty-fifth session: Mixtral-8x7B's experts on three
        # laptop-class profiles 1.3–1.8 points less stall, the rest unchanged)
        self.draft_p_busy = probability("draft_p_busy", draft_p_busy)
        self.busy_rho = number("busy_rho", busy_rho, 0.0, lo_open=True, inf=True)
        # first_input: a one-token pass's start waits for layer 0's input (the embedding,
        # normalised for its router: known before its attention, right after the pass
        # begins) and pre-gates layer 0 from it — where the model gives it
        # (layer_input_wired) and layer 0 has experts; else it plans at on_pass as before
        self.first_input = bool(first_input)
        self.layer_input_wired = False
        self._pass_pending = False
        self.first_inputs = 0  # pass starts planned on layer 0's input
        # the predictor's step on a helper thread where a core is spare (None / "auto":
        # EFEDGE_PREDICTOR_THREAD, else auto; efedge/experts/predictor_thread.py)
        self.predictor_thread = predictor_thread
        # refine: at each MoE layer's start, its router on the layer's input (known then,
        # before the attention) re-ranks what is queued for it — the likeliest not yet
        # loading are fetched at once, queued ones outside the top K + refine_margin are
        # cancelled; refine_p: the chance of use such a fetch is valued at (its recall)
        self.refine = bool(refine)
        self.refine_margin = number("refine_margin", refine_margin, 0, integer=True)
        self.refine_p = probability("refine_p", refine_p)
        self.refined = self.refine_cancelled = 0
        # a source with a host tier (device="cuda", host_cache=): the layer stage_lead
        # beyond the VRAM horizon gets its likeliest experts staged disk → host, those
        # with p_next ≥ stage_floor (default p_floor)
        self.stage_lead = number("stage_lead", stage_lead, 1, integer=True)
        p_floor = probability("p_floor", p_floor)
        self.stage_floor = p_floor if stage_floor is None else \
            probability("stage_floor", stage_floor)
        self.victim_aware = bool(victim_aware)
        self.pass_start = bool(pass_start)
        self.explore = number("explore", explore, 0, integer=True)
        self.value_all = bool(value_all)
        # the distances past the horizon are predicted (for their calibration and eviction
        # values) on every explore_every-th pass of each layer: each distance costs ~10 µs
        # with the caches as the layer kernels leave them, and these are not prefetched
        self.explore_every = number("explore_every", explore_every, 1, integer=True)
        self.value_next = bool(value_next)
        self.max_distance = number("max_horizon", max_horizon, 1, MAX_HORIZON,
                                   integer=True)
        self.controller = HorizonController(self.max_distance, p_floor=p_floor)

    def wants_spare_core(self) -> bool:
        return predictor_thread.may_run(self.predictor_thread)

    def attach(self, source) -> None:
        super().attach(source)
        eng = getattr(source, "engine", None)
        pool = getattr(eng, "pool", None) if getattr(eng, "native", False) else None
        self.predictor.use_thread(predictor_thread.wanted(self.predictor_thread),
                                  None if pool is None else pool.ctl)
        self._meter = _link_meter(eng)
        self._draft_p = self.predictor.draft_p  # (the value on a link that keeps up)
        self._seen = None
        self.horizon = 1
        self.cancelled = 0
        self._refine_buf = (np.empty(self.n_expert, np.int64), np.empty(self.n_expert, np.int64))
        # the buffers select_prefetch writes plans into, free for the next one (a plan holds
        # its own until it is issued: issue.PlanBuffers)
        self._plan_buffers: list[PlanBuffers] = []
        # an expert's bytes on average over the layers that have experts (a dense layer's
        # 0 would shrink τ, and with it the look-ahead, in proportion to the dense layers)
        sizes = [b for b in map(source.store.expert_bytes, range(self.n_layer)) if b > 0]
        self._mean_bytes = float(np.mean(sizes)) if sizes else 0.0
        cache = source.cache
        per_class = np.bincount(cache.layer_class[cache.layer_class >= 0],  # not dense layers
                                minlength=len(cache.class_slots))
        # a budget that holds every expert: once all are in, there is nothing to decide
        self._all_fit = bool((cache.class_slots >= per_class * self.n_expert).all())
        self._all_in = False
        self._stage_plan: list[tuple] = []
        host = getattr(source, "host_tier", None)
        self._stager = getattr(source, "stage", None) if host is not None else None
        if self._stager is not None:
            # per layer, how many to stage: the host slots of its size class shared by
            # the layers of that class (more would evict what the same pass staged)
            lc = cache.layer_class
            n_of_class = np.bincount(lc[lc >= 0], minlength=len(cache.class_slots))
            self._stage_k = np.array(
                [0 if lc[m] < 0 else min(self.n_expert, max(
                    self.n_active, -(-host.class_slots(m) // int(n_of_class[lc[m]]))))
                 for m in range(self.n_layer)], dtype=np.int64)

    def victim(self, cache, candidates: np.ndarray) -> int:
        return int(value_victim(candidates, cache.slot_owner, cache.slot_last_use,
                                cache.slot_uses, self.predictor.p_next, self.cur_layer,
                                self.needed, self.tick0, self.n_expert, self._evict_limit,
                                self._evict_p_limit))

    def _load_rest(self, layer: int) -> None:
        """A budget that holds every expert: plan loads of all experts not resident or
        loading, the next layers' first (issued after this layer's demand loads). With
        random or skewed routing some experts may otherwise never be asked for, and the
        predictor would keep running (~0.1 ms a layer) for nothing (issue: expertflow at
        a 100% cache within 3% of the policy-free decode)."""
        cache = self.source.cache
        for d in range(1, self.n_layer + 1):
            m = (layer + d) % self.n_layer
            if cache.layer_class[m] >= 0:
                self._prefetch(m, np.flatnonzero(cache.where[m] < 0), self._step + d + 1)
        dense = cache.layer_class < 0
        self._all_in = bool((dense[:, None] | (cache.where >= 0)).all()) or not self._plan

    def on_route(self, layer, hidden, ids, pregate=None) -> None:
        if self._pass_pending:  # (layer 0's input never came: plan without it)
            self._start_pass()
        src = self.source
        t0 = src.now()
        c = src.counters
        stale = self._note_route(layer, ids)
        if self._all_fit and (self._all_in or bool((src.cache.where >= 0).all())):
            self._all_in = True
            self._record_horizon(0.0)
            return
        if self._all_fit:  # queue every expert not in yet, once: then nothing to predict
            self._load_rest(layer)
            self._record_horizon(0.0)
            return
        ids2 = np.asarray(ids).reshape(-1, self.n_active)
        if stale.size:
            self._cancel(stale)
        loads = c.prefetch_used + c.misses  # what on-demand loading would have loaded
        delta = 0 if self._seen is None or loads < self._seen else loads - self._seen
        self._seen = loads
        # the look-ahead the controller wants from the measured link and compute, in MoE
        # layers (_span turns a count into a distance); a transfer engine's meter is read
        # in the controller's own kernel call
        if self._meter is not None:
            h_need = self.controller.update_meter(float(t0), float(c.stall_s),
                                                  float(delta), ids2.shape[0],
                                                  self._mean_bytes, self._meter)
        else:
            eng = src.engine
            h_need = self.controller.update(float(t0), float(c.stall_s), float(delta),
                                            ids2.shape[0], self._mean_bytes,
                                            float(eng.bandwidth_ewma), _latency(eng))
        # the predictor and the plan run once this layer's demand loads are on the link;
        # with a helper thread the prediction starts there now, beside those loads
        # (the first step, synchronous, gives the predictor its router weights)
        posted = self.predictor.threaded and self._dense_checked and \
            self.predictor.post_step(layer, ids2, hidden, *self._reach(layer, h_need))
        self._defer(self._predict_and_plan, layer, hidden, ids2, pregate, h_need, posted)
        self.overhead_s += src.now() - t0

    def _reach(self, layer: int, h_need: int) -> tuple[int, int]:
        """How far this layer's step predicts (a distance), and one more distance whose
        eviction values it refreshes (0: none)."""
        # as far as the controller looks, and this layer's next turn (eviction values
        # read p_next; the layers in between were valued on earlier steps)
        if self.value_all:
            return self._span(layer, max(h_need + self.explore,
                                         min(self.max_distance, self.n_layer))), 0
        # every layer in turn: by pass + layer, so that with an even number of layers the
        # same layers do not always explore and the others never
        turn = self._step // self.n_layer + layer
        explore = self.explore if turn % self.explore_every == 0 else 0
        return (self._span(layer, min(h_need + explore, self.max_distance)),
                self.n_layer if self.value_next else 0)

    def _predict_and_plan(self, layer, hidden, ids2, pregate, h_need: int,
                          posted: bool = False) -> None:
        if not posted:  # (a posted step is waited for in the plan's kernel call)
            self._predict(layer, hidden, ids2, pregate, *self._reach(layer, h_need))
        self.horizon = self._plan_prefetches(layer, self._span(layer, h_need))
        if self._stager is not None:
            self._plan_stage(layer, self.horizon)
        self._record_horizon(float(self.horizon))

    def _plan_stage(self, layer: int, horizon: int) -> None:
        """Plan the host tier's staging (issued with the prefetches, behind this layer's
        demand loads): the layer `stage_lead` beyond the VRAM horizon — so each layer is
        staged about once a pass, that far ahead — its likeliest experts by p_next (the
        predictor's latest estimate for that layer's next turn) above stage_floor, at
        most _stage_k. A few numpy calls on one row of E values."""
        d = min(horizon + self.stage_lead, self.n_layer)
        if d <= horizon:
            return  # VRAM prefetches already reach a whole turn ahead
        m = (layer + d) % self.n_layer
        k = int(self._stage_k[m])
        if k <= 0:
            return
        p = self.predictor.p_next[m]
        top = np.argpartition(p, p.size - k)[p.size - k:]
        top = top[p[top] >= self.stage_floor]
        if top.size:
            top = top[np.argsort(-p[top], kind="stable")]
            self._stage_plan.append((m, top, p[top].astype(np.float64), self._step + d + 1))

    def has_deferred_work(self) -> bool:
        """As Policy's, and staging planned without any VRAM prefetch counts too."""
        return self._deferred is not None or bool(self._plan) or bool(self._stage_plan)

    def _flush_plan(self) -> None:
        super()._flush_plan()
        plan, self._stage_plan = self._stage_plan, []
        for m, experts, values, priority in plan:
            self._stager(m, experts, priority=priority, values=values)

    def _h_need(self) -> int:
        """The look-ahead the controller wants from the measured link and compute."""
        if self._meter is not None:
            return self.controller.plan_meter(self._mean_bytes, self._meter)
        eng = self.source.engine
        return self.controller.plan(self._mean_bytes, float(eng.bandwidth_ewma),
                                    _latency(eng))

    def _plan_prefetches(self, layer: int, h_need: int) -> int:
        """Plan the predicted experts above p_min within h_need layers after `layer` (a
        distance: dense layers count); returns the horizon used (at least 1)."""
        pred, cache, ctl = self.predictor, self.source.cache, self.controller
        # (the kernel keeps the GIL: no transfer thread changes the tables meanwhile). One
        # prefetch per target layer, nearest first, needed-at priority, evicting only
        # experts worth less than the least valuable one it brings: the kernel groups them
        # (after a step posted to the helper thread, its wait in the same kernel call)
        bufs = self._plan_buffers.pop() if self._plan_buffers else \
            PlanBuffers(pred.p_use.shape[0] * self.n_expert)
        horizon, n = pred.wait_select(
            layer, h_need, ctl.p_min, pred.p_use, pred.order, cache.where, self.needed,
            cache.layer_class, cache.slot_state, cache.slot_class, cache.slot_pins,
            cache.class_slots, self.n_expert, self._step, ctl.rho, self.victim_aware,
            bufs.ints, bufs.floats)
        if n:
            self._plan.append(bufs.plan(n))
        else:
            self._plan_buffers.append(bufs)
        return max(1, horizon)

    def _issue_entry(self, entry) -> None:
        """A PrefetchPlan in one kernel call where the source takes one (the CPU path,
        the simulator, the GPU path), else group by group through prefetch()."""
        if type(entry) is not PrefetchPlan:
            return super()._issue_entry(entry)
        src = self.source
        batch = getattr(src, "prefetch_plan", None)
        if batch is None:  # (each group's experts copied: a source may keep them)
            for g in range(entry.n):
                lo, hi = int(entry.start[g]), int(entry.start[g + 1])
                super()._issue_entry((int(entry.layer[g]), entry.experts[lo:hi].copy(),
                                      int(entry.prio[g]), float(entry.limit[g]),
                                      float(entry.p_limit[g])))
        else:
            self._fit_fetched_at(src.cache.n_slots)
            batch(entry, self.predictor.p_next, self.cur_layer, self.needed, self.tick0,
                  self._due, self.fetched_at)
        if entry.buffers is not None:  # (issued: its buffers serve the next plan)
            self._plan_buffers.append(entry.buffers)

    def on_pass(self, tokens, pos: int | None = None) -> None:
        """Before the pass's first layer: its tokens are known, so the token memory can
        name the experts of its first layers (the prediction made at the previous pass's
        last layer could not). Re-plan from there — the same step in the layer stream —
        and issue at once: no demand load is queued yet. A one-token pass whose model
        gives layer 0's input (first_input) waits for it: on_layer_input(0) comes before
        layer 0's attention, with nothing computed in between but the embedding."""
        src = self.source
        t0 = src.now()
        if self.has_deferred_work():  # (a source without on_demand_issued)
            self._catch_up()
        self.predictor.draft_p = self.draft_p_busy if \
            self.controller.rho >= self.busy_rho else self._draft_p
        # the pass start below waits for the beginning: with a helper thread it runs
        # there, beside the embedding of the pass's token
        starts = self.pass_start and not self._all_fit
        self.predictor.begin_pass(tokens, pos, post=starts)
        self._pass_pending = False
        if not starts:
            return
        if self.first_input and self.layer_input_wired and len(tokens) == 1 and \
                src.cache.layer_class[0] >= 0:
            self._pass_pending = True
            self.overhead_s += src.now() - t0
            return
        self._start_pass(t0=t0)

    def _start_pass(self, hidden=None, logits=None, t0: float | None = None) -> None:
        """(on_pass, or on_layer_input(0) with layer 0's input) The pass start's
        prediction of its first layers and their plan."""
        self._pass_pending = False
        src = self.source
        if t0 is None:
            t0 = src.now()
        L = self.n_layer
        h_need = self._h_need()
        # as far as the plan below reaches: the distance past it that on_route explores
        # (for its calibration and eviction values) cost ~4 µs more per token here and
        # moved no simulated figure by more than 0.01 of on-demand's stall (48 settings:
        # demo trace at 450-2880 MB/s, three compute models, the Mixtral-shaped trace on
        # three hardware profiles); predicting all L layers cost 20 µs more per token
        # (on the helper thread it is waited for in the plan's own kernel call below)
        self.predictor.predict_pass_start(self._span(L - 1, min(h_need, self.max_distance, L)),
                                          hidden, logits, wait=False)
        self.needed[:] = False  # the last layer is done: nothing of it is still to be used
        self.cur_layer = L - 1
        self._plan_prefetches(L - 1, self._span(L - 1, min(h_need, L)))
        self._flush_plan()
        self.overhead_s += src.now() - t0

    # the model calls on_layer_input before each MoE layer's attention for refine, and
    # before layer 0's for a pass start that waits for its input (first_input)
    layer_inputs = property(lambda self: "all" if self.refine else
                            "first" if self.first_input else None)

    def on_layer_input(self, layer: int, hidden, logits=None) -> None:
        """Layer `layer` is about to run its attention on `hidden` [1, D] (its input,
        normalised as its router's input is): with `refine`, its router on it (`logits`
        [1, E], its selection logits, from a source without router weights: the
        simulator) names its experts better than the predictions made a layer or more
        earlier — its queued prefetches outside the top K + margin are cancelled before
        they take the link, and those of the top K not yet resident or loading are
        fetched now, valued at refine_p. One token's pass only (decode)."""
        if self._pass_pending and layer == 0:  # (predict_pass_start checks the input)
            self.first_inputs += 1
            self._start_pass(hidden, logits)
        if not self.refine or self._all_fit or self.source.cache.layer_class[layer] < 0:
            return
        src = self.source
        t0 = src.now()
        if self.has_deferred_work():  # (a source without on_demand_issued)
            self._catch_up()
        pred, cache, E = self.predictor, src.cache, self.n_expert
        drop, want = self._refine_buf
        if logits is not None:
            z = np.asarray(logits, dtype=np.float64)
            if z.shape != (1, E) or not np.isfinite(z).all():
                return
            nd, nw = refine_pick(z[0], self.n_active, self.refine_margin, self._due[layer],
                                 cache.where[layer], drop, want)
        elif (pred.W.shape[0] and type(hidden) is np.ndarray and hidden.shape[0] == 1
              and hidden.shape[1] == pred.W.shape[2] and hidden.dtype == np.float32):
            nd, nw = refine_pick_routed(layer, hidden[0], pred.W, pred.W_scale, pred.params,
                                        pred.sel_rb, pred.sel_sb, self.n_active,
                                        self.refine_margin, self._due[layer],
                                        cache.where[layer], drop, want)
        else:  # no routers known yet (their dense copy comes with the first prediction)
            return
        if nd:
            self.refine_cancelled += self._cancel_counted(layer * E + drop[:nd])
            self._due[layer, drop[:nd]] = -1
        if nw:
            # one group, packed and limited as select_prefetch packs the predicted ones
            d = (layer - self.cur_layer) % self.n_layer or self.n_layer
            g, ints, floats = plan_groups(
                nw, np.full(nw, layer, np.int64), np.full(nw, self.refine_p),
                np.full(nw, d, np.int64), self._step, self.n_layer, self.controller.rho,
                self.victim_aware)
            before = src.counters.prefetch_issued
            self._issue_entry(PrefetchPlan(g, ints, floats, want[:nw].copy()))
            self.refined += src.counters.prefetch_issued - before
        self.overhead_s += src.now() - t0

    def _cancel_counted(self, keys: np.ndarray) -> int:
        n0 = self.cancelled
        self._cancel(keys)
        return self.cancelled - n0

    def _cancel(self, keys: np.ndarray) -> None:
        """Cancel queued prefetches whose layer came without needing them: they would keep
        their early priority and hold the link ahead of useful loads."""
        cancel_keys = getattr(self.source, "cancel_prefetch_keys", None)
        if cancel_keys is not None:
            self.cancelled += cancel_keys(keys)
            return
        cancel = getattr(self.source, "cancel_prefetch", None)
        if cancel is None:
            return
        lay = keys // self.n_expert
        for m in np.unique(lay):
            self.cancelled += cancel(int(m), keys[lay == m] % self.n_expert)


POLICIES.update({"next-layer": NextLayer, "fixed": FixedHorizon, "expertflow": ExpertFlow})
