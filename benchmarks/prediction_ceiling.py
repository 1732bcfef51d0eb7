"""How low can expertflow's stall go on a trace, given better pre-gating? (issue #5's
≤ 5% of on-demand's stall at 50% cache). Not a test — run it by hand:

    python benchmarks/prediction_ceiling.py [TRACE] --cache 50% 25% --link 720MB/s \
        --layer-ms 0.3 --max-tokens 1024

The same trace replayed through the simulator (efedge/simulate.py) with its pre-gating
logits — the routers of the layers ahead applied to the current hidden state, one of the
predictor's sources and the only one that sees the token's own hidden state — replaced
by better information, everything else (the predictor's other sources, the horizon
controller, eviction, the link) left as it is:

* recorded: the trace as it is (the predictor's own view);
* router on the next layer's input: the logits at distance 1 are the next layer's router
  applied to that layer's *input* (the trace's `pregate_in`) — what pre-gating would see
  if it knew this layer's expert output before the layer ran: the best any predictor
  built on the routers could know one layer ahead;
* exact next layer: at distance 1, logits that name the experts the next layer will use
  (within a pass; the next token's first layer is still predicted as before, at the pass
  start);
* exact next two layers: the same at distances 1 and 2.

Prints stall as a share of on-demand's stall per variant and budget, and each variant's
hit rate, so the gap between the issue's target and what prediction alone could give is
measured rather than guessed.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from types import SimpleNamespace

import numpy as np

from efedge.cli.simulate import build_setup
from efedge.simulate import simulate
from efedge.trace import load_trace

EXACT_LOGIT = 10.0  # a used expert's logit in an exact row (the others 0): softmax ≈ 1/K each


def default_trace() -> str:
    return str(resources.files("efedge") / "data" / "traces" / "demo-heldout.npz")


def variants(arrays: dict) -> dict[str, dict]:
    """name → the trace's arrays with the pre-gating logits replaced (see the module doc)."""
    pg = arrays.get("pregate")
    if pg is None:
        raise SystemExit("this trace holds no pre-gating logits ('pregate'): record it with "
                         "efedge trace")
    experts = arrays["experts"].astype(np.int64)
    T, L, H, E = pg.shape
    out = {"recorded": arrays}
    if "pregate_in" in arrays:
        better = pg.copy()
        for layer in range(L - 1):
            better[:, layer, 0] = arrays["pregate_in"][:, layer + 1]
        out["router on the next layer's input"] = {**arrays, "pregate": better}
    for depth, name in ((1, "exact next layer"), (2, "exact next two layers")):
        if depth > H:
            continue
        exact = pg.copy()
        for layer in range(L):
            for d in range(1, depth + 1):
                if layer + d >= L:
                    break
                row = np.zeros((T, E), dtype=pg.dtype)
                np.put_along_axis(row, experts[:, layer + d], EXACT_LOGIT, axis=1)
                exact[:, layer, d - 1] = row
        out[name] = {**arrays, "pregate": exact}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", nargs="?", default=None, help="default: the demo's held-out trace")
    ap.add_argument("--cache", nargs="+", default=["50%", "25%"])
    ap.add_argument("--link", default="720MB/s")
    ap.add_argument("--layer-ms", type=float, default=0.3)
    ap.add_argument("--expert-ms", type=float, default=None)
    ap.add_argument("--demand-copy-us", type=float, default=0.0,
                    help="the compute thread's own time per demand load (µs): efedge's CPU "
                         "path through an emulated link copies them itself (0: DMA)")
    ap.add_argument("--prefetch-copy-us", type=float, default=0.0,
                    help="the same per prefetch (0: DMA)")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--hw", default="rtx4060-laptop", help="profile for what is not overridden")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    arrays, meta = load_trace(args.trace or default_trace())
    opts = SimpleNamespace(hw=args.hw, model_profile=None, link=args.link,
                           layer_ms=args.layer_ms, expert_ms=args.expert_ms, policy_time=0.0,
                           demand_copy_us=args.demand_copy_us,
                           prefetch_copy_us=args.prefetch_copy_us)
    rows = []
    for cache in args.cache:
        base = simulate(arrays, meta, build_setup(meta, opts, cache), "ondemand",
                        max_tokens=args.max_tokens)
        for name, arr in variants(arrays).items():
            r = simulate(arr, meta, build_setup(meta, opts, cache), "expertflow",
                         max_tokens=args.max_tokens)
            rows.append({"cache": cache, "pre-gating": name,
                         "stall_vs_ondemand": r["stall_s"] / base["stall_s"],
                         "hit_rate": r["hit_rate"],
                         "stall_ms_per_token": r["stall_ms_per_token"],
                         "ondemand_stall_ms_per_token": base["stall_ms_per_token"]})
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    copies = (f", the compute thread's copies {args.demand_copy_us:g} / "
              f"{args.prefetch_copy_us:g} µs per demand load / prefetch"
              if args.demand_copy_us or args.prefetch_copy_us else "")
    print(f"expertflow, simulated: link {args.link}, {args.layer_ms} ms per layer, "
          f"{args.max_tokens} tokens{copies}")
    print("| cache | pre-gating | stall / on-demand's | hit rate | stall ms/token |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cache']} | {r['pre-gating']} | {r['stall_vs_ondemand']:.3f} | "
              f"{r['hit_rate']:.1%} | {r['stall_ms_per_token']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
