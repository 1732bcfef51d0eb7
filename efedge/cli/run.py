"""`efedge run [MODEL] -p PROMPT -n N`: generated text on stdout, timings on stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from efedge.cli.common import (
    add_chat_template_arg,
    add_model_args,
    add_sampling_args,
    format_stats,
    load_model,
    n_predict,
    not_utf8,
    read_text_file,
    sampling_kwargs,
)
from efedge.errors import EfedgeError
from efedge.generate import GenerationResult
from efedge.json_mode import check_format


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="generate text from a prompt",
                       description="Generate a continuation of a prompt.")
    add_model_args(p)
    add_chat_template_arg(p)  # (-st / --chat: the prompt through this template)
    src = p.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", default=None,
                     help="prompt text; - reads it from standard input")
    src.add_argument("-f", "--file", default=None,
                     help="read the prompt from a file (- : standard input)")
    p.add_argument("-n", "--n-predict", "--max-tokens", type=n_predict, default=128,
                   help="tokens to generate (default 128; -1: until end of text or a full "
                        "context)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--echo", action="store_true", help="print the prompt before the output")
    p.add_argument("--format", default=None, metavar="json|SCHEMA.json",
                   help="json: the output is one JSON object (JSON mode); a file: a JSON "
                        "schema the output follows")
    p.add_argument("-st", "--single-turn", "--chat", dest="chat", action="store_true",
                   help="the prompt is one user turn through the chat template (as "
                        "llama-cli -st and mlx_lm.generate); the reply is printed")
    p.add_argument("-sys", "--system-prompt", default=None, metavar="TEXT",
                   help="with --chat: a system turn first")
    p.add_argument("--prompt-cache", "--prompt-cache-file", default=None, metavar="FILE",
                   help="reuse the prompt's evaluation saved in FILE (when it starts with "
                        "the same tokens), and save it there afterwards")
    p.add_argument("--prompt-cache-all", action="store_true",
                   help="with --prompt-cache: save the generated tokens too")
    p.add_argument("--prompt-cache-ro", action="store_true",
                   help="with --prompt-cache: read FILE, never write it")
    add_sampling_args(p)
    p.set_defaults(func=main)


def _load_prompt_cache(m, path: str | None, ids: list[int]) -> None:
    """--prompt-cache: restore FILE if it exists, and say how much of it the prompt
    reuses (llama.cpp's llama-cli says the same)."""
    if path is None or not os.path.exists(os.path.expanduser(path)):
        return
    cached = m.load_state(path)
    same = next((i for i, (a, b) in enumerate(zip(cached, ids, strict=False)) if a != b),
                min(len(cached), len(ids)))
    print(f"efedge: prompt cache {path}: {same} of the prompt's {len(ids)} tokens reused",
          file=sys.stderr)


def _read_stdin() -> str:
    """The prompt piped in (`-p -` as mlx-lm reads it, `-f -`), as UTF-8."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else \
        sys.stdin.read().encode("utf-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EfedgeError(f"cannot read the prompt from standard input: not UTF-8 text "
                          f"(byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    # line ends as `-f FILE` reads them (and mlx-lm's sys.stdin.read()): universal
    # newlines, so a prompt piped from a Windows file (CR LF) gives the same tokens
    return text.replace("\r\n", "\n").replace("\r", "\n")


def output_format(value: str | None) -> str | dict | None:
    """--format: "json", or a JSON schema file read now (before the model loads), so a
    missing file, one that is not JSON or a keyword efedge does not take fails at once."""
    if value is None or value == "json":
        return value
    text = read_text_file(value, "JSON schema file")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EfedgeError(f"JSON schema file {value!r} is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise EfedgeError(f"JSON schema file {value!r} must hold a JSON object (a schema)")
    check_format(schema)
    return schema


def main(args: argparse.Namespace) -> int:
    if (args.prompt_cache_all or args.prompt_cache_ro) and args.prompt_cache is None:
        raise EfedgeError("--prompt-cache-all and --prompt-cache-ro go with --prompt-cache FILE")
    if args.system_prompt is not None and not args.chat:
        raise EfedgeError("-sys / --system-prompt goes with --chat (-st): a plain prompt is "
                          "continued as it is")
    if args.chat and args.echo:
        raise EfedgeError("--echo prints a plain prompt; with --chat the prompt is a turn of "
                          "the template")
    # the other texts from the command line, as the prompt below (a stop string that is
    # not UTF-8 could never match what the model writes)
    for text, what in [(args.system_prompt, "the system prompt"),
                       *((s, "a --stop string") for s in args.stop or ())]:
        bad = text is not None and not_utf8(text, what)
        if bad:
            raise EfedgeError(bad)
    fmt = output_format(args.format)
    if args.prompt == "-" or args.file == "-":
        prompt = _read_stdin()
    elif args.file is not None:  # read before loading: a wrong path fails at once
        prompt = read_text_file(args.file, "prompt file")
    else:
        prompt = args.prompt if args.prompt is not None else ""
        bad = not_utf8(prompt, "the prompt")
        if bad:
            raise EfedgeError(bad)
    t0 = time.perf_counter()
    with load_model(args) as m:
        load_s = time.perf_counter() - t0
        # an empty prompt is valid where the model adds a BOS token (generation starts from
        # it); without one there is nothing to condition on, and the API's ValueError would
        # surface as a traceback
        if not prompt and not m.tokenize(prompt):
            src = ("the prompt from standard input is empty" if "-" in (args.prompt, args.file)
                   else f"prompt file {args.file!r} is empty" if args.file is not None
                   else "the prompt is empty")
            raise EfedgeError(f"{src} and {m.path.name} adds no BOS token: give a prompt "
                              f"with -p TEXT or -f FILE")
        # -1, as in llama.cpp and `efedge chat`: until end of text or a full context
        # (generation stops by itself when the context fills)
        max_tokens = m.n_ctx if args.n_predict < 0 else args.n_predict
        if args.chat:
            turns = [{"role": "system", "content": args.system_prompt}] \
                if args.system_prompt is not None else []
            ids = m.chat_prompt(turns + [{"role": "user", "content": prompt}])
        else:
            ids = m.tokenize(prompt)
        _load_prompt_cache(m, args.prompt_cache, ids)
        if args.echo:
            sys.stdout.write(prompt)
        from efedge.cli.chat import HarmonyView
        from efedge.reasoning import is_harmony_template

        result = GenerationResult([], "")
        # gpt-oss's harmony channels, as efedge chat shows them (its analysis apart)
        view = HarmonyView(sys.stdout) if args.chat and fmt is None and \
            is_harmony_template(m.chat_template().source) else None
        for piece in m.stream(ids, max_tokens=max_tokens, stop=args.stop, result=result,
                              format=fmt, **sampling_kwargs(args)):
            if view is not None:
                view.push(piece)
            else:
                sys.stdout.write(piece)
            sys.stdout.flush()
        if view is not None:
            view.finish()
        sys.stdout.write("\n")
        if args.prompt_cache is not None and not args.prompt_cache_ro:
            # the prompt alone (its last token is evaluated again anyway), or all of it
            m.save_state(args.prompt_cache, None if args.prompt_cache_all else len(ids))
        s = m.stats()
        # the tokens generated, not the decode steps (the last token is never decoded)
        print(f"[ load {load_s:.2f} s | prompt {s['tokens_prompt']} tokens | generated "
              f"{len(result.tokens)} tokens ({result.finish_reason}) in {s['wall_s']:.2f} s "
              f"| stall {s['stall_s'] * 1e3:.1f} ms ]", file=sys.stderr)
        if args.stats:
            print(format_stats(s), file=sys.stderr)
    return 0
