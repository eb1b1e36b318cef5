"""Multi-Head Latent Attention without positional encoding (the "full attention" layers of Kimi Linear).

  q          = q_proj(x)                      [H, nope + rope]
  c_kv, k_pe = kv_a_proj_with_mqa(x)          [kv_lora], [rope] (k_pe shared by all heads, never rotated)
  latent     = [RMSNorm(c_kv), k_pe]          what the cache stores per token
  k_h, v_h   = kv_b_proj(RMSNorm(c_kv))_h ⊕ k_pe
  o          = o_proj(concat_h softmax(q_h k_h^T / sqrt(nope + rope)) v_h)

Two equivalent evaluations:
- expanded (training, prefill): materialise per-head k, v for the sequence's keys and run causal attention over
  variable-length sequences (:func:`kimi_linear.ops.attention.varlen_causal_attention`);
- absorbed (decode rows): fold W_UK into the query and W_UV into the output, and attend over the cached latents
  directly through the block tables, as multi-query attention with 576-d keys and 512-d values
  (:func:`kimi_linear.ops.mla_decode.paged_mla_decode`). It costs O(kv_lora) per cached token instead of
  O(H * (nope + v)), which is what makes the small MLA cache fast to read.
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_linear.cache import CachePool
from kimi_linear.config import KimiLinearConfig
from kimi_linear.layers.norm import RMSNorm
from kimi_linear.ops.attention import varlen_causal_attention
from kimi_linear.ops.mla_decode import paged_mla_decode
from kimi_linear.step import StepMetadata

# The released model's own code normalises the latent with eps 1e-6 (not the config's rms_norm_eps); the
# transformers port agrees, and the weights were trained that way.
KV_NORM_EPS = 1e-6


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

    def forward(self, x: torch.Tensor, meta: StepMetadata, cache: CachePool | None = None) -> torch.Tensor:
        """x ``[num_tokens, D]`` → ``[num_tokens, D]``. With a cache, the step's latents are written first, so
        every query sees its own token."""
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.nope_dim + self.rope_dim)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = torch.cat([self.kv_a_layernorm(c_kv), k_pe], dim=-1)  # [T, kv_lora + rope]
        if cache is None:
            o = self._expanded(q, latent, meta.cu_seqlens, meta.cu_seqlens, meta.query_lens, meta.query_lens)
            return self.o_proj(o.reshape(T, -1))
        store = cache.mla_latent[self.layer_idx]
        store.view(-1, store.shape[-1]).index_copy_(0, meta.slot_mapping, latent)
        d = meta.num_decodes
        parts = []
        if d:
            parts.append(self._absorbed(q[:d], store, meta.block_table[:d], meta.seq_lens[:d]))
        if d < meta.num_seqs:
            q_lens = meta.query_lens[d:]
            if meta.prefill_context_free:  # the keys are this step's own tokens
                keys, cu_k, k_lens = latent[d:], meta.prefill_cu_seqlens, q_lens
            else:
                k_lens = meta.prefill_seq_lens_host
                keys = self._gather(store, meta.block_table[d:], k_lens)
                cu_k = meta.prefill_key_cu_seqlens
            parts.append(self._expanded(q[d:], keys, meta.prefill_cu_seqlens, cu_k, q_lens, k_lens))
        o = torch.cat(parts) if len(parts) > 1 else parts[0]
        return self.o_proj(o.reshape(T, -1))

    def _expanded(self, q: torch.Tensor, latent: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                  q_lens: tuple[int, ...], k_lens: tuple[int, ...]) -> torch.Tensor:
        """q ``[Tq, H, nope + rope]`` over the keys of ``latent`` ``[Tk, kv_lora + rope]`` → ``[Tq, H, v]``."""
        S = latent.shape[0]
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(S, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None].expand(-1, self.num_heads, -1)], dim=-1)
        return varlen_causal_attention(q, k, v, cu_q, cu_k, q_lens, k_lens, self.scale)

    def _absorbed(self, q: torch.Tensor, store: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor) -> torch.Tensor:
        """One query token per row over its cached latents → ``[N, H, v]``."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.nope_dim, self.v_dim], dim=1)  # [H, nope, C], [H, v, C]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_latent = torch.cat([torch.einsum("nhd,hdc->nhc", q_nope, w_uk), q_pe], dim=-1)  # [N, H, C + rope]
        o_latent = paged_mla_decode(q_latent, store, block_table, seq_lens, scale=self.scale,
                                    value_dim=self.kv_lora_rank)
        return torch.einsum("nhc,hdc->nhd", o_latent, w_uv)

    @staticmethod
    def _gather(store: torch.Tensor, block_table: torch.Tensor, lengths: tuple[int, ...]) -> torch.Tensor:
        """The first ``lengths[n]`` cached latents of each sequence, packed: ``[sum(lengths), kv_lora + rope]``."""
        block_size = store.shape[1]
        parts = []
        for n, length in enumerate(lengths):
            blocks = block_table[n, : -(-length // block_size)]
            parts.append(store[blocks].reshape(-1, store.shape[-1])[:length])
        return torch.cat(parts)
