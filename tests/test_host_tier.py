"""The second expert-cache level of device="cuda" in pinned host memory (efedge/gpu/
host_tier.py), on torch's CPU device: parity, counters, budget and pins, staging from
expertflow's predictions behind VRAM loads, argument errors."""

from __future__ import annotations

import errno
import os
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import efedge  # noqa: E402
from efedge.config import config_from_gguf  # noqa: E402
from efedge.errors import CacheBudgetError, EfedgeError  # noqa: E402
from efedge.experts.cache import LOADING, READY  # noqa: E402
from efedge.experts.scheduler import make_policy  # noqa: E402
from efedge.experts.stats import Counters  # noqa: E402
from efedge.experts.store import ExpertStore  # noqa: E402
from efedge.experts.transfer import PREFETCH, RETRIES, Job  # noqa: E402
from efedge.gguf_file import GGUFFile  # noqa: E402
from efedge.gpu import load_cuda_model  # noqa: E402
from efedge.gpu.cache import (  # noqa: E402
    STAGE_PRIORITY,
    DeviceBackend,
    GpuExpertCache,
    GpuStreamingExperts,
    GpuTransferEngine,
    StageJob,
)
from efedge.gpu.host_tier import HostTier  # noqa: E402


def _ids(n: int = 24, seed: int = 5, vocab: int = 500) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def _run(g, ids) -> np.ndarray:
    """All-token logits of a prompt, then decode steps: the batched and per-token paths."""
    kv = g.new_kv_cache(64)
    out = [g.forward(ids, 0, kv)]
    for i, t in enumerate(ids[:6]):
        out.append(g.forward([t], len(ids) + i, kv))
    return np.concatenate(out)


def _settled(g, timeout: float = 10.0) -> None:
    """Until no copy is under way and no host slot pinned, at most `timeout` s: a prefetch
    issued near the end of a run still holds its host slot's pin while it copies (a clean
    clone's CI read host_pinned 1 there once). A pin left after that is a leak."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and (g.source.engine.busy()
                                      or g.host_tier.stats()["host_pinned"]):
        time.sleep(0.005)


@pytest.fixture(scope="module")
def q4km(tiny_gguf):
    return tiny_gguf("qwen3moe", "Q4_K_M")


@pytest.fixture(scope="module")
def resident_logits(q4km):
    # scratch_bytes=1: one expert per batch, so the products' shapes (and bits) do not
    # depend on which experts happened to be ready together
    with load_cuda_model(q4km, device="cpu", n_ctx=64, scratch_bytes=1) as g:
        return _run(g, _ids())


@pytest.mark.parametrize("policy", ["ondemand", "expertflow"])
def test_two_levels_give_the_resident_logits_bit_for_bit(q4km, resident_logits, policy):
    # VRAM cache < host tier < all experts: both levels evict
    with load_cuda_model(q4km, device="cpu", n_ctx=64, cache="30%", host_cache="60%",
                         policy=policy, hybrid="off", scratch_bytes=1) as g:
        host, vram = g.host_tier, g.source.cache
        assert vram.nbytes < host.nbytes < g.store.total_bytes()
        out = _run(g, _ids())
        _settled(g)
        c = g.counters
        st = g.extra_stats()
        staged = st["host_stage_issued"]
    assert np.array_equal(out.view(np.uint32), resident_logits.view(np.uint32))
    assert c.host_hits > 0 and c.host_misses > 0
    assert c.bytes_loaded > 0 and c.disk_bytes > 0
    assert st["host_cache_bytes"] == host.nbytes and st["host_pinned"] == 0
    if policy == "expertflow":  # its predictions queued staging loads
        assert staged > 0
    else:
        assert staged == 0 and c.host_staged == 0


# -- the engine, built by hand: counters, read-once, priorities ------------------------------

class CountingRead:
    """A read function for the engine (Python reads, not the kernel) that counts bytes
    and can log the order of the experts read (by file offset)."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDONLY)
        self.bytes = 0
        self.offsets: list[int] = []
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()
        self.fail = 0  # this many next reads raise a disk error

    def __call__(self, buf, offset: int) -> None:
        self.gate.wait(10)
        with self.lock:
            if self.fail > 0:
                self.fail -= 1
                raise OSError(errno.EIO, "Input/output error (injected)")
        view = memoryview(buf)
        n = os.preadv(self.fd, [view], offset)
        assert n == len(view)
        with self.lock:
            self.bytes += n
            self.offsets.append(offset)

    def close(self):
        os.close(self.fd)


