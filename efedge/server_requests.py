"""Parsing and validating OpenAI-style request bodies for efedge.server: every bad field
becomes an APIError with the HTTP status and OpenAI error type to answer with."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from efedge.api_chat import check_template_kwargs
from efedge.errors import ArgumentError, SamplingError
from efedge.json_mode import check_format
from efedge.logprobs import MAX_TOP_LOGPROBS
from efedge.sampling import SamplingParams
from efedge.tool_calls import check_tools, forced_call_grammar, resolve_choice


class APIError(Exception):
    """An HTTP error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, code: str, *, param: str | None = None,
                 type_: str = "invalid_request_error", close: bool = False,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type, self.close = type_, close
        self.headers = dict(headers or {})  # extra response headers (a 405's Allow)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def internal_error(exc: BaseException) -> APIError:
    """A request that failed where no check foresaw it: logged with its traceback, and
    answered 500 (the client gets a reply naming the error, not a dropped connection);
    the connection closes, as the request may not have been read whole."""
    logging.getLogger("efedge.server").error("request failed", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error",
                    type_="server_error", close=True)


@dataclass
class GenRequest:
    model: str | None
    messages: list[dict] | None  # chat
    prompt: str | list[int] | None  # completions
    max_tokens: int | None  # None: until end of turn or a full context
    sampling: dict
    stop: list[str]
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None = None  # alternatives per token (0: the chosen token's only); None: off
    # "json": response_format json_object (efedge.json_mode); a dict: json_schema's schema;
    # a compiled grammar: a forced tool call (efedge.tool_calls.forced_call_grammar)
    format: Any = None
    # chat with tools (not tool_choice "none"): rendered into the prompt, calls parsed
    # from the reply (efedge.tool_calls); parallel_tool_calls false keeps the first call
    tools: list[dict] | None = None
    forced_call: bool = False  # tool_choice "required" or named: `format` is its grammar
    parallel_tool_calls: bool = True
    # fill in the middle (efedge.fim): {"prefix", "suffix", "prompt", "extra"}, built into
    # the prompt by the worker (a completion's `suffix`, llama.cpp's /infill)
    infill: dict | None = None
    native: bool = False  # llama.cpp's /completion or /infill: answered in its shape
    return_tokens: bool = False  # (native) the generated ids in the answer
    ollama: str | None = None  # Ollama's route (/api/generate, /api/chat): its shapes
    raw: bool = False  # Ollama's /api/generate with raw: true (its reply has no context)
    # chat: a thinking model's <think> part apart from the answer (efedge.reasoning):
    # reasoning_content / Ollama's thinking
    reasoning: bool = False
    # reasoning_format deepseek-legacy, streamed: the reasoning stays in the content, in
    # its <think> tags (llama-server's reasoning_in_content), not in reasoning_content
    reasoning_in_content: bool = False
    # split as `reasoning`, the reasoning then left out (Ollama's chat without `think` on
    # gpt-oss, whose harmony reply is always split, as Ollama splits it)
    drop_reasoning: bool = False
    template_kwargs: dict | None = None  # chat_template_kwargs: template variables
    # (Ollama's /api/generate) the ids a reply returned, before the templated turn
    context: list[int] | None = None
    # (native) llama-server's stops for code completion: a line after the first newline
    # indented less than n_indent ends the reply (efedge.fim.IndentStop); once the
    # generation has run t_max_predict_ms, so does the next piece with a newline
    n_indent: int = 0
    t_max_predict_ms: float = 0.0


_MISSING = object()
_SAMPLING = {"temperature": float, "top_p": float, "top_k": int, "min_p": float,
             "repeat_penalty": float, "repeat_last_n": int, "seed": int,
             "frequency_penalty": float, "presence_penalty": float}
_OPENAI_RANGES = {"temperature": (0, 2), "top_p": (0, 1), "presence_penalty": (-2, 2),
                  "frequency_penalty": (-2, 2)}
_KINDS = {int: "an integer", float: "a number", bool: "a boolean", str: "a string",
          list: "an array", dict: "an object"}


def _field(body: dict, name: str, kind: type, default: Any = None) -> Any:
    """body[name] checked against `kind` (int also accepted for float; never bool for a
    number); `default` when absent or null."""
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    ok = isinstance(v, kind) and not (kind in (int, float) and isinstance(v, bool))
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        ok, v = True, float(v)
    if not ok:
        what = _KINDS.get(kind, "of another type")
        raise APIError(400, f"{name!r} must be {what}, got {type(v).__name__} "
                            f"{json.dumps(v)[:60]}", "invalid_type", param=name)
    return v


