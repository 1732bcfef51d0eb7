"""Flags shared by subcommands; names follow llama.cpp (-t, -c, --temp, --top-k …)."""

from __future__ import annotations

import argparse

import efedge


def add_model_args(p: argparse.ArgumentParser, optional: bool = True) -> None:
    if optional:
        p.add_argument("model", nargs="?", default=None,
                       help="GGUF model file (default: the embedded demo model)")
    else:
        p.add_argument("model", help="GGUF model file")
    p.add_argument("-m", "--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
    p.add_argument("-t", "--threads", type=int, default=None, help="compute threads")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context size in tokens (default: the model's, at most 4096)")
    p.add_argument("--device", default="cpu", help="cpu (default)")
    p.add_argument("--cache", default=None,
                   help="expert cache budget: bytes, 512MiB, 25%% of expert bytes "
                        "(default: all experts resident)")
    p.add_argument("--policy", default="expertflow", help="expert cache policy")
    p.add_argument("--link", default=None, help="emulated link, e.g. 8GB/s, pcie4x4, nvme")
    p.add_argument("--stats", action="store_true", help="print every counter on stderr")


def add_sampling_args(p: argparse.ArgumentParser, temp: float = 0.8) -> None:
    p.add_argument("--temp", type=float, default=temp, help=f"temperature (default {temp}; "
                   "0 = greedy)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--repeat-last-n", type=int, default=64)
    p.add_argument("-s", "--seed", type=int, default=None, help="RNG seed (default: random)")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    seed = args.seed if args.seed is None or args.seed >= 0 else None  # -1 = random
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                seed=seed)


def load_model(args: argparse.Namespace) -> efedge.Model:
    path = args.model_flag or args.model
    return efedge.load(path, device=args.device, cache=args.cache, policy=args.policy,
                       threads=args.threads, n_ctx=args.ctx_size, link=args.link)


def format_stats(stats: dict) -> str:
    return "\n".join(f"  {k:<16} {v:.4f}" if isinstance(v, float) else f"  {k:<16} {v}"
                     for k, v in stats.items())
