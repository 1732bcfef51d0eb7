"""Expert streaming: any budget and policy gives bitwise the resident logits; counters add
up; a slow link stalls; the cache never hands a slot out twice under stress."""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest

import efedge
from efedge.errors import TransferError
from efedge.experts.cache import READY, ExpertCache, parse_budget
from efedge.experts.link import parse_link
from efedge.experts.scheduler import make_policy
from efedge.experts.stats import Counters
from efedge.experts.store import ExpertStore
from efedge.experts.streaming import StreamingExperts
from efedge.experts.transfer import TransferEngine
from efedge.gguf_file import GGUFFile
from tests._faults import fail_reads_at

# ernie4_5-moe-interleave: a MoE layer between two dense ones (Q4_K_M through llama.cpp's
# quantizer, which reads the layout without loading it)
MOE_ARCHS = ["mixtral", "qwen2moe", "qwen3moe", "olmoe", "glm4moe", "ernie4_5-moe",
             "ernie4_5-moe-interleave", "bailingmoe", "dots1", "hunyuan-moe"]
MOE_ARCHS += ["bailingmoe2"]  # fused attn_qkv, dense first layer, grouped sigmoid routing
MOE_ARCHS += ["smallthinker"]  # routed before attention (early requests), ReLU experts
MOE_ARCHS += ["minimax-m2"]  # whole-projection q / k norm, sigmoid routing + bias
# the default run: one arch of each kind (the others' streamed logits equal their resident
# ones in test_parity.py too: test_streamed_matches_llama_cpp, the new-arch cache tests)
_SLOW_ARCHS = {"olmoe", "ernie4_5-moe", "bailingmoe", "dots1", "hunyuan-moe"}
BUDGET_ARCHS = [pytest.param(a, marks=pytest.mark.slow) if a in _SLOW_ARCHS else a
                for a in MOE_ARCHS]


def _ids(n=24, seed=1, vocab=500):
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def _resident_logits(path, ids) -> np.ndarray:
    """The logits with every expert resident: what any budget, policy or link must give."""
    with efedge.load(path) as m:
        return m.logits(ids)


def _min_budget(path) -> int:
    gf = GGUFFile(path)
    from efedge.config import config_from_gguf

    cfg = config_from_gguf(gf)
    store = ExpertStore(gf, cfg.n_layer, cfg.n_expert)
    sizes = {store.expert_bytes(i) for i in range(cfg.n_layer)}
    gf.close()
    return cfg.n_expert_used * sum(sizes)


@pytest.mark.parametrize("arch", BUDGET_ARCHS)
def test_any_budget_gives_bitwise_identical_logits(tiny_gguf, arch):
    path = tiny_gguf(arch, "Q4_K_M")
    ids = _ids()
    with efedge.load(path) as m:
        ref = m.logits(ids)
        greedy = m.generate(ids[:6], max_tokens=12, temperature=0)
    for budget, policy in [(_min_budget(path), "ondemand"), ("30%", "lfu"), ("100%", "lru")]:
        with efedge.load(path, cache=budget, policy=policy) as m:
            assert np.array_equal(m.logits(ids), ref), (budget, policy)
            assert m.generate(ids[:6], max_tokens=12, temperature=0) == greedy
            s = m.stats()
            assert s["hits"] + s["late"] + s["misses"] == s["expert_requests"] > 0
            assert s["cache_bytes"] <= parse_budget(budget, 10**12)


def test_counters_and_bytes_add_up(tiny_gguf):
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    with efedge.load(path, cache="30%", policy="ondemand") as m:
        m.generate(_ids(8), max_tokens=16, temperature=0)
        s = m.stats()
        store = m._tf.store
        per_expert = {store.expert_bytes(i) for i in range(store.n_layer)}
    # no prefetch: every miss is one demand load of one expert
    assert s["late"] == 0 and s["prefetch_issued"] == 0
    assert min(per_expert) * s["misses"] <= s["bytes_loaded"] <= max(per_expert) * s["misses"]
    assert s["tokens_prompt"] == 8 and s["tokens_generated"] >= 1
    assert s["bandwidth_gbps"] > 0


