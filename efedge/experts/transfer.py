"""TransferEngine: worker threads that copy experts from the model file into cache slots.

* A priority queue: demand loads (the layer is waiting) overtake prefetches; a queued
  prefetch that became stale can be cancelled.
* How an expert is read from the file (around the page cache, or through it and its
  pages dropped; a split GGUF's shards): engine_reads.py. The emulated link and the
  meter of the link and of the reads: link.py.
* Faults: a disk error (OSError) is retried RETRIES times, then the job fails and its
  waiter loads the expert synchronously. A worker that dies of anything else fails the
  job it held the same way and is replaced (`workers_replaced` counts them).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from efedge.errors import TransferError
from efedge.experts.cache import LOADING, READY, ExpertCache
from efedge.experts.engine_reads import FileReads, reads_overlap
from efedge.experts.link import Link, LinkTiming, tight_timer_slack
from efedge.experts.stats import Counters
from efedge.experts.store import ExpertStore

log = logging.getLogger("efedge.transfer")

DEMAND, PREFETCH = 0, 1
RETRIES = 3
# Transfer workers per engine unless the caller says (efedge.load(transfer_workers=)).
# Through an emulated link the copies share one serial link and more workers only
# contend for the cores (4 were worse on the 2-core test VM). Reading the file itself,
# a miss waits on the drive's latency, and reads overlap in its queue: on that VM (a
# 96 KiB expert in 250-500 µs), 4 workers instead of 2 cut the stall of expertflow to
# 0.3x and of on-demand loading to 0.4-0.75x (2026-11-29, docs/scheduler.md §6).
LINK_WORKERS = 2
FILE_WORKERS = 4


@dataclass(order=True)
class Job:
    priority: int
    seq: int
    layer: int = field(compare=False)
    expert: int = field(compare=False)
    slot: int = field(compare=False)
    cancelled: bool = field(default=False, compare=False)
    started: bool = field(default=False, compare=False)
    metered: bool = field(default=False, compare=False)  # counted in the link's in-flight
    link_until: float = field(default=0.0, compare=False)  # the emulated link's delivery
    gen: int = field(default=0, compare=False)  # its slot's load (ExpertCache.slot_gen)
    queued_at: float = field(default=0.0, compare=False)  # perf_counter when queued
    error: BaseException | None = field(default=None, compare=False)


def default_workers(link: Link | None) -> int:
    """How many transfer workers an engine gets by default: FILE_WORKERS when the copies
    are reads of the file itself, LINK_WORKERS through an emulated link — and where
    reads cannot overlap (Windows: seek + read under one lock)."""
    if link is None and reads_overlap():
        return FILE_WORKERS
    return LINK_WORKERS


class TransferEngine(FileReads, LinkTiming):
    """Copies (layer, expert) into its assigned slot on background threads. All queue and
    slot-state changes happen under `cache.cond`."""

    gil_free = False  # its workers are Python threads (native_engine.py: they are not)

    def __init__(self, path: str | os.PathLike, store: ExpertStore, cache: ExpertCache,
                 counters: Counters, link: Link | None = None, workers: int | None = None,
                 read_fn=None, drop_pages: bool | None = None):
        self.store, self.cache, self.counters, self.link = store, cache, counters, link
        self.cond = cache.cond  # READY and failed loads: the compute thread waits on it
        self.work = threading.Condition(cache.lock)  # queued jobs: the workers wait on it
        # drop each expert's file pages after reading it (default: unless a link is
        # emulated, whose rate the reads must not fall below: engine_reads.py says why)
        self._open_files(path, link is None if drop_pages is None else bool(drop_pages),
                         read_fn)
        self._init_link_timing()
        self._queue: list[Job] = []
        self._seq = itertools.count()
        self.submitted = 0  # jobs ever queued (the compute thread yields when it grows)
        self._closing = False
        self.jobs_by_key: dict[int, Job] = {}
        self.workers_replaced = 0
        self.n_workers = max(0 if self.gil_free else 1,
                             default_workers(link) if workers is None else workers)
        self.inline_copies, self.inline_copy_s = 0, 0.0  # copy_inline's count and time
        self._threads = [self._spawn(i) for i in range(self.n_workers)]

    def _spawn(self, i: int) -> threading.Thread:
        t = threading.Thread(target=self._worker, args=(i,), name=f"efedge-transfer-{i}",
                             daemon=True)
        t.start()
        return t

    # -- called with cond held ------------------------------------------------------------
    def submit(self, layer: int, expert: int, slot: int, priority: int) -> Job:
        job = Job(priority, next(self._seq), layer, expert, slot,
                  gen=self.cache.begin_load(slot), queued_at=time.perf_counter())
        self.submitted += 1
        heapq.heappush(self._queue, job)
        self.jobs_by_key[layer * self.store.n_expert + expert] = job
        self.work.notify()  # one worker per job
        return job

    def submit_many(self, layers: list[int], experts: list[int], slots: list[int],
                    priorities: list[int], gens: list[int] | None = None) -> None:
        """submit() for each, waking one worker for all (a plan's prefetches). `gens`: the
        loads' numbers where the caller began them (issue.place_prefetches does)."""
        if type(self).submit is not TransferEngine.submit:  # a subclass's own submit rules
            for job in zip(layers, experts, slots, priorities, strict=True):
                self.submit(*job)
            return
        queue, by_key, n_e, seq = self._queue, self.jobs_by_key, self.store.n_expert, self._seq
        if gens is None:
            gens = [self.cache.begin_load(s) for s in slots]
        now = time.perf_counter()
        for layer, expert, slot, prio, gen in zip(layers, experts, slots, priorities, gens,
                                                  strict=True):
            job = Job(prio, next(seq), layer, expert, slot, gen=gen, queued_at=now)
            heapq.heappush(queue, job)
            by_key[layer * n_e + expert] = job
        self.submitted += len(layers)
        # one worker: it wakes the next if more are queued when it takes its job. Waking
        # them all here cost the compute thread ~15 µs per worker (a futex wake that
        # interrupts an idle vCPU on these VMs)
        self.work.notify()

    def _own_load(self, job: Job) -> bool:
        """(cond held) Whether the job's slot is still on the job's load."""
        return int(self.cache.slot_gen[job.slot]) == job.gen

    def promote(self, job: Job) -> Job:
        """A queued prefetch is now needed by the compute thread: make it a demand load.
        Returns the job that will load it (a new one, or `job` if already under way)."""
        if not job.started and job.priority != DEMAND:
            job.cancelled = True
            new = Job(DEMAND, next(self._seq), job.layer, job.expert, job.slot, gen=job.gen,
                      queued_at=job.queued_at)
            heapq.heappush(self._queue, new)
            self.jobs_by_key[job.layer * self.store.n_expert + job.expert] = new
            self.work.notify()
            return new
        return job

    def cancel(self, job: Job) -> bool:
        """Drop a queued (not yet started) load and free its slot."""
        if not self.take_queued(job):
            return False
        self.cache.release(job.slot)
        return True

    def take_queued(self, job: Job) -> bool:
        """(cond held) Take a queued load off the queue, for the calling thread to read it
        (read_now) or for cancel(); False when a worker has started it or it was
        cancelled."""
        if job.started or job.cancelled:
            return False
        job.cancelled = True
        self.jobs_by_key.pop(job.layer * self.store.n_expert + job.expert, None)
        return True

    def started(self, job: Job) -> bool:
        """(cond held) Whether a worker has begun the job."""
        return job.started

    def reap(self) -> None:
        """(cond held) Finish the bookkeeping of copies done (the Python workers do their
        own: nothing here)."""

    def progress_mark(self) -> int:
        """(cond held) A mark for wait_progress."""
        return 0

    def wait_progress(self, mark: int, timeout: float) -> bool:
        """(cond held) Wait for a worker's word (a copy done or failed) since `mark`, up
        to timeout seconds; False when the time ran out."""
        return self.cond.wait(timeout)

    def busy(self) -> bool:
        """Whether any copy is under way (read without the lock: a hint)."""
        return self._in_flight > 0

    def queued(self) -> int:
        return sum(1 for j in self._queue if not j.cancelled)

    # -- workers --------------------------------------------------------------------------
    def _copy(self, job: Job) -> int:
        # the expert lands when its bytes are in and the emulated link (booked at the
        # job's start) would have delivered them: from then on the compute thread may
        # take it, whether or not this worker has the GIL back to mark it READY
        return self._read_expert(self.cache.slot_parts(job.slot), job.layer, job.expert,
                                 drop_pages=self.drop_pages,
                                 land=(self.cache.slot_land_at, job.slot, job.link_until))

    @property
    def copies_inline(self) -> bool:
        """Whether demand loads are copied by the compute thread itself (copy_inline):
        with an emulated link, where the bytes come from the page cache."""
        return self.link is not None and not self.drop_pages

    def copy_inline(self, layer: int, expert: int, slot: int) -> int:
        """(cond held; the slot assigned, LOADING) A demand load issued by the compute
        thread itself, as a DMA copy or an asynchronous read would be: its bytes are read
        now (from the page cache: ~10-20 µs for a 96 KiB expert), the link is booked as
        for a worker's copy, and the expert lands — usable, StreamingExperts._landed — when
        the link would have delivered it. No worker has to wake up, take the GIL and find
        a core for it: on a 2-core machine whose compute thread keeps both busy, a demand
        load's worker started 60-260 µs after it was queued. Returns the bytes read; a
        read that fails RETRIES times is a TransferError naming the expert."""
        cache = self.cache
        cache.begin_load(slot)
        nbytes = self.store.expert_bytes(layer, expert)
        t0 = time.perf_counter()
        until = self._book_link(nbytes, t0)
        n, err = self._retrying(lambda: self._read_expert(
            cache.slot_parts(slot), layer, expert, drop_pages=False,
            land=(cache.slot_land_at, slot, until)), layer, expert)
        if err is not None:
            cache.release(slot)
            raise TransferError(f"cannot read expert {expert} of layer {layer} from the "
                                f"model file: {err}") from err
        self.counters.bytes_loaded += n
        self._meter_copy(n, self.link.latency_s + n / self.link.bytes_per_s)
        self.inline_copies += 1  # (the simulator's demand_copy_s is measured from these)
        self.inline_copy_s += time.perf_counter() - t0
        return n

    def read_now(self, job: Job) -> bool:
        """(cond released; its slot LOADING for it, the job taken off the queue: cancelled)
        A queued demand load read on the calling thread, which waits for it anyway
        (StreamingExperts._take_queued_load), as a worker would copy it. Returns False when
        the read failed RETRIES times (logged; the caller reloads it the usual way, which
        names the error)."""
        t0 = time.perf_counter()
        n, err = self._retrying(lambda: self._copy(job), job.layer, job.expert)
        if err is not None:
            return False
        with self.cond:
            self._meter_read(time.perf_counter() - t0)
            self.counters.bytes_loaded += n
        return True

    def load_now(self, layer: int, expert: int, slot: int) -> int:
        """Synchronous load on the calling thread (the fallback after failed retries)."""
        job = Job(DEMAND, -1, layer, expert, slot, started=True)
        nbytes = self._copy(job)
        self._emulate_link(nbytes, time.perf_counter())
        return nbytes

    def _worker(self, i: int) -> None:
        job: Job | None = None
        tight_timer_slack()
        try:
            while True:
                with self.cond:
                    while not self._closing:
                        if not self._queue or not self._may_start(self._queue[0]):
                            self.work.wait()
                            continue
                        delay = self.take_delay(time.perf_counter())
                        if delay <= 0.0:
                            break
                        self.work.wait(delay)  # (a copy the link comes free for)
                    if self._closing:
                        return
                    job = heapq.heappop(self._queue)
                    if job.cancelled:
                        job = None
                        continue
                    job.started = True
                    if self._queue:  # more to do: wake the next worker (submit_many woke
                        self.work.notify()  # one; each wake-up is a syscall here, not there)
                    if job.priority == DEMAND:  # the compute thread may wait for it to
                        self.cond.notify_all()  # start (StreamingExperts._start_demand_loads)
                    self._meter_start(job)
                    job.link_until = self._book_queued(job)
                self._run(job)
                job = None
        except BaseException as exc:  # a bug, not a disk error: never lose the job
            self._worker_died(i, job, exc)

    def _book_queued(self, job: Job) -> float:
        """(cond held) Book the emulated link for a job a worker takes now: from when it
        was queued, as a copy engine starts a queued copy once the link is free — a
        worker's wake-up is the emulation's time, not the link's. The meter's busy time
        then starts at the booking's start too."""
        if self.link is None:
            return 0.0
        nbytes = self.store.expert_bytes(job.layer, job.expert)
        now = time.perf_counter()
        until = self._book_link(nbytes, min(now, job.queued_at) if job.queued_at else now)
        if until > 0.0 and self._in_flight == 1:  # (this job began the busy time; 0: an
            # engine that emulates the link otherwise, efedge/gpu/cache.py)
            begin = until - self.link.latency_s - nbytes / self.link.bytes_per_s
            self._busy_mark = min(self._busy_mark, begin)
        return until

    def _may_start(self, job: Job) -> bool:
        """(cond held) Whether a worker may take the job at the head of the queue now
        (a subclass may hold some kinds of job back; waiting workers are woken through
        `work`)."""
        return True

    def _worker_died(self, i: int, job: Job | None, exc: BaseException) -> None:
        """Fail the job the dead worker held (its waiter then loads it synchronously) and
        start a replacement thread, so the pool never shrinks."""
        log.error("transfer worker %d died: %r", i, exc, exc_info=exc)
        with self.cond:
            if job is not None:
                self._meter_end(job, 0)
                job.error = exc
                key = job.layer * self.store.n_expert + job.expert
                if self.jobs_by_key.get(key) is job:
                    del self.jobs_by_key[key]
                if (self.cache.slot_state[job.slot] == LOADING
                        and self.cache.slot_owner[job.slot] == key and self._own_load(job)):
                    self.cache.release(job.slot)
            if not self._closing:
                self._threads[i] = self._spawn(i)
                self.workers_replaced += 1
            self.cond.notify_all()

    @staticmethod
    def _retrying(read, layer: int, expert: int) -> tuple[int, OSError | None]:
        """read() up to RETRIES times while it raises OSError (a disk error): (bytes read,
        None), or (0, the last error) for the caller to report."""
        err: OSError | None = None
        for attempt in range(RETRIES):
            try:
                return read(), None
            except OSError as exc:
                err = exc
                log.warning("load of expert %d/%d failed (attempt %d): %s",
                            layer, expert, attempt + 1, exc)
        return 0, err

    def _run(self, job: Job) -> None:
        """Copy one job's expert (retrying disk errors) and publish the result."""
        t0 = time.perf_counter()
        nbytes, err = self._retrying(lambda: self._copy(job), job.layer, job.expert)
        t_read = time.perf_counter() - t0
        if err is None:
            self._emulate_link(nbytes, t0, job.link_until)
        with self.cond:
            self._meter_end(job, 0 if err is not None else nbytes)
            if err is None:
                self._meter_read(t_read)
            key = job.layer * self.store.n_expert + job.expert
            if self.jobs_by_key.get(key) is job:
                del self.jobs_by_key[key]
            if err is not None:
                job.error = err
                if self.cache.slot_state[job.slot] == LOADING and self._own_load(job):
                    self.cache.release(job.slot)
            else:
                if self._own_load(job):  # (the compute thread may have taken the landed
                    self.cache.slot_state[job.slot] = READY  # expert and moved on)
                self.counters.bytes_loaded += nbytes
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self._closing = True  # from here on no worker is replaced
            self.cond.notify_all()
            self.work.notify_all()
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():  # a Model's finalizer may run in one
                t.join(timeout=5)
        self._close_files()
