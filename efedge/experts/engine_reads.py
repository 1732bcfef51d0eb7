"""How a transfer engine reads one expert from the model file: its descriptors, reads
around the page cache or through it, and what it does about the pages it read.

* Reads go around the page cache (O_DIRECT, where the file system takes it), else use
  pread into the slot, then posix_fadvise(DONTNEED) on the file range, so the page cache
  does not quietly keep every expert beside the slots (the budget is honest); all calls
  of an expert in one numba kernel that holds no GIL (file_read.py). With an emulated
  link the pages stay: the file then stands for the far tier the link leads from (host
  RAM behind PCIe, an NVMe drive), and reads that went to this machine's own disk each
  time would make every link the disk's speed (a virtual disk here read a 96 KiB expert
  in ~400 µs: slower than a 720 MB/s link's 137).
* A split GGUF has one descriptor per shard; each part of an expert is read from the
  shard that holds it.
* Where the kernel cannot read (no pread / posix_fadvise in libc: macOS, Windows), or to
  name a read's error, the engine reads in Python: os.preadv into the slot, or what the
  os module has instead.

`FileReads` holds this for TransferEngine (efedge/experts/transfer.py).
"""

from __future__ import annotations

import io
import logging
import mmap
import os
import sys
import threading

import numpy as np

from efedge.experts import aio_read, file_read
from efedge.experts.store import drop_spans

log = logging.getLogger("efedge.transfer")

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


def reads_overlap() -> bool:
    """Whether several threads' reads of the file can be under way at once (not where
    each is a seek and a read under one lock: Windows)."""
    return _preadv is not _preadv_seek


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


class FileReads:
    """Reads of whole experts from the model file into slot buffers, for a transfer
    engine with `store` (an ExpertStore)."""

    def _open_files(self, path, drop_pages: bool, read_fn) -> None:
        """Open the file (each shard of a split one) for reading experts. `drop_pages`:
        leave nothing read in the page cache; `read_fn(buf, offset)`: the Python read of
        the first file (tests inject faults here), else _pread."""
        store = self.store
        self.drop_pages = drop_pages
        self._sweep_spans = store.expert_spans() if drop_pages and hasattr(
            os, "posix_fadvise") else None
        self._drops = 0  # dropping reads since the last sweep
        # (counted under a lock: workers counting at once could both reach SWEEP_EVERY and
        # both sweep, or lose a count)
        self._drops_lock = threading.Lock()
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
        if drop_pages and read_fn is None:
            self._direct_fds = _open_direct(paths)
        self._bounce = threading.local()  # each thread's aligned buffer for direct reads
        self._bounce_size = file_read.bounce_bytes(int(store.nbytes.max(initial=0)))
        # each thread's AIO context for direct reads with an expert's parts in flight at
        # once, where they pay (aio_read.pays: small parts); released by close()
        self._aio_pays = aio_read.pays(int(store.nbytes.max(initial=0)))
        self._aio_states: list[np.ndarray] = []
        self._aio_lock = threading.Lock()

    def _close_files(self) -> None:
        with self._aio_lock:  # (no thread reads any more: the workers are joined)
            for state in self._aio_states:
                aio_read.destroy(state)
            self._aio_states = []
        if self._fd >= 0:
            for fd in self._fds + (self._direct_fds or []) + (self._direct_off or []):
                os.close(fd)
            self._fds = []
            self._direct_fds = self._direct_off = None
            self._fd = -1

    @property
    def reads_direct(self) -> bool:
        """Whether the engine reads experts around the page cache (O_DIRECT)."""
        return self._direct_fds is not None

    def _read_direct(self, fds: list[int], parts, layer: int, expert: int,
                     land: tuple | None) -> bool:
        """One expert read with O_DIRECT (`fds`: the direct descriptors, one per file) into
        `parts`, through this thread's bounce buffer — its three parts in flight at once
        through the thread's AIO context where that pays (aio_read.pays) —; False when a
        read came back short or failed (the caller then reads through the page cache and
        drops it)."""
        offsets, nbytes = self.store.offsets[layer, expert], self.store.nbytes[layer, expert]
        shard = self.store.shard[layer] if len(fds) > 1 else (0, 0, 0)
        aio = self._thread_aio() if self._aio_pays else None
        if aio is not None:  # the three parts in flight at once (aio_read)
            state, work, wide = aio
            arr, slot, until = file_read._landing(land)
            rc = aio_read.read_parts(state, work, np.array([fds[int(i)] for i in shard],
                                                           np.intc),
                                     parts[0], parts[1], parts[2], offsets, nbytes, wide,
                                     file_read.DIRECT_ALIGN, arr, int(slot), float(until))
            if rc != aio_read.NOT_HERE:  # (its failures named as read_expert_direct's)
                return file_read.direct_outcome(rc, land)
        bounce = getattr(self._bounce, "buf", None)
        if bounce is None:
            bounce = self._bounce.buf = file_read.aligned_buffer(self._bounce_size)
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

    def _thread_aio(self):
        """(AIO state, scratch, bounce buffer in thirds) of the calling thread, made on
        its first direct read; None where the kernel gives it no context (it reads part by
        part then, and does not ask again)."""
        aio = getattr(self._bounce, "aio", False)
        if aio is False:
            state = np.zeros(aio_read.STATE_WORDS, np.int64)
            aio = None
            if aio_read.setup(state):
                with self._aio_lock:
                    self._aio_states.append(state)
                aio = (state, aio_read.scratch(),
                       file_read.aligned_buffer(aio_read.bounce_bytes(self._bounce_size)))
            self._bounce.aio = aio
        return aio

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
            getattr(self._pread, "__func__", None)

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
            with self._drops_lock:
                self._drops += 1
                sweep = self._drops >= SWEEP_EVERY
                if sweep:
                    self._drops = 0
            if sweep:
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
