"""Virtual-time doubles of the transfer engine and the streaming source, for the
trace-driven simulator. Only the clock and the copies are virtual: the cache tables,
the policies, prefetch, eviction, hit/late/miss accounting and the ready-first acquire
loop are the live runtime's own code (StreamingExperts is subclassed, not rewritten).

The link is one serial channel: queued jobs start in priority order (demand before
prefetch, then submission order) as soon as the link is free, and finish after
latency + bytes / bandwidth.
"""

from __future__ import annotations

import itertools

from efedge.errors import TransferError
from efedge.experts.cache import LOADING, READY
from efedge.experts.streaming import StreamingExperts
from efedge.experts.transfer import DEMAND, Job


class VirtualClock:
    def __init__(self) -> None:
        self.t = 0.0

    def advance(self, dt: float) -> None:
        self.t += dt


class VirtualTransferEngine:
    """Same interface as TransferEngine (submit / promote / cancel / jobs_by_key /
    bandwidth_ewma / latency_ewma / load_now / close), driven by a VirtualClock."""

    def __init__(self, store, cache, counters, clock: VirtualClock, bytes_per_s: float,
                 latency_s: float = 0.0, bytes_per_expert=None, demand_copy_s: float = 0.0,
                 prefetch_copy_s: float = 0.0):
        self.store, self.cache, self.counters, self.clock = store, cache, counters, clock
        # the compute thread's own time per demand load it copies (TransferEngine.
        # copy_inline, a CPU engine with an emulated link); 0: queued, as a DMA copy
        self.demand_copy_s = float(demand_copy_s)
        # the same per prefetch the link starts (the live CPU engine's compute thread
        # copies each as the link comes free: InlinePrefetches). The link starts it at
        # that moment; the compute thread pays for it the next time it asks the cache
        # for experts (pay_copies), as it copies them when it passes the cache
        self.prefetch_copy_s = float(prefetch_copy_s)
        self.copy_debt = 0.0
        self.bw, self.lat = float(bytes_per_s), float(latency_s)
        # bytes moved per expert of each layer (the profile's, not the traced model's)
        self.bytes_per_expert = bytes_per_expert or [store.expert_bytes(i)
                                                     for i in range(store.n_layer)]
        self._queue: list[tuple[float, Job]] = []  # (when it was queued, job); a few
        self._seq = itertools.count()
        self.jobs_by_key: dict[int, Job] = {}
        self._busy_until = 0.0
        self._current: Job | None = None
        self.bandwidth_ewma = self.bw  # the simulator's meter reads the profile's link
        self.latency_ewma = self.lat + self.bytes_per_expert[0] / self.bw
        self.workers_replaced = 0

    def submit(self, layer: int, expert: int, slot: int, priority: int) -> Job:
        job = Job(priority, next(self._seq), layer, expert, slot)
        self._queue.append((self.clock.t, job))
        self.jobs_by_key[layer * self.store.n_expert + expert] = job
        self._pump()
        return job

    @property
    def copies_inline(self) -> bool:
        return self.demand_copy_s > 0

    def copy_inline(self, layer: int, expert: int, slot: int) -> int:
        """As TransferEngine.copy_inline: the link starts on it now, and the compute
        thread spends demand_copy_s copying (its clock moves; the link runs meanwhile)."""
        self.submit(layer, expert, slot, DEMAND)
        self.clock.advance(self.demand_copy_s)
        self.advance_to(self.clock.t)
        return int(self.bytes_per_expert[layer])

    def promote(self, job: Job) -> Job:
        if not job.started and job.priority != DEMAND:
            job.cancelled = True
            new = Job(DEMAND, next(self._seq), job.layer, job.expert, job.slot)
            since = next((t for t, j in self._queue if j is job), self.clock.t)
            self._queue.append((since, new))  # queued since the prefetch was
            self.jobs_by_key[job.layer * self.store.n_expert + job.expert] = new
            return new
        return job

    def cancel(self, job: Job) -> bool:
        if job.started or job.cancelled:
            return False
        job.cancelled = True
        self.cache.release(job.slot)
        self.jobs_by_key.pop(job.layer * self.store.n_expert + job.expert, None)
        return True

    def queued(self) -> int:
        return sum(1 for _, j in self._queue if not j.cancelled)

    def _pump(self) -> None:
        """Complete every job that has finished by now and start the next ones, each at
        the moment the link came free (not at the moment the simulator looks: the clock
        moves in steps of a layer's compute, and a link idle between a finished copy and
        the next step would move one expert per layer)."""
        now = self.clock.t
        while True:
            free_at = now
            if self._current is not None:
                if self._busy_until > now:
                    return
                self._finish(self._current)
                self._current = None
                free_at = self._busy_until
            nxt = self._next_job(free_at)
            if nxt is None:
                return
            queued_at, job = nxt
            job.started = True
            if job.priority != DEMAND:
                self.copy_debt += self.prefetch_copy_s
            start = max(free_at, queued_at)
            nbytes = self.bytes_per_expert[job.layer]
            self._busy_until = start + self.lat + nbytes / self.bw
            self._current = job

    def _next_job(self, free_at: float) -> tuple[float, Job] | None:
        """(when it was queued, the job) the link starts when it comes free at `free_at`:
        the most urgent of those queued by then (demand before prefetch, then submission
        order); if none was, the first queued after (the link idled until it came)."""
        self._queue = [e for e in self._queue if not e[1].cancelled]
        if not self._queue:
            return None
        ready = [e for e in self._queue if e[0] <= free_at]
        pick = min(ready, key=lambda e: e[1]) if ready else min(self._queue)
        self._queue = [e for e in self._queue if e[1] is not pick[1]]
        return pick

    def _finish(self, job: Job) -> None:
        key = job.layer * self.store.n_expert + job.expert
        if self.jobs_by_key.get(key) is job:
            del self.jobs_by_key[key]
        if self.cache.slot_state[job.slot] == LOADING:
            self.cache.slot_state[job.slot] = READY
        self.counters.bytes_loaded += self.bytes_per_expert[job.layer]

    def pay_copies(self) -> None:
        """The compute thread makes the prefetch copies the link has started since it
        last looked (prefetch_copy_s each): its clock moves, the link runs meanwhile."""
        if self.copy_debt > 0.0:
            debt, self.copy_debt = self.copy_debt, 0.0
            self.clock.advance(debt)
            self.advance_to(self.clock.t)

    def next_event(self) -> float | None:
        return self._busy_until if self._current is not None else None

    def advance_to(self, t: float) -> None:
        self.clock.t = max(self.clock.t, t)
        self._pump()

    def load_now(self, layer: int, expert: int, slot: int) -> int:
        raise OSError("virtual transfers cannot fail")

    def close(self) -> None:
        pass


