"""A request and its completions (``n`` of them), with what they stream out.

A :class:`Completion` (one token sequence) is the unit the scheduler moves: its ``tokens`` (prompt, then the tokens
generated so far), how many of them the model has processed (``computed``: their effect is in its state slot and
latent blocks), and its place in the pools. Everything about text lives here too: incremental detokenisation that
never splits a UTF-8 character, stop strings matched across token boundaries and cut from the text, and the
hold-back that keeps a possible stop string's beginning out of the stream until it is decided.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kimi_linear.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives, best first


@dataclass
class CompletionOutput:
    """What one completion (choice ``index``) added since the last output."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]
    finished: bool  # every completion has finished
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens reused from the prefix cache (first completion)
    num_output_tokens: int  # over all completions, so far
    error: str | None = None


class Detokenizer:
    """Output ids → text, a piece at a time: ids whose bytes do not yet end a UTF-8 character wait for the next."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._pending: list[int] = []

    def add(self, token_id: int) -> str:
        self._pending.append(token_id)
        text = self._decode(self._pending)
        if text.endswith("\ufffd"):
            return ""
        self._pending.clear()
        return text

    def flush(self) -> str:
        """What is still held back, decoded as it is (a cut character becomes U+FFFD): for the end of a text."""
        text = self._decode(self._pending) if self._pending else ""
        self._pending.clear()
        return text


@dataclass(eq=False)
class Completion:
    seq_id: int
    request: Request
    index: int  # which completion of the request
    tokens: list[int]  # prompt, then output
    generator: torch.Generator | None
    status: Status = Status.WAITING
    computed: int = 0  # tokens processed by the model
    grid_origin: int = 0  # where this run of prefill started: its chunk boundaries lie 64 k tokens after it
    slot: int | None = None
    blocks: list[int] = field(default_factory=list)
    cached_tokens: int = -1  # prompt tokens reused on first admission (-1: not admitted yet)
    ready_hidden: torch.Tensor | None = None  # a cached final hidden state to sample from without a forward
    text: str = ""  # output text so far (stop strings cut), of which ``streamed`` characters went out
    streamed: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    detokenizer: Detokenizer | None = None
    admitted_at: int = -1  # admission order (the newest running sequence is preempted first)
    snapshot_at: int | None = None  # a branch point where the policy wants a snapshot
    _sent_tokens: int = 0  # output tokens already streamed
    _final_sent: bool = False

    @property
    def num_prompt(self) -> int:
        return self.request.num_prompt

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    def append(self, token: int, logprob: TokenLogprob | None, stop_ids: frozenset[int], max_len: int) -> None:
        """Add a sampled token and decide whether the sequence is finished."""
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        p = self.params
        n_out = len(self.tokens) - self.num_prompt
        if token in stop_ids and n_out >= p.min_tokens:
            self._finish("stop", token)
            self._flush_text()
            return
        if self.detokenizer is not None:
            self.text += self.detokenizer.add(token)
            if p.stop and self._cut_stop_string(len(self.text)):
                return
        if n_out >= (p.max_tokens or max_len) or len(self.tokens) >= max_len:
            self._finish("length")
            self._flush_text()

    def _flush_text(self) -> None:
        if self.detokenizer is not None:
            self.text += self.detokenizer.flush()

    def _cut_stop_string(self, end: int) -> bool:
        longest = max(len(s) for s in self.params.stop)
        window_start = max(0, self.streamed - longest)
        hits = [(i, s) for s in self.params.stop if (i := self.text.find(s, window_start)) >= 0]
        if not hits:
            return False
        at, stop = min(hits)
        self.text = self.text[:at]
        self._finish("stop", stop)
        return True

    def _finish(self, reason: str, stop: str | int | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop

    def abort(self) -> None:
        if not self.finished:
            self._finish("abort")

    def take_output(self) -> CompletionOutput | None:
        """What this sequence added since the last call (None if nothing): text up to what a stop string could
        still claim, and all new token ids and logprobs."""
        hold = 0 if self.finished or not self.params.stop else max(len(s) for s in self.params.stop) - 1
        end = max(self.streamed, len(self.text) - hold)
        sent_tokens = self._sent_tokens
        new_ids = self.output_ids[sent_tokens:]
        if end == self.streamed and not new_ids and not (self.finished and not self._final_sent):
            return None
        text = self.text[self.streamed:end]
        self.streamed = end
        lp = self.logprobs[sent_tokens:] if self.params.logprobs is not None else None
        self._sent_tokens = len(self.output_ids)
        if self.finished:
            self._final_sent = True
        return CompletionOutput(self.index, text, new_ids, lp, self.finish_reason if self.finished else None,
                                self.stop_reason)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    sequences: list[Completion] = field(default_factory=list)  # completion 0 first; the others once it has a token
    error: str | None = None
    aborted: bool = False

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        complete = len(self.sequences) == self.params.n and all(s.finished for s in self.sequences)
        return complete or self.aborted or self.error is not None
