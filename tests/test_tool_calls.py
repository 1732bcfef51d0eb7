"""Tool calling in the Hermes <tool_call> format (efedge/tool_calls.py): parsing replies,
the streaming filter, rendering tools / calls / results through a chat template, calls
forced by a grammar on the real tiny model, and the server's OpenAI shapes and 400s."""

from __future__ import annotations

import json
import random
import re
import threading

import pytest
from _scripted import script_tokens

import efedge
from efedge.errors import ArgumentError, UnsupportedModelError
from efedge.generate import GenerationResult
from efedge.server import make_server
from efedge.tool_calls import (
    CallStream,
    check_tools,
    forced_call_grammar,
    parse_tool_calls,
    resolve_choice,
)
from tests._schema_oracle import _pairs, valid
from tests.test_server import assert_error, call, events

GREEDY = {"temperature": 0.0}
WEATHER_PARAMS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "unit": {"enum": ["C", "F"]},
    "days": {"type": "integer"}}, "required": ["city", "unit"],
    "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather",
                                      "description": "Current weather of a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "now", "description": "The time"}},
]
ID = re.compile(r"call_[0-9a-f]{24}\Z")

# a small Hermes-style template, written for these tests: the tools in the system turn,
# an assistant's calls as <tool_call> blocks, a tool's result as a <tool_response>
HERMES = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}
{% endif %}Tools you may call:
<tools>
{% for t in tools %}{{ t | tojson }}
{% endfor %}</tools>
Call one as <tool_call>{"name": NAME, "arguments": ARGS}</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages if m.role != 'system' %}
{%- if m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content or '' }}
{%- for c in m.tool_calls or [] %}
<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# the same, reading the flat form (tool_call.name / .arguments) other templates use
FLAT = HERMES.replace("c.function.name", "c.name").replace("c.function.arguments",
                                                            "c.arguments")


def block(name: str, args, pad: str = "\n") -> str:
    return f"<tool_call>{pad}{json.dumps({'name': name, 'arguments': args})}{pad}</tool_call>"


# -- parsing ------------------------------------------------------------------------------
def test_one_call_in_openai_shape():
    content, calls = parse_tool_calls(block("get_weather", {"city": "Paris", "unit": "C"}),
                                      TOOLS)
    assert content is None and len(calls) == 1
    c = calls[0]
    assert ID.match(c["id"]) and c["type"] == "function"
    assert c["function"] == {"name": "get_weather",
                             "arguments": '{"city":"Paris","unit":"C"}'}


def test_several_calls_with_text_around():
    text = ("Let me look.\n" + block("get_weather", {"city": "Oslo", "unit": "C"}) + "\n"
            + block("now", {}) + "\nDone.")
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "Let me look.\n\n\nDone."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "now"]
    assert json.loads(calls[1]["function"]["arguments"]) == {}
    assert len({c["id"] for c in calls}) == 2


@pytest.mark.parametrize("bad", [
    "<tool_call>\n{name: 'now'}\n</tool_call>",  # not JSON
    block("rm_rf", {}),  # a name not offered
    "<tool_call>\n" + json.dumps({"name": "now"}) + "\n</tool_call>",  # no arguments
    block("now", [1, 2]),  # arguments not an object
    block("now", "not json"),  # a string that holds no object
    block("now", "[1]"),
    "<tool_call>\n[\"now\", {}]\n</tool_call>",
    "<tool_call>\n" + json.dumps({"name": "now", "arguments": {}}) + " trailing\n</tool_call>",
])
def test_blocks_that_do_not_parse_stay_in_the_content(bad):
    text = "Before " + bad + " after"
    assert parse_tool_calls(text, TOOLS) == (text, [])
    # beside a good call the bad block is still content, verbatim
    content, calls = parse_tool_calls(bad + "\n" + block("now", {}), TOOLS)
    assert content == bad and [c["function"]["name"] for c in calls] == ["now"]


