"""Paired A/B of decode speed between two efedge source trees (e.g. a worktree of an old
commit and this one) on the same model: one warm process per tree, taking turns round by
round (who goes first alternates; benchmarks/paired.py), so that both see the same
moments of a shared machine. Each round: the same prompt prefilled, then N greedy decode
steps timed; with ``--prefill P``, a P-token prompt's prefill timed instead (t/s are
prompt tokens).

    python benchmarks/ab_decode.py OLD_ROOT NEW_ROOT MODEL [-n 32] [-r 6] [-t 2] [--prefill P]

Prints each side's t/s per round and the median of the per-round ratios new / old.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from paired import take_turns


def _worker(model: str, n: int, threads: int, prefill: int) -> None:
    import numpy as np

    import efedge

    with efedge.load(model, threads=threads) as m:
        s = m._session
        prompt = list(range(5, 37))
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() != "go":
                break
            s.reset()
            if prefill:
                long = [5 + i % 200 for i in range(prefill)]
                t0 = time.perf_counter()
                s.prefill(long)
                print(f"{prefill / (time.perf_counter() - t0):.3f}", flush=True)
                continue
            tok = int(np.argmax(s.prefill(prompt)))
            t0 = time.perf_counter()
            for _ in range(n):
                tok = int(np.argmax(s.decode(tok)))
            print(f"{n / (time.perf_counter() - t0):.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("model")
    ap.add_argument("-n", type=int, default=32, help="decode steps per round")
    ap.add_argument("-r", type=int, default=6, help="rounds")
    ap.add_argument("--pairs", type=int, default=3,
                    help="fresh pairs of processes the rounds are spread over "
                         "(benchmarks/paired.py)")
    ap.add_argument("-t", type=int, default=2, help="threads")
    ap.add_argument("--prefill", type=int, default=0, metavar="P",
                    help="time the prefill of a P-token prompt instead of decode")
    a = ap.parse_args()
    res = take_turns(a.old, a.new, [os.path.abspath(__file__), "--worker", a.model,
                                    str(a.n), str(a.t), str(a.prefill)], a.r, float,
                     quiet=True, pairs=a.pairs)
    for name in ("old", "new"):
        print(f"{name} t/s", [round(x, 2) for x in res[name]], "median",
              round(statistics.median(res[name]), 2))
    ratios = [b / a_ for a_, b in zip(res["old"], res["new"], strict=True)]
    print("paired new/old per round", [round(x, 2) for x in ratios], "median",
          round(statistics.median(ratios), 2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
