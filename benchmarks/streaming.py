"""Expert streaming benchmark: tokens/s and stall per token for several cache budgets under
emulated links (issue: expert streaming). Not a test — run it by hand:

    python benchmarks/streaming.py [MODEL] --budgets 10% 25% 50% 100% --links 2GB/s nvme \
        --policy ondemand -n 48

Every run uses the same prompt and greedy decoding, so the routing (and the output) is the
same in every row; only where the experts come from changes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import efedge
from efedge.demo import demo_model_path

DEFAULT_PROMPT = (
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(description=__doc__)\n"
    "    parser.add_argument('path', help='file to read')\n"
)


def run_one(path, budget, link, policy, prompt, n_tokens, threads=None) -> dict:
    cache = None if budget in (None, "none", "resident") else budget
    t0 = time.perf_counter()
    with efedge.load(path, cache=cache, policy=policy, link=link if cache else None,
                     threads=threads) as m:
        load_s = time.perf_counter() - t0
        m.generate(prompt, max_tokens=2, temperature=0)  # warm-up: compile, first loads
        m.reset_stats()
        m._session.reset()
        text = m.generate(prompt, max_tokens=n_tokens, temperature=0)
        s = m.stats()
    gen = max(s["tokens_generated"], 1)
    return {
        "budget": budget or "resident", "link": (link or "none") if cache else "-",
        "policy": policy if cache else "-", "load_s": load_s,
        "tok_per_s": (s["tokens_prompt"] + s["tokens_generated"]) / max(s["wall_s"], 1e-9),
        "stall_ms_per_token": 1e3 * s["stall_s"] / gen,
        "stall_share": s["stall_s"] / max(s["wall_s"], 1e-9),
        "hit_rate": s["hits"] / max(s["expert_requests"], 1),
        "mb_per_token": s["bytes_loaded"] / gen / 1e6,
        "cache_mib": s["cache_bytes"] / 2**20, "stats": s, "text_chars": len(text),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--budgets", nargs="+", default=["10%", "25%", "50%", "100%"])
    ap.add_argument("--links", nargs="+", default=["2GB/s", "500MB/s"])
    ap.add_argument("--policy", default="ondemand")
    ap.add_argument("-n", "--n-tokens", type=int, default=48)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    path = args.model or demo_model_path()
    rows = [run_one(path, None, None, args.policy, DEFAULT_PROMPT, args.n_tokens, args.threads)]
    for link in args.links:
        for budget in args.budgets:
            rows.append(run_one(path, budget, link, args.policy, DEFAULT_PROMPT,
                                args.n_tokens, args.threads))
    if args.json:
        json.dump(rows, sys.stdout, indent=2, default=str)
        return 0
    print(f"model: {path}   policy: {args.policy}   tokens: {args.n_tokens} (greedy)   "
          "links are emulated")
    print("| budget | link | cache MiB | tok/s | stall ms/token | stall % of wall | hit rate "
          "| MB loaded/token |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']} | {r['link']} | {r['cache_mib']:.1f} | {r['tok_per_s']:.1f} | "
              f"{r['stall_ms_per_token']:.2f} | {100 * r['stall_share']:.1f}% | "
              f"{r['hit_rate']:.1%} | {r['mb_per_token']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