def _parts(path, vram_experts: int, host_experts: int, policy="ondemand", workers=2,
           disk_link=None):
    gf = GGUFFile(path)
    cfg = config_from_gguf(gf)
    store = ExpertStore(gf, cfg.n_layer, cfg.n_expert)
    per = max(store.expert_bytes(i) for i in range(cfg.n_layer))
    backend = DeviceBackend("cpu")
    cache = GpuExpertCache(store, vram_experts * per, cfg.n_expert_used, backend)
    host = HostTier(store, host_experts * per, cfg.n_expert_used, backend, disk_link)
    reads = CountingRead(path)
    counters = Counters()
    engine = GpuTransferEngine(path, store, cache, counters, backend, None, workers,
                               read_fn=reads, host_tier=host)
    src = GpuStreamingExperts(store, cache, engine, make_policy(policy), counters,
                              n_active=cfg.n_expert_used)
    return gf, store, host, reads, src


def _close(gf, reads, src):
    src.close()
    reads.close()
    gf.close()


def _drain(src, layer, experts):
    for _batch in src.acquire_batches(layer, np.asarray(experts)):
        pass


def test_counters_add_up_and_disk_bytes_are_the_file_reads(tiny_gguf):
    path = tiny_gguf("qwen3moe", "F16")  # one size class: slot counts are exact
    gf, store, host, reads, src = _parts(path, vram_experts=4, host_experts=8)
    try:
        c = src.counters
        rng = np.random.default_rng(0)
        copies = 0
        for _ in range(12):
            layer = int(rng.integers(0, store.n_layer))
            experts = rng.choice(store.n_expert, 2, replace=False)
            before = c.bytes_loaded
            _drain(src, layer, experts)
            copies += (c.bytes_loaded - before) // store.expert_bytes(layer)
        assert copies > 0 and c.host_hits > 0 and c.host_misses > 0
        assert c.host_hits + c.host_misses == copies == c.misses + c.late
        assert c.disk_bytes == reads.bytes == c.host_misses * store.expert_bytes(0)
        t = host.tables
        assert t.nbytes <= 8 * store.expert_bytes(0) and not t.slot_pins.any()
    finally:
        _close(gf, reads, src)


def test_host_tier_budget_pins_and_eviction_order(tiny_gguf):
    path = tiny_gguf("qwen3moe", "F16")
    gf = GGUFFile(path)
    cfg = config_from_gguf(gf)
    store = ExpertStore(gf, cfg.n_layer, cfg.n_expert)
    per = store.expert_bytes(0)
    try:
        budget = 5 * per + per // 2
        host = HostTier(store, budget, 2, DeviceBackend("cpu"))
        assert host.n_slots == 5 and host.nbytes <= budget
        assert sum(p.numel() for p in host.pools) == host.nbytes
        vram_where = np.full((store.n_layer, store.n_expert), -1, dtype=np.int64)
        host.watch(vram_where)
        got = {}
        for e in range(5):  # fill every slot; e 0 stays pinned
            s, hit = host.acquire(0, e)
            assert not hit and host.tables.slot_state[s] == LOADING
            host.mark_ready(s)
            got[e] = s
            if e:
                host.unpin(s)
        assert host.acquire(0, 3) == (got[3], True)  # a hit pins and touches
        host.unpin(got[3])
        vram_where[0, 4] = 7  # resident in VRAM: the preferred victim
        s, hit = host.acquire(1, 0)
        assert not hit and s == got[4]
        host.mark_ready(s)
        host.unpin(s)
        # then the least recently used unpinned: 1 (0 is pinned, 3 was touched)
        s, _ = host.acquire(1, 1)
        assert s == got[1] and host.tables.slot_owner[got[0]] == 0  # never the pinned one
        # a staging claim evicts only what is less likely to be needed than it brings
        pred = type("P", (), {"p_next": np.zeros((store.n_layer, store.n_expert),
                                                 np.float32)})()
        pred.p_next[0, 2] = pred.p_next[0, 3] = 0.9
        pred.p_next[1, 0] = 0.9
        host.watch(vram_where, pred)
        assert host.claim(2, 5, 0.5) == -1  # every evictable one is worth 0.9
        assert host.claim(0, 2, 1.0) == -1  # already held
        s_new = host.claim(2, 6, 0.95)
        assert s_new >= 0 and host.tables.slot_state[s_new] == LOADING
        host.release(s_new)  # a failed read forgets the slot
        assert host.tables.where[2, 6] == -1
        # pinned and LOADING slots are never victims: with all five held, a claim fails
        held = [got[0], s]  # pinned (0, 0); (1, 1) still LOADING and pinned
        assert all(host.tables.slot_pins[x] > 0 for x in held)
        assert (host.tables.slot_state[held[1]] == LOADING)
        assert int((host.tables.slot_state != 0).sum()) <= host.n_slots
        # a waiter for an expert being read gets it once it is READY, no second read
        out = []
        th = threading.Thread(target=lambda: out.append(host.acquire(1, 1)))
        th.start()
        th.join(0.2)
        assert th.is_alive()  # waiting for the reader
        host.mark_ready(s)
        th.join(5)
        assert out == [(s, True)]
        assert host.tables.slot_pins[s] == 2
    finally:
        gf.close()


