"""Longevity: what an app that embeds a model for hours does to it — Ctrl-C at any
moment, streams built and never read, models dropped without close() — leaves nothing
behind that accumulates (pinned slots, registered cancel events, worker threads, file
descriptors) and leaves the model giving the uninterrupted results."""

from __future__ import annotations

import gc
import os
import threading

import numba
import numpy as np
import pytest

import efedge

TINY = dict(n_layer=2, n_expert=4, n_expert_used=2)
PROMPT = [5, 17, 42, 99, 7]
N_GEN = 8


@pytest.fixture(scope="module")
def path(tiny_gguf):
    return tiny_gguf("qwen3moe", "F32", **TINY)


@pytest.fixture(scope="module")
def greedy(path):
    with efedge.load(path) as m:
        return m.generate(PROMPT, max_tokens=N_GEN, temperature=0)


@pytest.mark.parametrize("link", [None, "1GB/s"])
@pytest.mark.parametrize("policy", ["expertflow", "ondemand"])
def test_ctrl_c_in_the_policy_leaves_no_slot_pinned(path, greedy, policy, link):
    """Ctrl-C landing in the policy's on_request (Python code run for every layer call
    with the cache lock held) came after the layer's resident experts were pinned, and
    before acquire's try: the pins stayed, and once every slot was pinned the next
    generation waited 60 s and failed (TransferError). Through an emulated link (the
    compute thread's own copies) the same for slots left LOADING by interrupted layers."""
    with efedge.load(path, cache="60%", policy=policy, link=link) as m:
        src = m._experts
        orig = src.policy.on_request
        for nth in range(1, 10):
            calls = [0]

            def on_request(*a, nth=nth, calls=calls, **kw):
                calls[0] += 1
                if calls[0] == nth:
                    raise KeyboardInterrupt
                return orig(*a, **kw)

            src.policy.on_request = on_request
            with pytest.raises(KeyboardInterrupt):
                m.generate(PROMPT, max_tokens=N_GEN, temperature=0)
            src.policy.on_request = orig
            assert (src.cache.slot_pins == 0).all(), (nth, src.cache.slot_pins)
        assert m.generate(PROMPT, max_tokens=N_GEN, temperature=0) == greedy


def test_ctrl_c_while_ready_pool_pins_leaves_no_slot_pinned(path, greedy):
    """The all-resident fast path (ready_pool) pins its K slots one by one before the
    policy runs: an interrupt between two pins kept the first."""
    with efedge.load(path, cache="100%", policy="ondemand") as m:
        src = m._experts
        m.generate(PROMPT, max_tokens=N_GEN, temperature=0)  # every expert resident
        real = src.cache.slot_prefetched

        class InterruptSecond:  # slot_prefetched, raising at its second read
            reads = 0

            def __getitem__(self, s):
                InterruptSecond.reads += 1
                if InterruptSecond.reads == 2:
                    raise KeyboardInterrupt
                return real[s]

            def __setitem__(self, s, v):
                real[s] = v

        src.cache.slot_prefetched = InterruptSecond()
        try:
            with pytest.raises(KeyboardInterrupt):
                src.ready_pool(0, np.array([0, 1]))
        finally:
            src.cache.slot_prefetched = real
        assert (src.cache.slot_pins == 0).all(), src.cache.slot_pins
        assert m.generate(PROMPT, max_tokens=N_GEN, temperature=0) == greedy


def test_ctrl_c_as_the_chunk_size_is_set_restores_it(path, monkeypatch):
    """kernels.dynamic sets numba's chunk size to 1 around a prefill kernel. Ctrl-C
    landing right after set_parallel_chunksize's C call (its result not yet returned)
    left it at 1, and every later decode kernel handed out its work in chunks of one."""
    from efedge import kernels

    real = numba.set_parallel_chunksize
    state = {"armed": True}

    def set_then_interrupt(n):
        prev = real(n)
        if state["armed"] and n == 1:
            state["armed"] = False
            raise KeyboardInterrupt  # as a real signal does, after the C call
        return prev

    before = numba.get_parallel_chunksize()
    monkeypatch.setattr(numba, "set_parallel_chunksize", set_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        kernels.dynamic(lambda: None)
    assert not state["armed"]
    assert numba.get_parallel_chunksize() == before


def test_streams_never_read_are_forgotten(path):
    """stream() registers its cancel event at call time (so a cancel() before the first
    token is not lost); a stream dropped before its first next() never ran the finally
    that unregisters it, so every such call stayed in the set for good."""
    with efedge.load(path) as m:
        for i in range(20):
            it = m.stream(PROMPT, max_tokens=4)
            if i % 2:
                next(it)  # started, then dropped half-way: its finally forgets it
            del it
        chat = m.chat([{"role": "user", "content": "hi"}], stream=True, max_tokens=2)
        del chat
        gc.collect()
        assert len(m._active_cancels) == 0
        # a cancel() between the call and the first next() still stops that stream
        res = efedge.GenerationResult([], "")
        it = m.stream(PROMPT, max_tokens=4, result=res)
        m.cancel()
        assert list(it) == [] and res.finish_reason == "cancelled"
        assert len(m._active_cancels) == 0


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _maps(p) -> int:
    with open("/proc/self/maps") as fh:
        return sum(1 for line in fh if line.rstrip().endswith(str(p)))


def test_a_model_dropped_without_close_stops_its_workers(path):
    """Without close(), the transfer workers (daemon threads) kept the engine alive for
    the life of the process, and with it a file descriptor, the mapping and the
    cache's memory: an app that loaded models again and again leaked all of it."""
    m = efedge.load(path, cache="60%")  # warm
    m.generate(PROMPT, max_tokens=2, temperature=0)
    m.close()
    del m
    gc.collect()
    threads, fds = threading.active_count(), _fds()
    for policy in ("expertflow", "ondemand", "expertflow"):
        m = efedge.load(path, cache="60%", policy=policy)
        m.generate(PROMPT, max_tokens=2, temperature=0)
        del m  # no close()
        gc.collect()
    gc.collect()  # the policy's reference cycle goes in the pass after the finalizer's
    assert threading.active_count() == threads
    assert _fds() == fds
    assert _maps(path) == 0
    # and close() after all still works on a live model (the finalizer runs once)
    with efedge.load(path, cache="60%") as m:
        assert np.isfinite(m.logits(PROMPT)).all()
    assert threading.active_count() == threads


def test_close_goes_ahead_while_another_thread_holds_a_paused_stream(path):
    """A worker thread that streams into a bounded queue blocks when the UI stops
    reading; the UI then closes the model. close() waited for that (live) thread's
    generation to reach its next token, which never came: it hung for good. The paused
    generation now ends as cancelled when resumed, touching nothing."""
    import queue

    m = efedge.load(path, cache="60%")
    pieces: queue.Queue[str] = queue.Queue(maxsize=1)
    res = efedge.GenerationResult([], "")
    release = threading.Event()

    def producer():
        for piece in m.stream(PROMPT, max_tokens=50, result=res, temperature=1.0, seed=1,
                              top_k=0, top_p=1.0, min_p=0.0):
            pieces.put(piece)
            release.wait(30)  # the consumer is gone: blocked here, mid-stream

    t = threading.Thread(target=producer, daemon=True)
    t.start()
    pieces.get(timeout=30)
    closer = threading.Thread(target=m.close, daemon=True)
    closer.start()
    closer.join(10)
    assert not closer.is_alive(), "close() waited for a consumer that never came back"
    release.set()
    t.join(10)
    assert not t.is_alive() and res.finish_reason == "cancelled"
