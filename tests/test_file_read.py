"""file_read: an expert's three parts read by one GIL-free kernel (pread + fadvise).

The bytes must be the file's, every bound is checked before the kernel writes through a
raw pointer, a short file is reported (the engine then reads in Python, which names the
error), and the transfer engine really reads through the kernel."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import efedge
from efedge.experts import aio_read, file_read
from efedge.experts.store import ExpertStore
from efedge.experts.transfer import TransferEngine
from efedge.gguf_file import GGUFFile

pytestmark = pytest.mark.skipif(not file_read.available(),
                                reason="no pread / posix_fadvise in this libc")


@pytest.fixture(scope="module")
def path(tiny_gguf):
    return tiny_gguf("qwen3moe", "Q4_K_M")


def _buffers(nbytes, extra=0):
    return [np.full(int(n) + extra, 0xAB, dtype=np.uint8) for n in nbytes]


def test_every_expert_part_is_the_files_bytes(path):
    gf = GGUFFile(path)
    store = ExpertStore(gf, gf.get("qwen3moe.block_count"), gf.get("qwen3moe.expert_count"))
    fd = os.open(path, os.O_RDONLY)
    try:
        for il in range(store.n_layer):
            for e in range(store.n_expert):
                offs, ns = store.offsets[il, e], store.nbytes[il, e]
                parts = _buffers(ns, extra=7)
                for drop in (True, False):
                    assert file_read.read_expert(fd, parts, offs, ns, 4096, drop_pages=drop)
                    for ip in range(3):
                        want = os.pread(fd, int(ns[ip]), int(offs[ip]))
                        assert bytes(parts[ip][:ns[ip]]) == want
                        assert (parts[ip][ns[ip]:] == 0xAB).all()  # nothing past the part
    finally:
        os.close(fd)
        gf.close()


def test_bounds_are_checked_before_any_byte_is_written(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        ns = np.array([64, 64, 64], dtype=np.int64)
        offs = np.array([0, 128, 256], dtype=np.int64)
        for bad_part, parts in enumerate([_buffers([63, 64, 64]), _buffers([64, 63, 64]),
                                          _buffers([64, 64, 63])]):
            with pytest.raises(ValueError, match=f"part {bad_part}"):
                file_read.read_expert(fd, parts, offs, ns, 4096)
            assert all((p == 0xAB).all() for p in parts)
        with pytest.raises(ValueError, match="part 1"):
            file_read.read_expert(fd, _buffers(ns), np.array([0, -1, 0], np.int64), ns, 4096)
        with pytest.raises(ValueError, match="3 offsets"):
            file_read.read_expert(fd, _buffers(ns), offs[:2], ns[:2], 4096)
        strided = np.zeros(256, dtype=np.uint8)[::2]
        with pytest.raises(TypeError):
            file_read.read_expert(fd, [strided] + _buffers(ns)[1:], offs, ns, 4096)
        ro = _buffers(ns)
        ro[2].flags.writeable = False
        with pytest.raises(TypeError):
            file_read.read_expert(fd, ro, offs, ns, 4096)
        with pytest.raises(TypeError):
            file_read.read_expert(fd, [p.view(np.int8) for p in _buffers(ns)], offs, ns, 4096)
    finally:
        os.close(fd)


def test_a_read_lands_its_slot_once_every_byte_is_in(path):
    """`land` = (table, slot, time): the kernel writes the time after the last part; not
    when a part fails; a slot outside the table is refused before any read."""
    gf = GGUFFile(path)
    store = ExpertStore(gf, gf.get("qwen3moe.block_count"), gf.get("qwen3moe.expert_count"))
    fd = os.open(path, os.O_RDONLY)
    try:
        offs, ns = store.offsets[1, 2], store.nbytes[1, 2]
        table = np.full(4, np.inf)
        assert file_read.read_expert(fd, _buffers(ns), offs, ns, 4096, land=(table, 2, 12.5))
        assert table.tolist() == [np.inf, np.inf, 12.5, np.inf]
        size = os.path.getsize(path)
        bad = np.array([0, size - 8, 0], np.int64)
        assert not file_read.read_expert(fd, _buffers(ns), bad, ns, 4096, land=(table, 1, 3.0))
        assert table[1] == np.inf
        with pytest.raises(ValueError, match="slot 4 is outside"):
            file_read.read_expert(fd, _buffers(ns), offs, ns, 4096, land=(table, 4, 1.0))
    finally:
        os.close(fd)
        gf.close()


def test_a_part_past_the_end_of_the_file_is_reported(path):
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        ns = np.array([16, 16, 16], dtype=np.int64)
        assert not file_read.read_expert(fd, _buffers(ns), np.array([0, size - 8, 0], np.int64),
                                         ns, 4096)
    finally:
        os.close(fd)
    # the engine then reads that expert in Python, which names the error
    gf = GGUFFile(path)
    store = ExpertStore(gf, gf.get("qwen3moe.block_count"), gf.get("qwen3moe.expert_count"))
    store.offsets[0, 0, 2] = size - 8
    direct = file_read.direct_open(path)
    try:
        # through the page cache, and (where the file system allows) first directly — part
        # by part, or with the parts in flight at once (aio_read) —: the direct read comes
        # back short, and the buffered one then names the error
        tries = [(None, False)] if direct is None else \
            [(None, False), ([direct], False), ([direct], aio_read.pays(16))]
        for direct_fds, aio in tries:
            engine = TransferEngine.__new__(TransferEngine)  # only _copy's inputs
            engine.store = store
            engine._fd = os.open(path, os.O_RDONLY)
            engine._fds = [engine._fd]
            engine._page, engine._read_whole, engine._read = 4096, True, engine._pread
            engine.drop_pages, engine._sweep_spans, engine._drops = True, None, 0
            engine._direct_fds, engine._bounce = direct_fds, threading.local()
            engine._direct_off, engine._direct_failures = None, 0
            engine._bounce_size = file_read.bounce_bytes(int(store.nbytes.max()))
            engine._aio_pays, engine._aio_states = aio, []
            engine._aio_lock = threading.Lock()

            class Slots:
                slot_land_at = np.full(1, np.inf)

                @staticmethod
                def slot_parts(slot):
                    return _buffers(store.nbytes[0, 0])

            engine.cache = Slots()
            try:
                assert engine._kernel_reads()
                with pytest.raises(OSError, match="unexpected end of file"):
                    engine._copy(type("J", (), {"slot": 0, "layer": 0, "expert": 0,
                                                "link_until": 0.0})())
            finally:
                os.close(engine._fd)
            # (with the parts in flight at once: this thread's context read the short part)
            assert len(engine._aio_states) == int(aio)
            for state in engine._aio_states:
                aio_read.destroy(state)
    finally:
        if direct is not None:
            os.close(direct)
        gf.close()


def test_the_engine_reads_through_the_kernel(path, monkeypatch):
    """Streaming with a small cache gives the resident logits, and the engine's Python
    read (kept for injected faults and for naming errors) is never called."""
    ids = np.random.default_rng(3).integers(0, 500, 12).tolist()
    with efedge.load(path) as m:
        want = m.logits(ids)
    calls = []
    original = TransferEngine._pread

    def python_read(self, buf, offset):
        calls.append(offset)
        return original(self, buf, offset)

    monkeypatch.setattr(TransferEngine, "_pread", python_read)
    with efedge.load(path, cache="30%", policy="expertflow") as m:
        assert m._experts.engine._kernel_reads()
        got = m.logits(ids)
        assert m.stats()["bytes_loaded"] > 0
    np.testing.assert_array_equal(got, want)
    assert calls == []


def _direct_or_skip(path) -> int:
    fd = file_read.direct_open(path)
    if fd is None:
        pytest.skip("this file system (or platform) takes no O_DIRECT reads")
    return fd


def test_direct_reads_give_the_files_bytes_at_any_offset(path):
    """Reads around the page cache: whole blocks into an aligned bounce buffer, then the
    part's bytes into its buffer — any offset and length, up to the file's last byte."""
    fd = _direct_or_skip(path)
    data = open(path, "rb").read()
    rng = np.random.default_rng(7)
    try:
        for t in range(60):
            ns = rng.integers(0, 9000, 3).astype(np.int64)
            offs = rng.integers(0, len(data) - 9000, 3).astype(np.int64)
            if t == 0:
                offs[2] = len(data) - ns[2]  # a part that ends with the file
            if t == 1:
                ns[1], offs[1] = 0, 4096  # an empty part
            parts = _buffers(ns, extra=5)
            # one read per part, or chunks of one or two blocks
            size = (file_read.bounce_bytes(int(ns.max())), 4096, 8192)[t % 3]
            bounce = file_read.aligned_buffer(size)
            table = np.full(2, np.inf)
            assert file_read.read_expert_direct(fd, parts, offs, ns, bounce,
                                                land=(table, 1, 3.5))
            for i in range(3):
                assert parts[i][:ns[i]].tobytes() == data[offs[i]:offs[i] + ns[i]]
                assert (parts[i][ns[i]:] == 0xAB).all()  # nothing written past the part
            assert table[1] == 3.5 and table[0] == np.inf
        # past the end of the file: short, so False (the engine reads it another way)
        ns = np.array([16, 16, 16], np.int64)
        assert not file_read.read_expert_direct(fd, _buffers(ns), np.array(
            [0, len(data) - 8, 0], np.int64), ns, file_read.aligned_buffer(8192))
        # a bounce buffer misaligned, or not whole blocks long: nothing read, a named error
        for bad in (file_read.aligned_buffer(8192 + 1)[1:], file_read.aligned_buffer(6000)):
            with pytest.raises(ValueError, match="multiples of 4096"):
                file_read.read_expert_direct(fd, _buffers(ns), np.zeros(3, np.int64), ns, bad)
        assert file_read.bounce_bytes(10) == 8192
        assert file_read.bounce_bytes(1 << 30) == file_read.DIRECT_CHUNK
    finally:
        os.close(fd)


def test_without_a_link_the_engine_reads_around_the_page_cache(path, monkeypatch):
    """No emulated link: experts are read with O_DIRECT where the file system allows
    (nothing enters the page cache, nothing is dropped), else through the page cache with
    each read dropped (a file system without O_DIRECT, stood for by direct_open refusing);
    both give the resident logits."""
    ids = np.random.default_rng(5).integers(0, 500, 10).tolist()
    with efedge.load(path) as m:
        want = m.logits(ids)
    can_direct = file_read.direct_open(path) is not None
    real_open = file_read.direct_open
    for direct in sorted({False, can_direct}):
        monkeypatch.setattr(file_read, "direct_open", real_open if direct else lambda p: None)
        with efedge.load(path, cache="30%", policy="ondemand") as m:
            eng = m._experts.engine
            assert eng.reads_direct is direct and eng.drop_pages
            np.testing.assert_array_equal(m.logits(ids), want)
            reads = m.stats()["bytes_loaded"] // m._experts.store.expert_bytes(0)
            assert reads > 0
            # dropping reads are counted towards the next sweep; a direct one is not one
            assert (eng._drops == 0) if direct else (0 < eng._drops or reads >= 32)


def test_direct_reads_that_keep_failing_give_way_to_the_page_cache(path, monkeypatch):
    """A file system that takes the open probe but fails direct reads: each failed read
    is read again through the page cache (exact logits), and after DIRECT_FAILURES of
    them the engine reads only that way. (Python workers, whose reads go through the
    wrapper patched here; native workers: tests/test_native_workers.py.)"""
    from efedge.experts import engine_reads

    monkeypatch.setenv("EFEDGE_NATIVE_WORKERS", "0")

    if file_read.direct_open(path) is None:
        pytest.skip("this file system (or platform) takes no O_DIRECT reads")
    ids = np.random.default_rng(6).integers(0, 500, 10).tolist()
    with efedge.load(path) as m:
        want = m.logits(ids)
    calls = []

    def failing(*a, **kw):
        calls.append(1)
        return False

    def failing_at_once(*a, **kw):  # (aio_read: the parts in flight at once, part 0 short)
        calls.append(1)
        return -1

    monkeypatch.setattr(file_read, "read_expert_direct", failing)
    if aio_read.read_parts is not None:
        monkeypatch.setattr(aio_read, "read_parts", failing_at_once)
    with efedge.load(path, cache="30%", policy="ondemand") as m:
        eng = m._experts.engine
        assert eng.reads_direct
        np.testing.assert_array_equal(m.logits(ids), want)
        loads = m.stats()["bytes_loaded"] // m._experts.store.expert_bytes(0)
        assert loads > engine_reads.DIRECT_FAILURES
        assert not eng.reads_direct and eng._direct_failures >= engine_reads.DIRECT_FAILURES
        # (workers racing past the switch may each try once more)
        assert len(calls) < engine_reads.DIRECT_FAILURES + eng.n_workers