def test_an_expert_being_read_is_not_read_twice(tiny_gguf):
    path = tiny_gguf("qwen3moe", "F16")
    gf, store, host, reads, src = _parts(path, vram_experts=4, host_experts=6)
    try:
        # hold the read; the VRAM job for expert 3 starts it
        reads.gate.clear()
        with src.cond:
            src.cache.assign(0, 0, 3)
            src.engine.submit(0, 3, 0, PREFETCH)
        for _ in range(200):
            if host.tables.where[0, 3] >= 0:
                break
            threading.Event().wait(0.005)
        # a second copy of the same expert (another VRAM slot) must wait for that read
        t = threading.Thread(target=src.engine.load_now, args=(0, 3, 1))
        t.start()
        t.join(0.1)
        assert t.is_alive()
        reads.gate.set()
        t.join(10)
        with src.cond:
            while src.cache.slot_state[0] != READY:
                src.cond.wait(1)
        assert reads.bytes == store.expert_bytes(0)  # one file read
        assert src.counters.host_misses == 1 and src.counters.host_hits == 1
    finally:
        reads.gate.set()
        _close(gf, reads, src)


def test_staging_queues_behind_every_vram_load(tiny_gguf):
    path = tiny_gguf("qwen3moe", "F16")
    gf, store, host, reads, src = _parts(path, vram_experts=4, host_experts=8, workers=1)
    try:
        assert StageJob(STAGE_PRIORITY, 0, 0, 0, -1) > Job(10**9, 1, 0, 0, 0)
        assert Job(PREFETCH, 2, 0, 0, 0) < StageJob(STAGE_PRIORITY, 1, 0, 0, -1)
        reads.gate.clear()  # the one worker blocks on its first read
        with src.cond:
            src.cache.assign(0, 0, 1)
            src.engine.submit(0, 1, 0, PREFETCH)  # the worker takes it
        for _ in range(200):
            if host.tables.where[0, 1] >= 0:
                break
            threading.Event().wait(0.005)
        # queued while the worker is busy: staging first, then a VRAM prefetch
        assert src.stage(1, [5, 6], priority=0) == 2
        assert src.stage(1, [5, 6]) == 0  # already queued: not twice
        with src.cond:
            src.cache.assign(1, 1, 2)
            src.engine.submit(1, 2, 1, 10**6)
        reads.gate.set()
        with src.cond:
            while src.engine._stage_queued:
                src.cond.wait(1)
        off = store.offsets
        first = [int(off[0, 1, 0]), int(off[1, 2, 0]), int(off[1, 5, 0]), int(off[1, 6, 0])]
        gates = [o for o in reads.offsets if o in first]
        assert gates == first  # the VRAM loads were read before the staged ones
        c = src.counters
        assert c.host_staged == 2 and host.contains(1, 5) and host.contains(1, 6)
        assert c.disk_bytes == reads.bytes == 4 * store.expert_bytes(0)
        # a staged expert later wanted in VRAM is a host hit: no file read
        _drain(src, 1, [5])
        assert c.host_hits == 1 and reads.bytes == 4 * store.expert_bytes(0)
        # a newer prediction for the layer drops the queued staging it does not repeat
        reads.gate.clear()
        with src.cond:
            src.cache.assign(3, 2, 9)
            src.engine.submit(2, 9, 3, PREFETCH)
        src.stage(2, [3, 4])
        src.stage(2, [4])
        assert src.engine.stage_cancelled == 1
        reads.gate.set()
    finally:
        reads.gate.set()
        _close(gf, reads, src)


