"""Ollama's API, for the apps written against a local Ollama (Open WebUI, Continue, Zed,
editor and note-taking plugins, the `ollama` Python / JS clients):

    GET  /api/version, /api/tags, /api/ps     the server, its one model
    POST /api/show                           the model's details, template, capabilities
    POST /api/generate                       prompt → response (raw, or through the chat
                                             template with `system`; `suffix`: fill in
                                             the middle; `context` continues a reply:
                                             a templated turn after its ids; a
                                             `template` other than the model's own is a
                                             400: efedge renders no Go templates)
    POST /api/chat                           messages → message (tools, format)

Streaming is on unless `"stream": false`, as in Ollama: one JSON object per line
(application/x-ndjson), `"done": false` for each piece, then the totals with
`"done": true`, `done_reason` ("stop" / "length"), counts and durations in nanoseconds
(wall times seen by the server). `options` take Ollama's names for llama.cpp's sampling
settings (temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
presence_penalty, frequency_penalty, seed, num_predict, stop); `num_ctx`, `keep_alive`
and the other runner knobs change nothing (the context is `efedge serve -c`'s, the model
stays loaded). `think` (not an option) splits a thinking model's reasoning off into
`thinking`, or with false asks the template not to think. `images` are refused: efedge
runs text models. Errors are Ollama's `{"error": "…"}` with the HTTP status of the
OpenAI routes, a bad option named as sent (`options.top_k`, not `top_k`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import time
from typing import Any

from gguf import LlamaFileType

from efedge.reasoning import OPEN, is_harmony_template
from efedge.server_body import json_bytes
from efedge.server_replies import _error_of
from efedge.server_requests import (
    APIError,
    GenRequest,
    _field,
    checked_format,
    internal_error,
    object_body,
    parse_chat,
    parse_completion,
)

GET_ROUTES = ("/api/version", "/api/tags", "/api/ps")
POST_ROUTES = ("/api/generate", "/api/chat", "/api/show")
ROUTES = GET_ROUTES + POST_ROUTES
# the Ollama API release whose request and response shapes these routes follow (clients
# check it before using newer fields)
OLLAMA_API_VERSION = "0.12.0"
THINK_LEVELS = ("high", "medium", "low")  # think's strings (gpt-oss's reasoning effort)
_OPTIONS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
            "min_p": "min_p", "repeat_penalty": "repeat_penalty",
            "repeat_last_n": "repeat_last_n", "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop"}
_OPTION_OF = {name: key for key, name in _OPTIONS.items()}  # a mapped field's option


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def _flat(body: dict) -> dict:
    """An Ollama body as the OpenAI routes' fields: `options` mapped by name,
    `num_predict` (-1: until the end, -2: until the context is full) as max_tokens."""
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise APIError(400, "'options' must be an object", "invalid_type", param="options")
    flat: dict[str, Any] = {name: opts[key] for key, name in _OPTIONS.items() if key in opts}
    # checked here, not as max_tokens: Ollama's -2 is no OpenAI value
    n = opts.get("num_predict")
    if n is not None:
        if not isinstance(n, int) or isinstance(n, bool):
            raise APIError(400, f"'options.num_predict' must be an integer, got "
                                f"{type(n).__name__} {json.dumps(n)[:60]}", "invalid_type",
                           param="options.num_predict")
        if n < -2:
            raise APIError(400, f"'options.num_predict' must be >= 0, or -1 (until the end) "
                                f"or -2 (until the context is full), got {n}",
                           "invalid_value", param="options.num_predict")
        if n >= 0:
            flat["max_tokens"] = n
    stream = body.get("stream", True)
    flat["stream"] = stream if stream is not None else True
    if "model" in body:
        flat["model"] = body["model"]
    return flat


def _format(body: dict) -> Any:
    fmt = body.get("format")
    if fmt in (None, ""):
        return None
    if not isinstance(fmt, str | dict):
        raise APIError(400, "'format' must be \"json\" or a JSON schema", "invalid_type",
                       param="format")
    return checked_format(fmt, "format")  # "json" or a schema; a keyword efedge lacks: named


def _no_images(obj: dict, where: str | None) -> None:
    if obj.get("images"):
        raise APIError(400, ("" if where is None else f"{where}: ") + "images are not "
                       "supported (efedge runs text models)", "unsupported",
                       param="images" if where is None else f"{where}.images")


def _as_option(err: APIError, body: dict) -> APIError:
    """`err` naming the `options` field the client sent when it is about one that _flat
    mapped onto the OpenAI routes' fields (`'options.top_k' must be …`, not `'top_k'`)."""
    opts = body.get("options")
    key = _OPTION_OF.get(err.param)
    if key is None or not isinstance(opts, dict) or key not in opts:
        return err  # a field of the body itself, or a server default's
    name = f"options.{key}"
    message, n = re.subn(rf"^'?{re.escape(err.param)}'?(?= )", f"'{name}'", err.message)
    if not n:
        message = f"'{name}': {message}"
    return APIError(err.status, message, err.code, param=name, type_=err.type,
                    close=err.close, headers=err.headers)