def object_body(body: Any) -> dict:
    """The parsed body, which every route takes as a JSON object."""
    if not isinstance(body, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(body).__name__}",
                       "invalid_type")
    return body


def _common(body: Any, defaults: dict, max_default: int | None,
            *max_names: str) -> dict:
    body = object_body(body)
    kw: dict[str, Any] = {"model": _field(body, "model", str)}
    max_tokens = max_default
    for name in max_names:  # the first one present wins
        if body.get(name) is not None:
            max_tokens = _field(body, name, int)
            if max_tokens < -1:
                raise APIError(400, f"{name!r} must be >= 0 (or -1: until the context is "
                                    f"full), got {max_tokens}", "invalid_value", param=name)
            max_tokens = None if max_tokens == -1 else max_tokens
            break
    kw["max_tokens"] = max_tokens
    sampling = dict(defaults)
    for name in _SAMPLING:
        v = _field(body, name, _SAMPLING[name])
        if v is not None:
            sampling[name] = v
    # OpenAI's ranges, checked on a request's values only (the server's own defaults may be
    # anything the sampler takes)
    for name, (lo, hi) in _OPENAI_RANGES.items():
        v = body.get(name)
        if v is not None and not lo <= v <= hi:
            raise APIError(400, f"{name} must be in [{lo}, {hi}], got {v}", "invalid_value",
                           param=name)
    if body.get("top_p") == 0:  # OpenAI takes 0: a nucleus of the most probable token alone
        sampling.update(temperature=0.0, top_p=1.0)
    if sampling.get("seed") is not None and sampling["seed"] < 0:
        sampling["seed"] = None  # llama.cpp: -1 = random
    try:
        SamplingParams(**sampling).validate()
    except SamplingError as exc:
        name = str(exc).split(" ", 1)[0]  # its message starts with the parameter's name
        raise APIError(400, str(exc), "invalid_value",
                       param=name if name in _SAMPLING else None) from None
    kw["sampling"] = sampling
    n = _field(body, "n", int, 1)
    if n != 1:
        raise APIError(400, f"only n=1 is supported, got {n}", "unsupported", param="n")
    bias = _logit_bias(body)
    if bias is not None:
        sampling["logit_bias"] = bias
    stop = body.get("stop")
    if stop is None:
        kw["stop"] = []
    elif isinstance(stop, str):
        kw["stop"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        kw["stop"] = list(stop)
    else:
        raise APIError(400, "'stop' must be a string or an array of strings", "invalid_type",
                       param="stop")
    kw["stream"] = _field(body, "stream", bool, False)
    opts = _field(body, "stream_options", dict, {})
    kw["include_usage"] = bool(_field(opts, "include_usage", bool, False))
    return kw


def _logit_bias(body: dict) -> dict[int, float] | None:
    """logit_bias in OpenAI's form ({"token id": bias}, biases in [-100, 100]) or
    llama.cpp's ([[token id, bias or false], …]; false bans the token): {id: bias}. The
    ids' range is checked against the vocabulary when the request runs."""
    raw = body.get("logit_bias")
    if raw is None:
        return None
    # an object's keys are ids written as strings; a pair's string is a text llama.cpp
    # tokenizes ("5" too), which efedge refuses
    digits = isinstance(raw, dict)
    if isinstance(raw, dict):
        pairs = list(raw.items())
    elif isinstance(raw, list) and all(isinstance(e, list) and len(e) == 2 for e in raw):
        pairs = [(k, v) for k, v in raw]
    else:
        raise APIError(400, "'logit_bias' must be an object of token id to bias, or an "
                            "array of [token id, bias] pairs", "invalid_type", param="logit_bias")
    out: dict[int, float] = {}
    for key, val in pairs:
        tok = key if isinstance(key, int) and not isinstance(key, bool) else None
        if digits and isinstance(key, str) and key.isascii() and key.isdigit():
            tok = int(key)
        if tok is None or tok < 0:
            raise APIError(400, f"logit_bias: {json.dumps(key)[:40]} is not a token id (give "
                                "ids; POST /tokenize gives a text's ids)", "invalid_value",
                           param="logit_bias")
        if val is False:
            out[tok] = -math.inf
            continue
        if isinstance(val, bool) or not isinstance(val, int | float) or not -100 <= val <= 100:
            raise APIError(400, f"logit_bias: the bias of token {tok} must be a number in "
                                f"[-100, 100] (or false: banned), got {json.dumps(val)[:40]}",
                           "invalid_value", param="logit_bias")
        out[tok] = float(val)
    return out


# llama-server's --reasoning-format: auto and deepseek put the reasoning in
# reasoning_content; deepseek-legacy too, but streamed it stays in the content, in its
# tags; none leaves the reply as written
REASONING_FORMATS = ("auto", "deepseek", "deepseek-legacy", "none")


def parse_chat(body: Any, defaults: dict, reasoning: str = "auto",
               kwargs: dict | None = None) -> GenRequest:
    """`reasoning` and `kwargs`: the server's defaults for reasoning_format and
    chat_template_kwargs (`efedge serve --reasoning-format / --chat-template-kwargs`)."""
    kw = _common(body, defaults, None, "max_completion_tokens", "max_tokens")
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "'messages' is required", "missing_field", param="messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array", "invalid_type",
                       param="messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'",
                           "invalid_type", param=f"messages[{i}]")
        c = msg.get("content")
        if c is not None and not isinstance(c, str | list):
            raise APIError(400, f"messages[{i}].content must be a string or an array of "
                                "text parts", "invalid_type", param=f"messages[{i}].content")
        # llama-server's rule (and OpenAI's, but for the assistant's reasoning): a turn
        # says something or calls a tool; a message of neither is a client's mistake
        if c is None and not msg.get("tool_calls") and not msg.get("function_call") and \
                not (msg["role"] == "assistant" and (msg.get("reasoning_content")
                                                     or msg.get("thinking"))):
            raise APIError(400, f"messages[{i}] needs a 'content' (or, for an assistant "
                                "turn, 'tool_calls')", "missing_field",
                           param=f"messages[{i}].content")
    # OpenAI's newer "developer" role is what chat templates call "system"; an assistant
    # turn's reasoning_content is what gpt-oss's template reads as "thinking" (llama-server
    # copies it over too)
    messages = [dict(msg, role="system") if msg["role"] == "developer" else
                dict(msg, thinking=msg["reasoning_content"])
                if msg["role"] == "assistant" and isinstance(msg.get("reasoning_content"), str)
                and "thinking" not in msg else msg
                for msg in messages]
    want = _field(body, "logprobs", bool, False)
    top = _top_count(body, "top_logprobs")
    if top and not want:  # as OpenAI: alternatives come with the tokens' own logprobs
        raise APIError(400, "top_logprobs needs \"logprobs\": true", "invalid_value",
                       param="top_logprobs")
    tools, choice = _tools(body)
    fmt = _format(body)
    try:
        mode, names = resolve_choice(choice, tools)
    except ArgumentError as exc:
        raise APIError(400, str(exc), "invalid_value", param="tool_choice") from None
    if mode == "forced":
        if fmt is not None:
            raise APIError(400, "response_format cannot be combined with a tool_choice "
                                "that forces a call", "unsupported", param="tool_choice")
        try:  # the call's grammar: a parameters schema it cannot follow is refused now
            fmt = forced_call_grammar(tools, names)
        except ArgumentError as exc:
            raise APIError(400, str(exc), "unsupported" if "not supported" in str(exc)
                           else "invalid_value", param="tools") from None
    reasoning = _field(body, "reasoning_format", str, reasoning)
    if reasoning not in REASONING_FORMATS:
        raise APIError(400, f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}, "
                            f"got {reasoning!r}", "invalid_value", param="reasoning_format")
    own = _field(body, "chat_template_kwargs", dict)
    if own is not None:  # as llama-server: the request's variables over the server's
        kwargs = {**(kwargs or {}), **own}
    # OpenAI's reasoning_effort, as llama-server maps it: a level becomes the template's
    # reasoning_effort variable (gpt-oss's templates read it), over chat_template_kwargs';
    # "none" asks the template not to think (enable_thinking false), no level given
    effort = _field(body, "reasoning_effort", str)
    if effort == "none":
        kwargs = {k: v for k, v in (kwargs or {}).items() if k != "reasoning_effort"}
        kwargs["enable_thinking"] = False
    elif effort:
        kwargs = {**(kwargs or {}), "reasoning_effort": effort}
    try:
        check_template_kwargs(kwargs)
    except ArgumentError as exc:
        raise APIError(400, str(exc).replace("template_kwargs", "chat_template_kwargs"),
                       "invalid_value", param="chat_template_kwargs") from None
    return GenRequest(messages=messages, prompt=None, echo=False,
                      logprobs=(top or 0) if want else None, format=fmt,
                      tools=tools if mode != "none" else None, forced_call=mode == "forced",
                      parallel_tool_calls=_field(body, "parallel_tool_calls", bool, True),
                      reasoning=reasoning != "none", template_kwargs=kwargs,
                      reasoning_in_content=reasoning == "deepseek-legacy" and kw["stream"],
                      **kw)


