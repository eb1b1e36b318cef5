"""``POST /v1/chat/completions``: messages rendered in the model's chat format, replies parsed into content and
tool calls.

Design choices:

- **The prompt**: :func:`kimi_linear.chat.render_chat` (the checkpoint's own template when its directory has one,
  else the built-in Kimi format), then the ids ``tool_choice`` prefills (:func:`plan_tool_choice`). Generation
  stops on the tokenizer's stop tokens (``<|im_end|>``, ``[EOS]``) unless ``ignore_eos``.
- **The reply is read from token ids**, not from the engine's text: :class:`ToolCallParser` turns each
  completion's ids into content and tool-call deltas (markers are single tokens; malformed calls become content,
  never an error). So stop strings, which the engine cuts from *its* text, are cut again here from the content
  (:class:`StopTrimmer`, holding back what could be the start of one, as the engine does).
- ``finish_reason`` is ``"tool_calls"`` when the model ended its turn after at least one complete call.
- A streamed reply announces a call when its argument marker arrives and streams the arguments as they come; a
  whole reply parses calls only when they close (a call never closed stays content).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from kimi_linear.chat import ChatFormatError, ChatTemplateError, render_chat
from kimi_linear.engine import RequestOutput
from kimi_linear.server.context import ServerContext
from kimi_linear.server.protocol import ApiError, ChatCompletionRequest, chat_logprobs, parse_request, sse, usage
from kimi_linear.server.streams import EngineStreams, start_or_raise, unless_client_gone
from kimi_linear.tool_calls import ToolCallParser, ToolChoicePlan, plan_tool_choice

log = logging.getLogger(__name__)

_CHAT_FIELD = re.compile(r"^((?:messages|tools|tool_choice)(?:\[\d+\]|\.\w+)*)")


class StopTrimmer:
    """Cuts a text stream at the first stop string, holding back a tail that could still begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = list(stops)
        self._hold = max(len(s) for s in self._stops) - 1
        self._buffer = ""
        self.done = False

    def feed(self, text: str) -> str:
        if self.done:
            return ""
        self._buffer += text
        hits = [i for s in self._stops if (i := self._buffer.find(s)) >= 0]
        if hits:
            out, self._buffer, self.done = self._buffer[:min(hits)], "", True
            return out
        cut = max(len(self._buffer) - self._hold, 0)
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out

    def flush(self) -> str:
        """The held-back tail (no stop string can complete it any more)."""
        out, self._buffer = ("" if self.done else self._buffer), ""
        return out


class _Choice:
    """One completion's reply: its parser, stop-string trimming, and what has been said so far."""

    def __init__(self, index: int, ctx: ServerContext, plan: ToolChoicePlan, prefill: list[int],
                 stop: Sequence[str], stream: bool) -> None:
        self.index = index
        self.parser = ToolCallParser(ctx.tokenizer, stream_arguments=stream, parse_tools=plan.parse_tools,
                                     prefill=prefill)
        self.trimmer = StopTrimmer(stop) if stop else None
        self.content: list[str] = []
        self.logprobs: list[dict[str, Any]] = []
        self.finish_reason: str | None = None

    def deltas(self, token_ids: list[int], finished: bool) -> list[dict[str, Any]]:
        raw = self.parser.feed(token_ids)
        if finished:
            raw += self.parser.finish()
        out: list[dict[str, Any]] = []

        def content(text: str) -> None:
            if text:
                self.content.append(text)
                if out and "content" in out[-1]:
                    out[-1]["content"] += text
                else:
                    out.append({"content": text})

        trimmer = self.trimmer
        for delta in raw:
            if "content" in delta:
                content(trimmer.feed(delta["content"]) if trimmer else delta["content"])
            elif trimmer is None or not trimmer.done:  # a call ends any stop string the held text began
                content(trimmer.flush() if trimmer else "")
                out.append(delta)
        if finished and trimmer is not None:
            content(trimmer.flush())
        return out

    def finish(self, reason: str) -> str:
        self.finish_reason = "tool_calls" if reason == "stop" and self.parser.has_tool_calls else reason
        return self.finish_reason


