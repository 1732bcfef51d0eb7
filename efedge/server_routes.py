"""What the server's routes accept — which methods on which paths (a 405's `Allow`) —
and its cross-origin policy (CORS, opt-in: efedge/server.py's docstring)."""

from __future__ import annotations

from efedge.server_native import ROUTES as NATIVE_ROUTES
from efedge.server_ollama import GET_ROUTES as OLLAMA_GET
from efedge.server_ollama import POST_ROUTES as OLLAMA_POST

GET_ROUTES = ("/health", "/v1/health", "/v1/models", "/models", "/metrics", *OLLAMA_GET)
POST_ROUTES = ("/v1/completions", "/v1/chat/completions", "/completions", "/chat/completions",
                "/tokenize", "/detokenize", *NATIVE_ROUTES, *OLLAMA_POST)


def allowed_methods(path: str) -> str | None:
    """The methods a known route takes (an `Allow` header's value); None for other paths."""
    if path in POST_ROUTES:
        return "POST"
    if path in GET_ROUTES or path.startswith("/v1/models/"):
        return "GET, HEAD"
    return None


class CorsMixin:
    """CORS for Handler: the allowed origin's header on every answer, preflights
    answered (its server's allow_origins; its _method_not_allowed otherwise)."""

    def _cors_origin(self) -> str | None:
        """The value of Access-Control-Allow-Origin for this request: its Origin when the
        server allows it ("*" when any is), else None (no CORS headers)."""
        headers = getattr(self, "headers", None)  # None before a request line parsed
        origin = headers.get("Origin") if headers is not None else None
        allowed = self.server.allow_origins
        if not origin or not allowed:
            return None
        if "*" in allowed:
            return "*"
        return origin if origin in allowed else None

    def end_headers(self) -> None:
        origin = self._cors_origin()
        if origin is not None:  # every answer: JSON, SSE and errors alike
            self.send_header("Access-Control-Allow-Origin", origin)
        allowed = self.server.allow_origins
        if allowed and "*" not in allowed:  # the answer depends on the Origin sent, allowed
            # or not: a shared cache must not give one origin's answer to another
            self.send_header("Vary", "Origin")
        super().end_headers()

    def do_OPTIONS(self) -> None:
        """A CORS preflight from an allowed origin: 204 with the route's methods and the
        headers asked for; anything else: 405, as for any method a route does not take."""
        path = self.path.split("?", 1)[0].rstrip("/")
        if self._cors_origin() is None or not self.headers.get(
                "Access-Control-Request-Method"):
            self._method_not_allowed()
            return
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", allowed_methods(path) or "GET, HEAD, POST")
        self.send_header("Access-Control-Allow-Headers", self.headers.get(
            "Access-Control-Request-Headers") or "Content-Type, Authorization")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()
