"""Where a cache policy's time goes during decode: each hook of the policy, its
predictor and the expert source, wrapped in a timer in place (the caches as the layer
kernels leave them), per decoded token. Not a test — run it:

    python benchmarks/policy_hooks.py -t 2 --policy expertflow ondemand
    python benchmarks/policy_hooks.py -t 1 --cache 25% --link 265MB/s

Times are inclusive: a call counts in every wrapped caller it runs inside too
(`ExpertFlow._catch_up` holds `_flush_plan`, which holds `prefetch_plan`, which holds
`submit_many`, which holds `publish`; through an emulated link `prefetch_plan` holds
`InlinePrefetches.add`, which holds `pump`, `_copy` and the engine's `copy_inline`), and
each timer adds its own ~1 µs. The model warms up on the text that follows the measured
one, so the token memory has not learned the measured text (as `benchmarks/policies.py
--cost`). docs/scheduler.md §6 (twenty-ninth session) reads these tables.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import time

import efedge
from efedge.policy_compare import comparison_threads, decode_run, heldout_ids

# (the object's role, its methods); a method an object lacks is skipped, so one list
# serves every policy, the Python and the native transfer engines
HOOKS = {
    "policy": ("on_route", "on_pass", "on_layer_input", "_start_pass", "_catch_up",
               "_predict_and_plan",
               "_plan_prefetches", "_flush_plan"),
    "predictor": ("step", "post_step", "wait", "wait_select", "predict_pass_start",
                  "_gate_first",
                  "begin_pass"),
    "source": ("prefetch_plan", "reap", "_classify", "_issue", "_start_demand_loads",
               "yield_to_workers", "_ready_batch", "cancel_prefetch_keys"),
    "engine": ("submit", "submit_many", "reap", "promote", "copy_inline"),
    # an emulated link's prefetches, queued and copied on the compute thread
    "inline": ("add", "pump", "sweep", "take", "asked", "demand", "cancel", "_copy"),
    "workers": ("publish", "queue_many", "queue"),
}


def _wrap(obj, name: str, key: str, spent: dict, calls: collections.Counter,
          on: list) -> None:
    """obj.name timed into spent[key] / calls[key] while on[0] (decode, not prefill)."""
    fn = getattr(obj, name)

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            if on[0]:
                spent[key] += time.perf_counter() - t
                calls[key] += 1

    setattr(obj, name, timed)  # (an instance attribute: the class is left as it is)


def profile(path, policy: str, *, cache="50%", link="1060MB/s", threads=None,
            n_tokens=128, rounds=3) -> dict:
    """Prefill 32 held-out tokens, then decode the next n_tokens teacher-forced, `rounds`
    times, every hook timed during decode; per decoded token: decode and stall ms, and
    per hook µs, calls and µs a call."""
    spent: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    on = [False]  # timing: during decode only (a prefill's calls are not per token)
    with efedge.load(path, cache=cache, policy=policy, link=link, threads=threads) as m:
        threads = m.threads  # (what it computed with: the default resolved)
        ids = heldout_ids(m, 2 * (n_tokens + 32))
        text, warm = ids[:n_tokens + 32], ids[n_tokens + 32:]
        decode_run(m, warm, n_tokens)  # compile, fill the cache, start any helper
        src = m._experts
        if not hasattr(src, "policy"):
            raise SystemExit("the cache holds every expert: give a --cache below 100%")
        eng = src.engine
        objs = {"policy": src.policy, "predictor": getattr(src.policy, "predictor", None),
                "source": src, "engine": eng, "workers": getattr(eng, "pool", None),
                "inline": getattr(src, "inline_prefetches", None)}
        for role, names in HOOKS.items():
            obj = objs[role]
            for name in names if obj is not None else ():
                if callable(getattr(obj, name, None)):
                    _wrap(obj, name, f"{type(obj).__name__}.{name}", spent, calls, on)
        @contextlib.contextmanager
        def timing():
            on[0] = True
            try:
                yield
            finally:
                on[0] = False

        wall = stall = 0.0
        n = 0
        for _ in range(rounds):
            s, _, _ = decode_run(m, text, n_tokens, decoding=timing())
            wall += s["wall_s"]
            stall += s["stall_s"]
            n += s["tokens_generated"]
    n = max(n, 1)
    hooks = [{"hook": k, "us_per_token": 1e6 * v / n, "calls_per_token": calls[k] / n,
              "us_per_call": 1e6 * v / max(calls[k], 1)}
             for k, v in sorted(spent.items(), key=lambda kv: -kv[1])]
    return {"policy": policy, "cache": cache, "link": link, "threads": threads,
            "decode_ms_per_token": 1e3 * wall / n, "stall_ms_per_token": 1e3 * stall / n,
            "hooks": hooks}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="GGUF (default: the demo model)")
    ap.add_argument("--policy", nargs="+", default=["expertflow"])
    ap.add_argument("--cache", default="50%")
    ap.add_argument("--link", default="1060MB/s", help="emulated link ('none': the file)")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-n", "--n-tokens", type=int, default=128, help="decoded tokens a round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    link = None if args.link == "none" else args.link
    # every policy at one count: -t, else expertflow's streaming default where it is
    # among them (one core fewer than the machine's), as bench --policies does
    threads = comparison_threads(args.policy, args.threads)
    results = [profile(args.model, p, cache=args.cache, link=link, threads=threads,
                       n_tokens=args.n_tokens, rounds=args.rounds) for p in args.policy]
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return 0
    for r in results:
        print(f"{r['policy']}: cache {r['cache']}, link {r['link'] or 'none'}, threads "
              f"{r['threads'] or 'default'}: decode {r['decode_ms_per_token']:.3f} ms/token, "
              f"stall {r['stall_ms_per_token']:.3f} ms/token")
        print("  hook (inclusive)                              us/token  calls/token  us/call")
        for h in r["hooks"]:
            print(f"  {h['hook']:44s} {h['us_per_token']:9.1f} {h['calls_per_token']:11.2f}"
                  f" {h['us_per_call']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
