"""Input checks of the short convolution, shared by the PyTorch path (:mod:`kimi_linear.ops.conv`) and the Triton
kernels (:mod:`kimi_linear.ops.triton_conv`). A module of its own: the PyTorch path imports the kernels lazily
(Triton is optional) and the kernels need the checks, so neither may import the other at load time."""

from __future__ import annotations

import torch


def check_conv_inputs(x: torch.Tensor, weight: torch.Tensor, initial_state: torch.Tensor | None,
                      cu_seqlens: torch.Tensor | None, activation: str | None) -> int:
    """Validate the ``causal_conv1d`` contract from shapes only (no device read); returns N, the number of
    sequences."""
    B, T, D = x.shape
    W = weight.shape[-1]
    if weight.shape != (D, W):
        raise ValueError(f"conv weight must be [D, W] = [{D}, W], got {tuple(weight.shape)}")
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got B = {B}")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    check_conv_state(initial_state, N, D, W)
    return N


def check_conv_state(state: torch.Tensor | None, N: int, D: int, W: int) -> None:
    """A carried conv state is ``[N, D, W-1]`` (or absent)."""
    if state is not None and tuple(state.shape) != (N, D, W - 1):
        raise ValueError(f"conv initial_state must be [N, D, W-1] = [{N}, {D}, {W - 1}], got {tuple(state.shape)}")
