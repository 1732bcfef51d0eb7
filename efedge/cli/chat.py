"""`efedge chat [MODEL]`: an interactive chat REPL in ollama's / llama-cli's style.

Replies stream token by token; after each one a line on stderr gives prompt and
generation speed, the expert-cache hit rate and the stall time per token. Ctrl-C stops
the reply in progress (what was written so far stays in the conversation); a second
Ctrl-C, or end of input at the prompt (Ctrl-D; Ctrl-Z Enter on Windows), exits. Input is
read line by line, so a pipe can drive it: `printf 'Hi\\n/bye\\n' | efedge chat`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import TextIO

import efedge
from efedge.cli.common import (
    add_chat_template_arg,
    add_model_args,
    add_sampling_args,
    add_template_kwargs_arg,
    format_stats,
    load_model,
    n_predict,
    not_utf8,
    progress_bar,
    sampling_kwargs,
)
from efedge.context_fit import fit_turns, reply_room
from efedge.errors import ContextLengthError, EfedgeError, TemplateError
from efedge.experts.streaming import StreamingExperts
from efedge.reasoning import ReasoningSplitter, is_harmony_template
from efedge.sampling import SamplingParams, check_logit_bias

HELP = """\
Commands:
  /set                 show the settings
  /set temp X          temperature (0 = greedy); also top_k, top_p, min_p,
                       repeat_penalty, repeat_last_n, frequency_penalty,
                       presence_penalty, seed (-1 = random),
                       max_tokens (-1 = until the context is full)
  /set system TEXT     replace the system prompt (clears the conversation)
  /set think, /set nothink
                       a thinking model (Qwen3 …) thinks first, or answers at once
                       (the template's enable_thinking)
  /regen               write the last reply again
  /clear               forget the conversation (keeps the system prompt)
  /stats               every counter of the model, and how full the context is
  /help, /?            this help
  /bye, /exit          leave ({eof} too)
Start a message with \"\"\" to write several lines; end it with \"\"\".
Ctrl-C stops a reply; Ctrl-C again exits."""



def eof_key() -> str:
    """The keys that end input at the prompt: Windows' console reads Ctrl-D as a character
    (^D, sent as a message) and ends input with Ctrl-Z then Enter."""
    return "Ctrl-Z Enter" if sys.platform == "win32" else "Ctrl-D"


# /set NAME → (sampling key or "max_tokens", type)
_SETTINGS: dict[str, tuple[str, type]] = {
    "temp": ("temperature", float), "temperature": ("temperature", float),
    "top_k": ("top_k", int), "top_p": ("top_p", float), "min_p": ("min_p", float),
    "repeat_penalty": ("repeat_penalty", float), "repeat_last_n": ("repeat_last_n", int),
    "frequency_penalty": ("frequency_penalty", float),
    "presence_penalty": ("presence_penalty", float),
    "seed": ("seed", int),
    "max_tokens": ("max_tokens", int), "num_predict": ("max_tokens", int),
    "n_predict": ("max_tokens", int),
}


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal",
                       description="Interactive chat using the model's chat template. "
                                   "Type /help inside for the commands.")
    add_model_args(p)
    p.add_argument("-sys", "--system-prompt", default=None, metavar="TEXT",
                   help="system prompt")
    add_chat_template_arg(p)
    add_template_kwargs_arg(p, "(/set think and /set nothink change enable_thinking)")
    # -2 and below were taken for -1 silently (`/set max_tokens -2` is refused)
    p.add_argument("-n", "--n-predict", type=n_predict, default=-1, metavar="N",
                   help="most tokens per reply (default -1: until end of turn or a full "
                        "context)")
    add_sampling_args(p, temp=0.8)
    p.set_defaults(func=main)


class HarmonyView:
    """A gpt-oss reply on the terminal: its analysis channel between "Thinking..." and
    "...done thinking." (as Ollama shows it), then the final channel; finish() → the
    answer alone, what the conversation keeps."""

    def __init__(self, out: TextIO):
        self.out, self.split = out, ReasoningSplitter()
        self.kind = ""  # what was written last: "", "reasoning" or "content"
        self.answer: list[str] = []

    def push(self, piece: str) -> None:
        self._show(self.split.push(piece))

    def finish(self) -> str:
        self._show(self.split.finish())
        if self.kind == "reasoning":
            self.out.write("\n...done thinking.\n")
        return "".join(self.answer)

    def _show(self, parts: list[tuple[str, str]]) -> None:
        for kind, text in parts:
            if kind == "reasoning" and self.kind != "reasoning":
                self.out.write("Thinking...\n")
            elif kind == "content" and self.kind == "reasoning":
                self.out.write("\n...done thinking.\n\n")
            self.kind = kind
            self.out.write(text)
            if kind == "content":
                self.answer.append(text)


class ChatREPL:
    """The conversation and its settings; `run()` is the read-reply loop."""

    def __init__(self, m: efedge.Model, *, system: str | None = None,
                 sampling: dict | None = None, max_tokens: int = -1,
                 template_kwargs: dict | None = None,
                 out: TextIO = sys.stdout, err: TextIO = sys.stderr):
        self.m = m
        self.system = system
        self.sampling = dict(sampling or {})
        # chat-template variables (--chat-template-kwargs; /set think / nothink)
        self.template_kwargs = dict(template_kwargs or {})
        self.max_tokens = max_tokens
        self.out, self.err = out, err
        self.messages: list[dict] = []
        self.interrupted = False  # the last /regen was stopped by Ctrl-C
        try:  # gpt-oss: replies in harmony channels (HarmonyView)
            self._harmony = is_harmony_template(m.chat_template().source)
        except (TemplateError, EfedgeError, AttributeError):
            # (a broken template fails at the first prompt; a stand-in model has none)
            self._harmony = False
        self.clear()

    # -- output ---------------------------------------------------------------------------
    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def note(self, text: str) -> None:
        self.out.flush()
        self.err.write(text + "\n")
        self.err.flush()

    # -- the conversation -----------------------------------------------------------------
    def clear(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _first_turn(self) -> int:
        return 1 if self.system else 0

    def fit_context(self) -> int | None:
        """Drop the oldest turns (never the system prompt or the new message) until the
        prompt plus room for a reply fits; the prompt's length, or None if even the new
        message alone cannot fit (it is then removed, and the history kept)."""
        n_ctx = self.m.n_ctx
        room = reply_room(n_ctx, self.max_tokens)
        fit = fit_turns(self._prompt, self.messages, n_ctx, room)
        if fit is None:
            alone = len(self._prompt(self.messages[:self._first_turn()] + self.messages[-1:]))
            self.messages.pop()
            self.note(f"[this message is {alone} tokens with the template; the context holds "
                      f"{n_ctx}: shorten it, or restart with a larger -c]")
            return None
        self.messages, ids, dropped = fit
        if dropped:
            self.note(f"[the conversation outgrew the {n_ctx}-token context: dropped the "
                      f"oldest {dropped} turn{'s' * (dropped != 1)}]")
        return len(ids)

    def _prompt(self, messages: list[dict]) -> list[int]:
        return self.m.chat_prompt(messages, template_kwargs=self.template_kwargs)

    def reply(self) -> bool:
        """Write the assistant's answer to the conversation; False if Ctrl-C stopped it."""
        flag = threading.Event()  # set by the first Ctrl-C

        def on_sigint(signum, frame) -> None:
            if flag.is_set():  # second Ctrl-C: leave
                raise KeyboardInterrupt
            flag.set()
            self.m.cancel()

        main_thread = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
        try:
            self._generate(flag)
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, old)
        return not flag.is_set()

    def _generate(self, interrupted: threading.Event) -> None:
        try:
            n_prompt_total = self.fit_context()
        except TemplateError as exc:
            self.messages.pop()
            self.note(f"[{exc}]")
            return
        if n_prompt_total is None:
            return
        m = self.m
        max_tokens = self.max_tokens if self.max_tokens >= 0 else m.n_ctx
        s0 = m.stats()
        t0 = time.perf_counter()
        t_first = None
        pieces: list[str] = []
        # gpt-oss's harmony channels: the analysis shown as Ollama shows it, the final
        # channel as the answer, and only the answer kept for the next turn (the template
        # writes it back into the final channel; the raw channels would nest)
        view = HarmonyView(self.out) if self._harmony else None
        try:
            if not interrupted.is_set():
                for piece in m.chat(self.messages, stream=True, max_tokens=max_tokens,
                                    template_kwargs=self.template_kwargs, **self.sampling):
                    if t_first is None:
                        t_first = time.perf_counter()
                    pieces.append(piece)
                    if view is not None:
                        view.push(piece)
                    else:
                        self.out.write(piece)
                    self.out.flush()
                    if interrupted.is_set():  # also when Ctrl-C came before the start
                        break
        except ContextLengthError as exc:
            self.messages.pop()
            self.note(f"[{exc}]")
            return
        t_end = time.perf_counter()
        reply = "".join(pieces) if view is None else view.finish()
        self.out.write("\n")
        self.out.flush()
        self.messages.append({"role": "assistant", "content": reply})
        s1 = m.stats()
        if interrupted.is_set():
            self.note("[interrupted]")
        n_gen = s1["tokens_generated"] - s0["tokens_generated"]
        if n_prompt_total + n_gen >= m.n_ctx:
            self.note("[the context is full: the reply was cut; older turns will be "
                      "dropped next time]")
        self.note(summary_line(s0, s1, t0, t_first, t_end))

    # -- commands -------------------------------------------------------------------------
    def command(self, line: str) -> int | None:
        """Run a /command; an exit code when the REPL should end, else None."""
        parts = line.split(None, 1)
        cmd, rest = parts[0].lower(), (parts[1].strip() if len(parts) > 1 else "")
        if cmd in ("/bye", "/exit", "/quit"):
            return 0
        if cmd in ("/help", "/?"):
            self.say(HELP.format(eof=eof_key()))
        elif cmd == "/clear":
            self.clear()
            self.say("Cleared the conversation.")
        elif cmd == "/regen":
            while len(self.messages) > self._first_turn() and \
                    self.messages[-1]["role"] == "assistant":
                self.messages.pop()
            if len(self.messages) > self._first_turn() and self.messages[-1]["role"] == "user":
                self.interrupted = not self.reply()
            else:
                self.say("Nothing to regenerate yet.")
        elif cmd == "/set":
            self.set(rest)
        elif cmd == "/stats":
            n = len(self._prompt(self.messages)) if self.messages else 0
            self.say(format_stats(self.m.stats()))
            self.say(f"  {'context':<16} {n} / {self.m.n_ctx} tokens, "
                     f"{len(self.messages)} messages")
        else:
            self.say(f"Unknown command {cmd!r}. Type /help for help.")
        return None

    def settings(self) -> str:
        s = dict(self.sampling, max_tokens=self.max_tokens)
        if s.get("seed") is None:
            s["seed"] = "random"
        if "enable_thinking" in self.template_kwargs:
            s["think"] = "on" if self.template_kwargs["enable_thinking"] else "off"
        text = " ".join(f"{k}={v}" for k, v in s.items())
        return text + (f"\nsystem: {self.system}" if self.system else "")

    def set(self, rest: str) -> None:
        args = rest.split(None, 1)
        if args and args[0].lower() == "parameter":  # ollama's spelling
            args = args[1].split(None, 1) if len(args) > 1 else []
        if not args:
            self.say(self.settings())
            return
        name = args[0].lower().replace("-", "_")
        value = args[1].strip() if len(args) > 1 else ""
        if name == "system":
            self.system = value or None
            self.clear()
            self.say("Set the system prompt and cleared the conversation.")
            return
        if name in ("think", "nothink"):  # ollama's commands
            self.template_kwargs["enable_thinking"] = name == "think"
            source = getattr(self.m.chat_template(), "source", "")
            if "enable_thinking" not in source:
                self.say(f"Set {name}, but this model's chat template has no "
                         "enable_thinking switch: it changes nothing here.")
            else:
                self.say("Thinking on." if name == "think" else "Thinking off.")
            return
        if name not in _SETTINGS:
            self.say(f"Unknown setting {name!r}; one of: system, think, nothink, "
                     f"{', '.join(_SETTINGS)}")
            return
        key, kind = _SETTINGS[name]
        try:
            v = kind(value)
        except ValueError:
            if key == "seed" and value.lower() in ("random", "none"):
                v = -1
            else:
                self.say(f"/set {name} needs {'an integer' if kind is int else 'a number'}, "
                         f"got {value!r}")
                return
        if key == "max_tokens":
            if v < -1:
                self.say("max_tokens must be -1 (until the context is full) or >= 0")
                return
            self.max_tokens = v
        else:
            if key == "seed" and v < 0:
                v = None
            new = dict(self.sampling, **{key: v})
            try:
                SamplingParams(**new).validate()
            except EfedgeError as exc:
                self.say(str(exc))
                return
            self.sampling = new
        self.say(f"Set {key} to {'random' if v is None else v}.")

    # -- the loop -------------------------------------------------------------------------
    def read_message(self) -> str:
        """One message: a line, or several between triple quotes. EOFError at the end."""
        line = input(">>> ")
        stripped = line.strip()
        if not stripped.startswith('"""'):
            return line
        body = stripped[3:]
        if body.endswith('"""'):
            return body[:-3]
        lines = [body] if body else []
        while True:
            try:
                more = input("... ")
            except EOFError:  # a piped script without its closing quotes, or Ctrl-D
                self.note('[end of input inside a """ message: it was not sent]')
                raise
            if more.rstrip().endswith('"""'):
                lines.append(more.rstrip()[:-3])
                return "\n".join(lines)
            lines.append(more)

    def run(self) -> int:
        last_was_interrupt = False
        while True:
            try:
                text = self.read_message()
            except EOFError:
                self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                self.out.write("\n")
                if last_was_interrupt:
                    return 130
                last_was_interrupt = True
                self.note(f"(Ctrl-C again or {eof_key()} or /bye to exit)")
                continue
            last_was_interrupt = False
            bad = not_utf8(text, "the message")
            if bad:  # the tokenizer would refuse it with a traceback
                self.note(f"[{bad}: ignored]")
                continue
            if not text.strip():
                continue
            try:
                if text.lstrip().startswith("/") and "\n" not in text:
                    self.interrupted = False
                    code = self.command(text.strip())
                    if code is not None:
                        return code
                    last_was_interrupt = self.interrupted
                    continue
                self.messages.append({"role": "user", "content": text})
                last_was_interrupt = not self.reply()
            except KeyboardInterrupt:  # the second Ctrl-C during a reply
                self.out.write("\n")
                return 130