class _ChatCompletion:
    def __init__(self, ctx: ServerContext, req: ChatCompletionRequest, plan: ToolChoicePlan, prefill: list[int],
                 streams: EngineStreams, stop: Sequence[str]) -> None:
        self.ctx, self.req, self.plan, self.streams = ctx, req, plan, streams
        self.created = int(time.time())
        self.choices = [_Choice(i, ctx, plan, prefill, stop, req.stream) for i in range(req.n)]
        self.last: RequestOutput | None = None

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.streams.id, "object": obj, "created": self.created, "model": self.ctx.model_name}

    def usage(self) -> dict[str, Any]:
        out = self.last
        return usage(out.num_prompt_tokens, out.num_output_tokens, out.num_cached_tokens) if out else usage(0, 0, 0)

    async def outputs(self) -> AsyncIterator[tuple[_Choice, list[dict[str, Any]], list[dict[str, Any]] | None,
                                                   str | None]]:
        """(choice, deltas, logprob entries, finish reason) per completion output."""
        while (item := await self.streams.next()) is not None:
            _, out = item
            if out.error is not None:
                raise ApiError(500, f"generation failed: {out.error}")
            self.last = out
            for o in out.outputs:
                choice = self.choices[o.index]
                finished = o.finish_reason is not None
                deltas = choice.deltas(o.token_ids, finished)
                lp = chat_logprobs(o.logprobs, self.ctx.token_text) if o.logprobs else None
                yield choice, deltas, lp, choice.finish(o.finish_reason) if finished else None

    async def collect(self) -> dict[str, Any]:
        async for choice, _, lp, _ in self.outputs():
            choice.logprobs += lp or []
        choices = []
        for c in self.choices:
            calls = c.parser.tool_calls
            problems = self.plan.violations(calls)
            if problems:
                log.info("reply does not follow tool_choice: %s", "; ".join(problems))
            message: dict[str, Any] = {"role": "assistant", "content": "".join(c.content) or (None if calls else "")}
            if calls:
                message["tool_calls"] = calls
            logprobs = {"content": c.logprobs} if self.req.logprobs else None
            choices.append({"index": c.index, "message": message, "logprobs": logprobs,
                            "finish_reason": c.finish_reason})
        return {**self._base("chat.completion"), "choices": choices, "usage": self.usage()}

    def _chunk(self, index: int, delta: dict[str, Any], logprobs: list[dict[str, Any]] | None = None,
               finish_reason: str | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": {"content": logprobs} if logprobs is not None else None,
                  "finish_reason": finish_reason}
        return sse({**self._base("chat.completion.chunk"), "choices": [choice]})

    async def stream(self) -> AsyncIterator[str]:
        try:
            for c in self.choices:
                yield self._chunk(c.index, {"role": "assistant", "content": ""})
            async for choice, deltas, lp, finish_reason in self.outputs():
                if not deltas and lp:
                    deltas = [{}]
                for k, delta in enumerate(deltas):
                    yield self._chunk(choice.index, delta, lp if k == 0 else None)
                if finish_reason is not None:
                    yield self._chunk(choice.index, {}, None, finish_reason)
            if self.req.include_usage:
                yield sse({**self._base("chat.completion.chunk"), "choices": [], "usage": self.usage()})
        except ApiError as e:  # the status line is sent: the error goes in the stream
            yield sse(e.body())
        except Exception as e:  # a bug: logged with its traceback, reported in the stream
            log.exception("stream failed")
            yield sse(ApiError(500, f"internal error: {type(e).__name__}: {e}").body())
        finally:
            self.streams.close()
        yield sse("[DONE]")


def _render(ctx: ServerContext, req: ChatCompletionRequest) -> tuple[ToolChoicePlan, list[int], list[int]]:
    """(tool-choice plan, prompt ids with the prefill, prefill ids)."""
    if not ctx.has_chat_format:
        raise ApiError(400, "this model has no chat format (its tokenizer declares no chat markers and its directory "
                            "has no chat template): use /v1/completions", code="no_chat_format")
    try:
        plan = plan_tool_choice(req.tool_choice, req.tools)
        prompt = render_chat(ctx.tokenizer, req.messages, tools=plan.tools,
                             add_generation_prompt=req.add_generation_prompt)
        prefill = plan.prefill_ids(ctx.tokenizer, req.messages)
    except ChatFormatError as e:
        m = _CHAT_FIELD.match(str(e))
        raise ApiError(400, str(e), param=m.group(1) if m else None) from None
    except ChatTemplateError as e:  # the model directory's fault, not the client's
        log.error("chat template error: %s", e)
        raise ApiError(500, f"the model's chat format is broken: {e}", code="chat_template_error") from None
    return plan, prompt + prefill, prefill


async def create_chat_completion(ctx: ServerContext, request: Request, body: dict[str, Any]) -> Response:
    req = parse_request(ChatCompletionRequest, body)
    ctx.check_model(req.model)
    plan, prompt, prefill = _render(ctx, req)
    params = req.to_sampling_params(ctx.tokenizer.stop_token_ids)
    streams = EngineStreams(ctx.runner, ctx.metrics, "chatcmpl")
    await start_or_raise(request, streams, [prompt], params, "messages")
    completion = _ChatCompletion(ctx, req, plan, prefill, streams, params.stop)
    if req.stream:
        return StreamingResponse(completion.stream(), media_type="text/event-stream")
    try:
        return JSONResponse(await unless_client_gone(request, completion.collect()))
    finally:
        streams.close()
