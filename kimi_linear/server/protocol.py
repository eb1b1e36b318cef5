"""The OpenAI wire format: request models, their translation into :class:`SamplingParams`, errors, and the
pieces of responses (usage, log-probabilities, server-sent events).

Design choices:

- **Lenient in what is unknown, strict in what is known.** Request models ignore unknown fields (clients send
  vendor extensions freely) but type-check the known ones; a known field we cannot honour (``logit_bias``,
  ``suffix``, ``best_of`` other than ``n``, a JSON ``response_format``, ``echo`` with ``logprobs``) is refused with
  a 400 naming it rather than silently ignored, since ignoring it would change what the client gets.
- **Ranges are checked once, by the engine.** The models only check types; :meth:`SamplingParams.validate` (through
  ``add_request``) checks values and names the field, and :func:`param_of` recovers that name for the error body.
- **Defaults follow OpenAI**: ``temperature`` 1.0, ``top_p`` 1.0, ``n`` 1; ``max_tokens`` 16 for completions (the
  legacy endpoint's default) and up to the model length for chat.
- **Token strings** for log-probabilities come from decoding the single id; a special token shows as its name
  (``<|im_end|>``), not as the empty string ``decode`` gives it. ``bytes`` are the UTF-8 bytes of that string.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError

from kimi_linear.engine.request import TokenLogprob
from kimi_linear.sampling import SamplingParams
from kimi_linear.tokenizer import Tokenizer

COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class ApiError(Exception):
    """An error answered with OpenAI's body ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
             503: "service_unavailable_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or {400: "invalid_value", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
                             413: "request_too_large", 500: "internal_error", 503: "service_unavailable"}.get(
                                 status, str(status))
        self.type = type or self.TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_FIELD = re.compile(r"^(\w+) must ")


def param_of(message: str) -> str | None:
    """The field an engine validation message names (``"top_p must be in (0, 1]..."`` → ``top_p``)."""
    m = _FIELD.match(message)
    return m.group(1) if m else None


def _type_tag(part: object) -> bool:
    """Whether a pydantic error-location part names a union member (``str``, ``list[int]``) rather than a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list", "none")
                                      or "[" in part or part.startswith("function-"))


def validation_error(e: ValidationError) -> ApiError:
    """A 400 for the first field pydantic rejected, named by its path (``messages.0``, ``stop``)."""
    errors = e.errors(include_url=False)
    first, loc = errors[0], errors[0]["loc"]
    union = next((i for i, part in enumerate(loc) if _type_tag(part)), None)
    if union is not None:
        # A union (prompt, stop, tool_choice) fails once per member: name the field and the forms it accepts.
        forms = dict.fromkeys(str(err["loc"][union]) for err in errors
                              if err["loc"][:union] == loc[:union] and len(err["loc"]) > union)
        path = ".".join(map(str, loc[:union]))
        value = repr(first.get("input")) if len(loc) == union + 1 else "the value"
        value = value if len(value) <= 60 else value[:57] + "..."
        return ApiError(400, f"{path}: {value} is not one of the accepted forms: {', '.join(forms)}", param=path)
    path = ".".join(map(str, loc))
    return ApiError(400, f"{path or 'body'}: {first['msg']}", param=path or None)


# ---- requests ------------------------------------------------------------------------------------------------------
class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingFields(_Lenient):
    """Fields shared by both endpoints."""

    model: str | None = None  # None: the served model
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: Any = None  # accepted and ignored

    def check_unsupported(self) -> None:
        # The engine's validation lets these through and its step then overflows, failing every request of that
        # step (tests/test_engine_known_bugs.py): refuse them here.
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ApiError(400, "seed must fit in 64 bits", param="seed")
        if self.top_k is not None and self.top_k >= 2**63:
            raise ApiError(400, "top_k must be below 2**63 (any value above the vocabulary size keeps every token)",
                           param="top_k")
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported by this server", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, *, max_tokens: int | None, logprobs: int | None,
                        extra_stop_ids: Sequence[int] = ()) -> SamplingParams:
        """The engine's parameters (values not range-checked here: the engine does that, naming the field)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        stop_ids = list(self.stop_token_ids or [])
        if not self.ignore_eos:
            stop_ids += [t for t in extra_stop_ids if t not in stop_ids]
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=0 if self.top_k is None else self.top_k,
            top_p=1.0 if self.top_p is None else self.top_p,
            min_p=0.0 if self.min_p is None else self.min_p,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed, stop=stop, stop_token_ids=stop_ids, ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, logprobs=logprobs, n=self.n)


