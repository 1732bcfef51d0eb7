"""Does the simulator agree with the live runtime? Same model, same tokens, same policy,
same cache budget and emulated link; compute times measured on this machine.

    python benchmarks/simulate_vs_live.py [MODEL] --cache 25% --link 1GB/s --policy ondemand

1. Measure compute per layer and per expert with every expert resident.
2. Record the routing trace of the text (efedge trace).
3. Live: decode the text token by token (teacher forcing) with the cache and the emulated
   link; count stall and hits after a warm-up.
4. Simulate the trace with the measured times and the same link and budget.
Prints both and the relative differences (target: within 15% on stall per token and on
hit rate).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import numpy as np

import efedge
import efedge.ffn as ffn_mod  # stream_experts_token calls _pool_experts by this name
from efedge import corpus
from efedge.demo import demo_model_path
from efedge.experts.cache import READY
from efedge.experts.link import parse_link
from efedge.policy_compare import comparison_threads
from efedge.simulate import SimSetup, simulate
from efedge.trace import record_trace


def heldout_text(n_chars: int = 6000) -> str:
    """Held-out text of the demo model's corpus (the split it never saw)."""
    return corpus.heldout_text()[:n_chars]


@contextlib.contextmanager
def timed_expert_calls():
    """Time the streaming path's expert kernels (efedge.ffn._pool_experts: one batch of
    ready experts on one token); yields [seconds, experts], which the caller may zero."""
    spent = [0.0, 0]
    orig = ffn_mod._pool_experts

    def timed(h, batch, *a, **kw):
        t0 = time.perf_counter()
        out = orig(h, batch, *a, **kw)
        spent[0] += time.perf_counter() - t0
        spent[1] += len(batch)
        return out

    ffn_mod._pool_experts = timed
    try:
        yield spent
    finally:
        ffn_mod._pool_experts = orig


def measure_compute(path, ids, threads=None) -> tuple[float, float]:
    """(seconds per layer without experts, seconds per expert per token), decode, on the
    path the live runs take: a cache holding every expert, all loaded before the timed
    window; batches of ready experts are timed (ffn._pool_experts), layers whose experts
    were all resident (one fused call: every layer, once all are in) count as layer time
    (0 per expert then: compare_once splits the layer by the live run's time per
    expert)."""
    with efedge.load(path, threads=threads, cache="100%", policy="ondemand") as m:
        # every expert in before the timed window: a first touch there is a load from
        # the file, and 8 warm-up tokens touch only about a third of the demo model's
        # 320, which read 0.20-0.22 ms per layer against 0.08 with all of them in
        # (2026-12-01) — a compute the live run never had
        src = m._experts
        for layer in range(m.config.n_layer):
            src.prefetch(layer, range(src.store.n_expert))
        deadline = time.perf_counter() + 60.0
        while (src.cache.slot_state[src.cache.where[src.cache.where >= 0]] != READY).any() \
                or (src.cache.where[src.cache.layer_class >= 0] < 0).any():
            src.reap()  # (marks the copies the workers finished READY)
            src.yield_to_workers(landing=True)
            if time.perf_counter() > deadline:
                raise SystemExit("the experts did not all load within 60 s")
            time.sleep(0.001)
        s = m._session
        s.reset()
        s.prefill(ids[:4])
        for tok in ids[4:12]:  # warm-up
            s.decode(tok)
        misses0 = m.stats()["misses"]
        with timed_expert_calls() as spent:
            t0 = time.perf_counter()
            n = 0
            for tok in ids[12:60]:
                s.decode(tok)
                n += 1
            total = time.perf_counter() - t0
        n_layer = m.config.n_layer
        if m.stats()["misses"] != misses0:
            raise SystemExit("an expert was loaded in the timed window of the resident run")
    t_expert = spent[0] / max(spent[1], 1)
    t_layer = (total - spent[0]) / (n * n_layer)
    return t_layer, t_expert


def measure_wake(n: int = 300) -> float:
    """Median time for a thread blocked on a condition variable to run again after
    another thread notifies it: what a compute thread pays on top of the transfer each
    time it has to wait for an expert."""
    import statistics
    import threading

    cond = threading.Condition()
    box: dict = {"t": None}
    lat: list[float] = []

    def worker():
        for _ in range(n):
            time.sleep(0.0003)
            with cond:
                while box["t"] is not None:  # the last one not taken yet: never overwrite
                    cond.wait()
                box["t"] = time.perf_counter()
                cond.notify_all()

    th = threading.Thread(target=worker, daemon=True)
    th.start()
    for _ in range(n):
        with cond:
            while box["t"] is None:
                cond.wait()
            lat.append(time.perf_counter() - box["t"])
            box["t"] = None
            cond.notify_all()
    th.join()
    return statistics.median(lat)