def _tools(body: dict) -> tuple[list[dict] | None, Any]:
    """(tools, tool_choice): OpenAI's tools, or the deprecated functions / function_call
    mapped to them; the tools checked (efedge.tool_calls.check_tools), the choice as given."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    param = "tools"
    if body.get("functions") is not None:
        if tools is not None:
            raise APIError(400, "give tools or functions (deprecated), not both",
                           "invalid_value", param="functions")
        funcs, param = body["functions"], "functions"
        if not isinstance(funcs, list):
            raise APIError(400, "'functions' must be an array", "invalid_type",
                           param="functions")
        tools = [{"type": "function", "function": f} for f in funcs]
    if choice is None and body.get("function_call") is not None:
        fc = body["function_call"]  # "none", "auto" or {"name": N}
        choice = {"type": "function", "function": fc} if isinstance(fc, dict) else fc
    try:
        return check_tools(tools), choice
    except ArgumentError as exc:
        msg = str(exc)
        if param == "functions":  # name the entry as the client wrote it
            msg = msg.replace("tools[", "functions[").replace("].function", "]")
        raise APIError(400, msg, "invalid_value", param=param) from None


def parse_completion(body: Any, defaults: dict) -> GenRequest:
    kw = _common(body, defaults, 16, "max_tokens")  # OpenAI's default for completions
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "'prompt' is required", "missing_field", param="prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool)
                                 for t in prompt):
            raise APIError(400, "'prompt' must be a string or an array of token ids "
                                "(batches are not supported)", "invalid_type", param="prompt")
    elif not isinstance(prompt, str):
        raise APIError(400, "'prompt' must be a string or an array of token ids",
                       "invalid_type", param="prompt")
    suffix = _field(body, "suffix", str)
    infill = None
    if suffix:  # OpenAI's insertion: the prompt before the gap, the suffix after it
        if not isinstance(prompt, str):
            raise APIError(400, "with a 'suffix' the prompt must be a string (the text "
                                "before the gap)", "invalid_type", param="prompt")
        infill = {"prefix": prompt, "suffix": suffix, "prompt": "", "extra": []}
    # an integer asks for log probabilities, 0 too (those of the chosen tokens alone)
    logprobs = None if body.get("logprobs") is False else _top_count(body, "logprobs")
    if _field(body, "best_of", int, 1) != 1:
        raise APIError(400, "only best_of=1 is supported", "unsupported", param="best_of")
    echo = _field(body, "echo", bool, False)
    if echo and infill:  # the prompt run is the FIM layout, not the text to echo: its
        # log probabilities would be those of the markers, the prefix and the suffix
        raise APIError(400, "echo cannot be combined with a suffix", "unsupported",
                       param="echo")
    return GenRequest(messages=None, prompt=prompt, echo=echo, logprobs=logprobs,
                      format=_format(body), infill=infill, **kw)


def _format(body: dict) -> str | dict | None:
    """response_format: text (None), json_object ("json": JSON mode) or json_schema (the
    schema: efedge.json_schema), OpenAI's {"json_schema": {"name", "schema", "strict"}}
    (llama.cpp's server also takes the schema beside the type). The schema is compiled
    here, so one efedge cannot follow is a 400 naming the keyword before the request
    waits in line; `strict` changes nothing: the schema is always followed."""
    fmt = _field(body, "response_format", dict, {"type": "text"})
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = fmt.get("json_schema", {"schema": fmt.get("schema")})
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format json_schema needs a schema: "
                                "{\"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                           "invalid_value", param="response_format")
        return checked_format(schema, "response_format")
    raise APIError(400, f"response_format type must be \"text\", \"json_object\" or "
                        f"\"json_schema\", got {json.dumps(kind)[:60]}", "invalid_value",
                   param="response_format")


def checked_format(value: Any, param: str) -> Any:
    """check_format(value) (a schema compiled now), its error a 400 naming `param`: a
    keyword efedge does not take "unsupported", anything else "invalid_value"."""
    try:
        return check_format(value)
    except ArgumentError as exc:
        raise APIError(400, str(exc), "unsupported" if "not supported" in str(exc)
                       else "invalid_value", param=param) from None


def _top_count(body: dict, name: str) -> int | None:
    """How many alternatives per token a logprobs field asks for: 0–MAX_TOP_LOGPROBS
    (OpenAI allows 5 for completions and 20 for chat; llama.cpp more: we take 20 on both)."""
    n = _field(body, name, int)
    if n is not None and not 0 <= n <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {n}",
                       "invalid_value", param=name)
    return n