class ResponseFormat(_Lenient):
    type: str = "text"


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]]  # checked in detail by kimi_linear.chat (messages[i].field errors)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # accepted; the model decides how many calls it writes
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True  # vLLM's extension

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.response_format is not None and self.response_format.type != "text":
            raise ApiError(400, f"response_format {self.response_format.type!r} is not supported (no constrained "
                                "decoding): only 'text'", param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

    def to_sampling_params(self, extra_stop_ids: Sequence[int]) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens=max_tokens, logprobs=logprobs, extra_stop_ids=extra_stop_ids)


Prompt = str | list[StrictInt] | list[str] | list[list[StrictInt]]


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: int | None = COMPLETIONS_DEFAULT_MAX_TOKENS
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.suffix:
            raise ApiError(400, "suffix (insertion) is not supported by this model", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, "best_of other than n is not supported", param="best_of")
        if self.echo and self.logprobs is not None:
            raise ApiError(400, "echo with logprobs needs the prompt's log-probabilities, which this server does not "
                                "compute", param="echo")

    def to_sampling_params(self, extra_stop_ids: Sequence[int] = ()) -> SamplingParams:
        return self.sampling_params(max_tokens=self.max_tokens, logprobs=self.logprobs, extra_stop_ids=extra_stop_ids)

    def prompts(self, tokenizer: Tokenizer) -> list[tuple[list[int], str | None]]:
        """Each prompt as token ids, with its text when given as text. Text prompts start with the tokenizer's BOS
        (as ``kimi-linear generate`` and training do); token-id prompts are used as given."""
        p = self.prompt
        items: list[str | list[int]]
        if isinstance(p, str):
            items = [p]
        elif p and all(isinstance(x, int) for x in p):
            items = [list(p)]
        else:
            items = list(p)
        if not items:
            raise ApiError(400, "prompt is empty", param="prompt")
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return [(bos + tokenizer.encode(x), x) if isinstance(x, str) else (list(x), None) for x in items]


def parse_request(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        request = model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
    request.check_unsupported()
    return request


# ---- responses -----------------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class TokenText:
    """Token id → the string and bytes shown in log-probabilities (cached: the same ids recur)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._names = {i: name for name, i in tokenizer.special_tokens.items()}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            if token_id in self._names:
                text = self._names[token_id]
                data = text.encode()
            else:
                data = self._tokenizer.decode_bytes([token_id])
                text = data.decode("utf-8", errors="replace")
            hit = self._cache[token_id] = (text, list(data))
        return hit


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText) -> list[dict[str, Any]]:
    """``choices[i].logprobs.content`` entries (OpenAI chat shape)."""
    out = []
    for e in entries:
        text, data = token_text(e.token_id)
        top = []
        for tid, lp in e.top:
            t, b = token_text(tid)
            top.append({"token": t, "logprob": lp, "bytes": b})
        out.append({"token": text, "logprob": e.logprob, "bytes": data, "top_logprobs": top})
    return out


class CompletionLogprobs:
    """The legacy completions ``logprobs`` object of one choice, built a piece at a time; ``text_offset`` counts
    characters of the choice's text (after the echoed prompt, when there is one)."""

    def __init__(self, token_text: TokenText, tokenizer: Tokenizer, start_offset: int = 0) -> None:
        self._token_text = token_text
        self._tokenizer = tokenizer
        self._offset = start_offset
        # Offsets follow the decoded text: a character split over several tokens counts once, at its last byte.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for e in entries:
            text, _ = self._token_text(e.token_id)
            tokens.append(text)
            token_logprobs.append(e.logprob)
            top = {self._token_text(tid)[0]: lp for tid, lp in e.top}
            if e.top:  # OpenAI: the sampled token is always among them (so up to logprobs + 1 entries)
                top.setdefault(text, e.logprob)
            top_logprobs.append(top)
            offsets.append(self._offset)
            self._offset += len(self._decoder.decode(self._tokenizer.decode_bytes([e.token_id])))
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}


def merge_completion_logprobs(pieces: Sequence[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in pieces:
        for k in merged:
            merged[k].extend(p[k])
    return merged


def sse(data: dict[str, Any] | Literal["[DONE]"]) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"

