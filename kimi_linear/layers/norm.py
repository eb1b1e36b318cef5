"""RMSNorm module (the math lives in :mod:`kimi_linear.ops.norm`)."""

from __future__ import annotations

import torch
from torch import nn

from kimi_linear.ops.norm import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