def test_a_failed_staging_read_is_retried_then_dropped(tiny_gguf, caplog):
    """A staging load is a hint: a disk error is retried as any load's, and one that
    persists drops the load, frees its host slot and leaves the tier working."""
    path = tiny_gguf("qwen3moe", "F16")
    gf, store, host, reads, src = _parts(path, vram_experts=4, host_experts=8)
    eng, c = src.engine, src.counters

    def settle():
        with src.cond:
            while eng._stage_queued:
                src.cond.wait(1)

    try:
        reads.fail = 1  # one transient error: the second attempt stages it
        assert src.stage(1, [3], priority=0) == 1
        settle()
        assert c.host_staged == 1 and host.contains(1, 3) and reads.fail == 0
        reads.fail = RETRIES  # every attempt fails: dropped
        assert src.stage(1, [4], priority=0) == 1
        settle()
        assert c.host_staged == 1 and not host.contains(1, 4) and reads.fail == 0
        t = host.tables
        assert t.where[1, 4] < 0 and not (t.slot_state == LOADING).any()
        assert sum("expert 1/4 failed" in r.getMessage() for r in caplog.records) == RETRIES
        assert src.stage(1, [4], priority=0) == 1  # the disk is back: staged now
        settle()
        assert c.host_staged == 2 and host.contains(1, 4)
    finally:
        _close(gf, reads, src)


def test_staging_never_takes_the_last_free_worker(tiny_gguf):
    """A staging load (a disk read for a hint) may hold at most workers - 1 workers, so a
    demand load arriving meanwhile always finds one."""
    path = tiny_gguf("qwen3moe", "F16")
    gf, store, host, reads, src = _parts(path, vram_experts=4, host_experts=8, workers=2)
    eng = src.engine
    try:
        reads.gate.clear()  # every read blocks until the gate opens
        assert src.stage(1, [3, 4, 5], priority=0) == 3
        for _ in range(400):
            if eng._stage_running:
                break
            threading.Event().wait(0.005)
        threading.Event().wait(0.05)  # time for the other worker to (wrongly) take one
        with src.cond:
            assert eng._stage_running == 1 and eng._stage_queued == 3
            src.cache.assign(0, 0, 1)
            job = eng.submit(0, 1, 0, 0)  # a demand load
        for _ in range(400):
            if job.started:
                break
            threading.Event().wait(0.005)
        assert job.started, "the demand load found no free worker"
        reads.gate.set()
        with src.cond:
            while eng._stage_queued:
                src.cond.wait(1)
        assert eng._stage_running == 0 and src.counters.host_staged == 3
    finally:
        reads.gate.set()
        _close(gf, reads, src)


def test_expertflow_stages_beyond_its_vram_horizon(tiny_gguf):
    path = tiny_gguf("qwen3moe", "F16")
    # a host tier of one layer's active experts: the predicted ones are seldom in it
    gf, store, host, reads, src = _parts(path, vram_experts=4, host_experts=4,
                                         policy="expertflow")
    try:
        pol = src.policy
        assert pol._stager is not None and (pol._stage_k >= src.n_active).all()
        calls = []
        real = src.stage

        def spy(layer, experts, priority=None, values=None):
            calls.append((layer, list(experts), priority, list(values)))
            return real(layer, experts, priority=priority, values=values)

        pol._stager = spy
        rng = np.random.default_rng(1)
        # each layer keeps to a few experts (as real routing does): predictable
        usual = [rng.choice(store.n_expert, src.n_active + 1, replace=False)
                 for _ in range(store.n_layer)]
        for _ in range(6):
            for layer in range(store.n_layer):
                ids = rng.choice(usual[layer], (1, src.n_active), replace=False)
                src.on_route(layer, None, ids)
                _drain(src, layer, np.unique(ids))
        assert calls
        for layer, experts, priority, values in calls:
            assert len(experts) <= pol._stage_k[layer] and priority > 0
            assert all(v >= pol.stage_floor for v in values)
            assert values == sorted(values, reverse=True)
        assert src.engine.stage_issued > 0
    finally:
        _close(gf, reads, src)


