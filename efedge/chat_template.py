"""Chat templates: the jinja source in a GGUF's `tokenizer.chat_template`, rendered safely.

The environment copies Hugging Face transformers' `_compile_jinja_template` (the
reference every GGUF template is written against): an immutable sandbox with
trim_blocks / lstrip_blocks and loop controls, `raise_exception`, `strftime_now`, a
non-ASCII-preserving `tojson`, and a pass-through `{% generation %}` tag.

Templates come from untrusted files (CVE-2024-34359 was code execution through an
unsandboxed GGUF template), so the sandbox is stricter than jinja's default: touching
an unsafe attribute (`__class__`, `__globals__`, …) raises instead of rendering as
empty; no string or list a template builds, nor its output, may pass 10 million items
(operations that multiply — `*`, `ljust(N)`, widths in `%` / `format`, `join`, `replace`
— are refused before they allocate, the rest, `~` and `+` included, are checked after
each step); `**` is bounded too; and one render's `range()` calls together may yield at
most a million items and it may make at most 200,000 calls, so neither nested loops nor
recursive macros can hang a server.

    tpl = ChatTemplate.from_metadata(gguf.metadata) or get_template("chatml")
    prompt = tpl.render([{"role": "user", "content": "Hi"}])
    # Model.chat_prompt tokenizes it as llama.cpp does: a BOS the template writes first is
    # dropped where the vocab adds one, then the vocab's specials are added.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError, safe_range

from efedge.errors import TemplateError
from efedge.tokenizer import lone_surrogate

__all__ = ["ChatTemplate", "FALLBACK_TEMPLATES", "get_template"]

_HINT = ("a built-in template can be chosen instead: chat_template=\"chatml\" in Python, "
         "--chat-template chatml on the command line (built-ins: {names})")

_MAX_SEQ = 10_000_000  # longest str/list that `*` may build (elements)
_MAX_POW_BITS = 1 << 20  # largest integer `**` may build (bits)
_MAX_RANGE_ITEMS = 1_000_000  # items all range() calls of one render may yield together
_MAX_CALLS = 200_000  # calls (macros, methods, functions) one render may make
# a width or precision of 10^7 or more: in a %-format, in a str.format field
_PCT_WIDE = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(?:\d{8,}|\d*\.\d{8,})")
_FMT_WIDE = re.compile(r"\{[^{}]*:[^{}]*\d{8,}[^{}]*\}")
_budget = threading.local()  # range items and calls left to the render on this thread


# -- the environment ----------------------------------------------------------------------
class _GenerationTag(Extension):
    """`{% generation %}…{% endgeneration %}` (assistant-mask markers): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _sized(value: Any) -> Any:
    """value, unless it is a str or sequence longer than _MAX_SEQ (SecurityError). Checked
    after each operation that can only double what it was given (`~`, `+`, most filters
    and str methods): every input was checked, so nothing grows past twice the bound."""
    if isinstance(value, str | list | tuple) and len(value) > _MAX_SEQ:
        raise SecurityError(f"the template built a {type(value).__name__} of {len(value)} "
                            f"items (at most {_MAX_SEQ})")
    return value


def _joined_len(items: Any, sep: str) -> int:
    return sum(len(x) if isinstance(x, str) else 8 for x in items) + len(sep) * len(items)


def _precheck(name: str, value: Any, args: tuple, kwargs: dict,
              method: bool) -> tuple[Any, tuple]:
    """Refuse the operations whose result can outgrow their inputs many times over (join,
    replace, centring and indenting, printf widths) before they allocate. `value`: the
    str a method belongs to, or a filter's input. Returns (value, args) with a one-shot
    iterable to be joined made a list (it is read twice)."""
    if name == "join":
        if method:  # sep.join(items)
            if args and not isinstance(args[0], str | list | tuple):
                args = (list(args[0]), *args[1:])
            items, sep = (args[0] if args else ()), value
        else:  # items|join(sep)
            if not isinstance(value, str | list | tuple):
                value = list(value)
            items, sep = value, str(args[0] if args else kwargs.get("d", ""))
        if _joined_len(items, sep) > _MAX_SEQ:
            raise SecurityError(f"join would build a string of over {_MAX_SEQ} characters")
    elif name == "replace" and isinstance(value, str) and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        if len(new) > len(old):
            n = value.count(old) if old else len(value) + 1
            if len(value) + n * (len(new) - len(old)) > _MAX_SEQ:
                raise SecurityError(f"replace would build a string of over {_MAX_SEQ} "
                                    "characters")
    elif name in ("center", "indent"):
        width = args[0] if args else kwargs.get("width", 0)
        lines = value.count("\n") + 1 if name == "indent" and isinstance(value, str) else 1
        if isinstance(width, int) and width * lines > _MAX_SEQ:
            raise SecurityError(f"{name} would build a string of over {_MAX_SEQ} characters")
    elif name == "format" and not method and isinstance(value, str):
        _check_pct_width(value, "format")  # the filter is value % args
    return value, args