def live_run(path, ids, cache, link, policy, warmup, threads=None) -> dict:
    """Decode ids teacher-forced; also times every copy the transfer engine makes (read
    from the file + the emulated link): on a machine whose disk is slower than the
    emulated link, the link the live run really had is the slower one."""
    from efedge.experts import transfer

    spans: list[tuple[float, float]] = []
    orig_copy = transfer.TransferEngine._copy

    def timed_copy(self, job):
        t0 = time.perf_counter()
        try:
            return orig_copy(self, job)
        finally:
            spans.append((t0, time.perf_counter()))  # list.append: atomic across threads

    transfer.TransferEngine._copy = timed_copy
    try:
        out = _live_run(path, ids, cache, link, policy, warmup, threads)
    finally:
        transfer.TransferEngine._copy = orig_copy
    # the time at least one copy was under way, per copy (copies overlap on two workers)
    busy, end = 0.0, -np.inf
    for a, b in sorted(spans):
        if b > end:
            busy += b - max(a, end)
            end = b
    # None: no Python worker copied (native transfer workers, and the compute thread's
    # own demand copies, hold each copy to the emulated link's own time: the link
    # achieved is the link)
    out["copy_s"] = busy / len(spans) if spans else None
    return out


def _live_run(path, ids, cache, link, policy, warmup, threads) -> dict:
    with efedge.load(path, cache=cache, link=link, policy=policy, threads=threads) as m, \
            timed_expert_calls() as spent:
        s = m._session
        eng = m._experts.engine
        s.reset()
        s.prefill(ids[:1])
        # the prefetches the compute thread copies itself through an emulated link
        pre = getattr(m._experts, "inline_prefetches", None)

        # a demand load's whole cost to the compute thread: its copy and the bookkeeping
        # around it in _issue (slot, eviction, booking: 25-35 µs a copy where the copy
        # alone is ~20), less the prefetches _issue copies as the link comes free
        issue = [0.0]
        src, orig_issue = m._experts, m._experts._issue

        def timed_issue(*a, **kw):
            t0, p0 = time.perf_counter(), 0.0 if pre is None else pre.copy_s
            try:
                return orig_issue(*a, **kw)
            finally:
                issue[0] += time.perf_counter() - t0 - (0.0 if pre is None
                                                         else pre.copy_s - p0)

        src._issue = timed_issue

        def copies():
            return (eng.inline_copies, eng.inline_copy_s, 0 if pre is None else pre.copied,
                    0.0 if pre is None else pre.copy_s, issue[0])

        inline0 = (0, 0.0, 0, 0.0, 0.0)
        for i, tok in enumerate(ids[1:]):
            if i + 1 == warmup:
                m.reset_stats()
                spent[:] = [0.0, 0]
                inline0 = copies()
            s.decode(tok)
        st = m.stats()
        # copies the compute thread made itself (an emulated link), demand loads and
        # prefetches (InlinePrefetches copies through copy_inline too): their time
        n_inline, inline_s, n_pre, pre_s, issue_s = (
            a - b for a, b in zip(copies(), inline0, strict=True))
    n = len(ids) - warmup
    return {"stall_ms_per_token": 1e3 * st["stall_s"] / n,
            "hit_rate": st["hits"] / max(st["expert_requests"], 1),
            "tokens_per_s": n / st["wall_s"], "stats": st,
            "expert_s": spent[0] / max(spent[1], 1), "expert_calls": spent[1],
            # (no demand load copied inline: 0, a worker's copy costs this thread nothing)
            "demand_copy_s": issue_s / (n_inline - n_pre) if n_inline > n_pre else 0.0,
            "prefetch_copy_s": pre_s / max(n_pre, 1),
            # the compute thread's time in the copies the simulator charges per copy
            "inline_copy_s": (issue_s if n_inline > n_pre else 0.0) + pre_s,
            "inline_copies": n_inline}


COLUMNS = ("live", "sim", "sim_achieved", "sim_matched")
KEYS = ("stall_ms_per_token", "hit_rate", "tokens_per_s")


