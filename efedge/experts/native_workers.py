"""Transfer workers that never take the GIL: native threads running a numba loop.

Why: a Python transfer worker holds the GIL for ~75 µs of bookkeeping around every copy
on the test VM (taking the job, the meter, publishing it READY), and the compute thread
— whose layers are Python between kernels — waits for that time: measured on the demo
model at a 50% cache, ~90 µs of the compute thread's time per copy
(docs/scheduler.md §6). These threads are started with `pthread_create` on a numba
`cfunc`, take jobs from a table in shared memory and read each expert with the same
O_DIRECT kernel as the Python workers (file_read.py); the compute thread sees a copy
land through the landing time the kernel writes, as before.

The job table: one int64 row per job (the F_* columns). A row goes FREE → QUEUED (the
compute thread, which fills it) → RUNNING (a worker, or the compute thread taking a
queued demand load itself, by compare-and-swap: one of them wins) → DONE / FAILED (the
worker) → FREE (the compute thread, once it has read the result); a QUEUED row can also
be CANCELLED by compare-and-swap. A worker takes the queued row with the lowest
(priority, sequence), so demand loads go first as in the Python queue. Sleeping and
waking are futexes on two 32-bit words: GEN, bumped by the compute thread for every
batch of new jobs, and DONE, bumped by a worker for every finished one.

Linux only (futex, pthread, O_DIRECT); `available()` says whether this process can.
"""

from __future__ import annotations

import atexit
import ctypes
import sys
import threading
import weakref

import numpy as np
from numba import carray, cfunc, njit, types

from efedge.experts import aio_read, file_read
from efedge.experts.meter import M_LAST_END, meter_copy, meter_read
from efedge.kernels.atomics import add32 as _add32
from efedge.kernels.atomics import as_ptr as _ptr
from efedge.kernels.atomics import cas as _cas
from efedge.kernels.atomics import load as _load
from efedge.kernels.atomics import store as _store

FREE, QUEUED, RUNNING, DONE, FAILED, CANCELLED = 0, 1, 2, 3, 4, 5
# the columns of a job row. F_MODE: DIRECT (O_DIRECT reads of the drive) or LINK (reads
# from the page cache through an emulated link of F_DUR ns per copy: booked as the worker
# takes the row — from F_BEGIN on, no earlier than it was queued, F_QT —, landed — F_T2 —
# when the link would have delivered it)
# F_GEN: the load of its slot the row is for (ExpertCache.slot_gen; the compute thread's
# bookkeeping, reap_rows, marks the slot READY only if it is still on that load)
(F_STATE, F_PRIO, F_SEQ, F_SLOT, F_FD0, F_FD1, F_FD2, F_DST0, F_DST1, F_DST2, F_OFF0,
 F_OFF1, F_OFF2, F_N0, F_N1, F_N2, F_RC, F_T0, F_T1, F_MODE, F_DUR, F_T2,
 F_BEGIN, F_QT, F_GEN) = range(25)
N_FIELDS = 25
DIRECT, LINK = 0, 1
# the control words (int32): STOP and PAUSE are read by the workers; GEN and DONE are the
# futex words; SLEEP counts the workers waiting on GEN (a publish with none asleep makes
# no system call); HELPER: a predictor thread (predictor_thread.py) spinning on another
# core watches GEN and does the waking instead (a futex wake costs the compute thread
# 11–42 µs on a VM)
C_STOP, C_PAUSE, C_GEN, C_DONE, C_SLEEP, C_HELPER = 0, 1, 2, 3, 4, 5
# how long a worker sleeps at most without being woken (a lost wake-up would cost this,
# not a hang)
_NAP_NS = 10_000_000
# a copy through the emulated link is taken this long (plus the measured oversleep)
# before the link comes free, not earlier: see _worker
_TAKE_LEAD_NS = 5_000
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}
_FUTEX_WAIT, _FUTEX_WAKE = 128, 129  # FUTEX_*_PRIVATE: no other process shares the words
_CTX = 10  # the int64 words of a worker's context
_PR_SET_TIMERSLACK = 29
_PAGE = 4096  # (the buffered read kernel's page, for advice it is not given)


def _machine() -> str:
    import platform

    return platform.machine().lower()


