"""The OpenAI-compatible server: every endpoint, streaming and not, the 4xx/405 cases,
concurrent clients, a client that disconnects (streaming or not), shutdown mid-stream, a
broken chat template, the official `openai` client (when installed), and `efedge serve`
itself (including its refusals: a taken port, a bad host or port, a bogus template)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
from _http import running_server, serve_kwargs
from _scripted import script_tokens

import efedge
from efedge import server_replies
from efedge.server import Handler, make_server
from efedge.server_requests import APIError

ROOT = Path(__file__).resolve().parent.parent
HI = [{"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def model_path(tiny_gguf) -> Path:
    return tiny_gguf("qwen3moe", "F32")


@pytest.fixture(scope="module")
def model(model_path):
    with efedge.load(model_path) as m:
        yield m


@pytest.fixture(scope="module")
def server(model):
    with running_server(model, max_body=64 * 1024) as srv:
        yield srv


def call(srv, path: str, body=None, *, raw: bytes | None = None, method: str | None = None):
    """(status, parsed JSON or text) for one request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(srv.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, ctype, text = r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        status, ctype, text = e.code, e.headers["Content-Type"], e.read().decode()
    return status, (json.loads(text) if ctype.startswith("application/json") else text)


def events(text: str) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded except the final [DONE]."""
    out = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def assert_error(status: int, body, want_status: int, code: str | None = None) -> None:
    assert status == want_status, body
    err = body["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err


# -- the endpoints -------------------------------------------------------------------------
def test_health_and_models(server):
    status, body = call(server, "/health")
    assert status == 200 and body["status"] == "ok"
    status, body = call(server, "/v1/models")
    assert status == 200 and body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == server.model_id and card["object"] == "model"
    status, body = call(server, f"/v1/models/{server.model_id}")
    assert status == 200 and body["id"] == server.model_id


def test_chat_completion(server, model):
    req = {"model": server.model_id, "messages": HI, "max_tokens": 5, "temperature": 0}
    status, body = call(server, "/v1/chat/completions", req)
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == model.chat(HI, max_tokens=5, temperature=0.0)
    assert choice["finish_reason"] in ("length", "stop")
    u = body["usage"]
    assert u["prompt_tokens"] == len(model.chat_prompt(HI))
    assert 0 < u["completion_tokens"] <= 5
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_chat_completion_stream(server):
    req = {"messages": HI, "max_tokens": 5, "temperature": 0}
    _, whole = call(server, "/v1/chat/completions", req)
    status, text = call(server, "/v1/chat/completions",
                        dict(req, stream=True, stream_options={"include_usage": True}))
    assert status == 200
    evs = events(text)
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content", "")
                      for c in chunks if c["choices"])
    assert content == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_completion_and_stream_and_stop(server, model):
    req = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    status, body = call(server, "/v1/completions", req)
    assert status == 200 and body["object"] == "text_completion"
    text = body["choices"][0]["text"]
    assert text == model.generate("Once upon a time", max_tokens=6, temperature=0.0)
    assert body["usage"]["prompt_tokens"] == len(model.tokenize("Once upon a time"))
    status, sse = call(server, "/v1/completions", dict(req, stream=True))
    evs = events(sse)
    assert evs[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in evs[:-1]) == text
    assert evs[-2]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]
    _, echoed = call(server, "/v1/completions", dict(req, echo=True))
    assert echoed["choices"][0]["text"] == "Once upon a time" + text
    if len(text) >= 3:
        stop = text[1:3]
        _, cut = call(server, "/v1/completions", dict(req, stop=[stop]))
        assert cut["choices"][0]["text"] == text[:text.find(stop)]
        assert cut["choices"][0]["finish_reason"] == "stop"
    _, toks = call(server, "/v1/completions", dict(req, prompt=model.tokenize("Once upon")))
    assert toks["usage"]["prompt_tokens"] == len(model.tokenize("Once upon"))


# -- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body, status, code", [
    ("/v1/chat/completions", {"messages": HI, "temperature": "hot"}, 400, "invalid_type"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": "5"}, 400, "invalid_type"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": True}, 400, "invalid_type"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "invalid_type"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "invalid_type"),
    ("/v1/chat/completions", {"messages": HI, "stream": "yes"}, 400, "invalid_type"),
    ("/v1/chat/completions", {"messages": HI, "stop": 5}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": "x"}, 400, "missing_field"),
    ("/v1/completions", {"max_tokens": 3}, 400, "missing_field"),
    ("/v1/completions", {"prompt": 12}, 400, "invalid_type"),
    ("/v1/completions", [1, 2], 400, "invalid_type"),
    ("/v1/chat/completions", {"messages": HI, "temperature": -1}, 400, "invalid_value"),
    ("/v1/chat/completions", {"messages": HI, "top_p": 1.5}, 400, "invalid_value"),
    ("/v1/chat/completions", {"messages": HI, "temperature": 2.5}, 400, "invalid_value"),
    ("/v1/chat/completions", {"messages": HI, "presence_penalty": 3}, 400, "invalid_value"),
    ("/v1/chat/completions", {"messages": HI, "logit_bias": {"5": -101}}, 400, "invalid_value"),
    ("/v1/chat/completions", {"messages": HI, "tool_choice": "required"}, 400, "invalid_value"),
    # tools on a template without the <tool_call> format (the tiny file has none: chatml)
    ("/v1/chat/completions", {"messages": HI, "functions": [{"name": "f"}]}, 400,
     "unsupported"),
    ("/v1/chat/completions", {"messages": HI, "top_logprobs": 2}, 400, "invalid_value"),
    ("/v1/chat/completions", {"messages": HI, "logprobs": True, "top_logprobs": 21}, 400,
     "invalid_value"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, 400, "invalid_type"),
    ("/v1/completions", {"prompt": "x", "best_of": 2}, 400, "unsupported"),
    ("/v1/completions", {"prompt": "x", "top_k": -3}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -7}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": [1, 10**9]}, 400, "invalid_value"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "invalid_type"),
    ("/v1/chat/completions", {"messages": HI, "n": 2}, 400, "unsupported"),
    ("/v1/chat/completions", {"messages": HI, "model": "gpt-4o"}, 404, "model_not_found"),
    ("/v1/nope", {"x": 1}, 404, "unknown_url"),
])
def test_bad_requests(server, path, body, status, code):
    got, resp = call(server, path, body)
    assert_error(got, resp, status, code)


def test_openai_ranges_and_error_params(server, model):
    """OpenAI's ranges (temperature 0-2, top_p 0-1 with 0 allowed) and a `param` naming the
    field in every 400 about one."""
    greedy = {"messages": HI, "max_tokens": 3, "temperature": 0}
    _, want = call(server, "/v1/chat/completions", greedy)
    status, body = call(server, "/v1/chat/completions", dict(greedy, temperature=0.7, top_p=0))
    assert status == 200, body  # a nucleus of one token: greedy
    assert body["choices"][0]["message"] == want["choices"][0]["message"]
    status, body = call(server, "/v1/chat/completions", dict(greedy, temperature=2))
    assert status == 200, body
    for field, value in [("temperature", 2.01), ("temperature", -1), ("top_p", -0.1),
                         ("top_p", 1.01), ("top_k", -1), ("frequency_penalty", -2.5),
                         # a penalty llama.cpp's float cannot hold (it overflowed in numpy)
                         ("repeat_penalty", 1e308), ("repeat_penalty", 1e-300),
                         ("logprobs", 1), ("top_logprobs", -1),
                         ("tool_choice", {"type": "function", "function": {"name": "f"}})]:
        status, body = call(server, "/v1/chat/completions", dict(greedy, **{field: value}))
        assert_error(status, body, 400)
        assert body["error"]["param"] == field, body
    status, body = call(server, "/v1/chat/completions", raw=b'{"messages": [{"role": "user", '
                        b'"content": "Hi"}], "temperature": NaN}')  # Python's json reads NaN
    assert_error(status, body, 400)
    assert body["error"]["param"] == "temperature", body
    status, body = call(server, "/v1/completions", {"prompt": "x", "best_of": 3})
    assert_error(status, body, 400, "unsupported")
    assert body["error"]["param"] == "best_of", body
    status, body = call(server, "/v1/completions", {"prompt": "x", "logprobs": -1})
    assert_error(status, body, 400, "invalid_value")
    assert body["error"]["param"] == "logprobs", body
    # "none" / "auto" tool choices, empty tools and logprobs false ask for nothing extra
    status, body = call(server, "/v1/chat/completions", dict(
        greedy, tools=[], tool_choice="none", function_call="auto", logprobs=False,
        top_logprobs=0, logit_bias={}))
    assert status == 200 and body["choices"][0]["message"] == want["choices"][0]["message"]
    # the largest penalty a float holds bans the repeated tokens, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the model thread's too)
        for path, body in [("/v1/chat/completions", dict(greedy, repeat_penalty=3.4e38)),
                           ("/completion", {"prompt": "hi", "n_predict": 3,
                                            "repeat_penalty": 1.2e-38})]:
            status, got = call(server, path, body)
            assert status == 200, got
    # presence / frequency penalties are applied, as the API applies them
    pen = dict(frequency_penalty=1.5, presence_penalty=0.5)
    status, body = call(server, "/v1/chat/completions", dict(greedy, **pen))
    assert status == 200
    assert body["choices"][0]["message"]["content"] == model.chat(
        greedy["messages"], max_tokens=greedy["max_tokens"], temperature=0, **pen)
    too_long = [{"role": "user", "content": "word " * (model.n_ctx * 2)}]
    status, body = call(server, "/v1/chat/completions", {"messages": too_long})
    assert_error(status, body, 400, "context_length_exceeded")
    assert body["error"]["param"] == "messages"
    status, body = call(server, "/v1/completions", {"prompt": [1] * model.n_ctx})
    assert_error(status, body, 400, "context_length_exceeded")
    assert body["error"]["param"] == "prompt"
    status, body = call(server, "/v1/completions", raw=b"")
    assert_error(status, body, 400, "invalid_json")
    assert "empty" in body["error"]["message"]
    if not model.tokenize(""):  # a vocab without BOS: an empty prompt is nothing to continue
        status, body = call(server, "/v1/completions", {"prompt": ""})
        assert_error(status, body, 400, "invalid_value")
        assert body["error"]["param"] == "prompt"


def test_bad_json_big_body_routes_and_context(server, model):
    assert_error(*call(server, "/v1/chat/completions", raw=b'{"messages": [}'), 400,
                 "invalid_json")
    assert_error(*call(server, "/v1/completions", raw=b"\xff\xfe"), 400, "invalid_json")
    # nesting deeper than the JSON parser's recursion limit, well within max_body: a 400
    # (it was a RecursionError that closed the connection without any answer)
    for deep in (b"[" * 5_000, b'{"prompt": ' + b'{"a": ' * 5_000):
        assert_error(*call(server, "/v1/completions", raw=deep), 400, "invalid_json")
    big = json.dumps({"prompt": "x" * (server.max_body + 10)}).encode()
    assert_error(*call(server, "/v1/completions", raw=big), 413, "body_too_large")
    assert_error(*call(server, "/nowhere"), 404, "unknown_url")
    assert_error(*call(server, "/v1/chat/completions"), 405, "method_not_allowed")
    too_long = [{"role": "user", "content": "word " * (model.n_ctx * 2)}]
    assert_error(*call(server, "/v1/chat/completions", {"messages": too_long}), 400,
                 "context_length_exceeded")
    # streaming requests report the same errors as a plain 4xx, before any event
    assert_error(*call(server, "/v1/completions",
                       {"prompt": [1] * (model.n_ctx + 1), "stream": True}), 400,
                 "context_length_exceeded")
    # no Content-Length → 411; an error keeps a keep-alive connection usable
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.putrequest("POST", "/v1/completions")
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 411 and json.loads(r.read())["error"]["code"] == "length_required"
    conn.close()
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", "/v1/unknown", body=b'{"a": 1}')
    r = conn.getresponse()
    assert r.status == 404
    r.read()
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"prompt": "hi", "max_tokens": 2, "temperature": 0}).encode())
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["object"] == "text_completion"
    conn.close()


# Ollama's routes map `options` onto the OpenAI fields: a bad one was reported by the
# OpenAI name ('max_tokens' for num_predict), which the client never sent
OLLAMA_BODIES = [("/api/generate", {"prompt": "hi", "stream": False}),
                 ("/api/generate", {"prompt": "hi", "raw": True, "stream": False}),
                 ("/api/chat", {"messages": HI, "stream": False})]


@pytest.mark.parametrize("option, value", [
    ("num_predict", -5), ("num_predict", "5"), ("num_predict", True), ("num_predict", 2.5),
    ("temperature", "hot"), ("temperature", 3), ("top_p", 1.5), ("top_k", -3),
    ("top_k", 2.5), ("min_p", 2), ("seed", "x"), ("stop", 5), ("stop", [1]),
    ("repeat_penalty", "x"), ("repeat_last_n", -5), ("presence_penalty", 3),
    ("frequency_penalty", "x"),
])
def test_ollama_errors_name_the_option_sent(server, option, value):
    for path, body in OLLAMA_BODIES:
        status, got = call(server, path, dict(body, options={"temperature": 0, option: value}))
        assert status == 400 and set(got) == {"error"}, (path, got)
        assert got["error"].startswith(f"'options.{option}' must be"), (path, got)
        assert "max_tokens" not in got["error"], (path, got)


def test_ollama_boolean_fields_are_type_checked(server):
    """`raw: "yes"` was taken as true where `stream: "yes"` is a 400: both are now."""
    base = {"prompt": "hi", "options": {"num_predict": 1}}
    for field in ("raw", "stream"):
        for value in ("yes", 1, [True]):
            status, got = call(server, "/api/generate", dict(base, **{field: value}))
            assert status == 400 and got["error"].startswith(f"'{field}' must be a boolean"), \
                (field, value, got)
    # null is the default (false), as for stream
    status, got = call(server, "/api/generate", dict(base, raw=None, stream=False))
    assert status == 200 and got["done"] is True, got


# -- concurrency and disconnects --------------------------------------------------------------
def test_concurrent_clients(server, model):
    prompts = [f"prompt number {i}" for i in range(4)]
    want = [model.generate(p, max_tokens=4, temperature=0.0) for p in prompts]
    got: dict[int, str] = {}

    def client(i: int) -> None:
        status, body = call(server, "/v1/completions",
                            {"prompt": prompts[i], "max_tokens": 4, "temperature": 0})
        assert status == 200, body
        got[i] = body["choices"][0]["text"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [got.get(i) for i in range(4)] == want


def test_a_burst_of_connections_waits_in_the_listen_backlog(model):
    """A burst's connections wait in the kernel's listen backlog for the server to accept
    them: with socketserver's backlog of 5 the kernel dropped the rest (a burst of
    clients got TCP resets, not the queue's 503). The server is not serving yet, so
    nothing accepts and every connect must complete through the kernel's handshake
    alone; one the kernel dropped would time out."""
    srv = make_server(model, "127.0.0.1", 0)
    socks: list[socket.socket] = []
    try:
        for _ in range(40):
            socks.append(socket.create_connection(srv.server_address[:2], timeout=0.5))
    finally:
        for s in socks:
            s.close()
        srv.server_close()
    # the backlog grows with the line the server keeps (its 503 comes past that)
    big = make_server(model, "127.0.0.1", 0, max_queue=500)
    big.server_close()
    assert big.request_queue_size > 500


def test_client_disconnect_cancels_generation(server, model):
    host, port = server.server_address[:2]
    body = json.dumps({"prompt": "A long story", "max_tokens": 100_000, "stream": True,
                       "temperature": 1.0, "min_p": 0.0}).encode()
    model.reset_stats()
    s = socket.create_connection((host, port), timeout=60)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
              b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while got.count(b"data: ") < 2:
        chunk = s.recv(4096)
        assert chunk, "the server closed the stream"
        got += chunk
    assert got.startswith(b"HTTP/1.1 200")
    s.close()
    t0 = time.monotonic()
    status, resp = call(server, "/v1/completions", {"prompt": "next", "max_tokens": 2})
    assert status == 200, resp
    assert time.monotonic() - t0 < 20, "the abandoned generation was not cancelled"
    assert model.stats()["tokens_generated"] < model.n_ctx - 50
    assert call(server, "/health")[0] == 200


@pytest.mark.skipif(sys.platform == "win32", reason="FD_SETSIZE limits descriptor numbers "
                    "on POSIX only")
def test_connections_past_descriptor_1024_are_served(server):
    # a server with many connections open, or embedded in an app with many files open,
    # accepts sockets numbered 1024 and up; select() cannot watch those (ValueError), and
    # the look for a departed client took that for "gone": every request was cancelled
    # and its connection closed without an answer
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200 and (hard == resource.RLIM_INFINITY or hard >= 1200):
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    elif soft < 1200:
        pytest.skip(f"this process may open only {hard} files")
    held = []
    try:
        while len(held) < 1100 and (not held or held[-1] < 1030):
            held.append(os.open(os.devnull, os.O_RDONLY))
        for stream in (False, True):
            status, body = call(server, "/v1/completions", {"prompt": "hi", "max_tokens": 3,
                                                            "stream": stream})
            assert status == 200, body
    finally:
        for fd in held:
            os.close(fd)
        if soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _send_raw(srv, body: dict, path: str = "/v1/completions") -> socket.socket:
    """A socket that has sent one POST of `body` (read its answer with recv)."""
    host, port = srv.server_address[:2]
    data = json.dumps(body).encode()
    s = socket.create_connection((host, port), timeout=60)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def test_a_reset_connection_leaves_no_traceback(server, capfd):
    """A client that resets its connection (close with SO_LINGER 0, as a killed process
    or a proxy does) once answered: the handler waiting for its next request gets
    ECONNRESET, which socketserver printed to stderr as a traceback per connection."""
    capfd.readouterr()
    for _ in range(3):
        s = _send_raw(server, {"content": "hello"}, "/tokenize")
        assert s.recv(1 << 16).startswith(b"HTTP/1.1 200")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    time.sleep(0.3)
    assert call(server, "/health")[0] == 200
    assert "Traceback" not in capfd.readouterr().err


def test_client_disconnect_cancels_non_streaming(server, model):
    # greedy on the tiny model runs to the end of the context (no end-of-generation token),
    # so only a cancel can stop it early; tokens arrive far faster than the handler's
    # peer check interval, which must run regardless
    before = server.worker.n_cancelled
    model.reset_stats()
    s = _send_raw(server, {"prompt": "A long story", "max_tokens": 100_000,
                           "temperature": 0})
    deadline = time.monotonic() + 60
    while model.stats()["tokens_generated"] == 0:  # generating: nothing comes back yet
        assert time.monotonic() < deadline, "the generation never started"
        time.sleep(0.005)
    s.close()
    # the worker finishes the first job before it starts this one
    status, resp = call(server, "/v1/completions", {"prompt": "next", "max_tokens": 2})
    assert status == 200, resp
    assert server.worker.n_cancelled == before + 1, "the abandoned generation ran to its end"
    assert model.stats()["tokens_generated"] < model.n_ctx - 50


@pytest.mark.parametrize("path, body, marker", [
    ("/api/generate", {"prompt": "A long story", "raw": True,
                       "options": {"num_predict": 100_000, "temperature": 1.0, "min_p": 0.0}},
     b'"done": false'),
    ("/completion", {"prompt": "A long story", "n_predict": 100_000, "stream": True,
                     "temperature": 1.0, "min_p": 0.0}, b"data: ")])
def test_client_disconnect_cancels_on_llama_cpp_and_ollama_routes(server, model, path, body,
                                                                  marker):
    before = server.worker.n_cancelled
    s = _send_raw(server, body, path)
    got = b""
    while got.count(marker) < 2:
        chunk = s.recv(4096)
        assert chunk, "the server closed the stream"
        got += chunk
    assert got.startswith(b"HTTP/1.1 200")
    s.close()
    status, resp = call(server, "/v1/completions", {"prompt": "next", "max_tokens": 2})
    assert status == 200, resp
    assert server.worker.n_cancelled == before + 1, "the abandoned generation ran to its end"


@pytest.mark.skipif(sys.platform == "win32", reason="accepted sockets inheriting the "
                    "listener's SO_SNDBUF (no autotuning) is what fills the buffers")
def test_a_client_that_stops_reading_cancels_its_stream(model_path, monkeypatch):
    # a client that stays connected but stops reading (a suspended laptop, a frozen UI):
    # once the send buffers are full the handler's write times out (Handler.timeout) with
    # TimeoutError, which is neither a reset nor a broken pipe. The generation must be
    # cancelled then, not left running to the end of the context for nobody
    monkeypatch.setattr(Handler, "timeout", 0.2)
    model = efedge.load(model_path, n_ctx=4096)  # room to generate well past the timeout
    srv = make_server(model, "127.0.0.1", 0)
    # small buffers both ends (accepted sockets inherit the listener's SO_SNDBUF, and a
    # set size turns off Linux's autotuning), so a few events fill them
    srv.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        s.connect(srv.server_address[:2])
        data = json.dumps({"prompt": "A long story", "max_tokens": 100_000, "stream": True,
                           "temperature": 0}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                  + str(len(data)).encode() + b"\r\n\r\n" + data)
        deadline = time.monotonic() + 60  # never read: wait for the worker to be free
        while srv.worker._current is not None or model.stats()["tokens_generated"] == 0:
            assert time.monotonic() < deadline, "the generation was not cancelled"
            time.sleep(0.05)
        assert srv.worker.n_cancelled == 1, "the unread generation ran to its end"
    finally:
        s.close()
        srv.shutdown()
        srv.server_close()
        t.join(timeout=10)
        model.close()


def test_requests_whose_clients_left_free_their_place_in_line(model, monkeypatch):
    """A full line answers 503 server_busy, but requests whose clients left while they
    waited do not count: a burst of abandoned requests must not lock new ones out."""
    from efedge.server_requests import parse_completion
    from efedge.server_worker import ModelWorker

    release = threading.Event()
    ran: list = []

    def run(self, job):  # the model "busy" until released; records what it ran
        ran.append(job)
        release.wait(30)
        job.events.put(("done", {}, "stop", None, None))

    monkeypatch.setattr(ModelWorker, "_run", run)
    worker = ModelWorker(model, max_queue=2)
    try:
        req = parse_completion({"prompt": "hi", "max_tokens": 1}, {})
        busy = worker.submit(req)
        deadline = time.monotonic() + 10
        while not ran:  # the first one is running: the line is empty
            assert time.monotonic() < deadline
            time.sleep(0.01)
        left = [worker.submit(req), worker.submit(req)]
        with pytest.raises(APIError) as exc:
            worker.submit(req)
        assert (exc.value.status, exc.value.code) == (503, "server_busy")
        assert exc.value.headers == {"Retry-After": "1"}  # when a client may ask again
        for job in left:  # their clients hang up (the HTTP side cancels them)
            worker.cancel(job)
        assert worker.waiting() == 0
        kept = worker.submit(req)  # 503 before: the two abandoned ones filled the line
        assert worker.waiting() == 1
        release.set()
        assert kept.events.get(timeout=30)[0] == "done"
        assert busy.events.get(timeout=30)[0] == "done"
        assert ran == [busy, kept]  # the abandoned ones never ran
    finally:
        release.set()
        worker.stop()


def test_shutdown_ends_a_stream_cancelled(model):
    srv = make_server(model, "127.0.0.1", 0)
    # shutdown() waits for serve_forever's next poll: at the default 0.5 s the tiny
    # model's whole 512-token context (~0.25 s unloaded) could be generated first and the
    # stream end "length" before server_close cancels it
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.01},
                         daemon=True)
    t.start()
    try:
        s = _send_raw(srv, {"prompt": "A long story", "max_tokens": 100_000,
                            "temperature": 0, "stream": True})
        got = b""
        while got.count(b"data: ") < 2:
            chunk = s.recv(4096)
            assert chunk, "the server closed the stream"
            got += chunk
    finally:
        srv.shutdown()
        srv.server_close()  # what Ctrl-C does in `efedge serve`
        t.join(timeout=10)
    with pytest.raises(APIError) as info:  # nothing new is queued once stopped
        srv.worker.submit(None)
    assert info.value.status == 503 and info.value.code == "server_shutting_down"
    while chunk := s.recv(65536):
        got += chunk
    s.close()
    evs = events(got.split(b"\r\n\r\n", 1)[1].decode())
    assert evs[-1] == "[DONE]"
    assert evs[-2]["choices"][0]["finish_reason"] == "cancelled"
    assert all(e["choices"][0]["finish_reason"] is None for e in evs[:-2])
    assert srv.worker.n_cancelled == 1


def test_other_methods_get_json_405(server):
    host, port = server.server_address[:2]
    for method, path, allow in [("PUT", "/v1/completions", "POST"),
                                ("DELETE", "/v1/models", "GET, HEAD"),
                                ("PATCH", "/health", "GET, HEAD"),
                                ("OPTIONS", "/v1/chat/completions", "POST"),
                                ("BREW", "/nowhere", "GET, HEAD, POST")]:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        conn.request(method, path, body=b'{"a": 1}')
        r = conn.getresponse()
        body = json.loads(r.read())
        assert_error(r.status, body, 405, "method_not_allowed")
        assert r.headers["Allow"] == allow and r.headers["Content-Type"].startswith(
            "application/json")
        # the body was read: the keep-alive connection still serves
        conn.request("GET", "/health")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
        conn.close()
    status, body = call(server, "/v1/completions")  # GET on a POST route
    assert_error(status, body, 405, "method_not_allowed")
    # the standard library's own errors are JSON too
    s = socket.create_connection((host, port), timeout=60)
    s.sendall(b"GET /health HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n")  # too many
    raw = b""
    while chunk := s.recv(4096):
        raw += chunk
    s.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431") and b"application/json" in head
    assert json.loads(payload)["error"]["message"]


def test_echo_token_id_prompt(server, model):
    ids = model.tokenize("Once upon")
    req = {"prompt": ids, "max_tokens": 3, "temperature": 0, "echo": True}
    _, plain = call(server, "/v1/completions", dict(req, echo=False))
    _, echoed = call(server, "/v1/completions", req)
    prompt_text = model.detokenize(ids)
    assert prompt_text and echoed["choices"][0]["text"] == prompt_text + \
        plain["choices"][0]["text"]
    _, sse = call(server, "/v1/completions", dict(req, stream=True))
    evs = events(sse)
    assert evs[0]["choices"][0]["text"] == prompt_text
    assert "".join(e["choices"][0]["text"] for e in evs[:-1]) == echoed["choices"][0]["text"]


def test_broken_chat_template_is_the_servers_error(model_path):
    with efedge.load(model_path, chat_template="bogus") as m:
        srv = make_server(m, "127.0.0.1", 0)
        t = threading.Thread(target=srv.serve_forever, daemon=True)
        t.start()
        try:
            assert "bogus" in srv.template_error
            status, body = call(srv, "/v1/chat/completions", {"messages": HI, "max_tokens": 2})
            assert_error(status, body, 500, "chat_template_error")
            assert body["error"]["type"] == "server_error" and "bogus" in body["error"]["message"]
            status, body = call(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
            assert status == 200, body  # completions need no template
        finally:
            srv.shutdown()
            srv.server_close()
            t.join(timeout=10)


def test_a_closed_model_or_a_failed_load_is_the_servers_error(model_path):
    """An app that closes the model under its running server: 503, not a 400 that blames
    the request. An expert the file could not give, a cache too small: 500."""
    m = efedge.load(model_path)
    srv = make_server(m, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        status, _ = call(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 200
        m.close()
        for path, body in [("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                           ("/v1/chat/completions", {"messages": HI, "stream": True})]:
            status, resp = call(srv, path, body)
            assert_error(status, resp, 503, "model_unavailable")
            assert resp["error"]["type"] == "server_error" and "closed" in \
                resp["error"]["message"]
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=10)
    for exc in (efedge.TransferError("expert 3 of layer 1: read failed"),
                efedge.CacheBudgetError("too small")):
        err = server_replies._error_of(exc)
        assert (err.status, err.type) == (500, "server_error"), exc


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 8}),
    ("/completion", {"prompt": "hi", "n_predict": 8}),
    ("/api/generate", {"prompt": "hi", "raw": True, "stream": False}),
])
def test_a_failure_after_the_first_piece_is_an_http_error(model, monkeypatch, path, body):
    """A generation that fails once text has come (a read error of the model file) answers
    its non-streaming request with an HTTP error in the route's shape — llama.cpp's and
    Ollama's routes wrote a bare event or line with no status line, which clients read as
    a broken connection — and a stream with the route's error event."""
    script_tokens(monkeypatch, model.tokenize(" hello world", False),
                  then=efedge.TransferError("expert 3 of layer 1: read failed"))
    with running_server(model) as srv:
        status, got = call(srv, path, body)
        assert status == 500, got
        message = got["error"] if path.startswith("/api/") else got["error"]["message"]
        assert "read failed" in message
        status, text = call(srv, path, dict(body, stream=True))
        assert status == 200 and "read failed" in text.strip().splitlines()[-1]


def test_a_stop_string_with_a_lone_surrogate_is_echoed_escaped(server):
    """llama.cpp's /completion echoes its stop strings in generation_settings: one holding
    a lone surrogate died in encode (the connection dropped) before json_bytes."""
    status, got = call(server, "/completion", {"prompt": "hi", "n_predict": 2,
                                               "stop": ["\ud800"]})
    assert status == 200 and got["generation_settings"]["stop"] == ["\ud800"], got


def test_make_server_on_a_taken_port(model):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(OSError) as info:  # not AttributeError from server_close
            make_server(model, "127.0.0.1", taken.getsockname()[1])
        assert not isinstance(info.value, AttributeError)
    finally:
        taken.close()


def test_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [server.model_id]
    r = client.chat.completions.create(model=server.model_id, messages=HI, max_tokens=4,
                                       temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens > 0
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=server.model_id, messages=HI, max_tokens=4, temperature=0, stream=True)
        if c.choices]
    assert "".join(parts) == r.choices[0].message.content
    c = client.completions.create(model=server.model_id, prompt="Hello", max_tokens=3)
    assert c.choices[0].finish_reason in ("length", "stop") and c.usage.prompt_tokens > 0
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HI)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.model_id, messages=HI, temperature=-1)


