"""One expert's three parts read from the model file in one call that holds no GIL.

A transfer worker used to read gate, up and down with three `os.preadv` and three
`posix_fadvise` calls: six times it gave the GIL up and took it back, and each time
it took it back while the compute thread was inside a kernel, the compute thread then
waited, on its way out of that kernel, for the worker's next bit of Python. Measured on
the demo model (2 cores, 50% cache): the compute thread lost ~40 µs per layer that way.
Here the reads and the page-cache hints are libc calls made from one numba kernel
(`nogil`), so a copy costs the compute thread two short GIL hand-overs, not seven.

Linux and other POSIX systems with `pread` and `posix_fadvise`; elsewhere (macOS has
no `posix_fadvise`, Windows neither call) `available()` is False, the kernel is not even
compiled, and the engine keeps its Python reads.

On Linux a second kernel reads with O_DIRECT (`direct_open`, `read_expert_direct`):
around the page cache, so there is nothing to drop afterwards. Dropping left the folios
an expert shares with its neighbours behind (the engine swept the whole file now and
then for them), and each drop can make Linux drain every CPU's page lists, interrupting
the compute thread's core. Paired on the test VM, reading the drive, direct against
dropped reads: tok/s 1.03–1.11× at a 25% cache (two runs, one in each order) and
1.01–1.06× at 50% (four runs), on-demand and expertflow alike; stall mostly lower
(0.55–1.05× at 25%; 0.85–1.05× for on-demand and 0.88–1.55× for expertflow at 50%);
the compute thread's CPU time 0.93–0.99× (docs/scheduler.md §6).
"""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np
from numba import njit, types

from efedge.errors import EfedgeError
from efedge.kernels.atomics import store

POSIX_FADV_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", 4)


def _libc_has_them() -> bool:
    """64-bit POSIX with pread and posix_fadvise in the process (libc): the kernel calls
    them by name, so a missing symbol would fail its compilation."""
    if os.name != "posix" or not hasattr(os, "posix_fadvise") or sys.maxsize < 2**63 - 1:
        return False
    try:
        libc = ctypes.CDLL(None)
        return hasattr(libc, "pread") and hasattr(libc, "posix_fadvise")
    except (OSError, TypeError):  # TypeError: Windows' LoadLibrary takes no None
        return False


_AVAILABLE = _libc_has_them()


def available() -> bool:
    return _AVAILABLE