def test_slow_link_stalls_in_proportion(tiny_gguf):
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    stalls = {}
    for link in (None, "10MB/s"):
        with efedge.load(path, cache="30%", policy="ondemand", link=link) as m:
            m.generate(_ids(4), max_tokens=4, temperature=0)
            s = m.stats()
            stalls[link] = s["stall_s"]
            if link:
                # the emulated link serialises every byte: the run cannot be shorter than
                # the bytes over the link rate (prefill included)
                assert s["wall_s"] >= 0.9 * s["bytes_loaded"] / 10e6
                # without prefetch only the experts of the same layer can hide a load
                # (0.4: a run beside the whole suite on a cold numba cache read 0.497 —
                # compute after a long wait runs slower, and a loaded core slower still)
                assert s["stall_s"] >= 0.4 * s["bytes_loaded"] / 10e6
                assert 0.008 < s["bandwidth_gbps"] < 0.0115  # the link, not one request
    assert stalls["10MB/s"] > 3 * stalls[None]


def test_budget_parsing_and_minimum(tiny_gguf):
    assert parse_budget("512MiB", 0) == 512 * 2**20
    assert parse_budget("1.5GB", 0) == 1_500_000_000
    assert parse_budget("25%", 4000) == 1000
    assert parse_budget(12345, 0) == 12345
    for bad in ("abc", "-5MB", "0%", "150%", 0, True):
        with pytest.raises(efedge.CacheBudgetError):
            parse_budget(bad, 1000)
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    minimum = _min_budget(path)
    with pytest.raises(efedge.CacheBudgetError, match=str(minimum)):
        efedge.load(path, cache=minimum - 1)
    with pytest.raises(efedge.EfedgeError, match="policy"):
        efedge.load(path, cache="50%", policy="nope")
    with pytest.raises(efedge.EfedgeError, match="link"):
        efedge.load(path, cache="50%", link="warp-drive")
    assert parse_link("pcie4x4").bytes_per_s > 1e9
    assert parse_link("8GB/s").bytes_per_s == 8e9


def test_stress_random_requests_tiny_budget(tiny_gguf):
    """Thousands of random requests, two workers, the minimum budget: no deadlock, no slot
    handed out twice, every yielded expert byte-identical to the file."""
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    gf = GGUFFile(path)
    from efedge.config import config_from_gguf

    cfg = config_from_gguf(gf)
    store = ExpertStore(gf, cfg.n_layer, cfg.n_expert)
    counters = Counters()
    cache = ExpertCache(store, _min_budget(path), cfg.n_expert_used)
    engine = TransferEngine(path, store, cache, counters, workers=2)
    source = StreamingExperts(store, cache, engine, make_policy("ondemand"), counters)
    rng = np.random.default_rng(0)
    raw = open(path, "rb").read()

    def expected(layer, e):
        return b"".join(raw[int(store.offsets[layer, e, p]):int(store.offsets[layer, e, p] +
                                                                store.nbytes[layer, e, p])]
                        for p in range(3))

    done = threading.Event()

    def run():
        for _ in range(1500):
            layer = int(rng.integers(cfg.n_layer))
            want = np.unique(rng.integers(0, cfg.n_expert, cfg.n_expert_used))
            seen = set()
            for e, w in source.acquire(layer, want):
                assert e not in seen
                seen.add(e)
                s = cache.where[layer, e]
                assert cache.slot_state[s] == READY and cache.slot_pins[s] >= 1
                # the slot belongs to exactly this expert
                assert (cache.slot_owner == layer * cfg.n_expert + e).sum() == 1
                got = w.gate.tobytes() + w.up.tobytes() + w.down.tobytes()
                assert got == expected(layer, e)
                # a prefetch racing with the compute must not disturb pinned slots
                source.prefetch(int(rng.integers(cfg.n_layer)), rng.integers(0, cfg.n_expert, 2))
            assert seen == set(want.tolist())
        done.set()

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=300)
    assert done.is_set(), "deadlock or failure in the stress run"
    assert (cache.slot_pins == 0).all()
    owners = cache.slot_owner[cache.slot_owner >= 0]
    assert len(owners) == len(set(owners.tolist()))
    s = counters
    assert s.hits + s.late + s.misses == s.expert_requests
    source.close()
    gf.close()