def test_arguments_as_a_json_string_or_an_object():
    args = {"city": "Zürich", "unit": "F", "days": 3}
    for written in (args, json.dumps(args)):
        _, calls = parse_tool_calls(block("get_weather", written), TOOLS)
        assert json.loads(calls[0]["function"]["arguments"]) == args
        assert "Zürich" in calls[0]["function"]["arguments"]  # written as it is
    # a block without its closing tag at the very end (a stop string cut it) still counts
    _, calls = parse_tool_calls("<tool_call>\n" + json.dumps(
        {"name": "now", "arguments": {}}), TOOLS)
    assert len(calls) == 1


def test_think_blocks_stay_and_calls_inside_them_are_thoughts():
    thought = "<think>\nmaybe " + block("now", {}) + " later\n</think>"
    text = thought + "\n\n" + block("get_weather", {"city": "Rome", "unit": "C"})
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == thought
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    # an unclosed think block: nothing in it is a call
    assert parse_tool_calls("<think>" + block("now", {}), TOOLS)[1] == []
    # the template opened the think block (the reply starts inside it, "</think>" only):
    # a call in the reasoning is a thought, the one after it a call
    text = "maybe " + block("now", {}) + "\n</think>\n\n" + block("now", {})
    content, calls = parse_tool_calls(text, TOOLS)
    assert len(calls) == 1 and content == text[:text.index("</think>") + 8]
    # without calls the text is the content exactly as generated, whitespace included
    assert parse_tool_calls("  hi \n", TOOLS) == ("  hi \n", [])


def test_tools_and_tool_choice_are_checked():
    assert check_tools(None) is None and check_tools([]) is None
    bad = [
        ([{"type": "function"}], r"tools\[0\]\.function must be an object"),
        ([TOOLS[0], {"type": "retrieval"}], r"tools\[1\]"),
        ([{"type": "function", "function": {"name": ""}}], r"tools\[0\]\.function\.name"),
        ([TOOLS[1], TOOLS[1]], r"tools\[1\].*'now' is offered twice"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}],
         r"tools\[0\]\.function\.parameters"),
        ("get_weather", "tools must be a list"),
    ]
    for tools, msg in bad:
        with pytest.raises(ArgumentError, match=msg):
            check_tools(tools)
    assert resolve_choice("auto", TOOLS) == ("auto", [])
    assert resolve_choice(None, TOOLS) == ("auto", [])
    assert resolve_choice("auto", None) == ("none", [])
    assert resolve_choice("none", TOOLS) == ("none", [])
    assert resolve_choice("required", TOOLS) == ("forced", ["get_weather", "now"])
    named = {"type": "function", "function": {"name": "now"}}
    assert resolve_choice(named, TOOLS) == ("forced", ["now"])
    for choice, msg in [("required", "needs tools"), ("always", "must be"),
                        ({"type": "function", "function": {"name": "x"}}, "not in tools"),
                        ({"function": {"name": "now"}}, "must be")]:
        with pytest.raises(ArgumentError, match=msg):
            resolve_choice(choice, None if msg == "needs tools" else TOOLS)