def _check_pct_width(fmt: str, what: str) -> None:
    """A %-format with a width or precision of 10 million or more builds that much."""
    if _PCT_WIDE.search(fmt):
        raise SecurityError(f"{what} with a width of 10 million or more")


def _checked_filter(name: str, f: Callable) -> Callable:
    """A filter with _precheck before it and _sized after it (jinja's pass_* markers are
    kept: wraps copies the function's attributes)."""
    lead = 0 if getattr(f, "jinja_pass_arg", None) is None else 1  # context / env first

    @functools.wraps(f)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if len(args) > lead:
            value, rest = _precheck(name, args[lead], args[lead + 1:], kwargs, False)
            args = (*args[:lead], value, *rest)
        return _sized(f(*args, **kwargs))

    return checked


class _CheckedConcat(CodeGenerator):
    """`a ~ b` compiled as environment.checked(a ~ b): jinja has no hook for it."""

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        self.write("environment.checked(")
        super().visit_Concat(node, frame)
        self.write(")")


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%", "+"})
    code_generator_class = _CheckedConcat
    checked = staticmethod(_sized)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # jinja returns an Undefined that prints as "" — we stop the render instead.
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if (isinstance(seq, str | list | tuple) and isinstance(n, int)
                        and len(seq) * n > _MAX_SEQ):
                    raise SecurityError(f"`*` would build a sequence of {len(seq) * n} items")
        elif (operator == "**" and isinstance(left, int) and isinstance(right, int)
              and right > 0 and abs(left) > 1 and left.bit_length() * right > _MAX_POW_BITS):
            raise SecurityError(f"`**` would build an integer of ~{left.bit_length() * right} bits")
        if operator == "%" and isinstance(left, str):
            _check_pct_width(left, "`%`")
        return _sized(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        # str methods whose result grows with an argument ('a'.ljust(N), 'x'.join(big),
        # replace) are refused before they run; every result is checked after
        left = getattr(_budget, "calls", _MAX_CALLS) - 1
        if left < 0:  # a macro calling itself twice per level runs 2^depth calls
            raise SecurityError(f"the template made over {_MAX_CALLS} calls in one render")
        _budget.calls = left
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            if any(isinstance(a, int) and a > _MAX_SEQ for a in (*args, *kwargs.values())):
                raise SecurityError(f"str.{getattr(__obj, '__name__', '?')} would build a "
                                    "string of over 10 million characters")
            _, args = _precheck(getattr(__obj, "__name__", ""), owner, args, kwargs, True)
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Any:
        # '{:>N}'.format(x): jinja hands format methods out wrapped, so the width is
        # checked here, where the method is looked up
        owner = getattr(value, "__self__", None)
        if isinstance(owner, str) and _FMT_WIDE.search(owner):
            raise SecurityError("str.format with a width of 10 million or more")
        return super().wrap_str_format(value)


def _range(*args: int) -> range:
    """range() with jinja's per-call limit and a budget shared by the whole render."""
    r = safe_range(*args)
    left = getattr(_budget, "left", _MAX_RANGE_ITEMS) - len(r)
    if left < 0:
        raise SecurityError(f"the template's loops would run over {_MAX_RANGE_ITEMS} "
                            "range() items in one render")
    _budget.left = left
    return r


def _render_bounded(template: jinja2.Template, ctx: dict) -> str:
    """template.render(**ctx) with a fresh range() and call budget, its output at most
    _MAX_SEQ characters (a loop printing a large string a million times would pass every
    other bound)."""
    _budget.left, _budget.calls = _MAX_RANGE_ITEMS, _MAX_CALLS
    out, n = [], 0
    for piece in template.generate(**ctx):
        n += len(piece)
        if n > _MAX_SEQ:
            raise SecurityError(f"the template's output passed {_MAX_SEQ} characters")
        out.append(piece)
    return "".join(out)


def _raise_exception(message: str) -> None:
    raise TemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes <, >, & and ' for HTML; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _make_env() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                   extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = _range
    env.filters = {name: _checked_filter(name, f) for name, f in env.filters.items()}
    return env


_ENV = _make_env()


# -- built-in templates ---------------------------------------------------------------
# Each renders content given as a string, None, or a list of {"type": "text"} parts,
# joined by newlines as llama.cpp joins them for its built-in templates (and as render()
# joins them for model templates that only take strings).
_TEXT_MACRO = (
    "{%- macro text(m) -%}"
    "{%- if m.content is string -%}{{ m.content }}"
    "{%- elif m.content is iterable -%}{{ m.content | map(attribute='text') | join('\\n') }}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)

FALLBACK_TEMPLATES: dict[str, str] = {
    # ChatML (Qwen, Yi, OLMoE-instruct, …): llama.cpp's "chatml"
    "chatml": _TEXT_MACRO + (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message.role + '\\n' + text(message) + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
    # Llama 2 / Mistral-instruct style [INST] turns with an optional <<SYS>> block
    "llama-2": _TEXT_MACRO + (
        "{%- if messages and messages[0].role == 'system' -%}"
        "{%- set system = text(messages[0]) -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
        "{%- for message in turns -%}"
        "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}"
        "{%- endif -%}"
        "{%- set body = text(message) | trim -%}"
        "{%- if loop.first and system is not none -%}"
        "{%- set body = '<<SYS>>\\n' + (system | trim) + '\\n<</SYS>>\\n\\n' + body -%}"
        "{%- endif -%}"
        "{%- if message.role == 'user' -%}{{ bos_token + '[INST] ' + body + ' [/INST]' }}"
        "{%- else -%}{{ ' ' + body + ' ' + eos_token }}{%- endif -%}"
        "{%- endfor -%}"
    ),
    # Llama 3 / 3.1 header format
    "llama-3": _TEXT_MACRO + (
        "{{ bos_token }}"
        "{%- for message in messages -%}"
        "{{ '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n'"
        " + (text(message) | trim) + '<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
    ),
}

_ALIASES = {"llama2": "llama-2", "llama3": "llama-3", "chat-ml": "chatml"}


def _hint() -> str:
    return _HINT.format(names=", ".join(FALLBACK_TEMPLATES))


# -- messages -----------------------------------------------------------------------------
def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list | tuple):
        raise TemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TemplateError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise TemplateError(f"messages[{i}]['role'] must be a non-empty string, got {role!r}")
        _check_text(role, f"messages[{i}]['role']")
        content = m.get("content")
        if isinstance(content, str):
            _check_text(content, f"messages[{i}]['content']")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list | tuple):
            raise TemplateError(
                f"messages[{i}]['content'] must be a string, None or a list of text parts, "
                f"got {type(content).__name__}")
        for j, part in enumerate(content):
            if (not isinstance(part, Mapping) or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)):
                raise TemplateError(
                    f"messages[{i}]['content'][{j}] must be {{'type': 'text', 'text': str}} "
                    f"(only text is supported), got {part!r}")
            _check_text(part["text"], f"messages[{i}]['content'][{j}]['text']")