def test_yield_gil_lets_a_waiting_thread_run():
    """yield_gil (the compute thread's hand-over to a woken transfer worker) releases the
    GIL: with forced switches pushed out to a second, a thread that needs the GIL runs
    only if it does."""
    import sys
    import threading

    from efedge.gil_yield import yield_gil

    go, ran = threading.Event(), threading.Event()

    def worker():
        go.wait()  # blocked without the GIL until the main thread says go …
        ran.set()  # … then it needs the GIL back for this

    old = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    try:
        t = threading.Thread(target=worker)
        t.start()
        go.set()
        for _ in range(200_000):
            if ran.is_set():
                break
            yield_gil()
        ran_while_yielding = ran.is_set()  # (before join, which would release the GIL)
        t.join(timeout=10)
    finally:
        sys.setswitchinterval(old)
    assert ran_while_yielding


def _slow_link_cache(tiny_gguf, s_per_expert: float):
    """(path, GGUFFile, store, cache at the smallest budget, a link that carries one
    expert in s_per_expert seconds) of the tiny qwen3moe Q4_K_M file; the caller closes
    the GGUFFile."""
    from efedge.config import config_from_gguf
    from efedge.experts.link import Link

    path = tiny_gguf("qwen3moe", "Q4_K_M")
    gf = GGUFFile(path)
    cfg = config_from_gguf(gf)
    store = ExpertStore(gf, cfg.n_layer, cfg.n_expert)
    cache = ExpertCache(store, _min_budget(path), cfg.n_expert_used)
    return path, gf, store, cache, Link("test", store.expert_bytes(0) / s_per_expert)


def test_an_emulated_link_carries_copies_in_the_order_they_start(tiny_gguf):
    """The link is booked when a worker takes the job, so a copy whose read comes back
    late (no core or no GIL on a busy machine) keeps its place on the link: booked after
    the read, a demand load went behind prefetches that started after it."""
    from efedge.experts.transfer import DEMAND, PREFETCH

    # one expert per 0.2 s on the link; the first job's read takes 0.06 s
    path, gf, store, cache, link = _slow_link_cache(tiny_gguf, 0.2)
    slow_off = int(store.offsets[0, 1, 0])
    fd = os.open(path, os.O_RDONLY)

    def read(buf, off):
        if off == slow_off:
            time.sleep(0.06)
        buf[:] = np.frombuffer(os.pread(fd, len(buf), off), dtype=np.uint8)

    done: dict[int, float] = {}
    engine = TransferEngine(path, store, cache, Counters(), link, workers=2, read_fn=read)
    real_run = engine._run

    def run(job):
        real_run(job)
        done[job.expert] = time.perf_counter()

    engine._run = run
    try:
        with engine.cond:  # both queued before either worker takes one: 1 goes first
            for e, prio in ((1, DEMAND), (2, PREFETCH)):
                slot = cache.free_or_victim(0, lambda c, cands: int(cands[0]))
                cache.assign(slot, 0, e)
                engine.submit(0, e, slot, prio)
        t0 = time.perf_counter()
        while len(done) < 2 and time.perf_counter() - t0 < 10:
            time.sleep(0.01)
    finally:
        engine.close()
        os.close(fd)
        gf.close()
    assert len(done) == 2
    assert done[1] < done[2], done  # the first to start is delivered first


def test_an_emulated_link_starts_a_copy_when_it_is_queued(tiny_gguf):
    """A copy engine starts a queued copy as soon as the link is free, however late a
    transfer worker gets to it: a job queued 0.3 s before a worker could take it (the
    engine's lock held) on a link that carries it in 0.2 s is there as soon as it is
    read — not 0.2 s after the worker took it."""
    from efedge.experts.transfer import PREFETCH

    path, gf, store, cache, link = _slow_link_cache(tiny_gguf, 0.2)
    engine = TransferEngine(path, store, cache, Counters(), link, workers=1)
    try:
        with engine.cond:
            slot = cache.free_or_victim(0, lambda c, cands: int(cands[0]))
            cache.assign(slot, 0, 1)
            job = engine.submit(0, 1, slot, PREFETCH)
            time.sleep(0.3)  # no worker can take it meanwhile
            released = time.perf_counter()
        t0 = time.perf_counter()
        while cache.slot_state[slot] != READY and time.perf_counter() - t0 < 10:
            time.sleep(0.002)
        landed = time.perf_counter()
    finally:
        engine.close()
        gf.close()
    assert cache.slot_state[slot] == READY
    assert job.link_until <= released  # booked from its queuing: delivered already
    assert landed - released < 0.15, landed - released


