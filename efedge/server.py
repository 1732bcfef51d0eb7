"""An OpenAI-compatible HTTP server on the standard library (no extra dependencies).

    GET  /health                  {"status": "ok", ...}
    GET  /v1/models               the one loaded model
    POST /v1/completions          prompt → text          (stream: server-sent events)
    POST /v1/chat/completions     messages → reply       (stream: server-sent events)

Every request is queued to one worker thread that owns the model, so requests run one at
a time in arrival order while the HTTP threads wait (the Model serialises calls anyway).
Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 4xx for
malformed JSON, wrong types, missing fields, bodies over `max_body`, unknown models and
routes, bad sampling values and prompts longer than the context. A client that goes away
during a request cancels its generation; the server keeps serving.

    import efedge
    from efedge.server import make_server
    srv = make_server(efedge.load(), "127.0.0.1", 8080)
    srv.serve_forever()
"""

from __future__ import annotations

import json
import logging
import queue
import select
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from efedge import __version__
from efedge.api import Model
from efedge.errors import ContextLengthError, EfedgeError, SamplingError, TemplateError
from efedge.server_requests import APIError, GenRequest, parse_chat, parse_completion

log = logging.getLogger("efedge.server")
MAX_BODY = 1 << 20  # bytes
MAX_QUEUE = 64  # requests waiting for the model before new ones get 503
FINGERPRINT = f"efedge-{__version__}"



# -- the worker ---------------------------------------------------------------------------
class _Job:
    def __init__(self, req: GenRequest):
        self.req = req
        self.events: queue.Queue = queue.Queue()  # ("start", n_prompt) ("text", s) ("done", …)
        self.cancelled = threading.Event()


class ModelWorker:
    """One thread that runs every generation on the model, in arrival order."""

    def __init__(self, model: Model, max_queue: int = MAX_QUEUE):
        self.model = model
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self._current: _Job | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="efedge-model", daemon=True)
        self._thread.start()

    def submit(self, req: GenRequest) -> _Job:
        job = _Job(req)
        try:
            self._q.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"{self._q.qsize()} requests are already waiting; try again "
                                "later", "server_busy", type_="server_error") from None
        return job

    def waiting(self) -> int:
        return self._q.qsize()

    def cancel(self, job: _Job) -> None:
        job.cancelled.set()
        with self._lock:
            if self._current is job:
                self.model.cancel()

    def stop(self) -> None:
        with self._lock:
            if self._current is not None:
                self._current.cancelled.set()
                self.model.cancel()
        self._q.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while (job := self._q.get()) is not None:
            if job.cancelled.is_set():
                continue
            with self._lock:
                self._current = job
            try:
                self._run(job)
            except (APIError, EfedgeError, ValueError, TypeError) as exc:
                job.events.put(("error", exc))
            except Exception as exc:  # keep serving whatever one request did
                log.exception("request failed")
                job.events.put(("error", exc))
            finally:
                with self._lock:
                    self._current = None

    def _run(self, job: _Job) -> None:
        m, req = self.model, job.req
        if req.messages is not None:
            ids = m.chat_prompt(req.messages)
        elif isinstance(req.prompt, str):
            ids = m.tokenize(req.prompt)
        else:
            ids = list(req.prompt)
            bad = [t for t in ids if not 0 <= t < m.n_vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary "
                                    f"[0, {m.n_vocab})", "invalid_value", param="prompt")
        n_prompt = len(ids)
        if n_prompt >= m.n_ctx:
            raise ContextLengthError(f"the prompt has {n_prompt} tokens; the context holds "
                                     f"{m.n_ctx}")
        room = m.n_ctx - n_prompt
        max_tokens = room if req.max_tokens is None else min(req.max_tokens, room)
        if job.cancelled.is_set():
            return
        before = m.stats()["tokens_generated"]
        started = False
        it = m.stream(ids, max_tokens=max_tokens, stop=req.stop, **req.sampling)
        try:
            for piece in it:
                if not started:
                    job.events.put(("start", n_prompt))
                    started = True
                if job.cancelled.is_set():
                    break
                job.events.put(("text", piece))
        finally:
            it.close()
        if not started:
            job.events.put(("start", n_prompt))
        n_gen = m.stats()["tokens_generated"] - before
        finish = "length" if n_gen >= max_tokens or n_prompt + n_gen >= m.n_ctx else "stop"
        job.events.put(("done", {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
                                 "total_tokens": n_prompt + n_gen}, finish))


