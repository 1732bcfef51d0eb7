"""Routing traces and the trace-driven simulator (same cache / policy code, virtual clock)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import load_benchmark

import efedge
from efedge.cli import main as cli_main
from efedge.profiles import HARDWARE, MODELS
from efedge.simulate import SimSetup, SimulationError, simulate
from efedge.trace import load_trace, record_trace, save_trace

TEXT = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n" * 6


@pytest.fixture(scope="module")
def trace(tiny_gguf, tmp_path_factory):
    path = tiny_gguf("qwen3moe", "F16")
    out = tmp_path_factory.mktemp("trace") / "t.npz"
    with efedge.load(path) as m:
        arrays = record_trace(m, TEXT, chunk=32)
        # the trace's routing is the model's routing: check it against a direct call
        ids = m.tokenize(TEXT)[:8]
        seen = []
        m._tf.on_route = lambda layer, h, sel: seen.append((layer, sel.copy()))
        m.logits(ids)
        m._tf.on_route = None
    save_trace(out, arrays, source="fib")
    return out, seen, ids


def test_trace_records_the_models_routing(trace):
    out, seen, ids = trace
    arrays, meta = load_trace(out)
    t, n_layer, k = arrays["experts"].shape
    assert (meta["n_layer"], meta["top_k"], meta["n_expert"]) == (n_layer, k, 16)
    assert t == meta["n_tokens"] == len(arrays["tokens"])
    assert arrays["tokens"][:8].tolist() == ids
    for layer, sel in seen:
        assert np.array_equal(arrays["experts"][:8, layer], sel)
    probs = arrays["probs"].astype(np.float32)
    assert np.allclose(probs.sum(-1), 1.0, atol=1e-2)  # qwen3moe renormalises top-k
    pre = arrays["pregate"].astype(np.float32)
    assert np.isnan(pre[:, -1]).all() and np.isfinite(pre[:, 0, 0]).all()


def _setup(meta, budget, link=2e9, layer_s=1e-4, expert_s=2e-5):
    return SimSetup(meta["bytes_per_expert"], layer_s, expert_s, link, 0.0, budget)


def test_simulator_counters_and_monotonic(trace):
    arrays, meta = load_trace(trace[0])
    rows = [simulate(arrays, meta, _setup(meta, b), "ondemand", warmup=4)
            for b in ("30%", "60%", "100%")]
    for r in rows:
        assert r["hits"] + r["late"] + r["misses"] == r["expert_requests"]
    stalls = [r["stall_s"] for r in rows]
    assert stalls[0] >= stalls[1] >= stalls[2]
    # everything fits: after warm-up the only misses are experts never seen before
    assert rows[2]["hit_rate"] > rows[0]["hit_rate"]
    fast = simulate(arrays, meta, _setup(meta, "30%", link=1e15), "ondemand", warmup=4)
    assert fast["stall_s"] < 1e-6


def test_simulator_stall_matches_link_arithmetic(trace):
    """With no compute to hide behind, every miss waits exactly bytes / bandwidth."""
    arrays, meta = load_trace(trace[0])
    r = simulate(arrays, meta, _setup(meta, "30%", link=1e9, layer_s=0, expert_s=0),
                 "ondemand", warmup=0)
    per = meta["bytes_per_expert"][0]
    assert r["stall_s"] == pytest.approx(r["misses"] * per / 1e9, rel=1e-6)
    assert r["bytes_loaded"] == r["misses"] * per


def test_simulate_cli_profiles_and_json(trace, capsys):
    assert set(HARDWARE) >= {"rtx4060-laptop", "rtx4050-laptop", "rtx3060-desktop", "m2-16gb",
                             "egpu-thunderbolt"}
    assert set(MODELS) >= {"mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v2-lite",
                           "gpt-oss-20b"}
    assert all(p.source for p in [*HARDWARE.values(), *MODELS.values()])
    rc = cli_main(["simulate", str(trace[0]), "--hw", "rtx4060-laptop", "--model-profile",
                   "qwen3-30b-a3b", "--cache", "25%", "50%", "--policy", "ondemand", "lfu",
                   "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and {r["policy"] for r in rows} == {"ondemand", "lfu"}
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert cli_main(["simulate", str(trace[0]), "--hw", "nope"]) == 1


def test_simulate_cli_charges_the_compute_threads_own_copies(trace, capsys):
    """--demand-copy-us / --prefetch-copy-us: the compute thread's time per copy it makes
    itself (the CPU path through an emulated link) reaches the virtual clock — on-demand
    pays it per miss: on a link-bound run it overlaps the link's time (less stall, the
    same tokens/s), on a fast link it is compute (fewer tokens/s); 0 (the default) is a
    copy engine's DMA, as before."""
    def run(link, *extra):
        rc = cli_main(["simulate", str(trace[0]), "--cache", "30%", "--policy", "ondemand",
                       "--link", link, "--warmup", "4", "--json", *extra])
        assert rc == 0
        return json.loads(capsys.readouterr().out)[0]
    slow = run("500MB/s")
    assert run("500MB/s", "--demand-copy-us", "0") == slow
    copied = run("500MB/s", "--demand-copy-us", "300")
    assert copied["misses"] == slow["misses"] > 0
    assert copied["stall_ms_per_token"] < slow["stall_ms_per_token"]
    assert copied["tokens_per_s"] == pytest.approx(slow["tokens_per_s"])
    fast = run("100GB/s")
    assert run("100GB/s", "--demand-copy-us", "300")["tokens_per_s"] < fast["tokens_per_s"]
    # prefetches are charged as such: expertflow's with prefetch copies, not without
    base = cli_main(["simulate", str(trace[0]), "--cache", "30%", "--policy", "expertflow",
                     "--link", "100GB/s", "--warmup", "4", "--json"])
    assert base == 0
    ef = json.loads(capsys.readouterr().out)[0]
    assert cli_main(["simulate", str(trace[0]), "--cache", "30%", "--policy", "expertflow",
                     "--link", "100GB/s", "--warmup", "4", "--json",
                     "--prefetch-copy-us", "300"]) == 0
    ef_copied = json.loads(capsys.readouterr().out)[0]
    assert ef["prefetch_issued"] > 0
    assert ef_copied["tokens_per_s"] < ef["tokens_per_s"]


