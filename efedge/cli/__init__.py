"""`efedge <subcommand>`: one module per subcommand, each with add_parser() and main()."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from efedge import __version__
from efedge.errors import EfedgeError

SUBCOMMANDS = ("run", "inspect", "chat", "serve", "trace", "simulate", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="efedge",
        description="Run GGUF Mixture-of-Experts models whose experts do not fit in memory.")
    parser.add_argument("--version", action="version", version=f"efedge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what efedge does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"efedge.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="efedge: %(message)s")
    try:
        return int(args.func(args) or 0)
    except EfedgeError as exc:
        if args.verbose:  # -v: where it was raised, for a report
            traceback.print_exc()
        print(f"efedge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:
        # last resort for a file or device the commands do not wrap themselves (a full
        # disk, a permission): one line, like EfedgeError; the traceback with -v. Other
        # exceptions are bugs and stay visible.
        if args.verbose:
            traceback.print_exc()
        print(f"efedge: error: {exc}", file=sys.stderr)
        return 1
