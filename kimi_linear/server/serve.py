"""``kimi-linear serve``: load a model directory and serve it over HTTP with uvicorn.

Shutdown (SIGINT or SIGTERM): the server stops admitting work (generation requests get 503 and ``/health`` turns
503, so a load balancer stops sending traffic), lets the requests in flight finish for up to ``--shutdown-timeout``
seconds, aborts what is left (their clients get ``finish_reason: "abort"``), then closes the listening socket and
exits with status 0. A second signal exits at once. uvicorn's own handler would close the socket first (new
clients would see a refused connection rather than a 503) and re-raise the signal at exit (status -15 instead of
0), hence :class:`DrainingServer`.

``--tensor-parallel N`` runs the engine over N processes of this host, this one rank 0
(:mod:`kimi_linear.parallel.serving`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from contextlib import nullcontext
from types import FrameType

import uvicorn

from kimi_linear.engine.async_engine import AsyncEngine
from kimi_linear.server.app import build_app
from kimi_linear.server.context import READY, STARTING, ServerContext
from kimi_linear.server.loading import load_engine


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx: ServerContext, grace: float) -> None:
        super().__init__(config)
        self.ctx = ctx
        self.grace = grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def startup(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started:
            self._announcement = self._loop.create_task(self._announce())

    async def _announce(self) -> None:
        """One line on stdout once the server is ready (after the warm-up request): where it listens."""
        while self.ctx.state == STARTING:
            await asyncio.sleep(0.05)
        if self.ctx.state == READY:
            port = self.servers[0].sockets[0].getsockname()[1]
            print(f"kimi-linear: serving {self.ctx.model_name!r} on http://{self.config.host}:{port}", flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the signal handler: only flags and a thread-safe callback, the drain itself runs on the loop.
        if self._draining or self._loop is None:  # a second signal, or one before the loop runs: stop now
            self.force_exit = self._draining
            self.should_exit = True
            return
        self._draining = True
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        await self.ctx.drain(self.grace)
        self.should_exit = True


def run_serve(args: argparse.Namespace) -> int:
    if args.tensor_parallel != 1:
        from kimi_linear.parallel.serving import tensor_parallel_engine

        engines = tensor_parallel_engine(args)
    else:
        engines = nullcontext(load_engine(args))
    with engines as (engine, tokenizer, directory):
        name = args.served_model_name or os.path.basename(os.path.normpath(os.path.abspath(directory)))
        app = build_app(AsyncEngine(engine), tokenizer, name, api_key=args.api_key,
                        max_body_bytes=args.max_body_bytes, model_root=os.path.abspath(directory),
                        shutdown_timeout=args.shutdown_timeout)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                access_log=args.access_log, timeout_graceful_shutdown=5, lifespan="on")
        DrainingServer(config, app.state.ctx, args.shutdown_timeout).run()
    return 0