def test_virtual_link_keeps_busy_between_clock_steps():
    """Queued copies run back to back on the virtual link: each starts when the previous
    one ends (or when it was queued, if later), not when the simulator next looks. (The
    simulator once started a queued copy only at the next clock step: one expert per
    layer's compute, which made prefetching look useless on fast links.)"""
    from efedge.experts.cache import READY, ExpertCache
    from efedge.experts.stats import Counters
    from efedge.experts.transfer import DEMAND, PREFETCH
    from efedge.experts.virtual import VirtualClock, VirtualTransferEngine
    from efedge.simulate import TraceStore

    store = TraceStore(1, 8, [1e6])
    cache = ExpertCache(store, 8 * 10**6, 2, allocate=False)
    clock, counters = VirtualClock(), Counters()
    eng = VirtualTransferEngine(store, cache, counters, clock, 1e9)  # 1 ms per expert
    def load(e, priority):
        cache.assign(e, 0, e)  # slot e holds expert e
        eng.submit(0, e, e, priority)

    for e in range(4):
        load(e, PREFETCH)
    clock.advance(2.5e-3)  # queued later, while the link is still busy: demand goes first
    load(4, DEMAND)
    eng.advance_to(10e-3)  # one look after all five should be done
    assert all(cache.slot_state[s] == READY for s in range(5))
    assert counters.bytes_loaded == 5 * 10**6
    assert eng.next_event() is None or eng.next_event() <= 10e-3
    # order: e0 0-1 ms, e1 1-2, e2 2-3 (e4 was not queued yet at 2 ms), then the demand
    # load e4 3-4 before the prefetch e3 4-5: the link ends at 5 ms
    assert eng._busy_until == pytest.approx(5e-3)
    # a copy queued on an idle link starts when it is queued
    clock.advance(20e-3 - clock.t)
    load(5, PREFETCH)
    assert eng.next_event() == pytest.approx(21e-3)


def test_simulator_charges_a_wake_up_per_blocked_wait(trace):
    """wake_s: a compute thread that blocked on a load resumes that long after it lands.
    Each layer with a miss pays it at least once (its last wait) and at most once per
    miss (earlier wake-ups overlap with the link's next copy)."""
    import dataclasses

    arrays, meta = load_trace(trace[0])
    base = _setup(meta, "30%", link=1e9, layer_s=0, expert_s=0)
    r0 = simulate(arrays, meta, base, "ondemand", warmup=0)
    w = 1e-5
    r1 = simulate(arrays, meta, dataclasses.replace(base, wake_s=w), "ondemand", warmup=0)
    assert r1["misses"] == r0["misses"] > 0
    extra = r1["stall_s"] - r0["stall_s"]
    assert w <= extra <= r0["misses"] * w * (1 + 1e-9)


