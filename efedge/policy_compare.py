"""Cache policies side by side, live: the same model, text, cache budget and emulated
link for each policy, one table (`efedge bench --policies`, benchmarks/policies.py).

The text is held-out prose (efedge/corpus.py: documentation that ships with Python,
the split the demo model never saw): the first tokens are prefilled as one batch, the
rest are fed one at a time exactly as generation would (teacher forcing, so every policy
sees the same real routing rather than whatever a greedy loop degenerates into). Figures
are for the decode part; prefill stall is a separate field.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

import efedge
from efedge.errors import EfedgeError

COLUMNS = ("policy", "tokens_per_s", "stall_ms_per_token", "stall_vs_ondemand", "hit_rate",
           "prefetch_precision", "mb_per_token", "horizon_mean")


def heldout_ids(model, n: int) -> list[int]:
    """At least n token ids of held-out text (the corpus split the demo model never saw)."""
    from efedge.corpus import heldout_sample

    chars = 4 * n + 400
    while True:
        try:
            text = heldout_sample(max_chars=chars)
        except RuntimeError:
            text = None
        if text is None:
            raise EfedgeError(f"the held-out text has no passage of {n} tokens (a shorter "
                              f"prompt and generation will do)")
        ids = model.tokenize(text)
        if len(ids) >= n:
            return ids[:n]
        chars *= 2


def decode_run(m, prompt_ids, n_tokens, decoding=None) -> tuple[dict, float, float]:
    """Prefill prompt_ids[:-n] … feed the rest one token at a time; returns the decode
    counters, the prefill stall and the policy's own time during decode. `decoding`: a
    context manager entered around the decode alone (a benchmark's timers)."""
    sess = m._session
    sess.reset()
    m.reset_stats()
    split = len(prompt_ids) - n_tokens
    sess.prefill(prompt_ids[:split])
    prefill_stall = m.stats()["stall_s"]
    m.reset_stats()
    # the CPU path's expert source, or the GPU path's (device="cuda")
    pol = getattr(m._experts, "policy", None) or getattr(
        getattr(m._tf, "source", None), "policy", None)
    # the prefetches' own copies where the policy's calls make them (an emulated link:
    # InlinePrefetches) are bytes moved, not the policy's work: on-demand's copies are
    # not counted either
    copy0 = getattr(m._experts, "policy_copy_s", 0.0)
    ovh0 = getattr(pol, "overhead_s", 0.0)
    with decoding or contextlib.nullcontext():
        for tok in prompt_ids[split:]:
            sess.decode(tok)
    ovh = getattr(pol, "overhead_s", 0.0) - ovh0
    ovh -= getattr(m._experts, "policy_copy_s", 0.0) - copy0
    return m.stats(), prefill_stall, ovh


class _CopyTime(contextlib.AbstractContextManager):
    """Around a decode: the time the compute thread spent in its own copies (the CPU
    engine's copy_inline through an emulated link, demand loads and prefetches alike; 0
    where workers or a copy engine make them)."""

    def __init__(self, engine):
        self.engine, self.spent = engine, 0.0

    def _now(self) -> float:
        return float(getattr(self.engine, "inline_copy_s", 0.0))

    def __enter__(self):
        self._t0 = self._now()
        return self

    def __exit__(self, *exc):
        self.spent = self._now() - self._t0
        return None


def host_hit_rate(stats: dict) -> float | None:
    """Of the copies into VRAM, the share the pinned host tier held (None: no copy)."""
    copies = stats["host_hits"] + stats["host_misses"]
    return stats["host_hits"] / copies if copies else None


def run_routing(path, prompt_ids, n_tokens, cache, threads=None):
    """What a compare_policies run asks the expert cache for: the experts each token
    chose at each MoE layer, [T, L, K] — the same for every policy (exact routing,
    teacher-forced tokens) — from an untimed run of its own, and the cache's layout at
    `cache` (its layers' size classes, slots per class, bytes per expert). None where
    `cache` holds every expert (no expert cache to bound)."""
    from efedge.trace import TraceRecorder, _chain

    with efedge.load(path, cache=cache, policy="ondemand", threads=threads) as m:
        tf, src = m._tf, m._experts
        if getattr(src, "cache", None) is None:
            return None
        rec = TraceRecorder(tf, horizon=0)  # (the routed experts alone: no pre-gating)
        old = tf.on_route
        tf.on_route = rec if old is None else _chain(old, rec)
        try:
            decode_run(m, prompt_ids, n_tokens)
        finally:
            tf.on_route = old
        moe, c = rec.moe_layers, src.cache
        layout = {"layer_class": c.layer_class[moe].copy(), "class_slots": c.class_slots.copy(),
                  "n_slots": int(c.n_slots), "n_expert": int(tf.cfg.n_expert),
                  "bytes_per_expert": [src.store.expert_bytes(il) for il in moe]}
    return rec.arrays()["experts"].astype(np.int64), layout


def min_bound(experts, layout: dict, link, n_prompt: int, compute_s: float) -> dict | None:
    """What no policy can beat on this run (efedge/experts/bound.py): the hit rate of
    Belady's MIN over the decoded tokens of `experts` [T, L, K] (the first n_prompt
    tokens warm the cache) and the stall per decoded token its loads force through
    `link` with `compute_s` of compute to hide behind. None where the cache cannot hold
    one layer's experts of a token at once (MIN is not defined there)."""
    from efedge.experts.bound import min_loads, stall_bound, unique_requests
    from efedge.experts.link import parse_link

    lk = parse_link(link)
    try:
        loads = min_loads(experts, layout["layer_class"], layout["class_slots"],
                          layout["n_expert"], warmup=n_prompt)
    except ValueError:
        return None
    n = experts.shape[0] - n_prompt
    unique = unique_requests(experts, n_prompt)
    stall = stall_bound(loads, layout["bytes_per_expert"], lk.bytes_per_s, lk.latency_s,
                        layout["n_slots"], compute_s)
    return {"min_hit_rate": 1.0 - float(loads.sum()) / max(unique, 1),
            "min_stall_ms_per_token": 1e3 * stall / max(n, 1)}


def comparison_threads(policies, threads=None, device: str = "cpu") -> int | None:
    """One compute-thread count for every row of a comparison — the same model, budget,
    link and compute for each policy: `threads` if given; else, on the CPU, the count a
    policy among them that runs work beside the compute (expertflow's predictor helper)
    gets by default while experts stream — one core fewer (efedge/api.py) — so that the
    others run at that count too; else None (numba's, every core)."""
    if threads is not None or device != "cpu":
        return threads
    from efedge.experts import predictor_thread
    from efedge.experts.scheduler import make_policy

    if any(make_policy(p.partition("/")[0]).wants_spare_core() for p in policies):
        return predictor_thread.threads_beside_helper()
    return None


def compare_policies(path, policies, cache, link, prompt_ids, n_tokens, *, threads=None,
                     warmup: bool = True, device: str = "cpu", vram=None, host_cache=None,
                     disk_link=None, reverse: bool = False, bound: bool = True) -> list[dict]:
    """One live run per policy on the same model, budget, emulated link and tokens: the
    first len(prompt_ids) - n_tokens ids are the prompt (one batch), the last n_tokens are
    decoded one by one. Returns one dict per policy with the table's columns (see
    COLUMNS) plus the raw counters under "stats"; with a host tier (device="cuda",
    host_cache=) also "host_hit_rate": of the copies into VRAM, the share found there.
    `reverse`: run the policies last to first (rows still in `policies` order): repeats
    that alternate it give each policy early and late minutes of a machine whose speed
    drifts (reading the drive, by tens of per cent over one table).
    `bound` (the CPU path, an emulated link, on-demand among the policies): every row
    also gets Belady's MIN on the run's routing — "min_hit_rate", and "min_stall_ms_per_token"
    / "min_vs_ondemand", the stall its loads force with on-demand's compute to hide behind
    (min_bound; the routing from an untimed run of its own, run_routing)."""
    prompt_ids = [int(i) for i in prompt_ids]
    if not 0 < n_tokens < len(prompt_ids):
        raise ValueError("need 0 < n_tokens < len(prompt_ids) (at least one prompt token)")
    threads = comparison_threads(policies, threads, device)
    rows = []
    for policy in (list(policies)[::-1] if reverse else policies):
        # "POLICY/late": a router before attention (smallthinker) asks for its experts
        # only when its layer runs, not before the attention (Transformer.early_requests)
        name, _, late = policy.partition("/")
        with efedge.load(path, cache=cache, policy=name, link=link, threads=threads,
                         device=device, vram=vram, host_cache=host_cache,
                         disk_link=disk_link) as m:
            if late == "late":
                m._tf.early_requests = False
            if warmup:  # compile the kernels, so that no run pays for it
                decode_run(m, prompt_ids[:8], 4)
            t0 = time.perf_counter()
            copies = _CopyTime(getattr(m._experts, "engine", None))
            s, prefill_stall, ovh = decode_run(m, prompt_ids, n_tokens, decoding=copies)
            wall = time.perf_counter() - t0
            # expertflow's predictor on a helper thread (a core spare: predictor_thread.py),
            # for all the run or until waiting for it cost too much (fallbacks)
            pred = getattr(getattr(m._experts, "policy", None), "predictor", None)
            fallbacks = int(getattr(pred, "thread_fallbacks", 0))
            threaded = bool(getattr(pred, "threaded", False)) or fallbacks > 0
        n = max(s["tokens_generated"], 1)
        issued = s["prefetch_issued"]
        rows.append({
            "policy": policy, "cache": cache, "link": "none" if link is None else str(link),
            "tokens_per_s": n / max(s["wall_s"], 1e-9),
            "stall_ms_per_token": 1e3 * s["stall_s"] / n,
            "stall_vs_ondemand": None,
            "hit_rate": s["hits"] / max(s["expert_requests"], 1),
            "prefetch_precision": (s["prefetch_used"] / issued) if issued else None,
            "mb_per_token": s["bytes_loaded"] / n / 1e6,
            # the compute thread's own copies (an emulated link on the CPU path): compute
            # time the link's time overlaps, which a DMA copy would not take
            "copy_ms_per_token": 1e3 * copies.spent / n,
            "horizon_mean": s["horizon_mean"],
            "policy_overhead_pct": 100.0 * ovh / max(s["wall_s"], 1e-9),
            "prefill_stall_ms": 1e3 * prefill_stall, "run_s": wall, "stats": s,
            "predictor_thread": threaded, "predictor_thread_fallbacks": fallbacks,
            "threads": m.threads,
        })
        if host_cache is not None:
            rows[-1]["host_hit_rate"] = host_hit_rate(s)
    if reverse:
        rows.reverse()
    base = [r["stall_ms_per_token"] for r in rows if r["policy"] in ("ondemand", "lru")]
    if base and base[0] > 0:
        for r in rows:
            r["stall_vs_ondemand"] = r["stall_ms_per_token"] / base[0]
    od = [r for r in rows if r["policy"] in ("ondemand", "lru")]
    if bound and od and device == "cpu" and link is not None:
        routed = run_routing(path, prompt_ids, n_tokens, cache, threads)
        s = od[0]["stats"]
        b = None if routed is None else min_bound(
            *routed, link, len(prompt_ids) - n_tokens, s["wall_s"] - s["stall_s"])
        if b is not None:
            rel = (b["min_stall_ms_per_token"] / od[0]["stall_ms_per_token"]
                   if od[0]["stall_ms_per_token"] > 0 else None)
            for r in rows:
                r.update(b, min_vs_ondemand=rel)
    return rows


def format_bounds(rows: list[dict]) -> str:
    """One line per setting with a MIN bound (compare_policies' `bound`): what no policy
    could do better than on that routing and link ("" where none was computed)."""
    lines = []
    for r in rows:
        if r["policy"] in ("ondemand", "lru") and r.get("min_stall_ms_per_token") is not None:
            rel = r.get("min_vs_ondemand")
            lines.append(
                f"MIN at {r['cache']}, {r['link']}: Belady's MIN, knowing the future, hits "
                f"{r['min_hit_rate']:.1%} and stalls at least {r['min_stall_ms_per_token']:.3f} "
                f"ms/token" + ("" if rel is None else f" ({100 * rel:.1f}% of on-demand's)")
                + " with on-demand's compute to hide its loads behind: no policy can do better")
    return "\n".join(lines)


def auto_links(path, prompt_ids, n_tokens, threads=None, runs: int = 3
               ) -> tuple[list[str], dict]:
    """The issue's two links from resident runs here: loading one expert takes about one
    layer's decode compute, and 4× slower. The compute is the fastest of `runs` resident
    decodes: a shared machine's noise only slows a run, and one slowed run chose a link
    a third too slow (1.18–1.21 against 1.76–1.80 GB/s on the demo model, 2026-12-01)."""
    with efedge.load(path, threads=threads) as m:
        decode_run(m, prompt_ids[:8], 4)
        token_s = min(s["wall_s"] / max(s["tokens_generated"], 1)
                      for s, _, _ in (decode_run(m, prompt_ids, n_tokens)
                                      for _ in range(max(1, int(runs)))))
        store = m._tf.store
        n_layer = m.config.n_layer
        per_expert = float(np.mean([store.expert_bytes(i) for i in range(n_layer)]))
    layer_s = token_s / n_layer
    rate = per_expert / layer_s
    info = {"layer_ms": 1e3 * layer_s, "expert_kib": per_expert / 1024,
            "decode_ms_per_token": 1e3 * layer_s * n_layer}
    return [f"{rate / 1e6:.1f}MB/s", f"{rate / 4e6:.1f}MB/s"], info


def median_rows(runs: list[list[dict]]) -> list[dict]:
    """Per policy, the run with the median stall (repeats smooth out a shared machine)."""
    out = []
    for i in range(len(runs[0])):
        group = sorted((r[i] for r in runs), key=lambda r: r["stall_ms_per_token"])
        out.append(group[len(group) // 2])
    base = [r["stall_ms_per_token"] for r in out if r["policy"] in ("ondemand", "lru")]
    for r in out:
        r["stall_vs_ondemand"] = (r["stall_ms_per_token"] / base[0]) if base and base[0] else None
    return out


def format_table(rows: list[dict]) -> str:
    host = any("host_hit_rate" in r for r in rows)  # a host tier was set (device="cuda")
    head = ("| cache | link | policy | tok/s | stall ms/token | stall % of ondemand | hit rate "
            "| prefetch precision | MB/token | copies ms/token | mean horizon | policy cost % |"
            + (" host hit rate |" if host else ""))
    lines = [head, "|" + "---|" * (13 if host else 12)]
    for r in rows:
        rel = "-" if r["stall_vs_ondemand"] is None else f"{100 * r['stall_vs_ondemand']:.1f}%"
        prec = "-" if r["prefetch_precision"] is None else f"{r['prefetch_precision']:.1%}"
        line = (f"| {r['cache']} | {r['link']} | {r['policy']} | {r['tokens_per_s']:.1f} "
                f"| {r['stall_ms_per_token']:.3f} | {rel} | {r['hit_rate']:.1%} | {prec} "
                f"| {r['mb_per_token']:.2f} | {r.get('copy_ms_per_token', 0.0):.3f} "
                f"| {r['horizon_mean']:.2f} "
                f"| {r['policy_overhead_pct']:.2f} |")
        if host:
            h = r.get("host_hit_rate")
            line += f" {h:.1%} |" if h is not None else " - |"
        lines.append(line)
    return "\n".join(lines)
