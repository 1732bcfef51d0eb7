"""Cache policies side by side: same model, same text, same cache budget, same emulated
link, one live run per policy (issue: the ExpertFlow scheduler). Not a test — run it:

    python benchmarks/policies.py [MODEL] --cache 25% 50% --links auto \
        --policies ondemand next-layer fixed:1 fixed:2 fixed:4 expertflow -n 64

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
from contextlib import contextmanager

import numpy as np

import efedge
from efedge.demo import demo_model_path

COLUMNS = ("policy", "tokens_per_s", "stall_ms_per_token", "stall_vs_ondemand", "hit_rate",
           "prefetch_precision", "mb_per_token", "horizon_mean")


def heldout_ids(model, n: int) -> list[int]:
    """At least n token ids of held-out text (the corpus split the demo model never saw)."""
    from gguf_tools.corpus import heldout_sample

    chars = 4 * n + 400
    while True:
        try:
            text = heldout_sample(max_chars=chars)
        except RuntimeError:
            text = None
        if text is None:
            raise RuntimeError(f"no held-out document gives {n} tokens")
        ids = model.tokenize(text)
        if len(ids) >= n:
            return ids[:n]
        chars *= 2


def _decode_run(m, prompt_ids, n_tokens) -> tuple[dict, float, float]:
    """Prefill prompt_ids[:-n] … feed the rest one token at a time; returns the decode
    counters, the prefill stall and the policy's own time during decode."""
    sess = m._session
    sess.reset()
    m.reset_stats()
    split = len(prompt_ids) - n_tokens
    sess.prefill(prompt_ids[:split])
    prefill_stall = m.stats()["stall_s"]
    m.reset_stats()
    pol = getattr(m._experts, "policy", None)
    ovh0 = getattr(pol, "overhead_s", 0.0)
    for tok in prompt_ids[split:]:
        sess.decode(tok)
    ovh = getattr(pol, "overhead_s", 0.0) - ovh0
    return m.stats(), prefill_stall, ovh


def compare_policies(path, policies, cache, link, prompt_ids, n_tokens, *, threads=None,
                     warmup: bool = True) -> list[dict]:
    """One live run per policy on the same model, budget, emulated link and tokens: the
    first len(prompt_ids) - n_tokens ids are the prompt (one batch), the last n_tokens are
    decoded one by one. Returns one dict per policy with the table's columns (see
    COLUMNS) plus the raw counters under "stats"."""
    prompt_ids = [int(i) for i in prompt_ids]
    if not 0 < n_tokens < len(prompt_ids):
        raise ValueError("need 0 < n_tokens < len(prompt_ids) (at least one prompt token)")
    rows = []
    for policy in policies:
        with efedge.load(path, cache=cache, policy=policy, link=link, threads=threads) as m:
            if warmup:  # compile the kernels, so that no run pays for it
                _decode_run(m, prompt_ids[:8], 4)
            t0 = time.perf_counter()
            s, prefill_stall, ovh = _decode_run(m, prompt_ids, n_tokens)
            wall = time.perf_counter() - t0
        n = max(s["tokens_generated"], 1)
        issued = s["prefetch_issued"]
        rows.append({
            "policy": policy, "cache": cache, "link": str(link),
            "tokens_per_s": n / max(s["wall_s"], 1e-9),
            "stall_ms_per_token": 1e3 * s["stall_s"] / n,
            "stall_vs_ondemand": None,
            "hit_rate": s["hits"] / max(s["expert_requests"], 1),
            "prefetch_precision": (s["prefetch_used"] / issued) if issued else None,
            "mb_per_token": s["bytes_loaded"] / n / 1e6,
            "horizon_mean": s["horizon_mean"],
            "policy_overhead_pct": 100.0 * ovh / max(s["wall_s"], 1e-9),
            "prefill_stall_ms": 1e3 * prefill_stall, "run_s": wall, "stats": s,
        })
    base = [r["stall_ms_per_token"] for r in rows if r["policy"] in ("ondemand", "lru")]
    if base and base[0] > 0:
        for r in rows:
            r["stall_vs_ondemand"] = r["stall_ms_per_token"] / base[0]
    return rows


