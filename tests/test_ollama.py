"""Ollama's API (efedge/server_ollama.py): the listing routes' shapes, /api/generate
(raw, through the chat template, continued from `context`, fill in the middle with
`suffix`), /api/chat, streaming as JSON lines, the load-only call, and refusals in
Ollama's {"error": …} shape. Outputs equal the Python API's for the same settings."""

from __future__ import annotations

import json
import urllib.request

import pytest
from _http import post, post_json, running_server
from _scripted import script_tokens
from _vocab_fixtures import write_vocab_model

import efedge
from efedge.generate import GenerationResult

GREEDY = {"temperature": 0, "num_predict": 6}


@pytest.fixture(scope="module")
def model(tiny_gguf):
    with efedge.load(tiny_gguf("qwen3moe", "F32"), n_ctx=512) as m:
        yield m


@pytest.fixture(scope="module")
def srv(model):
    with running_server(model, model_id="tiny") as s:
        yield s


def lines(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def test_listing_routes(srv, model):
    version = json.loads(urllib.request.urlopen(srv.url + "/api/version").read())
    assert version["version"].count(".") == 2
    for route in ("/api/tags", "/api/ps"):
        (entry,) = json.loads(urllib.request.urlopen(srv.url + route).read())["models"]
        assert entry["name"] == entry["model"] == "tiny:latest"
        assert entry["size"] == model.path.stat().st_size and len(entry["digest"]) == 64
        assert entry["details"]["format"] == "gguf"
        assert entry["details"]["family"] == "qwen3moe"
        assert entry["details"]["quantization_level"] in ("ALL_F32", "F32")
    status, show = post_json(srv, "/api/show", {"model": "tiny:latest"})
    assert status == 200, show
    assert show["capabilities"] == ["completion"]  # chatml: no tool format, no FIM tokens
    assert show["model_info"]["general.architecture"] == "qwen3moe"
    assert show["template"] == model.chat_template().source
    status, err = post_json(srv, "/api/show", {"model": "other"})
    assert status == 404 and "other" in err["error"]


def test_generate_raw_streamed_and_not(srv, model):
    want_r = GenerationResult([], "")
    want = model.generate("hello there", max_tokens=6, temperature=0, result=want_r)
    body = {"model": "tiny", "prompt": "hello there", "raw": True, "options": GREEDY}
    status, text = post(srv, "/api/generate", body)  # streaming is Ollama's default
    got = lines(text)
    assert status == 200 and all(not x["done"] for x in got[:-1]) and got[-1]["done"]
    assert "".join(x["response"] for x in got) == want
    final = got[-1]
    assert final["done_reason"] == "length" and final["eval_count"] == 6
    assert final["prompt_eval_count"] == len(model.tokenize("hello there"))
    assert "context" not in final  # as Ollama: a raw prompt's reply has none to continue
    assert final["total_duration"] >= final["eval_duration"] > 0
    status, one = post_json(srv, "/api/generate", dict(body, stream=False))
    assert status == 200 and one["response"] == want and one["done"] is True
    assert "context" not in one
    # as Ollama: raw mode takes no context (nor system): a 400, not a guess
    ids = model.tokenize("hello there") + want_r.tokens
    for extra in ({"context": ids}, {"system": "Be brief."}):
        status, err = post_json(srv, "/api/generate", dict(body, stream=False, **extra))
        assert status == 400 and "raw mode does not support" in err["error"], err


def test_generate_continued_from_context_goes_through_the_template(srv, model):
    """As Ollama: without raw, the new prompt is a user turn of the chat template after
    the context's ids (one BOS, the context's) — it was appended as raw text."""
    body = {"model": "tiny", "prompt": "hi", "system": "Be brief.", "stream": False,
            "options": GREEDY}
    status, first = post_json(srv, "/api/generate", body)
    assert status == 200, first
    status, more = post_json(srv, "/api/generate", dict(body, prompt="and then?",
                                                         context=first["context"]))
    assert status == 200, more
    turn = model.chat_prompt([{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "and then?"}])
    ids = first["context"] + (turn[1:] if model.tokenizer.add_bos else turn)
    assert more["prompt_eval_count"] == len(ids)
    assert more["response"] == model.generate(ids, max_tokens=6, temperature=0)
    assert more["context"][:len(ids)] == ids
    for bad in ([model.n_vocab], ["a"], "abc"):
        status, err = post_json(srv, "/api/generate", dict(body, context=bad))
        assert status == 400 and "context" in err["error"], err


def test_generate_through_the_template_and_chat(srv, model):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    want = model.chat(msgs, max_tokens=6, temperature=0)
    status, got = post_json(srv, "/api/generate", {
        "model": "tiny", "prompt": "hi", "system": "Be brief.", "stream": False,
        "options": GREEDY})
    assert status == 200 and got["response"] == want, got
    status, text = post(srv, "/api/chat", {"model": "tiny", "messages": msgs,
                                           "options": GREEDY})
    got = lines(text)
    assert status == 200 and "".join(x["message"]["content"] for x in got) == want
    assert got[-1]["done"] and got[-1]["message"]["role"] == "assistant"
    # options map onto the sampler; format "json" is JSON mode; stop strings
    opts = dict(GREEDY, num_predict=12, repeat_penalty=1.3, stop=["\n\n"])
    status, got = post_json(srv, "/api/chat", {"model": "tiny", "messages": msgs,
                                               "options": opts, "stream": False,
                                               "format": "json"})
    assert status == 200
    assert got["message"]["content"] == model.chat(msgs, max_tokens=12, temperature=0,
                                                   repeat_penalty=1.3, stop=["\n\n"],
                                                   format="json")


def test_load_only_calls(srv):
    # as Ollama: an empty prompt is the load call, whatever else comes with it (a suffix
    # or a context ran a generation from nothing)
    for route, body in [("/api/generate", {"model": "tiny"}),
                        ("/api/generate", {"model": "tiny", "prompt": "", "suffix": "x"}),
                        ("/api/generate", {"model": "tiny", "context": [1, 2]}),
                        ("/api/chat", {"model": "tiny:latest", "messages": []})]:
        status, got = post_json(srv, route, body)
        assert status == 200 and got["done"] is True and got["done_reason"] == "load", got
        # keep_alive 0 is Ollama's unload call: answered as Ollama answers it
        for ka in (0, "0", "0s", "0m"):
            status, got = post_json(srv, route, dict(body, keep_alive=ka))
            assert status == 200 and got["done_reason"] == "unload", (ka, got)
        assert post_json(srv, route, dict(body, keep_alive="5m"))[1]["done_reason"] == "load"


@pytest.mark.parametrize("route, body, status, words", [
    # the tiny model's chatml template writes no <think>: it cannot think (Ollama's 400)
    ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                   "think": True}, 400, "does not support thinking"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "think": "high"}, 400,
     "does not support thinking"),
    ("/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404,
     "nope"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x",
                                                   "images": ["aGk="]}]}, 400, "images"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "images": ["aGk="]}, 400, "images"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "suffix": "y"}, 400,
     "fill-in-the-middle"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "context": ["a"]}, 400, "context"),
    ("/api/generate", {"model": "tiny", "prompt": 5}, 400, "prompt"),
    # a prompt that is no string is not the load call (it was answered "load")
    ("/api/generate", {"model": "tiny", "prompt": 0}, 400, "prompt"),
    # Ollama renders `template` (a Go template); efedge cannot: refused, not ignored
    ("/api/generate", {"model": "tiny", "prompt": "x", "template": "{{ .Prompt }}"}, 400,
     "'template' is not supported"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "template": 5}, 400, "template"),
    # a model that is no string is a 400 naming the field (/api/show answered 200)
    ("/api/show", {"model": 5}, 400, "'model' must be a string"),
    ("/api/show", {"name": ["tiny"]}, 400, "'name' must be a string"),
    ("/api/generate", {"model": 5}, 400, "'model' must be a string"),
    ("/api/chat", {"model": 5, "messages": []}, 400, "'model' must be a string"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                   "options": {"temperature": -1}}, 400, "temperature"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                   "format": {"type": "string", "pattern": "a+"}}, 400, "pattern"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                   "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tool_call"),
    ("/api/chat", {"model": "tiny", "messages": "x"}, 400, "messages"),
    # think's strings are levels, as in Ollama: "false" was taken as thinking on
    ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                   "think": "false"}, 400, "invalid think value"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "think": ""}, 400, "think"),
])
def test_refusals_in_ollamas_shape(srv, route, body, status, words):
    got_status, got = post_json(srv, route, body)
    assert got_status == status and set(got) == {"error"}, got
    assert words in got["error"]


