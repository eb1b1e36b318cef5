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

from kimi_linear.cache import HybridCache
from kimi_linear.config import KimiLinearConfig
from kimi_linear.layers.norm import RMSNorm
from kimi_linear.layers.packing import SequenceInfo
from kimi_linear.ops.conv import causal_conv1d
from kimi_linear.ops.kda import KDAOptions, chunk_kda, fused_recurrent_kda
from kimi_linear.ops.norm import gated_rms_norm

# Longest step that the decode kernel takes; longer ones (prefill, chunked prefill) use the chunk algorithm.
MAX_RECURRENT_STEP = 4


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

    def forward(self, x: torch.Tensor, info: SequenceInfo, cache: HybridCache | None = None) -> torch.Tensor:
        """x ``[B, T, D]`` → ``[B, T, D]``."""
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        if info.attention_mask is not None:
            # A zero input leaves both states exactly as they were: conv sees zeros, k = 0 writes nothing and
            # the decay acts on a zero state, so left padding is invisible to the real tokens.
            x = x * info.attention_mask[..., None].to(x.dtype)
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        conv_w = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight]).squeeze(1)
        if cache is not None:
            qkv, conv_state = causal_conv1d(qkv, conv_w, initial_state=cache.conv_state[self.layer_idx],
                                            output_final_state=True)
            cache.conv_state[self.layer_idx].copy_(conv_state)
        elif info.packed:
            qkv, _ = causal_conv1d(qkv.reshape(1, B * T, -1), conv_w, cu_seqlens=info.cu_seqlens)
        else:
            qkv, _ = causal_conv1d(qkv, conv_w)
        q, k, v = (t.reshape(B, T, H, K) for t in qkv.reshape(B, T, 3 * H * K).chunk(3, dim=-1))
        f = self.f_b_proj(self.f_a_proj(x)).view(B, T, H, K)
        beta = self.b_proj(x)
        fused = KDAOptions(A_log=self.A_log.view(H), dt_bias=self.dt_bias, qk_l2norm=True, beta_sigmoid=True)
        if cache is not None and T <= MAX_RECURRENT_STEP:
            o = fused_recurrent_kda(q, k, v, f, beta, state_pool=cache.kda_state[self.layer_idx],
                                    state_indices=cache.slots, options=fused)
        elif cache is not None:
            state = cache.kda_state[self.layer_idx]
            o, final = chunk_kda(q, k, v, f, beta, initial_state=state, output_final_state=True, options=fused)
            state.copy_(final)
        elif info.packed:
            o, _ = chunk_kda(*(t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v, f, beta)),
                             cu_seqlens=info.cu_seqlens, options=fused)
            o = o.view(B, T, H, K)
        else:
            o, _ = chunk_kda(q, k, v, f, beta, options=fused)
        gate = self.g_b_proj(self.g_a_proj(x)).view(B, T, H, K)
        o = gated_rms_norm(o, gate, self.o_norm.weight, self.o_norm.eps)
        return self.o_proj(o.reshape(B, T, H * K))