def test_simulator_announces_each_tokens_pass_to_the_policy(trace):
    """The replay gives the policy each token before its first layer, as the model does
    (token memory); a trace without tokens still replays, without it."""
    arrays, meta = load_trace(trace[0])
    setup = _setup(meta, "30%", link=8e9)  # a link that keeps up: prediction decides
    with_tokens = simulate(arrays, meta, setup, "expertflow", warmup=4)
    without = simulate({k: v for k, v in arrays.items() if k != "tokens"}, meta, setup,
                       "expertflow", warmup=4)
    for r in (with_tokens, without):
        assert r["hits"] + r["late"] + r["misses"] == r["expert_requests"]
    # the repeated text is remembered token by token: more of it is found in time
    # (measured: stall 0.03 against 0.08 ms per token, hits 2047 against 1626)
    assert with_tokens["hits"] > 1.1 * without["hits"], (with_tokens, without)
    assert with_tokens["stall_s"] < 0.7 * without["stall_s"], (with_tokens, without)


@pytest.mark.parametrize("link", [2e8, 2e9])
def test_the_context_draft_keeps_what_a_repeated_text_uses_next(trace, monkeypatch, link):
    """The replay gives each token's position too: on a text that repeats, the tokens
    that followed the current token's previous occurrence come again, and expertflow's
    eviction keeps their experts (HybridPredictor's context draft) — more hits and less
    stall than with the draft off (measured at 30%: hits 1184 / 1090 against 1077 / 1013
    at 0.2 / 2 GB/s)."""
    import efedge.simulate as sim
    from efedge.experts.scheduler import make_policy

    arrays, meta = load_trace(trace[0])
    setup = _setup(meta, "30%", link=link)
    runs = {}
    for n in (8, 0):
        monkeypatch.setattr(sim, "make_policy", lambda name, n=n: make_policy(
            name, draft_tokens=n))
        runs[n] = simulate(arrays, meta, setup, "expertflow", warmup=4)
    assert runs[8]["hits"] > 1.05 * runs[0]["hits"], runs
    assert runs[8]["stall_s"] < runs[0]["stall_s"], runs


def test_simulator_can_charge_the_policys_own_time(trace):
    """policy_time > 0: what the policy's hooks take here runs on the virtual clock (a
    CPU, where the scheduler shares the cores); 0 leaves it out (a GPU)."""
    arrays, meta = load_trace(trace[0])
    free = simulate(arrays, meta, _setup(meta, "30%"), "expertflow", warmup=4)
    setup = _setup(meta, "30%")
    setup.policy_time = 50.0  # as if the host were 50x slower: clearly visible
    charged = simulate(arrays, meta, setup, "expertflow", warmup=4)
    assert charged["wall_s"] > free["wall_s"] * 1.05, (charged["wall_s"], free["wall_s"])
    assert charged["expert_requests"] == free["expert_requests"]


def test_simulator_charges_the_compute_threads_demand_copies(trace):
    """demand_copy_s > 0 (a CPU engine with an emulated link copies demand loads on the
    compute thread): each demand load costs that much compute after its route while the
    link runs, so the wall time grows by at most that per miss and the waiting shrinks;
    the decisions stay the same. A negative time is refused."""
    arrays, meta = load_trace(trace[0])
    queued = simulate(arrays, meta, _setup(meta, "30%", link=2e8), "ondemand", warmup=4)
    setup = _setup(meta, "30%", link=2e8)
    setup.demand_copy_s = 1e-4
    copied = simulate(arrays, meta, setup, "ondemand", warmup=4)
    assert copied["misses"] == queued["misses"] > 0
    assert copied["stall_s"] < queued["stall_s"]
    extra = copied["wall_s"] - queued["wall_s"]  # (0 where the link is the bound)
    assert -1e-9 <= extra <= copied["misses"] * 1e-4 + 1e-9, (extra, copied["misses"])
    setup.demand_copy_s = -1.0
    with pytest.raises(SimulationError, match="demand_copy_s"):
        simulate(arrays, meta, setup, "ondemand", warmup=4)


