"""An expert's three parts read from the drive at once (Linux native AIO with O_DIRECT).

Why: a native transfer worker read gate, up and down one after the other, three
O_DIRECT reads of ~32 KiB each for a demo-model expert. Each read waits for the drive,
and a drive serves several reads at a time: on the test VM's virtual disk one 32 KiB
read took ~90 µs alone and three at once ~160 µs each, so an expert took ~270–300 µs
read part by part and ~185–195 µs with its three parts in flight together (measured,
docs/scheduler.md §6, forty-first session); an NVMe drive, with many queues, overlaps
them further. `read_parts` submits the three reads (`io_submit`) and waits for the three
(`io_getevents`) in one kernel call without the GIL, each part through its own third of
the worker's bounce buffer (O_DIRECT wants aligned memory, offsets and lengths; an
expert lies at any offset), then copies the parts into the slot — the bytes the
part-by-part read gives.

Each worker thread has its own AIO context (`setup`: io_setup; none where the kernel
refuses one — no AIO, or aio-max-nr used up — and the worker reads part by part). A part
longer than a third of the bounce buffer, a submission the kernel refuses in part, or
any other surprise answers NOT_HERE: the caller reads the expert part by part, as
before. A failed or short read answers -(i+1) for part i, as file_read's kernels do.
`EFEDGE_AIO=0` keeps every worker on the part-by-part read.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

import numpy as np
from numba import carray, njit, types

from efedge.experts import file_read
from efedge.kernels.atomics import store

# io_setup, io_destroy, io_submit, io_getevents (the generic table on aarch64)
_SYSCALLS = {"x86_64": (206, 207, 209, 208), "aarch64": (0, 1, 2, 4)}
_IOCB_CMD_PREAD = 0
_EINTR = 4
# what read_parts answers when it did not read (the caller reads part by part)
NOT_HERE = 1
# a worker's scratch (int64 words): three iocbs of 8 words, their three addresses, three
# io_events of 4 words (data, obj, res, res2)
_IOCB_WORDS, _EVENT_WORDS = 8, 4
SCRATCH_WORDS = 3 * _IOCB_WORDS + 3 + 3 * _EVENT_WORDS
# a worker's AIO word array (int64): its context (0: none), reads made, reads left to
# the part-by-part kernel
CTX, READS, DECLINED = 0, 1, 2
STATE_WORDS = 3


def _machine() -> str:
    return platform.machine().lower()


def _libc_ready() -> bool:
    if not (sys.platform.startswith("linux") and _machine() in _SYSCALLS
            and file_read.available() and file_read._read_parts_direct is not None
            and sys.byteorder == "little"):  # (the iocb words below are little-endian)
        return False
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):
        return False
    return hasattr(libc, "syscall") and hasattr(libc, "__errno_location")


_AVAILABLE = _libc_ready()


def available() -> bool:
    """Whether this process can read with native AIO (Linux on x86-64 or arm64, glibc or
    musl) and EFEDGE_AIO is not 0."""
    return _AVAILABLE and os.environ.get("EFEDGE_AIO") != "0"


def setup(state: np.ndarray, events: int = 8) -> bool:
    """An AIO context for one thread into state[CTX] (int64 [STATE_WORDS], zeroed);
    False, with state[CTX] 0, where the kernel gives none."""
    state[:] = 0
    if not available():
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    word = ctypes.c_ulong(0)
    rc = libc.syscall(ctypes.c_long(_SYSCALLS[_machine()][0]), ctypes.c_long(events),
                      ctypes.byref(word))
    if rc != 0 or word.value == 0:
        return False
    state[CTX] = word.value
    return True


def destroy(state: np.ndarray) -> None:
    """Release state's context (its reads have ended: the thread that made them has)."""
    if _AVAILABLE and int(state[CTX]) != 0:
        libc = ctypes.CDLL(None)
        libc.syscall.restype = ctypes.c_long
        libc.syscall(ctypes.c_long(_SYSCALLS[_machine()][1]),
                     ctypes.c_ulong(int(state[CTX])))
        state[CTX] = 0


def scratch() -> np.ndarray:
    """A thread's scratch words for read_parts."""
    return np.zeros(SCRATCH_WORDS, np.int64)


