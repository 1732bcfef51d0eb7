"""Resource hygiene: loading and closing a model again and again leaks no file
descriptors, threads or mappings (also when loading fails half way), and an interrupt
(Ctrl-C, an exception in a stream consumer, cancel()) during generation leaves the model
usable: the next greedy generation is exactly the uninterrupted one."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import struct
import threading
import time

import gguf
import numpy as np
import pytest

import efedge

TINY = dict(n_layer=2, n_expert=4, n_expert_used=2)
PROMPT = [5, 17, 42, 99, 7]
N_GEN = 12


@pytest.fixture(scope="module")
def path(tiny_gguf):
    return tiny_gguf("qwen3moe", "Q4_K_M", **TINY)


@pytest.fixture(scope="module")
def reference(path):
    with efedge.load(path) as m:
        return m.generate(PROMPT, max_tokens=N_GEN, temperature=0), m.logits(PROMPT)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _maps(p) -> int:
    name = str(p)
    with open("/proc/self/maps") as fh:
        return sum(1 for line in fh if line.rstrip().endswith(name))


def _usage(p) -> tuple[int, int, int]:
    gc.collect()
    return _fds(), threading.active_count(), _maps(p)


def _open_close(path, n: int) -> None:
    for i in range(n):
        m = efedge.load(path, cache="50%" if i % 2 else None, policy="ondemand")
        if i % 10 == 0:  # now and then, with compute and the transfer workers busy
            m.logits(PROMPT)
        m.close()
        del m


def test_open_close_again_and_again_leaks_nothing(path):
    _open_close(path, 2)  # warm: kernels compiled, caches filled
    before = _usage(path)
    assert before[2] == 0
    # 30 cycles (15 of them streamed; 100 took ~100 s of a 2-core CI run): the counts
    # must come back exactly, so a leak of one descriptor, thread or mapping in any
    # cycle shows as surely as in 100
    _open_close(path, 30)
    assert _usage(path) == before


@pytest.mark.parametrize("native", ["1", "0"])
def test_close_is_idempotent_and_joins_the_workers(path, native, monkeypatch):
    """Python transfer workers and native ones (threads Python does not count) alike."""
    monkeypatch.setenv("EFEDGE_NATIVE_WORKERS", native)
    gc.collect()  # (what earlier tests left: their threads)
    threads = threading.active_count()
    m = efedge.load(path, cache="50%", transfer_workers=3)
    try:
        pool = getattr(m._experts.engine, "pool", None)  # (kept: not the engine, whose
        # descriptors go with the model's)
        if native == "0" or pool is None:  # (no native workers on this system)
            assert pool is None and threading.active_count() == threads + 3
        else:
            assert pool.n_threads == 3 and threading.active_count() == threads
        m.logits(PROMPT)
    finally:
        m.close()
    m.close()
    assert threading.active_count() == threads and (pool is None or pool.n_threads == 0)
    with pytest.raises(efedge.EfedgeError, match="closed"):
        m.logits(PROMPT)


@pytest.mark.parametrize("cache", [None, "50%"])
def test_close_unmaps_the_file_at_once(path, cache):
    fds = _fds()
    m = efedge.load(path, cache=cache)
    m.logits(PROMPT)
    m.close()
    assert _maps(path) == 0 and _fds() == fds


def _with_type(src, dst, tensor: str, qtype: int):
    shutil.copy(src, dst)
    for t in gguf.GGUFReader(src).tensors:
        if t.name == tensor:
            off = t.field.offset + 8 + len(tensor.encode()) + 4 + 8 * len(t.shape)
            with open(dst, "r+b") as fh:
                fh.seek(off)
                fh.write(struct.pack("<I", qtype))
    return dst


def test_failed_loads_leak_nothing(path, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:-4096])  # fails validating tensors
    late = _with_type(path, tmp_path / "late.gguf", "blk.1.attn_v.weight",
                      int(gguf.GGMLQuantizationType.NVFP4))  # refused in Transformer
    cases = [(truncated, {}), (late, {}), (path, {"cache": 1}), (path, {"n_ctx": 2**40}),
             (path, {"cache": "50%", "policy": "nope"})]
    for p, kw in cases:  # warm
        with pytest.raises(efedge.EfedgeError):
            efedge.load(p, **kw)
    before = _usage(path)
    for _ in range(10):
        for p, kw in cases:
            with pytest.raises(efedge.EfedgeError):
                efedge.load(p, **kw)
    assert _usage(path) == before
    assert _maps(truncated) == _maps(late) == 0


# -- interrupts during generation -------------------------------------------------------
def _load(path, cache):
    return efedge.load(path, cache=cache, policy="expertflow" if cache else "ondemand")


def _assert_whole(m, reference) -> None:
    """The model gives exactly the uninterrupted results, and holds no pinned slot."""
    greedy, logits = reference
    assert m.generate(PROMPT, max_tokens=N_GEN, temperature=0) == greedy
    assert np.array_equal(m.logits(PROMPT), logits)
    src = m._experts
    if hasattr(src, "cache"):
        assert (src.cache.slot_pins == 0).all()


@pytest.mark.parametrize("cache", [None, "60%"])
def test_interrupt_from_a_stream_consumer(path, reference, cache):
    with _load(path, cache) as m:
        with pytest.raises(KeyboardInterrupt):
            for i, _piece in enumerate(m.stream(PROMPT, max_tokens=N_GEN, temperature=0)):
                if i == 2:
                    raise KeyboardInterrupt
        _assert_whole(m, reference)


@pytest.mark.parametrize(("cache", "where"), [(None, "route"), ("60%", "route"),
                                              ("60%", "experts")])
def test_interrupt_inside_the_forward_pass(path, reference, cache, where):
    """KeyboardInterrupt raised inside layer 1 of the third decode step, as Ctrl-C lands
    between bytecodes: at the router hook, or in the middle of the layer's expert loop
    (the expert cache's acquire is then suspended with slots pinned)."""
    with _load(path, cache) as m:
        tf, src = m._tf, m._experts
        hook, batches = tf.on_route, getattr(src, "acquire_batches", None)
        calls = [0]
        nth = 2 * TINY["n_layer"] + 2  # prefill, decode 1, then layer 1 of decode 2

        def on_route(layer, *a, **kw):
            calls[0] += 1
            if calls[0] == nth:
                raise KeyboardInterrupt
            if hook is not None:
                hook(layer, *a, **kw)

        def in_batches(layer, experts, **kw):
            calls[0] += 1
            for item in batches(layer, experts, **kw):
                yield item  # resumed when the consumer is done with the batch:
                if calls[0] == nth:  # Ctrl-C lands with its slots still pinned
                    raise KeyboardInterrupt

        if where == "route":
            tf.on_route = on_route
        else:
            src.acquire_batches = in_batches
        with pytest.raises(KeyboardInterrupt):
            m.generate(PROMPT, max_tokens=N_GEN, temperature=0)
        assert calls[0] == nth
        tf.on_route = hook
        if batches is not None:
            src.acquire_batches = batches
        _assert_whole(m, reference)


def test_interrupt_while_handing_the_gil_to_workers(path, reference):
    """The compute thread sleeps 0 s to let transfer workers start or land copies (a
    place where Python delivers Ctrl-C), some of those times with a layer's slots
    pinned: an interrupt at each of them leaves nothing pinned."""
    with _load(path, "60%") as m:
        src = m._experts
        orig = src.yield_to_workers
        for nth in range(1, 10):
            calls = [0]

            def interrupted(*a, nth=nth, calls=calls, **kw):
                calls[0] += 1
                if calls[0] == nth:
                    raise KeyboardInterrupt
                return orig(*a, **kw)

            src.yield_to_workers = interrupted
            with pytest.raises(KeyboardInterrupt):
                m.generate(PROMPT, max_tokens=N_GEN, temperature=0)
            src.yield_to_workers = orig
            assert (src.cache.slot_pins == 0).all(), nth
        _assert_whole(m, reference)


@pytest.mark.parametrize("cache", [None, "60%"])
def test_cancel_from_another_thread(path, reference, cache):
    from efedge.generate import GenerationResult

    with _load(path, cache) as m:
        res = GenerationResult([], "")
        pieces = []
        for piece in m.stream(PROMPT, max_tokens=200, temperature=0, result=res):
            pieces.append(piece)
            if len(pieces) == 2:
                t = threading.Thread(target=m.cancel)
                t.start()
                t.join()
        assert res.finish_reason == "cancelled" and len(res.tokens) < 200
        _assert_whole(m, reference)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signals are delivered to the main thread")
@pytest.mark.parametrize("cache", [None, "60%"])
def test_real_sigint_during_generation(path, reference, cache):
    """A real SIGINT, wherever it lands (kernel, cond.wait, the consumer)."""
    with _load(path, cache) as m:
        with pytest.raises(KeyboardInterrupt):
            for i, _piece in enumerate(m.stream(PROMPT, max_tokens=400, temperature=0)):
                if i == 2:
                    threading.Timer(0.005, os.kill, (os.getpid(), signal.SIGINT)).start()
            time.sleep(10)  # generation ended first: the signal lands here
        _assert_whole(m, reference)