def parse_ollama(path: str, body: Any, defaults: dict, model,
                 template_kwargs: dict | None = None) -> GenRequest:
    """A /api/generate or /api/chat body as a GenRequest (`ollama` set);
    `template_kwargs`: the server's chat_template_kwargs. Errors name the fields as the
    client sent them (see _as_option)."""
    body = object_body(body)
    try:
        return _parse_ollama(path, body, defaults, model, template_kwargs)
    except APIError as err:
        raise _as_option(err, body) from None


def _parse_ollama(path: str, body: dict, defaults: dict, model,
                  template_kwargs: dict | None) -> GenRequest:
    _no_images(body, None)
    flat = _flat(body)
    if path == "/api/chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list):
            raise APIError(400, "'messages' must be an array", "invalid_type",
                           param="messages")
        for i, msg in enumerate(msgs):
            if isinstance(msg, dict):
                _no_images(msg, f"messages[{i}]")
        req = parse_chat(dict(flat, messages=msgs, tools=body.get("tools")), defaults,
                         kwargs=template_kwargs)
    else:
        prompt = body.get("prompt", "")
        system = body.get("system")
        if not isinstance(prompt, str) or not isinstance(system, str | None):
            raise APIError(400, "'prompt' and 'system' must be strings", "invalid_type",
                           param="prompt")
        suffix = body.get("suffix") or ""
        raw = _field(body, "raw", bool, False)  # ("yes" was taken as true)
        if raw and (system or body.get("template") or body.get("context")):
            raise APIError(400, "raw mode does not support template, system, or context",
                           "invalid_value", param="raw")  # (Ollama's words)
        if not raw:
            _check_template(body.get("template"), model)
        context = _context(body.get("context"), model) if not suffix else None
        if raw or suffix:
            req = parse_completion(dict(flat, prompt=prompt, suffix=suffix), defaults)
            req.max_tokens = flat.get("max_tokens")  # (not OpenAI's 16: until the end)
        else:  # (with a context, as Ollama: its ids, then this turn through the template)
            msgs = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": prompt}]
            req = parse_chat(dict(flat, messages=msgs), defaults, kwargs=template_kwargs)
            req.context = context
    req.format = _format(body) if req.format is None else req.format
    req.ollama = path
    req.raw = path == "/api/generate" and _field(body, "raw", bool, False)
    think = body.get("think")
    if think is not None and not isinstance(think, bool | str):
        raise APIError(400, "'think' must be true or false", "invalid_type", param="think")
    if isinstance(think, str) and think not in THINK_LEVELS:  # ("false" is no false)
        raise APIError(400, f"invalid think value: {json.dumps(think)[:40]} (must be "
                            "\"high\", \"medium\", \"low\", true, or false)", "invalid_value",
                       param="think")  # (Ollama's words)
    if think and not thinks(model):  # (Ollama's answer for a model that cannot think)
        raise APIError(400, f"{model.path.stem!r} does not support thinking", "unsupported",
                       param="think")
    # think true: the reasoning apart (`thinking`); false: the template asked not to think
    # (Qwen3's enable_thinking); unset: the reply as the model writes it
    req.reasoning = bool(think) and req.messages is not None
    if think is False and req.messages is not None:
        req.template_kwargs = dict(req.template_kwargs or {}, enable_thinking=False)
    if isinstance(think, str) and req.messages is not None:  # a level: gpt-oss's effort,
        # the template variable its templates read (as OpenAI's reasoning_effort reaches it)
        req.template_kwargs = dict(req.template_kwargs or {}, reasoning_effort=think)
    if req.messages is not None and not req.reasoning and \
            is_harmony_template(_template_source(model)):
        # gpt-oss: its harmony reply is always split (as Ollama does), the analysis left
        # out when not asked for: the raw channels are no answer to show
        req.reasoning = req.drop_reasoning = True
    return req


def _check_template(template: Any, model) -> None:
    """A non-raw request's `template`: Ollama renders it (a Go template) in place of the
    model's; efedge renders the model's jinja chat template, so any other is a 400, not
    ignored. The model's own (the one /api/show gives) changes nothing: taken."""
    if template is None or template == "":
        return
    if not isinstance(template, str):
        raise APIError(400, f"'template' must be a string, got {type(template).__name__}",
                       "invalid_type", param="template")
    if template != _template_source(model):
        raise APIError(400, "'template' is not supported: efedge renders the model's own "
                            "chat template (a jinja template, the one /api/show gives); "
                            "send the prompt with raw: true to lay it out yourself",
                       "unsupported", param="template")