read_parts = None
if _AVAILABLE:
    _syscall = types.ExternalFunction("syscall", types.int64(
        types.int64, types.int64, types.int64, types.int64, types.int64, types.int64,
        types.int64))
    _errno_location = types.ExternalFunction("__errno_location", types.voidptr())
    _NR_DESTROY, _NR_SUBMIT, _NR_GETEVENTS = _SYSCALLS[_machine()][1:]

    @njit(nogil=True, cache=True, fastmath=False)
    def _errno():
        return carray(_errno_location(), (1,), np.int32)[0]

    @njit(nogil=True, cache=True, fastmath=False)
    def _reap(state, ev_addr, n):
        """Wait for n submitted reads (their events from ev_addr on). False where waiting
        failed otherwise than by a signal: the context is then destroyed — which waits
        for the reads still under way, so none writes into the bounce buffer later — and
        this thread reads part by part from then on."""
        got = 0
        while got < n:
            r = _syscall(_NR_GETEVENTS, state[CTX], n - got, n - got,
                         ev_addr + 8 * _EVENT_WORDS * got, 0, 0)  # (no timeout)
            if r > 0:
                got += r
            elif r < 0 and _errno() == _EINTR:
                continue
            else:
                _syscall(_NR_DESTROY, state[CTX], 0, 0, 0, 0, 0)
                state[CTX] = 0
                return False
        return True

    @njit(nogil=True, cache=True, fastmath=False)
    def read_parts(state, work, fds, gate, up, down, offsets, nbytes, bounce, align, land,
                   slot, until):
        """Parts i (nbytes[i] bytes at offsets[i] of descriptor fds[i], opened with
        O_DIRECT) into gate / up / down, the three reads in flight together through
        state's AIO context, part i through the i-th third of `bounce` (address and
        length multiples of `align`); once all are in, land[slot] = until (slot < 0:
        nothing). Returns 0; NOT_HERE where it read nothing the caller may not read again
        (no context, a part longer than a third of the bounce buffer, a submission
        refused: read part by part); -(i+1) where part i's read failed or came back short;
        -(10+i) / -20 as file_read's kernels (nothing read)."""
        if state[CTX] == 0:
            return NOT_HERE
        third = bounce.shape[0] // 3 // align * align
        if align < 1 or bounce.ctypes.data % align != 0 or third < align or \
                fds.shape[0] != 3 or work.shape[0] < SCRATCH_WORDS:
            state[DECLINED] += 1
            return NOT_HERE
        bad = file_read._misfit(gate, up, down, offsets, nbytes, land, slot)
        if bad:
            return bad
        iocb = work[:3 * _IOCB_WORDS].reshape(3, _IOCB_WORDS)
        ptrs = work[3 * _IOCB_WORDS:3 * _IOCB_WORDS + 3]
        ev = work[3 * _IOCB_WORDS + 3:].reshape(3, _EVENT_WORDS)
        head = np.zeros(3, np.int64)  # bytes before the part in its first block
        k = 0
        for i in range(3):
            n, off = nbytes[i], offsets[i]
            if n == 0:
                continue
            pos = off - off % align
            want = off + n - pos
            span = (want + align - 1) // align * align
            if span > third:
                state[DECLINED] += 1
                return NOT_HERE
            head[i] = off - pos
            iocb[k, :] = 0
            iocb[k, 0] = i  # aio_data: the part, given back in its event
            # aio_lio_opcode (16 bits), aio_reqprio (16), aio_fildes (32): one word
            iocb[k, 2] = _IOCB_CMD_PREAD | (np.int64(fds[i]) << 32)
            iocb[k, 3] = np.int64(bounce.ctypes.data) + i * third  # aio_buf
            iocb[k, 4] = span  # aio_nbytes
            iocb[k, 5] = pos  # aio_offset
            ptrs[k] = np.int64(iocb.ctypes.data) + 8 * _IOCB_WORDS * k
            k += 1
        if k:
            sent = _syscall(_NR_SUBMIT, state[CTX], k, np.int64(ptrs.ctypes.data), 0, 0, 0)
            if sent < k:  # refused, or in part: wait for what went, then part by part
                if sent > 0:
                    _reap(state, np.int64(ev.ctypes.data), sent)
                state[DECLINED] += 1
                return NOT_HERE
            if not _reap(state, np.int64(ev.ctypes.data), k):
                state[DECLINED] += 1
                return NOT_HERE
            for j in range(k):
                i = ev[j, 0]
                if ev[j, 2] < head[i] + nbytes[i]:  # (res: bytes read, or -errno)
                    return -(i + 1)
            for i in range(3):
                n = nbytes[i]
                if n:
                    dst = file_read._part(gate, up, down, i)
                    src = i * third + head[i]
                    dst[:n] = bounce[src:src + n]
        state[READS] += 1
        if slot >= 0:
            store(land, slot, until)  # after every byte: no copy moves past it
        return 0
