"""Reading an HTTP request's body for the server (efedge/server.py), the sockets' two
helpers (bind options, whether a client has data or has left) and the answers' JSON
bytes (json_bytes). Bodies: Content-Length or chunked transfer encoding, a size limit,
and JSON — every failure an APIError with the status and code OpenAI clients expect, and
`close=True` where the rest of the body was not read (the connection cannot carry
another request).
"""

from __future__ import annotations

import json
import select
import socket
import sys
from typing import Any

from efedge.server_requests import APIError


def read_body(rfile, headers, limit: int) -> bytes:
    """The request body (`rfile`, `headers`: the handler's); over `limit` bytes it is read
    and dropped (so the client still gets the answer, not a reset) up to 16× the limit,
    then the connection closes."""
    te = headers.get("Transfer-Encoding", "").strip().lower()
    lengths = headers.get_all("Content-Length") or []
    # framing that two parsers could read two ways (a proxy one, this server another) is
    # how requests are smuggled: RFC 9112 §6.3 has it answered 400 and the connection shut
    if te and lengths:
        raise APIError(400, "a request may not have both Transfer-Encoding and "
                       "Content-Length", "invalid_request", close=True)
    if te == "chunked":  # Go / Node clients that stream a body of unknown length
        return _read_chunked(rfile, limit)
    if te:
        raise APIError(400, f"Transfer-Encoding {te!r} is not supported (chunked is)",
                       "invalid_request", close=True)
    values = {v.strip() for field in lengths for v in field.split(",")}
    if len(values) > 1:
        raise APIError(400, f"conflicting Content-Length values {sorted(values)}",
                       "invalid_request", close=True)
    length = values.pop() if values else None
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
    if n > limit:
        drain = n <= 16 * limit
        while drain and n > 0:
            got = rfile.read(min(n, 1 << 16))
            if not got:
                break
            n -= len(got)
        raise APIError(413, f"the request body is {length} bytes; the limit is {limit}",
                       "body_too_large", close=not drain)
    return rfile.read(n)


def _read_chunked(rfile, limit: int) -> bytes:
    """A chunked body (RFC 9112 §7.1), at most `limit` bytes: over it, or malformed,
    the connection closes after the error (the rest is not read)."""
    parts, total = [], 0
    while True:
        line = rfile.readline(1026)
        size_hex = line.split(b";", 1)[0].strip()
        try:
            if not line.endswith(b"\n"):
                raise ValueError
            size = int(size_hex, 16)
            if size < 0:
                raise ValueError
        except ValueError:
            raise APIError(400, f"bad chunk size line {line[:40]!r} in a chunked body",
                           "invalid_request", close=True) from None
        if size == 0:
            break
        total += size
        if total > limit:
            raise APIError(413, f"the chunked request body passes the limit of {limit} "
                                "bytes", "body_too_large", close=True)
        data = rfile.read(size)
        if len(data) != size or rfile.readline(3).strip():
            raise APIError(400, "a chunk of the chunked body is cut short or not "
                                "followed by CRLF", "invalid_request", close=True)
        parts.append(data)
    for _ in range(64):  # trailer fields, up to the empty line
        if rfile.readline(1026).strip() == b"":
            break
    return b"".join(parts)


def read_json(rfile, headers, limit: int) -> Any:
    """The request's JSON body (any value: the routes check its shape)."""
    raw = read_body(rfile, headers, limit)
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object",
                       "invalid_json")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", "invalid_json") from None
    except RecursionError:  # "[[[[…" a few thousand deep fits in any body limit
        raise APIError(400, "the body's JSON is nested too deeply", "invalid_json") from None


def json_bytes(obj: Any) -> bytes:
    """An answer's JSON as UTF-8, characters unescaped — but for a text holding a lone
    surrogate (half a pair: JSON and Python strings carry one, UTF-8 cannot), which is
    written all in ASCII, the surrogate as its \\u escape, instead of failing to encode."""
    text = json.dumps(obj, ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj).encode("ascii")


def set_bind_options(sock: socket.socket) -> None:
    """What a listening socket needs before bind. POSIX: SO_REUSEADDR, so a restarted
    server can bind while the last one's connections sit in TIME_WAIT. Windows: nothing.
    SO_REUSEADDR means something else there — a socket may bind a port another one is
    listening on, and the two then share its connections (a second `efedge serve` on the
    same port started without a word) — and a restart does not need it (asyncio sets it
    on Unix only, for the same reason). SO_EXCLUSIVEADDRUSE is not set either: it would
    also refuse our own restart while the last run's connections close."""
    if sys.platform != "win32":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


def readable(sock: socket.socket) -> bool:
    """Whether `sock` has data, an end of stream or an error waiting (never blocks).
    poll() where there is one: select() takes no descriptor numbered FD_SETSIZE (1024) or
    above (ValueError), which a server with many connections, or one embedded in an app
    with many files open, accepts. Windows has no poll(), and its select() takes any
    socket."""
    if hasattr(select, "poll"):
        p = select.poll()
        p.register(sock, select.POLLIN)
        return bool(p.poll(0))
    return bool(select.select([sock], [], [], 0)[0])
