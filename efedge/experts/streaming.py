"""StreamingExperts: the expert source the model uses when a cache budget is set.

`acquire(layer, experts)` yields the experts a layer needs, ready ones first, while the
missing ones load (as mixtral-offloading's cache does): the compute thread waits only when
nothing it needs is ready. Loads are issued only as far as slots allow, so a prompt that
selects more distinct experts than the cache holds is processed expert by expert (load,
apply to its tokens, release) instead of failing. Every microsecond spent waiting is
stall_s; each request is a hit (ready), late (prefetched, still in flight) or miss.
"""

from __future__ import annotations

import time

import numpy as np

from efedge.experts.cache import EMPTY, LOADING, READY, ExpertCache
from efedge.experts.demand_wait import DemandWaits
from efedge.experts.inline_prefetch import InlinePrefetches
from efedge.experts.issue import place_prefetches
from efedge.experts.native_engine import NativeTransferEngine
from efedge.experts.stats import Counters
from efedge.experts.store import ExpertStore
from efedge.experts.transfer import DEMAND, PREFETCH, TransferEngine
from efedge.gil_yield import yield_gil


class StreamingExperts(DemandWaits):
    def __init__(self, store: ExpertStore, cache: ExpertCache, engine: TransferEngine,
                 policy, counters: Counters, routers=None, n_active: int | None = None,
                 selection=None):
        self.store, self.cache, self.engine = store, cache, engine
        self.policy, self.counters = policy, counters
        # per layer, a callable hidden [T, D] → router logits [T, E] (pre-gating predictors),
        # and how those logits become the router's choice
        # (selection.RouterSelection; None: a plain softmax router, ranked by its logits)
        self.routers = routers
        self.selection = selection
        self.n_active = n_active
        self.cond = cache.cond
        # demand loads copied by this thread (an emulated link: TransferEngine.copy_inline)
        self._inline = bool(getattr(engine, "copies_inline", False))
        # prefetches copied by this thread too, as the link comes free (InlinePrefetches):
        # the CPU engines with an emulated link (the simulator's engine is a copy engine
        # of its own; the GPU's copies go through its streams)
        self.inline_prefetches = InlinePrefetches(cache, store, engine) if (
            self._inline and isinstance(engine, TransferEngine)) else None
        # the time those copies took inside the policy's own calls (prefetch,
        # prefetch_plan): bytes moved, which a policy's cost leaves out (policy_compare)
        self.policy_copy_s = 0.0
        # where place_prefetches writes the copies it queues (prefetch_plan; grown for a
        # longer plan): an array a kernel returns costs this thread ~1 µs to box
        self._placed = np.empty((5, 64), dtype=np.int64)
        # copies through an emulated link whose booked end the engine knows (the workers
        # take a queued copy when the link comes free: _until_landing)
        self._link_paced = getattr(engine, "link", None) is not None and \
            hasattr(engine, "link_free_at")
        # a demand load still queued when this thread has nothing left to compute is read
        # by this thread (_take_queued_load): reading the file itself, no emulated link,
        # the CPU engine (the GPU's copies and the simulator's clock work otherwise)
        self._takes_loads = type(engine) in (TransferEngine, NativeTransferEngine) and \
            engine.link is None
        self.loads_taken = 0
        self._submitted_seen = 0  # engine.submitted when this thread last yielded
        counters.cache_bytes = cache.nbytes
        counters.cache_slots = cache.n_slots
        policy.attach(self)

    def now(self) -> float:
        """The clock policies measure with (the simulator substitutes a virtual one)."""
        return time.perf_counter()

    # -- prefetch (called by policies, from the compute thread) --------------------------
    def prefetch(self, layer: int, experts, priority: int | None = None) -> int:
        """Queue loads of experts not resident or loading; returns how many were issued.
        Never evicts a pinned slot nor a slot of an expert still to be used. `priority`
        (> DEMAND; lower first) orders prefetches, e.g. by the step they are needed at;
        the policy's victim() may refuse to evict (-1), which ends the call."""
        if self.cache.layer_class[layer] < 0:
            return 0  # a dense layer: nothing to load
        prio = PREFETCH if priority is None else max(PREFETCH, int(priority))
        issued = 0
        with self.cond:
            for e in experts:
                e = int(e)
                if self.cache.where[layer, e] >= 0:
                    continue
                slot = self._free_or_victim(layer)
                if slot < 0:
                    break
                self._evict_accounting(slot)
                self.cache.assign(slot, layer, e)
                self.cache.slot_prefetched[slot] = True
                if self.inline_prefetches is not None:
                    self.cache.begin_load(slot)
                    self._add_inline((layer,), (e,), (slot,), (prio,))
                else:
                    self.engine.submit(layer, e, slot, prio)
                issued += 1
            self.counters.prefetch_issued += issued
        return issued

    def prefetch_plan(self, plan, p_next: np.ndarray, cur: int, needed: np.ndarray,
                      tick0: int, due: np.ndarray, fetched_at: np.ndarray) -> int:
        """A policy's whole plan (issue.PrefetchPlan) in one kernel call: what prefetch()
        per group does with a policy whose victim() is horizon.value_victim on p_next (cur,
        needed, tick0 as its victim() reads them), and the policy's own bookkeeping after
        it (`due`, `fetched_at`: Policy._flush_plan). Returns how many were issued."""
        cache = self.cache
        inline = self.inline_prefetches
        with self.cond:
            if inline is not None:  # (landed ones become READY: evictable)
                inline.sweep()
            while True:
                out = self._placed
                n, wasted = place_prefetches(
                    plan.n, plan.ints, plan.floats, plan.experts, cache.where,
                    cache.slot_owner, cache.slot_state, cache.slot_pins, cache.slot_last_use,
                    cache.slot_uses, cache.slot_prefetched, cache.slot_land_at, cache.slot_gen,
                    cache.layer_class, cache.class_first, cache.class_slots, p_next, cur,
                    needed, tick0, due, fetched_at, cache.tick, out)
                if n >= 0:
                    break
                # (a plan longer than any before: room for it, then place it)
                self._placed = np.empty((5, 2 * int(plan.ints[0, plan.n])), dtype=np.int64)
            if n:
                lay, exp, slots, prio, gens = out[:, :n].tolist()
                many = getattr(self.engine, "submit_many", None)
                if inline is not None:
                    self._add_inline(lay, exp, slots, prio)
                elif many is not None:
                    many(lay, exp, slots, prio, gens)
                else:  # (the simulator's engine)
                    submit = self.engine.submit
                    for m, e, s, p in zip(lay, exp, slots, prio, strict=True):
                        submit(m, e, s, p)
                c = self.counters
                c.prefetch_issued += n
                c.prefetch_wasted += wasted
        return n

    def _add_inline(self, layers, experts, slots, priorities) -> None:
        """(cond held) Queue prefetches on InlinePrefetches; the copies it makes now are
        counted in policy_copy_s."""
        inline = self.inline_prefetches
        c0 = inline.copy_s
        inline.add(layers, experts, slots, priorities)
        self.policy_copy_s += inline.copy_s - c0

    def cancel_prefetch(self, layer: int, experts) -> int:
        """Drop queued, not yet started prefetches of these experts (their slots are freed);
        returns how many were dropped. Loads already under way or demanded are kept."""
        n = 0
        inline = self.inline_prefetches
        with self.cond:
            for e in experts:
                if inline is not None and inline.cancel(layer * self.store.n_expert + int(e)):
                    n += 1
                    continue
                job = self.engine.jobs_by_key.get(layer * self.store.n_expert + int(e))
                if job is not None and job.priority != DEMAND and self.engine.cancel(job):
                    n += 1
        return n

    def cancel_prefetch_keys(self, keys: np.ndarray) -> int:
        """cancel_prefetch for keys layer * E + expert of any layers, under one lock (a
        policy's stale prefetches: a few numpy calls fewer per layer than grouping them
        by layer first)."""
        n = 0
        eng = self.engine
        jobs = eng.jobs_by_key
        inline = self.inline_prefetches
        with self.cond:
            for k in keys.tolist():
                if inline is not None and inline.cancel(k):
                    n += 1
                    continue
                job = jobs.get(k)
                if job is not None and job.priority != DEMAND and eng.cancel(job):
                    n += 1
        return n

    def _evict_accounting(self, slot: int) -> None:
        if self.cache.slot_owner[slot] >= 0 and self.cache.slot_prefetched[slot]:
            self.counters.prefetch_wasted += 1
        self.cache.slot_prefetched[slot] = False

    def yield_to_workers(self, landing: bool = False) -> None:
        """Let transfer workers that wait for the GIL run now: one woken for a just-queued
        job (it starts the copy), or, with `landing`, one whose copy has ended (it marks
        the slot READY before this thread looks). This thread would otherwise keep the GIL
        until its next kernel call, or for Python's 5 ms switch interval: measured, the
        first load of a layer started ~230 µs after it was queued, and prefetches that
        had landed were counted late. A sched_yield hands the GIL over (efedge/gil_yield.py:
        13 µs where sleeping 0 s cost 83); a worker gives it back as soon as it is in a
        file read or the link's wait."""
        inline = self.inline_prefetches
        if inline is not None and (inline.pending or inline.booked):
            with self.cond:
                inline.pump()
        if self.engine.gil_free:
            return
        n = self.engine.submitted
        if n != self._submitted_seen or (landing and self.engine.busy()):
            self._submitted_seen = n
            yield_gil()

    # -- the compute thread's view --------------------------------------------------------
    def ready_pool(self, layer: int, ids: np.ndarray):
        """One token's K experts when every one is resident and complete (the usual case
        with a large cache): the request is accounted as acquire() accounts it (hits,
        prefetch_used, the policy's on_request / on_demand_issued, LRU touches in
        acquire's order), and the result is (the slot of each id within the layer's pool,
        int32 [K]; (gate, up, down) read-only views [slots, rows, row_bytes] over the
        pool), so that all K run in one kernel call (decode_ffn: the same bits as one
        expert at a time). None, with nothing changed, when any is missing or loading:
        then acquire() is the way. The slots need no pin afterwards: only this thread
        evicts (prefetches are issued from the compute thread)."""
        cache = self.cache
        c = int(cache.layer_class[layer])
        if c < 0 or cache.virtual:
            return None
        # plain Python over the K ids: numpy calls on 4 elements cost more than the work
        where, state, pins = cache.where[layer], cache.slot_state, cache.slot_pins
        pinned = []  # unpinned in finally, whatever interrupts (Ctrl-C) and where
        try:
            with self.cond:
                slot_of = {}
                slots = []
                for e in ids.tolist():
                    s = int(where[e])
                    if s < 0 or (state[s] != READY and not self._landed(s)):
                        return None
                    slot_of[e] = s
                    slots.append(s)
                wanted = sorted(slot_of)
                cnt = self.counters
                cnt.expert_requests += len(wanted)
                cnt.hits += len(wanted)
                for s in slot_of.values():
                    if cache.slot_prefetched[s]:
                        cnt.prefetch_used += 1
                        cache.slot_prefetched[s] = False
                    pins[s] += 1  # as acquire pins them: a plan issued below must not evict
                    pinned.append(s)
                self.policy.on_request(layer, wanted)
            issued = getattr(self.policy, "on_demand_issued", None)
            if issued is not None:  # not under cond: the policy predicts here (as acquire)
                issued(layer)
        finally:
            if pinned:
                with self.cond:
                    for s in pinned:
                        pins[s] -= 1
        for e in wanted:  # the order acquire yields (and touches) them in: by id
            cache.touch(slot_of[e])
        views, first = self.pool_slots(layer)
        return np.array([s - first for s in slots], np.int32), views

    def pool_slots(self, layer: int):
        """((gate, up, down) read-only views [slots, rows, row_bytes] over the pool of
        the layer's size class, the first slot number of that class), or None for a
        dense layer or a cache without bytes: slot s is row s - first of the views."""
        c = int(self.cache.layer_class[layer])
        if c < 0 or self.cache.virtual:
            return None
        views = getattr(self, "_pool_views", {}).get(layer)
        if views is None:
            views = self._pool_views_of(layer, c)
        return views, int(self.cache.class_first[c])

    def _pool_views_of(self, layer: int, c: int) -> tuple[np.ndarray, ...]:
        if not hasattr(self, "_pool_views"):
            self._pool_views: dict[int, tuple[np.ndarray, ...]] = {}
        views = []
        for i, part in enumerate(("gate", "up", "down")):
            rows, row_bytes = self.store.part_shape(layer, part)
            pool = self.cache.pools[c][i]
            v = pool.reshape(pool.shape[0], rows, row_bytes).view()  # C-contiguous
            v.flags.writeable = False
            views.append(v)
        self._pool_views[layer] = tuple(views)
        return self._pool_views[layer]

    def acquire(self, layer: int, experts: np.ndarray):
        """Yield (expert, ExpertWeights) for every requested expert, ready ones first. The
        slot stays pinned until the caller asks for the next one."""
        batches = self.acquire_batches(layer, experts, max_batch=1)
        try:
            for batch in batches:
                e, s = batch[0]
                yield e, self.cache.weights(s, layer)
        finally:
            batches.close()

    def acquire_batches(self, layer: int, experts, *, max_batch: int | None = None, **kw):
        """Yield lists [(expert, slot)] of READY experts — every one ready at the time, at
        most `max_batch` — until all requested experts are served: the compute thread
        waits only when none is ready. Slots stay pinned until the caller asks for the
        next list (then `_batch_done`). Demand loads are queued before the policy's
        planned prefetches (on_demand_issued). `kw`: for subclasses (the GPU's hybrid
        misses)."""
        cache = self.cache
        wanted = [int(e) for e in experts]
        pending: list[int] = []  # not resident, no slot yet
        held: dict[int, int] = {}  # expert → the slot pinned for it
        queued: list = []  # this layer's loads queued as demand loads (their jobs)
        self.yield_to_workers(landing=True)
        try:  # the slots in `held` are pinned as they are added: the finally unpins them
            with self.cond:
                # inside the try: Ctrl-C in the policy's on_request or victim choice lands
                # after _classify pinned the resident experts (their pins were kept for good)
                self._classify(layer, wanted, pending, held, queued)
                self.policy.on_request(layer, wanted)
                skip = self._before_issue(layer, pending, **kw)
                self._issue(layer, pending, held, queued)
            self._start_demand_loads(queued)
            issued = getattr(self.policy, "on_demand_issued", None)
            if issued is not None:  # prefetches go behind this layer's own loads; not
                issued(layer)  # under cond: the policy predicts here, beside the copies
            self._after_issue(skip, **kw)
            self.yield_to_workers()
            remaining = set(wanted) - set(skip)
            limit = max_batch or len(wanted) or 1
            while remaining:
                with self.cond:
                    batch = self._ready_batch(layer, remaining, pending, held, limit)
                try:
                    yield batch
                finally:
                    self._batch_done(batch)
                    with self.cond:
                        for e, s in batch:
                            cache.touch(s)
                            cache.slot_pins[s] -= 1
                            del held[e]
                            remaining.discard(e)
                        self._issue(layer, pending, held)
                        self.cond.notify_all()
        finally:
            # an abandoned or failed layer call must not leave slots pinned
            with self.cond:
                for s in held.values():
                    cache.slot_pins[s] -= 1
                self.cond.notify_all()

    # hooks for subclasses (efedge.gpu.cache: hybrid misses, stream events)
    def _before_issue(self, layer: int, pending: list[int], **kw) -> list[int]:
        """(cond held) experts taken out of `pending` to be served elsewhere; none here."""
        return []

    def _after_issue(self, skip: list[int], **kw) -> None:
        """(cond released) start serving the experts _before_issue took out."""

    def _batch_done(self, batch: list[tuple[int, int]]) -> None:
        """The caller is done with a batch's slots (before they are unpinned)."""

    def _classify(self, layer: int, wanted: list[int], pending: list[int],
                  held: dict[int, int], queued: list | None = None) -> None:
        """Count each wanted expert as hit / late / miss (cond held); pin the resident and
        in-flight ones (not evictable until used), promote queued prefetches to demand
        loads (their jobs appended to `queued`), and list the missing ones in `pending`."""
        cache, c = self.cache, self.counters
        c.expert_requests += len(wanted)
        for e in wanted:
            s = int(cache.where[layer, e])
            if s < 0:
                c.misses += 1
                pending.append(e)
                continue
            if cache.slot_state[s] == READY or self._landed(s):
                c.hits += 1
            else:
                c.late += 1
                if self.inline_prefetches is not None:
                    self.inline_prefetches.asked(layer, e, s)
                job = self.engine.jobs_by_key.get(layer * self.store.n_expert + e)
                if job is not None:
                    job = self.engine.promote(job)
                    if queued is not None and not job.started:
                        queued.append(job)
            if cache.slot_prefetched[s]:
                c.prefetch_used += 1
                cache.slot_prefetched[s] = False
            cache.slot_pins[s] += 1
            held[e] = s

    def _issue(self, layer: int, pending: list[int], held: dict[int, int],
               queued: list | None = None) -> None:
        """Demand-load pending experts while slots are available (cond held); their jobs
        are appended to `queued`."""
        while pending:
            e = pending[0]
            s = int(self.cache.where[layer, e])
            if s >= 0:  # a prefetch took it on since the request: wait for that load
                pending.pop(0)
                self.cache.slot_pins[s] += 1
                held[e] = s
                job = self.engine.jobs_by_key.get(layer * self.store.n_expert + e)
                if job is not None:
                    self.engine.promote(job)
                elif self.inline_prefetches is not None:
                    self.inline_prefetches.asked(layer, e, s)
                if self.cache.slot_prefetched[s]:
                    self.counters.prefetch_used += 1
                    self.cache.slot_prefetched[s] = False
                continue
            slot = self._free_or_victim(layer)
            if slot < 0:
                return
            e = pending.pop(0)
            self._evict_accounting(slot)
            self.cache.assign(slot, layer, e)
            if self._inline:  # copied now, lands when the link would deliver it. The
                # copy stands for a copy engine's (DMA), which costs this thread nothing:
                # its ~20-35 µs here are compute time (in tok/s), not stall; waiting for
                # the landing is stall
                self.engine.copy_inline(layer, e, slot)
                if self.inline_prefetches is not None:  # ahead of booked prefetches
                    self.inline_prefetches.demand(slot)
                self.cache.slot_pins[slot] += 1
                held[e] = slot
                continue
            self.cache.slot_pins[slot] += 1
            held[e] = slot
            job = self.engine.submit(layer, e, slot, DEMAND)
            if queued is not None:
                queued.append(job)
        if self.inline_prefetches is not None:  # the link's room after the demand loads
            self.inline_prefetches.pump()

    def reap(self) -> None:
        """Finish the bookkeeping of copies the engine's workers are done with (native
        workers leave it to this thread): `stats()` then counts their bytes."""
        reap = getattr(self.engine, "reap", None)  # (the simulator's engine has none)
        if reap is not None:
            with self.cond:
                reap()

    def on_pass(self, tokens, pos: int | None = None) -> None:
        """A forward pass over `tokens` starts (before its first layer) at position `pos`
        of its context."""
        self.policy.on_pass(np.asarray(tokens, dtype=np.int64).reshape(-1), pos)
        self.yield_to_workers()

    def on_layer_input(self, layer: int, h, **kw) -> None:
        """Layer `layer` starts on input `h` (kw, e.g. logits=, go to the policy); what
        the policy queued starts now (a pass start planned here: expertflow's
        first_input), not after the layer's attention."""
        self.policy.on_layer_input(layer, h, **kw)
        self.yield_to_workers()

    def on_route(self, layer: int, h: np.ndarray, ids: np.ndarray, **kw) -> None:
        """The model routed `layer` (kw, e.g. pregate=, go to the policy)."""
        self.policy.on_route(layer, h, ids, **kw)

    def close(self) -> None:
        self.engine.close()
        stop = getattr(self.policy, "close", None)
        if stop is not None:  # (a predictor's helper thread)
            stop()


# Re-exported for callers that inspect slot states
__all__ = ["StreamingExperts", "EMPTY", "LOADING", "READY"]
