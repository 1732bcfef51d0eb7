"""The embedding API (DESIGN.md's public contract) on a tiny random qwen3moe model:
generate / stream / chat, determinism, stop strings, cancel from another thread,
concurrent callers, close(), errors, and the desktop example's worker logic."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _scripted import script_tokens

import efedge

ROOT = Path(__file__).resolve().parent.parent
GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def path(tiny_gguf) -> Path:
    return tiny_gguf("qwen3moe", "F32")


@pytest.fixture(scope="module")
def m(path):
    with efedge.load(path) as model:
        yield model


def test_greedy_is_deterministic_and_stream_matches_generate(m):
    a = m.generate("The quick brown fox", max_tokens=8, **GREEDY)
    b = m.generate("The quick brown fox", max_tokens=8, **GREEDY)
    pieces = list(m.stream("The quick brown fox", max_tokens=8, **GREEDY))
    assert a and a == b == "".join(pieces)


def test_seed_reproducibility(m):
    kw = dict(max_tokens=8, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = m.generate("Once upon", seed=1234, **kw)
    b = m.generate("Once upon", seed=1234, **kw)
    assert a == b
    others = {m.generate("Once upon", seed=s, **kw) for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds should not all give the same text"


def test_stop_string_cuts_output(m):
    full = m.generate("hello", max_tokens=10, **GREEDY)
    assert len(full) >= 4
    stop = full[2:4]
    expected = full[:full.find(stop)]
    assert m.generate("hello", max_tokens=10, stop=[stop], **GREEDY) == expected
    assert "".join(m.stream("hello", max_tokens=10, stop=stop, **GREEDY)) == expected


def test_the_earliest_stop_string_wins_whatever_its_place_in_the_list():
    """One text piece may complete two stop strings (a token ".\n\n" with stops
    ["\n\n", "."]): the output ends before the first one in the text, never holding a
    stop string."""
    from efedge.generate import StopStringFilter

    f = StopStringFilter(["\n\n", "."])
    out = f.push("Hello") + f.push(".\n\n")
    assert f.stopped and out + f.flush() == "Hello"
    f = StopStringFilter(["b", "ab"])  # the earlier one completes from a held-back tail
    assert f.push("xa") + f.push("b") == "x" and f.stopped


def test_max_tokens(m):
    assert m.generate("hello", max_tokens=0, **GREEDY) == ""
    m.reset_stats()
    m.generate("hello", max_tokens=3, **GREEDY)
    assert m.stats()["tokens_generated"] <= 3
    n3 = len(m.generate("hello", max_tokens=3, **GREEDY))
    n6 = len(m.generate("hello", max_tokens=6, **GREEDY))
    assert n3 <= n6
    # a numpy integer (a count computed with numpy) is an integer too
    assert len(m.generate("hello", max_tokens=np.int64(3), **GREEDY)) == n3
    for bad in (-1, 2.0, True, np.float32(3)):
        with pytest.raises(efedge.ArgumentError, match="max_tokens"):
            m.generate("hello", max_tokens=bad)


def test_chat_needs_a_message(m):
    """An empty conversation is refused (as the server refuses empty messages), not
    answered from a bare generation prompt."""
    with pytest.raises(efedge.ArgumentError, match="messages is empty"):
        m.chat([])


def test_chat_stream_and_text_agree(m):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = m.chat(msgs, max_tokens=6, **GREEDY)
    assert isinstance(text, str)
    assert "".join(m.chat(msgs, stream=True, max_tokens=6, **GREEDY)) == text
    ids = m.chat_prompt(msgs)
    assert m.detokenize(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert ids.count(m.tokenize("<|im_start|>", add_special=False, parse_special=True)[0]) == 3


def test_cancel_from_another_thread(m):
    got: list[str] = []
    first = threading.Event()
    m.reset_stats()

    def worker() -> None:
        for piece in m.stream("a long story", max_tokens=100_000, temperature=1.0, seed=0,
                              min_p=0.0):
            got.append(piece)
            first.set()

    t = threading.Thread(target=worker)
    t.start()
    assert first.wait(60), "no output at all"
    t0 = time.perf_counter()
    m.cancel()
    t.join(timeout=10)
    assert not t.is_alive(), "cancel() did not stop the generation"
    assert time.perf_counter() - t0 < 5
    assert m.stats()["tokens_generated"] < m.n_ctx - 20
    # the model is usable afterwards, and the old cancel does not leak into the next call
    assert m.generate("hello", max_tokens=4, **GREEDY) == m.generate("hello", max_tokens=4,
                                                                       **GREEDY)
    assert m.generate("hello", max_tokens=4, **GREEDY) != ""


def test_two_threads_generate_concurrently(m):
    prompts = ["first prompt", "second, different prompt"]
    want = [m.generate(p, max_tokens=6, **GREEDY) for p in prompts]
    out: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            out[i] = m.generate(prompts[i], max_tokens=6, **GREEDY)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert [out.get(0), out.get(1)] == want


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(top_k=-2), dict(min_p=2.0), dict(seed=-5),
                                 dict(temperature=float("nan"))])
def test_bad_sampling_values(m, bad):
    with pytest.raises(efedge.SamplingError):
        m.generate("hi", max_tokens=2, **bad)
    with pytest.raises(efedge.SamplingError):
        list(m.stream("hi", max_tokens=2, **bad))


def test_prompt_longer_than_context(m):
    with pytest.raises(efedge.ContextLengthError):
        m.generate([1] * (m.n_ctx + 10), max_tokens=2)
    long_text = "word " * (m.n_ctx * 2)
    with pytest.raises(efedge.ContextLengthError):
        m.chat([{"role": "user", "content": long_text}], max_tokens=2)
    assert m.generate("hello", max_tokens=2, **GREEDY) is not None  # still usable


def test_generation_fills_the_context_and_no_more(path):
    """Prompt + output never exceed n_ctx (llama.cpp's limit); the run ends "length"."""
    with efedge.load(path, n_ctx=16) as small:
        ids = small.tokenize("The quick brown fox")
        res = efedge.GenerationResult([], "")
        list(small.stream(ids, max_tokens=100, result=res, temperature=1.0, seed=3,
                          top_k=0, top_p=1.0, min_p=0.0))
        if res.finish_reason == "length":  # (an EOG token may end it sooner)
            assert len(ids) + len(res.tokens) == 16
        assert len(ids) + len(res.tokens) <= 16
        with pytest.raises(efedge.ContextLengthError):
            small.logits(list(range(17)))
        assert small.logits(list(range(16))).shape == (16, small.n_vocab)


def test_a_second_generation_in_the_same_thread_is_refused(m):
    """The model's lock is re-entrant: a call made while this thread's generator is
    paused would reset the session under it. It is refused, and the paused generation
    goes on exactly as if alone."""
    alone = m.generate("The quick brown fox", max_tokens=8, **GREEDY)
    it = m.stream("The quick brown fox", max_tokens=8, **GREEDY)
    first = next(it)
    for call in (lambda: m.generate("other", max_tokens=2),
                 lambda: m.logits([1, 2, 3]),
                 lambda: m.chat([{"role": "user", "content": "hi"}], max_tokens=2)):
        with pytest.raises(efedge.EfedgeError, match="still in progress"):
            call()
    assert first + "".join(it) == alone
    assert m.generate("The quick brown fox", max_tokens=8, **GREEDY) == alone  # usable again


def test_a_generation_abandoned_by_an_ended_thread_does_not_block_the_model(path):
    """A thread that stops iterating mid-way and ends (its generator kept alive
    elsewhere, never finished) must not leave the model owned: the next generation and
    close() go ahead, and the abandoned iterator, if resumed, ends as cancelled."""
    kept, res = [], efedge.GenerationResult([], "")
    with efedge.load(path) as model:
        def abandon():
            it = model.stream("The quick brown fox", max_tokens=50, result=res, **GREEDY)
            next(it)
            kept.append(it)

        t = threading.Thread(target=abandon)
        t.start()
        t.join(60)
        out = []
        worker = threading.Thread(target=lambda: out.append(
            model.generate("hello", max_tokens=3, **GREEDY)))
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), "the model stayed owned by the abandoned generation"
        assert out and out[0] == model.generate("hello", max_tokens=3, **GREEDY)
        assert list(kept[0]) == [] and res.finish_reason == "cancelled"