# -- the command ------------------------------------------------------------------------------
@pytest.mark.skipif(sys.platform == "win32", reason="signals to a child need POSIX")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_efedge_serve_command(model_path, sig):
    """Ctrl-C and SIGTERM (docker stop, systemd) alike: a clean shutdown, exit status 0."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    p = subprocess.Popen([sys.executable, "-m", "efedge", "serve", str(model_path), "--port",
                          "0", "--alias", "tiny"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stderr.readline()
        match = re.search(r"http://[\d.]+:\d+", line)
        assert match, line
        with urllib.request.urlopen(match.group(0) + "/v1/models", timeout=60) as r:
            assert json.loads(r.read())["data"][0]["id"] == "tiny"
        p.send_signal(sig)
        assert p.wait(timeout=20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _serve(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "efedge", "serve", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_efedge_serve_refuses_bad_addresses_and_templates(model_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        r = _serve(str(model_path), "--port", str(port))
    finally:
        taken.close()
    assert r.returncode == 1
    assert r.stderr.strip() == (f"efedge: error: cannot listen on 127.0.0.1:{port}: the "
                                "address is already in use (another server?); choose another "
                                "--port, or --port 0 for any free one"), r.stderr
    r = _serve(str(model_path), "--host", "256.1.1.1", "--port", "0")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("efedge: error: cannot listen on 256.1.1.1:0: "), r.stderr
    r = _serve(str(model_path), "--port", "99999")
    assert r.returncode == 2 and "expected a port number 0-65535, got 99999" in r.stderr
    r = _serve(str(model_path), "--port", "0", "--chat-template", "bogus")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "unknown chat template 'bogus'" in r.stderr and "efedge serve:" not in r.stderr
    # one line: no warning that chat requests will get a 500, as if it would still serve
    assert r.stderr.strip().splitlines() == [line for line in r.stderr.strip().splitlines()
                                             if line.startswith("efedge: error:")], r.stderr


def test_cors_is_opt_in_per_origin(server, model):
    """Without allow_origins no CORS header and no preflight (a web page cannot use the
    model through a visitor's browser); with it, an allowed origin gets its preflight
    answered and Access-Control-Allow-Origin on every answer, SSE and errors too."""
    ui, other = "http://localhost:3000", "http://evil.example"

    def ask(srv, method, path, headers, body=None):
        host, port = srv.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=60)
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        r.read()
        conn.close()
        return r

    pre = {"Origin": ui, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "content-type, authorization"}
    r = ask(server, "OPTIONS", "/v1/chat/completions", pre)
    assert r.status == 405 and r.headers["Access-Control-Allow-Origin"] is None
    r = ask(server, "GET", "/v1/models", {"Origin": ui})
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] is None
    srv = make_server(model, "127.0.0.1", 0, allow_origins=[ui])
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        r = ask(srv, "OPTIONS", "/v1/chat/completions", pre)
        assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == ui
        assert r.headers["Access-Control-Allow-Methods"] == "POST"
        assert r.headers["Access-Control-Allow-Headers"] == "content-type, authorization"
        r = ask(srv, "OPTIONS", "/v1/chat/completions", dict(pre, Origin=other))
        assert r.status == 405 and r.headers["Access-Control-Allow-Origin"] is None
        body = json.dumps({"messages": HI, "max_tokens": 2, "stream": True}).encode()
        r = ask(srv, "POST", "/v1/chat/completions", {"Origin": ui}, body)
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == ui
        assert r.headers["Vary"] == "Origin"
        r = ask(srv, "POST", "/v1/chat/completions", {"Origin": ui}, b"{")
        assert r.status == 400 and r.headers["Access-Control-Allow-Origin"] == ui
        r = ask(srv, "GET", "/v1/models", {"Origin": other})
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] is None
        # the answer depends on the Origin, allowed or not: a shared cache must know
        assert r.headers["Vary"] == "Origin"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=10)
    srv = make_server(model, "127.0.0.1", 0, allow_origins=["*"])
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        r = ask(srv, "GET", "/health", {"Origin": other})
        assert r.headers["Access-Control-Allow-Origin"] == "*" and r.headers["Vary"] is None
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=10)


def test_serve_passes_allow_origin_to_the_server(model_path, monkeypatch, capsys):
    seen = serve_kwargs(monkeypatch, [str(model_path), "--port", "0", "--allow-origin",
                                      "http://localhost:3000", "--allow-origin", "*"])
    assert seen["allow_origins"] == ["http://localhost:3000", "*"]
    seen = serve_kwargs(monkeypatch, [str(model_path), "--port", "0"])
    assert tuple(seen["allow_origins"]) == ()


def test_chunked_request_bodies(server):
    """A body sent chunked (Go / Node clients that stream it) is read like any other, up
    to the body limit; a malformed or oversized one is a 4xx and the connection closes."""
    host, port = server.server_address[:2]
    body = json.dumps({"prompt": "hi", "max_tokens": 2, "temperature": 0}).encode()
    _, want = call(server, "/v1/completions", json.loads(body))

    def send(payload: bytes) -> tuple[int, dict]:
        s = socket.create_connection((host, port), timeout=60)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + payload)
        r = http.client.HTTPResponse(s)
        r.begin()
        out = r.status, json.loads(r.read())
        s.close()
        return out

    a, b = body[:10], body[10:]
    chunked = b"%x\r\n%s\r\n%x;ext=1\r\n%s\r\n0\r\n\r\n" % (len(a), a, len(b), b)
    status, got = send(chunked)
    assert status == 200 and got["choices"][0]["text"] == want["choices"][0]["text"]
    status, got = send(b"zz\r\nabc\r\n0\r\n\r\n")
    assert status == 400 and "chunk size" in got["error"]["message"]
    big = b"x" * 40_000
    status, got = send(b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(big), big, len(big), big))
    assert status == 413 and got["error"]["code"] == "body_too_large"  # limit 64 KiB


def test_tokenize_and_detokenize_routes(server, model):
    """llama.cpp's POST /tokenize and /detokenize: the model's own tokenizer (add_special
    false and parse_special true by default, as there), pieces as text or, for part of a
    character, as bytes; bad bodies are 400s naming the field; GET is a 405."""
    from _http import post_json

    text = "Hello world <|im_end|> é😀"
    status, body = post_json(server, "/tokenize", {"content": text})
    assert status == 200
    assert body["tokens"] == model.tokenize(text, add_special=False, parse_special=True)
    status, body = post_json(server, "/tokenize", {"content": text, "add_special": True,
                                                   "parse_special": False})
    assert body["tokens"] == model.tokenize(text, add_special=True, parse_special=False)
    status, body = post_json(server, "/tokenize", {"content": text, "with_pieces": True})
    pieces = body["tokens"]
    assert [p["id"] for p in pieces] == model.tokenize(text, add_special=False,
                                                       parse_special=True)
    joined = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else
                      bytes(p["piece"]) for p in pieces)
    assert joined.decode("utf-8") == text
    ids = model.tokenize(text, add_special=False, parse_special=True)
    status, body = post_json(server, "/detokenize", {"tokens": ids})
    assert (status, body) == (200, {"content": model.detokenize(ids)})
    for path, bad, code, param in [
            ("/tokenize", {}, "missing_field", "content"),
            ("/tokenize", {"content": 5}, "invalid_type", "content"),
            ("/tokenize", {"content": "x", "with_pieces": "yes"}, "invalid_type",
             "with_pieces"),
            ("/detokenize", {"tokens": "1 2"}, "invalid_type", "tokens"),
            ("/detokenize", {"tokens": [1, True]}, "invalid_type", "tokens"),
            ("/detokenize", {"tokens": [model.n_vocab]}, "invalid_value", "tokens"),
            ("/detokenize", [1, 2], "invalid_type", None)]:
        status, body = post_json(server, path, bad)
        assert status == 400 and body["error"]["code"] == code, (path, bad, body)
        assert body["error"]["param"] == param, (path, bad, body)
    status, body = call(server, "/tokenize")
    assert_error(status, body, 405)


def test_tokenize_text_the_tokenizer_refuses_is_a_400(server):
    """JSON's "\\ud800" decodes to a lone surrogate, which has no UTF-8: the tokenizer's
    ValueError is a 400 naming `content`, as on the generation routes, not a connection
    closed without an answer (the handler thread died on the exception)."""
    for content in ("a\\ud800b", "\\udfff"):
        status, body = call(server, "/tokenize",
                            raw=b'{"content": "%s", "with_pieces": true}' % content.encode())
        assert_error(status, body, 400, "invalid_value")
        assert body["error"]["param"] == "content" and "surrogate" in body["error"]["message"]
    status, body = call(server, "/health")  # still serving
    assert status == 200


def test_the_server_computes_with_the_models_thread_count(model_path):
    """The server runs requests on its own worker thread: the model's threads= hold there
    (numba keeps its count per thread; the worker once computed with every core)."""
    import numba
    from _http import post_json

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: every thread count is the same")
    with efedge.load(model_path, threads=1) as m:
        seen = []
        forward = m._tf.forward

        def spy(*a, **kw):
            seen.append((numba.get_num_threads(), threading.current_thread() is not
                         threading.main_thread()))
            return forward(*a, **kw)

        m._tf.forward = spy
        with running_server(m) as srv:
            status, _ = post_json(srv, "/v1/completions", {"prompt": "Hello", "max_tokens": 3})
        assert status == 200
        assert seen and set(seen) == {(1, True)}


def _exchange(srv, request: bytes) -> list[tuple[int, bytes]]:
    """Every (status, body) the server sends back for raw `request` bytes, until it closes
    the connection or stays silent for a second."""
    host, port = srv.server_address[:2]
    s = socket.create_connection((host, port), timeout=60)
    s.sendall(request)
    s.settimeout(1.0)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    s.close()
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        n = int(next(v for k, v in (h.split(b":", 1) for h in head.split(b"\r\n")[1:])
                     if k.strip().lower() == b"content-length"))
        out.append((status, rest[:n]))
        data = rest[n:]
    return out


def test_ambiguous_request_framing_is_refused_and_the_connection_closed(server):
    """RFC 9112 §6.3: two different Content-Length values, or Transfer-Encoding beside a
    Content-Length, are framing that a proxy and this server could read two ways (request
    smuggling): a 400, and nothing after it on that connection is answered."""
    smuggled = b"GET /nope-smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b"{}" + smuggled
    got = _exchange(server, b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                            b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert [s for s, _ in got] == [400], got
    assert b"conflicting Content-Length" in got[0][1]
    chunked = b"2\r\n{}\r\n0\r\n\r\n"
    got = _exchange(server, b"POST /tokenize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                            b"\r\nContent-Length: %d\r\n\r\n" % len(chunked) + chunked + smuggled)
    assert [s for s, _ in got] == [400], got
    # the same value twice is one length (RFC 9112 allows it): answered as usual
    body = json.dumps({"content": "hi"}).encode()
    got = _exchange(server, b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                            b"Content-Length: %d\r\nConnection: close\r\n\r\n"
                    % (len(body), len(body)) + body)
    assert [s for s, _ in got] == [200], got


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 2, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"\ud800": {"type": "string"}}}}}}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["a\udc00"]}}}}),
    ("/api/generate", {"prompt": "hi", "stream": False, "format": {
        "type": "object", "properties": {"\ud800": {"type": "string"}}}}),
])
def test_a_schema_with_a_lone_surrogate_is_a_400(server, path, body):
    """A lone surrogate in a schema (JSON's "\\ud800" makes one; UTF-8 has none) is the
    client's error, named as such — it had crashed the handler, and the client got no
    answer at all."""
    status, got = call(server, path, raw=json.dumps(body).encode())
    assert status == 400, got
    msg = got["error"] if path.startswith("/api/") else got["error"]["message"]
    assert "lone surrogate" in msg, got


def test_a_request_that_fails_unforeseen_gets_a_500(server, monkeypatch):
    """An error no check foresaw is answered (500, its name and message), not a dropped
    connection; the server goes on serving."""
    import efedge.server as srv_mod

    def boom(*a, **k):
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(srv_mod, "parse_completion", boom)
    status, got = call(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1})
    assert status == 500 and got["error"]["code"] == "internal_error"
    assert "RuntimeError: unforeseen" in got["error"]["message"]
    monkeypatch.undo()
    status, got = call(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1})
    assert status == 200, got


def test_root_answers_as_ollama_does_and_unknown_api_routes_in_its_shape(server):
    """`GET /` is Ollama's liveness probe ("Ollama is running"); an unknown /api/ route is
    a 404 in Ollama's error shape ({"error": "…"}), as its clients parse it."""
    assert call(server, "/") == (200, "Ollama is running")
    status, got = call(server, "/api/nope")
    assert status == 404 and isinstance(got["error"], str) and "/api/nope" in got["error"]
    status, got = call(server, "/api/pull", {"model": "x"})
    assert status == 404 and isinstance(got["error"], str)
    assert call(server, "/health")[0] == 200  # the connection kept in step


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "system", "content": "be brief"}, {"role": "user", "content": None}],
     "messages[1].content"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0]"),
    ([{"role": "us\ud800er", "content": "hi"}], "messages[0].role"),
])
def test_a_bad_message_is_a_400_naming_its_field(server, messages, param):
    """A turn with nothing to say (no content, no tool call: llama-server's rule), a
    content part that is not text, a role with a lone surrogate: 400s whose `param`
    names the field, as the README promises."""
    status, got = call(server, "/v1/chat/completions",
                       raw=json.dumps({"messages": messages, "max_tokens": 1}).encode())
    assert status == 400, got
    assert got["error"]["param"] == param, got


