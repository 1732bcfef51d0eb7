"""The cache budget is honest: with experts 4× the budget, after 64 generated tokens the
file's resident expert pages plus the slots stay within budget + one layer of experts,
and peak RSS stays within non-expert weights + budget + KV cache + baseline + 64 MiB.

Runs in a fresh subprocess so RSS and the page cache are measured for this model alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from gguf_tools.make_tiny import write_tiny

PROBE = textwrap.dedent(r"""
    import ctypes, json, os, resource, sys
    import numpy as np
    import efedge
    from efedge.gguf_file import GGUFFile

    big, warm = sys.argv[1], sys.argv[2]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

    def resident_bytes(path, ranges):
        # page-cache residency of the given file byte ranges (mincore on a fresh mapping)
        size = os.path.getsize(path)
        fd = os.open(path, os.O_RDONLY)
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        page = os.sysconf("SC_PAGE_SIZE")
        n_pages = (size + page - 1) // page
        vec = (ctypes.c_ubyte * n_pages)()
        assert libc.mincore(ctypes.c_void_p(addr), size, vec) == 0
        libc.munmap(ctypes.c_void_p(addr), size)
        os.close(fd)
        res = np.frombuffer(vec, dtype=np.uint8) & 1
        total = 0
        for a, b in ranges:
            total += int(res[a // page:(b + page - 1) // page].sum()) * page
        return total

    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    # bring every kernel up first on this very model and budget (a smaller model can
    # leave a kernel to compile later, and compiler memory would count against the
    # budget): numba's memory is part of the baseline, not of the model. Then forget
    # the file's pages, so that only the measured run's reads are resident.
    with efedge.load(warm, cache="50%", policy="ondemand") as m:
        m.generate([1, 2, 3], max_tokens=4, temperature=0)
    with efedge.load(big, cache=sys.argv[3], policy="ondemand", n_ctx=256) as m:
        m.generate([1, 2, 3], max_tokens=4, temperature=0)
    import gc
    gc.collect()
    fd = os.open(big, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    baseline = rss()
    # the peak from here on: a cold numba cache compiles during the warm-up, and the
    # compiler's memory (1-2 GB) is not the model's. Writing 5 to clear_refs resets the
    # high-water mark (Linux >= 4.0); without it the lifetime peak is all there is.
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        peak_reset = True
    except OSError:
        peak_reset = False

    def peak():
        if peak_reset:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    m = efedge.load(big, cache=sys.argv[3], policy="ondemand", n_ctx=256)
    m.generate([5, 6, 7, 8], max_tokens=64, temperature=0)
    store = m._tf.store
    ranges = [(int(store.offsets[l, e, p]), int(store.offsets[l, e, p] + store.nbytes[l, e, p]))
              for l in range(store.n_layer) for e in range(store.n_expert) for p in range(3)]
    out = dict(
        baseline=baseline,
        peak=peak(), peak_reset=peak_reset,
        expert_pages=resident_bytes(big, ranges),
        slot_bytes=m._experts.cache.nbytes,
        kv_bytes=m._session.kv.nbytes,
        expert_bytes=store.total_bytes(),
        layer_bytes=max(store.expert_bytes(l) * store.n_expert for l in range(store.n_layer)),
        non_expert=sum(t.nbytes for t in m._gf.tensors.values()) - store.total_bytes(),
        generated=m.stats()["tokens_generated"],
    )
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("mem")
    # 4 layers × 32 experts × 1.5 MiB (F16) = 192 MiB of experts, little else
    big = write_tiny(d / "big.gguf", "qwen3moe", "F16", preset="test", n_embd=512,
                     n_layer=4, n_head=8, n_head_kv=2, n_expert=32, n_expert_used=4,
                     n_ff_exp=512)
    warm = write_tiny(d / "warm.gguf", "qwen3moe", "F16", preset="test")
    os.sync()  # written pages must be clean before they can be dropped from the page cache
    return big, warm


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
def test_budget_bounds_page_cache_and_rss(big_model):
    big, warm = big_model
    budget = 48 * 2**20  # experts are 4× this
    proc = subprocess.run([sys.executable, "-c", PROBE, str(big), str(warm), str(budget)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    assert r["expert_bytes"] >= 4 * budget
    assert r["generated"] == 64 or r["generated"] > 0
    assert r["slot_bytes"] <= budget
    assert r["expert_pages"] + r["slot_bytes"] <= budget + r["layer_bytes"], r
    limit = r["non_expert"] + budget + r["kv_bytes"] + r["baseline"] + 64 * 2**20
    assert r["peak"] <= limit, {**r, "limit": limit}
