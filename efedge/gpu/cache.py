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

Not implemented: a second cache level in pinned host memory for files larger than host
RAM. Experts are read from the mapped file, i.e. from the page cache when the file fits
in RAM and from the disk when it does not; ExpertFlow's two-level design would put a
pinned host pool, filled by the same predictions with a longer horizon, between the two.
"""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext

import numpy as np
import torch

from efedge.errors import TransferError
from efedge.experts import file_read
from efedge.experts.cache import READY, ExpertCache
from efedge.experts.store import ExpertStore
from efedge.experts.streaming import WAIT_TIMEOUT_S, StreamingExperts
from efedge.experts.transfer import DEMAND, TransferEngine

PARTS = ("gate", "up", "down")


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
                 backend: DeviceBackend, emulator=None, workers: int = 2, read_fn=None):
        self.backend, self.emulator = backend, emulator
        self._tls = threading.local()
        self._max_bytes = int(np.max(cache.class_bytes))
        self.copy_s = 0.0  # worker time from job start to the copy's (emulated) completion
        self._stat_lock = threading.Lock()
        super().__init__(path, store, cache, counters, None, workers, read_fn)
        self.link = emulator.link if emulator is not None else None

    def _resources(self):
        """This thread's pinned staging buffer and copy stream (made on first use)."""
        tl = self._tls
        if getattr(tl, "staging", None) is None:
            tl.staging = self.backend.host_buffer(self._max_bytes)
            tl.np = tl.staging.numpy()
            tl.stream = self.backend.new_stream()
        return tl

    def _copy(self, job) -> int:
        t0 = time.perf_counter()
        tl = self._resources()
        bounds = self.cache.part_bounds[job.layer]
        nbytes = self.store.nbytes[job.layer, job.expert]
        total = int(nbytes.sum())
        if not (self._kernel_reads() and file_read.read_expert(
                self._fd, [tl.np[bounds[ip]:bounds[ip + 1]] for ip in range(3)],
                self.store.offsets[job.layer, job.expert], nbytes, self._page,
                drop_pages=False)):  # the page cache is the host tier here
            for ip in range(3):  # in Python where the kernel cannot, or to name its error
                off = int(self.store.offsets[job.layer, job.expert, ip])
                n = int(nbytes[ip])
                self._read(tl.np[bounds[ip]:bounds[ip] + n], off)
        dst = self.cache.slot_tensor(job.slot)
        last = self.cache.last_use[job.slot]
        with self.backend.use_stream(tl.stream):
            if last is not None:
                self.backend.wait(last, tl.stream)  # the GPU has finished reading the slot
            self.backend.copy(dst[:total], tl.staging[:total])
            event = self.backend.record(tl.stream)
        if self.emulator is not None:
            event = self.emulator.delay(event, total, t0)
        event.synchronize()  # this worker waits, never the compute thread; staging reusable
        with self._stat_lock:
            self.copy_s += time.perf_counter() - t0
        return total

    def _emulate_link(self, nbytes: int, started: float) -> None:
        pass  # the emulated link delays the copy's event instead (see _copy)

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
                 counters, routers=None, n_active=None, hybrid=None):
        super().__init__(store, cache, engine, policy, counters, routers=routers,
                         n_active=n_active)
        self.backend = cache.backend
        self.hybrid = hybrid

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
            while (self.cache.slot_state[self.cache.where[self.cache.where >= 0]] != READY).any():
                if self.cache.where.min() < 0:  # a load failed and released its slot
                    raise TransferError("preload_all: an expert failed to load")
                self.cond.wait(timeout=1.0)
                if time.perf_counter() - t0 > WAIT_TIMEOUT_S * 10:
                    raise TransferError("preload_all: loads made no progress")