def test_virtual_link_charges_the_compute_thread_per_prefetch_it_starts():
    """prefetch_copy_s: as the live CPU engine's compute thread copies each prefetch as
    the link comes free (InlinePrefetches), every prefetch the virtual link starts costs
    the compute clock that much, paid when it next passes the cache (pay_copies); the link
    itself runs as before, and demand loads (charged by copy_inline) add no debt."""
    from efedge.experts.cache import ExpertCache
    from efedge.experts.stats import Counters
    from efedge.experts.transfer import DEMAND, PREFETCH
    from efedge.experts.virtual import VirtualClock, VirtualTransferEngine
    from efedge.simulate import TraceStore

    store = TraceStore(1, 8, [1e6])
    cache = ExpertCache(store, 8 * 10**6, 2, allocate=False)
    clock, counters = VirtualClock(), Counters()
    eng = VirtualTransferEngine(store, cache, counters, clock, 1e9, prefetch_copy_s=2e-4)
    for e, priority in ((0, PREFETCH), (1, PREFETCH), (2, DEMAND)):
        cache.assign(e, 0, e)
        eng.submit(0, e, e, priority)
    assert eng.copy_debt == pytest.approx(2e-4)  # one prefetch on the link, two queued
    eng.pay_copies()
    assert clock.t == pytest.approx(2e-4) and eng.copy_debt == 0.0
    eng.advance_to(1e-3)  # the demand load goes next: no debt
    assert eng.copy_debt == 0.0
    eng.advance_to(2e-3)  # then the second prefetch starts
    assert eng.copy_debt == pytest.approx(2e-4)
    eng.pay_copies()
    assert clock.t == pytest.approx(2.2e-3)
    assert eng._busy_until == pytest.approx(3e-3)  # the link's own schedule unchanged


def test_simulator_charges_the_compute_threads_prefetch_copies(trace):
    """SimSetup.prefetch_copy_s > 0: each prefetch the link starts costs the compute
    thread that much (a policy that prefetches nothing runs exactly as before; one that
    prefetches decodes visibly slower). A negative time is refused."""
    import dataclasses

    arrays, meta = load_trace(trace[0])
    setup = _setup(meta, "30%", link=1e11)  # (a fast link: the compute is what waits)
    charged = dataclasses.replace(setup, prefetch_copy_s=1e-3)
    free_od = simulate(arrays, meta, setup, "ondemand", warmup=4)
    assert simulate(arrays, meta, charged, "ondemand", warmup=4) == free_od
    free = simulate(arrays, meta, setup, "fixed:1", warmup=4)
    paid = simulate(arrays, meta, charged, "fixed:1", warmup=4)
    assert free["prefetch_issued"] > 0
    assert paid["wall_s"] > free["wall_s"] * 1.05, (paid["wall_s"], free["wall_s"])
    with pytest.raises(SimulationError, match="prefetch_copy_s"):
        simulate(arrays, meta, dataclasses.replace(setup, prefetch_copy_s=-1.0), "fixed:1")


# -- bad input: one-line errors, never a traceback or a meaningless table -----------------
def _cli(argv, capsys) -> tuple[int, str]:
    """Exit status and stderr of `efedge ARGV` (argparse's refusals exit with status 2)."""
    try:
        rc = cli_main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def inputs(tiny_gguf, tmp_path_factory, trace):
    d = tmp_path_factory.mktemp("bad_input")
    (d / "text.txt").write_text(TEXT)
    (d / "empty.txt").write_text("")
    (d / "not_a_trace.npz").write_text("hello")
    with efedge.load(tiny_gguf("qwen3moe", "F16")) as m:
        # 8 tokens: shorter than simulate's default warm-up of 16
        save_trace(d / "t8.npz", record_trace(m, TEXT, max_tokens=8), source="fib")
    return {"moe": tiny_gguf("qwen3moe", "F16"), "dense": tiny_gguf("qwen3", "F16"),
            "text": d / "text.txt", "empty": d / "empty.txt", "missing": d / "missing.txt",
            "out": d / "out.npz", "nodir": d / "nodir" / "out.npz", "trace": trace[0],
            "t8": d / "t8.npz", "not_trace": d / "not_a_trace.npz", "dir": d}


BAD_TRACE_CLI = [
    (["{moe}", "--text", "{empty}", "-o", "{out}"], r"empty.txt' is empty"),
    (["{moe}", "--text", "{text}", "-o", "{out}", "--max-tokens", "0"], r"max-tokens.*got 0"),
    (["{moe}", "--text", "{text}", "-o", "{out}", "--max-tokens", "-3"], r"max-tokens.*got -3"),
    (["{moe}", "--text", "{text}", "-o", "{out}", "--horizon", "-1"], r"horizon.*got -1"),
    (["{moe}", "--text", "{text}", "-o", "{out}", "--sketch", "-1"], r"sketch.*got -1"),
    (["{dense}", "--text", "{text}", "-o", "{out}"], r"qwen3.*no routed experts"),
    (["{moe}", "--text", "{missing}", "-o", "{out}"], r"missing.txt': No such file"),
    (["{moe}", "--text", "{text}", "-o", "{nodir}"], r"nodir/out.npz'.*does not exist"),
    # a directory was "traced … → DIR", the trace silently written to DIR.npz beside it
    (["{moe}", "--text", "{text}", "-o", "{dir}"], r"cannot write trace '.*': .*directory"),
]
BAD_SIMULATE_CLI = [
    (["{t8}"], r"8 tokens.*warm-up takes 16"),
    (["{trace}", "--warmup", "1000"], r"warm-up takes 1000"),
    (["{trace}", "--max-tokens", "0"], r"max-tokens.*got 0"),
    (["{trace}", "--warmup", "-1"], r"warmup.*got -1"),
    (["{trace}", "--layer-ms", "-1"], r"layer-ms.*got -1"),
    (["{trace}", "--expert-ms", "0"], r"expert-ms.*got 0"),
    (["{trace}", "--layer-ms", "inf"], r"layer-ms"),
    (["{trace}", "--demand-copy-us", "-1"], r"demand-copy-us.*got -1"),
    (["{trace}", "--prefetch-copy-us", "nan"], r"prefetch-copy-us.*got nan"),
    (["{missing}"], r"cannot read trace '.*missing.txt': No such file"),
    (["{not_trace}"], r"not_a_trace.npz: not an efedge trace"),
]


