"""llama.cpp's own routes, for the clients written against llama-server rather than OpenAI:

    POST /completion   prompt → {"content", "stop", "stop_type", "timings", …}
    POST /infill       input_prefix + input_suffix (+ input_extra, prompt) → the middle,
                       in the same shape (llama.vscode and other editors' code completion)

Requests take llama.cpp's names (`n_predict`, `stream`, `stop`, the sampling fields,
`logit_bias`, `return_tokens`, and the code-completion stops `n_indent` and
`t_max_predict_ms`, as llama-server applies them); `cache_prompt`, `samplers`, `id_slot`,
`t_max_prompt_ms` and other llama-server knobs are accepted and have no effect (efedge's
sampler chain is llama.cpp's default order; the prompt cache is always on). /infill lays
its prompt out for the server's n_predict (none), as llama-server does, not the
request's, which bounds the answer only. Streamed, each piece is one `data: {…}`
event with `"stop": false` and `tokens_predicted` (the tokens generated so far; with
`return_tokens` its own ids in `tokens`), the last one carries `"stop": true` and the
totals (with `return_tokens` the ids no piece gave: a stop string's); there is no
`[DONE]`, as from llama-server.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from efedge.sampling import SamplingParams
from efedge.server_replies import _error_of
from efedge.server_requests import APIError, GenRequest, _common, _field, object_body

ROUTES = ("/completion", "/infill")


def parse_native(path: str, body: Any, defaults: dict) -> GenRequest:
    """A /completion or /infill body as a GenRequest (`native` set; /infill's parts in
    `infill`, built into the prompt by the worker, which knows the vocab)."""
    body = object_body(body)
    kw = _common(body, defaults, None, "n_predict", "max_tokens")
    if _field(body, "n_probs", int, 0):
        raise APIError(400, "n_probs is not supported on llama.cpp's routes; the OpenAI "
                            "routes give log probabilities (logprobs)", "unsupported",
                       param="n_probs")
    infill = None
    if path == "/infill":
        extra = _field(body, "input_extra", list, [])
        for i, chunk in enumerate(extra):
            # (the text is required, as llama-server requires it; the filename is not)
            if not isinstance(chunk, dict) or not isinstance(chunk.get("text"), str) \
                    or not isinstance(chunk.get("filename", "tmp"), str):
                raise APIError(400, f"input_extra[{i}] must be {{\"text\": string, "
                                    "\"filename\": string}", "invalid_type",
                               param="input_extra")
        infill = {"prefix": _field(body, "input_prefix", str, ""),
                  "suffix": _field(body, "input_suffix", str, ""),
                  "prompt": _field(body, "prompt", str, ""), "extra": extra}
        prompt: Any = ""
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(
                isinstance(t, int | str) and not isinstance(t, bool) for t in prompt) and \
                any(isinstance(t, int) for t in prompt):
            pass  # token ids, or llama-server's mixed form: ids and text pieces in one prompt
        elif not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string, or an array of token ids (with "
                                "text pieces among them, as llama-server takes)",
                           "missing_field" if prompt is None else "invalid_type",
                           param="prompt")
    n_indent = _field(body, "n_indent", int, 0)
    t_max = _field(body, "t_max_predict_ms", float, 0.0)
    for name, v in (("n_indent", n_indent), ("t_max_predict_ms", t_max)):
        if not 0 <= v < math.inf:
            raise APIError(400, f"{name} must be >= 0 (0: off), got {v}", "invalid_value",
                           param=name)
    return GenRequest(messages=None, prompt=prompt, echo=False, infill=infill, native=True,
                      return_tokens=_field(body, "return_tokens", bool, False),
                      n_indent=n_indent, t_max_predict_ms=t_max, **kw)


def _settings(req: GenRequest) -> dict:
    """The request's sampling settings, defaults filled in (llama.cpp's
    generation_settings); a logit bias as llama.cpp lists it: [[id, bias or false]]."""
    out = dataclasses.asdict(SamplingParams(**req.sampling))
    bias = out.pop("logit_bias") or {}
    out.update(n_predict=-1 if req.max_tokens is None else req.max_tokens, stop=req.stop,
               logit_bias=[[t, b if math.isfinite(b) else False] for t, b in bias.items()])
    return out


class NativeReplyMixin:
    """Answers in llama-server's shape, for Handler (its _next_event, _send_json,
    _send_error, and ReplyMixin's _event / _begin_events)."""

    def _native_final(self, job, text: str, usage: dict, finish: str, t0: float,
                      t_first: float | None, ids_sent: int = 0) -> dict:
        """The totals; `ids_sent`: the generated ids already given out in pieces."""
        now = time.monotonic()
        t_first = t_first or now
        n_prompt, n_gen = usage["prompt_tokens"], usage["completion_tokens"]
        prompt_ms, gen_ms = 1e3 * (t_first - t0), 1e3 * (now - t_first)
        stop_type = {"length": "limit", "cancelled": "none"}.get(
            finish, "word" if job.stopping_word else "eos")
        return {
            "index": 0, "content": text, "id_slot": 0, "stop": True,
            "model": self.server.model_id,
            "tokens": list(job.tokens[ids_sent:]) if job.req.return_tokens else [],
            "tokens_predicted": n_gen, "tokens_evaluated": n_prompt,
            "generation_settings": _settings(job.req),
            # the prompt run, special tokens written out (llama-server's detokenize(…, true))
            "prompt": self.server.model.detokenize(job.prompt_ids),
            "has_new_line": "\n" in text, "truncated": False, "stop_type": stop_type,
            "stopping_word": job.stopping_word or "", "tokens_cached": n_prompt + n_gen,
            # wall times seen by the server: prompt until the first piece (queue wait
            # included), then generation
            "timings": {"prompt_n": n_prompt, "prompt_ms": prompt_ms,
                        "prompt_per_second": 1e3 * n_prompt / prompt_ms if prompt_ms else 0.0,
                        "predicted_n": n_gen, "predicted_ms": gen_ms,
                        "predicted_per_second": 1e3 * n_gen / gen_ms if gen_ms else 0.0}}

    def _native(self, job, t0: float) -> None:
        stream = job.req.stream
        parts: list[str] = []
        t_first = None
        ids_sent = 0  # (streamed, return_tokens) generated ids given out in pieces
        ev = self._next_event(job)
        if ev[0] == "error":
            self._send_error(_error_of(ev[1]))
            return
        if stream:
            self._begin_events()
        n_prompt = ev[1] if ev[0] == "start" else 0
        while ev[0] != "done":
            if ev[0] == "error":
                if stream:
                    self._event(_error_of(ev[1]).body())
                else:  # nothing written yet: an HTTP error, not a bare event
                    self._send_error(_error_of(ev[1]))
                return
            if ev[0] == "text":
                t_first = t_first or time.monotonic()
                parts.append(ev[1])
                if stream:  # (llama-server's chunk; tokens_predicted: n_decoded so far)
                    n_gen = ev[3]
                    ids = job.tokens[ids_sent:n_gen] if job.req.return_tokens else []
                    ids_sent += len(ids)
                    self._event({"index": 0, "content": ev[1], "tokens": ids, "stop": False,
                                 "id_slot": 0, "tokens_predicted": n_gen,
                                 "tokens_evaluated": n_prompt})
            ev = self._next_event(job)
        _, usage, finish, _, _ = ev
        final = self._native_final(job, "" if stream else "".join(parts), usage, finish,
                                   t0, t_first, ids_sent)
        if stream:
            self._event(final)
        else:
            self._send_json(200, final)