# -- streaming ----------------------------------------------------------------------------
STREAM_TEXTS = [
    "Sure, let me check.\n" + block("get_weather", {"city": "Paris", "unit": "C"}),
    block("now", {}) + "\n" + block("get_weather", {"city": "Lima", "unit": "F"}),
    "<think>\nI could " + block("now", {}) + "\n</think>\n\n" + block("now", {}),
    "A plain answer with a < sign and <tool in it, and no call at all.  \n",
    "Broken: <tool_call>\n{oops}\n</tool_call> and then " + block("now", {}) + " bye",
    "Text ending in a partial <tool_c",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_call_stream_matches_the_parser(text):
    want_content, want_calls = parse_tool_calls(text, TOOLS)
    rng = random.Random(len(text))
    for split in ("chars", "random", "whole"):
        s = CallStream(TOOLS)
        if split == "chars":
            pieces = list(text)
        elif split == "random":
            cuts = sorted(rng.sample(range(1, len(text)), 6))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        else:
            pieces = [text]
        out = "".join(s.push(p) for p in pieces)
        first_open = text.find("<tool_call>", text.find("</think>") + 1)
        if want_calls:  # the text before the first block went out, nothing from it on
            assert out == text[:first_open].rstrip()
        tail, calls = s.finish()
        if not want_calls:
            assert out + tail == text and calls == []
        else:
            assert (out + tail).lstrip() == (want_content or "")
            assert [c["function"] for c in calls] == [c["function"] for c in want_calls]


def test_call_stream_passes_text_on_before_the_end():
    s = CallStream(TOOLS)
    assert s.push("Hello") == "Hello"
    assert s.push(" there <") == " there"  # the "<" and the space before it wait
    assert s.push("b> bold") == " <b> bold"
    assert s.push(" <tool_") == ""
    assert s.push("call>\n") == ""


# -- rendering ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return tiny_gguf("qwen3moe", "F32")


@pytest.fixture(scope="module")
def hermes(tiny):
    with efedge.load(tiny, chat_template=HERMES) as m:
        yield m


ASK = [{"role": "system", "content": "Be brief."},
       {"role": "user", "content": "Weather in Paris?"}]


def test_tools_are_rendered_into_the_prompt(hermes):
    with_tools = hermes.detokenize(hermes.chat_prompt(ASK, tools=TOOLS))
    without = hermes.detokenize(hermes.chat_prompt(ASK))
    for tool in TOOLS:
        assert json.dumps(tool, ensure_ascii=False) in with_tools
    assert "Be brief." in with_tools and "Weather in Paris?" in with_tools
    assert "<tools>" not in without and "get_weather" not in without
    with pytest.raises(ArgumentError, match=r"tools\[0\]"):
        hermes.chat_prompt(ASK, tools=[{"type": "function", "function": {}}])


@pytest.mark.parametrize("template", [HERMES, FLAT])
def test_tool_calls_and_results_render(tiny, template):
    args = {"city": "Paris", "unit": "C"}
    want = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}'
    with efedge.load(tiny, chat_template=template) as m:
        for sent in (json.dumps(args), args):  # OpenAI clients send a string
            convo = ASK + [
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": sent}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"}]
            text = m.detokenize(m.chat_prompt(convo, tools=TOOLS))
            assert want in text, text
            assert "<tool_response>\n22 C, sunny\n</tool_response>" in text
        with pytest.raises(efedge.TemplateError, match=r"messages\[2\]\.tool_calls\[0\]"):
            m.chat_prompt(ASK + [{"role": "assistant", "tool_calls": [{"id": "x"}]}])


def test_the_gguf_tool_use_template_is_preferred_with_tools(tiny):
    with efedge.load(tiny) as m:
        m._gf.metadata["tokenizer.chat_template"] = "plain: {{ messages[-1].content }}"
        m._gf.metadata["tokenizer.chat_template.tool_use"] = HERMES
        assert m.detokenize(m.chat_prompt(ASK)).endswith("plain: Weather in Paris?")
        assert "<tools>" in m.detokenize(m.chat_prompt(ASK, tools=TOOLS))
        assert m.chat_template(tools=True).name == "tool_use"
    with efedge.load(tiny, chat_template="chatml") as m:  # the user's choice wins
        m._gf.metadata["tokenizer.chat_template.tool_use"] = HERMES
        assert m.chat_template(tools=True) is m.chat_template()


def test_a_template_without_the_format_is_refused(tiny):
    with efedge.load(tiny) as m:  # the tiny file has no template: chatml
        with pytest.raises(UnsupportedModelError, match="<tool_call>"):
            m.chat(ASK, tools=TOOLS, max_tokens=2)
        # tool_choice "none" renders no tools: nothing to refuse
        assert isinstance(m.chat(ASK, tools=TOOLS, tool_choice="none", max_tokens=2,
                                 **GREEDY), str)


def scripted(monkeypatch, m, text: str) -> None:
    """Make every generation on `m` write `text` (after the real prefill), then stop."""
    ids = m.tokenize(text, add_special=False)
    assert m.detokenize(ids) == text
    script_tokens(monkeypatch, ids)


