"""`efedge perplexity [MODEL] -f TEXT`: perplexity as llama.cpp's llama-perplexity measures
it (efedge/perplexity.py) — the running estimate per chunk and the final one on stdout,
progress on stderr, or one JSON object with --json."""

from __future__ import annotations

import argparse
import json
import sys

from efedge.cli.common import (
    add_model_args,
    format_stats,
    load_model,
    positive_int,
    read_text_file,
)
from efedge.perplexity import perplexity


def add_parser(sub) -> None:
    p = sub.add_parser("perplexity", help="measure perplexity on a text (llama-perplexity "
                       "style)",
                       description="Perplexity on a text file, as llama.cpp's "
                                   "llama-perplexity measures it: chunks of -c tokens, each "
                                   "from an empty cache, the second half of each scored.")
    add_model_args(p)
    p.add_argument("-f", "--file", required=True,
                   help="the text (UTF-8; at least twice -c tokens)")
    p.add_argument("--chunks", type=positive_int, default=None,
                   help="score at most this many chunks (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    text = read_text_file(args.file, "text file")  # before loading: a wrong path fails at once
    with load_model(args) as m:
        def progress(i: int, n: int, ppl: float, seconds: float) -> None:
            if i == 0:
                print(f"perplexity: {seconds:.2f} seconds per pass - ETA "
                      f"{seconds * (n - 1) / 60:.2f} minutes", file=sys.stderr, flush=True)
            if not args.json:
                sys.stdout.write(f"[{i + 1}]{ppl:.4f},")
                sys.stdout.flush()

        print(f"perplexity: {m.path.name}, n_ctx {m.n_ctx}: scoring the second half of each "
              f"chunk", file=sys.stderr, flush=True)
        r = perplexity(m, text, n_chunks=args.chunks, on_chunk=progress)
        if args.json:
            out = {"model": str(m.path), "ppl": r.ppl, "ppl_err": r.ppl_err, "n_ctx": r.n_ctx,
                   "n_chunks": r.n_chunks, "n_tokens": r.n_tokens, "n_scored": r.n_scored,
                   "seconds": r.seconds, "running": r.running, "stats": m.stats()}
            print(json.dumps(out))
        else:
            print()
            print(f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_err:.5f}")
        print(f"[ {r.n_tokens} tokens, {r.n_chunks} chunks of {r.n_ctx}, {r.n_scored} scored "
              f"in {r.seconds:.2f} s ]", file=sys.stderr)
        if args.stats:
            print(format_stats(m.stats()), file=sys.stderr)
    return 0