def test_an_emulated_link_takes_its_next_copy_as_it_comes_free(tiny_gguf):
    """A copy engine chooses its next copy when the link comes free: a prefetch queued
    while the link is booked ahead waits in the queue (not on the link), so a demand load
    queued after it, before the link is free, is carried first."""
    from efedge.experts.transfer import DEMAND, PREFETCH

    path, gf, store, cache, link = _slow_link_cache(tiny_gguf, 0.2)
    engine = TransferEngine(path, store, cache, Counters(), link, workers=2)
    jobs = {}
    try:
        busy_until = engine._book_link(store.expert_bytes(0, 0), time.perf_counter())
        assert engine.take_delay(time.perf_counter()) > 0.1
        for e, prio in ((2, PREFETCH), (1, DEMAND)):
            with engine.cond:
                slot = cache.free_or_victim(0, lambda c, cands: int(cands[0]))
                cache.assign(slot, 0, e)
                jobs[e] = (engine.submit(0, e, slot, prio), slot)
            time.sleep(0.05)  # the prefetch is queued 50 ms before the demand load
        assert not jobs[2][0].started  # held in the queue while the link is busy
        t0 = time.perf_counter()
        while not all(cache.slot_state[s] == READY for _, s in jobs.values()) and \
                time.perf_counter() - t0 < 10:
            time.sleep(0.005)
    finally:
        engine.close()
        gf.close()
    demand, prefetch = jobs[1][0], jobs[2][0]
    assert all(cache.slot_state[s] == READY for _, s in jobs.values())
    # the demand load right after the booking ahead, the prefetch after it
    assert busy_until < demand.link_until < prefetch.link_until
    assert demand.link_until == pytest.approx(busy_until + 0.2, abs=1e-3)


@pytest.mark.parametrize("kernel_reads", [True, False])
def test_an_emulated_link_reads_from_the_page_cache(tiny_gguf, monkeypatch, kernel_reads):
    """Without a link every read expert's file pages are dropped (the budget is honest);
    with an emulated link they stay, and the file's expert pages are not dropped at load:
    reads that went to the disk each time would make every emulated link the disk's speed.
    Both read paths: the GIL-free kernel and Python's pread + posix_fadvise."""
    import os

    from efedge.experts import file_read

    if kernel_reads and not file_read.available():
        pytest.skip("no file_read kernel in this libc")
    if not kernel_reads and not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise")
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    dropped = []
    real_kernel, real_fadvise = file_read.read_expert, os.posix_fadvise

    def kernel(*a, drop_pages=True, **kw):
        dropped.append(drop_pages)
        return real_kernel(*a, drop_pages=drop_pages, **kw)

    def fadvise(fd, off, n, advice):
        if advice == os.POSIX_FADV_DONTNEED:
            dropped.append(True)
        return real_fadvise(fd, off, n, advice)

    monkeypatch.setattr(file_read, "read_expert", kernel)
    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    store_drops = []
    monkeypatch.setattr(ExpertStore, "drop_page_cache", lambda self: store_drops.append(1))
    gf = GGUFFile(path)
    from efedge.config import config_from_gguf

    cfg = config_from_gguf(gf)
    fd = os.open(path, os.O_RDONLY)

    def py_read(buf, off):  # an injected reader: the engine reads in Python
        buf[:] = np.frombuffer(os.pread(fd, len(buf), off), dtype=np.uint8)

    for link, expect_drop in ((None, True), (parse_link("2GB/s"), False)):
        dropped.clear()
        store = ExpertStore(gf, cfg.n_layer, cfg.n_expert)
        cache = ExpertCache(store, _min_budget(path), cfg.n_expert_used)
        engine = TransferEngine(path, store, cache, Counters(), link, workers=1,
                                read_fn=None if kernel_reads else py_read)
        try:
            assert engine.drop_pages is expect_drop
            assert engine._kernel_reads() is kernel_reads
            direct = engine.reads_direct
            slot = cache.free_or_victim(0, lambda c, cands: int(cands[0]))
            cache.assign(slot, 0, 1)
            engine.load_now(0, 1, slot)
        finally:
            engine.close()
        if expect_drop and direct:  # read around the page cache: nothing to drop
            assert kernel_reads and not dropped, dropped
        elif expect_drop:
            assert dropped and all(dropped), dropped
        else:  # the kernel was asked not to drop; Python made no DONTNEED call
            assert not any(dropped) and (bool(dropped) or not kernel_reads), dropped
    os.close(fd)
    # the model: drops the file's expert pages at load only without a link
    store_drops.clear()
    efedge.load(path, cache="50%").close()
    assert store_drops == [1]
    efedge.load(path, cache="50%", link="2GB/s").close()
    assert store_drops == [1]


