"""Multi-Head Latent Attention without positional encoding (the "full attention" layers of Kimi Linear).

  q          = q_proj(x)                      [H, nope + rope]
  c_kv, k_pe = kv_a_proj_with_mqa(x)          [kv_lora], [rope] (k_pe shared by all heads, never rotated)
  latent     = [RMSNorm(c_kv), k_pe]          what the cache stores per token
  k_h, v_h   = kv_b_proj(RMSNorm(c_kv))_h ⊕ k_pe
  o          = o_proj(concat_h softmax(q_h k_h^T / sqrt(nope + rope)) v_h)

Two equivalent evaluations:
- expanded (training, prefill): materialise per-head k, v and run SDPA;
- absorbed (decode): fold W_UK into the query and W_UV into the output, attend over the latent directly, as
  multi-query attention with 576-d keys and 512-d values. Costs O(kv_lora) per cached token instead of
  O(H * (nope + v)), which is what makes the small MLA cache fast to read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi_linear.cache import HybridCache
from kimi_linear.config import KimiLinearConfig
from kimi_linear.layers.norm import RMSNorm
from kimi_linear.layers.packing import SequenceInfo

# The released model's own code normalises the latent with eps 1e-6 (not the config's rms_norm_eps); the
# transformers port agrees, and the weights were trained that way.
KV_NORM_EPS = 1e-6
# Steps with at most this many new tokens attend in absorbed form.
MAX_ABSORBED_STEP = 16


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: KimiLinearConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.scale = config.qk_head_dim**-0.5
        D, H = config.hidden_size, self.num_heads
        self.q_proj = nn.Linear(D, H * config.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, KV_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=False)

    def forward(self, x: torch.Tensor, info: SequenceInfo, cache: HybridCache | None = None) -> torch.Tensor:
        """x ``[B, T, D]`` → ``[B, T, D]``."""
        B, T, _ = x.shape
        H = self.num_heads
        q = self.q_proj(x).view(B, T, H, self.nope_dim + self.rope_dim).transpose(1, 2)  # [B, H, T, dq]
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = torch.cat([self.kv_a_layernorm(c_kv), k_pe], dim=-1)  # [B, T, kv_lora + rope]
        past = 0
        key_mask = info.attention_mask
        if cache is not None:
            past = cache.length
            store = cache.mla_latent[self.layer_idx]
            store[:, past:past + T] = latent
            latent = store[:, :past + T]
            key_mask = cache.step_key_mask(T)
        mask = self._mask(info, T, past, key_mask, x.device)
        if cache is not None and T <= MAX_ABSORBED_STEP:
            o = self._absorbed(q, latent, mask)
        else:
            o = self._expanded(q, latent, mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def _expanded(self, q: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, S, _ = latent.shape
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(B, S, self.num_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None].expand(-1, self.num_heads, -1, -1)], dim=-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)

    def _absorbed(self, q: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        H = self.num_heads
        w = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.nope_dim, self.v_dim], dim=1)  # [H, nope, C], [H, v, C]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_latent = torch.cat([torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk), q_pe], dim=-1)  # [B, H, T, C + rope]
        k = latent[:, None].expand(-1, H, -1, -1)  # one shared key/value head: a view, not a copy
        v = k[..., : self.kv_lora_rank]
        if mask is None:  # a decode step sees the whole cache
            mask = torch.ones(1, 1, q.shape[2], latent.shape[1], dtype=torch.bool, device=q.device).tril(
                latent.shape[1] - q.shape[2])
        o_latent = F.scaled_dot_product_attention(q_latent, k, v, attn_mask=mask, scale=self.scale)
        return torch.einsum("bhtc,hdc->bhtd", o_latent, w_uv)

    @staticmethod
    def _mask(info: SequenceInfo, T: int, past: int, key_mask: torch.Tensor | None,
              device: torch.device) -> torch.Tensor | None:
        """Boolean ``[B or 1, 1, T, past + T]`` (True = may attend), or None for plain causal attention."""
        if info.doc_ids is None and key_mask is None and past == 0:
            return None
        rows = torch.arange(T, device=device)[:, None] + past
        cols = torch.arange(past + T, device=device)[None, :]
        allowed = (cols <= rows)[None]
        if info.doc_ids is not None:
            allowed = allowed & (info.doc_ids[:, :, None] == info.doc_ids[:, None, :])
        if key_mask is not None:
            # A pad query still sees itself, so no row is empty (its output is never used).
            allowed = allowed & key_mask[:, None, :] | (cols == rows)[None]
        return allowed[:, None]