# The kernel calls pread and posix_fadvise by symbol name, and numba links a name it
# cannot find to address 0 without a word: compiled where they are missing (macOS has no
# posix_fadvise, Windows neither), the first call would crash the process. So it is only
# built where `available()` says libc has both.
_read_parts = _read_parts_direct = None
if _AVAILABLE:
    # ssize_t pread(int fd, void *buf, size_t n, off_t offset);
    # int posix_fadvise(int fd, off_t offset, off_t len, int advice);
    _pread = types.ExternalFunction("pread", types.intp(types.intc, types.voidptr,
                                                        types.uintp, types.int64))
    _fadvise = types.ExternalFunction("posix_fadvise", types.intc(types.intc, types.int64,
                                                                  types.int64, types.intc))

    _BYTES = types.Array(types.uint8, 1, "C")
    _I64 = types.Array(types.int64, 1, "C", readonly=True)

    # one signature, compiled at import (from numba's cache after the first run): a buffer
    # of another dtype or layout, or a read-only one, is a TypeError before any byte is
    # written
    _F64 = types.Array(types.float64, 1, "C")
    _SIGNATURE = types.int64(types.intc, _BYTES, _BYTES, _BYTES, _I64, _I64, types.int64,
                             types.intc, _F64, types.int64, types.float64)

    @njit(nogil=True, cache=True, fastmath=False)
    def _part(gate, up, down, i):
        """Part i's buffer: gate, up or down."""
        return gate if i == 0 else (up if i == 1 else down)

    @njit(nogil=True, cache=True, fastmath=False)
    def _misfit(gate, up, down, offsets, nbytes, land, slot):
        """-20 when offsets / nbytes are not three long or the slot lies outside `land`;
        -(10+i) for the first part i that does not fit its buffer, or lies at a negative
        offset; else 0. The reads write through raw pointers: every bound is checked
        before the first of them."""
        if offsets.shape[0] != 3 or nbytes.shape[0] != 3 or slot >= land.shape[0]:
            return -20
        for i in range(3):
            if nbytes[i] < 0 or offsets[i] < 0 or \
                    nbytes[i] > _part(gate, up, down, i).shape[0]:
                return -(10 + i)
        return 0

    @njit(_SIGNATURE, nogil=True, cache=True, fastmath=False)
    def _read_parts(fd, gate, up, down, offsets, nbytes, page, advice, land, slot, until):
        """Read part i (nbytes[i] bytes at file offset offsets[i]) into the start of the i-th
        buffer, then (advice ≥ 0) give the pages it spans that advice; once all are in,
        land[slot] = until (slot < 0: nothing). Returns 0; -(i+1) when part i hit a read
        error or the end of the file; -(10+i) when part i does not fit its buffer, -20 on
        bad shapes or a slot outside `land` (nothing read)."""
        if page < 1:
            return -20
        bad = _misfit(gate, up, down, offsets, nbytes, land, slot)
        if bad:
            return bad
        for i in range(3):
            dst = _part(gate, up, down, i)
            n, off = nbytes[i], offsets[i]
            done = 0
            while done < n:
                got = _pread(fd, dst.ctypes.data + done, n - done, off + done)
                if got <= 0:
                    return -(i + 1)
                done += got
            if advice >= 0:
                lo = off - off % page  # whole pages: those shared with neighbours go too
                _fadvise(fd, lo, off + n - lo + page - 1, advice)
        if slot >= 0:
            store(land, slot, until)  # after every byte: no copy moves past it
        return 0


    # the same, read with O_DIRECT (direct_open): around the page cache, so nothing is
    # left there to drop. A direct read must start at a multiple of the device's block
    # size, ask for whole blocks and land in memory aligned alike; experts lie at any
    # offset in a GGUF, so each part is read in whole blocks into an aligned bounce
    # buffer, a chunk at a time, and copied from there into its slot (one copy of every
    # byte, as a read through the page cache makes too)
    _SIGNATURE_DIRECT = types.int64(types.intc, _BYTES, _BYTES, _BYTES, _I64, _I64,
                                    _BYTES, types.int64, _F64, types.int64, types.float64)

    @njit(_SIGNATURE_DIRECT, nogil=True, cache=True, fastmath=False)
    def _read_parts_direct(fd, gate, up, down, offsets, nbytes, bounce, align, land, slot,
                           until):
        """As _read_parts on a descriptor opened with O_DIRECT: part i through `bounce`
        (its address and length multiples of `align`), a bounce-full at a time. Returns 0;
        -(i+1) when part i's read failed, ended early or came back short of a block
        boundary (the caller reads it another way); -(10+i) when part i does not fit its
        buffer; -20 on bad shapes, a slot outside `land` or a misaligned bounce buffer
        (nothing read)."""
        size = bounce.shape[0]
        if align < 1 or bounce.ctypes.data % align != 0 or size < align or size % align != 0:
            return -20
        bad = _misfit(gate, up, down, offsets, nbytes, land, slot)
        if bad:
            return bad
        for i in range(3):
            dst = _part(gate, up, down, i)
            n, off = nbytes[i], offsets[i]
            if n == 0:
                continue
            pos = off - off % align  # the file position of the next chunk: a block's start
            end = off + n
            written = 0
            while pos < end:
                want = min(size, end - pos)  # bytes needed from pos on (≤ one bounce-full)
                span = (want + align - 1) // align * align
                done = 0
                while done < want:
                    got = _pread(fd, bounce.ctypes.data + done, span - done, pos + done)
                    if got <= 0:
                        return -(i + 1)
                    done += got
                    if done < want and done % align != 0:
                        return -(i + 1)  # short mid-file: the next read would be unaligned
                head = off - pos if pos < off else 0  # bytes before the part (first chunk)
                cnt = want - head
                dst[written:written + cnt] = bounce[head:head + cnt]
                written += cnt
                pos += want
        if slot >= 0:
            store(land, slot, until)  # after every byte: no copy moves past it
        return 0


_NO_LAND = np.zeros(0, dtype=np.float64)


def _landing(land: tuple | None) -> tuple:
    """A read's `land` argument as the kernels take it: (array, slot, time); none: an
    empty table and slot -1."""
    return (_NO_LAND, -1, 0.0) if land is None else land


def _check_slot(rc: int, land: tuple | None) -> None:
    """A kernel's -20 that came from a slot outside the landing table, named."""
    if rc == -20 and land is not None and not 0 <= int(land[1]) < land[0].shape[0]:
        raise ValueError(f"slot {land[1]} is outside the landing table "
                         f"({land[0].shape[0]} slots)")
# O_DIRECT alignment: a multiple of any device's logical block size (512 or 4096 bytes)
DIRECT_ALIGN = 4096
# The largest bounce buffer a thread keeps for direct reads: a part larger than this is
# read a bounce-full at a time (a Mixtral-size expert's gate is ~30 MB; each transfer
# worker keeps its own buffer, outside the cache budget)
DIRECT_CHUNK = 4 << 20


