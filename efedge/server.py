"""An OpenAI-compatible HTTP server on the standard library (no extra dependencies).

    GET  /health                  {"status": "ok", ...}
    GET  /v1/models               the one loaded model
    POST /v1/completions          prompt → text          (stream: server-sent events)
    POST /v1/chat/completions     messages → reply       (stream: server-sent events)
    POST /completion, /infill     llama.cpp's own shapes (efedge.server_native)
    /api/…                        Ollama's API (efedge.server_ollama)
    POST /tokenize, /detokenize   llama.cpp's tokenizer routes (efedge.server_tokens)
    GET  /metrics                 Prometheus figures, opt-in (efedge.server_metrics)

Every request is queued to one worker thread that owns the model, so requests run one at
a time in arrival order while the HTTP threads wait (the Model serialises calls anyway).
Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 4xx for
malformed JSON, wrong types, missing fields, bodies over `max_body`, unknown models and
routes, bad sampling values and prompts longer than the context; 405 with an `Allow`
header for a method a route does not take (PUT, DELETE, PATCH … included); 500
`chat_template_error` on the chat route when the model's chat template cannot render even
a one-message conversation (a server-side mistake, logged at start). A client that goes
away during a request, streaming or not, cancels its generation within `PEER_CHECK_S`;
the server keeps serving. Shutting down (`server_close`) stops the generation in progress:
its response ends with `finish_reason: "cancelled"` (as does any generation cut short),
and requests still waiting get 503 `server_shutting_down`. `echo: true` on a completion
prepends the prompt, detokenized when it was given as token ids. Chat takes OpenAI's
`tools` / `tool_choice` for templates in the Hermes <tool_call> format (efedge.tool_calls):
`message.tool_calls` with `finish_reason: "tool_calls"`; streamed, the content first and
then one chunk per call.

CORS is opt-in (`allow_origins=["http://localhost:3000"]`, `["*"]` for any; `serve
--allow-origin`): a browser page from an allowed origin gets `Access-Control-Allow-Origin`
on every answer and a 204 to its preflight (OPTIONS); without it the server sends no CORS
header and OPTIONS is a 405, so no web page can use the model through a visitor's browser.

    import efedge
    from efedge.server import make_server
    srv = make_server(efedge.load(), "127.0.0.1", 8080)
    srv.serve_forever()
"""

from __future__ import annotations

import logging
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from efedge import __version__
from efedge.api import Model
from efedge.errors import TemplateError, UnsupportedModelError
from efedge.reasoning import is_harmony_template
from efedge.server_body import json_bytes, read_body, read_json, readable, set_bind_options
from efedge.server_metrics import CONTENT_TYPE as METRICS_TYPE
from efedge.server_metrics import NOT_ENABLED as METRICS_OFF
from efedge.server_metrics import ServerMetrics
from efedge.server_native import ROUTES as NATIVE_ROUTES
from efedge.server_native import NativeReplyMixin, parse_native
from efedge.server_ollama import ROUTES as OLLAMA_ROUTES
from efedge.server_ollama import OllamaMixin
from efedge.server_replies import ReplyMixin
from efedge.server_requests import APIError, internal_error, parse_chat, parse_completion
from efedge.server_routes import POST_ROUTES, CorsMixin, allowed_methods
from efedge.server_tokens import ROUTES as TOKEN_ROUTES
from efedge.server_worker import MAX_QUEUE, Job, ModelWorker
from efedge.tool_calls import HARMONY_FORCED, check_template

log = logging.getLogger("efedge.server")

MAX_BODY = 1 << 20  # bytes
FINGERPRINT = f"efedge-{__version__}"
PEER_CHECK_S = 0.2  # how often a handler waiting on the model looks whether its client left
CLOSE_WAIT_S = 5.0  # how long server_close lets in-flight responses finish writing
# the least listen backlog (socketserver's default, 5, reset a burst's connections)
MIN_BACKLOG = 128
TEMPLATE_PROBE = [{"role": "user", "content": "hi"}]  # every working template renders it


