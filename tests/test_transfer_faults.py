"""Transfer faults: read errors, stalls and dying workers in the expert transfer engine.

Faults are injected through the engine's read function (`engine._read`, the `read_fn`
injection point). Whatever happens underneath, the model's logits stay bitwise those of
the all-resident run, a repeated failure is a TransferError naming the expert (never a
hang), a dead worker is replaced and counted, and no slot is left pinned.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import numpy as np
import pytest

import efedge
from efedge.config import config_from_gguf
from efedge.experts import demand_wait
from efedge.experts.cache import LOADING, READY, ExpertCache
from efedge.experts.scheduler import make_policy
from efedge.experts.stats import Counters
from efedge.experts.store import ExpertStore
from efedge.experts.streaming import StreamingExperts
from efedge.experts.transfer import RETRIES, TransferEngine
from efedge.gguf_file import GGUFFile

IDS = np.random.default_rng(1).integers(0, 500, 16).tolist()
PROMPT = IDS[:6]
N_EXPERT = 16  # the default "test" preset


class Faults:
    """Replaces engine._read. `rule(key, part, on_worker)` returns None (read normally),
    an exception to raise, a float (seconds to sleep first) or an Event (wait for it,
    then read). Calls are counted per (outcome, thread kind)."""

    def __init__(self, engine: TransferEngine, rule=None):
        self.engine, self.rule = engine, rule
        self.read = engine._read
        store = engine.store
        self.where = {int(store.offsets[il, e, p]): (il * store.n_expert + e, p)
                      for il in range(store.n_layer) for e in range(store.n_expert)
                      for p in range(3)}
        self.calls: Counter = Counter()
        self.lock = threading.Lock()
        engine._read = self

    def __call__(self, buf, offset: int) -> None:
        key, part = self.where[int(offset)]
        on_worker = threading.current_thread().name.startswith("efedge-transfer")
        who = "worker" if on_worker else "compute"
        with self.lock:
            action = self.rule(key, part, on_worker) if self.rule else None
        if isinstance(action, BaseException):
            with self.lock:
                self.calls[(type(action).__name__, who)] += 1
            raise action
        if isinstance(action, float):
            time.sleep(action)
        elif isinstance(action, threading.Event):
            action.wait()
        with self.lock:
            self.calls[("read", who)] += 1
        self.read(buf, offset)


@pytest.fixture(autouse=True)
def python_workers(monkeypatch):
    """These faults are injected into the Python workers' reads (engine._read); native
    workers read without Python: their faults are in tests/test_native_workers.py."""
    monkeypatch.setenv("EFEDGE_NATIVE_WORKERS", "0")


@pytest.fixture(scope="module")
def path(tiny_gguf):
    return tiny_gguf("qwen3moe", "Q4_K_M")


@pytest.fixture(scope="module")
def min_budget(path) -> int:
    gf = GGUFFile(path)
    cfg = config_from_gguf(gf)
    store = ExpertStore(gf, cfg.n_layer, cfg.n_expert)
    budget = cfg.n_expert_used * sum({store.expert_bytes(i) for i in range(cfg.n_layer)})
    del store
    gf.close()
    return budget


@pytest.fixture(scope="module")
def reference(path):
    """Resident logits, greedy text and the (layer, experts) each layer call asked for."""
    routes: list[tuple[int, list[int]]] = []
    with efedge.load(path) as m:
        # the model's routing hook: resident experts are computed without acquire()
        def recording(layer, hidden, ids):
            routes.append((int(layer), [int(e) for e in np.unique(ids)]))

        m._tf.on_route = recording
        logits = m.logits(IDS)
        greedy = m.generate(PROMPT, max_tokens=8, temperature=0)
    return logits, greedy, routes


def _load(path, budget, policy="ondemand", workers=2):
    m = efedge.load(path, cache=budget, policy=policy, transfer_workers=workers)
    return m, m._experts.engine


def _check_clean(m) -> None:
    """Counters add up, nothing pinned, no slot LOADING without a job behind it."""
    s = m.stats()
    assert s["hits"] + s["late"] + s["misses"] == s["expert_requests"] > 0
    src = m._experts
    with src.cond:
        assert (src.cache.slot_pins == 0).all()
        loading = np.flatnonzero(src.cache.slot_state == 1)
        keys = {j.layer * src.store.n_expert + j.expert for j in src.engine.jobs_by_key.values()}
        assert all(int(src.cache.slot_owner[s]) in keys for s in loading)


def test_transient_read_errors_are_retried_by_the_worker(path, min_budget, reference):
    ref, greedy, _ = reference
    failed: Counter = Counter()

    def first_read_fails(key, part, on_worker):
        # each expert's first RETRIES - 1 reads fail: the last attempt gets through
        if on_worker and failed[key] < RETRIES - 1:
            failed[key] += 1
            return OSError(5, "injected EIO")
        return None

    m, engine = _load(path, min_budget)
    m._experts._takes_loads = False  # (the workers' retries: every load on a worker)
    with m:
        faults = Faults(engine, first_read_fails)
        assert np.array_equal(m.logits(IDS), ref)
        assert m.generate(PROMPT, max_tokens=8, temperature=0) == greedy
        assert faults.calls[("OSError", "worker")] > 0
        # every failure was absorbed by a retry on the worker: nothing loaded synchronously
        assert faults.calls[("read", "compute")] == 0
        _check_clean(m)


@pytest.mark.slow  # ~1 s per synchronous load until the xfail below is fixed
@pytest.mark.parametrize("policy", ["ondemand", "expertflow"])
def test_failed_loads_fall_back_to_synchronous_reads(path, min_budget, reference, policy):
    """Every worker read fails: each job (prefetch or demand) is tried RETRIES times,
    fails, and the compute thread loads the expert itself."""
    ref, greedy, _ = reference

    def workers_fail(key, part, on_worker):
        return OSError(5, "injected EIO") if on_worker else None

    m, engine = _load(path, min_budget, policy)
    with m:
        faults = Faults(engine, workers_fail)
        assert np.array_equal(m.logits(IDS), ref)
        assert m.generate(PROMPT, max_tokens=8, temperature=0) == greedy
        s = m.stats()
        n_fail = faults.calls[("OSError", "worker")]
        assert n_fail >= RETRIES and faults.calls[("read", "compute")] > 0
        if policy == "expertflow":
            assert s["prefetch_issued"] > 0
        # only synchronous loads brought bytes in
        assert s["bytes_loaded"] > 0 and faults.calls[("read", "worker")] == 0
        _check_clean(m)


def _components(path, budget, policy="ondemand"):
    gf = GGUFFile(path)
    cfg = config_from_gguf(gf)
    store = ExpertStore(gf, cfg.n_layer, cfg.n_expert)
    counters = Counters()
    cache = ExpertCache(store, budget, cfg.n_expert_used)
    engine = TransferEngine(path, store, cache, counters, workers=2)
    source = StreamingExperts(store, cache, engine, make_policy(policy), counters,
                              n_active=cfg.n_expert_used)
    raw = open(path, "rb").read()

    def file_bytes(layer, e):
        return b"".join(raw[int(store.offsets[layer, e, p]):
                            int(store.offsets[layer, e, p] + store.nbytes[layer, e, p])]
                        for p in range(3))

    return gf, source, counters, file_bytes


def test_late_prefetch_that_fails_is_loaded_synchronously(path, min_budget):
    """The layer asks for an expert whose prefetch is in flight (late); the prefetch then
    fails on every retry; the waiting compute thread loads it itself."""
    gf, source, counters, file_bytes = _components(path, min_budget)
    go, started = threading.Event(), threading.Event()
    layer, e = 1, 5
    target = layer * source.store.n_expert + e

    def rule(key, part, on_worker):
        if key == target and on_worker:
            started.set()
            go.wait(10)
            return OSError(5, "injected EIO")
        return None

    faults = Faults(source.engine, rule)
    assert source.prefetch(layer, [e]) == 1
    # a prefetch no worker has begun would be taken over by the demand (read on the
    # compute thread, never failing on a worker): wait until a worker is in its read
    assert started.wait(10), "no worker began the prefetch"
    out: dict = {}

    def compute():
        try:
            out["got"] = [(x, w.gate.tobytes() + w.up.tobytes() + w.down.tobytes())
                          for x, w in source.acquire(layer, np.array([e]))]
        except BaseException as exc:  # noqa: BLE001 - reported below
            out["error"] = exc

    t = threading.Thread(target=compute)
    t.start()
    deadline = time.monotonic() + 10
    while counters.late == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    go.set()
    t.join(20)
    assert not t.is_alive(), "the waiter hung on a failed prefetch"
    assert "error" not in out, out.get("error")
    assert out["got"] == [(e, file_bytes(layer, e))]
    assert counters.late == 1 and counters.prefetch_used == 1
    assert faults.calls[("OSError", "worker")] == RETRIES
    assert faults.calls[("read", "compute")] == 3  # gate, up, down on the compute thread
    assert (source.cache.slot_pins == 0).all()
    source.close()
    gf.close()


def test_a_synchronous_reload_does_not_idle(path, min_budget):
    gf, source, counters, file_bytes = _components(path, min_budget)
    Faults(source.engine, lambda key, part, on_worker: OSError(5, "EIO") if on_worker else None)
    try:
        t0 = time.perf_counter()
        got = [e for e, _ in source.acquire(1, np.array([3]))]
        dt = time.perf_counter() - t0
    finally:
        source.close()
        gf.close()
    assert got == [3]
    assert dt < 0.5, f"one synchronous reload took {dt:.2f} s"


def test_an_interrupted_synchronous_load_leaves_no_stuck_slot(path, min_budget, monkeypatch):
    monkeypatch.setattr(demand_wait, "WAIT_TIMEOUT_S", 0.5)
    gf, source, counters, file_bytes = _components(path, min_budget)
    interrupt = [True]

    def rule(key, part, on_worker):
        if on_worker:
            return OSError(5, "EIO")  # force the synchronous path
        if interrupt[0]:
            interrupt[0] = False
            return KeyboardInterrupt()  # Ctrl-C lands during the compute thread's read
        return None

    Faults(source.engine, rule)
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in source.acquire(1, np.array([3])):
                pass
        assert (source.cache.slot_pins == 0).all()
        assert [e for e, _ in source.acquire(1, np.array([3]))] == [3]
    finally:
        source.close()
        gf.close()


def test_a_slot_left_loading_without_a_copy_is_recovered(path, min_budget):
    """Ctrl-C between giving a slot to an expert and queuing its copy leaves the slot
    LOADING with no job: a request for that expert queues the copy after a second
    without progress, and an orphan nobody waits for is freed for others."""
    gf, source, counters, file_bytes = _components(path, 2 * min_budget)
    cache = source.cache
    try:
        with source.cond:  # two orphans of layer 1: expert 3 (wanted below), expert 5
            orphans = {}
            for e in (3, 5):
                slot = cache.free_or_victim(1, source.policy.victim)
                cache.assign(slot, 1, e)
                orphans[e] = slot
        got = [(e, bytes(cache.slot_buffer(cache.where[1, e]))) for e, _ in
               source.acquire(1, np.array([3]))]
        assert got == [(3, file_bytes(1, 3))]
        with source.cond:
            assert cache.slot_state[orphans[5]] != LOADING and cache.where[1, 5] < 0
        assert (cache.slot_pins == 0).all()
    finally:
        source.close()
        gf.close()


def test_an_expert_that_never_reads_is_a_transfer_error(path, min_budget, reference):
    ref, greedy, routes = reference
    layer, experts = routes[1]  # the second MoE layer call of the reference run
    bad = layer * N_EXPERT + experts[0]
    broken = [True]

    def rule(key, part, on_worker):
        return OSError(5, "injected EIO") if key == bad and broken[0] else None

    m, engine = _load(path, min_budget)
    with m:
        Faults(engine, rule)
        t0 = time.monotonic()
        with pytest.raises(efedge.TransferError,
                           match=f"expert {experts[0]} of layer {layer}") as info:
            m.logits(IDS)
        assert time.monotonic() - t0 < 20
        assert "EIO" in str(info.value)
        _check_clean(m)
        broken[0] = False  # the disk recovers: the same model carries on, correctly
        assert np.array_equal(m.logits(IDS), ref)
        assert m.generate(PROMPT, max_tokens=8, temperature=0) == greedy
        _check_clean(m)


def test_dead_workers_are_replaced_and_counted(path, min_budget, reference):
    ref, greedy, _ = reference
    threads_before = threading.active_count()
    kills = [3]

    def rule(key, part, on_worker):
        if on_worker and kills[0] > 0:
            kills[0] -= 1
            return RuntimeError("injected worker bug")
        return None

    m, engine = _load(path, min_budget, workers=2)
    with m:
        faults = Faults(engine, rule)
        assert np.array_equal(m.logits(IDS), ref)
        assert m.generate(PROMPT, max_tokens=8, temperature=0) == greedy
        assert faults.calls[("RuntimeError", "worker")] == 3
        assert engine.workers_replaced == 3
        # the pool is whole again, and the dead threads are gone
        assert sum(t.is_alive() for t in engine._threads) == 2
        assert threading.active_count() == threads_before + 2
        # the jobs the dead workers held were loaded synchronously, not lost
        assert faults.calls[("read", "compute")] >= 3
        _check_clean(m)
    assert threading.active_count() == threads_before


@pytest.mark.slow
def test_every_worker_dying_still_gives_correct_logits(path, min_budget, reference):
    ref, _, _ = reference

    def rule(key, part, on_worker):
        return ValueError("injected: every worker dies") if on_worker else None

    m, engine = _load(path, min_budget, policy="expertflow")
    with m:
        faults = Faults(engine, rule)
        assert np.array_equal(m.logits(IDS), ref)
        assert engine.workers_replaced == faults.calls[("ValueError", "worker")] > 0
        assert sum(t.is_alive() for t in engine._threads) == 2
        _check_clean(m)


def test_stalls_stall_but_do_not_change_logits(path, min_budget, reference):
    ref, _, _ = reference
    rng = random.Random(3)

    def rule(key, part, on_worker):
        return 0.01 if on_worker and rng.random() < 0.3 else None

    m, engine = _load(path, min_budget)
    # every load goes through a worker (else the compute thread may read a delayed expert
    # itself, and how much of the injected delay is waited on depends on the scheduling)
    m._experts._takes_loads = False
    with m:
        # a pass without faults first: on a fresh install it compiles the kernels this
        # pass needs, and a compile between a layer's loads and its wait hides the delays
        assert np.array_equal(m.logits(IDS), ref)
        stalled = m.stats()["stall_s"]
        faults = Faults(engine, rule)
        assert np.array_equal(m.logits(IDS), ref)
        assert faults.calls[("read", "compute")] == 0
        # ~30% of ~135 reads sleep 10 ms on two workers: ~0.14 s waited here, never < 0.05
        assert m.stats()["stall_s"] - stalled > 0.05, (faults.calls, stalled)
        _check_clean(m)


def test_a_stall_longer_than_the_timeout_is_an_error_not_a_hang(path, min_budget, reference,
                                                                monkeypatch):
    ref, _, routes = reference
    monkeypatch.setattr(demand_wait, "WAIT_TIMEOUT_S", 0.5)
    layer, experts = routes[0]
    stuck = layer * N_EXPERT + experts[0]
    release = threading.Event()

    def rule(key, part, on_worker):
        return release if key == stuck and on_worker else None

    m, engine = _load(path, min_budget)
    m._experts._takes_loads = False  # (else this thread may read it first, not stuck)
    try:
        Faults(engine, rule)
        t0 = time.monotonic()
        with pytest.raises(efedge.TransferError, match=f"layer {layer} made no progress"):
            m.logits(IDS)
        assert time.monotonic() - t0 < 10
        release.set()  # the read completes late; the model is still whole
        assert np.array_equal(m.logits(IDS), ref)
        _check_clean(m)
    finally:
        release.set()
        m.close()


@pytest.mark.slow
def test_random_faults_throughout_keep_logits_exact(path, min_budget, reference):
    """Seeded mix of read errors, stalls and worker deaths over several calls."""
    ref, greedy, _ = reference
    rng = random.Random(11)

    def rule(key, part, on_worker):
        if not on_worker:
            return None
        r = rng.random()
        if r < 0.15:
            return OSError(5, "injected EIO")
        if r < 0.20:
            return RuntimeError("injected worker bug")
        if r < 0.30:
            return 0.002
        return None

    m, engine = _load(path, min_budget, policy="expertflow")
    with m:
        faults = Faults(engine, rule)
        for _ in range(3):
            assert np.array_equal(m.logits(IDS), ref)
        assert m.generate(PROMPT, max_tokens=8, temperature=0) == greedy
        assert engine.workers_replaced == faults.calls[("RuntimeError", "worker")] > 0
        assert faults.calls[("OSError", "worker")] > 0
        _check_clean(m)


@pytest.mark.slow
def test_slots_stay_consistent_after_faults(path, min_budget):
    """Component level: after a storm of failures, every READY slot holds its expert's
    file bytes and no slot belongs to two experts."""
    gf, source, counters, file_bytes = _components(path, min_budget)
    rng = random.Random(5)

    def rule(key, part, on_worker):
        return OSError(5, "injected") if on_worker and rng.random() < 0.4 else None

    Faults(source.engine, rule)
    cache, store = source.cache, source.store
    nprng = np.random.default_rng(2)
    for _ in range(60):
        layer = int(nprng.integers(store.n_layer))
        want = np.unique(nprng.integers(0, store.n_expert, 4))
        for e, w in source.acquire(layer, want):
            assert w.gate.tobytes() + w.up.tobytes() + w.down.tobytes() == file_bytes(layer, e)
        source.prefetch(int(nprng.integers(store.n_layer)), nprng.integers(0, store.n_expert, 2))
    source.engine.close()
    owners = cache.slot_owner[cache.slot_owner >= 0]
    assert len(owners) == len(set(owners.tolist()))
    for s in np.flatnonzero(cache.slot_state == READY):
        il, e = divmod(int(cache.slot_owner[s]), store.n_expert)
        assert cache.where[il, e] == s
        n = store.expert_bytes(il)
        assert cache.slot_buffer(int(s))[:n].tobytes() == file_bytes(il, e)
    assert counters.hits + counters.late + counters.misses == counters.expert_requests
    gf.close()


def test_a_demand_load_no_worker_has_started_is_read_by_the_waiting_thread(
        path, min_budget, reference):
    """Reading the file itself, a layer's thread with nothing left to compute reads a
    demand load that no worker has started (the workers busy, or still waking) instead of
    waiting for one: exact logits, fewer waits; a read it takes that fails is retried
    there, then left to the usual reload. Through an emulated link demand loads are
    copied by that thread at once anyway: nothing to take."""
    ref, greedy, _ = reference

    def slow_workers(key, part, on_worker):
        return 0.02 if on_worker else None  # every worker read takes 20 ms

    m, engine = _load(path, min_budget, workers=1)
    with m:
        faults = Faults(engine, slow_workers)
        assert np.array_equal(m.logits(IDS), ref)
        assert m._experts.loads_taken > 0 and faults.calls[("read", "compute")] > 0
        _check_clean(m)
    failed: Counter = Counter()

    def compute_fails_once(key, part, on_worker):
        if on_worker:
            return 0.02
        if failed[key] == 0:
            failed[key] += 1
            return OSError(5, "injected EIO")
        return None

    m, engine = _load(path, min_budget, workers=1)
    with m:
        faults = Faults(engine, compute_fails_once)
        assert m.generate(PROMPT, max_tokens=8, temperature=0) == greedy
        assert m._experts.loads_taken > 0 and faults.calls[("OSError", "compute")] > 0
        _check_clean(m)
    with efedge.load(path, cache=min_budget, link="2GB/s") as m:
        assert np.array_equal(m.logits(IDS), ref)
        assert m._experts.loads_taken == 0
