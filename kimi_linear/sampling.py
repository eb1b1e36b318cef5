"""Choosing the next token: sampling parameters, their validation, and one batched sampler with per-row settings.

``model.generate`` (one setting for the whole batch) and the serving engine (one per request) use the same code.
Design choices:
- **Per-row tensors.** Temperature, top-k, top-p and min-p become ``[R]`` tensors, so a step samples all its rows in
  a few batched operations whatever mixture of settings they carry. Temperature 0 is greedy.
- **Reproducible seeds.** A row draws its randomness from its own ``torch.Generator`` (the engine keeps one per
  seeded request), through the exponential race ``argmax(p / E)``, ``E ~ Exp(1)``, which samples from p exactly:
  the same seed gives the same tokens whatever else is in the batch.
- **Log-probabilities** are those of the model's own distribution (the raw logits, before penalties, temperature
  and filtering), as OpenAI-compatible servers report them.
- **Penalties** follow the common serving conventions: repetition (divide positive / multiply negative logits of
  every token seen in the prompt or the output), presence and frequency (subtract, over output tokens only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20
INT64_MAX = 2**63 - 1  # seeds and counts go into int64 tensors and torch.Generator


@dataclass
class SamplingParams:
    """How one request's tokens are chosen and when it stops (the OpenAI fields, with vLLM's extensions)."""

    max_tokens: int | None = None  # None: up to the model length
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0 (or -1): off
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # not included in the output text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop tokens are held back until this many tokens were generated
    logprobs: int | None = None  # return the sampled token's log-probability and this many top alternatives
    n: int = 1  # independent completions of the prompt

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the first field out of range."""
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

        need(self.max_tokens is None or (isinstance(self.max_tokens, int) and 1 <= self.max_tokens <= INT64_MAX),
             "max_tokens", "a positive integer")
        need(self.temperature >= 0, "temperature", ">= 0")
        need(isinstance(self.top_k, int) and -1 <= self.top_k <= INT64_MAX, "top_k",
             "an integer >= -1 (0 or -1: off)")
        need(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        need(0 <= self.min_p <= 1, "min_p", "in [0, 1]")
        need(-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]")
        need(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]")
        need(self.repetition_penalty > 0, "repetition_penalty", "> 0")
        need(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= INT64_MAX, "min_tokens",
             "a non-negative integer")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens", "<= max_tokens")
        need(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
             "logprobs", f"an integer in [0, {MAX_LOGPROBS}]")
        need(isinstance(self.n, int) and self.n >= 1, "n", "a positive integer")
        need(self.seed is None or (isinstance(self.seed, int) and -2**63 <= self.seed <= INT64_MAX), "seed",
             "a 64-bit integer")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings")
        need(all(isinstance(t, int) and 0 <= t < vocab_size for t in self.stop_token_ids), "stop_token_ids",
             f"token ids in [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class RowState:
    """What the sampler needs to know of one row besides its settings: tokens seen, and its random source."""

    params: SamplingParams
    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()
    stop_ids: Sequence[int] = ()  # held back while fewer than min_tokens were generated
    generator: torch.Generator | None = None  # None: the sampler's shared generator


@dataclass
class Sampled:
    """One step's choices: ``tokens[r]``; with logprobs, ``logprob[r]`` of the chosen token and the ``top[r]``
    alternatives as (token, logprob) pairs (empty lists for rows that did not ask)."""

    tokens: list[int]
    logprob: list[float | None]
    top: list[list[tuple[int, float]]]


def sample(logits: torch.Tensor, rows: Sequence[RowState], generator: torch.Generator | None = None) -> Sampled:
    """Choose one token for each row of ``logits`` ``[R, V]`` (any float dtype; computed in fp32)."""
    logits = logits.float()
    R = logits.shape[0]
    want_logprobs = [r.params.logprobs is not None for r in rows]
    raw = logits.log_softmax(-1) if any(want_logprobs) else None
    logits = _apply_penalties(logits, rows)
    temperature = torch.tensor([r.params.temperature for r in rows], device=logits.device)
    greedy = temperature == 0
    tokens = logits.argmax(-1)
    if not all(r.params.greedy for r in rows):
        scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
        probs = filter_logits(scaled, _per_row(rows, "top_k", logits.device), _per_row(rows, "top_p", logits.device),
                              _per_row(rows, "min_p", logits.device)).softmax(-1)
        noise = _exponential_noise(R, logits.shape[1], rows, generator, logits.device)
        tokens = torch.where(greedy, tokens, (probs / noise).argmax(-1))
    chosen = tokens.tolist()
    result = Sampled(chosen, [None] * R, [[] for _ in range(R)])
    if raw is not None:
        picked = raw.gather(1, tokens[:, None])[:, 0].tolist()
        k = max(r.params.logprobs or 0 for r in rows)
        top_v, top_i = raw.topk(k, dim=-1) if k else (raw[:, :0], raw[:, :0].long())
        top_v, top_i = top_v.tolist(), top_i.tolist()
        for i, r in enumerate(rows):
            if want_logprobs[i]:
                n = r.params.logprobs
                result.logprob[i] = picked[i]
                result.top[i] = list(zip(top_i[i][:n], top_v[i][:n]))
    return result


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-k (``top_k <= 0``: all), outside the smallest set whose
    probability reaches top-p (a token is dropped when those ranked above it already reach it; the best always stays),
    and below ``min_p`` times the row's best probability. logits ``[R, V]`` fp32; the others ``[R]``."""
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    drop = rank[None, :] >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    drop |= probs.cumsum(-1) - probs >= top_p[:, None]
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One setting for every row of ``logits`` ``[B, V]`` (``model.generate``): greedy when ``temperature`` is 0,
    else a sample of the temperature-scaled distribution restricted by ``top_k`` and ``top_p``. Returns ``[B]``
    int64 on logits' device."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    rows = [RowState(params)] * logits.shape[0]
    return torch.tensor(sample(logits, rows, generator).tokens, device=logits.device)


def _per_row(rows: Sequence[RowState], name: str, device: torch.device) -> torch.Tensor:
    return torch.tensor([getattr(r.params, name) for r in rows], device=device)


def _exponential_noise(R: int, V: int, rows: Sequence[RowState], generator: torch.Generator | None,
                       device: torch.device) -> torch.Tensor:
    """``[R, V]`` Exp(1) draws: a row with its own generator draws its row from it, the others share ``generator``."""
    noise = torch.empty(R, V, device=device).exponential_(generator=generator)
    for i, r in enumerate(rows):
        if r.generator is not None:
            noise[i].exponential_(generator=r.generator)
    return noise.clamp_(min=torch.finfo(torch.float32).tiny)  # p / 0 would be inf (or NaN for p = 0)


def _apply_penalties(logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """Repetition, presence and frequency penalties, and min_tokens' held-back stop tokens."""
    R, V = logits.shape
    dev = logits.device
    if any(r.params.repetition_penalty != 1 for r in rows):
        seen = torch.zeros(R, V, dtype=torch.bool, device=dev)
        for i, r in enumerate(rows):
            if r.params.repetition_penalty != 1:
                seen[i, torch.tensor([*r.prompt_ids, *r.output_ids], dtype=torch.long, device=dev)] = True
        penalty = _per_row(rows, "repetition_penalty", dev)[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    if any(r.params.presence_penalty or r.params.frequency_penalty for r in rows):
        counts = torch.zeros(R, V, device=dev)
        for i, r in enumerate(rows):
            if r.output_ids:
                ids = torch.tensor(list(r.output_ids), dtype=torch.long, device=dev)
                counts[i].index_add_(0, ids, torch.ones(ids.numel(), device=dev))
        logits = (logits - _per_row(rows, "frequency_penalty", dev)[:, None] * counts
                  - _per_row(rows, "presence_penalty", dev)[:, None] * (counts > 0))
    held = [(i, r.stop_ids) for i, r in enumerate(rows) if len(r.output_ids) < r.params.min_tokens and r.stop_ids]
    if held:
        logits = logits.clone()
        for i, ids in held:
            logits[i, torch.tensor(list(ids), dtype=torch.long, device=dev)] = float("-inf")
    return logits