def compare_once(path, ids, arrays, meta, args) -> dict:
    """One live run and its three simulations (measured compute; + achieved link and
    wake-up; + the live run's own compute)."""
    t_layer, t_expert = measure_compute(path, ids, args.threads)
    link = parse_link(args.link)
    live = live_run(path, ids, args.cache, args.link, args.policy, args.warmup, args.threads)
    if not t_expert and live["expert_calls"]:
        # every layer of the resident run took the fused all-resident call, its experts
        # inside the layer time: split them out at the live run's time per expert
        t_expert = live["expert_s"]
        t_layer = max(t_layer - meta["top_k"] * t_expert, 0.0)
    # the policy runs on the cores that compute: its own time counts as compute (charged
    # as it runs in the simulator; sim_matched has it in the live run's compute instead)
    # the live engine copies demand loads on the compute thread: so does the simulator,
    # for as long as they took live (their time is in the live run's compute)
    copy_s = live["demand_copy_s"]
    pre_s = live["prefetch_copy_s"]  # (and prefetches, as the link comes free)
    setup = SimSetup(meta["bytes_per_expert"], t_layer, t_expert, link.bytes_per_s,
                     link.latency_s, args.cache, 1.0, "this machine (measured)",
                     policy_time=1.0, demand_copy_s=copy_s, prefetch_copy_s=pre_s)
    sim = simulate(arrays, meta, setup, args.policy, warmup=args.warmup)
    # the same, on the link the live run really had: one copy took copy_s on average
    per = float(np.mean(meta["bytes_per_expert"]))
    achieved = link.bytes_per_s if live["copy_s"] is None else \
        min(link.bytes_per_s, per / max(live["copy_s"], 1e-9))
    # a blocked compute thread's wake-up; none where the compute thread copied its demand
    # loads itself: it knows their landing and spins the last stretch to it
    wake = measure_wake() if not live["inline_copies"] else 0.0
    setup2 = SimSetup(meta["bytes_per_expert"], t_layer, t_expert, achieved, 0.0, args.cache,
                      1.0, "this machine (measured, achieved link, wake-up)", wake,
                      policy_time=1.0, demand_copy_s=copy_s, prefetch_copy_s=pre_s)
    sim2 = simulate(arrays, meta, setup2, args.policy, warmup=args.warmup)
    # the same once more with the compute the live run itself had: on a shared machine the
    # separate measuring run can be 30% faster or slower than the live one, and the policy's
    # own bookkeeping (on the compute thread, so transfers hide behind it too) is in it
    n_dec = len(ids) - args.warmup
    k = meta["top_k"]
    # experts computed in batches (streaming path) were timed in the live run; those of
    # fused all-resident layers are in the layer figure, as in measure_compute
    t_expert_live = live["expert_s"] if live["expert_calls"] else t_expert
    # (less the copies the compute thread made, charged by the simulator per copy)
    per_layer = ((live["stats"]["compute_s"] - live["inline_copy_s"])
                 / max(n_dec * meta["n_layer"], 1))
    t_layer_live = max(per_layer - k * t_expert_live, 0.0)
    setup3 = SimSetup(meta["bytes_per_expert"], t_layer_live, t_expert_live, achieved, 0.0,
                      args.cache, 1.0, "this machine (the live run's compute and link)", wake,
                      demand_copy_s=copy_s, prefetch_copy_s=pre_s)
    sim3 = simulate(arrays, meta, setup3, args.policy, warmup=args.warmup)
    out = {"layer_ms": 1e3 * t_layer, "expert_ms": 1e3 * t_expert,
           "layer_ms_live": 1e3 * t_layer_live, "expert_ms_live": 1e3 * t_expert_live,
           "achieved_link_mb_s": achieved / 1e6,
           "copy_ms": None if live["copy_s"] is None else 1e3 * live["copy_s"],
           "wake_us": 1e6 * wake, "demand_copy_us": 1e6 * copy_s,
           "prefetch_copy_us": 1e6 * pre_s}
    for name, r in zip(COLUMNS, (live, sim, sim2, sim3), strict=True):
        out[name] = {key: r[key] for key in KEYS}
    return out