@pytest.mark.parametrize(("argv", "word"), [(["trace", *a], w) for a, w in BAD_TRACE_CLI] +
                         [(["simulate", *a], w) for a, w in BAD_SIMULATE_CLI])
def test_bad_trace_and_simulate_input_is_a_one_line_error(inputs, capsys, argv, word):
    rc, err = _cli([a.format(**inputs) for a in argv], capsys)
    assert rc != 0 and "Traceback" not in err, err
    assert re.search(word, err), err
    assert not inputs["out"].exists()


def test_trace_writes_the_file_it_names(inputs, capsys, tmp_path):
    """-o without the .npz suffix: numpy appended one, so the file the summary named (and
    the user passes to simulate next) did not exist."""
    out = tmp_path / "routing"
    rc, err = _cli(["trace", inputs["moe"], "--text", inputs["text"], "-o", out,
                    "--max-tokens", 24], capsys)
    assert rc == 0, err
    assert f"→ {out}" in err and out.is_file() and not out.with_suffix(".npz").exists()
    arrays, meta = load_trace(out)
    assert arrays["experts"].shape[0] == meta["n_tokens"] == 24
    rc, err = _cli(["simulate", out, "--warmup", 4], capsys)
    assert rc == 0, err


def _set(key, value):
    return lambda arrays, meta: arrays.__setitem__(key, value(arrays[key]))


def _meta(key, value):
    return lambda arrays, meta: meta.__setitem__(key, value(meta[key]))


def _nan_at(key, index):
    def corrupt(arrays, meta):
        arrays[key] = arrays[key].copy()
        arrays[key][index] = np.nan
    return corrupt


# a trace rewritten with one bad array or metadata field (the trace fixture: 16 experts)
BAD_TRACE_FILES = [
    ("ids-too-large", _set("experts", lambda a: np.full_like(a, 999)),
     r"experts: expert ids must lie in 0\.\.15 \(n_expert 16\), got ids from 999 to 999"),
    # numpy wrapped -1 round to expert 15: a table, exit status 0
    ("ids-negative", _set("experts", lambda a: np.full_like(a, -1)),
     r"experts: expert ids must lie in 0\.\.15 .*from -1"),
    ("ids-float", _set("experts", lambda a: a.astype(np.float32)),
     r"experts: expert ids must be integers, got dtype float32"),
    ("n_layer", _meta("n_layer", lambda v: 99),
     r"experts must be \[tokens, n_layer, top_k\] = \(\d+, 99, \d+\) .*got shape"),
    ("n_expert", _meta("n_expert", lambda v: 0), r"metadata's n_expert must be ≥ 1, got 0"),
    ("top_k", _meta("top_k", lambda v: v + 1), r"experts must be \[tokens, n_layer, top_k\]"),
    ("n_tokens", _meta("n_tokens", lambda v: v + 1), r"n_tokens \(\d+\) is not the number"),
    ("pregate-layers", _set("pregate", lambda a: a[:, :2]),
     r"pregate must be \[tokens, n_layer, horizon, n_expert\] = .*got shape \(\d+, 2, "),
    ("pregate-nan", _nan_at("pregate", (3, 0, 0, 5)), r"pregate holds NaN .*distance 1"),
    ("pregate_in-nan", _nan_at("pregate_in", (3, 1, 5)), r"pregate_in holds NaN"),
    ("probs-shape", _set("probs", lambda a: a[:, :, :1]), r"probs must be \[tokens, n_layer"),
    ("tokens-negative", _set("tokens", lambda a: -a), r"tokens must be token ids ≥ 0"),
    ("bytes-negative", _meta("bytes_per_expert", lambda v: [-b for b in v]),
     r"bytes_per_expert\[0\] must be a size ≥ 1 \(bytes\), got -\d+"),
    ("bytes-per-layer", _meta("bytes_per_expert", lambda v: v[:1]),
     r"bytes_per_expert must list an expert's size for each of its \d+ layers"),
]


