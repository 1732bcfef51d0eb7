"""OpenAI-style tool calling for chat templates in the Hermes `<tool_call>` format
(Qwen2.5 / Qwen3, Hermes 2 / 3 fine-tunes, and the MoE models built on them).

The template renders the offered tools (OpenAI's `[{"type": "function", "function":
{...}}]`) into the system prompt; the model answers a call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

possibly after some text, possibly several. `parse_tool_calls` turns such a reply into
(content, calls) in OpenAI's shape; `CallStream` does the same for a reply that arrives in
pieces, passing text on until a call may be starting; `forced_call_grammar` is the grammar
that makes the model write exactly one call (tool_choice "required" or a named tool).

A block that does not parse (bad JSON, a name not offered, arguments that are no object)
stays in the content, as llama.cpp leaves it: text is never dropped silently. A
`<think>…</think>` part stays in the content too, and a `<tool_call>` inside it is the
model thinking about a call, not making one.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Mapping

from efedge.errors import ArgumentError, TemplateError, UnsupportedModelError
from efedge.generate import prefix_tail
from efedge.reasoning import (
    H_MESSAGE,
    ReasoningSplitter,
    is_harmony_reply,
    is_harmony_template,
)

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FORMATS = ("Hermes <tool_call> blocks (Qwen2.5, Qwen3, Hermes 2/3) and gpt-oss's harmony "
           "calls")
HARMONY_FORCED = ("tool_choice \"required\" or a named function is not supported for "
                  "gpt-oss's harmony calls (its grammar is written for <tool_call> blocks); "
                  "use \"auto\"")
_H_RECIPIENT = re.compile(r"\bto=functions\.([^\s<]+)")
_NO_ARGS = {"type": "object", "properties": {}, "additionalProperties": False}


# -- the offered tools ------------------------------------------------------------------
def check_tools(tools) -> list[dict] | None:
    """`tools` as OpenAI sends them: None or [] (no tools: None), else a list of
    {"type": "function", "function": {"name": str, "description"?: str, "parameters"?:
    object}} with unique names. An ArgumentError names the first bad entry."""
    if tools is None:
        return None
    if not isinstance(tools, list | tuple):
        raise ArgumentError(f"tools must be a list, got {type(tools).__name__}")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise ArgumentError(f"{where} must be {{\"type\": \"function\", \"function\": "
                                f"{{...}}}}, got {json.dumps(tool, default=str)[:80]}")
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise ArgumentError(f"{where}.function must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ArgumentError(f"{where}.function.name must be a non-empty string")
        if name in seen:
            raise ArgumentError(f"{where}.function.name {name!r} is offered twice")
        seen.add(name)
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ArgumentError(f"{where}.function.description must be a string")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], Mapping):
            raise ArgumentError(f"{where}.function.parameters must be an object (a JSON "
                                "schema)")
    return [dict(t) for t in tools] or None


def tool_names(tools: list[dict] | None) -> list[str]:
    return [t["function"]["name"] for t in tools or ()]


def resolve_choice(tool_choice, tools: list[dict] | None) -> tuple[str, list[str]]:
    """(mode, names) for a tool_choice: mode "none" (no tools rendered, nothing parsed),
    "auto" (the model decides) or "forced" (exactly one call of one of `names`)."""
    if tool_choice is None:
        tool_choice = "auto"
    if tool_choice in ("none", "auto"):
        return ("auto" if tools else "none") if tool_choice == "auto" else "none", []
    if not tools:
        raise ArgumentError(f"tool_choice {json.dumps(tool_choice, default=str)[:60]} "
                            "needs tools")
    if tool_choice == "required":
        return "forced", tool_names(tools)
    fn = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    if (not isinstance(fn, Mapping) or tool_choice.get("type") != "function"
            or not isinstance(fn.get("name"), str)):
        raise ArgumentError("tool_choice must be \"none\", \"auto\", \"required\" or "
                            "{\"type\": \"function\", \"function\": {\"name\": ...}}, got "
                            f"{json.dumps(tool_choice, default=str)[:60]}")
    if fn["name"] not in tool_names(tools):
        raise ArgumentError(f"tool_choice names {fn['name']!r}, which is not in tools")
    return "forced", [fn["name"]]


def check_template(template) -> None:
    """UnsupportedModelError unless the chat template writes Hermes tool calls or is
    gpt-oss's harmony template (which renders the tools itself)."""
    if OPEN not in template.source and not is_harmony_template(template.source):
        raise UnsupportedModelError(
            f"tools need a chat template that renders them; efedge reads {FORMATS}, and "
            f"this model's template{'' if not template.name else ' ' + repr(template.name)} "
            "has no <tool_call> format (pass one with chat_template= / --chat-template)")


