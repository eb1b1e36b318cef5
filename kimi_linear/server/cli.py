"""The ``serve`` and ``chat`` subcommands' arguments; their implementations are imported only when they run (the
web stack is not loaded for other subcommands)."""

from __future__ import annotations

import argparse
import os

from kimi_linear.server.loading import add_engine_arguments, parse_size

DEFAULT_MAX_BODY_BYTES = 4 << 20


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                        help="split the model over N GPUs of this host (N processes; rank 0 serves HTTP)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port; the chosen one is printed)")
    parser.add_argument("--api-key", default=os.environ.get("KIMI_LINEAR_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $KIMI_LINEAR_API_KEY)")
    parser.add_argument("--served-model-name", help="the model's name in the API (default: the directory's name)")
    parser.add_argument("--max-body-bytes", type=parse_size, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest request body, e.g. 4MiB (larger ones get 413)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds the requests in flight may take to finish after SIGTERM/SIGINT before they are "
                             "aborted")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--no-access-log", dest="access_log", action="store_false", help="no log line per request")


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser, max_num_seqs=4)
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-tokens", type=int, default=1024, help="longest reply, in tokens")


def run_serve(args: argparse.Namespace) -> int:
    from kimi_linear.server.serve import run_serve as run

    return run(args)


def run_chat(args: argparse.Namespace) -> int:
    from kimi_linear.server.terminal import run_chat as run

    return run(args)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``chat`` to the ``kimi-linear`` command's subparsers."""
    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)
    chat = sub.add_parser("chat", help="chat with a model in the terminal")
    add_chat_arguments(chat)
    chat.set_defaults(func=run_chat)
