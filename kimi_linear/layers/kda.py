"""Kimi Delta Attention layer: projections, short convs, gates, the KDA op, and the gated output norm.

Per token x (H heads of size K):
  q, k, v = SiLU(causal_conv(q_proj x)), ...           (depthwise, kernel W; state = last W-1 inputs)
  g       = -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias)  (per-channel log-decay, fp32)
  beta    = sigmoid(b_proj x)                            (per head)
  o       = KDA(l2norm(q), l2norm(k), v, g, beta)        (delta rule with per-channel decay)
  out     = o_proj(RMSNorm(o) * o_norm.weight * sigmoid(g_b(g_a(x))))
The gate activation, L2 norm and beta sigmoid are handed to the op ("in kernel") so fused kernels can do them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kimi_linear.cache import CachePool
from kimi_linear.config import KimiLinearConfig
from kimi_linear.layers.norm import RMSNorm
from kimi_linear.ops.conv import causal_conv1d, conv_state_at
from kimi_linear.ops.kda import KDAOptions, chunk_kda, fused_recurrent_kda
from kimi_linear.ops.norm import gated_rms_norm
from kimi_linear.step import StepMetadata


class KimiDeltaAttention(nn.Module):
    def __init__(self, config: KimiLinearConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = H = config.kda_num_heads
        self.head_dim = K = config.kda_head_dim
        D, HK, W = config.hidden_size, H * K, config.conv_kernel_size
        self.q_proj = nn.Linear(D, HK, bias=False)
        self.k_proj = nn.Linear(D, HK, bias=False)
        self.v_proj = nn.Linear(D, HK, bias=False)
        self.q_conv1d = nn.Conv1d(HK, HK, W, groups=HK, bias=False)
        self.k_conv1d = nn.Conv1d(HK, HK, W, groups=HK, bias=False)
        self.v_conv1d = nn.Conv1d(HK, HK, W, groups=HK, bias=False)
        self.A_log = nn.Parameter(torch.empty(1, 1, H, 1, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(HK, dtype=torch.float32))
        self.f_a_proj = nn.Linear(D, K, bias=False)
        self.f_b_proj = nn.Linear(K, HK, bias=False)
        self.b_proj = nn.Linear(D, H, bias=False)
        self.g_a_proj = nn.Linear(D, K, bias=False)
        self.g_b_proj = nn.Linear(K, HK, bias=False)
        self.o_norm = RMSNorm(K, config.rms_norm_eps)  # weight shared across heads; applied gated below
        self.o_proj = nn.Linear(HK, D, bias=False)
        self.reset_gate_parameters()

    @torch.no_grad()
    def reset_gate_parameters(self) -> None:
        """A in [1, 16] (log-uniform A_log) and per-step dt in [1e-3, 1e-1], with dt_bias = softplus^-1(dt)."""
        self.A_log.uniform_(1.0, 16.0).log_()
        dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp().clamp_min(1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: torch.Tensor, meta: StepMetadata, cache: CachePool | None = None) -> torch.Tensor:
        """x ``[num_tokens, D]`` → ``[num_tokens, D]``."""
        T = x.shape[0]
        H, K = self.num_heads, self.head_dim
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)  # [T, 3 H K], pre-conv
        f = self.f_b_proj(self.f_a_proj(x)).view(T, H, K)
        beta = self.b_proj(x)
        options = KDAOptions(A_log=self.A_log.view(H), dt_bias=self.dt_bias, qk_l2norm=True, beta_sigmoid=True)
        if cache is None:
            (rows,), varlen = _rows((qkv,), meta.query_lens, meta.cu_seqlens)
            conv, _ = causal_conv1d(rows, self._conv_weight(), **varlen)
            inputs, varlen = _rows((*_split_heads(conv, H, K), f, beta), meta.query_lens, meta.cu_seqlens,
                                   meta.cu_seqlens_host)
            o, _ = chunk_kda(*inputs, **varlen, options=options)
        else:
            o = self._with_cache(qkv, f, beta, options, meta, cache)
        gate = self.g_b_proj(self.g_a_proj(x)).view(T, H, K)
        o = gated_rms_norm(o.reshape(T, H, K), gate, self.o_norm.weight, self.o_norm.eps)
        return self.o_proj(o.reshape(T, H * K))

    def _with_cache(self, qkv: torch.Tensor, f: torch.Tensor, beta: torch.Tensor, options: KDAOptions,
                    meta: StepMetadata, cache: CachePool) -> torch.Tensor:
        """Continue each sequence from its slot and leave its new state there: decode rows through the recurrent
        kernel, prefill rows through the chunk kernel; then the requested snapshots. Returns o ``[T, H, V]``."""
        H, K = self.num_heads, self.head_dim
        slots, has_state = meta.state_slots, meta.has_initial_state
        conv_pool, state_pool = cache.conv_state[self.layer_idx], cache.kda_state[self.layer_idx]
        # A new sequence starts from zeros by construction: a reused slot may hold anything (freed slots are NaN
        # in tests), so select, never multiply.
        conv_init = torch.where(has_state[:, None, None], conv_pool[slots], 0)
        (rows,), varlen = _rows((qkv,), meta.query_lens, meta.cu_seqlens)
        conv, conv_final = causal_conv1d(rows, self._conv_weight(), initial_state=conv_init, output_final_state=True,
                                         **varlen)
        conv_pool.index_copy_(0, slots, conv_final)
        q, k, v = _split_heads(conv, H, K)
        d = meta.num_decodes
        outputs = []
        if d:
            outputs.append(fused_recurrent_kda(q[:d, None], k[:d, None], v[:d, None], f[:d, None], beta[:d, None],
                                               state_pool=state_pool, state_indices=slots[:d], options=options)[:, 0])
        if d < meta.num_seqs:
            init = torch.where(has_state[d:, None, None, None], state_pool[slots[d:]], 0)
            inputs, varlen = _rows((q[d:], k[d:], v[d:], f[d:], beta[d:]), meta.query_lens[d:],
                                   meta.prefill_cu_seqlens, meta.prefill_cu_seqlens_host)
            o, final, *chunk_states = chunk_kda(*inputs, **varlen, initial_state=init, output_final_state=True,
                                                output_chunk_states=bool(meta.snapshots), options=options)
            state_pool.index_copy_(0, slots[d:], final)
            if meta.snapshots:
                states = torch.cat([*chunk_states, final])
                state_pool.index_copy_(0, meta.snapshot_slots, states[meta.snapshot_state_rows])
                conv_pool.index_copy_(0, meta.snapshot_slots, conv_state_at(
                    qkv, conv_init, meta.cu_seqlens, meta.snapshot_seqs, meta.snapshot_lens,
                    width=self.q_conv1d.kernel_size[0]))
            outputs.append(o.reshape(-1, H, K))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _conv_weight(self) -> torch.Tensor:
        """The q, k, v depthwise conv weights as one ``[3 H K, W]``."""
        return torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight]).squeeze(1)


def _split_heads(qkv: torch.Tensor, H: int, K: int) -> tuple[torch.Tensor, ...]:
    """``[..., 3 H K]`` → q, k, v ``[T, H, K]`` (flattened over the leading dims)."""
    return tuple(t.reshape(-1, H, K) for t in qkv.chunk(3, dim=-1))


def _rows(tensors: tuple[torch.Tensor, ...], lens: tuple[int, ...], cu_seqlens: torch.Tensor,
          cu_seqlens_host: tuple[int, ...] | None = None) -> tuple[tuple[torch.Tensor, ...], dict]:
    """Flat ``[T, ...]`` tensors of sequences of lengths ``lens``, as the ops take them: B rows of L tokens when every
    sequence has L (the batched kernels: a training batch, a decode step), else one packed row described by
    ``cu_seqlens`` (and its host copy, for the ops that would otherwise read it back). Returns the tensors and the
    keyword arguments that describe them."""
    if len(set(lens)) == 1:
        return tuple(t.view(len(lens), lens[0], *t.shape[1:]) for t in tensors), {}
    varlen = {"cu_seqlens": cu_seqlens}
    if cu_seqlens_host is not None:
        varlen["cu_seqlens_host"] = cu_seqlens_host
    return tuple(t[None] for t in tensors), varlen