@pytest.mark.parametrize(("corrupt", "word"), [c[1:] for c in BAD_TRACE_FILES],
                         ids=[c[0] for c in BAD_TRACE_FILES])
def test_a_trace_that_does_not_fit_its_metadata_is_refused_by_name(trace, capsys, tmp_path,
                                                                  corrupt, word):
    """Arrays that do not fit the metadata failed deep in the simulator (an IndexError, a
    broadcast error, a budget of negative sizes) or, with negative ids, printed a table:
    load_trace names the array and what it should be, `efedge simulate` in one line."""
    from efedge.trace import TraceError

    arrays, meta = load_trace(trace[0])
    corrupt(arrays, meta)
    path = tmp_path / "bad.npz"
    save_trace(path, dict(arrays, meta=np.array(json.dumps(meta))))
    with pytest.raises(TraceError, match=word) as info:
        load_trace(path)
    assert str(path) in str(info.value)
    rc, err = _cli(["simulate", path, "--warmup", 4], capsys)
    assert rc == 1 and err.count("\n") == 1, err
    assert err.startswith(f"efedge: error: {path}: ") and re.search(word, err), err


def test_valid_and_shipped_traces_load(trace, tmp_path):
    """The checks refuse no trace efedge writes: the fixture's, one with a hidden-state
    sketch and no pre-gating ahead (horizon 0), and the traces that ship with efedge
    (older: the Mixtral-shaped one has no pregate_in or router_input)."""
    arrays, meta = load_trace(trace[0])
    meta.update(horizon=0)
    arrays.update(pregate=arrays["pregate"][:, :, :0],
                  hidden=np.zeros(arrays["experts"].shape[:2] + (3,), np.float16))
    save_trace(tmp_path / "h0.npz", dict(arrays, meta=np.array(json.dumps(meta))))
    load_trace(tmp_path / "h0.npz")
    shipped = sorted((Path(efedge.__file__).parent / "data" / "traces").glob("*.npz"))
    assert shipped
    for path in shipped:
        arrays, meta = load_trace(path)
        assert arrays["experts"].shape[0] == meta["n_tokens"]


def test_simulate_plot_without_matplotlib_fails_before_the_run(inputs, capsys, monkeypatch,
                                                                 tmp_path):
    """--plot needs matplotlib (not installed with efedge): that was found out after every
    budget and policy had been simulated and the table printed, then status 1."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    try:
        rc = cli_main(["simulate", str(inputs["trace"]), "--warmup", "4", "--plot",
                       str(tmp_path / "p.png")])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    assert rc == 1 and "--plot needs matplotlib" in err, err
    assert out == "", out


def test_trace_refuses_nothing_to_trace(inputs):
    from efedge.trace import TraceError

    with efedge.load(inputs["moe"]) as m:
        with pytest.raises(TraceError, match="empty"):
            record_trace(m, "")
        with pytest.raises(TraceError, match="max_tokens"):
            record_trace(m, TEXT, max_tokens=-3)  # not: all but the last 3 tokens
    with efedge.load(inputs["dense"]) as m:
        with pytest.raises(efedge.UnsupportedModelError, match="mixture-of-experts"):
            record_trace(m, TEXT)


def test_simulate_refuses_a_trace_no_longer_than_the_warm_up(trace):
    """With T ≤ warm-up the counters were never reset and the cold start was reported as
    one token's figures (94.6 tok/s instead of ~760, a 100 % bound hit rate)."""
    from efedge.simulate import SimulationError, lower_bound

    arrays, meta = load_trace(trace[0])
    T = arrays["experts"].shape[0]
    setup = _setup(meta, "30%")
    for fn in (lambda **kw: simulate(arrays, meta, setup, "ondemand", **kw),
               lambda **kw: lower_bound(arrays, meta, setup, **kw)):
        with pytest.raises(SimulationError, match=rf"\b{T} tokens.*\b{T}\b"):
            fn(warmup=T)
        with pytest.raises(SimulationError, match="max_tokens"):
            fn(warmup=4, max_tokens=0)
        with pytest.raises(SimulationError, match="warmup"):
            fn(warmup=-1)
    with pytest.raises(SimulationError, match="layer_compute_s"):
        simulate(arrays, meta, _setup(meta, "30%", layer_s=-1e-3), "ondemand", warmup=4)
    # one token left after the warm-up is enough
    r = simulate(arrays, meta, setup, "ondemand", warmup=T - 1)
    assert r["tokens_generated"] == 1 and r["tokens_per_s"] > 0