def test_closing_the_model_under_a_paused_generation_ends_it(path):
    with efedge.load(path) as model:
        res = efedge.GenerationResult([], "")
        it = model.stream("The quick brown fox", max_tokens=8, result=res, **GREEDY)
        next(it)
        model.close()
        assert list(it) == []
        assert res.finish_reason == "cancelled"


def test_stream_never_yields_partial_utf8(m, monkeypatch):
    """Multi-byte characters split over byte tokens come out whole, in order."""
    text = "héllo wörld 世界 🙂 ok"
    ids = m.tokenize(text, add_special=False)
    assert len(ids) > len(text.encode("utf-8")) // 4  # the tiny vocab splits these
    script_tokens(monkeypatch, ids)  # the real prefill path, then these fixed ids
    pieces = list(m.stream("x", max_tokens=len(ids), **GREEDY))
    assert "".join(pieces) == text
    for p in pieces:
        assert "\ufffd" not in p
        p.encode("utf-8")  # no lone surrogates


def test_real_stream_pieces_are_valid_text(m):
    pieces = list(m.stream("abc", max_tokens=24, temperature=1.0, seed=7, min_p=0.0))
    for p in pieces:
        p.encode("utf-8")
    assert "".join(pieces) == m.generate("abc", max_tokens=24, temperature=1.0, seed=7,
                                         min_p=0.0)


