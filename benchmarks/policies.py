"""Cache policies side by side: same model, same text, same cache budget, same emulated
link, one live run per policy (issue: the ExpertFlow scheduler). Not a test — run it:

    python benchmarks/policies.py [MODEL] --cache 25% 50% --links auto \
        --policies ondemand next-layer fixed:1 fixed:2 fixed:4 expertflow -n 64
    python benchmarks/policies.py --ab OLD_ROOT NEW_ROOT --cache 50% --links 286MB/s \
        -n 128 --rounds 8          # paired: two source trees taking turns
    python benchmarks/policies.py --ab OLD_ROOT NEW_ROOT --cost --cache 50% \
        --links 739MB/s -n 128 --rounds 10   # … the predictor's share of decode, paired
    python benchmarks/policies.py SMALLTHINKER.gguf --cache 50% --links 720MB/s \
        --policies ondemand ondemand/late expertflow expertflow/late
        # POLICY/late: a router before attention (smallthinker) asks for its layer's
        # experts when the layer runs instead of before its attention (same logits)

The text is the held-out split of the demo model's corpus (gguf_tools/corpus.py): the
first --prompt tokens are prefilled as one batch, then the next -n tokens are fed one at a
time exactly as generation would (teacher forcing, so every policy sees the same real
routing rather than whatever a greedy loop degenerates into). Figures are for the decode
part; prefill stall is a separate column. `--links auto` picks the two links of the
issue from a resident run on this machine: one where loading one expert takes about one
layer's compute, and one 4× slower. Links are emulated (the file is read at full speed,
then the copy is held back to the link's rate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

import efedge
from efedge.demo import demo_model_path
from efedge.policy_compare import (
    auto_links,
    compare_policies,
    comparison_threads,
    decode_run,
    format_bounds,
    format_table,
    heldout_ids,
    median_rows,
)


def _link(spec: str) -> str | None:
    """A --links value as efedge.load's link=: 'none' is no emulated link."""
    return None if spec == "none" else spec


_ZERO = {"step": 0.0, "calls": 0, "pass_start": 0.0, "wait": 0.0}


class PredictorTimer:
    """Timers on an expertflow predictor's calls on the compute thread: its steps (or
    their posts to the helper thread), the pass start (its beginning and prediction) and
    the waits for the helper — in wait() and in the plan's own kernel call (wait_select:
    its own clock, the plan's work left out). `figures(...)` after a decode gives what
    they measured since `start()`."""

    def __init__(self, pred):
        self.pred = pred
        self.spent = dict(_ZERO)  # (the timers' closures hold this dict: start() zeroes it)
        pred.step = self._timed(pred.step, "step", 1)
        pred.post_step = self._timed(pred.post_step, "step", None)
        pred.predict_pass_start = self._timed(pred.predict_pass_start, "pass_start", 0)
        # and begin_pass: the token memory's tag, the context and its draft (counted since
        # the thirty-second session, when the draft made it more than a tag)
        pred.begin_pass = self._timed(pred.begin_pass, "pass_start", 0)
        pred.wait = self._timed(pred.wait, "wait", 0)
        self.start()

    def _timed(self, fn, key, count):
        """fn, its time added to spent[key]; a step counted `count` times, or (None)
        once if it returned True (a post_step that posted: one that did not leaves the
        step to step(), which counts it)."""
        spent = self.spent

        def run(*a, **kw):
            t = time.perf_counter()
            r = None
            try:
                r = fn(*a, **kw)
                return r
            finally:
                spent[key] += time.perf_counter() - t
                spent["calls"] += bool(r) if count is None else count
        return run

    def start(self) -> None:
        """From now on (the counts zeroed)."""
        self.spent.update(_ZERO)
        pred = self.pred
        self._base = (pred.thread_posts, pred.select_wait_s, pred.thread_stolen)

    def figures(self, n_tokens: int, wall_s: float) -> dict:
        """Since start(), over a decode of n_tokens in wall_s: the predictor's share of
        decode and its parts, and the helper's jobs (those the compute thread ran)."""
        pred, spent = self.pred, self.spent
        posts0, sel0, stolen0 = self._base
        wait = spent["wait"] + pred.select_wait_s - sel0
        n, wall = max(n_tokens, 1), max(wall_s, 1e-9)
        predictor = spent["step"] + spent["pass_start"] + wait
        return {"predictor_us_per_layer": 1e6 * (spent["step"] + wait)
                / max(spent["calls"], 1),
                "pass_start_us_per_token": 1e6 * spent["pass_start"] / n,
                "predictor_us_per_token": 1e6 * predictor / n,
                "predictor_pct": 100 * predictor / wall,
                "helper_steps": pred.thread_posts - posts0,
                "helper_jobs_taken_over": pred.thread_stolen - stolen0}


