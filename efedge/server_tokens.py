"""llama.cpp's tokenizer routes on efedge.server: `POST /tokenize` {"content", "add_special"
(false), "parse_special" (true), "with_pieces" (false)} → {"tokens": [id, …]} or, with
pieces, [{"id", "piece"}, …] (the piece a string, or its bytes as a list where they are not
whole UTF-8); `POST /detokenize` {"tokens": [id, …]} → {"content"}. They read the
tokenizer only, so they answer at once, beside a generation in progress."""

from __future__ import annotations

from typing import Any

from efedge.server_requests import APIError, _field, object_body


def tokenize(model, body: Any) -> dict:
    body = object_body(body)
    content = _field(body, "content", str)
    if content is None:
        raise APIError(400, "'content' is required", "missing_field", param="content")
    add_special = _field(body, "add_special", bool, False)
    parse_special = _field(body, "parse_special", bool, True)
    try:
        ids = model.tokenize(content, add_special=add_special, parse_special=parse_special)
    except ValueError as exc:
        # text with no UTF-8 (JSON's "\\ud800" decodes to a lone surrogate): the client's
        # to fix, and the handler answers APIErrors only (anything else dropped the
        # connection without a response)
        raise APIError(400, str(exc), "invalid_value", param="content") from None
    if not _field(body, "with_pieces", bool, False):
        return {"tokens": ids}
    out = []
    for t in ids:
        raw = model.tokenizer.token_bytes(t)
        try:
            piece: str | list[int] = raw.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: the bytes themselves
            piece = list(raw)
        out.append({"id": t, "piece": piece})
    return {"tokens": out}


def detokenize(model, body: Any) -> dict:
    body = object_body(body)
    tokens = _field(body, "tokens", list, [])
    for i, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, int):
            raise APIError(400, f"tokens[{i}] must be an integer token id, got "
                                f"{type(t).__name__}", "invalid_type", param="tokens")
        if not 0 <= t < model.n_vocab:
            raise APIError(400, f"token id {t} is outside the vocabulary [0, "
                                f"{model.n_vocab})", "invalid_value", param="tokens")
    return {"content": model.detokenize(tokens)}


ROUTES = {"/tokenize": tokenize, "/detokenize": detokenize}
