"""`efedge run [MODEL] -p PROMPT -n N`: generated text on stdout, timings on stderr."""

from __future__ import annotations

import argparse
import sys
import time

from efedge.cli.common import (
    add_model_args,
    add_sampling_args,
    format_stats,
    load_model,
    sampling_kwargs,
)


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="generate text from a prompt",
                       description="Generate a continuation of a prompt.")
    add_model_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", default=None, help="prompt text")
    src.add_argument("-f", "--file", default=None, help="read the prompt from a file")
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--echo", action="store_true", help="print the prompt before the output")
    add_sampling_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.file is not None:
        with open(args.file, encoding="utf-8") as fh:
            prompt = fh.read()
    else:
        prompt = args.prompt if args.prompt is not None else ""
    t0 = time.perf_counter()
    with load_model(args) as m:
        load_s = time.perf_counter() - t0
        if args.echo:
            sys.stdout.write(prompt)
        for piece in m.stream(prompt, max_tokens=args.n_predict, stop=args.stop,
                              **sampling_kwargs(args)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        s = m.stats()
        print(f"[ load {load_s:.2f} s | prompt {s['tokens_prompt']} tokens | generated "
              f"{s['tokens_generated']} tokens in {s['wall_s']:.2f} s | stall "
              f"{s['stall_s'] * 1e3:.1f} ms ]", file=sys.stderr)
        if args.stats:
            print(format_stats(s), file=sys.stderr)
    return 0
