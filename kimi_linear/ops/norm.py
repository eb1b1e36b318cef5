"""RMSNorm and the sigmoid-gated RMSNorm of the KDA output, computed in fp32.

On CUDA, when no gradient flows, each runs as one Triton kernel (:mod:`kimi_linear.ops.triton_norm`) instead of
several element-wise passes; training keeps the differentiable PyTorch form.
"""

from __future__ import annotations

import torch

from kimi_linear.ops.backend import needs_grad, use_kernel


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dim. The normalisation runs in fp32 and is cast
    back to x's dtype before the weight multiply (the released model's convention, not ``1 + weight``)."""
    if use_kernel(x, supported=not needs_grad(x, weight) and x.dtype != torch.float64):
        from kimi_linear.ops.triton_norm import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm(x) * weight * sigmoid(gate)``, all in fp32, cast to x's dtype at the end.

    x, gate ``[..., D]``; weight ``[D]`` (shared across heads in KDA's ``o_norm``).
    """
    if use_kernel(x, supported=not needs_grad(x, gate, weight) and x.dtype != torch.float64):
        from kimi_linear.ops.triton_norm import gated_rms_norm_triton

        return gated_rms_norm_triton(x, gate, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float() * torch.sigmoid(gate.float())).to(x.dtype)
