"""The engine requests behind one HTTP request, and what ties their lives to the client's.

An HTTP request becomes one engine request per prompt (``/v1/completions`` takes lists of prompts); each engine
request carries all ``n`` completions of its prompt. :class:`EngineStreams` runs them as tasks that pump their
outputs into one queue, so a handler reads a single merged stream.

Design choices:

- **Validation before the status line.** The engine checks a request when it is added, and ``AsyncEngine.generate``
  adds it on the first step of its iteration, so a bad request is known at once while a good one is known only by
  its first output. :meth:`EngineStreams.first_outputs` waits for every prompt's first event before the handler
  commits to a status: a bad request gets its 400, never a 200 stream that carries an error. The first content
  chunk reaches the client no later for it.
- **Nothing outlives the client.** :meth:`EngineStreams.close` aborts every engine request that has not finished
  (the engine frees its slot and blocks at its next step); handlers call it in ``finally``, which runs whether the
  response ended, the client disconnected (Starlette cancels a streaming body whose client left), or the handler
  failed. A non-streaming handler races its work against :func:`client_gone`, since nothing cancels it otherwise.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from starlette.requests import Request

from kimi_linear.engine import RequestError, RequestOutput, SamplingParams
from kimi_linear.engine.async_engine import AsyncEngine
from kimi_linear.server.metrics import ServerMetrics
from kimi_linear.server.protocol import ApiError, param_of

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


class EngineStreams:
    def __init__(self, runner: AsyncEngine, metrics: ServerMetrics, prefix: str) -> None:
        self._runner = runner
        self._metrics = metrics
        self._queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._unfinished: set[str] = set()
        self._ids: list[str] = []
        self._open = 0  # prompts whose stream has not ended
        self._buffered: list[tuple[int, RequestOutput]] = []
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.prompt_field = "prompt"

    def start(self, prompts: Sequence[list[int]], params: SamplingParams, prompt_field: str = "prompt") -> None:
        self.prompt_field = prompt_field  # what the request calls its prompt, for errors
        for i, prompt in enumerate(prompts):
            request_id = f"{self.id}-{i}"
            self._ids.append(request_id)
            self._unfinished.add(request_id)
            self._tasks.append(asyncio.create_task(self._pump(i, request_id, prompt, params)))
            self._open += 1

    async def _pump(self, index: int, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        timer = self._metrics.timer(params.n)
        try:
            async for out in self._runner.generate(prompt, params, request_id=request_id):
                timer.observe(out)
                if out.finished:
                    self._unfinished.discard(request_id)
                self._queue.put_nowait((index, out, None))
        except asyncio.CancelledError:
            timer.end("abort")  # the client left: AsyncEngine.generate aborted the request on the way out
            raise
        except Exception as e:  # RequestError (a bad request: no request was made), or a bug
            self._unfinished.discard(request_id)
            if not isinstance(e, RequestError):
                timer.end("error")
            self._queue.put_nowait((index, None, e))
            return
        self._queue.put_nowait((index, None, None))

    async def _get(self) -> tuple[int, RequestOutput | None, BaseException | None]:
        item = await self._queue.get()
        if item[1] is None:
            self._open -= 1
        return item

    async def first_outputs(self) -> None:
        """Wait until every prompt has its first output (kept for :meth:`next`). A prompt the engine refused raises
        its 400, one whose first step failed a 500 (:class:`ApiError`); other errors propagate."""
        started: set[int] = set()
        while len(started) < len(self._tasks):
            index, out, error = await self._get()
            if isinstance(error, RequestError):
                raise _rejected(error, index if len(self._tasks) > 1 else None, self.prompt_field)
            if error is not None:
                raise error
            started.add(index)
            if out is not None and out.error is not None:  # the engine failed before the first token
                raise ApiError(500, f"generation failed: {out.error}")
            if out is not None:
                self._buffered.append((index, out))

    async def next(self) -> tuple[int, RequestOutput] | None:
        """The next output of any prompt, as (prompt index, output); None when every prompt has finished. Raises
        a prompt's error."""
        if self._buffered:
            return self._buffered.pop(0)
        while self._open > 0:
            index, out, error = await self._get()
            if error is not None:
                raise error
            if out is not None:
                return index, out
        return None

    def close(self) -> None:
        """Abort what has not finished (synchronous: safe in a cancelled task's ``finally``)."""
        for task in self._tasks:
            task.cancel()
        for request_id in self._unfinished:
            self._runner.abort(request_id)
        self._unfinished.clear()


def _rejected(error: RequestError, index: int | None, prompt_field: str) -> ApiError:
    """The 400 for a request the engine refused, naming the field at fault as well as it can."""
    message = str(error)
    param = param_of(message)
    if param is None:
        param = "max_tokens" if "max_tokens" in message else prompt_field if "prompt" in message else None
    if index is not None:
        message = f"prompt {index}: {message}"
    return ApiError(400, message, param=param)


async def start_or_raise(request: Request, streams: EngineStreams, prompts: Sequence[list[int]],
                         params: SamplingParams, prompt_field: str) -> None:
    """Start the engine requests and wait for their first outputs: a request the engine refuses raises its 400
    (:class:`ApiError`) while no status has been sent. Everything started is aborted on any failure."""
    try:
        streams.start(prompts, params, prompt_field)
        await unless_client_gone(request, streams.first_outputs())
    except BaseException:
        streams.close()
        raise


async def client_gone(request: Request) -> None:
    """Return when the client disconnects. Only for use once the request body has been read: then the server's
    ``receive`` has nothing left to deliver but the disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_client_gone(request: Request, work: Awaitable[T]) -> T:
    """``await work``, or raise :class:`ClientGone` (cancelling the work) when the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise ClientGone