def _rel_diffs(out: dict) -> None:
    for name, suffix in (("sim", ""), ("sim_achieved", "_achieved"),
                         ("sim_matched", "_matched")):
        for key in ("stall_ms_per_token", "hit_rate"):
            a, b = out["live"][key], out[name][key]
            out[f"rel_diff_{key}{suffix}"] = abs(a - b) / max(abs(a), 1e-12)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--cache", default="25%")
    ap.add_argument("--link", default="1GB/s")
    ap.add_argument("--policy", default="ondemand")
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1,
                    help="live runs (each with its simulations); the table gives medians")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    # the resident compute measured at the live run's count: -t, else the one its policy
    # streams at by default (expertflow: one core fewer than the machine's)
    args.threads = comparison_threads([args.policy], args.threads)
    path = args.model or demo_model_path()
    with efedge.load(path) as m:
        ids = m.tokenize(heldout_text())[: args.tokens]
        arrays = record_trace(m, m.detokenize(ids), chunk=1, max_tokens=len(ids))
        meta = {"n_layer": m.config.n_layer, "n_expert": m.config.n_expert,
                "top_k": m.config.n_expert_used,
                "bytes_per_expert": [m._tf.store.expert_bytes(i)
                                     for i in range(m.config.n_layer)]}
        ids = arrays["tokens"].tolist()
    runs = [compare_once(path, ids, arrays, meta, args) for _ in range(max(1, args.repeats))]
    # medians over the runs, column by column (each run's own simulations beside it)
    out = {key: None if runs[0][key] is None else float(np.median([r[key] for r in runs]))
           for key in runs[0] if not isinstance(runs[0][key], dict)}
    for name in COLUMNS:
        out[name] = {key: float(np.median([r[name][key] for r in runs])) for key in KEYS}
    out.update({"model": str(path), "cache": args.cache, "link": args.link,
                "policy": args.policy, "tokens": len(ids), "repeats": len(runs)})
    _rel_diffs(out)
    for r in runs:
        _rel_diffs(r)
    out["runs"] = runs
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    print(f"model {path}, cache {args.cache}, link {args.link} (emulated), policy "
          f"{args.policy}, {len(ids)} tokens teacher-forced, warm-up {args.warmup}, "
          f"{len(runs)} run(s), medians")
    print(f"measured compute: {out['layer_ms']:.3f} ms per layer + {out['expert_ms']:.3f} ms "
          f"per expert; in the live run {out['layer_ms_live']:.3f} + "
          f"{out['expert_ms_live']:.3f} (sim_matched)")
    print(f"the compute thread's own copies (an emulated link), charged per copy in every "
          f"simulation: {out['demand_copy_us']:.1f} µs per demand load, "
          f"{out['prefetch_copy_us']:.1f} µs per prefetch (0: a worker's or DMA copy)")
    if out["copy_ms"] is None:
        print(f"live copies: none timed on a Python worker (native workers, or the compute "
              f"thread's own), each held to the emulated link's time "
              f"({out['achieved_link_mb_s']:.0f} MB/s); a blocked thread wakes "
              f"{out['wake_us']:.0f} µs after its load (sim_achieved models it)")
    else:
        print(f"live copies: the link was busy {out['copy_ms']:.3f} ms per expert (file "
              f"read + emulated link) = {out['achieved_link_mb_s']:.0f} MB/s achieved; a "
              f"blocked thread wakes {out['wake_us']:.0f} µs after its load (sim_achieved "
              f"models both)")
    print("|  | stall ms/token | hit rate | tok/s |\n|---|---|---|---|")
    for name in COLUMNS:
        r = out[name]
        print(f"| {name} | {r['stall_ms_per_token']:.3f} | {r['hit_rate']:.1%} | "
              f"{r['tokens_per_s']:.1f} |")
    for name, suffix, what in (("sim", "", "at the emulated link"),
                               ("sim_achieved", "_achieved",
                                "at the achieved link, with wake-ups"),
                               ("sim_matched", "_matched", "with the live run's own compute")):
        st = [r[f"rel_diff_stall_ms_per_token{suffix}"] for r in runs]
        hr = [r[f"rel_diff_hit_rate{suffix}"] for r in runs]
        print(f"{name} vs live ({what}): medians differ by stall "
              f"{out[f'rel_diff_stall_ms_per_token{suffix}']:.1%}, hit rate "
              f"{out[f'rel_diff_hit_rate{suffix}']:.1%}; single runs {min(st):.0%}–"
              f"{max(st):.0%} and {min(hr):.0%}–{max(hr):.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
