"""Prefetches through an emulated link are copied by the compute thread as the link comes
free (efedge/experts/inline_prefetch.py): no transfer worker is woken for them, the most
urgent is booked first, a prefetch still queued when its layer asks is copied at once,
a cancelled one frees its slot, and a booked one becomes READY when it lands."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

import efedge
from efedge.config import config_from_gguf
from efedge.experts.cache import EMPTY, LOADING, READY, ExpertCache, minimum_budget
from efedge.experts.inline_prefetch import InlinePrefetches
from efedge.experts.link import Link
from efedge.experts.stats import Counters
from efedge.experts.store import ExpertStore
from efedge.experts.transfer import TransferEngine
from efedge.gguf_file import GGUFFile
from tests._faults import fail_reads_at

S_PER_EXPERT = 0.2  # the test link carries one expert in this long


@pytest.fixture
def queue(tiny_gguf):
    """(InlinePrefetches over a cache of the tiny qwen3moe file and an engine whose link
    carries one expert in S_PER_EXPERT, a function giving layer 0's expert e a slot)"""
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    gf = GGUFFile(path)
    cfg = config_from_gguf(gf)
    store = ExpertStore(gf, cfg.n_layer, cfg.n_expert)
    cache = ExpertCache(store, minimum_budget(store, cfg.n_expert_used) * 2,
                        cfg.n_expert_used)
    link = Link("test", store.expert_bytes(0) / S_PER_EXPERT)
    engine = TransferEngine(path, store, cache, Counters(), link, workers=1)
    assert engine.copies_inline

    def slot_for(e: int) -> int:
        s = cache.free_or_victim(0, lambda c, cands: int(cands[0]))
        cache.assign(s, 0, e)
        cache.begin_load(s)
        return s

    try:
        with cache.cond:
            yield InlinePrefetches(cache, store, engine), slot_for
    finally:
        engine.close()
        gf.close()


def test_the_most_urgent_prefetches_are_booked_as_the_link_has_room(queue):
    q, slot_for = queue
    cache = q.cache
    land = cache.slot_land_at
    slots = {e: slot_for(e) for e in (1, 2, 3)}
    q.add([0, 0, 0], [1, 2, 3], [slots[1], slots[2], slots[3]], [5, 3, 4])
    # the link was free: the most urgent (priority 3) starts at once and the next one is
    # booked behind it; the least urgent waits on the compute thread, not on the link
    assert list(q.pending) == [1]
    assert [s for _t, s, *_ in q.booked] == [slots[2], slots[3]]
    assert land[slots[3]] == pytest.approx(land[slots[2]] + S_PER_EXPERT, rel=1e-6)
    assert np.isinf(land[slots[1]])
    q.pump()  # two copies booked ahead: no room yet
    assert list(q.pending) == [1]
    # expert 1's layer asks for it: copied now, a demand load, which goes ahead of the
    # booked prefetch that has not started on the link (3), not of the one on the wire (2)
    assert q.take(0, 1) and not q.pending
    assert land[slots[1]] == pytest.approx(land[slots[2]] + S_PER_EXPERT, rel=1e-6)
    assert land[slots[3]] == pytest.approx(land[slots[1]] + S_PER_EXPERT, rel=1e-6)
    assert q.displaced == 1
    assert [s for _t, s, *_ in q.booked] == [slots[2], slots[1], slots[3]]
    assert not q.take(0, 1)
    assert q.copied == 3 and q.engine.submitted == 0  # no worker took part
    assert all(cache.slot_state[s] == LOADING for s in slots.values())
    # landed ones become READY (evictable, hits), the others stay LOADING
    time.sleep(max(0.0, land[slots[2]] - time.perf_counter()) + 0.01)
    q.sweep()
    assert cache.slot_state[slots[2]] == READY
    assert cache.slot_state[slots[1]] == LOADING


def test_a_demand_load_goes_ahead_of_booked_prefetches_not_asked_for(queue):
    """As on a copy engine, a demand load goes ahead of the prefetches booked behind the
    copy on the wire; one a layer has asked for meanwhile is a demand load itself and
    keeps its place."""
    q, slot_for = queue
    cache, eng = q.cache, q.engine
    land = cache.slot_land_at
    s1, s2 = slot_for(1), slot_for(2)
    q.add([0, 0], [1, 2], [s1, s2], [1, 2])  # 1 on the wire, 2 booked behind it
    s5 = slot_for(5)
    eng.copy_inline(0, 5, s5)  # a layer's demand load, booked behind both
    q.demand(s5)
    assert q.displaced == 1
    assert land[s5] == pytest.approx(land[s1] + S_PER_EXPERT, rel=1e-6)
    assert land[s2] == pytest.approx(land[s5] + S_PER_EXPERT, rel=1e-6)
    assert eng.link_free_at() == pytest.approx(land[s2], rel=1e-9)  # the link's end stays
    q.asked(0, 2, s2)  # a layer waits for expert 2 now
    s6 = slot_for(6)
    eng.copy_inline(0, 6, s6)
    q.demand(s6)
    assert q.displaced == 1
    assert land[s6] == pytest.approx(land[s2] + S_PER_EXPERT, rel=1e-6)
    assert [s for _t, s, *_ in q.booked] == [s1, s5, s2, s6]
    time.sleep(max(0.0, land[s6] - time.perf_counter()) + 0.01)
    q.sweep()
    assert all(cache.slot_state[s] == READY for s in (s1, s2, s5, s6))
    assert not q.booked


def test_a_cancelled_or_released_prefetch_is_not_copied(queue):
    q, slot_for = queue
    cache, n_e = q.cache, q.store.n_expert
    q.add([0, 0], [1, 2], [slot_for(1), slot_for(2)], [1, 1])  # the link booked ahead
    s4, s5 = slot_for(4), slot_for(5)
    q.add([0, 0], [4, 5], [s4, s5], [2, 2])
    assert set(q.pending) == {4, 5}
    # cancelled (its layer came without it): dropped, its slot freed
    assert q.cancel(0 * n_e + 4) and not q.cancel(0 * n_e + 4)
    assert cache.slot_state[s4] == EMPTY and cache.where[0, 4] == -1
    # its slot given to another expert meanwhile (an orphan reaped): not copied into
    cache.release(s5)
    cache.assign(s5, 0, 6)
    cache.begin_load(s5)
    time.sleep(2 * S_PER_EXPERT + 0.02)  # the link comes free
    q.pump()
    assert not q.pending and q.copied == 2
    assert np.isinf(cache.slot_land_at[s5])


def test_a_prefetch_whose_read_fails_is_dropped(queue, monkeypatch, caplog):
    """A prefetch is a guess: a read that keeps failing drops it (its slot freed, a
    warning naming the expert), where a demand load's failure is an error."""
    q, slot_for = queue
    eng, cache = q.engine, q.cache
    s = slot_for(7)
    fail_reads_at(monkeypatch, eng, int(q.store.offsets[0, 7, 1]))
    with caplog.at_level(logging.WARNING, logger="efedge.transfer"):
        q.add([0], [7], [s], [1])
    assert not q.pending and q.copied == 0 and not q.booked
    assert cache.slot_state[s] == EMPTY and cache.where[0, 7] == -1
    assert "prefetch dropped" in caplog.text and "expert 7 of layer 0" in caplog.text


def test_a_links_prefetches_need_no_transfer_worker(tiny_gguf):
    """expertflow through an emulated link: its prefetches are copied by the compute
    thread (none is queued for a worker), they are used, and the logits are the resident
    run's bit for bit."""
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    ids = np.random.default_rng(3).integers(0, 500, 24).tolist()
    with efedge.load(path) as m:
        want = m.logits(ids)
    with efedge.load(path, cache="40%", policy="expertflow", link="1GB/s") as m:
        src = m._experts
        assert src.inline_prefetches is not None
        assert np.array_equal(m.logits(ids), want)
        for t in ids[:8]:  # single-token passes: the policy plans ahead between them
            m.logits([t])
        s = m.stats()
        assert s["prefetch_issued"] > 0 and src.inline_prefetches.copied > 0
        assert src.inline_prefetches.copy_s > 0
        assert s["prefetch_used"] > 0
        assert src.engine.submitted == 0


def test_a_policys_cost_leaves_out_the_copies_its_calls_made(tiny_gguf, monkeypatch):
    """policy cost % (policy_compare.decode_run) is the policy's own work: the copies
    InlinePrefetches makes inside the policy's calls are bytes moved and come off it —
    those alone, not the ones made later while a layer waits (outside the policy's time:
    subtracting them too read a negative cost)."""
    import contextlib

    from efedge import policy_compare

    path = tiny_gguf("qwen3moe", "Q4_K_M")
    ids = np.random.default_rng(5).integers(0, 500, 40).tolist()
    from efedge.experts.native_engine import NativeTransferEngine

    def slowed(real):
        def slow_copy(self, layer, expert, slot):  # every copy takes 2 ms more
            time.sleep(2e-3)
            return real(self, layer, expert, slot)
        return slow_copy

    # (the native engine makes its copy in one call of its own, Python workers' engine
    # through TransferEngine's)
    for cls in (TransferEngine, NativeTransferEngine):
        monkeypatch.setattr(cls, "copy_inline", slowed(cls.copy_inline))
    with efedge.load(path, cache="40%", policy="next-layer", link="1GB/s") as m:
        src, pol = m._experts, m._experts.policy
        seen = {}

        @contextlib.contextmanager
        def decoding():  # the policy's time and its copies' over the decode alone
            seen["start"] = (pol.overhead_s, src.policy_copy_s)
            yield
            seen["end"] = (pol.overhead_s, src.policy_copy_s)

        _s, _p, ovh = policy_compare.decode_run(m, ids, 24, decoding=decoding())
        (o0, c0), (o1, c1) = seen["start"], seen["end"]
        assert c1 - c0 >= 2e-3  # copies were made inside the policy's calls
        assert ovh == pytest.approx(o1 - o0 - (c1 - c0))
        assert 0 <= ovh < o1 - o0


def test_layers_abandoned_half_way_leave_no_slot_loading_for_good(tiny_gguf, monkeypatch):
    """Through an emulated link the compute thread copies a layer's demand loads itself;
    its layer marks each READY as it takes it. A layer abandoned half way (an exception,
    Ctrl-C) took none of the rest: they stayed LOADING — never evicted — until the cache
    had no slot left and the next layer waited for 60 s (found by the cache-invariant
    test). Landed copies are now READY whenever a slot is chosen."""
    from efedge.experts import demand_wait

    monkeypatch.setattr(demand_wait, "WAIT_TIMEOUT_S", 5.0)  # a regression fails fast
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    with efedge.load(path, cache="25%", policy="ondemand", link="200MB/s") as m:
        src, cache = m._experts, m._experts.cache
        rng = np.random.default_rng(0)
        for _ in range(30):
            gen = src.acquire(int(rng.integers(0, 3)), np.sort(rng.choice(16, 4, replace=False)))
            next(gen)
            gen.close()  # abandoned after its first expert
        for layer in range(3):  # every layer still gets its experts
            got = [e for e, _w in src.acquire(layer, np.arange(4))]
            assert sorted(got) == [0, 1, 2, 3]
        time.sleep(0.05)  # every copy has landed
        with cache.cond:
            src.inline_prefetches.sweep()
            assert not (cache.slot_state == LOADING).any()
            assert (cache.slot_pins == 0).all()