class SimulatedExperts(StreamingExperts):
    """StreamingExperts on a virtual clock: waiting advances the clock to the next
    completed transfer instead of blocking a thread; compute is charged by the caller."""

    def __init__(self, *args, clock: VirtualClock, expert_compute_s: float = 0.0,
                 wake_s: float = 0.0, **kw):
        self.clock = clock
        self.expert_compute_s = expert_compute_s
        # a compute thread blocked on a load resumes this long after the load lands (a
        # condition-variable wake-up and the GIL on a CPU; an event sync on a GPU)
        self.wake_s = float(wake_s)
        super().__init__(*args, **kw)

    def now(self) -> float:
        return self.clock.t

    def yield_to_workers(self, landing: bool = False) -> None:
        pass  # virtual transfers start when queued and land on the clock

    def _start_demand_loads(self, queued: list) -> None:
        pass  # (the same: no thread to hand over to)

    def _ready_batch(self, layer, remaining, pending, held, limit):
        self.engine.advance_to(self.clock.t)
        self.engine.pay_copies()  # (before it looks: compute, not stall, as live)
        waited = False
        while True:
            if pending:  # a slot may have come free: issue the waiting demand loads
                self._issue(layer, pending, held)
            ready = self._ready_now(layer, remaining, held, limit)
            if ready:
                if waited and self.wake_s > 0:
                    self.counters.stall_s += self.wake_s
                    self.engine.advance_to(self.clock.t + self.wake_s)
                return ready
            nxt = self.engine.next_event()
            if nxt is None:
                raise TransferError(f"simulator: experts {sorted(remaining)} of layer {layer} "
                                    "are wanted but nothing is loading")
            self.counters.stall_s += max(0.0, nxt - self.clock.t)
            self.engine.advance_to(nxt)
            waited = True
