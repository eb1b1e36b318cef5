"""The hybrid generation cache: fixed-size recurrent state for KDA layers, a latent KV cache for MLA layers.

Per sequence and KDA layer: the recurrent state ``[H, K, V]`` fp32 and the conv state ``[3 * H * K, W - 1]``
(the last W-1 pre-conv inputs of q, k, v), independent of length. Per token and MLA layer: the 576-value
latent (``RMSNorm(c_kv)`` 512 + shared ``k_pe`` 64 for the 48B shape) — the absorbed decode attends over it
directly, so per-head keys and values are never stored.
"""

from __future__ import annotations

import torch

from kimi_linear.config import KimiLinearConfig


def cache_bytes(config: KimiLinearConfig, dtype_bytes: int = 2) -> tuple[int, int]:
    """(MLA bytes per token, KDA bytes per sequence) for a cache in a ``dtype_bytes`` dtype (fp32 KDA state)."""
    types = config.layer_types
    n_mla, n_kda = types.count("mla"), types.count("kda")
    hk = config.kda_num_heads * config.kda_head_dim
    per_token = n_mla * (config.kv_lora_rank + config.qk_rope_head_dim) * dtype_bytes
    per_sequence = n_kda * (hk * config.kda_head_dim * 4 + 3 * hk * (config.conv_kernel_size - 1) * dtype_bytes)
    return per_token, per_sequence


class HybridCache:
    """Cache for ``batch_size`` sequences of up to ``max_length`` tokens, all advancing together.

    Sequence n lives in slot n of every pool. ``length`` counts the positions written so far (pads included);
    ``key_mask`` ``[B, max_length]`` says which of them are real tokens (MLA masks the rest as keys).
    """

    def __init__(self, config: KimiLinearConfig, batch_size: int, max_length: int, *, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        self.batch_size = batch_size
        self.max_length = max_length
        self.length = 0
        H, K = config.kda_num_heads, config.kda_head_dim
        W = config.conv_kernel_size
        latent = config.kv_lora_rank + config.qk_rope_head_dim
        self.kda_state: dict[int, torch.Tensor] = {}
        self.conv_state: dict[int, torch.Tensor] = {}
        self.mla_latent: dict[int, torch.Tensor] = {}
        for i, kind in enumerate(config.layer_types):
            if kind == "kda":
                self.kda_state[i] = torch.zeros(batch_size, H, K, K, device=device, dtype=torch.float32)
                self.conv_state[i] = torch.zeros(batch_size, 3 * H * K, W - 1, device=device, dtype=dtype)
            else:
                self.mla_latent[i] = torch.zeros(batch_size, max_length, latent, device=device, dtype=dtype)
        self.key_mask = torch.zeros(batch_size, max_length, device=device, dtype=torch.bool)
        self.has_padding = False
        self.slots = torch.arange(batch_size, device=device)

    def begin_step(self, num_tokens: int, attention_mask: torch.Tensor | None) -> None:
        """Reserve positions ``[length, length + num_tokens)`` and record which are real tokens
        (``attention_mask`` None: all of them)."""
        if self.length + num_tokens > self.max_length:
            raise ValueError(f"cache holds {self.max_length} positions; {self.length} used, {num_tokens} more asked")
        new = slice(self.length, self.length + num_tokens)
        self.key_mask[:, new] = True if attention_mask is None else attention_mask.to(torch.bool)
        self.has_padding |= attention_mask is not None

    def step_key_mask(self, num_tokens: int) -> torch.Tensor | None:
        """``[B, length + num_tokens]`` real-token mask over the cached and new positions, or None when no
        position is padding (known without reading the mask, so decode steps need no host sync)."""
        return self.key_mask[:, :self.length + num_tokens] if self.has_padding else None

    def end_step(self, num_tokens: int) -> None:
        self.length += num_tokens
