"""The FastAPI application: routes, the gate in front of them, errors in OpenAI's shape, and the engine's lifespan.

Design choices:

- **A pure ASGI gate** (:class:`_Gate`) in front of every route: the API key (401; ``/health`` and ``/metrics``
  stay open, for probes and scrapers), admission (503 unless the server is ready: while starting and while
  draining), a declared body size far over the limit (413 before reading it), and the count of generation
  requests in flight, which lasts until a streamed response has ended (the drain waits on it).
- **Bodies are read and parsed by hand** (:func:`_read_json`): the size limit is enforced while reading, bad JSON
  is a 400, and field errors use OpenAI's body, not FastAPI's 422.
- **Every error has OpenAI's body** ``{"error": {"message", "type", "param", "code"}}`` with string type and
  code: 400 bad request, 401, 404 unknown model or route, 405, 413, 503; a 500 only for a bug, logged with its
  traceback on the server and answered with a one-line message (the server goes on).
- **The lifespan owns the engine loop**: it starts the :class:`AsyncEngine` (unless already running) and sends one
  tiny warm-up request through it; the server is ready (200 from ``/health``, generation admitted) once that
  request has finished, so a first step that compiles kernels happens before any client waits on it. On exit it
  shuts the loop down after the requests in flight.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from kimi_linear.engine import SamplingParams
from kimi_linear.engine.async_engine import AsyncEngine
from kimi_linear.server.chat_completions import create_chat_completion
from kimi_linear.server.cli import DEFAULT_MAX_BODY_BYTES
from kimi_linear.server.completions import create_completion
from kimi_linear.server.context import READY, STARTING, ServerContext
from kimi_linear.server.metrics import ServerMetrics
from kimi_linear.server.protocol import ApiError
from kimi_linear.server.streams import ClientGone
from kimi_linear.tokenizer import Tokenizer

log = logging.getLogger(__name__)

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
OPEN_PATHS = ("/health", "/metrics")
_DISCARD_FACTOR = 8  # bodies declared up to this many times the limit are read (and dropped) before the 413


def error_response(ctx: ServerContext | None, error: ApiError) -> JSONResponse:
    if ctx is not None:
        ctx.metrics.http_error(error.status)
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class _Gate:
    def __init__(self, app: ASGIApp, ctx: ServerContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ctx, path = self.ctx, scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        error = None
        if ctx.api_key is not None and path not in OPEN_PATHS and not _authorized(headers, ctx.api_key):
            error = ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'")
        elif path in GENERATION_PATHS and ctx.state != READY:
            error = ApiError(503, f"the server is {ctx.state}: try again later")
        elif _declared_length(headers) > _DISCARD_FACTOR * ctx.max_body_bytes:
            error = ApiError(413, f"the request body exceeds the limit of {ctx.max_body_bytes:,} bytes")
        if error is not None:
            return await error_response(ctx, error)(scope, receive, send)
        if path not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        ctx.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            ctx.in_flight -= 1


def _authorized(headers: dict[str, str], key: str) -> bool:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _declared_length(headers: dict[str, str]) -> int:
    try:
        return int(headers.get("content-length", "0"))
    except ValueError:
        return 0


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > _DISCARD_FACTOR * limit:
            break
        if size <= limit:
            chunks.append(chunk)
        # Over the limit: read on (dropping it) so the client gets the 413 rather than a reset connection.
    if size > limit:
        raise ApiError(413, f"the request body exceeds the limit of {limit:,} bytes")
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


Handler = Callable[[ServerContext, Request, dict[str, Any]], Awaitable[Response]]


def build_app(runner: AsyncEngine, tokenizer: Tokenizer, model_name: str, *, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, model_root: str | None = None,
              shutdown_timeout: float = 30.0) -> FastAPI:
    """The OpenAI-compatible app over ``runner`` (started by the app's lifespan if it is not running yet).
    ``app.state.ctx`` is the :class:`ServerContext` (its ``state`` and ``drain`` drive shutdown)."""
    ctx = ServerContext(runner, tokenizer, model_name, ServerMetrics(runner.engine, model_name), api_key=api_key,
                        max_body_bytes=max_body_bytes, model_root=model_root)

    async def warm_up() -> None:
        prompt = [tokenizer.bos_token_id or 0] * 2
        try:
            async for _ in runner.generate(prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)):
                pass
        except Exception:  # the first real request will meet the problem again, and report it
            log.exception("the warm-up request failed")
        if ctx.state == STARTING:
            ctx.state = READY

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not runner.running:
            runner.start()
        app.state.warm_up = asyncio.create_task(warm_up())  # the server binds meanwhile, answering 503
        try:
            yield
        finally:
            await ctx.drain(0.0 if ctx.in_flight == 0 else shutdown_timeout)
            await asyncio.to_thread(runner.shutdown, shutdown_timeout)

    app = FastAPI(title="kimi-linear", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx

    async def generation(request: Request, handler: Handler) -> Response:
        try:
            body = await _read_json(request, ctx.max_body_bytes)
            return await handler(ctx, request, body)
        except ApiError as e:
            return error_response(ctx, e)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"
        except Exception as e:  # a bug: logged with its traceback, answered in one line
            log.exception("request failed")
            return error_response(ctx, ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generation(request, create_chat_completion)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generation(request, create_completion)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": ctx.created, "owned_by": "kimi-linear",
                "root": model_root or model_name, "parent": None, "max_model_len": runner.engine.max_model_len}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> Response:
        try:
            ctx.check_model(name)
        except ApiError as e:
            return error_response(ctx, e)
        return JSONResponse(model_card())

    @app.get("/health")
    async def health() -> Response:
        if ctx.state != READY:
            return error_response(None, ApiError(503, f"the server is {ctx.state}"))
        if not runner.running:
            return error_response(None, ApiError(503, "the engine loop is not running"))
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.exposition(), headers={"Content-Type": ctx.metrics.content_type})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        messages = {404: f"no route {request.url.path}",
                    405: f"{request.url.path} does not accept {request.method} requests"}
        message = messages.get(exc.status_code, str(exc.detail))
        return error_response(ctx, ApiError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return error_response(ctx, ApiError(500, f"internal error: {type(exc).__name__}"))

    app.add_middleware(_Gate, ctx=ctx)
    return app
