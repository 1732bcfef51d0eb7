"""Native transfer workers (efedge/experts/native_workers.py, native_engine.py): the job
table's states and order, reads equal to the file's bytes, exact logits through the
engine, and what happens when its reads fail."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import numpy as np
import pytest

import efedge
from efedge.config import config_from_gguf
from efedge.experts import file_read
from efedge.experts import native_workers as nw
from efedge.experts.store import ExpertStore
from efedge.gguf_file import GGUFFile

pytestmark = pytest.mark.skipif(not nw.available(),
                                reason="native workers need Linux (futex, pthreads)")


@pytest.fixture(autouse=True)
def native(monkeypatch):
    """Native workers, whatever the environment says (EFEDGE_NATIVE_WORKERS=0 turns them
    off)."""
    monkeypatch.setenv("EFEDGE_NATIVE_WORKERS", "1")


@pytest.fixture(scope="module")
def path(tiny_gguf):
    p = tiny_gguf("qwen3moe", "Q4_K_M")
    if file_read.direct_open(p) is None:
        pytest.skip("this file system takes no O_DIRECT reads")
    return p


@pytest.fixture(scope="module")
def store(path):
    gf = GGUFFile(path)
    cfg = config_from_gguf(gf)
    yield ExpertStore(gf, cfg.n_layer, cfg.n_expert)
    gf.close()


def _queue(pool, fd, store, row, slot, layer, expert, prio, seq, bufs):
    """Queue row `row`: (layer, expert) into bufs[slot] (the engine's own call)."""
    pool.queue(row, np.full(3, fd, np.int64),
               np.array([b.ctypes.data for b in bufs[slot]], np.int64),
               store.offsets[layer, expert], store.nbytes[layer, expert], prio, seq, slot)


@contextmanager
def _pool(path, store, workers: int, rows: int):
    """(pool, direct descriptor, landing table) for `rows` rows; closed (threads
    joined) and the descriptor with it on the way out."""
    fd = file_read.direct_open(path)
    land = np.full(rows, np.inf)
    pool = nw.NativeWorkers(workers, rows, land,
                            file_read.bounce_bytes(int(store.nbytes.max())))
    try:
        yield pool, fd, land
    finally:
        pool.close()
        os.close(fd)


@contextmanager
def _link_pool(path, store):
    """(pool of two workers and four rows for an emulated link, buffered descriptor,
    landing table); closed on the way out."""
    fd = os.open(path, os.O_RDONLY)
    land = np.full(4, np.inf)
    pool = nw.NativeWorkers(2, 4, land, file_read.bounce_bytes(int(store.nbytes.max())))
    try:
        yield pool, fd, land
    finally:
        pool.close()
        os.close(fd)


def _queue_link(pool, fd, store, bufs, row, prio, dur):
    """Queue row `row` as a LINK copy of layer 1's expert `row` into bufs[row], held dur
    ns on the link."""
    pool.queue(row, np.full(3, fd, np.int64),
               np.array([b.ctypes.data for b in bufs[row]], np.int64),
               store.offsets[1, row], store.nbytes[1, row], prio, row, row, nw.LINK, dur)


def _wait_all(pool, rows, timeout=10.0):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        mark = pool.done_mark()
        if all(pool.jobs[r, nw.F_STATE] in (nw.DONE, nw.FAILED) for r in rows):
            return
        pool.wait_done(mark, 0.05)
    raise AssertionError("the native workers did not finish their rows")


def _buffers(store, n):
    big = int(store.nbytes.max())
    return [[np.zeros(big, np.uint8) for _ in range(3)] for _ in range(n)]


def test_rows_are_read_as_the_file_holds_them_demand_first(path, store):
    """One worker, rows queued while it is held off: it takes them by (priority,
    sequence), each expert's three parts land as the file has them, and the landing time
    is written once all of an expert is in."""
    raw = np.fromfile(path, dtype=np.uint8)
    with _pool(path, store, 1, 8) as (pool, fd, land):
        bufs = _buffers(store, 8)
        pool.pause(True)
        want = [(0, 1, 1), (1, 2, 1), (2, 3, 0), (0, 0, 1)]  # (layer, expert, priority)
        for row, (layer, expert, prio) in enumerate(want):
            _queue(pool, fd, store, row, row, layer, expert, prio, seq=row, bufs=bufs)
        pool.publish()
        assert all(pool.jobs[r, nw.F_STATE] == nw.QUEUED for r in range(4))
        pool.pause(False)
        _wait_all(pool, range(4))
        starts = [int(pool.jobs[r, nw.F_T0]) for r in range(4)]
        assert starts[2] < starts[0] < starts[1] < starts[3]  # demand (0) first, then by seq
        for row, (layer, expert, _p) in enumerate(want):
            assert pool.jobs[row, nw.F_STATE] == nw.DONE and pool.jobs[row, nw.F_RC] == 0
            for i in range(3):
                o, n = int(store.offsets[layer, expert, i]), int(store.nbytes[layer, expert, i])
                assert np.array_equal(bufs[row][i][:n], raw[o:o + n])
            assert land[row] == 0.0
        assert pool.done_mark() == 4
    assert pool.n_threads == 0


def test_a_queued_row_is_taken_once(path, store):
    """Cancelling and claiming are compare-and-swap: of two takers one wins; a cancelled
    row is never read; close() joins threads whose table still has queued rows."""
    with _pool(path, store, 2, 4) as (pool, fd, land):  # (closed with row 3 queued: the
        bufs = _buffers(store, 4)  # threads end anyway)
        pool.pause(True)
        for row in range(3):
            _queue(pool, fd, store, row, row, 0, row, 1, row, bufs)
        pool.publish()
        assert pool.claim(0, nw.QUEUED, nw.CANCELLED)
        assert not pool.claim(0, nw.QUEUED, nw.CANCELLED)
        assert not pool.claim(0, nw.QUEUED, nw.RUNNING)
        assert pool.claim(1, nw.QUEUED, nw.RUNNING)  # (the compute thread takes it)
        pool.pause(False)
        _wait_all(pool, [2])
        assert pool.jobs[0, nw.F_STATE] == nw.CANCELLED and land[0] == np.inf
        assert pool.jobs[1, nw.F_STATE] == nw.RUNNING and land[1] == np.inf
        pool.pause(True)
        _queue(pool, fd, store, 3, 3, 1, 1, 1, 3, bufs)
        pool.publish()
    assert pool.jobs[3, nw.F_STATE] == nw.QUEUED and pool.n_threads == 0


def test_publish_wakes_a_sleeping_worker_and_no_one_else(path, store):
    """publish() makes its system call only for a worker asleep on GEN: with the one
    worker asleep it wakes it (and the row is read); with none asleep it makes none."""
    import time

    with _pool(path, store, 1, 4) as (pool, fd, land):
        bufs = _buffers(store, 4)
        # held off the table, the worker sleeps on GEN whether or not it is woken (so its
        # 10 ms nap running out cannot take the row before publish() looks)
        pool.pause(True)
        end = time.monotonic() + 10.0
        while pool.ctl[nw.C_SLEEP] != 1 and time.monotonic() < end:
            time.sleep(0.001)
        assert pool.ctl[nw.C_SLEEP] == 1
        gen = int(pool.ctl[nw.C_GEN])
        _queue(pool, fd, store, 0, 0, 0, 0, 1, 0, bufs)
        assert pool.publish()  # woken
        assert int(pool.ctl[nw.C_GEN]) == gen + 1
        pool.pause(False)
        _wait_all(pool, [0])
        assert pool.jobs[0, nw.F_STATE] == nw.DONE
        pool.ctl[nw.C_SLEEP] -= 1  # as if it were awake (the count is all publish reads)
        try:
            gen = int(pool.ctl[nw.C_GEN])
            assert not pool.publish()
            assert int(pool.ctl[nw.C_GEN]) == gen + 1
        finally:
            pool.ctl[nw.C_SLEEP] += 1


@pytest.mark.parametrize("link", [None, (2e-6, 1.5e8)])
def test_a_plans_rows_filled_in_one_call_are_the_rows_filled_one_by_one(path, store, link):
    """queue_many (a prefetch plan's copies in one kernel call) writes each row as queue()
    does from the same tables — parts, priority, sequence, slot, load, and the emulated
    link's time for the expert — except the queue time, stamped once for the batch."""
    copies = [(0, 3, 2, 5, 11, 7), (2, 1, 0, 6, 12, 8), (1, 5, 3, 7, 13, 9)]  # (layer,
    # expert, slot, priority, sequence, load)
    fds = np.arange(3 * store.n_layer, dtype=np.int64).reshape(-1, 3) + 100
    dst = np.arange(4 * 3, dtype=np.int64).reshape(4, 3) * 4096 + (1 << 20)
    mode = nw.DIRECT if link is None else nw.LINK
    with _pool(path, store, 1, 8) as (pool, fd, land):
        pool.pause(True)
        for r, (m, e, s, p, q, g) in enumerate(copies):
            dur = 0 if link is None else int(1e9 * (link[0] + store.expert_bytes(m, e)
                                                    / link[1]))
            pool.queue(r, fds[m], dst[s], store.offsets[m, e], store.nbytes[m, e], p, q, s,
                       mode, dur, g)
        cols = [np.array(c, np.int64) for c in zip(*copies, strict=True)]
        pool.queue_many(np.arange(4, 7, dtype=np.int64), *cols, fds, dst, store.offsets,
                        store.nbytes, mode, *((0.0, 0.0) if link is None else link))
        one, many = pool.jobs[0:3].copy(), pool.jobs[4:7].copy()
        for c in (one, many):
            c[:, nw.F_QT] = 0
        assert np.array_equal(one, many)
        assert (many[:, nw.F_STATE] == nw.QUEUED).all()
        assert many[:, nw.F_DUR].tolist() == one[:, nw.F_DUR].tolist()
        assert (pool.jobs[4:7, nw.F_QT] > 0).all()
        for r in (*range(3), *range(4, 7)):  # (fake descriptors: never read)
            assert pool.claim(r, nw.QUEUED, nw.CANCELLED)
        pool.pause(False)


@pytest.mark.parametrize("policy", ["ondemand", "expertflow"])
def test_native_engine_gives_the_resident_logits(path, policy):
    """Reading the file itself, the engine's workers are native threads, and any budget
    gives the resident logits and greedy text; stats() counts the bytes they read."""
    ids = np.random.default_rng(3).integers(0, 500, 40).tolist()
    with efedge.load(path) as m:
        want = m.logits(ids)
        greedy = m.generate(ids[:6], max_tokens=10, temperature=0)
    for budget in ("25%", "60%"):
        with efedge.load(path, cache=budget, policy=policy) as m:
            eng = m._experts.engine
            assert eng.gil_free and eng.native and eng.pool.n_threads == eng.n_workers
            np.testing.assert_array_equal(m.logits(ids), want)
            assert m.generate(ids[:6], max_tokens=10, temperature=0) == greedy
            s = m.stats()
            assert s["bytes_loaded"] > 0 and s["hits"] + s["late"] + s["misses"] == \
                s["expert_requests"]
            with m._experts.cond:
                assert not eng.jobs_by_key or all(not j.cancelled
                                                  for j in eng.jobs_by_key.values())
        assert eng.pool.n_threads == 0  # joined by close()


@pytest.mark.parametrize("setting,want_native", [(None, True), ("1", True), ("0", False)])
def test_native_workers_unless_told_not_to(path, monkeypatch, setting, want_native):
    """On Linux, reading the file itself or through an emulated link: native workers by
    default; EFEDGE_NATIVE_WORKERS=0 gives Python ones."""
    if setting is None:
        monkeypatch.delenv("EFEDGE_NATIVE_WORKERS", raising=False)
    else:
        monkeypatch.setenv("EFEDGE_NATIVE_WORKERS", setting)
    with efedge.load(path, cache="30%") as m:
        eng = m._experts.engine
        assert eng.gil_free is want_native and bool(eng._threads) is not want_native
    with efedge.load(path, cache="30%", link="720MB/s") as m:
        eng = m._experts.engine
        assert eng.gil_free is want_native and bool(eng._threads) is not want_native


def test_native_reads_that_fail_are_read_again_and_then_given_up(path, monkeypatch):
    """Native reads that fail (here: the direct descriptor reads another, empty file)
    free their slots and are loaded again through the Python path (exact logits); after
    DIRECT_FAILURES of them the engine reads with Python workers through the page cache."""
    from efedge.experts import engine_reads

    ids = np.random.default_rng(5).integers(0, 500, 12).tolist()
    with efedge.load(path) as m:
        want = m.logits(ids)
    with efedge.load(path, cache="30%", policy="ondemand") as m:
        eng = m._experts.engine
        assert eng.native
        with m._experts.cond:  # (the engine closes the empty file's descriptor)
            real, eng._direct_fds = eng._direct_fds, [os.open(os.devnull, os.O_RDONLY)]
            eng._layer_fds[eng._layer_fds >= 0] = eng._direct_fds[0]
        np.testing.assert_array_equal(m.logits(ids), want)
        assert eng._direct_failures >= engine_reads.DIRECT_FAILURES
        assert not eng.native and not eng.reads_direct
        assert any(t.is_alive() for t in eng._threads)  # Python workers took over
        np.testing.assert_array_equal(m.logits(ids), want)
    for fd in real:
        os.close(fd)


def test_a_model_closed_while_loads_are_queued(path):
    """close() while native workers still read: they are joined before the slots go."""
    ids = np.random.default_rng(9).integers(0, 500, 30).tolist()
    done = threading.Event()
    with efedge.load(path, cache="25%", policy="expertflow") as m:
        m.logits(ids)
        eng = m._experts.engine
        with m._experts.cond:  # queue every expert of layer 0 that is not in
            for e in range(m._experts.store.n_expert):
                if m._experts.cache.where[0, e] < 0:
                    slot = m._experts.cache.free_or_victim(0, m._experts.policy.victim)
                    if slot < 0:
                        break
                    m._experts.cache.assign(slot, 0, e)
                    eng.submit(0, e, slot, 1)
        done.set()
    assert done.is_set() and eng.pool.n_threads == 0


def test_a_finished_copy_does_not_make_the_slots_next_expert_ready(path):
    """The compute thread reaps finished copies when it next submits one. A copy of the
    expert a slot held before (landed, used, evicted, not yet reaped) must not mark the
    slot READY for the expert it was just given (it was: logits went wrong now and then
    at the smallest budgets)."""
    import time

    from efedge.experts.cache import LOADING, READY

    with efedge.load(path, cache="30%", policy="ondemand") as m:
        src = m._experts
        eng, cache = src.engine, src.cache
        with src.cond:
            s = cache.free_or_victim(0, src.policy.victim)
            cache.assign(s, 0, 1)
            job = eng.submit(0, 1, s, 0)
        end = time.monotonic() + 10
        while eng.pool.jobs[job.row, nw.F_STATE] != nw.DONE and time.monotonic() < end:
            time.sleep(0.001)
        assert eng.pool.jobs[job.row, nw.F_STATE] == nw.DONE
        eng.pool.pause(True)  # (expert 2's copy stays queued)
        try:
            with src.cond:
                cache.slot_state[s] = READY  # it landed and was used, then evicted:
                cache.assign(s, 0, 2)
                eng.submit(0, 2, s, 0)
                assert cache.slot_state[s] == LOADING and eng._row_job.get(job.row) is not job
        finally:
            eng.pool.pause(False)


@pytest.mark.parametrize("link", [True, False])
def test_reaping_finished_rows(link):
    """reap_rows, the compute thread's bookkeeping of finished copies in one call: the
    finished rows in the order their reads ended; a DONE row's slot READY only while it
    is on the row's load; its bytes counted; the meter moved by each read and copy (an
    emulated link: its booked start to its landing; the drive: from this read's start,
    or the last completion), as written out below; FAILED rows returned with nothing
    counted; rows still queued or running left alone."""
    from efedge.experts import meter as mt
    from efedge.experts.cache import LOADING, READY

    jobs = np.zeros((6, nw.N_FIELDS), np.int64)
    #        state      slot gen  T0     T1     T2     BEGIN  bytes (3 parts)
    spec = [(nw.DONE,   0,   4,   1000,  5000,  9000,  2000, (100, 100, 300)),
            (nw.DONE,   1,   1,   1500,  3000,  4000,  1000, (200, 200, 200)),
            (nw.FAILED, 2,   1,   2000,  2500,  2600,  0,    (50, 50, 50)),
            (nw.QUEUED, 3,   1,   0,     0,     0,     0,    (10, 10, 10)),
            (nw.RUNNING, 4,  1,   7000,  0,     0,     0,    (10, 10, 10))]
    for r, (st, slot, gen, t0, t1, t2, begin, ns) in enumerate(spec):
        jobs[r, [nw.F_STATE, nw.F_SLOT, nw.F_GEN, nw.F_T0, nw.F_T1, nw.F_T2,
                 nw.F_BEGIN]] = st, slot, gen, t0, t1, t2, begin
        jobs[r, nw.F_N0:nw.F_N2 + 1] = ns
    slot_gen = np.array([4, 2, 1, 1, 1], np.int64)  # slot 1 is on a newer load now
    slot_state = np.full(5, LOADING, np.int8)
    meter = np.zeros(mt.N_METER)
    done, loaded = nw.reap_rows(jobs, np.arange(5, dtype=np.int64), slot_gen, slot_state,
                                READY, meter, link)
    assert done.tolist() == [2, 1, 0]  # by the end of their reads
    assert slot_state.tolist() == [READY, LOADING, LOADING, LOADING, LOADING]
    assert loaded == 600 + 500
    # the same copies by hand, in the same order: reads at rate 0.1 (the first sets the
    # mean), copies at 0.2 (the first sets bytes and busy time)
    mean = dev = nbytes = busy = 0.0
    last_end = 0
    for i, r in enumerate((1, 0)):
        _, _, _, t0, t1, t2, begin, ns = spec[r]
        secs = (t1 - t0) * 1e-9
        if i == 0:
            mean = secs
        else:
            dev += 0.1 * (abs(secs - mean) - dev)
            mean += 0.1 * (secs - mean)
        b = ((t2 - begin) if link else (t2 - max(t0, last_end))) * 1e-9
        last_end = max(last_end, t2)
        a = 1.0 if i == 0 else 0.2
        nbytes += a * (sum(ns) - nbytes)
        busy += a * (b - busy)
    assert meter[mt.M_READ] == pytest.approx(mean)
    assert meter[mt.M_READ_DEV] == pytest.approx(dev)
    assert meter[mt.M_LATENCY] == pytest.approx(busy)
    assert meter[mt.M_BANDWIDTH] == pytest.approx(nbytes / busy)
    assert meter[mt.M_LAST_END] == 9000


def test_link_rows_land_when_the_link_delivers_them(path, store):
    """LINK rows read through the page cache and are held as the emulated link would hold
    them: booked one after another (two workers, one link) from when each was queued —
    a copy engine starts a queued copy when the link is free, however late a worker
    gets to it —, each lands — its landing time written, then DONE — no earlier than the
    end of its booking; the compute thread's own bookings (book) go behind theirs."""
    import time

    raw = np.fromfile(path, dtype=np.uint8)
    dur = 3_000_000  # 3 ms a copy
    with _link_pool(path, store) as (pool, fd, land):
        bufs = _buffers(store, 4)
        pool.pause(True)
        t_queued = time.perf_counter()
        for row in range(3):
            _queue_link(pool, fd, store, bufs, row, 1, dur)
        pool.publish()
        time.sleep(0.005)  # the workers get to the rows 5 ms after they were queued
        t_start = time.perf_counter()
        pool.pause(False)
        _wait_all(pool, range(3))
        ends = sorted(land[:3])
        # one link: the three copies follow each other, each dur long, from the first
        # one's queuing (not from when a worker took it, 5 ms later)
        assert t_queued + dur * 1e-9 <= ends[0] <= t_start + dur * 1e-9 - 0.003
        for a, b in zip(ends, ends[1:], strict=False):
            assert b - a >= dur * 1e-9 - 1e-6
        for row in range(3):
            j = pool.jobs[row]
            assert j[nw.F_STATE] == nw.DONE and j[nw.F_RC] == 0
            # held until (about) its landing: the worker wakes early by its measured
            # oversleep only, at most a millisecond
            assert j[nw.F_T2] * 1e-9 >= land[row] - 1e-3
            for i in range(3):
                o, n = int(store.offsets[1, row, i]), int(store.nbytes[1, row, i])
                assert np.array_equal(bufs[row][i][:n], raw[o:o + n])
        later = pool.book(time.perf_counter() - 1.0, 0.002)  # booked in the past: behind
        assert later >= ends[-1] + 0.002 - 1e-9


def test_a_link_row_is_taken_when_the_link_comes_free(path, store):
    """A copy engine chooses its next copy as the link comes free: with the link booked
    20 ms ahead, a prefetch row queued first stays QUEUED, and a demand row queued 5 ms
    later goes on the link before it; neither is taken long before the link is free."""
    import time

    dur = 3_000_000  # 3 ms a copy
    with _link_pool(path, store) as (pool, fd, _land):
        bufs = _buffers(store, 2)
        free_at = pool.book(time.perf_counter(), 0.02)
        for row, prio in ((0, 5), (1, 0)):
            _queue_link(pool, fd, store, bufs, row, prio, dur)
            pool.publish()
            time.sleep(0.005)
        assert pool.jobs[0, nw.F_STATE] == nw.QUEUED  # not booked behind the 20 ms
        _wait_all(pool, range(2))
        pre, dem = pool.jobs[0], pool.jobs[1]
        assert dem[nw.F_BEGIN] * 1e-9 == pytest.approx(free_at, abs=1e-6)
        assert pre[nw.F_BEGIN] == dem[nw.F_BEGIN] + dur
        for j in (pre, dem):
            assert j[nw.F_STATE] == nw.DONE and j[nw.F_T0] * 1e-9 > free_at - 0.002


@pytest.mark.parametrize("policy", ["ondemand", "expertflow"])
def test_native_workers_through_an_emulated_link(path, monkeypatch, policy):
    """An emulated link's copies are made by native workers (two, one serial link) from
    the page cache, the compute thread's demand copies book the same link; the logits are
    the resident ones and the meter reads the link's rate."""
    ids = list(range(3, 40))
    with efedge.load(path) as m:
        ref = m.logits(ids)
    with efedge.load(path, cache="30%", policy=policy, link="200MB/s") as m:
        eng = m._experts.engine
        assert eng.gil_free and eng.pool.n_threads == 2 and not eng._threads
        assert np.array_equal(m.logits(ids), ref)
        st = m.stats()
        assert st["bytes_loaded"] > 0 and st["misses"] > 0
        assert 150e6 < eng.bandwidth_ewma < 210e6  # the link's rate, not the page cache's


def test_the_compute_threads_own_copy_through_the_link_in_one_call(path):
    """NativeTransferEngine.copy_inline (one kernel call: nw.copy_inline_now) does what
    TransferEngine.copy_inline does: the file's bytes in the slot, the link booked behind
    what it holds (each copy one expert's time after the last), the slot landing at the
    end of its booking, the meter fed; a slot of another size class is refused before any
    byte is written, and a read fault goes the Python way, which names it."""
    import time

    from efedge.errors import TransferError
    from efedge.experts.native_engine import NativeTransferEngine

    raw = np.fromfile(path, dtype=np.uint8)
    # (a link slow enough that the second copy starts while the first still holds it)
    with efedge.load(path, cache="30%", policy="ondemand", link="2MB/s") as m:
        eng, cache, store = m._experts.engine, m._experts.cache, m._experts.store
        assert type(eng) is NativeTransferEngine and eng._kernel_reads()
        rate = eng.link.bytes_per_s
        with cache.cond:
            slots = []
            for e in (3, 4):
                s = cache.free_or_victim(1, lambda c, cands: int(cands[0]))
                cache.assign(s, 1, e)
                slots.append(s)
            copies, bytes0 = eng.inline_copies, m.stats()["bytes_loaded"]
            t0 = time.perf_counter()
            n = [eng.copy_inline(1, e, s) for e, s in zip((3, 4), slots, strict=True)]
        assert n == [store.expert_bytes(1, 3), store.expert_bytes(1, 4)]
        assert eng.inline_copies == copies + 2
        assert m.stats()["bytes_loaded"] == bytes0 + sum(n)
        for e, s in zip((3, 4), slots, strict=True):
            for i, part in enumerate(cache.slot_parts(s)):
                o, k = int(store.offsets[1, e, i]), int(store.nbytes[1, e, i])
                assert np.array_equal(part[:k], raw[o:o + k])
        land = cache.slot_land_at
        busy = eng.link.latency_s + n[1] / rate
        assert land[slots[0]] >= t0 + n[0] / rate - 1e-6
        assert land[slots[1]] == pytest.approx(land[slots[0]] + busy, abs=2e-9)
        assert eng.link_free_at() == pytest.approx(land[slots[1]], abs=2e-9)
        assert eng.bandwidth_ewma == pytest.approx(rate, rel=1e-3)
        # a slot of another size class (layer 2's Q6_K down makes its own): refused,
        # the link untouched
        other = np.flatnonzero(cache.slot_class != cache.layer_class[1])
        assert other.size
        o = int(other[0])
        free_at, before = eng.link_free_at(), (int(cache.slot_gen[o]), cache.slot_land_at[o])
        with cache.cond, pytest.raises(ValueError, match="cannot hold"):
            eng.copy_inline(1, 5, o)
        assert eng.link_free_at() == free_at  # nothing booked, the slot's load not begun
        assert (int(cache.slot_gen[o]), cache.slot_land_at[o]) == before
        # a failing read: the Python path reads again and names the file's expert
        def broken(*a, **kw):
            raise OSError(5, "Input/output error")

        with cache.cond:
            s = slots[0]
            cache.assign(s, 1, 6)
            real = eng._read
            eng._read = broken  # (an injected read: the kernel path is left to Python)
            try:
                assert not eng._kernel_reads()
                with pytest.raises(TransferError, match="expert 6 of layer 1"):
                    eng.copy_inline(1, 6, s)
            finally:
                eng._read = real


def test_a_known_landing_is_spun_for_not_slept_for(path, monkeypatch):
    """Waiting for an emulated link's copy whose landing time is known, the compute
    thread spins the last SPIN_S to it instead of a timed wait (those ended 43-80 µs late
    on the test VM): with SPIN_S covering every wait, the engine is never asked to sleep
    for a known landing, and the logits are the resident ones; with SPIN_S = 0 it is."""
    from efedge.experts import demand_wait

    ids = list(range(3, 30))
    with efedge.load(path) as m:
        ref = m.logits(ids)
    for spin, slept in ((10.0, False), (0.0, True)):
        monkeypatch.setattr(demand_wait, "SPIN_S", spin)
        with efedge.load(path, cache="30%", policy="ondemand", link="50MB/s") as m:
            eng = m._experts.engine
            assert eng.gil_free
            timeouts = []
            wait = eng.wait_progress

            def recorded(mark, timeout, wait=wait, timeouts=timeouts):
                timeouts.append(timeout)
                return wait(mark, timeout)

            eng.wait_progress = recorded
            assert np.array_equal(m.logits(ids), ref)
            assert m.stats()["stall_s"] > 0
            assert any(t < 1.0 for t in timeouts) is slept


def test_a_spinning_predictor_thread_wakes_the_workers_for_publish(path, store):
    """While expertflow's predictor thread spins on another core (predictor_thread.py)
    publish() leaves the wake-up of a sleeping worker to it — no system call on the
    compute thread — and the row is still read; a demand load's publish (direct) and one
    made once the helper has stopped wake the worker themselves."""
    import time

    from efedge.experts import predictor_thread as pt
    from efedge.experts.predictor import HybridPredictor

    def asleep():
        end = time.monotonic() + 10.0
        while pool.ctl[nw.C_SLEEP] != 1 and time.monotonic() < end:
            time.sleep(0.001)
        assert pool.ctl[nw.C_SLEEP] == 1

    with _pool(path, store, 1, 4) as (pool, fd, land):
        bufs = _buffers(store, 4)
        pred = HybridPredictor(2, 8, 2)
        pred.set_router_weights(np.ones((2, 8, 4), np.float32))
        pred.use_thread(True, pool.ctl)
        pred.begin_pass([1])
        assert pred.post_step(0, np.array([[0, 1]], np.int32), np.ones((1, 4), np.float32), 1)
        pred._thread.job[pt.J_SPIN_NS] = 60 * 10**9  # (no sleep before this test is done)
        pred.wait()
        try:
            end = time.monotonic() + 10.0
            while pool.ctl[nw.C_HELPER] != 1 and time.monotonic() < end:
                time.sleep(0.001)
            assert pool.ctl[nw.C_HELPER] == 1
            asleep()
            _queue(pool, fd, store, 0, 0, 0, 0, 1, 0, bufs)
            assert not pool.publish()  # left to the helper…
            _wait_all(pool, [0])  # …which woke the worker
            asleep()
            _queue(pool, fd, store, 1, 1, 0, 1, 0, 1, bufs)
            assert pool.publish(direct=True)
            _wait_all(pool, [1])
        finally:
            pred.close()
        assert pool.ctl[nw.C_HELPER] == 0
        asleep()
        _queue(pool, fd, store, 2, 2, 0, 2, 1, 2, bufs)
        assert pool.publish()
        _wait_all(pool, [2])
        assert all(pool.jobs[r, nw.F_STATE] == nw.DONE for r in range(3))