def _context(context: Any, model) -> list[int] | None:
    """/api/generate's `context`: the token ids a reply returned (None when absent)."""
    if context is None or context == []:
        return None
    if not isinstance(context, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < model.n_vocab
            for t in context):
        raise APIError(400, "'context' must be the array of token ids a reply gave",
                       "invalid_type", param="context")
    return list(context)


def _name(model: Any) -> Any:
    """A model name as Ollama clients send it: "name:latest" is "name"."""
    return model[:-len(":latest")] if isinstance(model, str) and model.endswith(":latest") \
        else model


def _model_name(body: dict, *keys: str) -> str | None:
    """The model a body names: the first of `keys` set (/api/show also takes the older
    `name`), ":latest" dropped; None when none is. A 400 naming a field that is no string."""
    for key in keys:
        v = body.get(key)
        if v is not None and not isinstance(v, str):
            raise APIError(400, f"'{key}' must be a string, got {type(v).__name__}",
                           "invalid_type", param=key)
    return _name(next((body[k] for k in keys if body.get(k)), None))


def _loads_only(path: str, body: dict) -> bool:
    """A request with nothing to generate: Ollama's "load the model" call — for
    /api/generate an empty prompt, whatever else comes with it (a suffix, a context, a
    system prompt: Ollama answers it so too)."""
    if path == "/api/chat":
        return body.get("messages") in (None, [])
    return body.get("prompt") in (None, "")


def _unloads(keep_alive: Any) -> bool:
    """keep_alive 0 ("0", "0s", "0m" …): Ollama's way to unload a model, answered
    `done_reason: "unload"` (efedge's one model stays loaded)."""
    if isinstance(keep_alive, str):
        return re.fullmatch(r"[+-]?0+(\.0*)?([nuµm]?s|m|h)?", keep_alive.strip()) is not None
    return isinstance(keep_alive, int | float) and keep_alive == 0


def _template_source(model) -> str:
    try:
        return model.chat_template().source
    except Exception:  # noqa: BLE001 (a broken template: shown as missing)
        return ""


def thinks(model) -> bool:
    """Whether the model's chat template writes <think> (a thinking model: Ollama's
    `thinking` capability, and what `think` needs)."""
    template = _template_source(model)
    return OPEN in template or is_harmony_template(template)


def model_details(model) -> dict:
    gf, c = model._gf, model.config
    n_params = sum(int(_elements(t.shape)) for t in gf.tensors.values())
    ft = gf.get("general.file_type")
    try:
        quant = LlamaFileType(ft).name.removeprefix("MOSTLY_") if ft is not None else ""
    except ValueError:
        quant = str(ft)
    size = f"{n_params / 1e9:.1f}B" if n_params >= 1e9 else f"{n_params / 1e6:.0f}M"
    return {"parent_model": "", "format": "gguf", "family": c.arch, "families": [c.arch],
            "parameter_size": size, "quantization_level": quant}


