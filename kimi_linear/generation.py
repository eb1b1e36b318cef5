"""Autoregressive generation of a static batch: one prefill, then one token per step, through the model's
serving step over a :class:`~kimi_linear.cache.HybridCache` (the same step, kernels and pools the engine uses).

Batches may be left-padded (``attention_mask``): pads are left out of the step, so they cannot change any
sequence's tokens; sequences that finished are left out of later steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kimi_linear.cache import HybridCache
from kimi_linear.sampling import sample_next

__all__ = ["generate", "generate_stream", "sample_next"]


@torch.no_grad()
def generate_stream(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence (``[B]`` int64) for up to ``max_new_tokens`` steps.

    input_ids ``[B, T]`` (left-padded where ``attention_mask`` ``[B, T]`` is 0). ``eos_token_id`` defaults to
    the config's; a finished sequence yields ``pad_token_id`` (or its EOS) from then on, and the stream ends
    once every sequence has finished.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0 or temperature < 0:
        raise ValueError(f"top_k and temperature must be >= 0, got top_k={top_k}, temperature={temperature}")
    config = model.config
    eos = config.eos_token_ids if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    B, T = input_ids.shape
    weight = model.model.embed_tokens.weight
    cache = HybridCache(config, B, T + max_new_tokens, device=weight.device, dtype=weight.dtype)
    eos_ids = torch.tensor(eos, device=input_ids.device, dtype=torch.long)
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    logits = model(input_ids, attention_mask=attention_mask, cache=cache, num_logits_to_keep=1).logits[:, -1]
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        token = torch.where(finished, torch.full_like(token, pad), token)
        finished |= torch.isin(token, eos_ids)
        yield token
        if bool(finished.all()) or step + 1 == max_new_tokens:
            return
        logits = model(token[:, None], attention_mask=~finished[:, None], cache=cache,
                       num_logits_to_keep=1).logits[:, -1]


def generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """``input_ids`` followed by the generated tokens: ``[B, T + n]`` with n <= max_new_tokens.
    Keyword arguments as :func:`generate_stream`."""
    tokens = list(generate_stream(model, input_ids, max_new_tokens, **kwargs))
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)
