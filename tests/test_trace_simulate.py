"""Routing traces and the trace-driven simulator (same cache / policy code, virtual clock)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import efedge
from efedge.cli import main as cli_main
from efedge.profiles import HARDWARE, MODELS
from efedge.simulate import SimSetup, simulate
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
