"""cache="auto" (the default on the CPU): every expert resident when the model fits in the
memory available, else an expert cache of what is left (efedge/memory.py)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import efedge
import efedge.memory as memory
from efedge.experts.cache import ExpertCache, minimum_budget
from efedge.experts.streaming import StreamingExperts
from efedge.memory import RESERVE_MIN, auto_budget, available_memory

MiB = 1 << 20


def test_auto_budget_arithmetic(caplog):
    # 8 GiB available: the reserve is 15% of it (1.2 GiB); a 4 GiB file fits
    gib = 1 << 30
    assert auto_budget(8 * gib, 4 * gib, 3 * gib, 256 * MiB, 64 * MiB) is None
    # a 10 GiB file with 9 GiB of experts and a 256 MiB KV cache does not: what is left
    usable = 8 * gib - int(0.15 * 8 * gib) - 256 * MiB
    assert auto_budget(8 * gib, 10 * gib, 9 * gib, 256 * MiB, 64 * MiB) == usable - gib
    # the reserve is at least RESERVE_MIN on a small machine
    assert auto_budget(gib, 2 * gib, 2 * gib - 256 * MiB, 0, MiB) == \
        gib - RESERVE_MIN - 256 * MiB
    # too little left even for one layer's active experts: the minimum, and a warning
    with caplog.at_level(logging.WARNING, logger="efedge"):
        assert auto_budget(2 * gib, 20 * gib, 10 * gib, 0, 300 * MiB) == 300 * MiB
    assert "memory is short" in caplog.text
    # unknown memory: resident, as before there was an auto
    assert auto_budget(None, 20 * gib, 10 * gib, 0, MiB) is None


def test_available_memory_reads_linux_and_its_cgroup_limit(tmp_path):
    proc, cg = tmp_path / "proc", tmp_path / "cg"
    proc.mkdir()
    cg.mkdir()
    (proc / "meminfo").write_text("MemTotal:       16000000 kB\n"
                                  "MemFree:         1000000 kB\n"
                                  "MemAvailable:    9000000 kB\n")
    if not memory.sys.platform.startswith("linux"):
        pytest.skip("reads /proc/meminfo on Linux only")
    assert available_memory(proc, cg) == 9000000 * 1024  # no cgroup files: the machine's
    (cg / "memory.max").write_text("max\n")
    (cg / "memory.current").write_text("123\n")
    assert available_memory(proc, cg) == 9000000 * 1024  # no limit
    (cg / "memory.max").write_text(f"{4 << 30}\n")
    (cg / "memory.current").write_text(f"{1 << 30}\n")
    assert available_memory(proc, cg) == 3 << 30  # the container's limit leaves less
    (proc / "meminfo").write_text("MemTotal: 1 kB\n")
    assert available_memory(proc, cg) is None  # no MemAvailable line: not known


def test_available_memory_of_this_machine_is_plausible():
    avail = available_memory()
    if avail is None:
        pytest.skip("this platform does not say")
    assert 0 < avail < 1 << 50


def test_minimum_budget_is_what_the_cache_takes(tiny_gguf):
    with efedge.load(tiny_gguf("qwen3moe", "Q4_K_M"), cache=None) as m:
        store, k = m._tf.store, m.config.n_expert_used
        low = minimum_budget(store, k)
        ExpertCache(store, low, k)  # takes it
        with pytest.raises(efedge.CacheBudgetError):
            ExpertCache(store, low - 1, k)
        # a budget below a MiB is named as given, not rounded to "0.0 MiB"
        for budget, words in ((1024, "1.0 KiB"), (100, "100 bytes")):
            with pytest.raises(efedge.CacheBudgetError, match=f"cache budget {words} cannot"):
                ExpertCache(store, budget, k)


def test_auto_is_resident_when_the_model_fits_and_streams_when_not(tiny_gguf, monkeypatch):
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    ids = list(range(1, 40))
    with efedge.load(path, cache="auto") as m:  # a tiny file fits anywhere
        assert type(m._experts).__name__ == "ResidentExperts"
        ref = m.logits(ids)
        file_size, expert_bytes = m._gf.file_size, m._tf.store.total_bytes()
        kv = m._session.kv.nbytes
    # a machine with memory for the other weights, the KV cache, the reserve and 40% of
    # the experts
    want = int(0.4 * expert_bytes)
    other = file_size - expert_bytes
    avail = int((other + kv + want + RESERVE_MIN) / 1.0)
    monkeypatch.setattr(memory, "available_memory", lambda *a, **k: avail)
    with efedge.load(path, cache="auto") as m:
        assert isinstance(m._experts, StreamingExperts)
        assert m.stats()["cache_bytes"] <= want
        assert m.stats()["cache_bytes"] > 0.3 * expert_bytes
        # exact routing: the same logits, bit for bit, through the cache
        assert np.array_equal(m.logits(ids), ref)
    # "resident" and None (the API's default, as the public contract has it) keep every
    # expert resident whatever the memory
    for kw in ({"cache": "resident"}, {"cache": None}, {}):
        with efedge.load(path, **kw) as m:
            assert type(m._experts).__name__ == "ResidentExperts"
    # auto has no budget for an emulated link to slow
    with pytest.raises(efedge.EfedgeError, match="link="):
        efedge.load(path, cache="auto", link="8GB/s")


def test_cli_cache_auto_and_resident(tiny_gguf, capsys, monkeypatch):
    from efedge.cli import main

    path = str(tiny_gguf("qwen3moe", "F32"))
    seen = []
    real = efedge.load

    def spy(*a, **kw):
        seen.append(kw.get("cache"))
        return real(*a, **kw)

    monkeypatch.setattr(efedge, "load", spy)
    assert main(["run", path, "-p", "hi", "-n", "2"]) == 0
    assert main(["run", path, "-p", "hi", "-n", "2", "--cache", "resident"]) == 0
    assert seen == ["auto", "resident"]