def test_an_assistant_turn_may_be_only_a_tool_call(server):
    """An assistant turn with tool_calls and no content is a turn, not an error (the 400
    for a message with neither must not catch it)."""
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    status, got = call(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1})
    assert status != 400 or got["error"]["param"] != "messages[1].content", got


def test_native_completion_takes_a_mixed_prompt(server, model):
    """llama-server's /completion takes token ids and text pieces in one prompt: each
    piece tokenized where it stands, the BOS only for a first piece; the reply equals the
    same ids given alone. Text pieces alone are still refused (several prompts)."""
    head = model.tokenize("def", add_special=True)
    tail = model.tokenize(" fib(n):", add_special=False)
    ids = head + [tail[0]] + model.tokenize(" x", add_special=False)
    status, want = call(server, "/completion", {"prompt": ids, "n_predict": 3,
                                               "temperature": 0})
    assert status == 200, want
    status, got = call(server, "/completion", {"prompt": ["def", tail[0], " x"],
                                              "n_predict": 3, "temperature": 0})
    assert status == 200, got
    assert got["content"] == want["content"] and got["tokens_evaluated"] == len(ids)
    status, got = call(server, "/completion", {"prompt": ["def", " x"], "n_predict": 1})
    assert status == 400 and got["error"]["param"] == "prompt"