def _elements(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def model_entry(server) -> dict:
    m = server.model
    st = m.path.stat()
    # a digest of the file's identity (hashing gigabytes per listing would take minutes)
    digest = hashlib.sha256(f"{m.path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    name = server.model_id if ":" in server.model_id else server.model_id + ":latest"
    return {"name": name, "model": name,
            "modified_at": datetime.datetime.fromtimestamp(st.st_mtime, datetime.UTC)
            .isoformat().replace("+00:00", "Z"),
            "size": int(m._gf.file_size), "digest": digest.hexdigest(),
            "details": model_details(m)}


class OllamaMixin:
    """Ollama's routes for Handler (its server, _send_json, _read_json, _next_event)."""

    def _ollama_error(self, err: APIError) -> None:
        self._send_json(err.status, {"error": err.message}, close=err.close,
                        headers=err.headers)

    def _ollama(self, path: str) -> None:
        s = self.server
        try:
            if path not in ROUTES:
                if self.headers.get("Content-Length") or self.headers.get("Transfer-Encoding"):
                    self._read_body()  # keep the connection in step
                raise APIError(404, f"unknown route {self.command} {path}", "unknown_url")
            if self.command in ("GET", "HEAD"):
                if path not in GET_ROUTES:
                    raise APIError(405, f"{path} takes POST", "method_not_allowed",
                                   headers={"Allow": "POST"})
                if path == "/api/version":
                    self._send_json(200, {"version": OLLAMA_API_VERSION})
                else:
                    entry = model_entry(s)
                    if path == "/api/ps":
                        entry.update(size_vram=0, expires_at="0001-01-01T00:00:00Z")
                    self._send_json(200, {"models": [entry]})
                return
            if path not in POST_ROUTES:
                raise APIError(405, f"{path} takes GET", "method_not_allowed",
                               headers={"Allow": "GET, HEAD"})
            body = object_body(self._read_json())
            if path == "/api/show":
                self._ollama_show(body)
                return
            if _loads_only(path, body):  # Ollama's way to load a model: nothing to run
                s.check_model(_model_name(body, "model"))
                done = {"message": {"role": "assistant", "content": ""}} \
                    if path == "/api/chat" else {"response": ""}
                self._send_json(200, {"model": s.model_id, "created_at": _now(), **done,
                                      "done": True, "done_reason": "unload"
                                      if _unloads(body.get("keep_alive")) else "load"})
                return
            req = parse_ollama(path, body, s.defaults, s.model, s.template_kwargs)
            req.model = _name(req.model)
            s.check_request(req)
            t0, job = time.monotonic(), s.worker.submit(req)
        except APIError as err:
            self._ollama_error(err)
            return
        except Exception as exc:  # noqa: BLE001 — answer, rather than drop the connection
            self._ollama_error(internal_error(exc))
            return
        self._answer(job, self._ollama_reply, job, t0)  # (Handler's: a client gone cancels)

    def _ollama_show(self, body: dict) -> None:
        self.server.check_model(_model_name(body, "model", "name"))
        m = self.server.model
        caps = ["completion"]
        if self.server.tools_error is None:
            caps.append("tools")
        if all(m.tokenizer.fim_ids.get(k) is not None for k in ("pre", "suf", "mid")):
            caps.append("insert")
        info = {k: v for k, v in m._gf.metadata.items()
                if k.startswith(("general.", f"{m.config.arch}."))
                and not isinstance(v, list | bytes)}
        template = _template_source(m)
        if thinks(m):  # a thinking model's template (<think>, or gpt-oss's channels)
            caps.append("thinking")
        self._send_json(200, {"license": "", "modelfile": "", "parameters": "",
                              "template": template, "details": model_details(m),
                              "model_info": info, "capabilities": caps,
                              "modified_at": model_entry(self.server)["modified_at"]})

    def _ollama_reply(self, job, t0: float) -> None:
        req = job.req
        chat = req.ollama == "/api/chat"
        base = {"model": self.server.model_id}
        ev = self._next_event(job)
        if ev[0] == "error":
            self._ollama_error(_error_of(ev[1]))
            return
        if req.stream:
            self._begin_events("application/x-ndjson")  # (ReplyMixin's: JSON lines here)

        def piece(text: str, thinking: str = "") -> dict:
            body = {"message": {"role": "assistant", "content": text}} if chat \
                else {"response": text}
            if thinking:  # Ollama's field for a thinking model's reasoning
                (body["message"] if chat else body)["thinking"] = thinking
            return dict(base, created_at=_now(), **body, done=False)

        parts: list[str] = []
        thought: list[str] = []
        t_first = None
        while ev[0] != "done":
            if ev[0] == "error":
                if req.stream:
                    self._line({"error": _error_of(ev[1]).message})
                else:  # nothing written yet: an HTTP error, not a bare line
                    self._ollama_error(_error_of(ev[1]))
                return
            if ev[0] in ("text", "reasoning"):
                t_first = t_first or time.monotonic()
                (parts if ev[0] == "text" else thought).append(ev[1])
                if req.stream:
                    self._line(piece(ev[1]) if ev[0] == "text" else piece("", ev[1]))
            ev = self._next_event(job)
        _, usage, finish, _, calls = ev
        now = time.monotonic()
        t_first = t_first or now
        final = piece("") if req.stream else piece("".join(parts), "".join(thought))
        if calls:  # Ollama's calls carry their arguments as objects
            final["message"]["tool_calls"] = [
                {"function": {"name": c["function"]["name"],
                              "arguments": json.loads(c["function"]["arguments"])}}
                for c in calls]
        final.update(done=True, done_reason="length" if finish == "length" else "stop",
                     total_duration=int(1e9 * (now - t0)), load_duration=0,
                     prompt_eval_count=usage["prompt_tokens"],
                     prompt_eval_duration=int(1e9 * (t_first - t0)),
                     eval_count=usage["completion_tokens"],
                     eval_duration=int(1e9 * (now - t_first)))
        if not chat and not req.raw:  # the ids to continue from (Ollama's `context`;
            # a raw prompt's reply has none, as Ollama's)
            final["context"] = job.prompt_ids + job.tokens
        if req.stream:
            self._line(final)
        else:
            self._send_json(200, final)

    def _line(self, obj: dict) -> None:
        self.wfile.write(json_bytes(obj) + b"\n")
        self.wfile.flush()
