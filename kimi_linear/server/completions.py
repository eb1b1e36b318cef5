"""``POST /v1/completions``: text in (a prompt, a list of prompts, token ids, or lists of token ids), text out.

Each prompt is one engine request carrying its ``n`` completions; choice ``i`` of prompt ``p`` is ``choices[p * n +
i]``, as in OpenAI's API. Text comes from the engine (incremental detokenisation, stop strings cut there).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kimi_linear.engine import RequestOutput
from kimi_linear.server.context import ServerContext
from kimi_linear.server.protocol import (
    ApiError,
    CompletionLogprobs,
    CompletionRequest,
    merge_completion_logprobs,
    parse_request,
    sse,
    usage,
)
from kimi_linear.server.streams import EngineStreams, start_or_raise, unless_client_gone

log = logging.getLogger(__name__)


class _Choice:
    def __init__(self, index: int, ctx: ServerContext, echo: str | None, logprobs: bool) -> None:
        self.index = index
        self.echo = echo  # prompt text still to send first
        self.text: list[str] = []
        self.logprobs = CompletionLogprobs(ctx.token_text, ctx.tokenizer, len(echo or "")) if logprobs else None
        self.logprob_pieces: list[dict[str, Any]] = []
        self.finish_reason: str | None = None

    def piece(self, text: str, entries: list | None) -> tuple[str, dict[str, Any] | None]:
        if self.echo is not None:
            text, self.echo = self.echo + text, None
        lp = self.logprobs.piece(entries or []) if self.logprobs is not None else None
        return text, lp


class _Completion:
    def __init__(self, ctx: ServerContext, req: CompletionRequest, prompts: list[tuple[list[int], str | None]],
                 streams: EngineStreams) -> None:
        self.ctx, self.req, self.streams = ctx, req, streams
        self.created = int(time.time())
        n = req.n
        self.choices = [
            _Choice(p * n + i, ctx, (text if text is not None else ctx.tokenizer.decode(ids)) if req.echo else None,
                    req.logprobs is not None)
            for p, (ids, text) in enumerate(prompts) for i in range(n)]
        self.last: dict[int, RequestOutput] = {}  # each prompt's latest output: its usage counts

    def usage(self) -> dict[str, Any]:
        outs = self.last.values()
        return usage(sum(o.num_prompt_tokens for o in outs), sum(o.num_output_tokens for o in outs),
                     sum(o.num_cached_tokens for o in outs))

    def _base(self) -> dict[str, Any]:
        return {"id": self.streams.id, "object": "text_completion", "created": self.created,
                "model": self.ctx.model_name}

    async def pieces(self) -> AsyncIterator[tuple[_Choice, str, dict[str, Any] | None]]:
        while (item := await self.streams.next()) is not None:
            p, out = item
            if out.error is not None:
                raise ApiError(500, f"generation failed: {out.error}")
            self.last[p] = out
            for o in out.outputs:
                choice = self.choices[p * self.req.n + o.index]
                text, lp = choice.piece(o.text, o.logprobs)
                choice.finish_reason = o.finish_reason or choice.finish_reason
                yield choice, text, lp

    async def collect(self) -> dict[str, Any]:
        async for choice, text, lp in self.pieces():
            choice.text.append(text)
            if lp is not None:
                choice.logprob_pieces.append(lp)
        choices = [{"index": c.index, "text": "".join(c.text),
                    "logprobs": merge_completion_logprobs(c.logprob_pieces) if c.logprobs is not None else None,
                    "finish_reason": c.finish_reason} for c in self.choices]
        return {**self._base(), "choices": choices, "usage": self.usage()}

    async def stream(self) -> AsyncIterator[str]:
        try:
            async for choice, text, lp in self.pieces():
                if text or lp or choice.finish_reason:
                    yield sse({**self._base(), "choices": [{"index": choice.index, "text": text, "logprobs": lp,
                                                            "finish_reason": choice.finish_reason}]})
            if self.req.include_usage:
                yield sse({**self._base(), "choices": [], "usage": self.usage()})
        except ApiError as e:  # the status line is sent: the error goes in the stream
            yield sse(e.body())
        except Exception as e:  # a bug: logged with its traceback, reported in the stream
            log.exception("stream failed")
            yield sse(ApiError(500, f"internal error: {type(e).__name__}: {e}").body())
        finally:
            self.streams.close()
        yield sse("[DONE]")


async def create_completion(ctx: ServerContext, request: Request, body: dict[str, Any]) -> Response:
    req = parse_request(CompletionRequest, body)
    ctx.check_model(req.model)
    prompts = req.prompts(ctx.tokenizer)
    streams = EngineStreams(ctx.runner, ctx.metrics, "cmpl")
    await start_or_raise(request, streams, [ids for ids, _ in prompts], req.to_sampling_params(), "prompt")
    completion = _Completion(ctx, req, prompts, streams)
    if req.stream:
        return StreamingResponse(completion.stream(), media_type="text/event-stream")
    try:
        return JSONResponse(await unless_client_gone(request, completion.collect()))
    finally:
        streams.close()
