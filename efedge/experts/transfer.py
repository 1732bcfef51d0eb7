"""TransferEngine: worker threads that copy experts from the model file into cache slots.

* A priority queue: demand loads (the layer is waiting) overtake prefetches; a queued
  prefetch that became stale can be cancelled.
* Reads go around the page cache (O_DIRECT, where the file system takes it), else use
  pread into the slot, then posix_fadvise(DONTNEED) on the file range, so the page cache
  does not quietly keep every expert beside the slots (the budget is honest); all calls
  of an expert in one numba kernel that holds no GIL (file_read.py). With
  an emulated link the pages stay: the file then stands for the far tier the link leads
  from (host RAM behind PCIe, an NVMe drive), and reads that went to this machine's own
  disk each time would make every link the disk's speed (a virtual disk here read a 96
  KiB expert in ~400 µs: slower than a 720 MB/s link's 137).
* An online meter of the link, not of one request: bytes over the time at least one copy
  was under way (ratio of two EWMAs), and each request's service time (from when the link
  started on it: its own start, or the previous completion if it queued behind one). A
  per-request bytes/duration would count the wait behind the other worker's copy and halve
  the rate whenever both are busy (the simulator reads the link's real rate).
* Link emulation: `link="8GB/s"`, `"pcie4x4"`, `"nvme"` … a shared token bucket makes
  transfers as slow as that link, so laptop-GPU and SSD conditions can be reproduced on
  any machine. A copy books its link time when a worker takes it, so the link carries
  copies in the order they start. Output that depends on it says "emulated".
* Faults: a disk error (OSError) is retried RETRIES times, then the job fails and its
  waiter loads the expert synchronously. A worker that dies of anything else fails the
  job it held the same way and is replaced (`workers_replaced` counts them).
"""

from __future__ import annotations

import heapq
import io
import itertools
import logging
import mmap
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from efedge.errors import EfedgeError, TransferError
from efedge.experts import file_read
from efedge.experts.cache import LOADING, READY, ExpertCache
from efedge.experts.stats import Counters
from efedge.experts.store import ExpertStore, drop_spans

log = logging.getLogger("efedge.transfer")

DEMAND, PREFETCH = 0, 1
# Sustained host→device or disk→RAM rates users see, bytes/s (DESIGN/peers.md sources):
# PCIe payload rates after protocol overhead; NVMe / SATA sequential reads.
NAMED_LINKS = {
    "pcie3x4": (3.2e9, 10e-6), "pcie3x8": (6.5e9, 10e-6), "pcie3x16": (12.5e9, 10e-6),
    "pcie4x4": (6.5e9, 10e-6), "pcie4x8": (13e9, 10e-6), "pcie4x16": (25e9, 10e-6),
    "pcie5x16": (50e9, 10e-6), "thunderbolt": (2.8e9, 20e-6), "usb4": (3.0e9, 20e-6),
    "nvme": (3.5e9, 80e-6), "nvme4": (7.0e9, 60e-6), "sata": (0.5e9, 100e-6),
}
RETRIES = 3
# Transfer workers per engine unless the caller says (efedge.load(transfer_workers=)).
# Through an emulated link the copies share one serial link and more workers only
# contend for the cores (4 were worse on the 2-core test VM). Reading the file itself,
# a miss waits on the drive's latency, and reads overlap in its queue: on that VM (a
# 96 KiB expert in 250-500 µs), 4 workers instead of 2 cut the stall of expertflow to
# 0.3x and of on-demand loading to 0.4-0.75x (2026-11-29, docs/scheduler.md §6).
LINK_WORKERS = 2
FILE_WORKERS = 4
# Reads that drop their pages (no emulated link, and no O_DIRECT on the file system: a
# direct read leaves nothing in the page cache) between two sweeps of every expert page
# of the file. A read's own drop (POSIX_FADV_DONTNEED on the pages it spans) leaves some
# behind: the page cache holds a file in folios larger than a page, and a folio that
# straddles two experts is dropped only by a range that covers all of it. Measured with
# experts 4x the budget, 64 tokens: 23 MB of 192 MB stayed cached with 2 workers, 16-94
# MB with 4 (tests/test_memory_budget.py allows one layer, 48 MB), all of it dropped by
# one fadvise over the experts' spans afterwards.
SWEEP_EVERY = 32
# Failed direct reads (O_DIRECT) after which an engine reads through the page cache only
DIRECT_FAILURES = 8
_PR_SET_TIMERSLACK = 29  # linux/prctl.h
# Windows opens a descriptor in text mode unless told: a read would turn CR LF into LF
# and stop at the first 0x1A byte (Ctrl-Z), silently corrupting experts. 0 elsewhere.
_O_BINARY = getattr(os, "O_BINARY", 0)
_F_NOCACHE = 48  # macOS <sys/fcntl.h>: reads on this descriptor bypass the page cache