def scheduler_cost(path, prompt_ids, n_tokens, threads=None, cache="50%", link=None,
                   warm_ids=None) -> dict:
    """What expertflow's own work costs during decode, with the cache under pressure
    (default: no emulated link, loads at the disk's own speed, as the page cache keeps no
    copy of an expert: ~250 µs per 96 KiB expert on this machine's disk): the share of
    decode wall time spent in on_route (predictor, controller, selection and issuing
    prefetches) and in the predictor alone — its step at every layer and its prediction at
    each pass's start (before the first layer, from the token memory). `warm_ids`: the
    text of the warm-up (compiling, filling the cache); other text than the measured one,
    or the token memory would have learned the measured text's routing by heart."""
    with efedge.load(path, cache=cache, policy="expertflow", threads=threads,
                     link=link) as m:
        pol = m._experts.policy
        warm = prompt_ids if warm_ids is None else warm_ids
        decode_run(m, warm, min(n_tokens, len(warm) - 1))
        # with a helper thread (EFEDGE_PREDICTOR_THREAD, -t below the cores) a step is
        # posted and waited for: the compute thread's share is both
        timer = PredictorTimer(pol.predictor)
        s, _, ovh = decode_run(m, prompt_ids, n_tokens)
        n_layer = m.config.n_layer
    n = max(s["tokens_generated"], 1)
    wall = max(s["wall_s"], 1e-9)
    return {"decode_ms_per_token": 1e3 * wall / n,
            "on_route_us_per_layer": 1e6 * ovh / (n * n_layer),
            "on_route_pct": 100 * ovh / wall,
            **timer.figures(n, wall)}


def routing_quality(path, slacks, cache, link, policy, prompt_ids, n_tokens) -> list[dict]:
    """Cache-aware routing's cost and gain: per slack, held-out perplexity of the decoded
    tokens, top-1 agreement with exact routing, substitutions and stall per token."""
    rows, ref_top = [], None
    split = len(prompt_ids) - n_tokens
    for slack in [0.0, *[s for s in slacks if s > 0]]:
        routing = "cache-aware" if slack > 0 else "exact"
        with efedge.load(path, cache=cache, policy=policy, link=link, routing=routing,
                         routing_slack=slack if slack > 0 else 0.05) as m:
            decode_run(m, prompt_ids[:8], 4)
            sess = m._session
            sess.reset()
            logits = sess.prefill(prompt_ids[:split])
            m.reset_stats()
            nll, top = [], []
            for tok in prompt_ids[split:]:
                z = logits.astype(np.float64)  # the prediction of tok
                nll.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[tok])
                top.append(int(np.argmax(z)))
                logits = sess.decode(tok)
            s = m.stats()
        n = max(s["tokens_generated"], 1)
        if ref_top is None:
            ref_top = top
        rows.append({"slack": slack, "perplexity": float(np.exp(np.mean(nll))),
                     "top1_agreement": float(np.mean(np.array(top) == np.array(ref_top))),
                     "substitutions_per_token": s["substitutions"] / n,
                     "stall_ms_per_token": 1e3 * s["stall_s"] / n,
                     "hit_rate": s["hits"] / max(s["expert_requests"], 1)})
    return rows


def _ab_worker(root_model: str, cache: str, link: str, n_tokens: int, prompt: int,
               threads: int | None, policies: list[str], cost: bool = False) -> None:
    """One side of --ab: warm models (one per policy), a decode run per policy for every
    "go" line on stdin, one JSON line of figures back; with `cost`, expertflow's
    predictor is timed too (PredictorTimer: its share of decode and its parts)."""
    path = root_model or demo_model_path()
    with efedge.load(path) as m:
        ids = heldout_ids(m, prompt + n_tokens)
    models = {p: efedge.load(path, cache=cache, policy=p, threads=threads,
                             link=_link(link)) for p in policies}
    for m in models.values():
        decode_run(m, ids, n_tokens)  # compile, fill the cache
    timers = {p: PredictorTimer(m._experts.policy.predictor) for p, m in models.items()
              if cost and hasattr(m._experts.policy, "predictor")}
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        out = {}
        for p, m in models.items():
            sess, pol = m._session, m._experts.policy
            sess.reset()
            sess.prefill(ids[:prompt])
            m.reset_stats()
            ovh0, cpu0 = pol.overhead_s, time.thread_time()
            if p in timers:
                timers[p].start()
            for tok in ids[prompt:]:
                sess.decode(tok)
            # the compute thread's CPU time: its own work without the stall, and much
            # less disturbed than wall time by other processes on a shared machine
            cpu = time.thread_time() - cpu0
            ovh, s = pol.overhead_s - ovh0, m.stats()
            n = max(s["tokens_generated"], 1)
            out[p] = {"tok/s": n / s["wall_s"], "stall ms/token": 1e3 * s["stall_s"] / n,
                      "compute-thread CPU ms/token": 1e3 * cpu / n,
                      "policy us/layer": 1e6 * ovh / (n * m.config.n_layer),
                      "policy % of decode": 100 * ovh / s["wall_s"]}
            if p in timers:
                f = timers[p].figures(n, s["wall_s"])
                out[p].update({"predictor % of decode": f["predictor_pct"],
                               "predictor us/token": f["predictor_us_per_token"],
                               "pass start us/token": f["pass_start_us_per_token"]})
        print(json.dumps(out), flush=True)
    for m in models.values():
        m.close()