REPLY = "Checking.\n" + block("get_weather", {"city": "Paris", "unit": "C"}) + "\n" + \
    block("now", {})


def test_chat_returns_text_and_fills_result_tool_calls(hermes, monkeypatch):
    scripted(monkeypatch, hermes, REPLY)
    r = GenerationResult([], "")
    assert hermes.chat(ASK, tools=TOOLS, result=r, max_tokens=200) == REPLY
    assert [c["function"]["name"] for c in r.tool_calls] == ["get_weather", "now"]
    r = GenerationResult([], "")
    assert "".join(hermes.chat(ASK, tools=TOOLS, result=r, stream=True,
                               max_tokens=200)) == REPLY
    assert len(r.tool_calls) == 2
    r = GenerationResult([], "")
    hermes.chat(ASK, result=r, max_tokens=200)
    assert r.tool_calls is None  # no tools offered: nothing parsed


# -- forced calls on the real model -----------------------------------------------------
def check_forced(text: str, names: list[str]) -> dict:
    """The one call `text` holds, checked against the tool's parameters."""
    assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>"), text
    content, calls = parse_tool_calls(text, TOOLS)
    assert content is None and len(calls) == 1, text
    fn = calls[0]["function"]
    assert fn["name"] in names
    params = next(t["function"].get("parameters") for t in TOOLS
                  if t["function"]["name"] == fn["name"])
    args = json.loads(fn["arguments"], object_pairs_hook=_pairs)  # keeps key order
    if params is None:
        assert args == {}
    else:
        assert valid(args, params, params), args
    return calls[0]


@pytest.mark.parametrize("choice,names", [
    ("required", ["get_weather", "now"]),
    # (slow: "now" below forces one named function too; ~20 s of a 2-core CI run)
    pytest.param({"type": "function", "function": {"name": "get_weather"}}, ["get_weather"],
                 marks=pytest.mark.slow),
    ({"type": "function", "function": {"name": "now"}}, ["now"]),
])
def test_forced_calls_follow_the_grammar(hermes, choice, names):
    for kw in (GREEDY, {"temperature": 1.0, "seed": 3, "min_p": 0.0, "top_k": 0}):
        r = GenerationResult([], "")
        text = hermes.chat(ASK, tools=TOOLS, tool_choice=choice, result=r,
                           max_tokens=400, **kw)
        assert r.finish_reason == "stop", text
        call_ = check_forced(text, names)
        assert r.tool_calls[0]["function"] == call_["function"]


def test_forced_call_refusals(hermes):
    bad = [dict(TOOLS[0], function=dict(TOOLS[0]["function"], parameters={
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}))]
    with pytest.raises(ArgumentError, match="'get_weather'.*'minimum' is not supported"):
        forced_call_grammar(bad, ["get_weather"])
    with pytest.raises(ArgumentError, match="minimum"):
        hermes.chat(ASK, tools=bad, tool_choice="required", max_tokens=2)
    # "auto" constrains nothing: the same tools are fine
    assert isinstance(hermes.chat(ASK, tools=bad, max_tokens=2, **GREEDY), str)
    with pytest.raises(ArgumentError, match="format"):
        hermes.chat(ASK, tools=TOOLS, tool_choice="required", format="json", max_tokens=2)


@pytest.mark.parametrize("params", [
    {}, {"description": "anything"}, {"type": ["string", "object"]},
    {"anyOf": [{"type": "integer"}, {"type": "object", "properties": {
        "a": {"type": "integer"}}, "additionalProperties": False}]}])
