"""`efedge trace [MODEL] --text FILE -o OUT.npz`: routing traces for policies and the simulator."""

from __future__ import annotations

import argparse
import sys

from efedge.cli.common import (
    add_model_args,
    load_model,
    non_negative_int,
    os_reason,
    positive_int,
    read_text_file,
    user_path,
)
from efedge.errors import EfedgeError


def add_parser(sub) -> None:
    p = sub.add_parser("trace", help="record expert routing on a text",
                       description="Record per token and MoE layer the selected experts, their "
                                   "router probabilities and the pre-gating scores.")
    add_model_args(p)
    p.add_argument("--text", required=True, help="text file to run through the model")
    p.add_argument("-o", "--output", required=True, help="output .npz")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="stop after this many tokens")
    p.add_argument("--horizon", type=non_negative_int, default=4,
                   help="pre-gating distances to record (default 4)")
    p.add_argument("--sketch", type=non_negative_int, default=0,
                   help="also store an N-dim random projection of each hidden state "
                        "(default 0: none)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from efedge.trace import record_trace, save_trace

    # undecodable bytes become U+FFFD, said on stderr: a trace of slightly damaged text is
    # still a trace; UTF-16 (PowerShell's `>`) is refused, as run -f does: it is no text
    try:
        text = read_text_file(args.text, "text file")
    except EfedgeError as exc:
        if "not UTF-8" not in str(exc) or "UTF-16" in str(exc):
            raise
        print(f"efedge: warning: {str(exc).replace('cannot read ', '', 1)}: its "
              "undecodable bytes are read as U+FFFD",
              file=sys.stderr)
        text = read_text_file(args.text, "text file", errors="replace")
    if not text:
        raise EfedgeError(f"text file {args.text!r} is empty: nothing to trace")
    # the model run can take long: a directory that is not there, or an output that is a
    # directory, fails before it
    output = user_path(args.output)
    out_dir = output.parent
    if not out_dir.is_dir():
        raise EfedgeError(f"cannot write trace {args.output!r}: directory {str(out_dir)!r} "
                          f"does not exist")
    if output.is_dir():
        raise EfedgeError(f"cannot write trace {args.output!r}: it is a directory (name the "
                          f".npz file to write)")
    with load_model(args) as m:
        arrays = record_trace(m, text, max_tokens=args.max_tokens, horizon=args.horizon,
                              sketch_dim=args.sketch)
    try:
        save_trace(output, arrays, source=str(args.text))
    except OSError as exc:
        raise EfedgeError(f"cannot write trace {args.output!r}: {os_reason(exc)}") from None
    t, n_layer, k = arrays["experts"].shape
    print(f"traced {t} tokens × {n_layer} layers (top-{k}) → {args.output}", file=sys.stderr)
    return 0