def test_a_links_demand_loads_are_copied_by_the_compute_thread(tiny_gguf, monkeypatch):
    """With an emulated link a demand load needs no worker: the compute thread reads it
    (from the page cache) and it lands when the link would have delivered it — no job is
    queued for on-demand loading, the logits are the resident ones, the link is metered.
    A read that keeps failing is a TransferError naming the expert, its slot freed."""
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    ids = _ids(12)
    want = _resident_logits(path, ids)
    with efedge.load(path, cache="40%", policy="ondemand", link="1GB/s") as m:
        eng = m._experts.engine
        assert eng.copies_inline
        assert np.array_equal(m.logits(ids), want)
        s = m.stats()
        assert s["misses"] > 0 and s["bytes_loaded"] > 0 and eng.submitted == 0
        assert 0.5e9 < eng.bandwidth_ewma <= 1e9  # the booked link times
        src, cache = m._experts, m._experts.cache
        e = int(np.flatnonzero(cache.where[1] < 0)[0])
        real_read = eng._read
        fail_reads_at(monkeypatch, eng, int(src.store.offsets[1, e, 1]))
        with pytest.raises(TransferError, match=f"expert {e} of layer 1"):
            for _ in src.acquire_batches(1, [e]):
                pass
        assert cache.where[1, e] < 0 and (cache.slot_pins == 0).all()
        monkeypatch.setattr(eng, "_read", real_read)
        assert np.array_equal(m.logits(ids), want)  # and the model goes on


def test_a_links_inline_copy_retries_a_transient_read_error(tiny_gguf, monkeypatch):
    """The compute thread's own demand copy retries a failed read (as a worker does):
    every expert's first read fails, and the logits are still the resident ones."""
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    ids = _ids(10)
    want = _resident_logits(path, ids)
    with efedge.load(path, cache="40%", policy="ondemand", link="1GB/s") as m:
        eng = m._experts.engine
        real_read = eng._read
        gates = {int(o) for o in m._experts.store.offsets[:, :, 0].ravel()}
        failed: set[int] = set()

        def flaky(buf, off):  # each expert's first read of its gate fails, once
            if off in gates and off not in failed:
                failed.add(off)
                raise OSError(5, "injected EIO")
            real_read(buf, off)

        monkeypatch.setattr(eng, "_read", flaky)
        assert np.array_equal(m.logits(ids), want)
        assert failed and eng.inline_copies > 0 and eng.submitted == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl timer slack")
def test_a_wait_for_a_landing_ends_on_time(tiny_gguf):
    """The compute thread waits until a copy's landing time, not for a worker's word, so
    its timed wait must end on time: its timer slack is made tight (Linux lets a normal
    thread's timed waits run 50 µs late) — on that thread, once it waits for a landing."""
    import ctypes

    libc = ctypes.CDLL(None)
    pr_get_timerslack = 30
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    seen = {}

    def compute():
        libc.prctl(pr_get_timerslack - 1, 50_000, 0, 0, 0)  # PR_SET_TIMERSLACK: a normal
        seen["before"] = libc.prctl(pr_get_timerslack, 0, 0, 0, 0)  # thread's (a new
        # thread inherits its creator's, and earlier tests waited on this one)
        with efedge.load(path, cache="40%", policy="ondemand", link="20MB/s") as m:
            src, cache = m._experts, m._experts.cache
            e = int(np.flatnonzero(cache.where[0] < 0)[0])
            for _ in src.acquire_batches(0, [e]):
                pass
            seen["stall"] = m.stats()["stall_s"]
        seen["after"] = libc.prctl(pr_get_timerslack, 0, 0, 0, 0)

    t = threading.Thread(target=compute)
    t.start()
    t.join(30)
    assert seen["stall"] > 0  # it did wait for the landing
    assert seen["before"] == 50_000 and seen["after"] == 1000, seen