def test_forced_arguments_are_always_an_object(hermes, params):
    """A parameters schema that also takes other values ({} is common for a tool without
    arguments) forces an object: a number or a string there was no call at all."""
    from efedge.grammar import Matcher

    tools = [{"type": "function", "function": {"name": "f", "parameters": params}}]
    g = forced_call_grammar(tools, ["f"])
    for args, ok in [('"hi"', False), ("0", False), ("[]", False), ("{}", True),
                     ('{"a": 1}', True)]:
        m = Matcher(g)
        text = f'<tool_call>\n{{"name": "f", "arguments": {args}}}\n</tool_call>'
        assert (m.feed(text.encode()) and m.accepting) == ok, (params, args)
    for kw in (GREEDY, {"temperature": 1.0, "seed": 0, "min_p": 0.0, "top_k": 0}):
        r = GenerationResult([], "")
        text = hermes.chat(ASK, tools=tools, tool_choice="required", result=r,
                           max_tokens=300, **kw)
        # (sampled, the random model may write one long string till max_tokens)
        assert r.finish_reason == ("stop" if kw is GREEDY else r.finish_reason), text
        assert len(r.tool_calls) == (r.finish_reason == "stop"), text


def test_forced_call_whose_parameters_take_no_object_is_refused():
    for params in ({"type": "string"}, {"anyOf": [{"type": "integer"}, {"enum": [1, "a"]}]}):
        tools = [{"type": "function", "function": {"name": "f", "parameters": params}}]
        with pytest.raises(ArgumentError, match="'f': parameters take no object"):
            forced_call_grammar(tools, ["f"])


# -- the server -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(hermes):
    srv = make_server(hermes, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(timeout=10)


CHAT = "/v1/chat/completions"


def test_server_answers_tool_calls(server, hermes, monkeypatch):
    scripted(monkeypatch, hermes, REPLY)
    status, body = call(server, CHAT, {"messages": ASK, "tools": TOOLS, "max_tokens": 300})
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    msg = choice["message"]
    assert msg["role"] == "assistant" and msg["content"] == "Checking."
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather", "now"]
    for c in msg["tool_calls"]:
        assert ID.match(c["id"]) and c["type"] == "function"
        assert isinstance(json.loads(c["function"]["arguments"]), dict)
    # parallel_tool_calls false: the first call only
    _, body = call(server, CHAT, {"messages": ASK, "tools": TOOLS, "max_tokens": 300,
                                  "parallel_tool_calls": False})
    assert [c["function"]["name"] for c in body["choices"][0]["message"]["tool_calls"]] == \
        ["get_weather"]
    # the deprecated functions form is mapped to tools
    _, body = call(server, CHAT, {"messages": ASK, "max_tokens": 300,
                                  "functions": [t["function"] for t in TOOLS]})
    assert len(body["choices"][0]["message"]["tool_calls"]) == 2
    # tool_choice "none": no tools in the prompt, nothing parsed
    _, plain = call(server, CHAT, {"messages": ASK, "tools": TOOLS, "tool_choice": "none",
                                   "max_tokens": 300})
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": REPLY}
    assert plain["choices"][0]["finish_reason"] == "stop"
    assert plain["usage"]["prompt_tokens"] < body["usage"]["prompt_tokens"]


def test_server_streams_content_then_calls(server, hermes, monkeypatch):
    scripted(monkeypatch, hermes, REPLY)
    status, text = call(server, CHAT, {"messages": ASK, "tools": TOOLS, "max_tokens": 300,
                                       "stream": True})
    assert status == 200
    evs = events(text)
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    content = "".join(d.get("content") or "" for d in deltas)
    assert content == "Checking."
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert [len(c) for c in calls] == [1, 1]
    for i, (c,) in enumerate(calls):
        assert c["index"] == i and ID.match(c["id"]) and c["type"] == "function"
    assert [c[0]["function"]["name"] for c in calls] == ["get_weather", "now"]
    assert json.loads(calls[0][0]["function"]["arguments"]) == {"city": "Paris", "unit": "C"}
    # the calls come after every content delta, and the finish chunk after them
    last_content = max(i for i, d in enumerate(deltas) if d.get("content"))
    assert last_content < min(i for i, d in enumerate(deltas) if "tool_calls" in d)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert deltas[-1] == {}


def test_server_forced_call_on_the_real_model(server):
    for choice, names in [("required", ["get_weather", "now"]),
                          ({"type": "function", "function": {"name": "get_weather"}},
                           ["get_weather"])]:
        status, body = call(server, CHAT, {"messages": ASK, "tools": TOOLS, "max_tokens": 400,
                                           "tool_choice": choice, "temperature": 0})
        assert status == 200, body
        choice0 = body["choices"][0]
        assert choice0["finish_reason"] == "tool_calls"
        assert choice0["message"]["content"] is None
        (c,) = choice0["message"]["tool_calls"]
        assert c["function"]["name"] in names
        params = next(t["function"].get("parameters") for t in TOOLS
                      if t["function"]["name"] == c["function"]["name"])
        args = json.loads(c["function"]["arguments"], object_pairs_hook=_pairs)
        assert args == {} if params is None else valid(args, params, params)
    # streamed: no content, the same call in one chunk; logprobs of every token (the text
    # was held back, so they all come with the finish chunk)
    status, text = call(server, CHAT, {"messages": ASK, "tools": TOOLS, "max_tokens": 400,
                                       "tool_choice": choice, "temperature": 0,
                                       "stream": True, "logprobs": True,
                                       "stream_options": {"include_usage": True}})
    assert status == 200
    chunks = events(text)[:-1]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert not "".join(d.get("content") or "" for d in deltas)
    (streamed,) = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert streamed[0]["function"] == c["function"] and streamed[0]["index"] == 0
    finish = chunks[-2]["choices"][0]
    assert finish["finish_reason"] == "tool_calls"
    assert len(finish["logprobs"]["content"]) == chunks[-1]["usage"]["completion_tokens"]


@pytest.mark.parametrize("extra,param,code,msg", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "x"}]}, "tools",
     "invalid_value", r"tools\[1\]"),
    ({"tools": [TOOLS[1], TOOLS[1]]}, "tools", "invalid_value", "offered twice"),
    ({"tools": {"name": "f"}}, "tools", "invalid_value", "must be a list"),
    ({"functions": [{"description": "no name"}]}, "functions", "invalid_value",
     r"functions\[0\]\.name"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value", "needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice", "invalid_value", "not in tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "pattern": "a+"}}}}}],
      "tool_choice": "required"}, "tools", "unsupported", "'pattern' is not supported"),
    ({"tools": TOOLS, "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "tool_choice", "unsupported",
     "response_format"),
])
def test_server_refusals(server, extra, param, code, msg):
    status, body = call(server, CHAT, dict({"messages": ASK, "max_tokens": 2}, **extra))
    assert_error(status, body, 400, code)
    assert body["error"]["param"] == param and re.search(msg, body["error"]["message"]), body