def direct_open(path) -> int | None:
    """A descriptor of `path` that reads around the page cache (Linux O_DIRECT), after
    one aligned read has worked; None where it does not (another system, a file system
    without O_DIRECT such as tmpfs, or the kernel not built): the caller reads through
    the page cache and drops the pages instead."""
    flag = getattr(os, "O_DIRECT", 0)
    if not (_AVAILABLE and _read_parts_direct is not None and flag
            and sys.platform.startswith("linux")):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError:
        return None
    one = np.ones(3, dtype=np.int64)  # the file's first three bytes, read as it will be
    parts = [np.empty(1, dtype=np.uint8) for _ in range(3)]
    if _read_parts_direct(fd, parts[0], parts[1], parts[2], np.arange(3, dtype=np.int64),
                          one, aligned_buffer(DIRECT_ALIGN), DIRECT_ALIGN, _NO_LAND, -1,
                          0.0) != 0:
        os.close(fd)
        return None
    return fd


def aligned_buffer(nbytes: int, align: int = DIRECT_ALIGN) -> np.ndarray:
    """nbytes of uint8 whose first byte's address is a multiple of align (a bounce buffer
    for direct reads)."""
    raw = np.empty(int(nbytes) + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + int(nbytes)]


def read_expert_direct(fd: int, parts, offsets: np.ndarray, nbytes: np.ndarray,
                       bounce: np.ndarray, land: tuple | None = None,
                       align: int = DIRECT_ALIGN) -> bool:
    """read_expert on a descriptor from direct_open, through `bounce` (aligned_buffer,
    whole blocks long: bounce_bytes; a part longer than it is read a bounce-full at a
    time). Nothing reaches the page cache, so there is nothing to drop. False when a read
    failed or came back short: the caller reads again its own way (through the page
    cache), which names any error."""
    if _read_parts_direct is None:
        raise EfedgeError(f"direct reads need pread and Linux's O_DIRECT, which this "
                          f"platform ({sys.platform}) lacks")
    arr, slot, until = _landing(land)
    rc = _read_parts_direct(fd, parts[0], parts[1], parts[2], offsets, nbytes, bounce,
                            int(align), arr, int(slot), float(until))
    return direct_outcome(rc, land, align)


def direct_outcome(rc: int, land: tuple | None, align: int = DIRECT_ALIGN) -> bool:
    """A direct read kernel's answer (this module's, or aio_read's): True read, False a
    read that failed or came back short (the caller reads again its own way); misuse —
    a slot outside the landing table, bad shapes, a part larger than its buffer — a
    ValueError naming it."""
    _check_slot(rc, land)
    if rc == -20:
        raise ValueError(f"a direct read needs 3 offsets and sizes and a bounce buffer "
                         f"whose address and length are multiples of {align} bytes")
    if rc <= -10:
        raise ValueError(f"part {-rc - 10} of an expert read does not fit its buffer")
    return rc == 0


def bounce_bytes(max_part: int, align: int = DIRECT_ALIGN, cap: int = DIRECT_CHUNK) -> int:
    """The bounce buffer for parts of up to max_part bytes: one read each at any offset,
    up to `cap` (larger parts are read in chunks)."""
    whole = (int(max_part) + 2 * align - 1) // align * align
    return max(align, min(whole, cap // align * align))


def read_expert(fd: int, parts, offsets: np.ndarray, nbytes: np.ndarray, page: int,
                drop_pages: bool = True, land: tuple | None = None) -> bool:
    """Read an expert's gate, up and down (file offsets / sizes: int64 [3]) into `parts`,
    three writable contiguous uint8 arrays at least that long; with `drop_pages`, drop the
    file's pages they came from from the page cache (POSIX_FADV_DONTNEED), so that the
    cache budget is the only copy. `land` = (array, slot, time): once every byte is in,
    array[slot] = time, still without the GIL (ExpertCache.slot_land_at). False when a
    read failed or the file ended early: the
    caller reads again its own way, which names the error. A part that does not fit its
    buffer is a ValueError (nothing is read); a buffer of another dtype or layout, or a
    read-only one, a TypeError. Where `available()` is False, an EfedgeError: the caller
    reads in Python (TransferEngine does)."""
    if _read_parts is None:
        raise EfedgeError(f"file_read needs pread and posix_fadvise, which this platform "
                          f"({sys.platform}) lacks: read the file with os reads instead "
                          "(TransferEngine falls back to them by itself)")
    arr, slot, until = _landing(land)
    rc = _read_parts(fd, parts[0], parts[1], parts[2], offsets, nbytes, page,
                     POSIX_FADV_DONTNEED if drop_pages else -1, arr, int(slot), float(until))
    _check_slot(rc, land)
    if rc <= -10:
        raise ValueError("an expert read needs 3 offsets and sizes, and each part a buffer "
                         f"at least as long at a non-negative offset (part {-rc - 10})"
                         if rc > -20 else "an expert read needs 3 offsets and sizes")
    return rc == 0
