"""`efedge trace [MODEL] --text FILE -o OUT.npz`: routing traces for policies and the simulator."""

from __future__ import annotations

import argparse
import sys

from efedge.cli.common import add_model_args, load_model


def add_parser(sub) -> None:
    p = sub.add_parser("trace", help="record expert routing on a text",
                       description="Record per token and MoE layer the selected experts, their "
                                   "router probabilities and the pre-gating scores.")
    add_model_args(p)
    p.add_argument("--text", required=True, help="text file to run through the model")
    p.add_argument("-o", "--output", required=True, help="output .npz")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--horizon", type=int, default=4, help="pre-gating distances to record")
    p.add_argument("--sketch", type=int, default=0,
                   help="also store an N-dim random projection of each hidden state")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from efedge.trace import record_trace, save_trace

    with open(args.text, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    with load_model(args) as m:
        arrays = record_trace(m, text, max_tokens=args.max_tokens, horizon=args.horizon,
                              sketch_dim=args.sketch)
    save_trace(args.output, arrays, source=str(args.text))
    t, n_layer, k = arrays["experts"].shape
    print(f"traced {t} tokens × {n_layer} layers (top-{k}) → {args.output}", file=sys.stderr)
    return 0