def test_server_refuses_tools_for_a_template_without_the_format(tiny):
    with efedge.load(tiny) as m:  # chatml: no <tool_call> format
        srv = make_server(m, "127.0.0.1", 0)
        t = threading.Thread(target=srv.serve_forever, daemon=True)
        t.start()
        try:
            status, body = call(srv, CHAT, {"messages": ASK, "tools": TOOLS})
            assert_error(status, body, 400, "unsupported")
            assert "Hermes <tool_call>" in body["error"]["message"]
            # tool_choice "none" asks for no tools: answered as plain chat
            status, body = call(srv, CHAT, {"messages": ASK, "tools": TOOLS, "max_tokens": 2,
                                            "tool_choice": "none"})
            assert status == 200, body
        finally:
            srv.shutdown()
            srv.server_close()
            t.join(timeout=10)


def test_openai_client_reads_tool_calls(server, hermes, monkeypatch):
    openai = pytest.importorskip("openai")
    scripted(monkeypatch, hermes, REPLY)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.create(model=server.model_id, messages=ASK, tools=TOOLS,
                                          max_tokens=300)
    msg = resp.choices[0].message
    assert resp.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in msg.tool_calls] == ["get_weather", "now"]
    assert json.loads(msg.tool_calls[0].function.arguments)["city"] == "Paris"
    names = {}
    for chunk in client.chat.completions.create(model=server.model_id, messages=ASK,
                                                tools=TOOLS, max_tokens=300, stream=True):
        for tc in chunk.choices[0].delta.tool_calls or ():
            names[tc.index] = tc.function.name
    assert names == {0: "get_weather", 1: "now"}


