"""The engine's loop in a background thread, with per-request output streams for asyncio code (the server).

One thread owns the :class:`~kimi_linear.engine.engine.LLMEngine` and calls ``step`` while there is work, sleeping
otherwise; requests and aborts reach it through the engine's thread-safe queue, outputs come back through
``loop.call_soon_threadsafe`` into one ``asyncio.Queue`` per request. A consumer that stops listening (a client
that disconnected) aborts its request, so its slot and blocks are freed at the next step. If a step raises, the
requests in flight end with the error and the loop goes on serving new ones.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Sequence

from kimi_linear.engine.engine import LLMEngine
from kimi_linear.engine.request import RequestOutput
from kimi_linear.sampling import SamplingParams

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kimi-linear-engine", daemon=True)
        self.last_error: BaseException | None = None

    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop after the requests in flight finish (or abort them once ``timeout`` seconds have passed)."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            for request_id in list(self.engine.request_ids):
                self.engine.abort(request_id)
            self._wake.set()
            self._thread.join(5.0)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while True:
            if self.engine.has_unfinished():
                try:
                    self.engine.step()
                except Exception as e:  # keep serving: the requests of the failed step end with the error
                    log.exception("engine step failed")
                    self.last_error = e
                    self.engine.fail_all(f"internal error: {type(e).__name__}: {e}")
            elif self._stopping:
                return
            else:
                self._wake.wait(0.05)
                self._wake.clear()

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs until it finishes. Raises :class:`~kimi_linear.engine.RequestError` at once
        for a request that cannot be served. Leaving the iteration early aborts the request."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        rid = self.engine.add_request(prompt_ids, params, request_id=request_id,
                                      listener=lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out))
        self._wake.set()
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._wake.set()