def test_generate_takes_the_models_own_template(srv, model):
    """`template` naming the model's own template (the one /api/show gives) is what
    efedge renders anyway: taken."""
    body = {"model": "tiny", "prompt": "hi", "stream": False, "options": GREEDY}
    status, want = post_json(srv, "/api/generate", body)
    status, got = post_json(srv, "/api/generate", dict(
        body, template=model.chat_template().source))
    assert status == 200 and got["response"] == want["response"], got


def test_methods(srv):
    req = urllib.request.Request(srv.url + "/api/tags", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req)
    assert exc.value.code == 405 and exc.value.headers["Allow"] == "GET, HEAD"
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(srv.url + "/api/chat")
    assert exc.value.code == 405 and exc.value.headers["Allow"] == "POST"


def test_generate_with_a_suffix_fills_in_the_middle(tmp_path):
    path = write_vocab_model(tmp_path / "fim.gguf", extra_tokens=[
        ("<|fim_prefix|>", 3), ("<|fim_suffix|>", 3), ("<|fim_middle|>", 3)])
    with efedge.load(path) as m, running_server(m, model_id="coder") as s:
        want = m.infill("def f(x):\n    return ", "\n", max_tokens=6, temperature=0)
        status, got = post_json(s, "/api/generate", {
            "model": "coder", "prompt": "def f(x):\n    return ", "suffix": "\n",
            "stream": False, "options": GREEDY})
        assert status == 200 and got["response"] == want, got
        status, show = post_json(s, "/api/show", {"model": "coder"})
        assert "insert" in show["capabilities"]