def paired_ab(old: str, new: str, args) -> int:
    """--ab OLD NEW: the same decode runs in two source trees (e.g. a worktree of an older
    commit and this one), one warm process each, taking turns round by round (who goes
    first alternates), so that both see the same moments of a shared machine. Prints
    each figure's median per tree and the median of the per-round ratios new / old."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:  # (imported as a module, not run as the script)
        sys.path.insert(0, here)
    from paired import take_turns

    # both trees read one file (each tree's own copy of the demo model lies elsewhere on
    # the disk: with no emulated link the reads go to the drive)
    model = os.path.abspath(args.model) if args.model else str(demo_model_path())
    res = take_turns(old, new, [os.path.abspath(__file__), "--ab-worker", model,
                                args.cache[0], args.links[0], str(args.n_tokens),
                                str(args.prompt), str(args.threads or 0),
                                "cost" if args.cost else "plain", *args.policies],
                     args.rounds, json.loads, pairs=args.pairs)
    print(f"paired A/B, {args.rounds} rounds over {min(args.pairs, args.rounds)} pairs of "
          f"processes: cache {args.cache[0]}, link {args.links[0]}, "
          f"{args.prompt} prompt + {args.n_tokens} decoded tokens\nold: {old}\nnew: {new}")
    print("| policy | figure | old (median) | new (median) | new / old (median of rounds) |")
    print("|---|---|---|---|---|")
    for pol in args.policies:
        for key in res["old"][0][pol]:
            a = [x[pol][key] for x in res["old"]]
            b = [x[pol][key] for x in res["new"]]
            ratios = [y / x for x, y in zip(a, b, strict=True) if x > 0]
            if not ratios and not any(a + b):
                continue  # (no policy work: ondemand)
            ratio = f"{statistics.median(ratios):.3f}" if ratios else "–"
            print(f"| {pol} | {key} | {statistics.median(a):.3f} | {statistics.median(b):.3f} "
                  f"| {ratio} |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--policies", nargs="+",
                    default=["ondemand", "next-layer", "fixed:1", "fixed:2", "fixed:4",
                             "expertflow"])
    ap.add_argument("--cache", nargs="+", default=["25%", "50%"])
    ap.add_argument("--links", nargs="+", default=["auto"],
                    help="emulated link rates (e.g. 720MB/s), 'auto' (two links from the "
                         "measured compute) or 'none' (no emulated link: the file's own "
                         "speed)")
    ap.add_argument("-n", "--n-tokens", type=int, default=64, help="decoded tokens")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (one batch)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting (median)")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--routing-slack", nargs="*", type=float, default=None,
                    help="also measure cache-aware routing at these slacks (expertflow, "
                         "first cache and link)")
    ap.add_argument("--cost", action="store_true",
                    help="only measure expertflow's own cost during decode (default 50%% "
                         "cache, no emulated link; else the first --cache and --links); "
                         "with --ab, the predictor's share of decode per tree, paired")
    ap.add_argument("--ab", nargs=2, metavar=("OLD_ROOT", "NEW_ROOT"),
                    help="paired A/B of two source trees: decode runs taking turns "
                         "(first --cache and --links; --links none: no emulated link)")
    ap.add_argument("--rounds", type=int, default=8, help="--ab: rounds")
    ap.add_argument("--pairs", type=int, default=4,
                    help="--ab: fresh pairs of processes the rounds are spread over (a "
                         "process keeps a speed of its own: benchmarks/paired.py)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    # one compute-thread count for every run, the auto link's resident ones too: -t, else
    # expertflow's streaming default where it is among them (compare_policies' rule)
    args.threads = comparison_threads(args.policies + ["expertflow"] * args.cost,
                                      args.threads)
    if args.ab:
        if args.links == ["auto"]:
            ap.error("--ab needs a link rate (or none)")
        if args.policies == ap.get_default("policies"):
            args.policies = ["expertflow"] if args.cost else ["ondemand", "expertflow"]
        return paired_ab(*args.ab, args)
    path = args.model or demo_model_path()
    n_text = args.prompt + args.n_tokens
    with efedge.load(path) as m:
        ids = heldout_ids(m, 2 * n_text if args.cost else n_text)
    if args.cost:
        # the text after the measured one warms each run up (see scheduler_cost)
        ids, warm_ids = ids[:n_text], ids[n_text:]
        cache = args.cache[0] if args.cache != ap.get_default("cache") else "50%"
        link = None if args.links == ["auto"] else _link(args.links[0])
        runs = [scheduler_cost(path, ids, args.n_tokens, args.threads, cache, link,
                               warm_ids) for _ in range(max(1, args.repeats))]
        if args.json:
            json.dump(runs, sys.stdout, indent=2)
            print()
            return 0
        print(f"cache {cache}, link {link or 'none'}, {args.n_tokens} decoded tokens")
        for c in runs:
            print(f"decode {c['decode_ms_per_token']:.2f} ms/token: expertflow on_route "
                  f"{c['on_route_us_per_layer']:.1f} us/layer = {c['on_route_pct']:.2f}% of "
                  f"decode, of which the predictor {c['predictor_us_per_layer']:.1f} us/layer "
                  f"+ {c['pass_start_us_per_token']:.1f} us/token at the pass start "
                  f"= {c['predictor_pct']:.2f}%"
                  + (f" ({c['helper_steps']} jobs posted to the helper thread, "
                     f"{c['helper_jobs_taken_over']} of them run by the compute thread: "
                     "the helper off its core)" if c["helper_steps"] else ""))
        pct = [c["predictor_pct"] for c in runs]
        print(f"predictor: median {statistics.median(pct):.2f}% of decode "
              f"({min(pct):.2f}–{max(pct):.2f}%, {len(pct)} runs)")
        return 0
    links, info = args.links, {}
    if links == ["auto"]:
        links, info = auto_links(path, ids, args.n_tokens, args.threads)
    all_rows = []
    for link in links:
        for cache in args.cache:
            # every other repeat runs the policies last to first (compare_policies)
            runs = [compare_policies(path, args.policies, cache,
                                     _link(link), ids, args.n_tokens,
                                     threads=args.threads, reverse=r % 2 == 1)
                    for r in range(args.repeats)]
            all_rows += median_rows(runs)
    quality = []
    if args.routing_slack:
        quality = routing_quality(path, args.routing_slack, args.cache[0],
                                  _link(links[0]),
                                  "expertflow", ids, args.n_tokens)
    if args.json:
        json.dump({"model": str(path), "links": links, "auto": info, "rows": all_rows,
                   "routing": quality}, sys.stdout, indent=2, default=str)
        print()
        return 0
    print(f"model: {path}   text: held-out, {args.prompt} prompt + {args.n_tokens} decoded "
          f"tokens (teacher-forced)   links: {', '.join(links)} (emulated)")
    if info:
        print(f"resident decode here: {info['decode_ms_per_token']:.2f} ms/token, "
              f"{info['layer_ms']:.3f} ms/layer; {info['expert_kib']:.1f} KiB per expert")
    print(format_table(all_rows))
    bounds = format_bounds(all_rows)
    if bounds:
        print(bounds)
    if quality:
        print(f"\ncache-aware routing (expertflow, cache {args.cache[0]}, link {links[0]}):")
        print("| slack | held-out perplexity | top-1 agreement | substitutions/token "
              "| stall ms/token | hit rate |")
        print("|---|---|---|---|---|---|")
        for q in quality:
            print(f"| {q['slack']:g} | {q['perplexity']:.3f} | {q['top1_agreement']:.1%} | "
                  f"{q['substitutions_per_token']:.2f} | {q['stall_ms_per_token']:.3f} | "
                  f"{q['hit_rate']:.1%} |")
    stalls = [r["stall_ms_per_token"] for r in all_rows if r["policy"] == "expertflow"]
    if stalls:
        print(f"expertflow stall, median over settings: {statistics.median(stalls):.3f} "
              "ms/token")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--ab-worker":
        model, cache, link, n, prompt, threads, mode, *pols = sys.argv[2:]
        _ab_worker(model, cache, link, int(n), int(prompt), int(threads) or None, pols,
                   cost=mode == "cost")
    else:
        raise SystemExit(main())
