"""Auxiliary-loss-free MoE load balancing (DeepSeek-V3 style) and load statistics.

Each MoE router adds a per-expert bias ``e_score_correction_bias`` [E] to its scores for expert *selection*
only. After every optimizer step the bias moves against the load: ``b_i += gamma * sign(mean_load - load_i)``,
so overloaded experts become less likely to be picked. The bias is a buffer and gets no gradient. Under data
parallelism the per-expert loads are summed over ranks first, so every rank applies the same update and the
replicated buffers stay identical.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def expert_loads(moe_layers: list[nn.Module]) -> torch.Tensor:
    """Tokens routed to each expert in the last forward, summed over data-parallel ranks: [L, E] fp32."""
    loads = torch.stack([m.last_expert_load.detach().float() for m in moe_layers])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(loads)
    return loads


@torch.no_grad()
def update_router_bias(moe_layers: list[nn.Module], loads: torch.Tensor, gamma: float) -> None:
    """``b += gamma * sign(mean_load - load)`` for each layer; ``loads`` as returned by :func:`expert_loads`."""
    if gamma == 0.0:
        return
    delta = gamma * torch.sign(loads.mean(dim=-1, keepdim=True) - loads)
    for moe, d in zip(moe_layers, delta, strict=True):
        bias = moe.gate.e_score_correction_bias
        bias.add_(d.to(bias.device, bias.dtype))


def load_imbalance(loads: torch.Tensor) -> list[float]:
    """Per-layer max/mean expert load (1.0 is perfectly balanced, E means one expert took everything)."""
    return (loads.max(dim=-1).values / loads.mean(dim=-1).clamp_min(1e-9)).tolist()
