"""`efedge <subcommand>`: one module per subcommand, each with add_parser() and main()."""

from __future__ import annotations

import argparse
import codecs
import errno
import importlib
import logging
import os
import sys
import traceback

from efedge import __version__
from efedge.errors import EfedgeError

SUBCOMMANDS = ("run", "inspect", "chat", "serve", "perplexity", "trace", "simulate", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="efedge",
        description="Run GGUF Mixture-of-Experts models whose experts do not fit in memory.")
    parser.add_argument("--version", action="version", version=f"efedge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what efedge does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"efedge.cli.{name}").add_parser(sub)
    for p in sub.choices.values():
        # also after the command (`efedge run … -v`, as llama.cpp and mlx-lm take it);
        # SUPPRESS: absent there, it leaves a -v given before the command as it is
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log what efedge does")
    parser.commands = sub.choices  # (main names a command's own usage in its errors)
    return parser


def utf8_stdio() -> None:
    """Generated text may hold any character. Windows gives a pipe or a file the ANSI code
    page (cp1252 …): the first character it lacks was a UnicodeEncodeError mid-generation,
    and UTF-8 piped in (`efedge chat < msgs.txt`) was read as cp1252. There streams that
    are not a console read and write UTF-8, as llama.cpp does (a console is UTF-16 to
    Python already). Elsewhere a non-UTF-8 locale replaces what it cannot write instead of
    failing. PYTHONIOENCODING, when set, is the user's choice and wins."""
    if os.environ.get("PYTHONIOENCODING"):
        return
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        enc = getattr(stream, "encoding", None)
        try:
            if enc is None or codecs.lookup(enc).name == "utf-8" \
                    or not hasattr(stream, "reconfigure"):
                continue
            if sys.platform == "win32" and not stream.isatty():
                stream.reconfigure(encoding="utf-8")
            elif stream is not sys.stdin:
                stream.reconfigure(errors="replace")
        except (LookupError, ValueError, OSError):  # a closed or already-read stream
            pass


def _stdout_gone() -> bool:
    """Whether writing to stdout fails now (its pipe closed)."""
    try:
        sys.stdout.flush()
    except OSError:
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:  # closed by the caller (`>&-`): write to nowhere,
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # not a traceback
    utf8_stdio()
    try:
        parser = build_parser()  # (imports the subcommands: numba, a few tenths of a second)
    except KeyboardInterrupt:  # Ctrl-C right after the command was typed: no traceback
        print("", file=sys.stderr)
        return 130
    args, extra = parser.parse_known_args(argv)
    if extra:
        hint = ""
        if getattr(args, "command", None) == "bench":
            # (`--policies ondemand expertflow`, `--cache 25% 50%`: the space-separated
            # lists of benchmarks/policies.py, where bench takes llama-bench's commas)
            hint = (" (efedge bench takes lists comma-separated, as llama-bench does: "
                    "e.g. --cache 25%,50% --policies ondemand,expertflow)")
        # the command's usage and `efedge run: error:`, as for a bad value of its flags
        # (argparse leaves unknown flags to the top parser, which shows only its own)
        own = parser.commands.get(getattr(args, "command", None), parser)
        own.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
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
        if sys.platform == "win32" and exc.errno == errno.EINVAL and _stdout_gone():
            # Windows reports a pipe whose reader left (`efedge run … | more`, quit early)
            # as EINVAL, not EPIPE: the same quiet end as BrokenPipeError above
            return 0
        # last resort for a file or device the commands do not wrap themselves (a full
        # disk, a permission): one line, like EfedgeError; the traceback with -v. Other
        # exceptions are bugs and stay visible.
        if args.verbose:
            traceback.print_exc()
        print(f"efedge: error: {exc}", file=sys.stderr)
        return 1