def _libc_ready() -> bool:
    if not (sys.platform.startswith("linux") and file_read.available()
            and file_read._read_parts_direct is not None and _machine() in _SYS_FUTEX):
        return False
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):
        return False
    return all(hasattr(libc, f) for f in ("syscall", "pthread_create", "pthread_join",
                                          "clock_gettime"))


_AVAILABLE = _libc_ready()


def available() -> bool:
    """Whether native transfer workers can run in this process (Linux with futexes,
    pthreads and file_read's direct-read kernel)."""
    return _AVAILABLE and sys.platform.startswith("linux") and file_read.available()


if _AVAILABLE:
    _syscall = types.ExternalFunction("syscall", types.int64(
        types.int64, types.int64, types.int64, types.int64, types.int64, types.int64,
        types.int64))
    _clock_gettime = types.ExternalFunction("clock_gettime",
                                            types.intc(types.intc, types.voidptr))
    # int clock_nanosleep(clockid_t, int flags, const timespec *, timespec *)
    _clock_nanosleep = types.ExternalFunction("clock_nanosleep", types.intc(
        types.intc, types.intc, types.voidptr, types.voidptr))
    _prctl = types.ExternalFunction("prctl", types.intc(
        types.intc, types.uint64, types.uint64, types.uint64, types.uint64))
    _NR_FUTEX = _SYS_FUTEX[_machine()]

    @njit(nogil=True, cache=True, fastmath=False)
    def _now_ns(ts):
        _clock_gettime(1, ts.ctypes.data)  # CLOCK_MONOTONIC, time.perf_counter's clock
        return ts[0] * 1_000_000_000 + ts[1]

    @njit(nogil=True, cache=True, fastmath=False)
    def _read_parts_by_mode(mode, fd, g, u, d, offs, ns, bounce, land, slot, until):
        """Parts ns of an expert read into g / u / d by the row's mode: DIRECT with
        O_DIRECT through the bounce buffer, LINK through the page cache (an emulated link's
        copies: the bytes stay cached, as the Python workers leave them)."""
        if mode == LINK:
            return file_read._read_parts(np.intc(fd), g, u, d, offs, ns, _PAGE, np.intc(-1),
                                         land, slot, until)
        return file_read._read_parts_direct(np.intc(fd), g, u, d, offs, ns, bounce,
                                            file_read.DIRECT_ALIGN, land, slot, until)

    @njit(nogil=True, cache=True, fastmath=False)
    def _row_parts(row):
        """The row's slot parts (gate, up, down) as byte arrays of the row's sizes."""
        return (carray(_ptr(row[F_DST0]), (row[F_N0],), np.uint8),
                carray(_ptr(row[F_DST1]), (row[F_N1],), np.uint8),
                carray(_ptr(row[F_DST2]), (row[F_N2],), np.uint8))

    @njit(nogil=True, cache=True, fastmath=False)
    def _read_row(row, bounce, land, until):
        """The row's expert read into its slot's parts; land[slot] = until once all is in
        (0, or the kernel's failure)."""
        g, u, d = _row_parts(row)
        return _read_expert_parts(row[F_MODE], row[F_FD0:F_FD0 + 3], g, u, d,
                                  row[F_OFF0:F_OFF0 + 3], row[F_N0:F_N0 + 3], bounce, land,
                                  row[F_SLOT], until)

    if aio_read.read_parts is not None:
        _aio_parts = aio_read.read_parts
    else:  # (no native AIO here: every direct read part by part)
        @njit(nogil=True, cache=True, fastmath=False)
        def _aio_parts(state, work, fds, gate, up, down, offsets, nbytes, bounce, align,
                       land, slot, until):
            return aio_read.NOT_HERE

    @njit(nogil=True, cache=True, fastmath=False)
    def _read_row_direct(row, bounce, land, aio, work):
        """A DIRECT row's expert: its three parts' reads in flight together where the
        worker has an AIO context (aio_read), else — or where that declines — part by
        part (_read_row)."""
        if aio[aio_read.CTX] != 0:
            g, u, d = _row_parts(row)
            rc = _aio_parts(aio, work, row[F_FD0:F_FD0 + 3], g, u, d, row[F_OFF0:F_OFF0 + 3],
                            row[F_N0:F_N0 + 3], bounce, file_read.DIRECT_ALIGN, land,
                            row[F_SLOT], 0.0)
            if rc != aio_read.NOT_HERE:
                return rc
        return _read_row(row, bounce, land, 0.0)

    @njit(nogil=True, cache=True, fastmath=False)
    def _read_expert_parts(mode, fds, g, u, d, offs, ns, bounce, land, slot, until):
        """An expert's three parts (ns bytes at offs, descriptors fds) read into g / u / d
        by `mode` (_read_parts_by_mode), land[slot] = until once all are in: in one read
        call where one file holds them, else each from its own shard. 0, or the read
        kernel's failure."""
        if fds[0] == fds[1] == fds[2]:
            return _read_parts_by_mode(mode, fds[0], g, u, d, offs, ns, bounce, land, slot,
                                       until)
        only = np.zeros(3, np.int64)  # a split file: each part from its own shard
        for i in range(3):
            only[:] = 0
            only[i] = ns[i]
            rc = _read_parts_by_mode(mode, fds[i], g, u, d, offs, only, bounce, land,
                                     slot if i == 2 else -1, until)
            if rc != 0:
                return rc
        return 0

    @njit(nogil=True, cache=True, fastmath=False)
    def book_link(lnk, now, dur):
        """Book the emulated link for a copy of dur ns starting at `now` (ns, CLOCK_MONOTONIC):
        it begins when the link is free, and lnk[0] — the end of the last booking — moves to
        its end, which is returned. By compare-and-swap: the native workers and the compute
        thread (TransferEngine.copy_inline) book the same link."""
        while True:
            cur = _load(lnk, 0)
            end = max(now, cur) + dur
            if _cas(lnk, 0, cur, end) == cur:
                return end

    @njit(nogil=True, cache=True, fastmath=False)
    def copy_inline_now(lnk, meter, slot_dst, layer_fds, slot_class, layer_class, offsets,
                        nbytes, layer, expert, slot, land, gen, now, busy):
        """A copy the compute thread makes itself through the emulated link
        (NativeTransferEngine.copy_inline) in one call: the slot's load begun (land[slot]
        = inf, gen[slot] += 1, as ExpertCache.begin_load), the link booked for `busy`
        seconds from `now` (ns) — book_link, as NativeWorkers.book books it —, the
        expert's parts read from the page cache into the slot (its parts' addresses:
        slot_dst [S, 3]), land[slot] = the landing time (s) once all is in, and the meter
        fed (meter_copy). Returns the bytes read; -100, with nothing done, where the slot
        is not of the layer's size class (the descriptors were checked against the
        class's slots, NativeTransferEngine._descriptors) or an index is out of range;
        else the read kernel's failure (< 0: the load begun and the link booked)."""
        if not (0 <= layer < layer_fds.shape[0] and layer < layer_class.shape[0]
                and 0 <= expert < nbytes.shape[1] and 0 <= slot < slot_dst.shape[0]
                and slot < land.shape[0] and slot < gen.shape[0]
                and slot < slot_class.shape[0] and layer_class[layer] >= 0
                and slot_class[slot] == layer_class[layer]):
            return -100
        land[slot] = np.inf
        gen[slot] += 1
        ns = nbytes[layer, expert]
        until = book_link(lnk, now, np.int64(busy * 1e9)) * 1e-9
        g = carray(_ptr(slot_dst[slot, 0]), (ns[0],), np.uint8)
        u = carray(_ptr(slot_dst[slot, 1]), (ns[1],), np.uint8)
        d = carray(_ptr(slot_dst[slot, 2]), (ns[2],), np.uint8)
        # (through the page cache: a LINK read uses no bounce buffer)
        rc = _read_expert_parts(LINK, layer_fds[layer], g, u, d, offsets[layer, expert], ns,
                                np.empty(0, np.uint8), land, slot, until)
        if rc != 0:
            return rc
        total = ns[0] + ns[1] + ns[2]
        meter_copy(meter, float(total), busy)
        return total

    @njit(nogil=True, cache=True, fastmath=False)
    def _sleep_until(ns):
        """Sleep until CLOCK_MONOTONIC reads ns (again after an interruption)."""
        ts = np.array([ns // 1_000_000_000, ns % 1_000_000_000], np.int64)
        while _clock_nanosleep(1, 1, ts.ctypes.data, 0) != 0:  # TIMER_ABSTIME
            pass

    @njit(nogil=True, cache=True, fastmath=False)
    def _worker(ctx):
        """A worker's loop: ctx = (table address, rows, control address, landing table
        address, its length, bounce buffer address, its length, the link word's address,
        its AIO words' address — aio_read: context, counts — and its AIO scratch's)."""
        # a link's landings end on time: Linux lets a normal thread's timers run 50 µs late
        _prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)
        jobs = carray(_ptr(ctx[0]), (ctx[1], N_FIELDS), np.int64)
        lnk = carray(_ptr(ctx[7]), (2,), np.int64)
        ctl = carray(_ptr(ctx[2]), (8,), np.int32)
        land = carray(_ptr(ctx[3]), (ctx[4],), np.float64)
        bounce = carray(_ptr(ctx[5]), (ctx[6],), np.uint8)
        aio = carray(_ptr(ctx[8]), (aio_read.STATE_WORDS,), np.int64)
        work = carray(_ptr(ctx[9]), (aio_read.SCRATCH_WORDS,), np.int64)
        ts = np.zeros(2, np.int64)
        nap = np.array([0, _NAP_NS], np.int64)  # a timespec
        n = ctx[1]
        while _load(ctl, C_STOP) == 0:
            gen = _load(ctl, C_GEN)
            best, bp, bs = -1, 0, 0
            if _load(ctl, C_PAUSE) == 0:
                for j in range(n):
                    if _load(jobs[j], F_STATE) == QUEUED:
                        p, s = jobs[j, F_PRIO], jobs[j, F_SEQ]
                        if best < 0 or p < bp or (p == bp and s < bs):
                            best, bp, bs = j, p, s
            if best < 0:  # nothing queued: sleep until GEN moves (at once if it has)
                _add32(ctl, C_SLEEP, 1)
                _syscall(_NR_FUTEX, ctx[2] + 4 * C_GEN, _FUTEX_WAIT, gen, nap.ctypes.data,
                         0, 0)
                _add32(ctl, C_SLEEP, -1)
                continue
            row = jobs[best]
            if row[F_MODE] == LINK:
                # a copy engine chooses its next copy when the link comes free: taken now,
                # a prefetch would be booked behind the copies on the wire and hold its
                # place there against a demand load queued (or promoted) meanwhile
                wake = _load(lnk, 0) - _load(lnk, 1) - _TAKE_LEAD_NS
                now = _now_ns(ts)
                if wake > now:
                    _sleep_until(min(wake, now + _NAP_NS))
                    continue
            if _cas(row, F_STATE, QUEUED, RUNNING) != QUEUED:
                continue  # another worker, or the compute thread, took it
            row[F_T0] = t0 = _now_ns(ts)
            if row[F_MODE] == LINK:
                # a copy engine starts a queued copy as soon as the link is free: from
                # when it was queued, not when this thread got to it (waking a worker
                # takes tens of µs on a busy 2-core machine: the emulation's time, not
                # the link's)
                until = book_link(lnk, min(t0, row[F_QT]), row[F_DUR])
                row[F_BEGIN] = until - row[F_DUR]
                rc = _read_row(row, bounce, land, until * 1e-9)
                row[F_T1] = _now_ns(ts)
                if rc == 0:  # held as the link would hold the copy, waking early by
                    # the measured oversleep (lnk[1], an EWMA): the copy ends at `until`
                    # on average, and the next one is booked then, not a timer's slack later
                    wake = until - _load(lnk, 1)
                    _sleep_until(wake)
                    late = min(max(_now_ns(ts) - wake, 0), 1_000_000)
                    est = _load(lnk, 1)  # (the other worker may have moved it meanwhile)
                    _store(lnk, 1, est + (late - est) // 10)
            else:
                rc = _read_row_direct(row, bounce, land, aio, work)
                row[F_T1] = _now_ns(ts)
            row[F_RC] = rc
            row[F_T2] = _now_ns(ts)
            _store(row, F_STATE, DONE if rc == 0 else FAILED)
            _add32(ctl, C_DONE, 1)
            _syscall(_NR_FUTEX, ctx[2] + 4 * C_DONE, _FUTEX_WAKE, 2147483647, 0, 0, 0)
        return 0

    @cfunc(types.voidptr(types.voidptr), nogil=True, cache=True)
    def _thread_main(arg):
        _worker(carray(arg, (_CTX,), np.int64))
        return arg

    @njit(nogil=True, cache=True, fastmath=False)
    def _fill_row(row, fds, dst, offs, ns, prio, seq, slot, mode, dur, gen, now):
        """Fill a row (part i: descriptor fds[i], destination address dst[i], file offset
        offs[i], ns[i] bytes; mode DIRECT or LINK, dur: the link's ns for it, gen: the
        slot's load it is for, now: its queue time) and make it QUEUED, last."""
        row[F_MODE] = mode
        row[F_DUR] = dur
        for i in range(3):
            row[F_FD0 + i] = fds[i]
            row[F_DST0 + i] = dst[i]
            row[F_OFF0 + i] = offs[i]
            row[F_N0 + i] = ns[i]
        row[F_PRIO] = prio
        row[F_SEQ] = seq
        row[F_SLOT] = slot
        row[F_GEN] = gen
        row[F_RC] = 0
        row[F_QT] = now
        _store(row, F_STATE, QUEUED)

    @njit(nogil=True, cache=True, fastmath=False)
    def _queue_row(jobs, r, fds, dst, offs, ns, prio, seq, slot, mode, dur, gen):
        """_fill_row for row r, stamped now."""
        _fill_row(jobs[r], fds, dst, offs, ns, prio, seq, slot, mode, dur, gen,
                  _now_ns(np.zeros(2, np.int64)))

    @njit(nogil=True, cache=True, fastmath=False)
    def _queue_rows(jobs, rows, layers, experts, slots, prios, seqs, gens, layer_fds,
                    slot_dst, offsets, nbytes, mode, latency_s, bytes_per_s):
        """_queue_row for each of a plan's copies in one call (copy i: expert experts[i] of
        layer layers[i] into slot slots[i], row rows[i]): its parts from the layer's
        descriptors, the slot's part addresses and the store's offsets and sizes; with an
        emulated link (bytes_per_s > 0) held latency + bytes / rate (ns, as
        NativeTransferEngine._queue_job rounds it). The stores' checks are the caller's:
        every index here comes from the cache's own tables."""
        now = _now_ns(np.zeros(2, np.int64))
        for i in range(rows.shape[0]):
            m, e, s = layers[i], experts[i], slots[i]
            dur = 0
            if bytes_per_s > 0.0:
                total = nbytes[m, e, 0] + nbytes[m, e, 1] + nbytes[m, e, 2]
                dur = np.int64(1e9 * (latency_s + total / bytes_per_s))
            _fill_row(jobs[rows[i]], layer_fds[m], slot_dst[s], offsets[m, e], nbytes[m, e],
                      prios[i], seqs[i], s, mode, dur, gens[i], now)

    @njit(nogil=True, cache=True, fastmath=False)
    def _publish(ctl, direct):
        """GEN += 1 (a full barrier), then, if a worker sleeps on it, wake one: the system
        call from the kernel, not through ctypes (~0.5 µs of the compute thread's time
        instead of ~2 warm, more cold after the layer kernels). Returns whether it woke."""
        _add32(ctl, C_GEN, 1)
        if not direct and _load(ctl, C_HELPER) != 0:  # it sees GEN move, wakes a worker
            return False
        if _load(ctl, C_SLEEP) > 0:
            _syscall(_NR_FUTEX, ctl.ctypes.data + 4 * C_GEN, _FUTEX_WAKE, 1, 0, 0, 0)
            return True
        return False

    @njit(nogil=True, cache=True, fastmath=False)
    def _claim(jobs, j, old, new):
        return _cas(jobs[j], F_STATE, old, new) == old


@njit(cache=True, fastmath=False)
def reap_rows(jobs, rows, slot_gen, slot_state, ready, meter, link):
    """The compute thread's bookkeeping of the finished ones among `rows` (cache lock
    held), oldest read first: a DONE row's slot is made `ready` if it is still on the
    row's load and the engine's meter (efedge/experts/meter.py) moves by its read and its
    copy — the link's time for it: from its booked start to its landing with an emulated
    `link`, else the drive's busy time since this read's start or the last completion
    (meter[M_LAST_END]). Returns the finished rows in that order and the bytes of the
    DONE ones; the caller frees the rows and handles FAILED ones."""
    done = np.empty(rows.shape[0], np.int64)
    t1 = np.empty(rows.shape[0], np.int64)
    k = 0
    for r in rows:
        s = _load(jobs[r], F_STATE)
        if s == DONE or s == FAILED:
            done[k] = r
            t1[k] = jobs[r, F_T1]
            k += 1
    done = done[:k][np.argsort(t1[:k], kind="mergesort")]
    loaded = 0
    for r in done:
        row = jobs[r]
        if row[F_STATE] != DONE:
            continue
        nbytes = row[F_N0] + row[F_N1] + row[F_N2]
        slot = row[F_SLOT]
        if slot_gen[slot] == row[F_GEN]:
            slot_state[slot] = ready
        loaded += nbytes
        meter_read(meter, (row[F_T1] - row[F_T0]) * 1e-9)
        t2 = row[F_T2]
        if link:
            busy = max(1, t2 - row[F_BEGIN]) * 1e-9
        else:
            busy = max(1, t2 - max(row[F_T0], np.int64(meter[M_LAST_END]))) * 1e-9
        meter[M_LAST_END] = max(meter[M_LAST_END], float(t2))
        meter_copy(meter, float(nbytes), busy)
    return done, loaded


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """Join every pool's threads before the interpreter frees the memory they write."""
    for pool in list(_LIVE):
        pool.close()


class NativeWorkers:
    """`n` native threads reading the rows of a job table of `rows` rows into slots, and
    writing `land[slot] = 0` (landed) once an expert is in."""

    def __init__(self, n: int, rows: int, land: np.ndarray, bounce_bytes: int,
                 aio: bool = False):
        """`aio`: each worker reads a DIRECT row's three parts at once where the kernel
        gives it an AIO context (aio_read), its bounce buffer three times as long (no
        longer than file_read.DIRECT_CHUNK where that is more than bounce_bytes)."""
        if not _AVAILABLE:
            raise RuntimeError("native transfer workers need Linux (futex, pthreads)")
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self._libc.pthread_create.argtypes = [ctypes.POINTER(ctypes.c_ulong), ctypes.c_void_p,
                                              ctypes.c_void_p, ctypes.c_void_p]
        self._libc.pthread_join.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
        self.jobs = np.zeros((rows, N_FIELDS), np.int64)
        self.ctl = np.zeros(8, np.int32)
        # an emulated link: the end of its last booking, and how late the workers' sleeps
        # end (ns, EWMA)
        self.link_word = np.zeros(2, np.int64)
        self.land = land  # (kept alive with the pool: the threads write into it)
        # per worker: its AIO words (context, reads, declined) and scratch (aio_read)
        self._aio = [np.zeros(aio_read.STATE_WORDS, np.int64) for _ in range(n)]
        self._aio_work = [aio_read.scratch() for _ in range(n)]
        if aio:
            for state in self._aio:
                aio_read.setup(state)
        # with a context, room for each part's read at once (aio_read.bounce_bytes)
        wide = aio_read.bounce_bytes(bounce_bytes)
        self._bounces = [file_read.aligned_buffer(wide if a[aio_read.CTX] else bounce_bytes)
                         for a in self._aio]
        self._ctx = [np.array([self.jobs.ctypes.data, rows, self.ctl.ctypes.data,
                               land.ctypes.data, land.shape[0], b.ctypes.data, b.shape[0],
                               self.link_word.ctypes.data, a.ctypes.data, w.ctypes.data],
                              np.int64)
                     for b, a, w in zip(self._bounces, self._aio, self._aio_work, strict=True)]
        self.free = list(range(rows - 1, -1, -1))
        self._threads: list[int] = []
        self._lock = threading.Lock()
        for ctx in self._ctx:
            tid = ctypes.c_ulong()
            if self._libc.pthread_create(ctypes.byref(tid), None, _thread_main.address,
                                         ctx.ctypes.data) != 0:
                self.close()
                raise RuntimeError("pthread_create failed for a transfer worker")
            self._threads.append(tid.value)
        _LIVE.add(self)

    @property
    def n_threads(self) -> int:
        return len(self._threads)

    @property
    def aio_reads(self) -> tuple[int, int]:
        """(experts read with their parts at once, direct reads left to the part-by-part
        kernel by a worker with an AIO context), over all workers."""
        return (sum(int(a[aio_read.READS]) for a in self._aio),
                sum(int(a[aio_read.DECLINED]) for a in self._aio))

    @property
    def aio_contexts(self) -> int:
        """Workers with an AIO context."""
        return sum(1 for a in self._aio if a[aio_read.CTX])

    def _futex(self, word: int, op: int, val: int, timeout=None) -> None:
        # every argument a full register's worth: syscall() is variadic (ctypes would pass
        # a bare int as a C int)
        self._libc.syscall(ctypes.c_long(_NR_FUTEX),
                           ctypes.c_void_p(self.ctl.ctypes.data + 4 * word), ctypes.c_long(op),
                           ctypes.c_long(int(val)), timeout, None, None)

    def queue(self, row: int, fds, dst, offs, ns, prio: int, seq: int, slot: int,
              mode: int = DIRECT, dur: int = 0, gen: int = 0) -> None:
        """Fill a free row and make it QUEUED (publish() then wakes a worker): read
        directly (DIRECT), or through the page cache and an emulated link that holds the
        copy dur ns (LINK); `gen`: the slot's load it is for."""
        _queue_row(self.jobs, row, fds, dst, offs, ns, prio, seq, slot, mode, dur, gen)

    def queue_many(self, rows, layers, experts, slots, prios, seqs, gens, layer_fds,
                   slot_dst, offsets, nbytes, mode: int, latency_s: float,
                   bytes_per_s: float) -> None:
        """queue() for several rows in one kernel call (int64 arrays; the parts of each
        copy from the tables, as _queue_rows reads them)."""
        _queue_rows(self.jobs, rows, layers, experts, slots, prios, seqs, gens, layer_fds,
                    slot_dst, offsets, nbytes, mode, latency_s, bytes_per_s)

    def book(self, now_s: float, dur_s: float) -> float:
        """Book the workers' emulated link for a copy of dur_s seconds from now_s (both
        on time.perf_counter's clock); returns when it lands."""
        return book_link(self.link_word, int(now_s * 1e9), int(dur_s * 1e9)) * 1e-9

    def publish(self, direct: bool = False) -> bool:
        """(one producer) Rows made QUEUED since the last call are there: wake a worker if
        one sleeps (a busy one finds them when it looks again); whether one was woken.
        A spinning predictor thread (C_HELPER) does the waking instead unless `direct`."""
        return bool(_publish(self.ctl, direct))

    def pause(self, paused: bool) -> None:
        """Hold the workers off the table (tests: to queue several rows at once)."""
        self.ctl[C_PAUSE] = 1 if paused else 0
        if not paused:
            self.ctl[C_GEN] += 1
            self._futex(C_GEN, _FUTEX_WAKE, 1 << 30)

    def claim(self, row: int, old: int, new: int) -> bool:
        """Move the row from state old to new if no thread moved it first."""
        return bool(_claim(self.jobs, row, old, new))

    def done_mark(self) -> int:
        return int(self.ctl[C_DONE])

    def wait_done(self, mark: int, timeout: float) -> None:
        """Sleep (GIL released) until a job finishes after done_mark() said `mark`, or
        `timeout` seconds pass."""
        t = max(0.0, float(timeout))
        ts = (ctypes.c_long * 2)(int(t), int((t - int(t)) * 1e9))
        self._futex(C_DONE, _FUTEX_WAIT, mark, ts)

    def close(self) -> None:
        """Stop the threads and join them (a read under way ends first)."""
        with self._lock:
            if self._threads:
                self.ctl[C_STOP] = 1
                self.ctl[C_GEN] += 1
                self._futex(C_GEN, _FUTEX_WAKE, 1 << 30)
                for t in self._threads:
                    self._libc.pthread_join(t, None)
                self._threads = []
            for state in self._aio:  # (their reads ended with their threads)
                aio_read.destroy(state)
        _LIVE.discard(self)
