"""A server over a model for a test's duration, and JSON requests to it (the tests of
the server's features share these)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from efedge.server import make_server


@contextmanager
def running_server(model, **kw) -> Iterator:
    """make_server(model) on a free local port, served from a thread until the block ends."""
    srv = make_server(model, "127.0.0.1", 0, **kw)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=10)


def post(srv, path: str, body) -> tuple[int, str]:
    """(status, response text) of a JSON POST; an HTTP error's status and body too."""
    req = urllib.request.Request(srv.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def post_json(srv, path: str, body) -> tuple[int, object]:
    """post(), the response parsed as JSON."""
    status, text = post(srv, path, body)
    return status, json.loads(text)


def sse_chunks(text: str) -> list[dict]:
    """The JSON payloads of a server-sent-events body, without the final [DONE]."""
    return [json.loads(b[len("data: "):]) for b in text.split("\n\n")
            if b.strip() and b != "data: [DONE]"]


def serve_kwargs(monkeypatch, argv: list[str]) -> dict:
    """The keywords `efedge serve ARGV` gives make_server (a stand-in server that stops
    at once: nothing listens)."""
    import efedge.server as server_mod
    from efedge.cli import main

    seen: dict = {}

    class Stub:
        model_id, url = "m", "http://127.0.0.1:0"

        def serve_forever(self):
            raise KeyboardInterrupt

        def server_close(self):
            pass

    def fake(m, host, port, **kw):
        seen.update(kw)
        return Stub()

    monkeypatch.setattr(server_mod, "make_server", fake)
    assert main(["serve", *argv]) == 0
    return seen