def test_call_stream_with_reasoning_the_template_opened():
    """The reply starts inside a <think> the prompt opened: a block in the reasoning cannot
    be told from a call until "</think>" comes, so the stream holds it back; at the end the
    content (the reasoning, that block included) and the one real call are the parser's."""
    text = "maybe " + block("now", {}) + "\n</think>\n\n" + block("now", {})
    want_content, want_calls = parse_tool_calls(text, TOOLS)
    assert len(want_calls) == 1
    s = CallStream(TOOLS)
    out = "".join(s.push(c) for c in text)
    tail, calls = s.finish()
    assert out + tail == want_content
    assert [c["function"] for c in calls] == [c["function"] for c in want_calls]


def test_arguments_with_a_lone_surrogate_escape_are_sent(server, hermes, monkeypatch):
    """A model may write "\\ud83d" (half of a pair) in a call's arguments, and the forced
    call's grammar lets it (a string without length limits takes any \\u escape): JSON
    reads it as a lone surrogate, which has no UTF-8. The arguments stay the JSON the model
    wrote, escaped, so the answer can be sent — not a connection dropped without one (the
    UnicodeEncodeError killed the handler) — streamed or not."""
    reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "a\\ud83d\\u00e9", ' \
        '"unit": "C"}}\n</tool_call>'
    scripted(monkeypatch, hermes, reply)
    _, calls = parse_tool_calls(reply, TOOLS)
    args = calls[0]["function"]["arguments"]
    args.encode("utf-8")  # sendable
    assert json.loads(args) == {"city": "a\ud83d\u00e9", "unit": "C"}
    status, body = call(server, CHAT, {"messages": ASK, "tools": TOOLS, "max_tokens": 300})
    assert status == 200, body
    (got,) = body["choices"][0]["message"]["tool_calls"]
    assert json.loads(got["function"]["arguments"]) == {"city": "a\ud83d\u00e9", "unit": "C"}
    status, text = call(server, CHAT, {"messages": ASK, "tools": TOOLS, "max_tokens": 300,
                                       "stream": True})
    assert status == 200
    deltas = [c["choices"][0]["delta"] for c in events(text)
              if isinstance(c, dict) and c["choices"]]
    (got,) = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert json.loads(got["function"]["arguments"])["city"] == "a\ud83d\u00e9"
    # a pair is one character: written as it is
    _, calls = parse_tool_calls(reply.replace("\\u00e9", "\\ude00"), TOOLS)
    assert calls[0]["function"]["arguments"] == '{"city":"a😀","unit":"C"}'


def test_ollama_chat_answers_tool_calls_with_object_arguments(server, hermes, monkeypatch):
    """Ollama's /api/chat: the same calls, their arguments as objects (Ollama's shape),
    streamed or not; a tool's result goes back as a role "tool" message."""
    from tests._http import post

    scripted(monkeypatch, hermes, REPLY)
    body = {"model": server.model_id, "messages": ASK, "tools": TOOLS, "stream": False}
    status, got = call(server, "/api/chat", body)
    assert status == 200, got
    assert got["message"]["content"] == "Checking." and got["done_reason"] == "stop"
    assert got["message"]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}},
        {"function": {"name": "now", "arguments": {}}}]
    status, text = post(server, "/api/chat", dict(body, stream=True))
    lines = [json.loads(x) for x in text.splitlines()]
    assert status == 200 and lines[-1]["done"] is True
    assert lines[-1]["message"]["tool_calls"] == got["message"]["tool_calls"]
    assert "".join(x["message"]["content"] for x in lines) == "Checking."
    turn = ASK + [{"role": "assistant", "content": "", "tool_calls": got["message"][
        "tool_calls"][:1]}, {"role": "tool", "content": "18 C", "tool_name": "get_weather"}]
    status, got = call(server, "/api/chat", dict(body, messages=turn))
    assert status == 200, got