def test_a_landed_expert_is_taken_without_its_workers_word(tiny_gguf):
    """Once a copy's bytes are in and the emulated link would have delivered them, the
    compute thread takes the expert even while its worker waits (here: forever, in the
    link's wait) to mark it READY; and that worker, when it does get there, does not mark
    a slot READY that has since gone to another load."""
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    with efedge.load(path, cache="40%", policy="ondemand", link="2GB/s") as m:
        src = m._experts
        cache, eng, store = src.cache, src.engine, src.store
        e = int(np.flatnonzero(cache.where[0] < 0)[0])  # not resident
        release = threading.Event()
        worker_back = []
        real_emulate = eng._emulate_link

        def held_back(nbytes, started, until=0.0):
            release.wait(5)  # the worker does not say READY on its own
            worker_back.append(True)
            real_emulate(nbytes, started, until)

        eng._emulate_link = held_back
        try:
            # a prefetch: a worker's copy (a demand load would be copied by this thread)
            assert src.prefetch(0, [e]) == 1
            deadline = time.perf_counter() + 5
            while cache.slot_land_at[cache.where[0, e]] == np.inf:
                assert time.perf_counter() < deadline, "the copy never landed"
                time.sleep(0.001)
            got = []
            for batch in src.acquire_batches(0, [e]):
                got += batch
            (ge, slot), = got
            assert not worker_back  # taken while its worker was still held back
            assert ge == e and cache.where[0, e] == slot
            assert cache.slot_state[slot] == READY  # marked by the compute thread
            part = cache.slot_parts(slot)[0]
            off, n = int(store.offsets[0, e, 0]), int(store.nbytes[0, e, 0])
            with open(path, "rb") as f:
                f.seek(off)
                assert part[:n].tobytes() == f.read(n)
            # the slot goes to another load before the old worker is back
            other = int(np.flatnonzero(cache.where[0] < 0)[0])
            with src.cond:
                cache.assign(slot, 0, other)
                cache.begin_load(slot)
        finally:
            release.set()
        key = 0 * store.n_expert + e
        for _ in range(500):
            if key not in eng.jobs_by_key:
                break
            threading.Event().wait(0.01)
        assert key not in eng.jobs_by_key
        with src.cond:
            assert cache.slot_state[slot] == 1  # LOADING: the old copy left it alone
            cache.release(slot)


def test_demand_loads_start_before_the_deferred_prediction(tiny_gguf, monkeypatch):
    """Before the policy runs the prediction it deferred (kernels that keep the GIL), the
    compute thread hands the GIL to the workers until the layer's first demand loads
    have started: one sched_yield usually came before the woken worker waited for the
    GIL, and the load started only after the prediction. (Python workers: native ones
    need neither the GIL nor this thread to start.)"""
    from efedge.experts import demand_wait

    monkeypatch.setenv("EFEDGE_NATIVE_WORKERS", "0")
    monkeypatch.setattr(demand_wait, "HAND_OVER_S", 5.0)  # the mechanism, not the machine
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    # no emulated link: a link's demand loads are copied by this thread (copy_inline);
    # the step on this thread (a helper thread's step is posted as the layer routes)
    from efedge.experts.policies import ExpertFlow

    with efedge.load(path, cache="40%", policy=ExpertFlow(predictor_thread=False)) as m:
        src = m._experts
        pol, cache, eng = src.policy, src.cache, src.engine
        seen = []
        real = pol.predictor.step

        def spy(layer, ids, **kw):
            if np.shape(ids)[0] == 1:
                jobs = [eng.jobs_by_key.get(layer * cache.where.shape[1] + int(e))
                        for e in np.flatnonzero(pol.needed)]
                demand = [j for j in jobs if j is not None and j.priority == 0]
                if demand:  # of the loads still in flight, one per worker is under way
                    started = sum(j.started for j in demand)
                    seen.append(started >= min(len(demand), eng.n_workers))
            return real(layer, ids, **kw)

        pol.predictor.step = spy
        m.generate(_ids(8), max_tokens=24, temperature=0)
    assert len(seen) >= 3 and all(seen), seen