def test_source_without_host_tier_has_nothing_to_stage(tiny_gguf):
    path = tiny_gguf("qwen3moe", "F16")
    with load_cuda_model(path, device="cpu", cache="30%", policy="expertflow",
                         hybrid="off", n_ctx=32) as g:
        assert g.host_tier is None and g.source.policy._stager is None
        assert g.source.stage(0, [1, 2]) == 0
        g.forward(_ids(8), 0, g.new_kv_cache(32))
        assert g.counters.host_hits == g.counters.host_misses == g.counters.disk_bytes == 0


def test_disk_link_slows_host_reads(tiny_gguf):
    path = tiny_gguf("qwen3moe", "F16")
    from efedge.experts.link import Link

    gf0 = GGUFFile(path)
    per = ExpertStore(gf0, 3, 16).expert_bytes(0)
    gf0.close()
    gf, store, host, reads, src = _parts(path, vram_experts=4, host_experts=8,
                                         disk_link=Link("slow", per / 0.03, 0.0))
    try:
        import time

        t0 = time.perf_counter()
        _drain(src, 0, [0, 1])  # two disk reads of 30 ms each, one after the other
        assert time.perf_counter() - t0 >= 0.055
        disk_bytes = reads.bytes
        with src.cond:  # from VRAM again: host hits, no disk read (hence no disk wait;
            for e in (0, 1):  # a wall-clock bound here would fail on a loaded machine)
                s = int(src.cache.where[0, e])
                src.cache.release(s)
        _drain(src, 0, [0, 1])
        assert reads.bytes == disk_bytes and src.counters.host_hits == 2
    finally:
        _close(gf, reads, src)


def test_host_reads_keep_the_pages_only_behind_an_emulated_disk(tiny_gguf):
    """A host miss drops the expert's file pages (the host level is the only copy) unless
    disk_link= emulates the disk: then the page cache stands for that disk, so the reads
    take the emulated time rather than this machine's disk's."""
    path = tiny_gguf("qwen3moe", "F16")
    from efedge.experts.link import Link

    for disk_link, expect in ((None, True), (Link("fast", 1e12, 0.0), False)):
        gf, store, host, reads, src = _parts(path, vram_experts=4, host_experts=8,
                                             disk_link=disk_link)
        seen = []
        real = src.engine._read_expert

        def spy(parts, layer, expert, drop_pages=True, real=real, seen=seen):
            seen.append(drop_pages)
            return real(parts, layer, expert, drop_pages=drop_pages)

        src.engine._read_expert = spy
        try:
            _drain(src, 0, [0, 1])
            assert seen and all(d is expect for d in seen), (disk_link, seen)
        finally:
            _close(gf, reads, src)


def test_arguments_are_checked_and_named(tiny_gguf):
    path = tiny_gguf("qwen3moe", "F16")
    with pytest.raises(EfedgeError, match="host_cache=.*device='cuda'"):
        efedge.load(path, host_cache="1GB")
    with pytest.raises(EfedgeError, match="disk_link=.*device='cuda'"):
        efedge.load(path, cache="50%", disk_link="nvme")
    with pytest.raises(EfedgeError, match="host_cache=.*needs a model with experts"):
        load_cuda_model(tiny_gguf("qwen3", "F16"), device="cpu", host_cache="50%")
    # without cache= the VRAM cache holds every expert here: the host level has nothing
    # to do (it was refused, as if cache= were always needed)
    with load_cuda_model(path, device="cpu", host_cache="50%", n_ctx=16) as g:
        assert g.resident and "host_cache_bytes" not in g.extra_stats()
    with pytest.raises(EfedgeError, match="disk_link=.*host_cache"):
        load_cuda_model(path, device="cpu", cache="30%", disk_link="nvme")
    before = threading.active_count()
    with pytest.raises(EfedgeError, match="disk_link='warp9'.*unknown link"):
        load_cuda_model(path, device="cpu", cache="30%", host_cache="50%", disk_link="warp9")
    with pytest.raises(CacheBudgetError, match="host_cache='lots'"):
        load_cuda_model(path, device="cpu", cache="30%", host_cache="lots")
    with pytest.raises(CacheBudgetError, match="host_cache=1000.*minimum"):
        load_cuda_model(path, device="cpu", cache="30%", host_cache=1000)
    assert threading.active_count() == before  # no transfer worker left behind
    with load_cuda_model(path, device="cpu", cache="30%", host_cache="50%",
                         disk_link="nvme", n_ctx=16) as g:
        assert "nvme" in g.extra_stats()["disk_link"]
        with pytest.raises(ValueError, match="expert ids"):
            g.source.stage(0, [99])