def _error_of(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), "context_length_exceeded")
    if isinstance(exc, SamplingError):
        return APIError(400, str(exc), "invalid_value")
    if isinstance(exc, TemplateError):
        return APIError(400, str(exc), "invalid_messages")
    if isinstance(exc, EfedgeError | ValueError | TypeError):
        return APIError(400, str(exc), "invalid_request")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error",
                    type_="server_error")


_GET_ROUTES = ("/health", "/v1/health", "/v1/models", "/models")


class _ClientGone(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"efedge/{__version__}"
    timeout = 120  # seconds a connection may sit idle or trickle a body
    server: EfedgeServer

    # -- plumbing -------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
        log.info("%s %s", self.address_string(), format % args)

    def _send_json(self, status: int, obj: Any, close: bool = False) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error(self, err: APIError) -> None:
        self._send_json(err.status, err.body(), close=err.close)

    def _peer_closed(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _next_event(self, job: _Job) -> tuple:
        while True:
            try:
                return job.events.get(timeout=0.2)
            except queue.Empty:
                if self._peer_closed():
                    self.server.worker.cancel(job)
                    raise _ClientGone from None

    def _read_body(self) -> bytes:
        """The request body; over `max_body` it is read and dropped (so the client still
        gets the answer, not a reset) up to 16× the limit, then the connection closes."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise APIError(411, "chunked request bodies are not supported; send "
                                "Content-Length", "length_required", close=True)
        length = self.headers.get("Content-Length")
        if length is None:
            raise APIError(411, "a JSON body with a Content-Length header is required",
                           "length_required", close=True)
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            raise APIError(400, f"bad Content-Length {length!r}", "invalid_request",
                           close=True) from None
        limit = self.server.max_body
        if n > limit:
            drain = n <= 16 * limit
            while drain and n > 0:
                got = self.rfile.read(min(n, 1 << 16))
                if not got:
                    break
                n -= len(got)
            raise APIError(413, f"the request body is {length} bytes; the limit is {limit}",
                           "body_too_large", close=not drain)
        return self.rfile.read(n)

    def _read_json(self) -> Any:
        raw = self._read_body()
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise APIError(400, f"the body is not valid JSON: {exc}", "invalid_json") from None

    # -- routes ---------------------------------------------------------------------------
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        s = self.server
        try:
            if path in ("/health", "/v1/health"):
                self._send_json(200, {"status": "ok", "model": s.model_id,
                                      "waiting": s.worker.waiting()})
            elif path in ("/v1/models", "/models"):
                self._send_json(200, {"object": "list", "data": [s.model_card()]})
            elif path.startswith("/v1/models/"):
                s.check_model(path[len("/v1/models/"):])
                self._send_json(200, s.model_card())
            elif path in ("/v1/completions", "/v1/chat/completions", "/completions",
                          "/chat/completions"):
                raise APIError(405, f"{path} takes POST", "method_not_allowed")
            else:
                raise APIError(404, f"unknown route GET {path or '/'}", "unknown_url")
        except APIError as err:
            self._send_error(err)

    do_HEAD = do_GET

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        chat = path in ("/v1/chat/completions", "/chat/completions")
        try:
            if not chat and path not in ("/v1/completions", "/completions"):
                if self.headers.get("Content-Length"):
                    self._read_body()  # keep the connection in step
                if path in _GET_ROUTES:
                    raise APIError(405, f"{path} takes GET", "method_not_allowed")
                raise APIError(404, f"unknown route POST {path or '/'}", "unknown_url")
            body = self._read_json()
            req = (parse_chat if chat else parse_completion)(body, self.server.defaults)
            self.server.check_model(req.model)
            job = self.server.worker.submit(req)
        except APIError as err:
            self._send_error(err)
            return
        try:
            if req.stream:
                self._stream(job, chat)
            else:
                self._complete(job, chat)
        except (_ClientGone, BrokenPipeError, ConnectionResetError):
            self.server.worker.cancel(job)
            self.close_connection = True
            log.info("client went away: generation cancelled")

    def _complete(self, job: _Job, chat: bool) -> None:
        parts: list[str] = []
        while True:
            ev = self._next_event(job)
            if ev[0] == "error":
                self._send_error(_error_of(ev[1]))
                return
            if ev[0] == "text":
                parts.append(ev[1])
            elif ev[0] == "done":
                break
        _, usage, finish = ev
        text = "".join(parts)
        resp = self.server.envelope(chat, stream=False)
        if chat:
            resp["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": finish}]
        else:
            if job.req.echo and isinstance(job.req.prompt, str):
                text = job.req.prompt + text
            resp["choices"] = [{"index": 0, "text": text, "logprobs": None,
                                "finish_reason": finish}]
        resp["usage"] = usage
        self._send_json(200, resp)

    def _event(self, obj: Any) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _stream(self, job: _Job, chat: bool) -> None:
        ev = self._next_event(job)  # the first event decides between 200 and an error
        if ev[0] == "error":
            self._send_error(_error_of(ev[1]))
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        base = self.server.envelope(chat, stream=True)
        usage_wanted = job.req.include_usage

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                d = {"role": "assistant", "content": ""} if first else (
                    {} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None,
                          "finish_reason": finish}
            out = dict(base, choices=[choice])
            if usage_wanted:
                out["usage"] = None
            return out

        if chat:
            self._event(chunk(None, None, first=True))
        elif job.req.echo and isinstance(job.req.prompt, str):
            self._event(chunk(job.req.prompt, None))
        while True:
            ev = self._next_event(job)
            if ev[0] == "text":
                self._event(chunk(ev[1], None))
            elif ev[0] == "error":
                self._event(_error_of(ev[1]).body())
                return
            elif ev[0] == "done":
                break
        _, usage, finish = ev
        self._event(chunk(None, finish))
        if usage_wanted:
            self._event(dict(base, choices=[], usage=usage))
        self._event("[DONE]")


class EfedgeServer(ThreadingHTTPServer):
    """ThreadingHTTPServer around one Model; see the module docstring."""

    daemon_threads = True

    def __init__(self, model: Model, host: str = "127.0.0.1", port: int = 8080, *,
                 model_id: str | None = None, max_body: int = MAX_BODY,
                 max_queue: int = MAX_QUEUE, defaults: dict | None = None):
        super().__init__((host, port), Handler)
        self.model = model
        self.model_id = model_id or model.path.stem
        self.max_body = max_body
        self.defaults = dict(defaults or {})  # sampling defaults for fields a request omits
        self.created = int(time.time())
        self.worker = ModelWorker(model, max_queue)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def check_model(self, name: str | None) -> None:
        if name is None or name in (self.model_id, self.model.path.name, str(self.model.path)):
            return
        raise APIError(404, f"the model {name!r} does not exist; this server has "
                            f"{self.model_id!r}", "model_not_found", param="model")

    def model_card(self) -> dict:
        c = self.model.config
        return {"id": self.model_id, "object": "model", "created": self.created,
                "owned_by": "efedge",
                "meta": {"arch": c.arch, "n_ctx": self.model.n_ctx, "n_vocab": c.n_vocab,
                         "n_expert": c.n_expert, "n_expert_used": c.n_expert_used}}

    def envelope(self, chat: bool, stream: bool) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if chat \
            else "text_completion"
        prefix = "chatcmpl-" if chat else "cmpl-"
        return {"id": prefix + uuid.uuid4().hex[:24], "object": kind,
                "created": int(time.time()), "model": self.model_id,
                "system_fingerprint": FINGERPRINT}

    def server_close(self) -> None:
        super().server_close()
        self.worker.stop()


def make_server(model: Model, host: str = "127.0.0.1", port: int = 8080,
                **kwargs: Any) -> EfedgeServer:
    """A bound, not yet serving server (port 0 picks a free port: see `.url`)."""
    return EfedgeServer(model, host, port, **kwargs)
