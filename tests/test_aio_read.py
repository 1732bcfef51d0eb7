"""aio_read: an expert's three parts read from the drive at once (Linux native AIO with
O_DIRECT), byte for byte what the file holds, and every case it leaves to the
part-by-part read named by its answer."""

from __future__ import annotations

import os

import numpy as np
import pytest

import efedge
from efedge.experts import aio_read, file_read

pytestmark = pytest.mark.skipif(not aio_read.available(),
                                reason="native AIO needs Linux on x86-64 or arm64")

SIZE = 1 << 20


@pytest.fixture
def files(tmp_path):
    """Two files of random bytes (a split GGUF's shards stand-in), their bytes, and a
    direct descriptor of each; skipped where the file system takes no O_DIRECT."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(2):
        raw = rng.integers(0, 256, SIZE, dtype=np.uint8)
        p = tmp_path / f"shard{i}.bin"
        raw.tofile(p)
        fd = file_read.direct_open(p)
        if fd is None:
            pytest.skip("this file system takes no O_DIRECT reads")
        out.append((raw, fd))
    yield out
    for _raw, fd in out:
        os.close(fd)


@pytest.fixture
def state():
    s = np.zeros(aio_read.STATE_WORDS, np.int64)
    if not aio_read.setup(s):
        pytest.skip("the kernel gives this process no AIO context")
    yield s
    aio_read.destroy(s)
    assert s[aio_read.CTX] == 0


def _read(state, fds, offs, ns, bounce_part=64 << 10, land=None, slot=-1, until=0.0,
          sizes=None):
    """read_parts into three fresh buffers (filled with 7: what is not written shows)."""
    bufs = [np.full(n if sizes is None else sizes[i], 7, np.uint8)
            for i, n in enumerate(ns)]
    bounce = file_read.aligned_buffer(3 * bounce_part)
    land = np.zeros(0) if land is None else land
    rc = aio_read.read_parts(state, aio_read.scratch(), np.asarray(fds, np.intc), *bufs,
                             np.asarray(offs, np.int64), np.asarray(ns, np.int64), bounce,
                             file_read.DIRECT_ALIGN, land, slot, until)
    return rc, bufs


def test_three_parts_at_any_offset_from_one_or_two_files(files, state):
    (raw0, fd0), (raw1, fd1) = files
    offs, ns = [1234, 300_001, 700_007], [5000, 40_000, 1]
    land = np.full(4, np.inf)
    rc, bufs = _read(state, [fd0] * 3, offs, ns, land=land, slot=2, until=1.5)
    assert rc == 0 and land[2] == 1.5 and np.isinf(land[[0, 1, 3]]).all()
    for b, o, n in zip(bufs, offs, ns, strict=True):
        assert np.array_equal(b, raw0[o:o + n])
    # each part from its own shard; an empty part is skipped
    rc, bufs = _read(state, [fd0, fd1, fd1], [4096, 12_345, 0], [8192, 30_000, 0])
    assert rc == 0
    assert np.array_equal(bufs[0], raw0[4096:4096 + 8192])
    assert np.array_equal(bufs[1], raw1[12_345:12_345 + 30_000])
    assert state[aio_read.READS] == 2 and state[aio_read.DECLINED] == 0


def test_parts_longer_than_a_third_go_in_chunks(files, state):
    """A part longer than its third of the bounce buffer is read a chunk at a time, the
    next chunk submitted as a third comes free, three in flight — byte for byte."""
    (raw0, fd0), (raw1, fd1) = files
    offs, ns = [777, 200_003, 600_000], [70_001, 8192, 50_000]
    rc, bufs = _read(state, [fd0, fd1, fd0], offs, ns, bounce_part=8192)
    assert rc == 0
    for b, raw, o, n in zip(bufs, (raw0, raw1, raw0), offs, ns, strict=True):
        assert np.array_equal(b, raw[o:o + n])
    assert state[aio_read.READS] == 1 and state[aio_read.DECLINED] == 0


def test_what_it_leaves_to_the_part_by_part_read(files, state):
    (raw0, fd0), _ = files
    # no context: nothing tried
    none = np.zeros(aio_read.STATE_WORDS, np.int64)
    rc, bufs = _read(none, [fd0] * 3, [0, 100, 200], [10, 10, 10])
    assert rc == aio_read.NOT_HERE and (bufs[0] == 7).all()
    # a bounce buffer without a block for each of the three
    rc, bufs = _read(state, [fd0] * 3, [0, 100, 200], [10, 10, 10], bounce_part=1024)
    assert rc == aio_read.NOT_HERE and state[aio_read.DECLINED] == 1
    assert all((b == 7).all() for b in bufs)


def test_failures_answer_as_the_part_by_part_kernel_does(files, state):
    (raw0, fd0), _ = files
    land = np.full(2, np.inf)
    # part 1 runs past the end of the file: a short read, named by its part
    rc, _bufs = _read(state, [fd0] * 3, [0, SIZE - 100, 0], [10, 200, 10], land=land, slot=0)
    assert rc == -2 and np.isinf(land[0])
    # the same in its last chunk, with other chunks in flight around it
    rc, _bufs = _read(state, [fd0] * 3, [0, SIZE - 30_000, 5000], [40_000, 30_100, 40_000],
                      land=land, slot=0, bounce_part=8192)
    assert rc == -2 and np.isinf(land[0])
    # a part that does not fit its buffer: nothing read
    rc, bufs = _read(state, [fd0] * 3, [0, 0, 0], [10, 10, 10], sizes=[10, 10, 5])
    assert rc == -12 and all((b == 7).all() for b in bufs)
    # a slot outside the landing table
    rc, _ = _read(state, [fd0] * 3, [0, 0, 0], [1, 1, 1], land=land, slot=5)
    assert rc == -20
    # the context still serves after them
    rc, bufs = _read(state, [fd0] * 3, [10, 20, 30], [3, 3, 3])
    assert rc == 0 and np.array_equal(bufs[2], raw0[30:33])


def test_it_is_used_where_the_parts_are_small_unless_told(monkeypatch):
    """By default only a model whose parts are at most SMALL_PART long (reads that wait
    mostly for the drive's latency) is read this way; EFEDGE_AIO=1 any, 0 none."""
    monkeypatch.delenv("EFEDGE_AIO", raising=False)
    assert aio_read.pays(32 << 10) and aio_read.pays(aio_read.SMALL_PART)
    assert not aio_read.pays(aio_read.SMALL_PART + 1) and not aio_read.pays(0)
    monkeypatch.setenv("EFEDGE_AIO", "1")
    assert aio_read.pays(30 << 20)
    monkeypatch.setenv("EFEDGE_AIO", "0")
    assert not aio_read.pays(32 << 10) and not aio_read.available()


def test_native_workers_read_the_drive_with_it_unless_told_not_to(tiny_gguf, monkeypatch):
    """Reading the file itself, each native worker has a context and reads every expert
    with its parts at once — the resident logits either way; EFEDGE_AIO=0 keeps the
    part-by-part read (the test model's parts are small: the default reads them so)."""
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    if file_read.direct_open(path) is None:
        pytest.skip("this file system takes no O_DIRECT reads")
    monkeypatch.setenv("EFEDGE_NATIVE_WORKERS", "1")
    ids = np.random.default_rng(4).integers(0, 500, 24).tolist()
    with efedge.load(path) as m:
        want = m.logits(ids)
    for setting, used in ((None, True), ("0", False)):
        if setting is None:
            monkeypatch.delenv("EFEDGE_AIO", raising=False)
        else:
            monkeypatch.setenv("EFEDGE_AIO", setting)
        with efedge.load(path, cache="30%", policy="ondemand") as m:
            pool = m._experts.engine.pool
            np.testing.assert_array_equal(m.logits(ids), want)
            reads, declined = pool.aio_reads
            assert (pool.aio_contexts == pool.n_threads > 0) is used
            assert (reads > 0) is used and declined == 0
        assert pool.aio_contexts == 0  # released with the threads
    # through an emulated link the workers read the page cache: no context
    monkeypatch.setenv("EFEDGE_AIO", "1")
    with efedge.load(path, cache="30%", link="720MB/s") as m:
        assert m._experts.engine.pool.aio_contexts == 0


def test_python_workers_and_the_compute_threads_own_reads_use_it(tiny_gguf, monkeypatch):
    """The engine's own direct reads — Python workers', and the compute thread's when it
    reads a queued demand load itself — go through an AIO context of their thread too,
    released when the model closes; the bytes are the file's."""
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    if file_read.direct_open(path) is None:
        pytest.skip("this file system takes no O_DIRECT reads")
    monkeypatch.delenv("EFEDGE_AIO", raising=False)
    monkeypatch.setenv("EFEDGE_NATIVE_WORKERS", "0")
    ids = np.random.default_rng(6).integers(0, 500, 24).tolist()
    with efedge.load(path) as m:
        want = m.logits(ids)
    with efedge.load(path, cache="30%", policy="ondemand") as m:
        eng, store = m._experts.engine, m._experts.store
        assert not eng.gil_free and eng.reads_direct
        np.testing.assert_array_equal(m.logits(ids), want)
        states = list(eng._aio_states)
        assert states and sum(int(s[aio_read.READS]) for s in states) > 0
        # this thread's own read (as _take_queued_load makes it)
        raw = np.fromfile(path, dtype=np.uint8)
        parts = [np.zeros(int(store.nbytes[1, 3, i]), np.uint8) for i in range(3)]
        before = sum(int(s[aio_read.READS]) for s in eng._aio_states)
        assert eng._read_direct(eng._direct_fds, parts, 1, 3, None)
        for i in range(3):
            o, n = int(store.offsets[1, 3, i]), int(store.nbytes[1, 3, i])
            assert np.array_equal(parts[i], raw[o:o + n])
        states = list(eng._aio_states)
        assert sum(int(s[aio_read.READS]) for s in states) == before + 1
    assert not eng._aio_states and all(s[aio_read.CTX] == 0 for s in states)
