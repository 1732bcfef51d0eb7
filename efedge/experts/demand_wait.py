"""How the compute thread waits for the experts a layer asked for: until one is ready,
reading a queued demand load itself when no worker has started it, retrying a load that
failed on a worker, and giving up — with an error naming the experts — only after
WAIT_TIMEOUT_S without progress.

`DemandWaits` holds this for StreamingExperts (efedge/experts/streaming.py), whose cache,
engine, counters and policy it uses; every method says whether it runs with the cache's
condition held.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from efedge.errors import TransferError
from efedge.experts.cache import LOADING, READY
from efedge.experts.link import tight_timer_slack
from efedge.experts.transfer import DEMAND

WAIT_TIMEOUT_S = 60.0  # a load that makes no progress for this long is an error, not a hang
# How long the compute thread hands the GIL over, at most, for a layer's demand loads to
# start before the policy's deferred prediction runs (StreamingExperts._start_demand_loads)
HAND_OVER_S = 200e-6
_THREAD = threading.local()  # per compute thread: whether its timer slack is tight
# The last stretch of a wait for a known landing (an emulated link's copy) is spun, not
# slept: a timed wait on the test VM ended a median 43-80 µs (p90 ~100 µs) after its
# timeout, tight timer slack and all, and those overshoots were half of on-demand's stall
# at 25% / 720 MB/s. Only where no worker needs the GIL (native workers) or a core from
# this thread to land the copy: its landing time alone makes it usable (_landed).
SPIN_S = 200e-6


class DemandWaits:
    """The waiting side of an expert source: StreamingExperts' acquire_batches queues a
    layer's loads, then waits here for each batch of ready experts."""

    def _start_demand_loads(self, queued: list) -> None:
        """The layer's demand loads are queued (cond released): let the workers start
        them. When the policy is about to run the prediction it deferred (numba kernels
        that keep the GIL for ~100 µs), wait on the condition — GIL and core free — until
        the first loads, one per worker, have started (a worker notifies as it takes a
        demand load), at most HAND_OVER_S: a worker woken for a job needs the GIL for a
        few lines before its copy, and one sched_yield often came before it was waiting
        for it, so the load started only after the prediction (measured at 50% / 720 MB/s:
        ~100 µs after being queued). Otherwise (no deferred work: the compute thread goes
        on to GIL-free kernels) one yield."""
        if getattr(self.engine, "gil_free", False):
            return  # native workers need neither the GIL nor a core from this thread
        pending_work = getattr(self.policy, "has_deferred_work", None)
        if not queued or pending_work is None or not pending_work() or (
                self._link_paced and self.engine.take_delay(time.perf_counter()) > 0.0):
            # (through an emulated link booked ahead, no worker takes them before the link
            # comes free: nothing to wait for)
            self.yield_to_workers()
            return
        first = queued[:getattr(self.engine, "n_workers", 1)]
        self._submitted_seen = self.engine.submitted
        deadline = time.perf_counter() + HAND_OVER_S
        with self.cond:  # a worker notifies as it takes a demand load
            while not all(self.engine.started(j) or j.cancelled for j in first):
                left = deadline - time.perf_counter()
                if left <= 0:
                    return
                self.cond.wait(left)

    def _ready_batch(self, layer: int, remaining: set[int], pending: list[int],
                     held: dict[int, int], limit: int) -> list[tuple[int, int]]:
        """Remaining experts whose slots are READY (at most `limit`, lowest ids first);
        waits (stall) while there is none. A load that failed on a worker is retried on
        this thread (cond held)."""
        cache, eng = self.cache, self.engine
        t0 = None
        while True:
            mark = eng.progress_mark()  # (before looking: a copy done after it wakes the
            eng.reap()  # wait below at once)
            if pending:  # slots may have come free (e.g. prefetches completed) since
                self._issue(layer, pending, held)
            ready = self._ready_now(layer, remaining, held, limit)
            if ready:
                if t0 is not None:
                    self.counters.stall_s += time.perf_counter() - t0
                return ready
            reloaded = False
            for e in sorted(remaining):
                s = held.get(e, -1)
                if s >= 0 and cache.where[layer, e] != s:
                    # its load failed and the slot was released: retry on this thread
                    cache.slot_pins[s] -= 1
                    del held[e]
                    t_sync = time.perf_counter()
                    held[e] = self._load_sync(layer, e)
                    self.counters.stall_s += time.perf_counter() - t_sync
                    reloaded = True
            if reloaded:
                continue  # the reloaded expert is ready now: no need to wait
            if t0 is None:
                t0 = time.perf_counter()
            if self._takes_loads and self._take_queued_load(layer, remaining, held):
                continue  # read on this thread meanwhile (stall): one may be ready now
            timeout = self._until_landing(remaining, held)
            if timeout < 1.0 and self.engine.gil_free:
                if timeout <= SPIN_S:  # the landing is near: look until it has come
                    self.cond.release()
                    try:
                        end = time.perf_counter() + timeout
                        while time.perf_counter() < end:
                            pass
                    finally:
                        self.cond.acquire()
                    continue
                timeout -= SPIN_S  # sleep the rest, spin the last stretch
            if timeout < 1.0 and not getattr(_THREAD, "tight", False):
                _THREAD.tight = True  # a wait until a landing should end on time (Linux
                tight_timer_slack()  # lets a normal thread's timed waits run 50 µs late)
            if not eng.wait_progress(mark, timeout) and timeout >= 1.0:
                waited = time.perf_counter() - t0
                if waited > WAIT_TIMEOUT_S:
                    raise TransferError(f"experts {sorted(remaining)} of layer {layer} made "
                                        f"no progress for {waited:.0f} s")
                self._reap_orphans(layer, held)

    def _take_queued_load(self, layer: int, remaining: set[int], held: dict[int, int]) -> bool:
        """(cond held) Nothing of the layer is ready: read one of its demand loads that no
        worker has started yet on this thread, which would only wait (on the test VM,
        reading the drive, a demand load waited for a worker — busy with other loads, or
        still waking — a median 150–400 µs before its read began). The job is cancelled
        so that no worker takes it; the cache lock is released for the read. A read that
        fails frees the slot: the caller then loads it as after a failed copy, naming the
        error, and so does an interrupt (Ctrl-C) during the read, before it goes on up:
        no slot is left LOADING without a load behind it. Returns whether it read one."""
        eng, cache, n_e = self.engine, self.cache, self.store.n_expert
        for e in sorted(remaining):
            s = held.get(e, -1)
            job = eng.jobs_by_key.get(layer * n_e + e)
            if s < 0 or job is None or job.slot != s or not eng.take_queued(job):
                continue
            self.loads_taken += 1
            self.cond.release()
            ok = False
            try:
                ok = eng.read_now(job)
            finally:
                self.cond.acquire()
                if cache.slot_state[s] == LOADING and eng._own_load(job):
                    if ok:
                        cache.slot_state[s] = READY
                    else:
                        cache.release(s)
            return True
        return False

    def _landed(self, s: int) -> bool:
        """(cond held) Whether LOADING slot s has landed (its copy's kernel wrote the time
        its bytes were in and the emulated link would have delivered them, and that time
        has come): then it is READY now, marked here — its worker may still be waiting for
        the GIL to say so."""
        cache = self.cache
        if cache.slot_state[s] == LOADING and cache.slot_land_at[s] <= time.perf_counter():
            cache.slot_state[s] = READY
            return True
        return False

    def _until_landing(self, remaining: set[int], held: dict[int, int]) -> float:
        """(cond held) How long to wait for a worker's word: until the first of the awaited
        copies lands, where one has its landing time (then this thread looks again without
        being woken), else up to a second."""
        land = self.cache.slot_land_at
        first = min((land[s] for e in remaining if (s := held.get(e, -1)) >= 0),
                    default=np.inf)
        now = time.perf_counter()
        if first == np.inf:
            # none taken by a worker yet: through an emulated link the workers take the
            # next copy as the link comes free, and its landing is known soon after
            free = self.engine.link_free_at() if self._link_paced else 0.0
            return min(1.0, free - now) if free > now else 1.0
        return min(1.0, max(0.0, first - now))

    def _ready_now(self, layer: int, remaining: set[int], held: dict[int, int],
                   limit: int) -> list[tuple[int, int]]:
        """(cond held) Remaining experts whose held slot is READY and still theirs, lowest
        ids first, at most `limit`."""
        cache, ready = self.cache, []
        if self.inline_prefetches is not None:  # (as the link comes free while waiting)
            self.inline_prefetches.pump()
        for e in sorted(remaining):
            s = held.get(e, -1)
            if s >= 0 and cache.where[layer, e] == s and (cache.slot_state[s] == READY
                                                          or self._landed(s)):
                ready.append((e, s))
                if len(ready) >= limit:
                    break
        return ready

    def _reap_orphans(self, layer: int, held: dict[int, int]) -> None:
        """(cond held; after a second without progress) Slots left LOADING with no job:
        an interrupt (Ctrl-C lands between bytecodes) between giving a slot to an expert
        and queuing its copy. A held one gets its copy queued; an unpinned one is freed,
        so neither blocks the cache for good."""
        cache, eng, n_e = self.cache, self.engine, self.store.n_expert
        inline = self.inline_prefetches
        for s in np.flatnonzero(cache.slot_state == LOADING):
            owner = int(cache.slot_owner[s])
            if owner < 0 or owner in eng.jobs_by_key or cache.slot_land_at[s] < np.inf or (
                    inline is not None and owner in inline.pending):
                # (a finite landing time: its bytes are in, copied without a job)
                continue
            m, e = divmod(owner, n_e)
            if m == layer and held.get(e, -1) == s:
                eng.submit(m, e, int(s), DEMAND)
            elif cache.slot_pins[s] == 0:
                cache.release(int(s))

    def _free_or_victim(self, layer: int) -> int:
        """(cond held) ExpertCache.free_or_victim with the policy's victim, once the
        copies this thread booked that have landed are READY (evictable: InlinePrefetches
        .sweep; a LOADING slot is never a victim)."""
        if self.inline_prefetches is not None:
            self.inline_prefetches.sweep()
        return self.cache.free_or_victim(layer, self.policy.victim)

    def _load_sync(self, layer: int, e: int) -> int:
        """Load one expert on the compute thread (after the workers failed); returns its
        pinned slot or raises TransferError naming the expert."""
        slot = self._free_or_victim(layer)
        if slot < 0:
            raise TransferError(f"no free slot to reload expert {e} of layer {layer}")
        self._evict_accounting(slot)
        self.cache.assign(slot, layer, e)
        self.cache.begin_load(slot)  # a late copy of an earlier load leaves it alone
        self.cache.slot_pins[slot] += 1
        try:
            self.counters.bytes_loaded += self.engine.load_now(layer, e, slot)
        except BaseException as exc:
            # whatever stopped the load (a disk error, Ctrl-C, a bug), leave no slot
            # pinned and LOADING behind
            self.cache.slot_pins[slot] -= 1
            self.cache.release(slot)
            if isinstance(exc, OSError):
                raise TransferError(f"cannot read expert {e} of layer {layer} from the "
                                    f"model file: {exc}") from exc
            raise
        self.cache.slot_state[slot] = READY
        return slot