def test_call_arguments_with_a_lone_surrogate(model, monkeypatch):
    """A call whose arguments hold half a surrogate pair (the model wrote "\\ud83d"):
    Ollama's arguments object carries the string, and the answer (one object or JSON
    lines) is still UTF-8, the character escaped — it died in encode, a traceback in the
    log and the connection dropped."""
    call = '<tool_call>\n{"name": "say", "arguments": {"text": "\\ud83d!"}}\n</tool_call>'
    script_tokens(monkeypatch, model.tokenize(call, add_special=False))
    tools = [{"type": "function", "function": {"name": "say"}}]
    with running_server(model) as srv:
        srv.tools_error = None  # (the tiny template renders no tools: the answer is tested)
        for stream in (False, True):
            status, text = post(srv, "/api/chat", {"messages": [{"role": "user", "content":
                                                                 "hi"}], "tools": tools,
                                                   "stream": stream})
            assert status == 200, text
            (got,) = lines(text)[-1]["message"]["tool_calls"]
            assert got["function"] == {"name": "say", "arguments": {"text": "\ud83d!"}}


def test_a_conversation_past_the_context_drops_its_oldest_turns(srv, model):
    """Ollama fits a long chat instead of refusing it (Open WebUI and Continue send the
    whole history): the oldest turns go, the system prompt and the newest message stay,
    as `efedge chat` fits its own; the reply equals the Python API's on what was kept."""
    long = "the cat sat on the mat and looked at the dog " * 8
    sys_ = {"role": "system", "content": "You answer briefly."}
    history = []
    for i in range(12):
        history += [{"role": "user", "content": f"{i}: {long}"},
                    {"role": "assistant", "content": long}]
    msgs = [sys_] + history + [{"role": "user", "content": "and now?"}]
    assert len(model.chat_prompt(msgs)) >= model.n_ctx  # past the context (512)
    status, got = post_json(srv, "/api/chat", {"model": "tiny", "messages": msgs,
                                              "stream": False, "options": GREEDY})
    assert status == 200, got
    # what it kept: the newest whole turns that leave 6 tokens (num_predict) for the reply
    k = next(k for k in range(len(history), -1, -2)
             if len(model.chat_prompt([sys_] + history[len(history) - k:] + msgs[-1:]))
             + 6 <= model.n_ctx)
    kept = [sys_] + history[len(history) - k:] + msgs[-1:]
    assert 0 < k < len(history)
    assert got["prompt_eval_count"] == len(model.chat_prompt(kept))
    want = model.chat(kept, max_tokens=6, temperature=0)
    assert got["message"]["content"] == want


def test_a_prompt_past_the_context_is_cut_as_ollamas_runner_cuts_it(srv, model):
    """A raw prompt longer than the context keeps its first 4 tokens and its end, leaving
    room for the reply (num_predict, or a quarter of the context) — Ollama's runner keeps
    `num_keep` tokens and the end —, where the OpenAI routes answer 400."""
    text = "one two three four five six seven eight nine ten " * 80
    ids = model.tokenize(text)
    assert len(ids) > model.n_ctx
    status, got = post_json(srv, "/api/generate", {"model": "tiny", "prompt": text,
                                                  "raw": True, "stream": False,
                                                  "options": GREEDY})
    assert status == 200, got
    cut = ids[:4] + ids[len(ids) - (model.n_ctx - 6 - 4):]
    assert got["prompt_eval_count"] == len(cut) == model.n_ctx - 6
    assert got["response"] == model.generate(cut, max_tokens=6, temperature=0)
    status, got = post_json(srv, "/v1/completions", {"prompt": text, "max_tokens": 6})
    assert status == 400 and got["error"]["code"] == "context_length_exceeded"
