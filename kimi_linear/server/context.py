"""What every handler of one server shares: the engine, the tokenizer, names, limits, metrics and the lifecycle."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from kimi_linear.engine import LLMEngine
from kimi_linear.engine.async_engine import AsyncEngine
from kimi_linear.server.metrics import ServerMetrics
from kimi_linear.server.protocol import ApiError, TokenText
from kimi_linear.tokenizer import CHAT_MARKERS, Tokenizer

STARTING, READY, DRAINING = "starting", "ready", "draining"


@dataclass(eq=False)
class ServerContext:
    runner: AsyncEngine
    tokenizer: Tokenizer
    model_name: str
    metrics: ServerMetrics
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    model_root: str | None = None  # the model directory, shown by /v1/models
    state: str = STARTING  # new work is admitted only when READY
    in_flight: int = 0  # generation requests being answered (streams included)
    created: int = field(default_factory=lambda: int(time.time()))
    token_text: TokenText = field(init=False)

    def __post_init__(self) -> None:
        self.token_text = TokenText(self.tokenizer)

    @property
    def engine(self) -> LLMEngine:
        return self.runner.engine

    @property
    def has_chat_format(self) -> bool:
        """A chat template, or the markers of the built-in Kimi format."""
        return getattr(self.tokenizer, "chat_template", None) is not None or all(
            name in self.tokenizer.special_tokens for name in CHAT_MARKERS)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist: this server serves {self.model_name!r}",
                           param="model", code="model_not_found", type="invalid_request_error")

    async def drain(self, grace: float) -> None:
        """Stop admitting work (503), wait up to ``grace`` seconds for the requests in flight, then abort what is
        left and give its handlers a moment to answer."""
        self.state = DRAINING
        deadline = time.monotonic() + grace
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + 5.0
        while self.in_flight and time.monotonic() < deadline:
            for request_id in self.engine.request_ids:  # again each time: requests still in the engine's inbox
                self.runner.abort(request_id)
            await asyncio.sleep(0.1)