def test_simulator_replays_early_requests_of_routers_on_the_layer_input(tiny_gguf, tmp_path):
    """smallthinker's router reads the layer's input: its trace says so, and the simulator
    asks for each layer's experts before the layer's compute, as the live engine does
    (Transformer.route_early), so on-demand loads overlap the attention; "/late" replays
    the requests after it. A trace of an FFN-input router is replayed as before."""
    path = tiny_gguf("smallthinker", "Q4_K_M")
    with efedge.load(path) as m:
        arrays = record_trace(m, TEXT, chunk=32)
    save_trace(tmp_path / "st.npz", arrays)
    arrays, meta = load_trace(tmp_path / "st.npz")
    assert meta["router_input"] == "layer"
    # a link that moves a layer's worth of missing experts in about a layer's compute
    setup = _setup(meta, "50%", link=meta["bytes_per_expert"][0] / 1e-4, layer_s=3e-4,
                   expert_s=1e-5)
    rows = {p: simulate(arrays, meta, setup, p, warmup=4)
            for p in ("ondemand", "ondemand/late", "expertflow", "expertflow/late")}
    for p in ("ondemand", "expertflow"):
        early, late = rows[p], rows[p + "/late"]
        assert early["early_requests"] and not late["early_requests"]
        assert late["policy"] == p + "/late"
        assert early["stall_s"] < 0.5 * late["stall_s"], (p, early["stall_s"], late["stall_s"])
        # the same routing either way: the same requests
        assert early["expert_requests"] == late["expert_requests"]
    with pytest.raises(SimulationError, match="variant 'soon'"):
        simulate(arrays, meta, setup, "ondemand/soon", warmup=4)
    # an FFN-input router's trace: "/late" changes nothing
    q_arrays, q_meta = load_trace(_qwen_trace(tiny_gguf, tmp_path))
    assert q_meta["router_input"] == "ffn"
    a = simulate(q_arrays, q_meta, _setup(q_meta, "50%"), "ondemand", warmup=4)
    b = simulate(q_arrays, q_meta, _setup(q_meta, "50%"), "ondemand/late", warmup=4)
    assert not a["early_requests"] and a["stall_s"] == b["stall_s"]


def _qwen_trace(tiny_gguf, tmp_path):
    with efedge.load(tiny_gguf("qwen3moe", "F16")) as m:
        arrays = record_trace(m, TEXT, chunk=32)
    save_trace(tmp_path / "q.npz", arrays)
    return tmp_path / "q.npz"


def test_trace_records_each_layers_router_on_its_input(tiny_gguf):
    """pregate_in[t, l] is layer l's router on its input (normalised as the router's input
    is, before the attention): the logits the live hook hands to expertflow:refine."""
    path = tiny_gguf("qwen3moe", "F16")
    with efedge.load(path) as m:
        arrays = record_trace(m, TEXT, chunk=32, max_tokens=40)
        tf = m._tf
        seen = {}
        tf.on_layer_input = lambda il, h: seen.setdefault(il, h.copy())
        m.logits(m.tokenize(TEXT)[:40])  # one pass of all 40: rows as in the trace's
        tf.on_layer_input = None
        pre = arrays["pregate_in"].astype(np.float32)
        assert pre.shape == arrays["experts"].shape[:2] + (tf.cfg.n_expert,)
        for il, h in seen.items():
            want = tf.blocks[il].ffn_gate_inp(h)  # qwen3moe: plain softmax selection
            assert np.allclose(pre[:32, il], want[:32], atol=2e-2 * np.abs(want).max())
        # and the input is not the routed state: layer 1's differ from its own routing
        assert not np.allclose(pre[:, 1], arrays["pregate"].astype(np.float32)[:, 0, 0])