def _check_text(text: str, where: str) -> None:
    """A lone surrogate (JSON's "\\ud800" makes one) has no UTF-8: name the message now
    rather than an offset into the rendered prompt when it is tokenized."""
    bad = lone_surrogate(text)
    if bad:
        raise TemplateError(f"{where} has a lone surrogate {bad.group()!r} at index "
                            f"{bad.start()} (not valid Unicode)")


def _flatten_content(message: Mapping) -> dict:
    """The message with its content as one string: text parts joined by newlines, None
    as "" (for templates that only take strings)."""
    out = dict(message)
    content = out.get("content")
    if content is None:
        out["content"] = ""
    elif not isinstance(content, str):
        out["content"] = "\n".join(part["text"] for part in content)
    return out


# -- the template -------------------------------------------------------------------------
class ChatTemplate:
    """A compiled, sandboxed chat template.

    `source` is jinja text (HF / GGUF conventions); `bos_token` / `eos_token` are the
    texts the template sees as `bos_token` / `eos_token`. Raises TemplateError when the
    source does not compile.
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "",
                 name: str | None = None):
        if not isinstance(source, str):
            raise TemplateError(f"chat template source must be a string, got "
                                f"{type(source).__name__}")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.name = name
        self._takes_parts: bool | None = None  # probed on first need (takes_text_parts)
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(
                f"chat template{self._label()} failed to compile: {exc.message} "
                f"(template line {exc.lineno}); {_hint()}") from exc
        except Exception as exc:  # anything else the compiler throws
            raise TemplateError(f"chat template{self._label()} failed to compile: "
                                f"{type(exc).__name__}: {exc}; {_hint()}") from exc

    def takes_text_parts(self) -> bool:
        """Whether the template renders content given as a list of text parts (probed
        once with a marker text). Many model templates only take a string: they fail on
        a list, or print its repr. For those, render() joins the parts' texts with
        newlines and passes None as "", as llama.cpp does for such templates; OpenAI
        clients send either form."""
        if self._takes_parts is None:
            marker = "efedge-probe-7f3a"
            probe = [{"role": "user", "content": [{"type": "text", "text": marker}]}]
            try:
                out = _render_bounded(self._template, dict(
                    messages=probe, tools=None, documents=None, add_generation_prompt=True,
                    bos_token=self.bos_token, eos_token=self.eos_token))
                self._takes_parts = marker in out and "'text'" not in out
            except Exception:  # a template that cannot take a list at all
                self._takes_parts = False
        return self._takes_parts

    def _label(self) -> str:
        return f" {self.name!r}" if self.name else ""

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, {len(self.source)} chars)"

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any],
                      tokenizer_pieces: Callable[[int], str] | None = None,
                      *, name: str | None = None, bos_token: str | None = None,
                      eos_token: str | None = None) -> ChatTemplate | None:
        """The template stored in GGUF metadata, or None when the file has none.

        Reads `tokenizer.chat_template` (or `tokenizer.chat_template.{name}`, e.g.
        name="tool_use"). The bos/eos texts are `bos_token` / `eos_token` where given
        (the model's tokenizer's: its ids with the vocab's defaults, as llama.cpp renders
        them), else `tokenizer.ggml.tokens[id]` for `tokenizer.ggml.bos_token_id` /
        `eos_token_id`, else `tokenizer_pieces(id)`.
        """
        key = "tokenizer.chat_template" + (f".{name}" if name else "")
        source = meta.get(key)
        if isinstance(source, bytes | bytearray):
            source = bytes(source).decode("utf-8", errors="replace")
        if source is None or (isinstance(source, str) and not source.strip()):
            return None
        if not isinstance(source, str):
            raise TemplateError(f"metadata key {key!r} must be a string, got "
                                f"{type(source).__name__}; {_hint()}")
        tokens = meta.get("tokenizer.ggml.tokens")

        def piece(id_key: str) -> str:
            tid = meta.get(id_key)
            if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
                return ""
            if isinstance(tokens, list | tuple) and tid < len(tokens):
                return str(tokens[tid])
            if tokenizer_pieces is not None:
                try:
                    return str(tokenizer_pieces(tid))
                except Exception:  # a bad id in the file: render without it
                    return ""
            return ""

        if bos_token is None:
            bos_token = piece("tokenizer.ggml.bos_token_id")
        if eos_token is None:
            eos_token = piece("tokenizer.ggml.eos_token_id")
        return cls(source, bos_token=bos_token, eos_token=eos_token, name=name or "gguf")

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None, **kwargs: Any) -> str:
        """The prompt text for `messages` (HF `apply_chat_template(tokenize=False)`).

        Extra keyword arguments (documents, enable_thinking, …) become template
        variables. Raises TemplateError for malformed messages or a failed render.
        """
        _check_messages(messages)
        if not self.takes_text_parts() and any(
                not isinstance(m.get("content"), str) for m in messages):
            messages = [_flatten_content(m) for m in messages]
        if tools is not None and not isinstance(tools, list | tuple):
            raise TemplateError(f"tools must be a list or None, got {type(tools).__name__}")
        ctx: dict[str, Any] = {"messages": messages, "tools": tools, "documents": None,
                               "add_generation_prompt": add_generation_prompt,
                               "bos_token": self.bos_token, "eos_token": self.eos_token}
        ctx.update(kwargs)
        where = f"chat template{self._label()}"
        try:
            return _render_bounded(self._template, ctx)
        except TemplateError as exc:  # raise_exception() inside the template
            raise TemplateError(f"{where} raised an error: {exc}; {_hint()}") from exc
        except SecurityError as exc:
            raise TemplateError(f"{where} was stopped by the sandbox: {exc}; {_hint()}") from exc
        except Exception as exc:
            raise TemplateError(f"{where} failed to render: {type(exc).__name__}: {exc}; "
                                f"{_hint()}") from exc


def get_template(name_or_source: str, *, bos_token: str = "",
                 eos_token: str = "") -> ChatTemplate:
    """A built-in template by name ("chatml", "llama-2", "llama-3"; also "llama2",
    "llama3"), or a ChatTemplate compiled from jinja source."""
    if not isinstance(name_or_source, str):
        raise TemplateError(f"chat template must be a name or jinja source, got "
                            f"{type(name_or_source).__name__}")
    key = name_or_source.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key in FALLBACK_TEMPLATES:
        return ChatTemplate(FALLBACK_TEMPLATES[key], bos_token=bos_token,
                            eos_token=eos_token, name=key)
    if "{{" in name_or_source or "{%" in name_or_source:
        return ChatTemplate(name_or_source, bos_token=bos_token, eos_token=eos_token)
    raise TemplateError(f"unknown chat template {name_or_source!r}; built-in templates: "
                        f"{', '.join(FALLBACK_TEMPLATES)} (or pass jinja source)")
