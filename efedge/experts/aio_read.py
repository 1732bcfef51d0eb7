"""An expert's three parts read from the drive at once (Linux native AIO with O_DIRECT).

Why: a native transfer worker read gate, up and down one after the other, three
O_DIRECT reads of ~32 KiB each for a demo-model expert. Each read waits for the drive,
and a drive serves several reads at a time: on the test VM's virtual disk one 32 KiB
read took ~90 µs alone and three at once ~160 µs each, so an expert took ~270–300 µs
read part by part and ~185–195 µs with its three parts in flight together (measured,
docs/scheduler.md §6, forty-first session); an NVMe drive, with many queues, overlaps
them further. `read_parts` submits the reads (`io_submit`) and waits for them (`io_getevents`) in
one kernel call without the GIL, three in flight, each through a third of the worker's
bounce buffer (O_DIRECT wants aligned memory, offsets and lengths; an expert lies at any
offset), and copies each into the slot as it lands — the bytes the part-by-part read
gives. A part longer than a third (a Mixtral-size expert's ~30 MB gate) goes a chunk at
a time, the next chunk submitted as soon as a third comes free, the parts in turn.

Each worker thread has its own AIO context (`setup`: io_setup; none where the kernel
refuses one — no AIO, or aio-max-nr used up — and the worker reads part by part). A
submission the kernel refuses, a wait that fails or a bounce buffer too small answers
NOT_HERE: the caller reads the expert part by part, as before. A failed or short read
answers -(i+1) for part i, as file_read's kernels do. `EFEDGE_AIO=0` keeps every worker
on the part-by-part read.
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
# parts up to this long are read at once by default (pays)
SMALL_PART = 128 << 10
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


def pays(max_part: int) -> bool:
    """Whether to read a model's experts this way: where its parts are at most
    SMALL_PART bytes (EFEDGE_AIO=1: any size; 0: none). Small reads wait mostly for the
    drive's latency, which reads in flight together share; a large one mostly streams,
    and on the test VM's disk (~0.9 GB/s a read) a 1 MiB expert's parts in flight together
    took 1140 µs against 1188 one after another, while more reads in flight queued the
    demand loads behind the prefetches (on-demand 0.87–1.00× tok/s, paired)."""
    setting = os.environ.get("EFEDGE_AIO")
    if not available():
        return False
    return setting == "1" or 0 < int(max_part) <= SMALL_PART


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


def bounce_bytes(part_bounce: int) -> int:
    """A thread's bounce buffer for read_parts, from the part-by-part read's
    (file_read.bounce_bytes): three times as long, so that each part's read has a third,
    but no longer than file_read.DIRECT_CHUNK where that is more than part_bounce (larger
    parts go in chunks, three at a time)."""
    return min(3 * part_bounce, max(part_bounce, file_read.DIRECT_CHUNK))


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
    def _reap(state, ev_addr, least, most):
        """Wait for at least `least` of the submitted reads, taking up to `most` events
        (from ev_addr on); how many came. -1 where waiting failed otherwise than by a
        signal: the context is then destroyed — which waits for the reads still under
        way, so none writes into the bounce buffer later — and this thread reads part by
        part from then on."""
        got = 0
        while got < least:
            r = _syscall(_NR_GETEVENTS, state[CTX], 1, most - got,
                         ev_addr + 8 * _EVENT_WORDS * got, 0, 0)  # (no timeout)
            if r > 0:
                got += r
            elif r < 0 and _errno() == _EINTR:
                continue
            else:
                _syscall(_NR_DESTROY, state[CTX], 0, 0, 0, 0, 0)
                state[CTX] = 0
                return -1
        return got

    @njit(nogil=True, cache=True, fastmath=False)
    def read_parts(state, work, fds, gate, up, down, offsets, nbytes, bounce, align, land,
                   slot, until):
        """Parts i (nbytes[i] bytes at offsets[i] of descriptor fds[i], opened with
        O_DIRECT) into gate / up / down, with three reads in flight at a time through
        state's AIO context: the bounce buffer (address and length multiples of `align`)
        in thirds, each third a chunk of one part — a part longer than a third goes in
        several, the next chunk submitted as a third comes free, the parts taken in turn.
        Once all are in, land[slot] = until (slot < 0: nothing). Returns 0; NOT_HERE
        where the caller is to read the expert part by part (no context; a bounce buffer
        too short for three blocks; a submission the kernel refused, or a wait that
        failed — what was read is simply read again); -(i+1) where part i's read failed
        or came back short; -(10+i) / -20 as file_read's kernels (nothing read)."""
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
        ev_addr = np.int64(ev.ctypes.data)
        nxt = np.empty(3, np.int64)  # per part: the file position of its next chunk
        end = np.empty(3, np.int64)
        for i in range(3):
            nxt[i] = offsets[i] - offsets[i] % align  # (a block's start)
            end[i] = offsets[i] + nbytes[i]
            if nbytes[i] == 0:
                nxt[i] = end[i]
        # per third of the bounce buffer: the part and file position of the chunk it
        # holds, and the bytes of it wanted (-1: free)
        t_part = np.full(3, -1, np.int64)
        t_pos = np.zeros(3, np.int64)
        t_want = np.zeros(3, np.int64)
        in_flight = 0
        turn = 0  # the part whose chunk goes next (in turn, so all three start at once)
        failed = 0
        while True:
            k = 0
            for t in range(3):  # every free third gets the next chunk
                if t_part[t] >= 0 or failed:
                    continue
                i = -1
                for j in range(3):
                    c = (turn + j) % 3
                    if nxt[c] < end[c]:
                        i = c
                        break
                if i < 0:
                    break
                turn = (i + 1) % 3
                want = min(third, end[i] - nxt[i])
                iocb[k, :] = 0
                iocb[k, 0] = t  # aio_data: the third, given back in its event
                # aio_lio_opcode (16 bits), aio_reqprio (16), aio_fildes (32): one word
                iocb[k, 2] = _IOCB_CMD_PREAD | (np.int64(fds[i]) << 32)
                iocb[k, 3] = np.int64(bounce.ctypes.data) + t * third  # aio_buf
                iocb[k, 4] = (want + align - 1) // align * align  # aio_nbytes: whole blocks
                iocb[k, 5] = nxt[i]  # aio_offset
                ptrs[k] = np.int64(iocb.ctypes.data) + 8 * _IOCB_WORDS * k
                t_part[t], t_pos[t], t_want[t] = i, nxt[i], want
                nxt[i] += want
                k += 1
            if k:
                sent = _syscall(_NR_SUBMIT, state[CTX], k, np.int64(ptrs.ctypes.data), 0, 0,
                                0)
                if sent < k:  # refused, or in part: let what went end, then part by part
                    in_flight += max(sent, 0)
                    if in_flight:
                        _reap(state, ev_addr, in_flight, in_flight)
                    state[DECLINED] += 1
                    return NOT_HERE
                in_flight += k
            if in_flight == 0:
                break
            # one, to give its third the next chunk; all where nothing is left to submit
            left = nxt[0] < end[0] or nxt[1] < end[1] or nxt[2] < end[2]
            least = 1 if left and not failed else in_flight
            got = _reap(state, ev_addr, least, in_flight)
            if got < 0:
                state[DECLINED] += 1
                return NOT_HERE
            in_flight -= got
            for j in range(got):
                t = ev[j, 0]
                i, pos, want = t_part[t], t_pos[t], t_want[t]
                t_part[t] = -1
                if ev[j, 2] < want:  # (res: bytes read, or -errno)
                    if not failed:
                        failed = i + 1
                    continue
                if failed:
                    continue
                head = offsets[i] - pos if pos < offsets[i] else 0
                cnt = want - head
                at = pos + head - offsets[i]  # where these bytes go in the part
                src = t * third + head
                dst = file_read._part(gate, up, down, i)
                dst[at:at + cnt] = bounce[src:src + cnt]
            if failed and in_flight == 0:
                return -failed
        state[READS] += 1
        if slot >= 0:
            store(land, slot, until)  # after every byte: no copy moves past it
        return 0
