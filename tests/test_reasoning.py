"""A thinking model's reasoning apart from its answer (efedge.reasoning): the splitter on
every way of cutting a reply into pieces, the server's reasoning_content (OpenAI routes,
streamed and not; reasoning_format none; the server's --reasoning-format default),
Ollama's `think`, and chat_template_kwargs reaching the template."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _http import post, post_json, running_server, sse_chunks
from _scripted import script_tokens

import efedge
from efedge.errors import ArgumentError
from efedge.reasoning import (
    CLOSE,
    OPEN,
    ReasoningSplitter,
    prompt_opens_thinking,
    split_reasoning,
)

CASES = [  # (reply, template opened <think>, reasoning, answer)
    ("<think>\nLet me see.\n</think>\n\nHello.", False, "Let me see.", "Hello."),
    ("  <think>a b</think>c", False, "a b", "c"),
    ("Let me see.\n</think>\n\nHello.", True, "Let me see.", "Hello."),
    ("Hello, no thoughts.", False, None, "Hello, no thoughts."),
    ("<thead> is a tag", False, None, "<thead> is a tag"),
    ("<think>cut short, still thin", False, "cut short, still thin", ""),
    ("thinking </thi", True, "thinking </thi", ""),
    ("<think></think>Answer", False, "", "Answer"),
    ("</think>\n\nAnswer </think>", True, "", "Answer </think>"),
    ("one\n\n two</think>x", True, "one\n\n two", "x"),
]


@pytest.mark.parametrize("text, opened, reasoning, answer", CASES)
def test_split_whole_and_in_every_two_and_three_pieces(text, opened, reasoning, answer):
    assert split_reasoning(text, opened) == (reasoning, answer)
    cuts = [(i,) for i in range(len(text) + 1)] + [
        (i, j) for i in range(0, len(text) + 1, 3) for j in range(i, len(text) + 1, 2)]
    for cut in cuts:
        bounds = [0, *cut, len(text)]
        sp = ReasoningSplitter(opened)
        parts = []
        for a, b in zip(bounds, bounds[1:], strict=False):
            parts += sp.push(text[a:b])
        parts += sp.finish()
        got_r = "".join(t for k, t in parts if k == "reasoning")
        got_a = "".join(t for k, t in parts if k == "content")
        assert (got_r, got_a) == (reasoning or "", answer), cut
        assert all(t for _, t in parts)  # no empty pieces given out


@pytest.mark.parametrize("text, opened, reasoning, answer", CASES)
def test_split_with_tags_keeps_the_reasoning_in_tags(text, opened, reasoning, answer):
    """tags=True (llama-server's deepseek-legacy, streamed): the reasoning goes out
    stripped as before, "<think>" before its first piece and "</think>" after its last
    (a reply cut short inside it closed too, as llama-server's last parse closes it);
    none when the reasoning is empty."""
    want = f"{OPEN}{reasoning}{CLOSE}" if reasoning else ""
    for cut in range(len(text) + 1):
        sp = ReasoningSplitter(opened, tags=True)
        parts = sp.push(text[:cut]) + sp.push(text[cut:]) + sp.finish()
        assert "".join(t for k, t in parts if k == "reasoning") == want, cut
        assert "".join(t for k, t in parts if k == "content") == answer, cut
        assert all(t for _, t in parts)


def test_prompt_opens_thinking():
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n")


# a Qwen3-like template: the generation prompt opens <think> unless enable_thinking is
# false, then it writes an empty one; it also shows a variable a client may set
QWEN3ISH = """{%- for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% if style is defined %}[{{ style }}]{% endif %}
{%- if reasoning_effort is defined %}(effort: {{ reasoning_effort }}){% endif %}
{%- if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% else %}<think>
{% endif %}{% endif %}"""
HI = [{"role": "user", "content": "hi"}]
REPLY = "Let me think about it.\n</think>\n\nHello there."


@pytest.fixture(scope="module")
def model(tiny_gguf):
    with efedge.load(tiny_gguf("qwen3moe", "F32"), chat_template=QWEN3ISH) as m:
        yield m


def _script(monkeypatch, m, text):
    ids = m.tokenize(text, add_special=False)
    assert m.detokenize(ids) == text
    script_tokens(monkeypatch, ids)


def test_template_kwargs_in_the_api(model):
    text = model.detokenize(model.chat_prompt(HI, template_kwargs={"style": "brief",
                                                                   "enable_thinking": False}))
    assert "[brief]" in text and text.endswith("<think>\n\n</think>\n\n")
    assert model.detokenize(model.chat_prompt(HI)).endswith("<think>\n")
    for bad in ({"messages": []}, {"bos_token": "x"}, ["style"], {1: 2},
                {"enable_thinking": "false"}):  # (a string is true in the template)
        with pytest.raises(ArgumentError, match="template_kwargs"):
            model.chat_prompt(HI, template_kwargs=bad)


def test_openai_chat_gives_reasoning_content(model, monkeypatch):
    _script(monkeypatch, model, REPLY)
    with running_server(model) as srv:
        status, got = post_json(srv, "/v1/chat/completions", {"messages": HI})
        assert status == 200, got
        msg = got["choices"][0]["message"]
        assert msg["reasoning_content"] == "Let me think about it."
        assert msg["content"] == "Hello there."
        status, text = post(srv, "/v1/chat/completions", {"messages": HI, "stream": True})
        deltas = [c["choices"][0]["delta"] for c in sse_chunks(text) if c["choices"]]
        thought = "".join(d.get("reasoning_content", "") for d in deltas)
        said = "".join(d.get("content") or "" for d in deltas)
        assert (thought, said) == ("Let me think about it.", "Hello there.")
        first = next(i for i, d in enumerate(deltas) if d.get("content"))
        assert all("reasoning_content" not in d for d in deltas[first:])
        # deepseek-legacy (llama-server's): as deepseek, but streamed the reasoning stays
        # in the content, in its tags (the template opened <think>: written out too)
        legacy = {"messages": HI, "reasoning_format": "deepseek-legacy"}
        status, got = post_json(srv, "/v1/chat/completions", legacy)
        assert status == 200, got
        assert got["choices"][0]["message"] == {
            "role": "assistant", "content": "Hello there.",
            "reasoning_content": "Let me think about it."}
        status, text = post(srv, "/v1/chat/completions", dict(legacy, stream=True))
        deltas = [c["choices"][0]["delta"] for c in sse_chunks(text) if c["choices"]]
        assert status == 200 and all("reasoning_content" not in d for d in deltas)
        assert "".join(d.get("content") or "" for d in deltas) == \
            "<think>Let me think about it.</think>Hello there."
        # reasoning_format none: the reply as written
        status, got = post_json(srv, "/v1/chat/completions", {"messages": HI,
                                                              "reasoning_format": "none"})
        assert got["choices"][0]["message"] == {"role": "assistant", "content": REPLY}
        # chat_template_kwargs: no <think> opened, so nothing is reasoning
        status, got = post_json(srv, "/v1/chat/completions", {
            "messages": HI, "chat_template_kwargs": {"enable_thinking": False}})
        assert got["choices"][0]["message"]["content"] == REPLY
        assert got["usage"]["prompt_tokens"] == len(model.chat_prompt(
            HI, template_kwargs={"enable_thinking": False}))
        for bad, param in [({"reasoning_format": "x"}, "reasoning_format"),
                           ({"chat_template_kwargs": {"messages": 1}}, "chat_template_kwargs"),
                           ({"chat_template_kwargs": 3}, "chat_template_kwargs"),
                           ({"chat_template_kwargs": {"enable_thinking": "false"}},
                            "chat_template_kwargs")]:
            status, got = post_json(srv, "/v1/chat/completions", dict(bad, messages=HI))
            assert status == 400 and got["error"]["param"] == param, got
    with running_server(model, reasoning_format="none",
                        template_kwargs={"style": "terse"}) as srv:
        status, got = post_json(srv, "/v1/chat/completions", {"messages": HI})
        assert got["choices"][0]["message"]["content"] == REPLY
        assert got["usage"]["prompt_tokens"] == len(model.chat_prompt(
            HI, template_kwargs={"style": "terse"}))
        # a request's variables go over the server's name by name, as llama-server
        # merges them (they replaced the server's whole set)
        status, got = post_json(srv, "/v1/chat/completions", {
            "messages": HI, "chat_template_kwargs": {"enable_thinking": False}})
        assert got["usage"]["prompt_tokens"] == len(model.chat_prompt(
            HI, template_kwargs={"style": "terse", "enable_thinking": False}))
        assert len(model.chat_prompt(HI, template_kwargs={"style": "terse"})) != len(
            model.chat_prompt(HI, template_kwargs={"enable_thinking": False}))


def test_reasoning_effort_reaches_the_template(model, monkeypatch):
    """OpenAI's reasoning_effort, as llama-server maps it: a level is the template's
    `reasoning_effort` variable (gpt-oss's templates read it), over a
    chat_template_kwargs one; "none" asks the template not to think (enable_thinking
    false) and drops the variable. It was ignored."""
    _script(monkeypatch, model, REPLY)

    def prompt_tokens(srv, **body) -> int:
        status, got = post_json(srv, "/v1/chat/completions", dict(body, messages=HI))
        assert status == 200, got
        return got["usage"]["prompt_tokens"]

    def n(**kw) -> int:
        return len(model.chat_prompt(HI, template_kwargs=kw or None))

    assert n(reasoning_effort="high") != n()
    with running_server(model, template_kwargs={"reasoning_effort": "low"}) as srv:
        assert prompt_tokens(srv) == n(reasoning_effort="low")
        assert prompt_tokens(srv, reasoning_effort="high") == n(reasoning_effort="high")
        assert prompt_tokens(srv, reasoning_effort="high", chat_template_kwargs={
            "reasoning_effort": "medium"}) == n(reasoning_effort="high")
        assert prompt_tokens(srv, reasoning_effort="none") == n(enable_thinking=False)
        status, got = post_json(srv, "/v1/chat/completions", {
            "messages": HI, "reasoning_effort": "none"})
        assert got["choices"][0]["message"]["content"] == REPLY  # no <think> opened
        assert prompt_tokens(srv, reasoning_effort="") == n(reasoning_effort="low")
        status, got = post_json(srv, "/v1/chat/completions", {"messages": HI,
                                                              "reasoning_effort": 1})
        assert status == 400 and got["error"]["param"] == "reasoning_effort", got


def test_streamed_log_probabilities_go_with_their_part(model, monkeypatch):
    """Streamed with logprobs, the reasoning chunks carry the reasoning tokens' records and
    the answer's chunks the answer's (the answer's chunks carried the reasoning's, the
    answer's own came with the finish chunk); unstreamed, every token's, in order."""
    _script(monkeypatch, model, REPLY)
    n_tokens = len(model.tokenize(REPLY, add_special=False))
    with running_server(model) as srv:
        status, text = post(srv, "/v1/chat/completions", {"messages": HI, "stream": True,
                                                         "logprobs": True})
        assert status == 200, text
        said: dict[str, list[str]] = {"reasoning_content": [], "content": [], "end": []}
        for c in sse_chunks(text):
            if not c["choices"] or not (c["choices"][0]["logprobs"] or {}).get("content"):
                continue
            d = c["choices"][0]
            kind = "end" if d["finish_reason"] else next(iter(d["delta"]))
            said[kind] += [r["token"] for r in d["logprobs"]["content"]]
        thought, answer = "".join(said["reasoning_content"]), "".join(said["content"])
        assert "".join(thought + answer + "".join(said["end"])) == REPLY
        assert "think about" in thought and "Hello" not in thought
        assert "Hello there" in answer and "about" not in answer, said
        status, got = post_json(srv, "/v1/chat/completions", {"messages": HI,
                                                              "logprobs": True})
        recs = got["choices"][0]["logprobs"]["content"]
        assert len(recs) == n_tokens and "".join(r["token"] for r in recs) == REPLY


def test_tool_calls_come_from_the_answer_only(model, monkeypatch):
    tools = [{"type": "function", "function": {"name": "now"}}]
    call = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    _script(monkeypatch, model, "maybe " + call + "\n</think>\n\n" + call)
    with running_server(model) as srv:
        srv.tools_error = None  # (the test template renders no tools: the parsing is tested)
        status, got = post_json(srv, "/v1/chat/completions", {"messages": HI, "tools": tools})
        assert status == 200, got
        msg = got["choices"][0]["message"]
        assert msg["reasoning_content"] == "maybe " + call
        assert [c["function"]["name"] for c in msg["tool_calls"]] == ["now"]


def test_ollama_think(model, monkeypatch):
    _script(monkeypatch, model, REPLY)
    with running_server(model) as srv:
        # a template that writes <think>: the "thinking" capability Ollama's clients look
        # for before they offer think (the test_ollama model's chatml has none)
        status, show = post_json(srv, "/api/show", {"model": srv.model_id})
        assert status == 200 and "thinking" in show["capabilities"], show
        base = {"model": srv.model_id, "messages": HI, "stream": False}
        status, got = post_json(srv, "/api/chat", dict(base, think=True))
        assert status == 200, got
        assert got["message"]["thinking"] == "Let me think about it."
        assert got["message"]["content"] == "Hello there."
        status, text = post(srv, "/api/chat", dict(base, think=True, stream=True))
        lines = [json.loads(x) for x in text.splitlines()]
        assert "".join(x["message"].get("thinking", "") for x in lines) == \
            "Let me think about it."
        assert "".join(x["message"]["content"] for x in lines) == "Hello there."
        status, got = post_json(srv, "/api/chat", base)  # unset: as written
        assert got["message"]["content"] == REPLY and "thinking" not in got["message"]
        status, got = post_json(srv, "/api/chat", dict(base, think=False))
        assert got["message"]["content"] == REPLY
        assert got["prompt_eval_count"] == len(model.chat_prompt(
            HI, template_kwargs={"enable_thinking": False}))


def test_serve_refuses_bad_template_kwargs(model):
    for value in ("{", "[1]"):
        r = subprocess.run([sys.executable, "-m", "efedge", "serve", str(model.path),
                            "--chat-template-kwargs", value], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and "--chat-template-kwargs" in r.stderr


def test_a_constrained_reply_is_the_answer(model, monkeypatch):
    """JSON mode, a schema or a forced call constrains the reply from its first token: what
    the model writes after the template's <think> is the answer, not reasoning (it was all
    reasoning_content: the content empty, a forced call lost)."""
    call = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    tools = [{"type": "function", "function": {"name": "now"}}]
    with running_server(model) as srv:
        srv.tools_error = None  # (the test template renders no tools: the parsing is tested)
        _script(monkeypatch, model, '{"a": 1}')
        for extra in ({"response_format": {"type": "json_object"}},
                      {"response_format": {"type": "json_schema", "json_schema": {
                          "name": "a", "schema": {"type": "object"}}}}):
            status, got = post_json(srv, "/v1/chat/completions", dict(extra, messages=HI))
            assert status == 200, got
            assert got["choices"][0]["message"] == {"role": "assistant",
                                                    "content": '{"a": 1}'}
        status, got = post_json(srv, "/api/chat", {"messages": HI, "format": "json",
                                                   "think": True, "stream": False})
        assert got["message"] == {"role": "assistant", "content": '{"a": 1}'}, got
        _script(monkeypatch, model, call)
        status, got = post_json(srv, "/v1/chat/completions", {
            "messages": HI, "tools": tools, "tool_choice": "required"})
        assert status == 200, got
        choice = got["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and "reasoning_content" not in \
            choice["message"], choice
        assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["now"]


def test_chat_set_think_and_nothink(model, tiny_gguf):
    """efedge chat's /set think and /set nothink (ollama's commands) set the template's
    enable_thinking for every reply and for what is counted against the context;
    --chat-template-kwargs sets it from the start. A template without the switch is said
    to take no notice."""
    import io

    from efedge.cli.chat import ChatREPL

    out = io.StringIO()
    repl = ChatREPL(model, out=out, err=io.StringIO(),
                    template_kwargs={"enable_thinking": False})
    repl.messages = list(HI)
    off = model.chat_prompt(HI, template_kwargs={"enable_thinking": False})
    assert repl.fit_context() == len(off)
    repl.set("think")
    assert "Thinking on." in out.getvalue() and repl.fit_context() == len(
        model.chat_prompt(HI)) != len(off)
    repl.set("nothink")
    assert repl.fit_context() == len(off) and "think=off" in repl.settings()
    with efedge.load(tiny_gguf("qwen3moe", "F32")) as plain:  # chatml: no switch
        out = io.StringIO()
        ChatREPL(plain, out=out, err=io.StringIO()).set("think")
        assert "no enable_thinking switch" in out.getvalue()
    r = subprocess.run([sys.executable, "-m", "efedge", "chat", str(model.path),
                        "--chat-template-kwargs", "[1]"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "--chat-template-kwargs" in r.stderr


# -- gpt-oss's harmony channels ------------------------------------------------------------
HARMONY = "<|channel|>analysis<|message|>We need to greet.<|end|><|start|>assistant" \
          "<|channel|>final<|message|>Hello there."
H_CASES = [  # (reply, reasoning, answer)
    (HARMONY, "We need to greet.", "Hello there."),
    ("<|channel|>final<|message|>Just this.", None, "Just this."),
    ("<|channel|>analysis<|message|>cut short, still thin", "cut short, still thin", ""),
    ("<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>analysis"
     "<|message|>b<|end|><|start|>assistant<|channel|>final<|message|>c", "ab", "c"),
    ("<|channel|>analysis<|message|>x<|start|>assistant<|channel|>final<|message|>y",
     "x", "y"),  # no <|end|>: the next header ends the message all the same
    ("<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}", None,
     "<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}"),
    ("<|chan is not a header", None, "<|chan is not a header"),
]


@pytest.mark.parametrize("text, reasoning, answer", H_CASES)
def test_harmony_split_whole_and_in_every_two_pieces(text, reasoning, answer):
    """gpt-oss's reply: the analysis channel is the reasoning, the final channel the
    answer; a message to a recipient (a tool call) stays as written; whatever the cut."""
    assert split_reasoning(text) == (reasoning, answer)
    for cut in range(len(text) + 1):
        sp = ReasoningSplitter()
        parts = sp.push(text[:cut]) + sp.push(text[cut:]) + sp.finish()
        assert "".join(t for k, t in parts if k == "reasoning") == (reasoning or ""), cut
        # (a message to a recipient comes whole as a "call" piece: content as written)
        assert "".join(t for k, t in parts if k != "reasoning") == answer, cut
        assert all(t for _, t in parts)


HARMONYISH = ("{%- for m in messages %}<|start|>{{ m.role }}<|channel|>final<|message|>"
              "{{ m.content }}<|end|>{% endfor %}"
              "{%- if add_generation_prompt %}<|start|>assistant{% endif %}")


def test_harmony_replies_on_the_servers_routes(tiny_gguf, monkeypatch):
    """A gpt-oss-like template: OpenAI's route gives reasoning_content and the final
    channel as the content (reasoning_format none: as written); Ollama's says "thinking",
    gives it with think, and without think the final channel alone; think's level reaches
    the template as reasoning_effort."""
    with efedge.load(tiny_gguf("qwen3moe", "F32"), chat_template=HARMONYISH) as m:
        _script(monkeypatch, m, HARMONY)
        with running_server(m) as srv:
            base = {"model": srv.model_id, "messages": HI}
            status, got = post_json(srv, "/v1/chat/completions", base)
            msg = got["choices"][0]["message"]
            assert (msg["reasoning_content"], msg["content"]) == \
                ("We need to greet.", "Hello there.")
            status, text = post(srv, "/v1/chat/completions", dict(base, stream=True))
            deltas = [c["choices"][0]["delta"] for c in sse_chunks(text)]
            assert "".join(d.get("reasoning_content") or "" for d in deltas) == \
                "We need to greet."
            assert "".join(d.get("content") or "" for d in deltas) == "Hello there."
            status, got = post_json(srv, "/v1/chat/completions",
                                    dict(base, reasoning_format="none"))
            assert got["choices"][0]["message"]["content"] == HARMONY
            status, show = post_json(srv, "/api/show", {"model": srv.model_id})
            assert "thinking" in show["capabilities"]
            ob = dict(base, stream=False)
            status, got = post_json(srv, "/api/chat", dict(ob, think=True))
            assert (got["message"]["thinking"], got["message"]["content"]) == \
                ("We need to greet.", "Hello there.")
            for extra in ({}, {"think": False}):
                status, got = post_json(srv, "/api/chat", dict(ob, **extra))
                assert got["message"]["content"] == "Hello there."
                assert "thinking" not in got["message"]
            seen = []
            real = type(m).chat_prompt
            monkeypatch.setattr(type(m), "chat_prompt", lambda self, *a, **k: (
                seen.append(k.get("template_kwargs")), real(self, *a, **k))[1])
            status, got = post_json(srv, "/api/chat", dict(ob, think="low"))
            assert status == 200 and seen[-1]["reasoning_effort"] == "low"


def test_chat_shows_harmony_as_ollama_and_keeps_the_answer(tiny_gguf, monkeypatch):
    """efedge chat on a gpt-oss-like template: the analysis between "Thinking..." and
    "...done thinking.", then the final channel; the conversation keeps the answer only
    (the template writes it back into the final channel). A chatml model's reply is
    written as it comes, as before."""
    import io

    from efedge.cli.chat import ChatREPL

    with efedge.load(tiny_gguf("qwen3moe", "F32"), chat_template=HARMONYISH) as m:
        _script(monkeypatch, m, HARMONY)
        out = io.StringIO()
        repl = ChatREPL(m, out=out, err=io.StringIO())
        repl.messages = list(HI)
        assert repl.reply()
        assert out.getvalue() == ("Thinking...\nWe need to greet.\n...done thinking.\n\n"
                                  "Hello there.\n")
        assert repl.messages[-1] == {"role": "assistant", "content": "Hello there."}
    with efedge.load(tiny_gguf("qwen3moe", "F32")) as plain:
        _script(monkeypatch, plain, "plain <|channel|> text")
        out = io.StringIO()
        repl = ChatREPL(plain, out=out, err=io.StringIO())
        repl.messages = list(HI)
        assert repl.reply() and out.getvalue() == "plain <|channel|> text\n"
        assert repl.messages[-1]["content"] == "plain <|channel|> text"


def test_an_assistant_turns_reasoning_content_reaches_the_template_as_thinking():
    """What a client sends back of an earlier reply: its reasoning_content is what
    gpt-oss's template reads as `thinking` (as llama-server copies it); a thinking field
    of its own is kept."""
    from efedge.server_requests import parse_chat

    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet."},
            {"role": "assistant", "content": "B", "reasoning_content": "x", "thinking": "y"},
            {"role": "user", "content": "again"}]
    req = parse_chat({"messages": msgs}, {})
    assert req.messages[1]["thinking"] == "Greet." and req.messages[2]["thinking"] == "y"
    assert "thinking" not in req.messages[0] and "thinking" not in req.messages[3]


H_CALL = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant "
          "to=functions.get_weather<|channel|>commentary json<|message|>{\"city\": \"Paris\"}")
H_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "the weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_harmony_tool_calls(tiny_gguf, monkeypatch):
    """gpt-oss calls a tool with a harmony message to functions.NAME (ended by <|call|>,
    an end-of-generation token): OpenAI's tool_calls (streamed and not, whatever the
    reasoning format), Ollama's, and the API's result.tool_calls; a forced tool_choice has
    no harmony grammar and is refused by name."""
    from efedge.generate import GenerationResult
    from efedge.tool_calls import parse_tool_calls

    want = {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    content, calls = parse_tool_calls(H_CALL, H_TOOLS)
    assert content is None and [c["function"] for c in calls] == [want]
    # not an offered tool: stays in the content as written
    assert parse_tool_calls(H_CALL.replace("get_weather", "nope"), H_TOOLS)[1] == []
    with efedge.load(tiny_gguf("qwen3moe", "F32"), chat_template=HARMONYISH) as m:
        _script(monkeypatch, m, H_CALL)
        with running_server(m) as srv:
            base = {"model": srv.model_id, "messages": HI, "tools": H_TOOLS}
            for extra in ({}, {"reasoning_format": "none"}):
                status, got = post_json(srv, "/v1/chat/completions", dict(base, **extra))
                choice = got["choices"][0]
                assert status == 200 and choice["finish_reason"] == "tool_calls", got
                assert [c["function"] for c in choice["message"]["tool_calls"]] == [want]
                assert not choice["message"]["content"]
                assert choice["message"].get("reasoning_content") == (
                    None if extra else "Need the weather.")
            status, text = post(srv, "/v1/chat/completions", dict(base, stream=True))
            chunks = sse_chunks(text)
            streamed = [tc["function"] for c in chunks
                        for tc in c["choices"][0]["delta"].get("tool_calls") or []]
            assert streamed == [want] and chunks[-1]["choices"][0]["finish_reason"] == \
                "tool_calls"
            assert "<|channel|>" not in text
            status, got = post_json(srv, "/api/chat", dict(base, stream=False))
            assert status == 200 and got["message"]["tool_calls"][0]["function"] == {
                "name": "get_weather", "arguments": {"city": "Paris"}}, got
            status, got = post_json(srv, "/v1/chat/completions",
                                    dict(base, tool_choice="required"))
            assert status == 400 and got["error"]["param"] == "tool_choice"
            assert "harmony" in got["error"]["message"]
        result = GenerationResult([], "length")
        m.chat(HI, tools=H_TOOLS, result=result)
        assert [c["function"] for c in result.tool_calls] == [want]
        with pytest.raises(efedge.UnsupportedModelError, match="harmony"):
            m.chat(HI, tools=H_TOOLS, tool_choice="required")


def test_run_single_turn_shows_harmony_as_chat_does(tiny_gguf, monkeypatch, tmp_path, capsys):
    """efedge run -st on a gpt-oss-like template: the analysis apart, as efedge chat shows
    it; without -st the text as generated."""
    from efedge.cli import main

    template = tmp_path / "harmony.jinja"
    template.write_text(HARMONYISH)
    path = str(tiny_gguf("qwen3moe", "F32"))
    with efedge.load(path) as m:
        ids = m.tokenize(HARMONY, add_special=False)
    script_tokens(monkeypatch, ids)
    assert main(["run", path, "-p", "hi", "-st", "--chat-template", str(template)]) == 0
    assert capsys.readouterr().out == ("Thinking...\nWe need to greet.\n...done thinking."
                                       "\n\nHello there.\n")
    assert main(["run", path, "-p", "hi", "--chat-template", str(template)]) == 0
    assert capsys.readouterr().out == HARMONY + "\n"
