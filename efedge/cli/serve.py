"""`efedge serve [MODEL] --host 127.0.0.1 --port 8080`: an OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import errno
import signal
import socket
import sys
import threading

from efedge.cli.common import (
    add_chat_template_arg,
    add_model_args,
    add_sampling_args,
    add_template_kwargs_arg,
    checked_number,
    load_model,
    progress_bar,
    sampling_kwargs,
)
from efedge.errors import EfedgeError
from efedge.sampling import SamplingParams, check_logit_bias

_WSAEACCES = 10013


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0-65535 (0: any free one)."""
    return checked_number(text, int, lambda v: 0 <= v <= 65535, "a port number 0-65535")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve the model over OpenAI's, llama-server's and Ollama's HTTP APIs",
        description="Serve OpenAI's /v1/models, /v1/completions, /v1/chat/completions (SSE "
                    "streaming); llama-server's /health, /completion, /infill, /tokenize, "
                    "/detokenize; Ollama's /api/version, /api/tags, /api/ps, /api/show, "
                    "/api/generate, /api/chat (and /metrics with --metrics). Requests run "
                    "one at a time, in arrival order. The sampling flags set the defaults "
                    "for fields a request leaves out.")
    add_model_args(p)
    add_chat_template_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on "
                   "(default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=port_number, default=8080,
                   help="port (default 8080; 0 = any free)")
    p.add_argument("-a", "--alias", default=None,
                   help="the model id clients use (default: the file name without .gguf)")
    p.add_argument("--metrics", action="store_true",
                   help="answer GET /metrics: Prometheus figures (llama-server's names, and "
                        "the expert cache's under efedge:)")
    p.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000; * for any) "
                        "call the server from a browser (CORS); repeatable; default none")
    # (efedge.server_requests.REASONING_FORMATS; not imported here: --help stays fast)
    p.add_argument("--reasoning-format", choices=("auto", "deepseek", "deepseek-legacy", "none"),
                   default="auto",
                   help="a thinking model's <think> part: auto / deepseek put it in "
                        "message.reasoning_content (default), deepseek-legacy too but "
                        "streamed leaves it in the content in its tags, none leaves it in "
                        "the content")
    add_template_kwargs_arg(p, "(a request's chat_template_kwargs override them name by name)")
    add_sampling_args(p)
    p.set_defaults(func=main)


def bind_error(host: str, port: int, exc: Exception) -> EfedgeError:
    """One line naming the address and why it cannot be listened on."""
    if isinstance(exc, socket.gaierror):
        reason = (f"{exc.strerror or exc}: --host takes this machine's IPv4 address or host "
                  "name (127.0.0.1, 0.0.0.0 for every interface, localhost)")
    elif isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        reason = ("the address is already in use (another server?); choose another --port, "
                  "or --port 0 for any free one")
    elif isinstance(exc, OSError) and exc.errno == errno.EADDRNOTAVAIL:
        reason = f"{exc.strerror}: {host} is not an address of this machine"
    elif isinstance(exc, OSError) and getattr(exc, "winerror", None) == _WSAEACCES:
        # Windows' answer for a port another program holds exclusively, or one in a range
        # the system reserved (Hyper-V, WSL): not a privilege, as EACCES is on POSIX
        reason = (f"{exc.strerror}: the port is held by another program or reserved by "
                  "Windows (see `netsh interface ipv4 show excludedportrange protocol=tcp`); "
                  "choose another --port, or --port 0 for any free one")
    elif isinstance(exc, OSError) and exc.errno == errno.EACCES:
        reason = f"{exc.strerror} (ports below 1024 need privileges)"
    else:
        reason = getattr(exc, "strerror", None) or str(exc)
    return EfedgeError(f"cannot listen on {host}:{port}: {reason}")


def check_address(host: str, port: int) -> None:
    """Bind and release the address now, so a taken port or a bad host is reported before
    a model is loaded, not after (the server binds again: a race only costs the wait)."""
    from efedge.server_body import set_bind_options

    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # the server's family
    try:
        set_bind_options(s)  # as the server does (they differ on Windows)
        s.bind((host, port))
    except (OSError, OverflowError) as exc:
        raise bind_error(host, port, exc) from None
    finally:
        s.close()


def main(args: argparse.Namespace) -> int:
    from efedge.api_chat import check_template_kwargs
    from efedge.server import make_server

    defaults = sampling_kwargs(args)
    SamplingParams(**defaults).validate()
    check_address(args.host, args.port)
    with load_model(args, progress=progress_bar()) as m:
        check_logit_bias(defaults.get("logit_bias"), m.config.n_vocab)  # -l ids
        try:
            # a --chat-template that cannot render is the user's to fix now (a TemplateError,
            # one line), not a 500 on every chat request; a broken one in the GGUF only
            # costs the chat route (a warning)
            check_template_kwargs(args.chat_template_kwargs)
            srv = make_server(m, args.host, args.port, model_id=args.alias, defaults=defaults,
                              strict_template=args.chat_template is not None,
                              allow_origins=args.allow_origin or (),
                              reasoning_format=args.reasoning_format,
                              template_kwargs=args.chat_template_kwargs,
                              metrics=args.metrics)
        except (OSError, OverflowError) as exc:
            raise bind_error(args.host, args.port, exc) from None
        # SIGTERM (docker stop, systemd, kill) shuts down as Ctrl-C does: the generation in
        # progress ends "cancelled" with its stream closed properly, waiting requests get
        # 503, exit status 0 — not a process killed mid-response
        on_main = threading.current_thread() is threading.main_thread()  # (signals: only there)
        old_term = signal.signal(signal.SIGTERM, _interrupt) if on_main else None
        try:
            print(f"efedge serve: {srv.model_id} on {srv.url}/v1 (Ctrl-C to stop)",
                  file=sys.stderr, flush=True)
            srv.serve_forever()
        except KeyboardInterrupt:
            print("", file=sys.stderr)
        finally:
            srv.server_close()
            if on_main:
                signal.signal(signal.SIGTERM, old_term if old_term is not None else
                              signal.SIG_DFL)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
