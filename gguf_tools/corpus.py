"""`python -m gguf_tools.corpus`: the demo model's corpus (defined in efedge/corpus.py)."""

from __future__ import annotations

import argparse

from efedge.corpus import (  # noqa: F401  (re-exported for the training tools)
    DEFAULT_MAX_BYTES,
    EOT,
    HELDOUT_MOD,
    IM_END,
    IM_START,
    SPECIAL_TOKENS,
    Document,
    build_corpus,
    heldout_sample,
    heldout_text,
    split_of,
    stdlib_root,
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    ap.add_argument("--list", choices=("train", "eval"), help="print the document names")
    ap.add_argument("--heldout", type=int, metavar="CHARS",
                    help="print CHARS characters of held-out text (for efedge trace)")
    args = ap.parse_args(argv)
    if args.heldout:
        print(heldout_text(args.heldout), end="")
        return
    docs = build_corpus(args.max_bytes)
    if args.list:
        for d in docs:
            if d.split == args.list:
                print(d.name)
        return
    for split in ("train", "eval"):
        sel = [d for d in docs if d.split == split]
        print(f"{split}: {len(sel)} documents, "
              f"{sum(len(d.text.encode('utf-8')) for d in sel):,} bytes")


if __name__ == "__main__":
    main()
