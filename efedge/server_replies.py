"""The server's answers to a generation request (a mixin of efedge.server.Handler): one JSON
response, or server-sent events as the worker's events arrive (efedge/server_worker.py:
"start", "text", "done", "error"), in OpenAI's chat and completions shapes — logprobs and
tool calls included — and which HTTP error an exception becomes.
"""

from __future__ import annotations

import re
from typing import Any

from efedge.errors import (
    CacheBudgetError,
    ContextLengthError,
    EfedgeError,
    ModelClosedError,
    ModelFormatError,
    SamplingError,
    TemplateError,
    TransferError,
)
from efedge.server_body import json_bytes
from efedge.server_logprobs import as_chat, as_completion
from efedge.server_requests import APIError
from efedge.server_worker import Job

_MESSAGE_FIELD = re.compile(r"messages\[\d+\](?:\['\w+'\]|\[\d+\])*")


def _message_param(text: str) -> str | None:
    """`messages[0].content[1]` for a template check's "messages[0]['content'][1] …": the
    field an error names, as OpenAI's `param` spells it."""
    m = _MESSAGE_FIELD.match(text)
    if m is None:
        return None
    return re.sub(r"\['(\w+)'\]", r".\1", m.group())


def _error_of(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), "context_length_exceeded")
    if isinstance(exc, SamplingError):  # (a logit_bias id past the vocabulary: named)
        param = "logit_bias" if str(exc).startswith("logit_bias") else None
        return APIError(400, str(exc), "invalid_value", param=param)
    if isinstance(exc, TemplateError):  # (param: the message's field it names, if any)
        return APIError(400, str(exc), "invalid_messages", param=_message_param(str(exc)))
    if isinstance(exc, ModelClosedError):  # an embedding app closed the model under us
        return APIError(503, str(exc), "model_unavailable", type_="server_error")
    if isinstance(exc, TransferError | CacheBudgetError | ModelFormatError):
        # the model file or the machine failed this request, not the client
        return APIError(500, str(exc), "model_error", type_="server_error")
    if isinstance(exc, EfedgeError | ValueError | TypeError):
        return APIError(400, str(exc), "invalid_request")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error",
                    type_="server_error")


def _logprobs(recs: list[dict], chat: bool) -> dict:
    return as_chat(recs) if chat else as_completion(recs)


class ReplyMixin:
    """_complete / _stream for Handler, which gives them _next_event, _send_json,
    _send_error, the BaseHTTPRequestHandler writers and its server's envelope()."""

    def _complete(self, job: Job, chat: bool) -> None:
        parts: list[str] = []
        thought: list[str] = []  # a thinking model's reasoning (efedge.reasoning)
        recs: list[dict] = []
        while True:
            ev = self._next_event(job)
            if ev[0] == "error":
                self._send_error(_error_of(ev[1]))
                return
            if ev[0] == "reasoning":
                thought.append(ev[1])
                recs += ev[2] or []
            elif ev[0] == "start":
                parts.append(ev[2])  # the echoed prompt, or ""
                recs += ev[3] or []
            elif ev[0] == "text":
                parts.append(ev[1])
                recs += ev[2] or []
            elif ev[0] == "done":
                recs += ev[3] or []
                break
        _, usage, finish, _, calls = ev
        text = "".join(parts)
        lp = _logprobs(recs, chat) if job.req.logprobs is not None else None
        resp = self.server.envelope(chat, stream=False)
        if chat:
            message = {"role": "assistant", "content": text}
            if calls:  # as OpenAI: no text beside the calls is null content
                message.update(content=text.strip() or None, tool_calls=calls)
            if thought:  # llama-server's field for it
                message["reasoning_content"] = "".join(thought)
            resp["choices"] = [{"index": 0, "message": message, "logprobs": lp,
                                "finish_reason": finish}]
        else:
            resp["choices"] = [{"index": 0, "text": text, "logprobs": lp,
                                "finish_reason": finish}]
        resp["usage"] = usage
        self._send_json(200, resp)

    def _event(self, obj: Any) -> None:
        data = obj.encode() if isinstance(obj, str) else json_bytes(obj)
        self.wfile.write(b"data: " + data + b"\n\n")
        self.wfile.flush()

    def _begin_events(self, content_type: str = "text/event-stream; charset=utf-8") -> None:
        """A 200 whose body is a stream of events (server-sent events, or Ollama's JSON
        lines), ended by closing the connection."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()

    def _stream(self, job: Job, chat: bool) -> None:
        ev = self._next_event(job)  # the first event decides between 200 and an error
        if ev[0] == "error":
            self._send_error(_error_of(ev[1]))
            return
        self._begin_events()
        base = self.server.envelope(chat, stream=True)
        usage_wanted = job.req.include_usage

        def chunk(delta: str | None, finish: str | None, first: bool = False,
                  recs: list[dict] | None = None, d: dict | None = None) -> dict:
            # a chunk's logprobs: its tokens' (null when the request asked for none)
            lp = None if recs is None else _logprobs(recs, chat)
            if chat:
                d = d if d is not None else {"role": "assistant", "content": ""} if first \
                    else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": lp,
                          "finish_reason": finish}
            out = dict(base, choices=[choice])
            if usage_wanted:
                out["usage"] = None
            return out

        if chat:
            self._event(chunk(None, None, first=True))
        elif ev[2] or ev[3]:  # echo: the prompt's text (and logprobs) come first
            self._event(chunk(ev[2], None, recs=ev[3]))
        while True:
            ev = self._next_event(job)
            if ev[0] == "text":
                self._event(chunk(ev[1], None, recs=ev[2]))
            elif ev[0] == "reasoning":
                self._event(chunk(None, None, d={"reasoning_content": ev[1]}, recs=ev[2]))
            elif ev[0] == "error":
                self._event(_error_of(ev[1]).body())
                return
            elif ev[0] == "done":
                break
        _, usage, finish, rest, calls = ev
        for i, call in enumerate(calls or ()):  # each call whole, in one chunk (llama.cpp
            # sends the arguments in pieces; clients join them either way)
            self._event(chunk(None, None, d={"tool_calls": [dict(call, index=i)]}))
        self._event(chunk(None, finish, recs=rest))
        if usage_wanted:
            self._event(dict(base, choices=[], usage=usage))
        self._event("[DONE]")