class _ClientGone(Exception):
    pass


class Handler(CorsMixin, ReplyMixin, NativeReplyMixin, OllamaMixin,
              BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"efedge/{__version__}"
    timeout = 120  # seconds a connection may sit idle or trickle a body
    server: EfedgeServer
    _peer_check_at = 0.0  # time.monotonic() of the next look at whether the client left

    # -- plumbing -------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
        log.info("%s %s", self.address_string(), format % args)

    def _send_json(self, status: int, obj: Any, close: bool = False,
                   headers: dict[str, str] | None = None) -> None:
        body = json_bytes(obj)
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_text(self, status: int, text: str, content_type: str) -> None:
        body = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error(self, err: APIError) -> None:
        self._send_json(err.status, err.body(), close=err.close, headers=err.headers)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """The standard library's own error answers in OpenAI's JSON shape, not its HTML
        page: an unknown method (its 501) becomes our 405, and a malformed request line or
        oversized headers keep their status."""
        if code == HTTPStatus.NOT_IMPLEMENTED and self.command \
                and not hasattr(self, "do_" + self.command):
            self._method_not_allowed()
            return
        self.log_error("code %d, message %s", code, message)
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._send_error(APIError(code, message or phrase,
                                  phrase.lower().replace(" ", "_").replace("-", "_"),
                                  close=True))  # the request may not have been read whole

    def _method_not_allowed(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        allow = allowed_methods(path) or "GET, HEAD, POST"
        close = False
        try:
            if self.headers.get("Content-Length") or self.headers.get("Transfer-Encoding"):
                self._read_body()  # keep the connection in step
        except APIError as err:
            close = err.close
        self._send_error(APIError(405, f"{self.command} is not allowed on {path or '/'}; it "
                                       f"takes {allow}", "method_not_allowed",
                                  headers={"Allow": allow}, close=close))

    def _peer_closed(self) -> bool:
        try:
            return readable(self.connection) and \
                self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _next_event(self, job: Job) -> tuple:
        """The worker's next event for `job`. Every PEER_CHECK_S of wall time, whether or
        not events keep arriving, look whether the client hung up, and if so cancel the job
        and raise _ClientGone: a look only when the queue is quiet would never come while
        tokens flow, and a non-streaming request writes nothing that could fail first."""
        while True:
            now = time.monotonic()
            if now >= self._peer_check_at:
                self._peer_check_at = now + PEER_CHECK_S
                if self._peer_closed():
                    self.server.worker.cancel(job)
                    raise _ClientGone
            try:
                return job.events.get(timeout=self._peer_check_at - now)
            except queue.Empty:
                pass

    def _read_body(self) -> bytes:
        return read_body(self.rfile, self.headers, self.server.max_body)

    def _read_json(self) -> Any:
        return read_json(self.rfile, self.headers, self.server.max_body)

    # -- routes ---------------------------------------------------------------------------
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        s = self.server
        if path in OLLAMA_ROUTES or path.startswith("/api/"):
            self._ollama(path)
            return
        try:
            if path == "":  # Ollama's liveness answer, which its clients probe
                self._send_text(200, "Ollama is running", "text/plain; charset=utf-8")
            elif path in ("/health", "/v1/health"):
                self._send_json(200, {"status": "ok", "model": s.model_id,
                                      "waiting": s.worker.waiting()})
            elif path in ("/v1/models", "/models"):
                self._send_json(200, {"object": "list", "data": [s.model_card()]})
            elif path.startswith("/v1/models/"):
                s.check_model(path[len("/v1/models/"):])
                self._send_json(200, s.model_card())
            elif path == "/metrics":
                self._send_text(200, s.render_metrics(), METRICS_TYPE)
            elif path in POST_ROUTES:
                raise APIError(405, f"{path} takes POST", "method_not_allowed",
                               headers={"Allow": "POST"})
            else:
                raise APIError(404, f"unknown route GET {path or '/'}", "unknown_url")
        except APIError as err:
            self._send_error(err)
        except Exception as exc:  # noqa: BLE001 — answer, rather than drop the connection
            self._send_error(internal_error(exc))

    do_HEAD = do_GET

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        chat = path in ("/v1/chat/completions", "/chat/completions")
        if path in OLLAMA_ROUTES or path.startswith("/api/"):
            self._ollama(path)
            return
        try:
            if path in TOKEN_ROUTES:  # the tokenizer alone: answered here, not queued
                self._send_json(200, TOKEN_ROUTES[path](self.server.model,
                                                        self._read_json()))
                return
            native = path in NATIVE_ROUTES  # llama.cpp's /completion, /infill
            if not chat and not native and path not in ("/v1/completions", "/completions"):
                if self.headers.get("Content-Length"):
                    self._read_body()  # keep the connection in step
                if (allow := allowed_methods(path)) is not None:
                    raise APIError(405, f"{path} takes GET", "method_not_allowed",
                                   headers={"Allow": allow})
                raise APIError(404, f"unknown route POST {path or '/'}", "unknown_url")
            body, s = self._read_json(), self.server
            req = parse_native(path, body, s.defaults) if native else \
                parse_chat(body, s.defaults, s.reasoning_format, s.template_kwargs) if chat \
                else parse_completion(body, s.defaults)
            s.check_request(req)
            t0, job = time.monotonic(), s.worker.submit(req)
        except APIError as err:
            self._send_error(err)
            return
        except Exception as exc:  # noqa: BLE001 — answer, rather than drop the connection
            self._send_error(internal_error(exc))
            return
        if native:
            self._answer(job, self._native, job, t0)
        else:
            self._answer(job, self._stream if req.stream else self._complete, job, chat)

    def _answer(self, job: Job, reply, *args) -> None:
        """reply(*args) writes the job's response; a client gone meanwhile cancels it."""
        try:
            with self.server.in_flight():
                reply(*args)
        except (_ClientGone, OSError):
            # OSError: a reset or broken pipe, and also the TimeoutError of a write to a
            # client that stopped reading (Handler.timeout), which the standard library's
            # handler would swallow with the job still generating for nobody
            self.server.worker.cancel(job)
            self.close_connection = True
            log.info("client went away: generation cancelled")

class EfedgeServer(ThreadingHTTPServer):
    """ThreadingHTTPServer around one Model; see the module docstring."""

    daemon_threads = True

    def __init__(self, model: Model, host: str = "127.0.0.1", port: int = 8080, *,
                 model_id: str | None = None, max_body: int = MAX_BODY,
                 max_queue: int = MAX_QUEUE, defaults: dict | None = None,
                 strict_template: bool = False, allow_origins: Sequence[str] = (),
                 reasoning_format: str = "auto", template_kwargs: dict | None = None,
                 metrics: bool = False):
        # the kernel's listen backlog, set before super() listens: connections past it are
        # dropped before a handler thread could answer them 503 (a burst got TCP resets
        # with socketserver's 5). It holds the line, the request being served and as many
        # again as the line, which the handlers then answer 503; Linux caps it at
        # net.core.somaxconn
        self.request_queue_size = max(MIN_BACKLOG, 2 * (max_queue + 1))
        super().__init__((host, port), Handler)
        self.allow_origins = tuple(allow_origins)  # CORS (module docstring); () = none
        self.model = model
        self.model_id = model_id or model.path.stem
        self.max_body = max_body
        self.defaults = dict(defaults or {})  # sampling defaults for fields a request omits
        # chat requests' defaults for reasoning_format and chat_template_kwargs
        self.reasoning_format, self.template_kwargs = reasoning_format, template_kwargs
        self.created = int(time.time())
        # a template that fails on a one-message conversation is the server's mistake: chat
        # requests get a 500 naming it, not a 400 that blames the client's messages
        self.template_error: str | None = None
        try:
            model.chat_prompt(TEMPLATE_PROBE)
        except TemplateError as exc:
            if strict_template:  # a template the user chose: theirs to fix, before serving
                self.server_close()
                raise
            self.template_error = str(exc)
            log.warning("the chat template is broken; /v1/chat/completions will answer 500 "
                        "(completions still work): %s", exc)
        # tools need a template in a format efedge reads (efedge.tool_calls): why not, or None
        self.tools_error: str | None = None
        self.harmony_tools = False  # gpt-oss: a forced call has no grammar here
        try:
            check_template(model.chat_template(tools=True))
            self.harmony_tools = is_harmony_template(model.chat_template(tools=True).source)
        except (UnsupportedModelError, TemplateError) as exc:
            self.tools_error = str(exc)
        # GET /metrics (opt-in, as llama-server's --metrics): efedge/server_metrics.py
        self.metrics = ServerMetrics() if metrics else None
        self._busy = 0  # requests between submit and their response's end
        self._idle = threading.Condition()
        self.worker = ModelWorker(model, max_queue)

    def server_bind(self) -> None:
        # socketserver sets SO_REUSEADDR itself (allow_reuse_address): see set_bind_options
        self.allow_reuse_address = False
        set_bind_options(self.socket)
        super().server_bind()

    def handle_error(self, request, client_address) -> None:
        """A client that reset or dropped its connection (between requests, or while
        one was read) is no error of ours: logged, not printed as socketserver's
        traceback per connection; anything else keeps that."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.info("%s: connection reset or closed", client_address[0])
            return
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def check_model(self, name: str | None) -> None:
        if name is None or name in (self.model_id, self.model.path.name, str(self.model.path)):
            return
        raise APIError(404, f"the model {name!r} does not exist; this server has "
                            f"{self.model_id!r}", "model_not_found", param="model")

    def check_request(self, req) -> None:
        """The model it names is this one; a chat needs a template that renders (a 500:
        the server's fault) and, with tools, one in a format efedge reads."""
        self.check_model(req.model)
        if req.messages is not None and self.template_error is not None:
            raise APIError(500, f"the server's chat template is broken: "
                                f"{self.template_error}", "chat_template_error",
                           type_="server_error")
        if req.tools is not None and self.tools_error is not None:
            raise APIError(400, self.tools_error, "unsupported", param="tools")
        if req.forced_call and self.harmony_tools:
            raise APIError(400, HARMONY_FORCED, "unsupported", param="tool_choice")

    def render_metrics(self) -> str:
        """GET /metrics' body; a 501 when the server was started without metrics."""
        if self.metrics is None:
            raise APIError(501, METRICS_OFF, "not_supported", type_="not_supported_error")
        w = self.worker
        return self.metrics.render(self.model.stats(), processing=w.processing(),
                                   deferred=w.waiting(), cancelled=w.n_cancelled,
                                   kv_tokens=self.model.n_tokens, n_ctx=self.model.n_ctx)

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

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        """Count a request from its submit to the end of its response (see server_close)."""
        with self._idle:
            self._busy += 1
        try:
            yield
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def server_close(self) -> None:
        """Stop listening, stop the worker (the generation in progress ends "cancelled",
        waiting requests get 503), then give those responses up to CLOSE_WAIT_S to be
        written: the handler threads are daemons, and a process that exits right after
        this would cut them off mid-stream."""
        super().server_close()
        worker = getattr(self, "worker", None)  # HTTPServer.__init__ calls server_close
        if worker is None:  # when bind fails, before any of ours exists
            return
        worker.stop()
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, timeout=CLOSE_WAIT_S)


def make_server(model: Model, host: str = "127.0.0.1", port: int = 8080,
                **kwargs: Any) -> EfedgeServer:
    """A bound, not yet serving server (port 0 picks a free port: see `.url`). An address
    that cannot be bound raises what the socket raised: OSError (in use, not this
    machine's, an unknown host: socket.gaierror) or OverflowError (a port over 65535)."""
    return EfedgeServer(model, host, port, **kwargs)
