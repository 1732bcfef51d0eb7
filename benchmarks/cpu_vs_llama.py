"""CPU speed side by side with llama.cpp (issue: efedge bench and fast kernels). Not a test
— run it:

    python benchmarks/cpu_vs_llama.py [--models DIR] [-p 512] [-n 128] [-r 5] [-t 2]
        [--rounds 3] [--policy-check] [--out benchmarks/results/cpu_vs_llama]

Writes the reference models once (gguf_tools.make_tiny "bench" preset: qwen3moe, 16
layers, 1024 wide, 32 experts of 512, 4 active; Q4_0 ≈ 457 MiB and Q4_K_M ≈ 491 MiB),
then for each runs ``efedge bench --vs-llama-cpp --json`` in a fresh process per round
(efedge and llama-cpp-python alternate repetition by repetition inside it), and prints
per test the ratio efedge / llama.cpp of every round, their median, and the load
average. With --policy-check it also compares decode with the expertflow policy and a
100% cache against all experts resident (the issue asks for ≤ 3% apart).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QUANTS = ("Q4_0", "Q4_K_M")


def model_path(models: Path, quant: str) -> Path:
    path = models / f"bench-qwen3moe-{quant}.gguf"
    if not path.exists():
        from gguf_tools.make_tiny import write_tiny

        models.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} …", file=sys.stderr)
        write_tiny(path, "qwen3moe", quant, preset="bench")
    return path


def bench(path: Path, extra: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "efedge", "bench", str(path), "--json", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(res.stdout)


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "benchmarks" / "models")
    ap.add_argument("-p", default="512")
    ap.add_argument("-n", default="128")
    ap.add_argument("-r", default="5")
    ap.add_argument("-t", default="2")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per model")
    ap.add_argument("--quants", nargs="+", default=list(QUANTS))
    ap.add_argument("--policy-check", action="store_true",
                    help="also: expertflow with a 100%% cache vs all experts resident (decode)")
    ap.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    args = ap.parse_args(argv)

    common = ["-p", args.p, "-n", args.n, "-r", args.r, "-t", args.t]
    report, lines = {}, []
    for quant in args.quants:
        path = model_path(args.models, quant)
        rounds = []
        for i in range(args.rounds):
            before = loadavg()
            rows = bench(path, [*common, "--vs-llama-cpp"])
            rounds.append({"load_before": before, "load_after": loadavg(), "rows": rows})
            for r in rows:
                if r["engine"] == "efedge":
                    print(f"{quant} round {i + 1}: {r['test']} efedge {r['avg_ts']:.1f} t/s, "
                          f"ratio {r['vs_llama_cpp']:.2f} (paired median "
                          f"{r['vs_llama_cpp_paired']:.2f}); load {before}", file=sys.stderr)
        report[quant] = {"rounds": rounds}
        tests = sorted({r["test"] for rd in rounds for r in rd["rows"]})
        for test in tests:
            ours = [r for rd in rounds for r in rd["rows"]
                    if r["engine"] == "efedge" and r["test"] == test]
            theirs = [r for rd in rounds for r in rd["rows"]
                      if r["engine"] == "llama.cpp" and r["test"] == test]
            ratios = [r["vs_llama_cpp"] for r in ours]
            paired = [r["vs_llama_cpp_paired"] for r in ours]
            report[quant][test] = {"ratios": ratios, "median_ratio": statistics.median(ratios),
                                   "paired": paired, "median_paired": statistics.median(paired)}
            lines.append(
                f"| {quant} | {test} | {statistics.median(r['avg_ts'] for r in ours):.1f} | "
                f"{statistics.median(r['avg_ts'] for r in theirs):.1f} | "
                f"{' '.join(f'{x:.2f}' for x in ratios)} | {statistics.median(ratios):.2f} | "
                f"{statistics.median(paired):.2f} |")
        if args.policy_check:
            n = args.n.split(",")[0]
            rows = bench(path, ["-p", "0", "-n", n, "-r", args.r, "-t", args.t,
                                "--cache", "none,100%", "--policy", "expertflow"])
            base = next(r for r in rows if r["cache"] is None)
            flow = next(r for r in rows if r["cache"] == "100%")
            report[quant]["policy_check"] = {"resident_ts": base["avg_ts"],
                                             "expertflow_100_ts": flow["avg_ts"],
                                             "ratio": flow["avg_ts"] / base["avg_ts"]}
            print(f"{quant}: tg{n} expertflow @100% / resident = "
                  f"{flow['avg_ts'] / base['avg_ts']:.3f}", file=sys.stderr)
    head = ("| model | test | efedge t/s (median) | llama.cpp t/s (median) | "
            "efedge / llama.cpp per round | median | paired median |\n"
            "| --- | --- | ---: | ---: | --- | ---: | ---: |")
    table = "\n".join([head, *lines])
    print(table)
    print(f"\nthreads {args.t}, {args.rounds} rounds × {args.r} repetitions, "
          f"load average now {loadavg()}, {time.strftime('%Y-%m-%d %H:%M')}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        args.out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