def _rate(n: int, dt: float | None) -> str:
    return f"{n / dt:.1f} t/s" if dt and dt > 0 and n > 0 else "- t/s"


def summary_line(s0: dict, s1: dict, t0: float, t_first: float | None, t_end: float) -> str:
    """`[ prompt … t/s | generation … t/s | experts …% hit | stall … ms/token ]`.

    Timed here: prompt = start → first text, generation = first text → end. Token counts,
    expert hits and stall come from the model's counters (only newly evaluated prompt
    tokens count: the cached prefix of the conversation is reused)."""
    d = {k: s1[k] - s0[k] for k in ("tokens_prompt", "tokens_generated", "hits",
                                    "expert_requests", "stall_s")}
    t_first = t_first if t_first is not None else t_end
    n_p, n_g = d["tokens_prompt"], d["tokens_generated"]
    hit = (f"{100.0 * d['hits'] / d['expert_requests']:.1f}% hit" if d["expert_requests"]
           else "n/a")
    stall = d["stall_s"] * 1e3 / max(n_g, 1)
    return (f"[ prompt: {n_p} tokens, {_rate(n_p, t_first - t0)} | generation: {n_g} tokens, "
            f"{_rate(n_g, t_end - t_first)} | experts: {hit} | stall: {stall:.2f} ms/token ]")


