"""RMSNorm and the sigmoid-gated RMSNorm of the KDA output, computed in fp32."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dim. The normalisation runs in fp32 and is cast
    back to x's dtype before the weight multiply (the released model's convention, not ``1 + weight``)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm(x) * weight * sigmoid(gate)``, all in fp32, cast to x's dtype at the end.

    x, gate ``[..., D]``; weight ``[D]`` (shared across heads in KDA's ``o_norm``).
    """
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float() * torch.sigmoid(gate.float())).to(x.dtype)