# -- the surface: bench's table, CLI flags ----------------------------------------------------

def _bench(capsys, *argv) -> str:
    from efedge.cli import main

    assert main(["bench", *map(str, argv)]) == 0
    return capsys.readouterr().out


def test_bench_shows_the_host_hit_rate_with_a_host_tier(tiny_gguf, capsys, monkeypatch):
    import json

    import efedge.gpu as gpu

    real = gpu.load_cuda_model  # device="cuda" served on torch's CPU device; no hybrid
    # misses, which would compute a miss on the CPU instead of copying it whenever this
    # machine's timing says so (then no copy, and no host hit rate, is a right answer)
    monkeypatch.setattr(gpu, "load_cuda_model",
                        lambda *a, **kw: real(*a, **{**kw, "device": "cpu", "hybrid": "off"}))
    path = tiny_gguf("qwen3moe", "F32")
    table = _bench(capsys, path, "-p", 0, "-n", 4, "-r", 1, "--device", "cuda", "--cache",
                   "30%", "--host-cache", "60%", "--disk-link", "nvme")
    heads = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert heads[-2:] == ["VRAM", "host hit rate"]
    rows = json.loads(_bench(capsys, path, "-p", 0, "-n", 4, "-r", 1, "--device", "cuda",
                             "--cache", "30%", "--host-cache", "60%", "--json"))
    assert 0.0 <= rows[0]["host_hit_rate"] <= 1.0 and rows[0]["disk_bytes"] > 0
    # without a host tier: no such column or field
    table = _bench(capsys, path, "-p", 0, "-n", 4, "-r", 1, "--device", "cuda", "--cache",
                   "30%")
    assert "host hit rate" not in table
    doc = json.loads(_bench(capsys, path, "--policies", "ondemand", "--cache", "30%",
                            "--host-cache", "60%", "--link", "500MB/s", "-p", 8, "-n", 4,
                            "--device", "cuda", "--json"))
    assert 0.0 <= doc["rows"][0]["host_hit_rate"] <= 1.0
    from efedge.policy_compare import format_table

    assert "host hit rate" in format_table(doc["rows"]).splitlines()[0]


def test_cli_flags_reach_the_loader_and_are_checked(tiny_gguf, capsys):
    from efedge.cli import main

    path = str(tiny_gguf("qwen3moe", "F32"))
    assert main(["run", path, "-p", "hi", "-n", "1", "--cache", "50%",
                 "--host-cache", "1GB"]) == 1
    assert "host_cache=" in capsys.readouterr().err
    assert main(["bench", path, "-p", "4", "-n", "0", "-r", "1", "--disk-link", "nvme"]) == 1
    assert "disk_link=" in capsys.readouterr().err


# -- CUDA (skipped without a GPU; scripts/gpu_check.sh runs `-m cuda`) -------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs an NVIDIA GPU with a CUDA build of torch")
def test_cuda_host_tier_is_pinned_and_keeps_parity(q4km):
    ids = _ids()
    with load_cuda_model(q4km, device="cuda", n_ctx=64, scratch_bytes=1) as g:
        ref = _run(g, ids)
    for policy in ("ondemand", "expertflow"):
        with load_cuda_model(q4km, device="cuda", n_ctx=64, cache="30%", host_cache="60%",
                             policy=policy, hybrid="off", scratch_bytes=1,
                             link="4GB/s", disk_link="2GB/s") as g:
            assert all(p.is_pinned() for p in g.host_tier.pools)
            out = _run(g, ids)
            c = g.counters
        assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)), policy
        assert c.host_hits + c.host_misses > 0 and c.disk_bytes > 0
