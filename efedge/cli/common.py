"""Flags shared by subcommands; names follow llama.cpp (-t, -c, --temp, --top-k …)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import efedge
from efedge.errors import EfedgeError


def checked_number(text: str, convert, accept, what: str, what_value: str | None = None,
                   show_text: bool = False):
    """argparse type helper: `convert(text)` (int, float), accepted by `accept(value)`.
    Errors say "expected {what}, got …" (what_value instead, if given, when the number
    parses but is out of range; the text as typed with show_text, else the value)."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not accept(value):  # (NaN fails every comparison, so every float check refuses it)
        raise argparse.ArgumentTypeError(f"expected {what_value or what}, got "
                                         f"{text if show_text else value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (a count that cannot be zero: threads, tokens)."""
    return checked_number(text, int, lambda v: v >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer ≥ 0."""
    return checked_number(text, int, lambda v: v >= 0, "a non-negative integer")


def n_predict(text: str) -> int:
    """-n of run and chat: a token count ≥ 0, or -1 for "until end of turn or the context
    is full" (what `/set max_tokens` takes too)."""
    return checked_number(text, int, lambda v: v >= -1, "an integer",
                          "-1 (until the end or a full context) or a count ≥ 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a duration, a rate)."""
    return checked_number(text, float, lambda v: math.isfinite(v) and v > 0,
                          "a positive number", "a finite positive number", show_text=True)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number ≥ 0 (a duration that may be nothing)."""
    return checked_number(text, float, lambda v: math.isfinite(v) and v >= 0,
                          "a non-negative number", "a finite number ≥ 0", show_text=True)


def probability(text: str) -> float:
    """argparse type: a probability strictly between 0 and 1."""
    return checked_number(text, float, lambda v: 0 < v < 1, "a probability in (0, 1)",
                          show_text=True)


def not_utf8(text: str, what: str) -> str | None:
    """None for valid Unicode; else "{what} is not UTF-8 text (byte 0x.. at offset N)".
    Python hands bytes that are not UTF-8 in an argument (and, on POSIX, standard input)
    over as lone surrogates U+DC80..U+DCFF (surrogateescape), which the tokenizer refuses
    with a ValueError: a traceback, had the commands not asked first."""
    offset = 0
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # the byte code - 0xDC00, escaped
            return f"{what} is not UTF-8 text (byte 0x{code - 0xDC00:02x} at offset {offset})"
        if 0xD800 <= code <= 0xDFFF:
            return f"{what} is not valid Unicode (lone surrogate U+{code:04X} at offset {offset})"
        offset += len(ch.encode("utf-8"))
    return None


def user_path(text: str) -> Path:
    """A path as the user typed it, `~` the home directory: README promises it for every
    path (cmd.exe and PowerShell leave it to the program, as does a quoted path)."""
    return Path(text).expanduser()


def read_text_file(path: str, what: str, errors: str = "strict") -> str:
    """A text file's contents (UTF-8), or an EfedgeError naming the file and the reason in
    one line: missing, a directory, unreadable, not UTF-8 (with errors="strict"). `~` is
    the home directory (Windows' cmd.exe and PowerShell leave it to the program)."""
    path = os.path.expanduser(path)
    try:
        with open(path, encoding="utf-8", errors=errors) as fh:
            return fh.read()
    except UnicodeDecodeError as exc:
        # Windows PowerShell 5's `>` and Out-File write UTF-16 with a byte-order mark
        utf16 = exc.object[:2] in (b"\xff\xfe", b"\xfe\xff")
        hint = ": it is UTF-16 (PowerShell's `>` writes it); save it as UTF-8" if utf16 else ""
        raise EfedgeError(f"cannot read {what} {path!r}: not UTF-8 text (byte "
                          f"0x{exc.object[exc.start]:02x} at offset {exc.start}){hint}") from None
    except OSError as exc:
        raise EfedgeError(f"cannot read {what} {path!r}: {os_reason(exc)}") from None


def os_reason(exc: OSError) -> str:
    """The reason part of an OSError ("No such file or directory"), without the errno and
    file name that str(exc) repeats."""
    return exc.strerror or str(exc)


def add_model_args(p: argparse.ArgumentParser, optional: bool = True) -> None:
    if optional:
        p.add_argument("model", nargs="?", default=None,
                       help="GGUF model file (default: the embedded demo model)")
    else:
        p.add_argument("model", help="GGUF model file")
    p.add_argument("-m", "--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
    p.add_argument("-t", "--threads", type=positive_int, default=None,
                   help="compute threads (default: every core; one fewer where "
                   "expertflow streams experts, leaving its predictor's helper a core)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context size in tokens (default: the model's, at most 4096)")
    p.add_argument("--device", default="cpu", help="cpu (default), or cuda / cuda:N")
    p.add_argument("--cache", default="auto",
                   help="expert cache budget: auto (default: every expert resident when the "
                        "model fits in the memory available, else a cache of what is left), "
                        "resident, bytes, 512MiB, or 25%% of expert bytes")
    p.add_argument("--policy", default="expertflow",
                   help="expert cache policy: expertflow (default), ondemand, lfu, next-layer, "
                        "fixed:H, expertflow:refine")
    p.add_argument("--policy-trace", default=None, metavar="TRACE",
                   help="seed the expert predictor (expertflow, fixed:H) with a routing "
                        "trace of this model (.npz from efedge trace)")
    p.add_argument("--link", default=None, help="emulated link, e.g. 8GB/s, pcie4x4, nvme")
    add_host_tier_args(p)
    p.add_argument("--routing", default="exact", choices=("exact", "cache-aware"),
                   help="exact (default: outputs identical to llama.cpp) or cache-aware: a "
                        "missing expert is replaced by a resident one whose router "
                        "probability is within --routing-slack (changes outputs)")
    p.add_argument("--routing-slack", type=probability, default=0.05,
                   help="router-probability slack of --routing cache-aware (default 0.05)")
    p.add_argument("--mmap", action="store_true",
                   help="compute from the model file's mapping instead of reading the "
                        "weights into memory (decode is slower; the default reads them when "
                        "they take at most half the memory available)")
    p.add_argument("--stats", action="store_true", help="print every counter on stderr")


def add_host_tier_args(p: argparse.ArgumentParser) -> None:
    """--host-cache / --disk-link: the pinned host level of --device cuda's expert cache."""
    p.add_argument("--host-cache", default=None, metavar="SIZE",
                   help="with --device cuda: a second expert-cache level in "
                        "pinned host memory between the file and VRAM, e.g. 4GB or 50%% of "
                        "expert bytes (for model files larger than host RAM)")
    p.add_argument("--disk-link", default=None, metavar="RATE",
                   help="with --host-cache: emulated disk for file → host reads, e.g. nvme, "
                        "sata, 2GB/s")


def add_sampling_args(p: argparse.ArgumentParser, temp: float = 0.8) -> None:
    p.add_argument("--temp", type=float, default=temp, help=f"temperature (default {temp}; "
                   "0 = greedy)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--repeat-last-n", type=int, default=64)
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted per occurrence in the last --repeat-last-n (0 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted once for a token in the last --repeat-last-n (0 = off)")
    p.add_argument("-s", "--seed", type=int, default=None, help="RNG seed (default: random)")
    p.add_argument("-l", "--logit-bias", type=logit_bias_arg, action="append", default=None,
                   metavar="TOKEN_ID(+/-)BIAS",
                   help="add BIAS to the token's logit, e.g. 15043+1, 15043-0.5; 15043-inf "
                        "bans it (repeatable)")


_LOGIT_BIAS = re.compile(r"(\d+)([+-])(inf|\d+(?:\.\d*)?|\.\d+)")


def logit_bias_arg(text: str) -> tuple[int, float]:
    """-l TOKEN_ID(+/-)BIAS (llama.cpp's form): (id, bias); -inf bans, +inf is refused."""
    m = _LOGIT_BIAS.fullmatch(text.strip())
    if m is None or m.group(2) + m.group(3) == "+inf":
        raise argparse.ArgumentTypeError(
            f"{text!r} is not TOKEN_ID+BIAS or TOKEN_ID-BIAS (e.g. 15043+1, 15043-inf)")
    bias = float(m.group(3))
    return int(m.group(1)), -bias if m.group(2) == "-" else bias


def sampling_kwargs(args: argparse.Namespace) -> dict:
    seed = args.seed if args.seed is None or args.seed >= 0 else None  # -1 = random
    kw = dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
              repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
              frequency_penalty=args.frequency_penalty,
              presence_penalty=args.presence_penalty, seed=seed)
    if getattr(args, "logit_bias", None):
        kw["logit_bias"] = dict(args.logit_bias)  # a token given twice: the last one
    return kw


def add_chat_template_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template", default=None, metavar="NAME_OR_FILE",
                   help="override the GGUF's chat template: a built-in name (chatml, llama-2, "
                        "llama-3) or a file holding jinja source")


def _json_object(text: str) -> dict:
    """--chat-template-kwargs: a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"enable_thinking\": "
                                         "false}'")
    return value


def add_template_kwargs_arg(p: argparse.ArgumentParser, more: str = "") -> None:
    p.add_argument("--chat-template-kwargs", type=_json_object, default=None, metavar="JSON",
                   help="variables for the chat template, e.g. '{\"enable_thinking\": false}' "
                        + more)


def chat_template_source(value: str | None) -> str | None:
    """--chat-template: a built-in name stays a name; an existing file becomes its text."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.exists():
        return value
    # a folder is refused by the read as such; an empty file would otherwise be taken for
    # the template name '' ("unknown chat template ''")
    text = read_text_file(str(path), "chat template file")
    if not text.strip():
        raise EfedgeError(f"chat template file {str(path)!r} is empty")
    return text


def model_arg(args: argparse.Namespace) -> str | None:
    """The model file given as MODEL or as -m MODEL (llama.cpp's spelling); both at once
    naming two files is an error rather than one of them silently winning."""
    flag, pos = getattr(args, "model_flag", None), args.model
    if flag is not None and pos is not None and flag != pos:
        raise EfedgeError(f"two models given: {pos!r} and -m {flag!r}; give one")
    return flag if flag is not None else pos


def load_model(args: argparse.Namespace, **kwargs) -> efedge.Model:
    """efedge.load() with the common flags; `kwargs` go to efedge.load as well."""
    path = model_arg(args)
    if getattr(args, "chat_template", None) is not None:
        kwargs.setdefault("chat_template", chat_template_source(args.chat_template))
    policy = args.policy
    if getattr(args, "policy_trace", None) is not None:
        from efedge.experts.scheduler import make_policy

        if args.cache in (None, "resident", "auto"):
            raise EfedgeError("--policy-trace seeds the expert cache's predictor: it needs "
                              "an expert cache budget (--cache SIZE)")
        policy = make_policy(policy, trace=str(Path(args.policy_trace).expanduser()))
    m = efedge.load(path, device=args.device, cache=args.cache, policy=policy,
                    threads=args.threads, n_ctx=args.ctx_size, link=args.link,
                    routing=getattr(args, "routing", "exact"),
                    routing_slack=getattr(args, "routing_slack", 0.05),
                    host_cache=getattr(args, "host_cache", None),
                    disk_link=getattr(args, "disk_link", None),
                    use_mmap=getattr(args, "mmap", False), **kwargs)
    if getattr(m, "link", None) is not None:
        # speeds and stalls measured through it are the emulated link's, not this
        # machine's: said before any of them, on every command (the README's promise)
        print(f"efedge: expert copies timed through an emulated link: {m.link}",
              file=sys.stderr)
    return m


def format_stats(stats: dict) -> str:
    return "\n".join(f"  {k:<16} {v:.4f}" if isinstance(v, float) else f"  {k:<16} {v}"
                     for k, v in stats.items())


def progress_bar(desc: str = "loading"):
    """A load-progress callback drawing a tqdm bar on a terminal's stderr; None otherwise."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(total=100, desc=desc, unit="%", leave=False, file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def update(frac: float, msg: str) -> None:
        bar.n = int(max(0.0, min(1.0, frac)) * 100)
        bar.set_postfix_str(msg, refresh=True)
        if frac >= 1.0:
            bar.close()

    return update
