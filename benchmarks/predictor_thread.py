"""ExpertFlow with its predictor's step on the compute thread (A) or on a helper thread
(B), side by side in one process: two models of the same file, decode runs taking turns
(A B, B A, …) so both see the same minutes of a noisy machine. Not a test — run it:

    python benchmarks/predictor_thread.py -t 1 --link 1060MB/s --rounds 10

Prints per arm the median decode time, stall and policy time per token, and the median
of the per-round ratios B / A. The helper only pays where a core is spare: with as many
compute threads as cores (`-t 2` on a 2-core machine) it takes a core from them
(efedge/experts/predictor_thread.py; docs/scheduler.md §7).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import efedge
from efedge.experts.policies import ExpertFlow
from efedge.policy_compare import comparison_threads, decode_run, heldout_ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="GGUF (default: the demo model)")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--cache", default="50%")
    ap.add_argument("--link", default="1060MB/s", help="emulated link ('none': the file)")
    ap.add_argument("-n", "--n-tokens", type=int, default=96, help="decoded tokens a run")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args(argv)
    link = None if args.link == "none" else args.link
    # both arms at one count: -t, else the one expertflow streams at by default (one core
    # fewer than the machine's — the helper's), which arm A alone would not take
    threads = comparison_threads(["expertflow"], args.threads)
    models = {arm: efedge.load(args.model, cache=args.cache, threads=threads,
                               link=link, policy=ExpertFlow(predictor_thread=threaded))
              for arm, threaded in (("A", False), ("B", True))}
    try:
        ids = heldout_ids(models["A"], 2 * (args.n_tokens + 32))
        text, warm = ids[:args.n_tokens + 32], ids[args.n_tokens + 32:]
        for m in models.values():  # compile, fill the cache, start B's helper
            decode_run(m, warm, args.n_tokens)
        from efedge.experts import predictor_thread

        if not predictor_thread.available():
            print("no helper thread on this platform (Linux futexes needed)")
            return 1
        runs = {arm: [] for arm in models}
        for r in range(args.rounds):
            for arm in (("A", "B") if r % 2 == 0 else ("B", "A")):
                s, _, policy_s = decode_run(models[arm], text, args.n_tokens)
                n = max(s["tokens_generated"], 1)
                runs[arm].append((1e3 * s["wall_s"] / n, 1e3 * s["stall_s"] / n,
                                  1e3 * policy_s / n))
        fallbacks = models["B"]._experts.policy.predictor.thread_fallbacks
    finally:
        for m in models.values():
            m.close()
    print(f"cache {args.cache}, link {link or 'none'}, threads {threads or 'default'}, "
          f"{args.n_tokens} decoded tokens x {args.rounds} rounds")
    for arm, label in (("A", "compute thread"), ("B", "helper thread ")):
        med = [statistics.median(x[i] for x in runs[arm]) for i in range(3)]
        print(f"{arm} ({label}): decode {med[0]:.3f} ms/token, stall {med[1]:.3f}, "
              f"policy {med[2]:.3f}")
    ratios = [b[0] / a[0] for a, b in zip(runs["A"], runs["B"], strict=True)]
    print(f"B / A decode time: median {statistics.median(ratios):.3f} "
          f"({min(ratios):.2f}-{max(ratios):.2f}); B's helper given up {fallbacks} time(s) "
          "for slow waits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