def main(args: argparse.Namespace) -> int:
    from efedge.api_chat import check_template_kwargs

    bad = args.system_prompt and not_utf8(args.system_prompt, "the system prompt")
    if bad:
        raise EfedgeError(bad)
    try:
        # a byte that is not UTF-8 in a line read (a Latin-1 file piped in) arrives escaped
        # and is refused with a note (ChatREPL.run), whatever PYTHONIOENCODING says: strict
        # decoding ended the chat with a UnicodeDecodeError
        sys.stdin.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError, OSError):  # not a text stream, or already read
        pass
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass  # Windows has none: its console edits lines and keeps history itself
    with load_model(args, progress=progress_bar()) as m:
        sampling = sampling_kwargs(args)
        SamplingParams(**sampling).validate()
        check_logit_bias(sampling.get("logit_bias"), m.config.n_vocab)  # -l ids
        kwargs = check_template_kwargs(args.chat_template_kwargs)
        repl = ChatREPL(m, system=args.system_prompt, sampling=sampling,
                        max_tokens=args.n_predict, template_kwargs=kwargs)
        repl._prompt([{"role": "user", "content": "hi"}])  # a broken template fails now
        c = m.config
        experts = f", {c.n_expert} experts ({c.n_expert_used} active)" if c.is_moe else ""
        if isinstance(m._experts, StreamingExperts):  # (a budget, or auto on a model
            # larger than the memory; resident experts count as a cache of all of them)
            experts += f", expert cache {m.stats()['cache_bytes'] / 2**20:.0f} MiB"
        repl.note(f"efedge chat: {m.path.name} ({c.arch}{experts}), context {m.n_ctx} "
                  f"tokens. /help for commands, /bye to exit.")
        code = repl.run()
        if args.stats:
            repl.note(format_stats(m.stats()))
        return code
