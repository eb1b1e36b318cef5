"""Feed-forward blocks: the dense SwiGLU MLP (layer 0, and the shared expert) and the MoE block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi_linear.config import KimiLinearConfig
from kimi_linear.ops.moe import expert_counts, moe_experts, route, sequence_balance_loss


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """All routed experts of one layer, stacked so that one grouped matmul serves them all.

    The checkpoint stores ``experts.{j}.w1/w3/w2``; :mod:`kimi_linear.checkpoint` stacks them into
    ``gate_up_proj [E, 2I, D]`` (w1 rows, then w3 rows) and ``down_proj [E, D, I]``.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, init_std: float) -> None:
        super().__init__()
        self.init_std = init_std
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_up_proj, std=self.init_std)
        nn.init.normal_(self.down_proj, std=self.init_std)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x ``[N, D]``; indices, weights ``[N, k]`` → ``[N, D]``."""
        return moe_experts(x, self.gate_up_proj, self.down_proj, indices, weights)


class Router(nn.Module):
    """The ``gate``: router weight ``[E, D]`` and the selection-only ``e_score_correction_bias`` ``[E]`` (fp32,
    no gradient; training updates it from expert load, see aux-loss-free balancing)."""

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.config.initializer_range)
        self.e_score_correction_bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.config
        return route(
            x, self.weight, self.e_score_correction_bias, top_k=c.num_experts_per_token,
            num_expert_group=c.num_expert_group if c.use_grouped_topk else 1,
            topk_group=c.topk_group if c.use_grouped_topk else 1,
            renormalize=c.moe_renormalize, routed_scaling_factor=c.routed_scaling_factor,
            weights_from_biased_scores=c.moe_weights_from_biased_scores,
        )


class MoE(nn.Module):
    """``y = sum_k w_k Expert_k(x) + SharedExpert(x)`` with sigmoid top-k routing.

    After each forward, ``last_expert_load`` holds the number of tokens routed to each expert (fp32 ``[E]``,
    detached), which aux-loss-free balancing reads; ``balance_loss`` holds the sequence-wise balance loss when
    it was asked for.
    """

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.gate = Router(config)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size,
                               config.initializer_range)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.num_shared_experts)
            if config.num_shared_experts > 0 else None
        )
        self.last_expert_load: torch.Tensor | None = None
        self.balance_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, balance_rows: tuple[int, int] | None = None) -> torch.Tensor:
        """x ``[N, D]`` → ``[N, D]``. ``balance_rows`` (B, T): compute the sequence-wise balance loss, the N tokens
        being B rows of T."""
        weights, indices, scores = self.gate(x)
        self.last_expert_load = expert_counts(indices, self.num_experts).float()
        self.balance_loss = None
        if balance_rows is not None:
            B, T = balance_rows
            self.balance_loss = sequence_balance_loss(scores.view(B, T, -1), indices.view(B, T, -1), self.num_experts)
        y = self.experts(x, indices, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y
