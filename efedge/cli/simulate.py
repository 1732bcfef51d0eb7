"""`efedge simulate TRACE --hw PROFILE --model-profile PROFILE --cache … --policy …`:
estimate stall and tokens/s on hardware we do not have, from a routing trace."""

from __future__ import annotations

import argparse
import json
import sys

from efedge.cli.common import (
    non_negative_float,
    non_negative_int,
    os_reason,
    positive_float,
    positive_int,
    user_path,
)
from efedge.errors import EfedgeError


def add_parser(sub) -> None:
    from efedge.profiles import HARDWARE, MODELS

    p = sub.add_parser("simulate", help="replay a routing trace on a hardware profile",
                       description="Replay a trace through the runtime's cache and policies on "
                                   "a virtual clock. Hardware: " + ", ".join(HARDWARE) +
                                   ". Models: " + ", ".join(MODELS) + ".")
    p.add_argument("trace", help="trace .npz from `efedge trace`")
    p.add_argument("--hw", default="rtx4060-laptop",
                   help="hardware profile (default rtx4060-laptop)")
    p.add_argument("--model-profile", default=None,
                   help="model profile (default: the traced model's own sizes)")
    p.add_argument("--cache", nargs="+", default=["25%"],
                   help="budgets (bytes, MiB, %%; default 25%%)")
    p.add_argument("--policy", nargs="+", default=["ondemand"],
                   help="policies to compare (default ondemand; NAME/late: a trace of routers "
                        "on the layer's input asks for the experts after the attention, not "
                        "before)")
    p.add_argument("--link", default=None, help="override the link rate, e.g. 8GB/s")
    p.add_argument("--layer-ms", type=positive_float, default=None,
                   help="override compute per layer (ms) — e.g. measured on this machine")
    p.add_argument("--expert-ms", type=positive_float, default=None,
                   help="override compute per expert per token (ms)")
    p.add_argument("--policy-time", type=float, default=0.0,
                   help="charge the policy's own run time here to the virtual clock, × this "
                        "(1: the scheduler shares the computing cores, as on a CPU; default "
                        "0: it overlaps the device's compute, as on a GPU)")
    p.add_argument("--demand-copy-us", type=non_negative_float, default=0.0,
                   help="the compute thread's own time per demand load (µs), where it "
                        "copies them itself, as efedge's CPU path through an emulated link "
                        "does (`efedge bench`'s copies column); default 0: a copy engine "
                        "(DMA) makes them")
    p.add_argument("--prefetch-copy-us", type=non_negative_float, default=0.0,
                   help="the same per prefetch (the CPU path copies those as the link "
                        "comes free); default 0: DMA")
    p.add_argument("--warmup", type=non_negative_int, default=16,
                   help="tokens before counting (default 16; the trace must be longer)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="tokens to measure after the warm-up (default: the rest of the trace)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, help="write stall vs cache size per policy (PNG)")
    p.set_defaults(func=main)


def build_setup(meta, args, budget):
    from efedge.experts.link import parse_link
    from efedge.profiles import ModelProfile, get_hardware, get_model
    from efedge.simulate import setup_from_profiles

    try:
        hw = get_hardware(args.hw)
        if args.model_profile:
            mp = get_model(args.model_profile)
        else:
            per = meta["bytes_per_expert"]
            mp = ModelProfile(meta["model"], meta["n_layer"], meta["n_expert"], meta["top_k"],
                              sum(per) / len(per), 4 * meta["n_embd"] ** 2 * 2.0, "trace")
    except ValueError as exc:
        raise EfedgeError(str(exc)) from None
    setup = setup_from_profiles(meta, hw, mp, budget)
    if args.link:
        link = parse_link(args.link)
        setup.link_bytes_per_s, setup.link_latency_s = link.bytes_per_s, link.latency_s
    if args.layer_ms is not None:
        setup.layer_compute_s = args.layer_ms / 1e3
    if args.expert_ms is not None:
        setup.expert_compute_s = args.expert_ms / 1e3
    if not args.policy_time >= 0:
        raise EfedgeError(f"--policy-time must be ≥ 0, got {args.policy_time}")
    setup.policy_time = float(args.policy_time)
    # (callers that build their own args — benchmarks — may leave the copies out: DMA)
    setup.demand_copy_s = float(getattr(args, "demand_copy_us", 0.0)) * 1e-6
    setup.prefetch_copy_s = float(getattr(args, "prefetch_copy_us", 0.0)) * 1e-6
    return setup


def main(args: argparse.Namespace) -> int:
    from efedge.simulate import lower_bound, simulate
    from efedge.trace import load_trace

    if args.plot:  # before the simulation, not after it and its table
        _pyplot()
    try:
        # a TraceError names the file itself
        arrays, meta = load_trace(user_path(args.trace))
    except OSError as exc:
        raise EfedgeError(f"cannot read trace {args.trace!r}: {os_reason(exc)}") from None
    rows = []
    for budget in args.cache:
        setup = build_setup(meta, args, budget)
        bound = lower_bound(arrays, meta, setup, warmup=args.warmup,
                            max_tokens=args.max_tokens)
        for policy in args.policy:
            setup = build_setup(meta, args, budget)
            r = simulate(arrays, meta, setup, policy, warmup=args.warmup,
                         max_tokens=args.max_tokens)
            r["cache"] = budget
            r.update(bound)
            rows.append(r)
    base = {r["cache"]: r["stall_s"] for r in rows if r["policy"] in ("ondemand", "lru")}
    for r in rows:
        b = base.get(r["cache"])
        r["stall_vs_ondemand"] = (r["stall_s"] / b) if b else None
    if args.json:
        json.dump(rows, sys.stdout, indent=2, default=str)
        print()
    else:
        print(f"trace {args.trace}: {meta['n_tokens']} tokens, {meta['n_layer']} layers × "
              f"{meta['n_expert']} experts, top-{meta['top_k']}   setup: {rows[0]['setup']}"
              f"   link {rows[0]['bandwidth_gbps']:.2f} GB/s (simulated)")
        print("| cache | policy | tok/s | stall ms/token | vs ondemand | hit rate | "
              "MB moved/token | bound: stall ms/token | bound: 1 − loads/request |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            rel = f"{r['stall_vs_ondemand']:.3f}" if r["stall_vs_ondemand"] is not None else "-"
            print(f"| {r['cache']} | {r['policy']} | {r['tokens_per_s']:.1f} | "
                  f"{r['stall_ms_per_token']:.2f} | {rel} | {r['hit_rate']:.1%} | "
                  f"{r['bytes_loaded'] / r['tokens_generated'] / 1e6:.1f} | "
                  f"{r['stall_bound_ms_per_token']:.2f} | {r['min_hit_rate']:.1%} |")
        print("bound: no policy stalls less or loads fewer experts on this trace (Belady's "
              "MIN loads on a serial link, all compute overlapped)")
    if args.plot:
        _plot(rows, str(user_path(args.plot)))
    return 0


def _pyplot():
    """matplotlib.pyplot drawing to files, or an EfedgeError: it is not installed with
    efedge."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EfedgeError("--plot needs matplotlib (pip install matplotlib)") from None
    return plt


def _plot(rows, path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        pts = [(r["cache_bytes"] / 2**20, r["stall_ms_per_token"]) for r in rows
               if r["policy"] == policy]
        ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=policy)
    ax.set_xlabel("expert cache (MiB)")
    ax.set_ylabel("stall per token (ms)")
    ax.set_title(rows[0]["setup"])
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise EfedgeError(f"cannot write plot {path!r}: {os_reason(exc)}") from None
    finally:
        plt.close(fig)
