"""NativeTransferEngine: the TransferEngine whose copies are made by native threads
(native_workers.py), for reading the model file itself with O_DIRECT on Linux (the
default there; EFEDGE_NATIVE_WORKERS=0 keeps Python workers: make_engine says why), and
for an emulated link's copies: read through the page cache, booked on the link as a
worker takes them (from when they were queued, if the link was free then) and held until
it would have delivered them, as the Python workers do,
but without a GIL hand-over per copy — a copy engine's DMA, which the link stands for,
costs the compute thread nothing.

The queue lives in the workers' job table instead of a Python heap; everything else —
slots, the meters, failed reads, cancelling, promoting a prefetch to a demand load, the
compute thread reading a queued demand load itself — keeps TransferEngine's meaning.
What the Python workers did after a copy (the slot READY, `bytes_loaded`, the meters,
forgetting the job) the compute thread does when it next looks (`reap`, cache lock
held): the expert itself is usable as soon as it lands (the kernel writes its landing
time, as before). Where a read fails natively, the slot is freed and the layer reloads it
through the Python path, which retries and names the error; after DIRECT_FAILURES of
them the engine goes back to Python workers reading through the page cache.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from efedge.experts import native_workers as nw
from efedge.experts.cache import LOADING, READY
from efedge.experts.transfer import DEMAND, FILE_WORKERS, LINK_WORKERS, Job, TransferEngine

log = logging.getLogger("efedge.transfer")


def make_engine(path, store, cache, counters, link=None, workers=None) -> TransferEngine:
    """The transfer engine for a cache: native workers where they can run (Linux; reading
    the file itself, a file system with O_DIRECT; or through an emulated link, from the
    page cache), else Python workers; EFEDGE_NATIVE_WORKERS=0 asks for Python workers.
    Reading the drive, every policy decodes faster with native workers (paired on the
    test VM: on-demand 1.15-1.16x, expertflow 1.08-1.14x), though expertflow's stall there
    is higher — the same reads hidden behind less compute (docs/scheduler.md §6). Through
    an emulated link (since the twenty-first session), Python workers cost the compute
    thread ~0.7 ms per token of GIL hand-overs and context switches that a copy engine
    would not, slowing every prefetching policy's decode and so hiding its copies: native
    ones measure the scheduler as a DMA link would (docs/scheduler.md §6)."""
    if nw.available() and os.environ.get("EFEDGE_NATIVE_WORKERS") != "0":
        try:
            return NativeTransferEngine(path, store, cache, counters, workers, link)
        except RuntimeError as exc:  # no O_DIRECT there, or no thread could start
            log.info("native transfer workers unavailable (%s): Python workers read", exc)
    return TransferEngine(path, store, cache, counters, link, workers)


class NativeTransferEngine(TransferEngine):
    """TransferEngine with native workers: direct reads of the file, or reads through the
    page cache held by an emulated link (`link`), as the Python workers make them."""

    gil_free = True  # no worker needs the GIL: nothing to hand it over to

    def __init__(self, path, store, cache, counters, workers: int | None = None,
                 link=None):
        # (no Python worker: _spawn is not called while n_workers is 0)
        super().__init__(path, store, cache, counters, link=link, workers=0)
        if link is None and self._direct_fds is None:
            self.close()
            raise RuntimeError("native workers read with O_DIRECT, which this file refused")
        self._mode = nw.DIRECT if link is None else nw.LINK
        self.n_workers = (FILE_WORKERS if link is None else LINK_WORKERS) \
            if workers is None else max(1, int(workers))
        # where each slot's gate, up and down start, and each layer's three descriptors:
        # a job row is filled from these in one kernel call
        self._slot_dst = np.array([[p.ctypes.data for p in cache.slot_parts(s)]
                                   for s in range(cache.n_slots)], np.int64).reshape(-1, 3)
        self._layer_fds = self._descriptors(store, cache)
        # at most one job per slot is ever outstanding, plus rows finished but not reaped;
        # reading the drive, an expert's three parts go in flight at once where its parts
        # are small (aio: FileReads._aio_pays, from aio_read.pays)
        self.pool = nw.NativeWorkers(self.n_workers, cache.n_slots + 2 * self.n_workers + 8,
                                     cache.slot_land_at, self._bounce_size,
                                     aio=link is None and self._aio_pays)
        self._row_job: dict[int, Job] = {}
        self._reaped = -1  # the workers' count of finished rows at the last reap

    def _descriptors(self, store, cache) -> np.ndarray:
        """int64 [L, 3]: the direct descriptor of each layer's gate, up and down. The
        native reads write through raw addresses, so every expert's parts are checked
        here, once, to fit the slots of its layer's size class."""
        fds = self._direct_fds if self.link is None else self._fds
        out = np.full((store.n_layer, 3), -1, np.int64)
        for layer in range(store.n_layer):
            c = int(cache.layer_class[layer])
            if c < 0:
                continue  # a dense layer: nothing to read
            slot = int(cache.class_first[c])
            room = [p.shape[0] for p in cache.slot_parts(slot)]
            need = store.nbytes[layer].max(axis=0)
            if any(int(need[i]) > room[i] for i in range(3)):
                raise ValueError(f"layer {layer}'s experts do not fit the slots of their "
                                 f"size class ({need.tolist()} > {room} bytes)")
            shard = store.shard[layer] if len(fds) > 1 else (0, 0, 0)
            out[layer] = [fds[int(shard[i])] for i in range(3)]
        return out

    def _spawn(self, i: int):
        if getattr(self, "pool", None) is not None:  # back to Python workers (_fall_back)
            return super()._spawn(i)
        raise AssertionError("a native engine starts no Python worker")

    @property
    def native(self) -> bool:
        """Whether copies still go to the native workers (not after _fall_back)."""
        return self._direct_fds is not None or self.link is not None

    def _book_link(self, nbytes: int, now: float) -> float:
        """As TransferEngine's, on the native workers' own booking (one link: the compute
        thread's inline copies and the workers' copies take turns on it)."""
        if self.link is None or getattr(self, "pool", None) is None:
            return super()._book_link(nbytes, now)
        return self.pool.book(now, self.link.latency_s + nbytes / self.link.bytes_per_s)

    def copy_inline(self, layer: int, expert: int, slot: int) -> int:
        """TransferEngine.copy_inline in one kernel call (nw.copy_inline_now: the link
        booked, the read, the landing time, the meter) where the engine still books the
        native workers' link and reads through file_read's kernel: the Python steps around
        the read cost the compute thread ~15-20 µs per copy on the test VM — more than
        half the read itself —, time a copy engine would not spend (docs/scheduler.md §6,
        fortieth session). A failed read goes the Python way, which retries and names
        the error (the link is booked once more for it)."""
        pool = getattr(self, "pool", None)
        if self.link is None or pool is None or not self._kernel_reads():
            return super().copy_inline(layer, expert, slot)
        cache, store, link = self.cache, self.store, self.link
        t0 = time.perf_counter()
        busy = link.latency_s + store.expert_bytes(layer, expert) / link.bytes_per_s
        n = nw.copy_inline_now(pool.link_word, self.meter, self._slot_dst, self._layer_fds,
                               cache.slot_class, cache.layer_class, store.offsets,
                               store.nbytes, layer, expert, slot, cache.slot_land_at,
                               cache.slot_gen, int(t0 * 1e9), busy)
        if n < 0:
            if n == -100:  # (nothing done: the slot is as it was)
                raise ValueError(f"slot {slot} cannot hold an expert of layer {layer}")
            return super().copy_inline(layer, expert, slot)
        self.counters.bytes_loaded += n
        self._meter_report()
        self.inline_copies += 1
        self.inline_copy_s += time.perf_counter() - t0
        return int(n)

    def link_free_at(self) -> float:
        if self.link is None or getattr(self, "pool", None) is None:
            return super().link_free_at()
        return int(self.pool.link_word[0]) * 1e-9

    # -- called with cond held ------------------------------------------------------------
    def submit(self, layer: int, expert: int, slot: int, priority: int,
               gen: int | None = None) -> Job:
        if not self.native:
            return super().submit(layer, expert, slot, priority)
        if gen is None:
            gen = self.cache.begin_load(slot)
        # (after begin_load: a finished copy of the slot's previous expert, reaped here,
        # must not mark the slot READY for the expert just assigned to it)
        self.reap()
        job = self._queue_job(layer, expert, slot, priority, gen)
        self.pool.publish(priority == DEMAND)  # (a demand load: wake a worker now)
        return job

    def _new_job(self, layer: int, expert: int, slot: int, priority: int, gen: int) -> Job:
        """A job on a free row of the table, known by its row and key (the row still FREE:
        _queue_job / _queue_jobs fill it and make it QUEUED)."""
        job = Job(priority, next(self._seq), layer, expert, slot, gen=gen)
        job.row = r = self.pool.free.pop()
        self._row_job[r] = job
        self.jobs_by_key[layer * self.store.n_expert + expert] = job
        self.submitted += 1
        return job

    def _queue_job(self, layer: int, expert: int, slot: int, priority: int, gen: int) -> Job:
        """A job row filled and QUEUED (publish() lets the workers know)."""
        job = self._new_job(layer, expert, slot, priority, gen)
        st = self.store
        dur = 0
        if self.link is not None:  # the link's time for it, booked when a worker takes
            # it (from the row's queue time, F_QT, if the link was free then)
            dur = int(1e9 * (self.link.latency_s + st.expert_bytes(layer, expert)
                             / self.link.bytes_per_s))
        self.pool.queue(job.row, self._layer_fds[layer], self._slot_dst[slot],
                        st.offsets[layer, expert], st.nbytes[layer, expert], priority,
                        job.seq, slot, self._mode, dur, gen)
        return job

    def submit_many(self, layers, experts, slots, priorities, gens=None) -> None:
        """submit() for each (a plan's prefetches), one wake-up for all."""
        if not self.native:
            return super().submit_many(layers, experts, slots, priorities, gens)
        if gens is None:
            gens = [self.cache.begin_load(s) for s in slots]
        self.reap()  # (after every load was begun: see submit)
        n = len(slots)
        if n == 1:
            self._queue_job(layers[0], experts[0], slots[0], priorities[0], gens[0])
        elif n:
            self._queue_jobs(layers, experts, slots, priorities, gens)
        self.pool.publish()

    def _queue_jobs(self, layers, experts, slots, priorities, gens) -> None:
        """_queue_job for each, the rows filled in one kernel call (a plan's copies: ~5 µs
        of dispatch and array views per copy saved on the compute thread; the link's time
        for each computed there as _queue_job computes it)."""
        jobs = [self._new_job(m, e, s, p, g)
                for m, e, s, p, g in zip(layers, experts, slots, priorities, gens,
                                         strict=True)]
        link = self.link
        self.pool.queue_many(np.array([j.row for j in jobs], np.int64),
                             np.array(layers, np.int64), np.array(experts, np.int64),
                             np.array(slots, np.int64), np.array(priorities, np.int64),
                             np.array([j.seq for j in jobs], np.int64),
                             np.array(gens, np.int64), self._layer_fds, self._slot_dst,
                             self.store.offsets, self.store.nbytes, self._mode,
                             0.0 if link is None else float(link.latency_s),
                             0.0 if link is None else float(link.bytes_per_s))

    def promote(self, job: Job) -> Job:
        r = getattr(job, "row", None)
        if r is None:
            return super().promote(job)
        if job.priority != DEMAND and self.pool.jobs[r, nw.F_STATE] == nw.QUEUED:
            self.pool.jobs[r, nw.F_PRIO] = DEMAND  # (a worker may take it either way)
            job.priority = DEMAND
        return job

    def take_queued(self, job: Job) -> bool:
        """A queued row taken from the workers by compare-and-swap (cancel() then frees
        the slot; read_now reads it on the calling thread)."""
        r = getattr(job, "row", None)
        if r is None:
            return super().take_queued(job)
        if job.cancelled or not self.pool.claim(r, nw.QUEUED, nw.CANCELLED):
            return False
        job.cancelled = True
        self.jobs_by_key.pop(job.layer * self.store.n_expert + job.expert, None)
        self._free(r)
        return True

    def started(self, job: Job) -> bool:
        r = getattr(job, "row", None)
        if r is None or job.cancelled:
            return super().started(job)
        return job.started or self.pool.jobs[r, nw.F_STATE] != nw.QUEUED

    def _free(self, r: int) -> None:
        self.pool.jobs[r, nw.F_STATE] = nw.FREE
        self._row_job.pop(r, None)
        self.pool.free.append(r)

    def busy(self) -> bool:
        return bool(self._row_job) or super().busy()

    def queued(self) -> int:
        jobs = self.pool.jobs
        return sum(1 for r in self._row_job if jobs[r, nw.F_STATE] == nw.QUEUED) + \
            super().queued()

    def reap(self) -> None:
        """(cond held) What the workers finished: the slot READY (if still this load's),
        bytes_loaded, the meters (one kernel call: ~10 µs of Python per copy before);
        a failed read frees its slot (its layer reloads it)."""
        if not self._row_job:
            return
        mark = self.pool.done_mark()
        if mark == self._reaped:  # nothing finished since the last look
            return
        self._reaped = mark  # (a row finishing from here on moves it again)
        jobs, n_e = self.pool.jobs, self.store.n_expert
        done, loaded = nw.reap_rows(
            jobs, np.fromiter(self._row_job, np.int64, len(self._row_job)),
            self.cache.slot_gen, self.cache.slot_state, READY, self.meter,
            self.link is not None)
        if done.size == 0:
            return
        self._meter_report()
        self.counters.bytes_loaded += int(loaded)
        for r in done.tolist():
            job = self._row_job[r]
            job.started = True
            key = job.layer * n_e + job.expert
            if self.jobs_by_key.get(key) is job:
                del self.jobs_by_key[key]
            if jobs[r, nw.F_STATE] != nw.DONE:
                how = "direct read" if self.link is None else "read"
                job.error = OSError(f"{how} of expert {job.expert} of layer "
                                    f"{job.layer} failed ({int(jobs[r, nw.F_RC])})")
                if self.cache.slot_state[job.slot] == LOADING and self._own_load(job):
                    self.cache.release(job.slot)
                if self.link is None:
                    self._direct_failed()
            self._free(r)
        if not self.native:
            self._fall_back()
        self.cond.notify_all()

    def _fall_back(self) -> None:
        """(cond held) Direct reads kept failing: Python workers from here on (they read
        through the page cache). Rows still queued are read by the native workers."""
        if not self._threads or all(not t.is_alive() for t in self._threads):
            self.n_workers = max(1, self.n_workers)
            self._threads = [self._spawn(i) for i in range(self.n_workers)]

    def progress_mark(self) -> int:
        return self.pool.done_mark()

    def wait_progress(self, mark: int, timeout: float) -> bool:
        """(cond held) Wait until a copy finishes after `mark` (progress_mark), up to
        timeout seconds, with the cache lock released; then reap. False when none did."""
        if not self.native and self._threads:  # (Python workers since _fall_back)
            woken = self.cond.wait(timeout)
            self.reap()
            return woken or self.pool.done_mark() != mark
        self.cond.release()
        try:
            self.pool.wait_done(mark, timeout)
        finally:
            self.cond.acquire()
        self.reap()
        return self.pool.done_mark() != mark

    def close(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close()  # joined before the slots and descriptors go
        super().close()