def test_expertflow_predicts_once_the_layers_demand_loads_are_queued(tiny_gguf):
    """The predictor step and its plan run in on_demand_issued, after the layer's missing
    experts got their slots and loads: a demand load never waits for the predictor. (On
    the compute thread: with a helper thread — where a core is spare, as after an earlier
    test in this process set one compute thread — the step is posted as the layer routes
    and only the plan waits: tests/test_predictor_thread.py.)"""
    from efedge.experts.policies import ExpertFlow

    path = tiny_gguf("qwen3moe", "Q4_K_M")
    with efedge.load(path, cache="40%", policy=ExpertFlow(predictor_thread=False)) as m:
        src = m._experts
        pol, cache = src.policy, src.cache
        seen = []
        loads_started = []  # since the layer routed: its demand loads were started
        real, real_route, real_start = pol.predictor.step, pol.on_route, src._start_demand_loads

        def route(*a, **kw):
            loads_started.clear()
            return real_route(*a, **kw)

        def start(queued):
            loads_started.append(len(queued))
            return real_start(queued)

        def spy(layer, ids, **kw):
            if np.shape(ids)[0] == 1:  # decode (a prompt may want more than the cache holds)
                need = np.flatnonzero(pol.needed)
                # every expert the layer needs has its slot — or, where a slot could not
                # be had yet (all pinned or loading: it is issued as one comes free), the
                # loads that could start had started
                seen.append((src.counters.misses,
                             bool((cache.where[layer, need] >= 0).all()) or bool(loads_started)))
            return real(layer, ids, **kw)

        pol.predictor.step, pol.on_route, src._start_demand_loads = spy, route, start
        m.generate(_ids(8), max_tokens=24, temperature=0)
    assert seen and all(ok for _, ok in seen), seen
    assert seen[-1][0] > seen[0][0]  # layers did miss: there were demand loads to queue


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
def test_reads_that_drop_pages_sweep_every_expert_page_now_and_then(tiny_gguf, monkeypatch):
    """A read's own drop leaves the page-cache folios it shares with a neighbour: every
    SWEEP_EVERY dropping reads, one fadvise per expert tensor of the file drops them
    (tests/test_memory_budget.py measures what is left). Reads through an emulated link
    keep their pages (the link reads from the page cache): no sweep there."""
    from efedge.experts import engine_reads, file_read

    path = tiny_gguf("qwen3moe", "Q8_0")
    monkeypatch.setattr(engine_reads, "SWEEP_EVERY", 3)
    advised: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def spy(fd, offset, length, advice):
        if advice == os.POSIX_FADV_DONTNEED:
            advised.append((offset, offset + length))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    direct_open = file_read.direct_open
    can_direct = direct_open(path) is not None  # (this file system takes O_DIRECT)
    # the page cache read and dropped (direct reads refused), read around it where the
    # file system allows (nothing dropped, nothing to sweep), an emulated link
    for link, direct, want_sweeps in ((None, False, True), (None, can_direct, not can_direct),
                                      ("2GB/s", can_direct, False)):
        monkeypatch.setattr(file_read, "direct_open",
                            direct_open if direct else lambda p: None)
        advised.clear()
        with efedge.load(path, cache="30%", policy="ondemand", link=link) as m:
            spans = {s for per_file in m._experts.store.expert_spans() for s in per_file}
            eng = m._experts.engine
            assert eng.reads_direct is (direct and link is None)
            advised.clear()  # (the load's own drop)
            m.generate(_ids(), max_tokens=6, temperature=0)
            counters, expert_bytes = m.counters, m._experts.store.expert_bytes(0)
        # (counted once the workers are joined: the compute thread may use an expert that
        # has landed before its worker has counted the read)
        reads = counters.bytes_loaded // expert_bytes
        sweeps = sum(1 for a in advised if a in spans) // len(spans)
        if want_sweeps:
            assert reads >= 3 and sweeps == (reads - eng._drops) // 3 > 0
        else:
            assert reads >= 3 and sweeps == 0 and eng._drops == 0
            assert link is None or eng._sweep_spans is None


