"""`efedge serve [MODEL] --host 127.0.0.1 --port 8080`: an OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import sys

from efedge.cli.common import (
    add_chat_template_arg,
    add_model_args,
    add_sampling_args,
    load_model,
    progress_bar,
    sampling_kwargs,
)
from efedge.sampling import SamplingParams


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve /v1/models, /v1/completions, /v1/chat/completions (with SSE "
                    "streaming) and /health. Requests run one at a time, in arrival order. "
                    "The sampling flags set the defaults for fields a request leaves out.")
    add_model_args(p)
    add_chat_template_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on "
                   "(default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any free)")
    p.add_argument("-a", "--alias", default=None,
                   help="the model id clients use (default: the file name without .gguf)")
    add_sampling_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from efedge.server import make_server

    defaults = sampling_kwargs(args)
    SamplingParams(**defaults).validate()
    with load_model(args, progress=progress_bar()) as m:
        srv = make_server(m, args.host, args.port, model_id=args.alias, defaults=defaults)
        try:
            print(f"efedge serve: {srv.model_id} on {srv.url}/v1 (Ctrl-C to stop)",
                  file=sys.stderr, flush=True)
            srv.serve_forever()
        except KeyboardInterrupt:
            print("", file=sys.stderr)
        finally:
            srv.server_close()
    return 0