def scheduler_cost(path, prompt_ids, n_tokens, threads=None, cache="50%") -> dict:
    """What expertflow's own work costs during decode, with the cache under pressure but
    no emulated link (loads at memory speed, so little stall): the share of decode wall
    time spent in on_route (predictor, controller, selection and issuing prefetches) and
    in the predictor's step alone."""
    spent = {"step": 0.0, "calls": 0}
    with efedge.load(path, cache=cache, policy="expertflow", threads=threads) as m:
        pol = m._experts.policy
        _decode_run(m, prompt_ids, n_tokens)  # warm-up: compile, fill the cache
        step = pol.predictor.step

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return step(*a, **kw)
            finally:
                spent["step"] += time.perf_counter() - t
                spent["calls"] += 1

        pol.predictor.step = timed
        s, _, ovh = _decode_run(m, prompt_ids, n_tokens)
        n_layer = m.config.n_layer
    n = max(s["tokens_generated"], 1)
    wall = max(s["wall_s"], 1e-9)
    return {"decode_ms_per_token": 1e3 * wall / n,
            "on_route_us_per_layer": 1e6 * ovh / (n * n_layer),
            "predictor_us_per_layer": 1e6 * spent["step"] / max(spent["calls"], 1),
            "on_route_pct": 100 * ovh / wall,
            "predictor_pct": 100 * spent["step"] / wall}


def auto_links(path, prompt_ids, n_tokens, threads=None) -> tuple[list[str], dict]:
    """The issue's two links from a resident run here: loading one expert takes about one
    layer's decode compute, and 4× slower."""
    with efedge.load(path, threads=threads) as m:
        _decode_run(m, prompt_ids[:8], 4)
        s, _, _ = _decode_run(m, prompt_ids, n_tokens)
        store = m._tf.store
        n_layer = m.config.n_layer
        per_expert = float(np.mean([store.expert_bytes(i) for i in range(n_layer)]))
    layer_s = s["wall_s"] / max(s["tokens_generated"], 1) / n_layer
    rate = per_expert / layer_s
    info = {"layer_ms": 1e3 * layer_s, "expert_kib": per_expert / 1024,
            "decode_ms_per_token": 1e3 * layer_s * n_layer}
    return [f"{rate / 1e6:.1f}MB/s", f"{rate / 4e6:.1f}MB/s"], info


@contextmanager
def cache_aware_routing(slack: float):
    """For measurement only: every token goes through the batched layer path (whose
    router probabilities are at hand) with `cache_aware_route` applied before the experts
    are requested — what the proposed `routing="cache-aware"` option of model.py does.
    slack 0 is exact routing on the same path (the reference for the quality figures)."""
    from efedge import layers
    from efedge import model as M
    from efedge.experts.scheduler import cache_aware_route

    orig_moe, orig_decode = M.Transformer._moe, M.Transformer._decode

    def _moe(self, blk, il, h, experts):
        c = self.cfg
        ids, w, probs = layers.route(blk.ffn_gate_inp(h), c.n_expert_used, c.spec.norm_topk)
        cache = getattr(experts, "cache", None)
        if slack > 0 and cache is not None:
            ids, n_sub = cache_aware_route(ids, probs, cache.where[il] >= 0, slack)
            if n_sub:
                w = np.take_along_axis(probs, ids, axis=1).astype(np.float32)
                if c.spec.norm_topk:
                    w = w / w.sum(axis=1, keepdims=True)
                experts.counters.substitutions += n_sub
        if self.on_route is not None:
            self.on_route(il, h, ids)
        slots = np.zeros((h.shape[0], c.n_expert_used, c.n_embd), dtype=np.float32)
        for e, ew in experts.acquire(il, np.unique(ids)):
            tok, kk = np.nonzero(ids == e)
            slots[tok, kk] = M.expert_ffn(np.ascontiguousarray(h[tok]), ew) * w[tok, kk, None]
        out = slots[:, 0].copy()
        for kk in range(1, c.n_expert_used):
            out += slots[:, kk]
        return out

    def _decode(self, token, pos, kv, experts):
        x = self.embed(np.array([token]))
        for il, blk in enumerate(self.blocks):
            x = x + self._attention(blk, il, self._norm(x, blk.attn_norm), pos, kv)
            x = x + self._moe(blk, il, self._norm(x, blk.ffn_norm), experts)
        kv.n_past = pos + 1
        return self.output(self._norm(np.ascontiguousarray(x), self.output_norm))

    M.Transformer._moe, M.Transformer._decode = _moe, _decode
    try:
        yield
    finally:
        M.Transformer._moe, M.Transformer._decode = orig_moe, orig_decode