def test_close_then_use_and_context_manager(path):
    progress: list[float] = []
    with efedge.load(path, progress=lambda f, msg: progress.append(f)) as m2:
        assert m2.generate("hi", max_tokens=2, **GREEDY) is not None
    assert progress and progress[0] == 0.0 and progress[-1] == 1.0
    for call in (lambda: m2.generate("hi", max_tokens=2), lambda: m2.logits([1, 2]),
                 lambda: m2.chat([{"role": "user", "content": "hi"}], max_tokens=2)):
        with pytest.raises(efedge.EfedgeError):
            call()
    m2.close()  # twice is fine


def test_chat_template_override_and_sandbox(path):
    with efedge.load(path, chat_template="llama-2") as m2:
        text = m2.detokenize(m2.chat_prompt([{"role": "user", "content": "Hi"}]))
        assert "[INST] Hi [/INST]" in text
    evil = "{{ cycler.__init__.__globals__.os.system('echo pwned') }}"
    with efedge.load(path, chat_template=evil) as m3:
        with pytest.raises(efedge.TemplateError):
            m3.chat([{"role": "user", "content": "Hi"}], max_tokens=2)


# -- examples/desktop_chat.py: its worker and Stop logic, without a display ---------------
def _desktop_module():
    spec = importlib.util.spec_from_file_location("desktop_chat",
                                                  ROOT / "examples" / "desktop_chat.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # must not need a display: Tk is only created in main()
    return mod


def test_desktop_example_worker_and_stop(m):
    mod = _desktop_module()
    s = mod.ChatSession(m, system="Be brief.", temperature=0.0, max_tokens=4)
    s.send("Hi")
    assert s.wait(60)
    events = []
    while not s.events.empty():
        events.append(s.events.get())
    assert events[-1][0] == "done" and not events[-1][1]["cancelled"]
    assert "".join(e[1] for e in events if e[0] == "piece") == events[-1][1]["text"]
    assert [x["role"] for x in s.messages] == ["system", "user", "assistant"]

    # a long reply, stopped as a Stop button would
    s.sampling.update(max_tokens=100_000, temperature=1.0, min_p=0.0)
    s.send("Tell me everything")
    kind, _ = s.events.get(timeout=60)
    assert kind == "piece"
    with pytest.raises(RuntimeError):
        s.send("not while busy")
    s.stop()
    assert s.wait(10), "Stop did not end the reply"
    last = None
    while not s.events.empty():
        last = s.events.get()
    assert last[0] == "done" and last[1]["cancelled"]
    assert len(s.messages) == 5 and s.messages[-1]["role"] == "assistant"


# The window itself, driven by a script inside its own Tk loop: type, Send, Stop, close.
_GUI_DRIVER = r"""
import sys, tkinter as tk
sys.path.insert(0, sys.argv[2])
import desktop_chat

real_mainloop, seen = tk.Tk.mainloop, []

def driven(root, n=0):
    w = {}
    def walk(parent):
        for c in parent.winfo_children():
            w.setdefault(type(c).__name__ + (c.cget("text") if isinstance(c, tk.Button)
                                             else ""), c)
            walk(c)
    walk(root)
    send, stop, entry, text = w["ButtonSend"], w["ButtonStop"], w["Entry"], w["ScrolledText"]
    state = {"step": 0, "ticks": 0}
    def tick():
        state["ticks"] += 1
        content = text.get("1.0", "end")
        if state["ticks"] > 3000:
            return root.destroy()
        idle = str(send.cget("state")) == "normal"
        if state["step"] == 0 and idle:
            entry.insert(0, "Hello"); send.invoke(); state["step"] = 1
        elif state["step"] == 1 and len(content.rsplit("Model: ", 1)[-1].strip()) > 3:
            stop.invoke(); state["step"] = 2
        elif state["step"] == 2 and "[stopped]" in content and idle:
            seen.append("stopped")
            return root.tk.call(root.protocol("WM_DELETE_WINDOW"))  # the close button
        elif state["step"] in (1, 2) and idle and "[stopped]" not in content:
            state["step"] = 0  # the sampled reply ended (end of turn) before Stop: again
        root.after(20, tick)
    root.after(20, tick)
    real_mainloop(root, n)

tk.Tk.mainloop = driven
desktop_chat.main([sys.argv[1]])
sys.exit(0 if seen == ["stopped"] else 1)
"""


def test_desktop_example_window(path, tmp_path):
    """Runs only where a display exists or Xvfb is installed."""
    pytest.importorskip("tkinter")
    env = dict(os.environ)
    xvfb = None
    if not env.get("DISPLAY"):
        if shutil.which("Xvfb") is None:
            pytest.skip("no display and no Xvfb")
        r, w = os.pipe()  # Xvfb picks a free display and writes its number here
        xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(w), "-screen", "0", "800x600x24"],
                                pass_fds=(w,), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        os.close(w)
        with os.fdopen(r) as fh:
            number = fh.readline().strip()
        if not number:
            xvfb.kill()
            pytest.skip("Xvfb did not start")
        env["DISPLAY"] = f":{number}"
    try:
        script = tmp_path / "drive_gui.py"
        script.write_text(_GUI_DRIVER)
        p = subprocess.run([sys.executable, str(script), str(path), str(ROOT / "examples")],
                           env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
    finally:
        if xvfb is not None:
            xvfb.terminate()
            xvfb.wait(10)


def test_bad_api_arguments_are_named_efedge_errors(m, path):
    """Out-of-range API arguments are ArgumentError: an EfedgeError (the CLI and apps
    catch those) that is still a ValueError."""
    for call in (lambda: m.logits([]), lambda: m.logits([m.n_vocab]),
                 lambda: m.generate("hello", max_tokens=-1), lambda: m.generate([])):
        with pytest.raises(efedge.ArgumentError) as info:
            call()
        assert isinstance(info.value, ValueError) and isinstance(info.value, efedge.EfedgeError)
    for kw in ({"threads": 0}, {"routing": "nearest"},
               {"routing": "cache-aware", "routing_slack": 2.0, "cache": "50%"},
               {"transfer_workers": 0, "cache": "50%"},
               {"transfer_workers": 2.0, "cache": "50%"}):
        with pytest.raises(efedge.ArgumentError):
            efedge.load(path, **kw)
    # a policy name is checked even where no expert cache would use it (no cache= here):
    # a typo must not pass unnoticed
    for name, what in (("expertflw", "unknown cache policy 'expertflw'"),
                       ("fixed:0", "bad policy 'fixed:0'")):
        for kw in ({}, {"cache": "50%"}):
            with pytest.raises(efedge.ArgumentError, match=what):
                efedge.load(path, policy=name, **kw)


def test_transfer_workers_follow_the_link_unless_given(path):
    """Reading the file itself, loads overlap in the drive's queue: FILE_WORKERS; through
    an emulated (serial) link, LINK_WORKERS; an explicit count wins (native threads reading
    the file on Linux — native_workers.py — Python ones elsewhere)."""
    from efedge.experts.transfer import FILE_WORKERS, LINK_WORKERS

    assert FILE_WORKERS > LINK_WORKERS
    for kw, want in (({}, FILE_WORKERS), ({"link": "720MB/s"}, LINK_WORKERS),
                     ({"transfer_workers": 3}, 3),
                     ({"link": "720MB/s", "transfer_workers": 1}, 1)):
        with efedge.load(path, cache="50%", **kw) as mm:
            eng = mm._experts.engine
            threads = eng.pool.n_threads if getattr(eng, "gil_free", False) else \
                len(eng._threads)
            assert eng.n_workers == want and threads == want


def test_logits_use_the_sessions_cache_and_leave_generation_exact(path, monkeypatch):
    """logits() evaluates in the session's own KV cache (emptied), not a second one made
    per call (on device="cuda" that one sat outside the VRAM the load planned); what
    follows is as from a fresh model."""
    with efedge.load(path) as fresh:
        want_text = fresh.generate("Once upon", max_tokens=6, temperature=0)
        want_logits = fresh.logits([5, 6, 7, 8])
    with efedge.load(path) as m:
        m.generate("Once upon a time there", max_tokens=3, temperature=0)
        monkeypatch.setattr(m._tf, "new_kv_cache", lambda n: pytest.fail("a second KV cache"))
        assert np.array_equal(m.logits([5, 6, 7, 8]), want_logits)
        assert m.generate("Once upon", max_tokens=6, temperature=0) == want_text
        assert np.array_equal(m.logits([5, 6, 7, 8]), want_logits)


def test_generation_after_load_brings_up_no_further_kernel(tiny_gguf):
    """Transformer.warmup brings up every kernel a short chat turn uses (prefill past the
    per-token products, decode, the output head), so the first reply does not stop to
    compile: after load, a 6-token prompt and 4 decoded tokens load or compile nothing
    more (counted whether numba's cache had them or not)."""
    from efedge.kernels import compile_stats

    for quant in ("F16", "F32"):
        with efedge.load(tiny_gguf("qwen3moe", quant)) as m:
            before = sum(compile_stats())
            m.generate(list(range(5, 11)), max_tokens=4, temperature=0)
            assert sum(compile_stats()) == before, quant


def test_importing_efedge_leaves_the_model_code_for_first_use():
    """`import efedge` (and with it the command line's parser: `efedge --help`, an early
    Ctrl-C) does not load numba and the kernels; efedge.load / Model / GenerationResult
    and submodules such as efedge.api come on first use, and a wrong name is still an
    AttributeError."""
    code = ("import sys, efedge\n"
            "assert 'efedge.api' not in sys.modules and 'numba' not in sys.modules\n"
            "assert efedge.load is efedge.api.load and efedge.Model is efedge.api.Model\n"
            "assert efedge.GenerationResult.__module__ == 'efedge.generate'\n"
            "try:\n    efedge.no_such_name\nexcept AttributeError:\n    pass\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr


def test_a_reused_result_reports_the_last_call_only(m):
    """One GenerationResult passed to call after call (an app keeping one around) holds
    the last call's tokens, logprobs and tool calls, not an accumulation of them."""
    from efedge.generate import GenerationResult

    r = GenerationResult([], "")
    m.generate("hello", max_tokens=3, result=r, logprobs=1, **GREEDY)
    first = list(r.tokens)
    m.generate("hello", max_tokens=2, result=r, **GREEDY)
    assert r.tokens == first[:2] and r.logprobs is None
    r.tool_calls = [{"stale": True}]
    m.chat([{"role": "user", "content": "hi"}], max_tokens=2, result=r, **GREEDY)
    assert r.tool_calls is None and len(r.tokens) <= 2


def _threads_seen(model, run) -> list[int]:
    """numba's compute threads at each forward pass of `model` while run() goes."""
    import numba

    seen: list[int] = []
    forward = model._tf.forward

    def spy(*a, **kw):
        seen.append(numba.get_num_threads())
        return forward(*a, **kw)

    model._tf.forward = spy
    try:
        run()
    finally:
        model._tf.forward = forward
    return seen


def test_a_models_threads_hold_in_every_thread_that_uses_it(path):
    """threads= is the model's, not the loading thread's: numba's thread count is per
    thread, so a model loaded with threads=1 and used from another thread (the server's
    worker, a desktop app's) computed with every core; and a model loaded with the
    default after one with threads=1, in the same thread, computed with one."""
    import numba

    cores = numba.config.NUMBA_NUM_THREADS
    if cores < 2:
        pytest.skip("one core: every thread count is the same")
    with efedge.load(path, threads=1) as m:
        def generate_elsewhere():
            t = threading.Thread(target=lambda: m.generate("Hello", max_tokens=3))
            t.start()
            t.join()

        seen = _threads_seen(m, generate_elsewhere)
        assert seen and set(seen) == {1}
        assert m.threads == 1
        with efedge.load(path) as m2:  # this thread's count was the other model's
            assert set(_threads_seen(m2, lambda: m2.generate("Hello", max_tokens=3))) \
                == {m2.threads} == {cores}
        seen = _threads_seen(m, lambda: m.generate("Hello", max_tokens=3))
        assert set(seen) == {1}
    # the loading thread's own count is as it was: a model's setting does not leak
    assert numba.get_num_threads() == cores


def test_expertflow_leaves_a_core_while_experts_stream(path, monkeypatch):
    """With no threads= given, a model whose expertflow streams experts computes with one
    core fewer than the machine has, so that the predictor's helper gets one; resident,
    other policies, an explicit count and the helper turned off keep numba's (every
    core)."""
    import numba

    from efedge.experts import predictor_thread

    cores, pool = predictor_thread.usable_cores(), numba.config.NUMBA_NUM_THREADS
    if cores < 2 or pool < 2 or not predictor_thread.available():
        pytest.skip("one core, or no helper thread on this platform")
    monkeypatch.delenv("EFEDGE_PREDICTOR_THREAD", raising=False)
    with efedge.load(path, cache="50%") as m:
        assert m.threads == min(pool, cores - 1)
        assert m._experts.policy.predictor.threaded  # the core it was left
        assert set(_threads_seen(m, lambda: m.generate("Hello", max_tokens=3))) == {m.threads}
    for kw in (dict(), dict(cache="50%", policy="ondemand"), dict(cache="50%", threads=pool),
               dict(cache="100%")):
        with efedge.load(path, **kw) as m:
            assert m.threads == pool, kw
    monkeypatch.setenv("EFEDGE_PREDICTOR_THREAD", "0")
    with efedge.load(path, cache="50%") as m:
        assert m.threads == pool