def test_the_engine_meters_how_long_one_read_of_the_file_takes(tiny_gguf):
    """Reads overlapping in a drive's queue complete closer together than any one of them
    takes: the engine meters each worker read's own time (read_tail_s: a slow one), and
    expertflow's look-ahead plans with whichever of that and the link meter is longer."""
    from efedge.config import config_from_gguf
    from efedge.experts.policies import _latency

    path = tiny_gguf("qwen3moe", "Q4_K_M")
    gf = GGUFFile(path)
    cfg = config_from_gguf(gf)
    fd = os.open(path, os.O_RDONLY)
    delay = 0.004

    def slow_read(buf, off):  # a drive that takes `delay` per read
        time.sleep(delay)
        buf[:] = np.frombuffer(os.pread(fd, len(buf), off), dtype=np.uint8)

    store = ExpertStore(gf, cfg.n_layer, cfg.n_expert)
    cache = ExpertCache(store, _min_budget(path), cfg.n_expert_used)
    engine = TransferEngine(path, store, cache, Counters(), None, workers=4, read_fn=slow_read)
    try:
        assert engine.read_tail_s == 0.0  # nothing read yet
        jobs = []
        with engine.cond:
            for e in range(4):  # four reads at once, one per worker
                slot = cache.free_or_victim(0, lambda c, cands: int(cands[0]))
                cache.assign(slot, 0, e)
                jobs.append(engine.submit(0, e, slot, 1))
            deadline = time.perf_counter() + 10
            while not all(cache.slot_state[j.slot] == READY for j in jobs):
                assert time.perf_counter() < deadline
                engine.cond.wait(0.05)
        # the parts are read one after the other, each after `delay`
        assert engine.read_s_ewma >= 3 * delay and engine.read_tail_s >= engine.read_s_ewma
        assert _latency(engine) == max(engine.latency_ewma, engine.read_tail_s)
    finally:
        engine.close()
        os.close(fd)

    class LinkOnly:  # (the simulator's engine: a link meter, no reads of its own)
        latency_ewma = 2e-4

    assert _latency(LinkOnly()) == 2e-4


def test_slow_reads_of_the_file_lengthen_expertflows_look_ahead(tiny_gguf, monkeypatch):
    """With reads that take far longer than a layer's compute, expertflow looks as far
    ahead as it may, though the link meter alone would not say so."""
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    horizons = {}
    for tail in (0.0, 0.5):
        monkeypatch.setattr(TransferEngine, "read_tail_s", property(lambda self, t=tail: t))
        with efedge.load(path, cache="50%", policy="expertflow") as m:
            m.generate(_ids(), max_tokens=8, temperature=0)
            ctl = m._experts.policy.controller
            horizons[tail] = (ctl.h_need, ctl.max_horizon)
    assert horizons[0.5][0] == horizons[0.5][1] > horizons[0.0][0]


def test_expertflow_reads_the_link_meter_in_its_controller_kernel(tiny_gguf, monkeypatch):
    """The controller reads the engine's meter array in its kernel (update_meter) where
    the engine's bandwidth and latency are LinkTiming's own properties over it — the file
    read and an emulated link alike —, and the properties where they are overridden."""
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    for link in (None, "2GB/s"):
        with efedge.load(path, cache="50%", policy="expertflow", link=link) as m:
            assert m._experts.policy._meter is m._experts.engine.meter
    monkeypatch.setattr(TransferEngine, "read_tail_s", property(lambda self: 0.5))
    with efedge.load(path, cache="50%", policy="expertflow") as m:
        assert m._experts.policy._meter is None


def test_link_rates_read_bits_and_bytes_apart_and_refuse_a_crawl():
    """B is bytes and b bits (8Gb/s, 8Gbps are 1 GB/s: it read 8 GB/s, a link 8× faster
    than asked); below 100 KB/s a rate is refused (1B/s seemed to hang for hours)."""
    from efedge.errors import EfedgeError
    from efedge.experts.link import parse_link

    assert parse_link("8GB/s").bytes_per_s == parse_link("8GBps").bytes_per_s == 8e9
    assert parse_link("8Gb/s").bytes_per_s == parse_link("8gbps").bytes_per_s == 1e9
    assert parse_link("500MB/s").bytes_per_s == 5e8 and parse_link("1GiB/s").bytes_per_s == 2**30
    for bad, why in (("1B/s", "below 100 KB/s"), ("99KB/s", "below"), ("0MB/s", "positive"),
                     ("fast", "unknown link")):
        with pytest.raises(EfedgeError, match=why):
            parse_link(bad)