_SEEK_LOCK = threading.Lock()


def _preadv_seek(fd: int, buffers: list, offset: int) -> int:
    """os.preadv where the os module has neither preadv nor pread (Windows): seek, then
    read straight into the buffer. The workers share one descriptor (and its file
    position), so the two steps hold a lock; a read is still one system call, into the
    slot, with no copy."""
    with _SEEK_LOCK:
        os.lseek(fd, offset, os.SEEK_SET)
        with io.FileIO(fd, "rb", closefd=False) as f:
            return f.readinto(buffers[0]) or 0


def _preadv_copy(fd: int, buffers: list, offset: int) -> int:
    """os.preadv where only os.pread exists (a Python built without preadv, e.g. one for
    macOS before 11): read, then copy into the buffer."""
    data = os.pread(fd, len(buffers[0]), offset)
    buffers[0][:len(data)] = data
    return len(data)


# the positional read the Python path uses: os.preadv on Linux (into the slot, no copy)
_preadv = getattr(os, "preadv", None) or (_preadv_copy if hasattr(os, "pread")
                                          else _preadv_seek)


def tight_timer_slack() -> None:
    """Let this thread's sleeps end within microseconds of their deadline (Linux lets a
    normal thread's timers run 50 µs late, which made every emulated copy ~75 µs slow).
    Elsewhere, or if it fails, sleeps just stay as they are."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)
    except Exception:  # noqa: BLE001 - best effort. It runs before the worker's own
        # guard: anything escaping here (a libc ctypes cannot open by None raises
        # TypeError, as Windows' LoadLibrary does) killed the worker unreplaced, and every
        # load then waited out the 60 s no-progress limit
        pass


def _no_page_cache(fds: list[int]) -> None:
    """fcntl(F_NOCACHE, 1) on each descriptor (macOS); a failure only costs page cache."""
    try:
        import fcntl
    except ImportError:
        return
    for fd in fds:
        try:
            fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", _F_NOCACHE), 1)
        except OSError as exc:
            log.info("F_NOCACHE refused (%s): expert reads stay in the page cache", exc)


@dataclass(frozen=True)
class Link:
    name: str
    bytes_per_s: float
    latency_s: float = 0.0

    def __str__(self) -> str:
        return f"{self.name} (emulated, {self.bytes_per_s / 1e9:.2f} GB/s)"


def parse_link(spec: str | Link | None) -> Link | None:
    """None, a Link, a name from NAMED_LINKS, or a rate like "8GB/s", "500MB/s"."""
    if spec is None or isinstance(spec, Link):
        return spec
    text = str(spec).strip().lower()
    if text in NAMED_LINKS:
        rate, lat = NAMED_LINKS[text]
        return Link(text, rate, lat)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(k|m|g|ki|mi|gi)?b(?:/s|ps)", text)
    if not m:
        raise EfedgeError(f"unknown link {spec!r}: use a rate like 8GB/s or 500MB/s, or one "
                          f"of {', '.join(NAMED_LINKS)}")
    mult = {None: 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    rate = float(m.group(1)) * mult[m.group(2)]
    if rate <= 0:
        raise EfedgeError(f"link rate must be positive, got {spec!r}")
    return Link(str(spec), rate, 0.0)


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
    error: BaseException | None = field(default=None, compare=False)


def default_workers(link: Link | None) -> int:
    """How many transfer workers an engine gets by default: FILE_WORKERS when the copies
    are reads of the file itself, LINK_WORKERS through an emulated link — and where
    reads cannot overlap (Windows: seek + read under one lock)."""
    if link is None and _preadv is not _preadv_seek:
        return FILE_WORKERS
    return LINK_WORKERS


class TransferEngine:
    """Copies (layer, expert) into its assigned slot on background threads. All queue and
    slot-state changes happen under `cache.cond`."""

    def __init__(self, path: str | os.PathLike, store: ExpertStore, cache: ExpertCache,
                 counters: Counters, link: Link | None = None, workers: int | None = None,
                 read_fn=None, drop_pages: bool | None = None):
        self.store, self.cache, self.counters, self.link = store, cache, counters, link
        # drop each expert's file pages after reading it (default: unless a link is
        # emulated, whose rate the reads must not fall below: the module's docstring)
        self.drop_pages = link is None if drop_pages is None else bool(drop_pages)
        self._sweep_spans = store.expert_spans() if self.drop_pages and hasattr(
            os, "posix_fadvise") else None
        self._drops = 0  # dropping reads since the last sweep (a hint: read unlocked)
        self.cond = cache.cond  # READY and failed loads: the compute thread waits on it
        self.work = threading.Condition(cache.lock)  # queued jobs: the workers wait on it
        # one descriptor per file: a split GGUF's shards (store.paths; store.shard says
        # which holds each layer's part), else the one file
        shards = list(getattr(store, "paths", None) or [])
        paths = shards if len(shards) > 1 else [path]
        self._fds: list[int] = []
        try:
            for p in paths:
                self._fds.append(os.open(p, os.O_RDONLY | _O_BINARY))
        except OSError:
            for fd in self._fds:
                os.close(fd)
            raise
        self._fd = self._fds[0]
        if hasattr(os, "posix_fadvise"):
            # no readahead: it would pull neighbouring experts into the page cache
            for fd in self._fds:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        elif sys.platform == "darwin":
            # macOS has no posix_fadvise: F_NOCACHE keeps what these descriptors read out
            # of the page cache instead (the budget stays what experts occupy; pages the
            # mapping already holds are still served from memory)
            _no_page_cache(self._fds)
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else mmap.PAGESIZE
        self._queue: list[Job] = []
        self._seq = itertools.count()
        self.submitted = 0  # jobs ever queued (the compute thread yields when it grows)
        self._closing = False
        self._link_lock = threading.Lock()
        self._link_free_at = 0.0
        self._oversleep = 0.0  # EWMA of how late a sleep ends: the emulated link wakes early
        self.bandwidth_ewma = 0.0  # bytes/s while the link is busy
        self.latency_ewma = 0.0  # s: one request's service time
        self._in_flight = 0  # copies under way (cond held to change)
        self._busy_mark = 0.0  # when the current busy period began or last completion
        self._ewma_bytes = self._ewma_busy = 0.0
        # how long a worker's read of one expert takes (mean and mean absolute deviation,
        # EWMA): with several reads overlapping in a drive's queue, the link meter above
        # sees completions closer together than any one read takes (measured on the test
        # VM, reading the drive: 250-350 µs between completions, reads of 640 µs median,
        # p90 1 ms), and the look-ahead planned from it left prefetches landing late
        self.read_s_ewma = self.read_dev_ewma = 0.0
        self.jobs_by_key: dict[int, Job] = {}
        self.workers_replaced = 0
        self._read = read_fn or self._pread  # tests inject faults here
        # the whole expert in one GIL-free kernel call where libc allows (file_read.py)
        self._read_whole = file_read.available()
        # Dropping reads go around the page cache where the system allows (O_DIRECT, one
        # descriptor per file): nothing to drop after each read, and no sweeps. A read's
        # own drop (fadvise) left pages shared with neighbours behind, and the sweeps that
        # catch those cost stall (SWEEP_EVERY); on the test VM a direct read of 96 KiB
        # also took 113-123 µs against 133-140 for a buffered read and its drop.
        # (tests that inject read faults read their own way)
        self._direct_fds: list[int] | None = None
        self._direct_off: list[int] | None = None  # (given up on: closed by close())
        self._direct_failures = 0
        if self.drop_pages and read_fn is None:
            self._direct_fds = self._open_direct(paths)
        self._bounce = threading.local()  # each thread's aligned buffer for direct reads
        self._bounce_size = file_read.bounce_bytes(int(store.nbytes.max(initial=0)))
        self.n_workers = max(1, default_workers(link) if workers is None else workers)
        self.inline_copies, self.inline_copy_s = 0, 0.0  # copy_inline's count and time
        self._threads = [self._spawn(i) for i in range(self.n_workers)]

    @staticmethod
    def _open_direct(paths) -> list[int] | None:
        """A direct-read descriptor per file (file_read.direct_open), or None if any file
        cannot have one (then every read goes through the page cache, and is dropped)."""
        fds: list[int] = []
        for p in paths:
            fd = file_read.direct_open(p)
            if fd is None:
                for f in fds:
                    os.close(f)
                return None
            fds.append(fd)
        return fds

    @property
    def reads_direct(self) -> bool:
        """Whether the engine reads experts around the page cache (O_DIRECT)."""
        return self._direct_fds is not None

    def _read_direct(self, fds: list[int], parts, layer: int, expert: int,
                     land: tuple | None) -> bool:
        """One expert read with O_DIRECT (`fds`: the direct descriptors, one per file) into
        `parts`, through this thread's bounce buffer; False when a read came back short or
        failed (the caller then reads through the page cache and drops it)."""
        bounce = getattr(self._bounce, "buf", None)
        if bounce is None:
            bounce = self._bounce.buf = file_read.aligned_buffer(self._bounce_size)
        offsets, nbytes = self.store.offsets[layer, expert], self.store.nbytes[layer, expert]
        shard = self.store.shard[layer] if len(fds) > 1 else (0, 0, 0)
        if shard[0] == shard[1] == shard[2]:
            return file_read.read_expert_direct(fds[int(shard[0])], parts, offsets, nbytes,
                                                bounce, land)
        for ip in range(3):  # a split file's expert across shards: each part from its own
            only = np.zeros(3, dtype=np.int64)
            only[ip] = nbytes[ip]
            if not file_read.read_expert_direct(fds[int(shard[ip])], parts, offsets, only,
                                                bounce, land if ip == 2 else None):
                return False
        return True

    def _direct_failed(self) -> None:
        """A direct read failed (the read through the page cache follows, and names a real
        disk error). A file system that took the probe but fails direct reads would make
        every load read twice: after DIRECT_FAILURES of them, read through the page cache
        for good. (Descriptors stay open until close(): a worker may be using one.)"""
        self._direct_failures += 1  # (workers race here: the count is a hint)
        if self._direct_failures >= DIRECT_FAILURES and self._direct_fds is not None:
            log.info("direct reads of %s failed %d times: reading through the page cache",
                     self.store.paths[0] if getattr(self.store, "paths", None) else "the file",
                     DIRECT_FAILURES)
            self._direct_off = self._direct_fds
            self._direct_fds = None

    def _spawn(self, i: int) -> threading.Thread:
        t = threading.Thread(target=self._worker, args=(i,), name=f"efedge-transfer-{i}",
                             daemon=True)
        t.start()
        return t

    # -- called with cond held ------------------------------------------------------------
    def submit(self, layer: int, expert: int, slot: int, priority: int) -> Job:
        job = Job(priority, next(self._seq), layer, expert, slot,
                  gen=self.cache.begin_load(slot))
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
        for layer, expert, slot, prio, gen in zip(layers, experts, slots, priorities, gens,
                                                  strict=True):
            job = Job(prio, next(seq), layer, expert, slot, gen=gen)
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
            new = Job(DEMAND, next(self._seq), job.layer, job.expert, job.slot, gen=job.gen)
            heapq.heappush(self._queue, new)
            self.jobs_by_key[job.layer * self.store.n_expert + job.expert] = new
            self.work.notify()
            return new
        return job

    def cancel(self, job: Job) -> bool:
        """Drop a queued (not yet started) load and free its slot."""
        if job.started or job.cancelled:
            return False
        job.cancelled = True
        self.cache.release(job.slot)
        self.jobs_by_key.pop(job.layer * self.store.n_expert + job.expert, None)
        return True

    def busy(self) -> bool:
        """Whether any copy is under way (read without the lock: a hint)."""
        return self._in_flight > 0

    def queued(self) -> int:
        return sum(1 for j in self._queue if not j.cancelled)

    # -- workers --------------------------------------------------------------------------
    def _pread(self, buf, offset: int, fd: int | None = None) -> None:
        view = memoryview(buf)
        done = 0
        fd = self._fd if fd is None else fd
        while done < len(view):
            n = _preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"unexpected end of file at byte {offset + done}")
            done += n

    def _kernel_reads(self) -> bool:
        """Whether copies read through file_read's kernel: where libc allows, and unless
        a read function was injected (tests inject faults through `_read`)."""
        return self._read_whole and getattr(self._read, "__func__", None) is \
            TransferEngine._pread

    def _read_expert(self, parts, layer: int, expert: int, drop_pages: bool = True,
                     land: tuple | None = None) -> int:
        """Read the expert's gate, up and down from the file into `parts`; with
        `drop_pages`, drop the file's pages they came from (whole pages, so those an
        expert shares with its neighbours go too); `land` = (array, slot, time): once
        all is in, array[slot] = time (in the GIL-free kernel where it reads). Returns the
        bytes read."""
        nbytes = self.store.nbytes[layer, expert]
        fds = self._fds
        if len(fds) == 1:
            pfd = (fds[0],) * 3
        else:  # a split GGUF: each part from its shard
            shard = self.store.shard[layer]
            pfd = (fds[shard[0]], fds[shard[1]], fds[shard[2]])
        direct = self._direct_fds  # (read once: _direct_failed may drop it meanwhile)
        if drop_pages and direct is not None and self._kernel_reads():
            if self._read_direct(direct, parts, layer, expert, land):
                return int(nbytes.sum())
            self._direct_failed()
        if drop_pages and self._sweep_spans is not None:
            self._drops += 1
            if self._drops >= SWEEP_EVERY:
                self._drops = 0
                self._sweep_pages()
        if pfd[0] == pfd[1] == pfd[2] and self._kernel_reads() and file_read.read_expert(
                pfd[0], parts, self.store.offsets[layer, expert], nbytes, self._page,
                drop_pages=drop_pages, land=land):
            return int(nbytes.sum())
        for ip in range(3):  # in Python where the kernel cannot, or to name its error
            off = int(self.store.offsets[layer, expert, ip])
            n = int(nbytes[ip])
            if pfd[ip] == self._fd:
                self._read(parts[ip][:n], off)  # (tests inject faults here: the first file)
            else:
                self._pread(parts[ip][:n], off, pfd[ip])
            if drop_pages and hasattr(os, "posix_fadvise"):
                lo = off - off % self._page
                os.posix_fadvise(pfd[ip], lo, off + n - lo + self._page - 1,
                                 os.POSIX_FADV_DONTNEED)
        if land is not None:
            land[0][land[1]] = land[2]
        return int(nbytes.sum())

    def _sweep_pages(self) -> None:
        """Drop every expert page of the file from the page cache (SWEEP_EVERY says why):
        one fadvise per routed layer's gate, up and down tensors."""
        for fd, spans in zip(self._fds, self._sweep_spans, strict=True):  # (one per file)
            try:
                drop_spans(fd, spans)
            except OSError:  # a hint: the next sweep tries again
                pass

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

    def _book_link(self, nbytes: int, now: float) -> float:
        """When the emulated link delivers a copy of nbytes that starts now (0: no link).
        Booked as a worker takes the job, so the link carries copies in the order they
        start, as a copy engine does: booked after the read instead, a demand load whose
        worker came back from its read late (no core, or no GIL, on a busy machine) went
        behind prefetches that started after it (measured: 500-900 µs for one 137 µs
        copy while the other worker moved five)."""
        if self.link is None:
            return 0.0
        with self._link_lock:
            begin = max(now, self._link_free_at)
            self._link_free_at = begin + self.link.latency_s + nbytes / self.link.bytes_per_s
            return self._link_free_at

    def _emulate_link(self, nbytes: int, started: float, until: float = 0.0) -> None:
        """Hold the copy until the link would have delivered it: at `until` where it was
        booked at its start, else booked now for a copy that started at `started`."""
        if self.link is None:
            return
        if until <= 0.0:
            until = self._book_link(nbytes, started)
        t0 = time.perf_counter()
        delay = until - t0 - self._oversleep
        if delay > 0:  # the copy ends at `until` on average, not a timer's slack later
            time.sleep(delay)
            late = time.perf_counter() - t0 - delay
            self._oversleep += 0.1 * (min(late, 1e-3) - self._oversleep)

    def _worker(self, i: int) -> None:
        job: Job | None = None
        tight_timer_slack()
        try:
            while True:
                with self.cond:
                    while not self._closing and (not self._queue or
                                                 not self._may_start(self._queue[0])):
                        self.work.wait()
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
                    job.link_until = self._book_link(
                        self.store.expert_bytes(job.layer, job.expert), time.perf_counter())
                self._run(job)
                job = None
        except BaseException as exc:  # a bug, not a disk error: never lose the job
            self._worker_died(i, job, exc)

    def _may_start(self, job: Job) -> bool:
        """(cond held) Whether a worker may take the job at the head of the queue now
        (a subclass may hold some kinds of job back; waiting workers are woken through
        `work`)."""
        return True

    # -- the link meter (cond held) ---------------------------------------------------------
    def _meter_start(self, job: Job) -> None:
        if self._in_flight == 0:
            self._busy_mark = time.perf_counter()
        self._in_flight += 1
        job.metered = True

    def _meter_end(self, job: Job, nbytes: int) -> None:
        """One copy finished (nbytes 0: it failed): the busy time since the last mark
        carried these bytes."""
        if not job.metered:
            return
        job.metered = False
        self._in_flight -= 1
        now = time.perf_counter()
        busy, self._busy_mark = now - self._busy_mark, now
        if nbytes <= 0:
            return
        self._meter_copy(nbytes, busy)

    @property
    def read_tail_s(self) -> float:
        """A slow read of one expert by a worker: the mean read time plus two mean
        deviations (0 before any read). Through an emulated link the reads come from the
        page cache, far below the link's own time."""
        return self.read_s_ewma + 2.0 * self.read_dev_ewma

    def _meter_read(self, seconds: float) -> None:
        """(cond held) One worker read took `seconds`."""
        if self.read_s_ewma == 0.0:
            self.read_s_ewma = seconds
            return
        a = 0.1
        self.read_dev_ewma += a * (abs(seconds - self.read_s_ewma) - self.read_dev_ewma)
        self.read_s_ewma += a * (seconds - self.read_s_ewma)

    def _meter_copy(self, nbytes: int, busy: float) -> None:
        """(cond held) nbytes carried in `busy` seconds of link time."""
        a = 0.2 if self._ewma_busy else 1.0
        self._ewma_bytes += a * (nbytes - self._ewma_bytes)
        self._ewma_busy += a * (busy - self._ewma_busy)
        self.latency_ewma += a * (busy - self.latency_ewma)
        if self._ewma_busy > 0:
            self.bandwidth_ewma = self._ewma_bytes / self._ewma_busy
            self.counters.bandwidth_gbps = self.bandwidth_ewma / 1e9

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
        if self._fd >= 0:
            for fd in self._fds + (self._direct_fds or []) + (self._direct_off or []):
                os.close(fd)
            self._fds = []
            self._direct_fds = self._direct_off = None
            self._fd = -1
