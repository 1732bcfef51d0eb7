"""Cache invariants as a stateful property test over ExpertCache + TransferEngine +
StreamingExperts with a tiny budget, real worker threads and injected faults.

Rules acquire experts (sometimes abandoning the layer half way, sometimes prefetching
while holding a pinned expert), prefetch, cancel prefetches, switch the fault mode
(read errors, stalls, dying workers) and wait for the engine to drain. After every step:

* resident bytes never exceed the budget;
* a slot holds at most one expert and `where` is exactly its inverse;
* no slot is pinned between layer calls; a pinned slot is never evicted or rewritten
  while the compute thread holds it;
* a LOADING slot always has a job behind it — or, through an emulated link (whose copies
  the compute thread makes: demand loads and the prefetch queue), a queued prefetch or a
  booked landing time;
* every yielded expert — and, once idle, every READY slot — equals the file's bytes;
* hits + late + misses == expert_requests, and once idle bytes_loaded equals the bytes
  of the loads that completed.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from efedge.config import config_from_gguf
from efedge.experts.cache import EMPTY, LOADING, READY, ExpertCache
from efedge.experts.link import Link
from efedge.experts.scheduler import make_policy
from efedge.experts.stats import Counters
from efedge.experts.store import ExpertStore
from efedge.experts.streaming import StreamingExperts
from efedge.experts.transfer import TransferEngine
from efedge.gguf_file import GGUFFile

N_LAYER, N_EXPERT, N_ACTIVE = 3, 16, 4  # the "test" preset
FAULTS = ("none", "eio", "stall", "die")


def _bytes(w) -> bytes:
    return w.gate.tobytes() + w.up.tobytes() + w.down.tobytes()


class CacheMachine(RuleBasedStateMachine):
    path = None  # set by the test before running
    raw = b""

    @initialize(policy=st.sampled_from(["ondemand", "lfu"]), extra=st.integers(0, 6),
                workers=st.integers(1, 3), seed=st.integers(0, 2**16),
                link=st.sampled_from([None, 2e9, 0.2e9]))
    def setup(self, policy, extra, workers, seed, link):
        self.gf = GGUFFile(self.path)
        cfg = config_from_gguf(self.gf)
        self.store = store = ExpertStore(self.gf, cfg.n_layer, cfg.n_expert)
        sizes = sorted({store.expert_bytes(i) for i in range(cfg.n_layer)})
        self.budget = cfg.n_expert_used * sum(sizes) + extra * sizes[-1]
        self.counters = Counters()
        self.cache = ExpertCache(store, self.budget, cfg.n_expert_used)
        self.engine = TransferEngine(self.path, store, self.cache, self.counters,
                                     None if link is None else Link("test", link),
                                     workers=workers)
        self.source = StreamingExperts(store, self.cache, self.engine, make_policy(policy),
                                       self.counters, n_active=cfg.n_expert_used)
        self.fault, self.rng, self.lock = "none", random.Random(seed), threading.Lock()
        self.completed = 0  # bytes of loads whose copy finished
        read, copy, inline = self.engine._read, self.engine._copy, self.engine.copy_inline

        def faulty_read(buf, offset):
            on_worker = threading.current_thread().name.startswith("efedge-transfer")
            with self.lock:
                r, mode = self.rng.random(), self.fault
            if on_worker and mode == "eio" and r < 0.5:
                raise OSError(5, "injected EIO")
            if on_worker and mode == "die" and r < 0.3:
                raise RuntimeError("injected worker bug")
            if mode == "stall" and r < 0.5:
                time.sleep(0.002)
            read(buf, offset)

        def counted_copy(job):
            n = copy(job)
            with self.lock:
                self.completed += n
            return n

        def counted_inline(layer, e, slot):
            n = inline(layer, e, slot)
            with self.lock:
                self.completed += n
            return n

        self.engine._read = faulty_read
        self.engine._copy = counted_copy
        self.engine.copy_inline = counted_inline

    def file_bytes(self, layer: int, e: int) -> bytes:
        st_ = self.store
        return b"".join(self.raw[int(st_.offsets[layer, e, p]):
                                 int(st_.offsets[layer, e, p] + st_.nbytes[layer, e, p])]
                        for p in range(3))

    # -- rules ----------------------------------------------------------------------------
    @rule(layer=st.integers(0, N_LAYER - 1),
          experts=st.lists(st.integers(0, N_EXPERT - 1), min_size=1, max_size=8, unique=True),
          stop_after=st.none() | st.integers(0, 7), storm=st.booleans())
    def acquire(self, layer, experts, stop_after, storm):
        cache, key0 = self.cache, layer * N_EXPERT
        seen = []
        gen = self.source.acquire(layer, np.array(sorted(experts)))
        for i, (e, w) in enumerate(gen):
            if stop_after is not None and i == stop_after:
                gen.close()  # the layer call is abandoned (an exception in the compute)
                break
            with cache.cond:
                s = int(cache.where[layer, e])
                assert s >= 0 and cache.slot_state[s] == READY and cache.slot_pins[s] >= 1
                assert cache.slot_owner[s] == key0 + e
            want = self.file_bytes(layer, e)
            assert _bytes(w) == want, f"expert {e} of layer {layer} differs from the file"
            if storm:  # loads racing the compute must not touch the pinned slot
                others = [x for x in range(N_EXPERT) if x not in experts]
                self.source.prefetch(layer, others[:4])
                self.source.prefetch((layer + 1) % N_LAYER, list(range(N_EXPERT)))
                time.sleep(0.001)
                with cache.cond:
                    assert cache.slot_owner[s] == key0 + e and cache.where[layer, e] == s
                assert _bytes(w) == want, "a pinned slot was rewritten"
            seen.append(e)
        if stop_after is None or stop_after >= len(experts):
            assert sorted(seen) == sorted(experts)

    @rule(layer=st.integers(0, N_LAYER - 1),
          experts=st.lists(st.integers(0, N_EXPERT - 1), max_size=8))
    def prefetch(self, layer, experts):
        self.source.prefetch(layer, experts)

    @rule(layer=st.integers(0, N_LAYER - 1),
          experts=st.lists(st.integers(0, N_EXPERT - 1), max_size=8))
    def cancel_prefetch(self, layer, experts):
        self.source.cancel_prefetch(layer, experts)

    @rule(mode=st.sampled_from(FAULTS))
    def set_fault(self, mode):
        with self.lock:
            self.fault = mode

    @rule()
    def wait_idle(self):
        self._drain()
        self._check_idle()

    # -- checks ---------------------------------------------------------------------------
    def _drain(self) -> None:
        deadline = time.monotonic() + 20
        queue = self.source.inline_prefetches
        while time.monotonic() < deadline:
            with self.cache.cond:
                if queue is not None:  # (the compute thread's look at the link)
                    queue.pump()
                    for s in np.flatnonzero(self.cache.slot_state == LOADING):
                        self.source._landed(int(s))  # booked demand loads that landed
                if not self.engine.jobs_by_key and not (self.cache.slot_state == LOADING).any():
                    return
            time.sleep(0.002)
        raise AssertionError("the transfer engine did not drain in 20 s")

    def _check_idle(self) -> None:
        cache = self.cache
        with cache.cond, self.lock:
            assert self.counters.bytes_loaded == self.completed
            for s in np.flatnonzero(cache.slot_state == READY):
                il, e = divmod(int(cache.slot_owner[s]), N_EXPERT)
                n = self.store.expert_bytes(il)
                assert cache.slot_buffer(int(s))[:n].tobytes() == self.file_bytes(il, e)

    @invariant()
    def tables_are_consistent(self):
        cache, c = self.cache, self.counters
        with cache.cond:
            owner, state = cache.slot_owner, cache.slot_state
            # budget: the pools, and the experts that occupy them
            assert cache.nbytes <= self.budget
            resident = sum(self.store.expert_bytes(int(k) // N_EXPERT) for k in owner[owner >= 0])
            assert resident <= self.budget
            # one expert per slot, `where` its exact inverse
            keys = owner[owner >= 0].tolist()
            assert len(keys) == len(set(keys))
            for s in np.flatnonzero(owner >= 0):
                il, e = divmod(int(owner[s]), N_EXPERT)
                assert cache.where[il, e] == s
            assert int((cache.where >= 0).sum()) == len(keys)
            assert ((owner >= 0) == (state != EMPTY)).all()
            # between layer calls nothing is pinned
            assert (cache.slot_pins == 0).all()
            # a LOADING slot has a job (queued or running) behind it, or, through an
            # emulated link, a queued prefetch or a booked landing
            jobs, queue = self.engine.jobs_by_key, self.source.inline_prefetches
            for s in np.flatnonzero(state == LOADING):
                job = jobs.get(int(owner[s]))
                if job is not None and job.slot == s:
                    continue
                queued = queue.pending.get(int(owner[s])) if queue is not None else None
                assert (queued is not None and queued[4] == s) or \
                    np.isfinite(cache.slot_land_at[s]), f"slot {s} LOADING with no job"
            assert c.hits + c.late + c.misses == c.expert_requests
            assert c.bytes_loaded <= self.completed
            assert c.prefetch_used <= c.prefetch_issued

    def teardown(self):
        if getattr(self, "engine", None) is None:
            return
        try:
            with self.lock:
                self.fault = "none"
            self._drain()
            self._check_idle()
        finally:
            self.source.close()
            self.gf.close()


@pytest.fixture(scope="module")
def machine(tiny_gguf):
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    CacheMachine.path, CacheMachine.raw = path, path.read_bytes()
    return CacheMachine


def _settings(n: int, steps: int) -> settings:
    return settings(max_examples=n, stateful_step_count=steps, deadline=None,
                    derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_cache_invariants(machine):
    run_state_machine_as_test(machine, settings=_settings(12, 25))


@pytest.mark.slow
def test_cache_invariants_long(machine):
    run_state_machine_as_test(machine, settings=_settings(200, 60))