def routing_quality(path, slacks, cache, link, policy, prompt_ids, n_tokens) -> list[dict]:
    """Cache-aware routing's cost and gain: per slack, held-out perplexity of the decoded
    tokens, top-1 agreement with exact routing, substitutions and stall per token."""
    rows, ref_top = [], None
    split = len(prompt_ids) - n_tokens
    for slack in [0.0, *[s for s in slacks if s > 0]]:
        with cache_aware_routing(slack), efedge.load(path, cache=cache, policy=policy,
                                                      link=link) as m:
            _decode_run(m, prompt_ids[:8], 4)
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


def format_table(rows: list[dict]) -> str:
    head = ("| cache | link | policy | tok/s | stall ms/token | stall % of ondemand | hit rate "
            "| prefetch precision | MB/token | mean horizon | policy cost % |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        rel = "-" if r["stall_vs_ondemand"] is None else f"{100 * r['stall_vs_ondemand']:.1f}%"
        prec = "-" if r["prefetch_precision"] is None else f"{r['prefetch_precision']:.1%}"
        lines.append(f"| {r['cache']} | {r['link']} | {r['policy']} | {r['tokens_per_s']:.1f} "
                     f"| {r['stall_ms_per_token']:.3f} | {rel} | {r['hit_rate']:.1%} | {prec} "
                     f"| {r['mb_per_token']:.2f} | {r['horizon_mean']:.2f} "
                     f"| {r['policy_overhead_pct']:.2f} |")
    return "\n".join(lines)


def _median_rows(runs: list[list[dict]]) -> list[dict]:
    """Per policy, the run with the median stall (repeats smooth out a shared machine)."""
    out = []
    for i in range(len(runs[0])):
        group = sorted((r[i] for r in runs), key=lambda r: r["stall_ms_per_token"])
        out.append(group[len(group) // 2])
    base = [r["stall_ms_per_token"] for r in out if r["policy"] in ("ondemand", "lru")]
    for r in out:
        r["stall_vs_ondemand"] = (r["stall_ms_per_token"] / base[0]) if base and base[0] else None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--policies", nargs="+",
                    default=["ondemand", "next-layer", "fixed:1", "fixed:2", "fixed:4",
                             "expertflow"])
    ap.add_argument("--cache", nargs="+", default=["25%", "50%"])
    ap.add_argument("--links", nargs="+", default=["auto"])
    ap.add_argument("-n", "--n-tokens", type=int, default=64, help="decoded tokens")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (one batch)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting (median)")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--routing-slack", nargs="*", type=float, default=None,
                    help="also measure cache-aware routing at these slacks (expertflow, "
                         "first cache and link)")
    ap.add_argument("--cost", action="store_true",
                    help="only measure expertflow's own cost during decode (50%% cache, "
                         "no emulated link)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    path = args.model or demo_model_path()
    with efedge.load(path) as m:
        ids = heldout_ids(m, args.prompt + args.n_tokens)
    if args.cost:
        runs = [scheduler_cost(path, ids, args.n_tokens, args.threads)
                for _ in range(max(1, args.repeats))]
        if args.json:
            json.dump(runs, sys.stdout, indent=2)
            print()
            return 0
        for c in runs:
            print(f"decode {c['decode_ms_per_token']:.2f} ms/token: expertflow on_route "
                  f"{c['on_route_us_per_layer']:.1f} us/layer = {c['on_route_pct']:.2f}% of "
                  f"decode, of which the predictor {c['predictor_us_per_layer']:.1f} us/layer "
                  f"= {c['predictor_pct']:.2f}%")
        return 0
    links, info = args.links, {}
    if links == ["auto"]:
        links, info = auto_links(path, ids, args.n_tokens, args.threads)
    all_rows = []
    for link in links:
        for cache in args.cache:
            runs = [compare_policies(path, args.policies, cache, link, ids, args.n_tokens,
                                     threads=args.threads) for _ in range(args.repeats)]
            all_rows += _median_rows(runs)
    quality = []
    if args.routing_slack:
        quality = routing_quality(path, args.routing_slack, args.cache[0], links[0],
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
    raise SystemExit(main())
