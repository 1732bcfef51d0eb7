"""The expert cache in device memory: VRAM slots, copy streams, events — and the same
tables, policies, transfer queue and counters as the CPU cache.

Only the bytes move differently. The slot tables are efedge.experts.cache.ExpertCache
built with ``allocate=False`` (bookkeeping only); the bytes live in one device tensor per
size class, allocated once (GpuExpertCache). Transfers reuse TransferEngine's workers,
priority queue, retries and bandwidth meter; GpuTransferEngine only replaces the copy:

    pread from the file (page cache = the host tier) → this worker's pinned staging buffer
    → non-blocking copy on this worker's copy stream, after the slot's last reader
    → event → (emulated link: the event completes later) → worker waits → slot READY

The compute thread never synchronizes with a copy: a slot it reads is READY, i.e. its
event has already completed. The opposite hazard — a worker overwriting a slot whose
previous expert the GPU has not finished reading, because kernels run after the host
enqueued them — is closed by `last_use`: after each batch the compute stream records an
event per slot, and the next copy into that slot waits for it on the copy stream (a
GPU-side wait; nobody blocks).

DeviceBackend hides streams and events so the same code runs on torch's CPU device,
where copies are synchronous and every event is complete (tests substitute backends
whose events complete late, to exercise the ordering).

A second cache level in pinned host memory (`host_cache=`, efedge/gpu/host_tier.py) for
files larger than host RAM: without it the OS page cache is the host tier and thrashes
when the file does not fit, so every VRAM miss reads the disk. With it, a VRAM copy
takes its expert from a READY host slot (a host hit: no file read, no staging copy; the
slot stays pinned until the copy's event has completed), or reads the file into a host
slot first (a host miss; the pages are dropped, the host slot is the only copy) and
copies from there; a worker that wants an expert another worker is reading waits for
that read. Staging jobs (disk → host only) come from the same predictions as the VRAM
prefetches, further ahead (`GpuStreamingExperts.stage`, called by expertflow), and queue
behind every VRAM job (STAGE_PRIORITY); a staging job claims its host slot only when a
worker starts it. Counters: host_hits, host_misses, host_staged, disk_bytes
(bytes_loaded stays the bytes moved into VRAM). docs/gpu.md describes both levels.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from efedge.errors import TransferError
from efedge.experts.cache import READY, ExpertCache
from efedge.experts.demand_wait import WAIT_TIMEOUT_S
from efedge.experts.store import ExpertStore
from efedge.experts.streaming import StreamingExperts
from efedge.experts.transfer import DEMAND, Job, TransferEngine
from efedge.gpu.host_tier import HostTier

log = logging.getLogger("efedge.gpu")
PARTS = ("gate", "up", "down")
# staging loads (disk → host only) queue behind every VRAM job: VRAM priorities are
# DEMAND, PREFETCH or the step a prefetch is needed at, far below this
STAGE_PRIORITY = 1 << 48


@dataclass(eq=False)
class StageJob(Job):
    """A disk → host load from the predictions (`slot` unused: the host slot is claimed
    when a worker starts it, so a queued one holds nothing). Ordered with VRAM jobs in
    one heap by (priority, seq); dataclass ordering would refuse to compare the two
    classes, hence the explicit comparisons (Job < StageJob reaches __gt__)."""

    value: float = field(default=0.0, compare=False)  # its predicted probability of use

    def __lt__(self, other: Job) -> bool:
        return (self.priority, self.seq) < (other.priority, other.seq)

    def __gt__(self, other: Job) -> bool:
        return (self.priority, self.seq) > (other.priority, other.seq)


# -- streams and events ------------------------------------------------------------------

class HostEvent:
    """A completed event (torch's CPU device runs every copy synchronously)."""

    torch_event = None

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class CudaEvent:
    def __init__(self, stream):
        self.torch_event = torch.cuda.Event()
        self.torch_event.record(stream)

    def query(self) -> bool:
        return self.torch_event.query()

    def synchronize(self) -> None:
        self.torch_event.synchronize()  # releases the GIL while it waits


class DeviceBackend:
    """Streams, events, copies and host buffers on one torch device."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"

    def new_stream(self):
        return torch.cuda.Stream(device=self.device) if self.is_cuda else None

    def use_stream(self, stream):
        return torch.cuda.stream(stream) if self.is_cuda and stream is not None else nullcontext()

    def record(self, stream=None):
        """An event after the work enqueued so far on `stream` (default: the current one)."""
        if not self.is_cuda:
            return HostEvent()
        return CudaEvent(stream if stream is not None else torch.cuda.current_stream(self.device))

    def wait(self, event, stream=None) -> None:
        """Make `stream` (default: current) wait for `event` on the device; no host block."""
        ev = getattr(event, "torch_event", None)
        if ev is not None:
            if stream is None:
                stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ev)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """Page-locked on CUDA, so the copy engine can DMA from it asynchronously."""
        return torch.empty(int(nbytes), dtype=torch.uint8, pin_memory=self.is_cuda)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=self.is_cuda)

    def upload(self, a: np.ndarray) -> torch.Tensor:
        """A small host array on the device without making the host wait for the queued
        kernels (a pageable copy would): staged through torch's pinned-block cache, which
        keeps the block until the copy has run."""
        t = torch.from_numpy(np.ascontiguousarray(a))
        if not self.is_cuda:
            return t
        return t.pin_memory().to(self.device, non_blocking=True)


# -- the slots -----------------------------------------------------------------------------

class GpuExpertCache(ExpertCache):
    """ExpertCache tables (allocate=False) + one device pool [slots, slot_bytes] per size
    class, allocated once. A slot holds an expert's gate, up and down blocks back to back
    (part_bounds), exactly as the file stores them."""

    def __init__(self, store: ExpertStore, budget: int, n_active: int, backend: DeviceBackend):
        super().__init__(store, budget, n_active, allocate=False)
        self.backend = backend
        self.dev_pools = [torch.empty((int(n), int(b)), dtype=torch.uint8, device=backend.device)
                          for n, b in zip(self.class_slots, self.class_bytes, strict=True)]
        self.last_use: list = [None] * self.n_slots  # event after the last batch that read it

    def slot_tensor(self, slot: int) -> torch.Tensor:
        c = int(self.slot_class[slot])
        return self.dev_pools[c][slot - int(self.class_first[c])]

    def gather(self, slots: list[int]) -> torch.Tensor:
        """Copies of these slots' bytes [n, slot_bytes] (all of one size class)."""
        c = int(self.slot_class[slots[0]])
        local = np.asarray(slots, dtype=np.int64) - int(self.class_first[c])
        return self.dev_pools[c].index_select(0, self.backend.upload(local))

    def parts(self, layer: int, raw: torch.Tensor) -> list[torch.Tensor]:
        """Slot bytes [n, slot_bytes] → gate, up, down as uint8 [n, rows, row_bytes]."""
        b = self.part_bounds[layer]
        out = []
        for i, part in enumerate(PARTS):
            rows, row_bytes = self.store.part_shape(layer, part)
            out.append(raw[:, b[i]:b[i + 1]].reshape(raw.shape[0], rows, row_bytes))
        return out

    def weights(self, slot: int, layer: int):
        """(gate, up, down) uint8 device views [rows, row_bytes] inside the slot."""
        return tuple(p[0] for p in self.parts(layer, self.slot_tensor(slot)[None]))


# -- the copies ----------------------------------------------------------------------------

class GpuTransferEngine(TransferEngine):
    """TransferEngine whose workers copy file → pinned staging → VRAM slot on their own
    copy stream. `emulator` (efedge.gpu.emulate.LinkEmulator) delays each copy's event as
    the emulated link would."""

    def __init__(self, path, store: ExpertStore, cache: GpuExpertCache, counters,
                 backend: DeviceBackend, emulator=None, workers: int = 2, read_fn=None,
                 host_tier: HostTier | None = None):
        self.backend, self.emulator = backend, emulator
        self.host = host_tier
        self._stage_jobs: dict[int, StageJob] = {}  # queued staging loads by layer * E + e
        self._stage_queued = 0
        self._stage_running = 0  # staging loads under way: at most workers - 1 (below)
        self.stage_issued = self.stage_cancelled = 0
        self._tls = threading.local()
        self._max_bytes = int(np.max(cache.class_bytes))
        self.copy_s = 0.0  # worker time from job start to the copy's (emulated) completion
        self._stat_lock = threading.Lock()
        super().__init__(path, store, cache, counters, None, workers, read_fn)
        self.link = emulator.link if emulator is not None else None

    def _resources(self):
        """This thread's copy stream and (without a host tier) pinned staging buffer, made
        on first use."""
        tl = self._tls
        if getattr(tl, "stream", None) is None:
            tl.stream = self.backend.new_stream()
        if self.host is None and getattr(tl, "staging", None) is None:
            tl.staging = self.backend.host_buffer(self._max_bytes)
            tl.np = tl.staging.numpy()
        return tl

    def _fill_host(self, slot: int, layer: int, expert: int) -> int:
        """Read an expert from the file into its (LOADING) host slot, as fast as the
        emulated disk link allows, and publish it READY. A failed read frees the slot
        (its waiters then read it themselves) and raises."""
        t0 = time.perf_counter()
        try:
            # an emulated disk reads from the page cache (as TransferEngine's link)
            n = self._read_expert(self.host.slot_parts(slot, layer), layer, expert,
                                  drop_pages=self.host.disk is None)
            self.host.wait_disk(n, t0)
        except BaseException:
            self.host.release(slot)
            raise
        self.host.mark_ready(slot)
        with self._stat_lock:
            self.counters.disk_bytes += n
        return n

    def _copy(self, job) -> int:
        t0 = time.perf_counter()
        tl = self._resources()
        total = self.store.expert_bytes(job.layer, job.expert)
        hslot = -1
        if self.host is None:  # the page cache is the host tier: keep its pages
            bounds = self.cache.part_bounds[job.layer]
            self._read_expert([tl.np[bounds[ip]:bounds[ip + 1]] for ip in range(3)],
                              job.layer, job.expert, drop_pages=False)
            src = tl.staging
        else:
            hslot, hit = self.host.acquire(job.layer, job.expert)  # pinned
        try:
            if hslot >= 0:
                if not hit:
                    self._fill_host(hslot, job.layer, job.expert)
                src = self.host.slot_tensor(hslot)
            dst = self.cache.slot_tensor(job.slot)
            last = self.cache.last_use[job.slot]
            with self.backend.use_stream(tl.stream):
                if last is not None:
                    self.backend.wait(last, tl.stream)  # the GPU has finished reading the slot
                self.backend.copy(dst[:total], src[:total])
                event = self.backend.record(tl.stream)
            if self.emulator is not None:
                event = self.emulator.delay(event, total, t0)
            # this worker waits, never the compute thread; the staging buffer or host slot
            # may be reused (or evicted) once the copy has completed
            event.synchronize()
        finally:
            if hslot >= 0:
                self.host.unpin(hslot)
        with self._stat_lock:
            self.copy_s += time.perf_counter() - t0
            if hslot >= 0:  # counted once the expert is in VRAM (a failed try is not)
                if hit:
                    self.counters.host_hits += 1
                else:
                    self.counters.host_misses += 1
        return total

    # -- staging: disk → host only, behind every VRAM job ----------------------------------
    def stage(self, layer: int, experts: np.ndarray, values: np.ndarray, priority: int,
              vram_where: np.ndarray) -> int:
        """(cond held) Queue disk → host loads of these experts (with their predicted
        probabilities `values`) unless resident in VRAM, held by the host tier or already
        queued; the layer's queued staging loads not asked for again are dropped (newer
        predictions replace them). Returns how many were queued."""
        n_e = self.store.n_expert
        keep = set()
        issued = 0
        room = self.host.class_slots(layer) - self._stage_queued
        for e, v in zip(experts.tolist(), values.tolist(), strict=True):
            key = layer * n_e + e
            job = self._stage_jobs.get(key)
            if job is not None:
                keep.add(key)
                continue
            if vram_where[layer, e] >= 0 or self.host.contains(layer, e) or room <= 0:
                continue
            job = StageJob(STAGE_PRIORITY + max(0, int(priority)), next(self._seq), layer, e,
                           -1, value=float(v))
            heapq.heappush(self._queue, job)
            self._stage_jobs[key] = job
            self._stage_queued += 1
            keep.add(key)
            issued += 1
            room -= 1
            self.work.notify()
        for key, job in list(self._stage_jobs.items()):
            if key // n_e == layer and key not in keep and not job.started:
                job.cancelled = True
                del self._stage_jobs[key]
                self._stage_queued -= 1
                self.stage_cancelled += 1
        self.stage_issued += issued
        return issued

    def _stage_done(self, job) -> None:
        """(cond held) The staging job left the queue (run, failed or died)."""
        key = job.layer * self.store.n_expert + job.expert
        if self._stage_jobs.get(key) is job:
            del self._stage_jobs[key]
            self._stage_queued -= 1

    def _run_stage(self, job) -> None:
        """Read a staged expert into a host slot, if it is not there yet and some slot
        holds an expert less likely to be needed (disk errors: retried as any load, then
        dropped; a staging load is only a hint)."""
        def stage() -> int:
            slot = self.host.claim(job.layer, job.expert, job.value)
            return self._fill_host(slot, job.layer, job.expert) if slot >= 0 else 0

        n, _ = self._retrying(stage, job.layer, job.expert)
        if n:
            with self._stat_lock:
                self.counters.host_staged += 1
        with self.cond:
            self._stage_done(job)
            self.cond.notify_all()

    def _run(self, job) -> None:
        if isinstance(job, StageJob):
            try:
                self._run_stage(job)
            finally:
                with self.cond:
                    self._stage_running -= 1
                    self.work.notify()  # a staging load held back may start now
        else:
            super()._run(job)

    def _may_start(self, job) -> bool:
        """Staging loads take at most workers - 1 workers at a time: a disk read for a
        hint must never leave a demand load (which may arrive any moment) without a
        worker. (Staging jobs queue behind every VRAM job, so one held back at the head
        means no VRAM job is waiting.)"""
        if job.cancelled or not isinstance(job, StageJob):
            return True
        return self._stage_running < max(1, len(self._threads) - 1)

    def _meter_start(self, job) -> None:
        if isinstance(job, StageJob):
            self._stage_running += 1  # (cond held: a worker has just taken it)
        else:  # the meter measures the link into VRAM
            super()._meter_start(job)

    def _worker_died(self, i: int, job, exc: BaseException) -> None:
        if isinstance(job, StageJob):
            with self.cond:
                self._stage_done(job)  # (_run's finally has counted it as ended)
            job = None  # its host slot, if claimed, was released by _fill_host
        super()._worker_died(i, job, exc)

    copies_inline = False  # every copy goes through a worker and the copy stream

    def _book_link(self, nbytes: int, now: float) -> float:
        return 0.0  # the emulated link delays the copy's event instead (see _copy)

    def _emulate_link(self, nbytes: int, started: float, until: float = 0.0) -> None:
        pass  # (the same)

    def demand_backlog_bytes(self) -> int:
        """Bytes of demand loads queued and not started (cond held)."""
        n = 0
        for j in self._queue:
            if j.priority == DEMAND and not j.cancelled and not j.started:
                n += self.store.expert_bytes(j.layer, j.expert)
        return n


# -- the compute thread's view -------------------------------------------------------------

class GpuStreamingExperts(StreamingExperts):
    """StreamingExperts (prefetch, cancellation, demand issue, counters, policy hooks — all
    inherited) with a batched acquire for the GPU and hybrid misses."""

    def __init__(self, store, cache: GpuExpertCache, engine: GpuTransferEngine, policy,
                 counters, routers=None, n_active=None, hybrid=None, selection=None):
        self.host_tier = engine.host  # None: no second level (the page cache serves);
        # set before the policy attaches (in super().__init__): it looks for it
        super().__init__(store, cache, engine, policy, counters, routers=routers,
                         n_active=n_active, selection=selection)
        self.backend = cache.backend
        self.hybrid = hybrid
        if self.host_tier is not None:
            # host eviction reads what VRAM holds and, if the policy predicts, p_next
            self.host_tier.watch(cache.where, getattr(policy, "predictor", None))

    def stage(self, layer: int, experts, priority: int | None = None, values=None) -> int:
        """Queue disk → host loads (no VRAM slot) of experts predicted for `layer`, behind
        every VRAM job; `values`: their predicted probabilities of use (a staging load
        evicts only host experts less likely to be needed). Queued staging loads of the
        layer not named again are dropped. Returns how many were queued (0 without a host
        tier or for a dense layer)."""
        if self.host_tier is None or self.cache.layer_class[layer] < 0:
            return 0
        experts = np.asarray(experts, dtype=np.int64).reshape(-1)
        values = (np.ones(experts.shape, dtype=np.float64) if values is None
                  else np.asarray(values, dtype=np.float64).reshape(-1))
        if values.shape != experts.shape:
            raise ValueError(f"stage: {experts.size} experts but {values.size} values")
        if experts.size and (experts.min() < 0 or experts.max() >= self.store.n_expert):
            raise ValueError(f"stage: expert ids must be in 0..{self.store.n_expert - 1}")
        with self.cond:
            return self.engine.stage(layer, experts, values, 0 if priority is None
                                     else int(priority), self.cache.where)

    # hooks of StreamingExperts.acquire_batches (which gives the GPU its batches too)
    def _before_issue(self, layer: int, pending: list[int], *, tokens=None, cpu_submit=None,
                      **kw) -> list[int]:
        """Hybrid misses: with a hybrid policy and `cpu_submit`, misses that would take
        longer to copy than to compute on the CPU are not loaded (cond held); they are
        returned, taken out of `pending`, and never yielded."""
        if self.hybrid is None or cpu_submit is None or not pending:
            return []
        on_cpu = self.hybrid.plan(layer, pending, tokens or {}, self.engine)
        pending[:] = [e for e in pending if e not in on_cpu]
        return on_cpu

    def _after_issue(self, skip: list[int], *, cpu_submit=None, **kw) -> None:
        for e in skip:  # the caller runs them on the CPU beside the GPU work
            cpu_submit(e)

    def _batch_done(self, batch: list[tuple[int, int]]) -> None:
        """The compute stream's event becomes the slots' last use: a copy into one of
        them waits for it."""
        event = self.backend.record()
        for _e, s in batch:
            self.cache.last_use[s] = event

    def preload_all(self) -> None:
        """Load every expert (the cache holds them all): no stall ever after."""
        n_layer, n_expert = self.store.n_layer, self.store.n_expert
        for il in range(n_layer):
            with self.cond:
                for e in range(n_expert):
                    if self.cache.where[il, e] >= 0:
                        continue
                    slot = self.cache.free_or_victim(il, self.policy.victim)
                    if slot < 0:
                        raise TransferError("preload_all: the cache cannot hold every expert")
                    self.cache.assign(slot, il, e)
                    self.engine.submit(il, e, slot, DEMAND)
        with self.cond:
            t0 = time.perf_counter()
            while True:
                # a load that failed on a worker (after its retries) released its slot:
                # once more on this thread, as a demand load would be, so that a transient
                # error does not fail the load and a lasting one is a TransferError naming
                # the expert and the cause. Checked before the exit test: a failure of the
                # last load would otherwise leave that expert out of the "resident" cache
                for il, e in np.argwhere(self.cache.where < 0).tolist():
                    self.cache.slot_pins[self._load_sync(il, e)] -= 1
                if (self.cache.slot_state[self.cache.where] == READY).all():
                    return
                self.cond.wait(timeout=1.0)
                if time.perf_counter() - t0 > WAIT_TIMEOUT_S * 10:
                    raise TransferError("preload_all: loads made no progress")