# -- rendering a conversation ---------------------------------------------------------------
def render_messages(messages):
    """The messages with each assistant `tool_calls` entry in the forms templates read:
    `tool_call.function.name` / `.arguments` and `tool_call.name` / `.arguments`, the
    arguments an object (OpenAI clients send a JSON string; templates that `tojson` them
    would write it quoted — llama.cpp parses it too). Other messages pass unchanged."""
    if not isinstance(messages, list | tuple):
        return messages  # render() says what is wrong
    out = []
    for i, msg in enumerate(messages):
        calls = msg.get("tool_calls") if isinstance(msg, Mapping) else None
        if not calls:
            out.append(msg)
            continue
        if not isinstance(calls, list | tuple):
            raise TemplateError(f"messages[{i}].tool_calls must be a list")
        out.append(dict(msg, tool_calls=[_render_call(c, f"messages[{i}].tool_calls[{j}]")
                                         for j, c in enumerate(calls)]))
    return out


def _render_call(call, where: str) -> dict:
    fn = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise TemplateError(f"{where} must be {{\"function\": {{\"name\": str, "
                            "\"arguments\": ...}}}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass  # not JSON: the template gets the text as it came
    return {"id": call.get("id"), "type": "function",
            "function": {"name": fn["name"], "arguments": args},
            "name": fn["name"], "arguments": args}


# -- reading a reply ---------------------------------------------------------------------
def _in_think(text: str, i: int) -> bool:
    """Position i lies inside a <think> block: opened before i and not closed, or — no tag
    before i — closed after it with none opened in between (a template that ends its
    prompt with "<think>", as Qwen3's thinking models do: the reply starts inside it)."""
    opened, closed = text.rfind("<think>", 0, i), text.rfind("</think>", 0, i)
    if opened >= 0 or closed >= 0:
        return opened > closed
    close_after, open_after = text.find("</think>", i), text.find("<think>", i)
    return close_after >= 0 and (open_after < 0 or close_after < open_after)


def _blocks(text: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, body) of each <tool_call> block outside a <think> block; a last block
    without its closing tag runs to the end of the text."""
    i = 0
    while (s := text.find(OPEN, i)) >= 0:
        if _in_think(text, s):
            i = s + len(OPEN)
            continue
        e = text.find(CLOSE, s + len(OPEN))
        if e < 0:
            yield s, len(text), text[s + len(OPEN):]
            return
        yield s, e + len(CLOSE), text[s + len(OPEN):e]
        i = e + len(CLOSE)


def _call(body: str, names: set[str]) -> dict | None:
    """The OpenAI call a block's body holds, or None when it holds none."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments")
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    text = json.dumps(args, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # a lone surrogate: the model wrote half of a \uD83D\uDE00 pair, which JSON reads
        # (and a string schema's grammar lets through) but which has no UTF-8, so no answer
        # holding it could be sent. Escaped, the arguments are still the model's JSON
        text = json.dumps(args, separators=(",", ":"))
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": obj["name"], "arguments": text}}


def harmony_call(raw: str, names) -> dict | None:
    """The OpenAI call a harmony message to `functions.NAME` holds (the splitter's "call"
    piece: header, <|message|>, the arguments' JSON), or None (another recipient, a name
    not offered, arguments that are no object: then it stays in the content)."""
    header, _, body = raw.partition(H_MESSAGE)
    m = _H_RECIPIENT.search(header)
    if m is None:
        return None
    body = body.removesuffix("<|end|>").removesuffix("<|call|>").strip()
    return _call(json.dumps({"name": m.group(1), "arguments": body}), set(names))


def parse_tool_calls(text: str, tools) -> tuple[str | None, list[dict]]:
    """(content, calls) of a generated reply. Each <tool_call> block whose body is a JSON
    object with a "name" among `tools` (OpenAI's list) and an "arguments" object (or a
    JSON string holding one) becomes {"id": "call_…", "type": "function", "function":
    {"name", "arguments": compact JSON string}}. With calls, the content is the text
    outside them, stripped (None when empty); without, the text as it is."""
    names = set(tool_names(check_tools(tools)))
    if is_harmony_reply(text):  # gpt-oss: the final channel, and its messages to functions
        sp = ReasoningSplitter()
        content, calls = [], []
        for kind, piece in sp.push(text) + sp.finish():
            call = harmony_call(piece, names) if kind == "call" else None
            if call is not None:
                calls.append(call)
            elif kind != "reasoning":
                content.append(piece)
        return ("".join(content).strip() or None) if calls else "".join(content), calls
    parts, calls, last = [], [], 0
    for start, end, body in _blocks(text):
        call = _call(body, names)
        if call is None:
            continue  # stays in the content
        parts.append(text[last:start])
        calls.append(call)
        last = end
    if not calls:
        return text, []
    parts.append(text[last:])
    return "".join(parts).strip() or None, calls


class CallStream:
    """A reply that arrives in pieces: `push` returns the text that is content for sure,
    holding back what may be the start of a <tool_call> (as StopStringFilter holds back a
    stop string) and whitespace that may precede one; from the first block on, everything
    is held. `finish` parses the whole reply: (the content still to send, calls). What was
    sent plus what finish returns is parse_tool_calls' content, but for leading
    whitespace the stream has already sent."""

    def __init__(self, tools) -> None:
        self.tools = tools
        self.sent = ""
        self.held = ""
        self.holding = False  # a block has started

    def push(self, piece: str) -> str:
        if self.holding:
            self.held += piece
            return ""
        full = self.sent + self.held + piece
        i = full.find(OPEN, max(len(self.sent) - len(OPEN), 0))
        while i >= 0 and _in_think(full, i):
            i = full.find(OPEN, i + len(OPEN))
        if i >= 0:
            self.holding = True
            cut = len(full[:i].rstrip())
        else:
            # keep back the longest tail that may begin a block, and whitespace before it
            cut = len(full[:len(full) - prefix_tail(full, OPEN)].rstrip())
        cut = max(cut, len(self.sent))
        out, self.held = full[len(self.sent):cut], full[cut:]
        self.sent += out
        return out

    def finish(self) -> tuple[str, list[dict]]:
        content, calls = parse_tool_calls(self.sent + self.held, self.tools)
        if not calls:
            return self.held, []
        content = content or ""
        done = self.sent.lstrip()  # the content begins with what was sent
        return (content[len(done):] if content.startswith(done) else content), calls


# -- forcing a call --------------------------------------------------------------------------
def _objects_only(g, rule: int, made: dict[int, int]) -> int:
    """A rule reading what `rule` (a JSON value's) reads that starts with "{": its objects.
    A JSON value never reads nothing, so each alternative starts with a byte set or a
    rule, and the choice is made there; an alternative that cannot start so is dropped
    (no alternative left: no object)."""
    if rule in made:  # (only a rule that reaches itself first: left recursion)
        return made[rule]
    r = made[rule] = g.rule()
    brace = g.byteset(b"{")
    for alt in list(g.rules[rule]):
        if not alt:
            continue
        first = alt[0]
        if isinstance(first, bytes):
            if first[ord("{")]:
                g.add(r, [brace, *alt[1:]])
        else:
            sub = _objects_only(g, first, made)
            if g.rules[sub]:
                g.add(r, [sub, *alt[1:]])
    return r


def forced_call_grammar(tools: list[dict], names: list[str]):
    """The grammar (efedge.grammar.Compiled) of exactly one call of one of `names`:
    `<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>`, ARGS an instance of
    that tool's parameters schema (absent: no arguments, `{}`). A keyword the schema
    compiler does not take is an ArgumentError naming the tool and the keyword."""
    from efedge.grammar import GrammarError
    from efedge.json_schema import _Compiler, _literal

    by_name = {t["function"]["name"]: t["function"] for t in tools}
    g = None
    alts = []
    for name in names:
        schema = by_name[name].get("parameters")
        schema = _NO_ARGS if schema is None else dict(schema)
        c = _Compiler(schema)
        if g is None:
            g = c.g
        c.g = g  # one grammar; each tool's $refs resolve against its own schema
        try:
            args = c.schema(schema, "#")
        except ArgumentError as exc:
            raise ArgumentError(str(exc).replace("format: JSON schema",
                                                 f"tool {name!r}: parameters", 1)) from None
        except RecursionError:
            raise ArgumentError(f"tool {name!r}: parameters nest too deeply") from None
        # a call's arguments are an object: a schema that also takes other values ({},
        # a type list, an anyOf) gives only its objects, or a forced call whose arguments
        # were a number would be no call at all (the parser leaves it in the content)
        args = _objects_only(g, args, {})
        if not g.rules[args]:
            raise ArgumentError(f"tool {name!r}: parameters take no object, and a call's "
                                "arguments are one")
        head = g.literal(b'{"name": ' + _literal(name) + b', "arguments": ')
        alts.append([*head, args, *g.literal(b"}")])
    root = g.rule([*g.literal(f"{OPEN}\n".encode()), g.rule(*alts),
                   *g.literal(f"\n{CLOSE}".encode())])
    try:
        return g.compile(root)
    except GrammarError:
        raise ArgumentError("tool parameters: a $ref reaches itself without writing "
                            "anything in between (left recursion)") from None