def test_simulator_refines_from_the_routers_on_the_layer_input(trace):
    """expertflow:refine replays pregate_in before each layer's compute: with logits that
    name each layer's experts exactly it fetches what the layer needs a layer's compute
    ahead and drops wrong queued prefetches, so it misses less than expertflow; without
    pregate_in in the trace it is expertflow, figure for figure."""
    arrays, meta = load_trace(trace[0])
    setup = _setup(meta, "50%", link=meta["bytes_per_expert"][0] / 1e-4, layer_s=3e-4,
                   expert_s=1e-5)
    plain = simulate(dict(arrays), meta, setup, "expertflow", warmup=4)
    bare = {k: v for k, v in arrays.items() if k != "pregate_in"}
    same = simulate(bare, meta, setup, "expertflow:refine", warmup=4)
    assert same["stall_s"] == simulate(bare, meta, setup, "expertflow", warmup=4)["stall_s"]
    exact = np.full(arrays["experts"].shape[:2] + (meta["n_expert"],), -5.0, np.float32)
    t, l, k = np.indices(arrays["experts"].shape)
    exact[t, l, arrays["experts"]] = 5.0 - k  # the true top-k, in order
    told = dict(arrays, pregate_in=exact.astype(np.float16))
    refined = simulate(told, meta, setup, "expertflow:refine", warmup=4)
    assert refined["misses"] < 0.5 * plain["misses"], (refined["misses"], plain["misses"])
    assert refined["stall_s"] < plain["stall_s"]
    assert refined["expert_requests"] == plain["expert_requests"]


def test_prediction_ceiling_replaces_pregating_with_better_information(tiny_gguf, tmp_path):
    """The ceiling benchmark's variants: distance 1 from the next layer's router on its
    input, or naming the next layer's (two layers') experts exactly; replayed, exact
    pre-gating misses less than the recorded one."""
    ceiling = load_benchmark("prediction_ceiling")
    arrays, meta = load_trace(_qwen_trace(tiny_gguf, tmp_path))
    out = ceiling.variants(arrays)
    assert set(out) == {"recorded", "router on the next layer's input", "exact next layer",
                        "exact next two layers"}
    assert out["recorded"]["pregate"] is arrays["pregate"]
    ex, L = arrays["experts"].astype(np.int64), arrays["experts"].shape[1]
    better = out["router on the next layer's input"]["pregate"]
    for layer in range(L - 1):
        assert np.array_equal(better[:, layer, 0], arrays["pregate_in"][:, layer + 1])
        assert np.array_equal(better[:, layer, 1:], arrays["pregate"][:, layer, 1:],
                              equal_nan=True)
    for name, depth in (("exact next layer", 1), ("exact next two layers", 2)):
        pg = out[name]["pregate"]
        for layer in range(L):
            for d in range(1, pg.shape[2] + 1):
                row = pg[:, layer, d - 1]
                if d > depth or layer + d >= L:  # untouched
                    assert np.array_equal(row, arrays["pregate"][:, layer, d - 1],
                                          equal_nan=True)
                    continue
                top = np.sort(np.argsort(-row.astype(np.float32), axis=1,
                                         kind="stable")[:, :ex.shape[2]], axis=1)
                assert np.array_equal(top, np.sort(ex[:, layer + d], axis=1))
                assert set(np.unique(row).tolist()) == {0.0, ceiling.EXACT_LOGIT}
    setup = _setup(meta, "50%", link=meta["bytes_per_expert"][0] / 1e-4, layer_s=3e-4,
                   expert_s=1e-5)
    rec = simulate(dict(arrays), meta, setup, "expertflow", warmup=4)
    exact = simulate(out["exact next layer"], meta, setup, "expertflow", warmup=4)
    assert exact["misses"] + exact["late"] < rec["misses"] + rec["late"]
    # a trace without pre-gating is refused by name
    with pytest.raises(SystemExit, match="pre-gating"):
        ceiling.variants({k: v for k, v in arrays.items() if k != "pregate"})


def test_trace_cli_text_that_is_not_utf8_and_a_sketch_past_the_state(tiny_gguf, tmp_path,
                                                                      capsys):
    """Damaged text is traced with a warning naming the first bad byte (it was silent);
    UTF-16 is refused as `run -f` refuses it; a sketch wider than the hidden state is an
    error naming both (a huge one was a 191 GiB allocation's traceback)."""
    path = str(tiny_gguf("qwen3moe"))
    out = str(tmp_path / "t.npz")
    latin1, utf16, ok = tmp_path / "l.txt", tmp_path / "u.txt", tmp_path / "ok.txt"
    latin1.write_bytes(b"caf\xe9 na\xefve hello")
    utf16.write_bytes("hello there".encode("utf-16"))
    ok.write_text("hello there")
    assert cli_main(["trace", path, "--text", str(latin1), "-o", out]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "byte 0xe9 at offset 3" in err and "U+FFFD" in err
    assert cli_main(["trace", path, "--text", str(utf16), "-o", out]) != 0
    assert "UTF-16" in capsys.readouterr().err
    assert cli_main(["trace", path, "--text", str(ok), "-o", out, "--sketch",
                     "99999999"]) != 0
    err = capsys.readouterr().err
    assert "sketch_dim 99999999 is more than the hidden state's" in err
    assert "Traceback" not in err
