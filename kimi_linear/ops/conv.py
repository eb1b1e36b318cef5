"""Depthwise causal short convolution with carried state (KDA's q/k/v conv), PyTorch implementation.

One code path serves batches, packed sequences and decode: every output gathers its W inputs by *virtual
position* inside its own sequence; positions before the sequence start read the carried state (the last W-1
pre-conv inputs of that sequence, oldest first), or zeros. Nothing crosses a sequence boundary.
On CUDA, when no gradient flows (prefill, decode), the Triton kernel of :mod:`kimi_linear.ops.triton_conv`
computes the same thing in one pass, without host synchronisation (so decode steps can be graph-captured).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_linear.ops.backend import needs_grad, use_kernel


def check_conv_inputs(x: torch.Tensor, weight: torch.Tensor, initial_state: torch.Tensor | None,
                      cu_seqlens: torch.Tensor | None, activation: str | None) -> int:
    """Validate the ``causal_conv1d`` contract (shared by every implementation); returns N, the number of
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
    if initial_state is not None and tuple(initial_state.shape) != (N, D, W - 1):
        raise ValueError(f"conv initial_state must be [N, D, W-1] = [{N}, {D}, {W - 1}], "
                         f"got {tuple(initial_state.shape)}")
    return N


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y[t] = act(sum_j weight[:, W-1-j] * x[t-j]) within each sequence.

    x ``[B, T, D]``; weight ``[D, W]``; initial_state / final state ``[N, D, W-1]`` in x's dtype (N = B, or
    ``len(cu_seqlens) - 1`` with B = 1 for packed sequences). Accumulates in fp32 (fp64 for fp64 input);
    returns y in x's dtype.
    """
    if use_kernel(x, supported=not needs_grad(x, weight, initial_state) and x.dtype != torch.float64):
        from kimi_linear.ops.triton_conv import causal_conv1d_triton

        return causal_conv1d_triton(x, weight, initial_state=initial_state, output_final_state=output_final_state,
                                    cu_seqlens=cu_seqlens, activation=activation)
    N = check_conv_inputs(x, weight, initial_state, cu_seqlens, activation)
    B, T, D = x.shape
    W = weight.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)
    if cu_seqlens is None and initial_state is None and not output_final_state:
        y = F.conv1d(x.transpose(1, 2).to(acc), weight.to(acc)[:, None, :], padding=W - 1, groups=D)[..., :T]
        y = y.transpose(1, 2)
        return (F.silu(y) if activation else y).to(x.dtype), None

    if cu_seqlens is None:
        cu_seqlens = torch.arange(B + 1, device=x.device) * T
    cu = cu_seqlens.to(device=x.device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    total = B * T
    flat = x.reshape(total, D)
    # Source rows: the tokens, then each sequence's W-1 state rows (zeros without a state).
    state = (initial_state.transpose(1, 2).reshape(N * (W - 1), D) if initial_state is not None
             else flat.new_zeros(N * (W - 1), D))
    source = torch.cat([flat, state.to(flat.dtype)]).to(acc)

    def rows(seq: torch.Tensor, virtual_pos: torch.Tensor) -> torch.Tensor:
        # virtual_pos >= 0: a token of the sequence; < 0: slot W-1+virtual_pos of its carried state.
        return torch.where(virtual_pos >= 0, cu[seq] + virtual_pos, total + seq * (W - 1) + (W - 1) + virtual_pos)

    seq = torch.repeat_interleave(torch.arange(N, device=x.device), lengths)
    pos = torch.arange(total, device=x.device) - cu[seq]
    w = weight.to(acc)
    y = sum(w[:, W - 1 - j] * source[rows(seq, pos - j)] for j in range(W))
    y = (F.silu(y) if activation else y).to(x.dtype).reshape(B, T, D)

    final = None
    if output_final_state:
        slots = torch.arange(W - 1, device=x.device)
        virtual = lengths[:, None] - (W - 1) + slots[None, :]  # [N, W-1]
        seqs = torch.arange(N, device=x.device)[:, None].expand_as(virtual)
        final = source[rows(seqs, virtual)].to(x.dtype).transpose(1, 2)  # [N, D, W-1]
    return y, final


def conv_state_at(x, initial_state, cu_seqlens, seq_index, lengths):  # TEMPORARY SHIM until the ops branch lands
    flat = x.reshape(-1, x.shape[-1])
    N, D, W1 = initial_state.shape
    cu = cu_seqlens.long()
    slots = torch.arange(W1, device=x.device)
    virtual = lengths[:, None] - W1 + slots[None, :]
    seq = seq_index[:, None].expand_as(virtual)
    src = torch.cat([flat, initial_state.transpose(1, 2).reshape(N * W1, D).to(flat.dtype)])
    rows = torch.where(virtual >= 0, cu[seq] + virtual, flat.shape[0] + seq * W1 + W1 + virtual)
    return src[rows].transpose(1, 2)
