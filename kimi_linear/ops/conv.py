"""Depthwise causal short convolution with carried state (KDA's q/k/v conv), PyTorch implementation.

One code path serves batches, packed sequences and decode: every output gathers its W inputs by *virtual
position* inside its own sequence; positions before the sequence start read the carried state (the last W-1
pre-conv inputs of that sequence, oldest first), or zeros. Nothing crosses a sequence boundary. The same gather
gives the state after any number of a sequence's tokens (:func:`conv_state_at`, e.g. the snapshot at a
prefix-cache boundary), and the final state is that at the full length. Nothing reads a tensor value on the host:
each token finds its sequence by a binary search over the offsets on the device.

On CUDA, when no gradient flows (prefill, decode), the Triton kernel of :mod:`kimi_linear.ops.triton_conv`
computes the convolution and the final state in one pass each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_linear.ops.backend import needs_grad, use_kernel
from kimi_linear.ops.conv_check import check_conv_inputs, check_conv_state


def _inputs_at(flat: torch.Tensor, state: torch.Tensor | None, cu: torch.Tensor, seq: torch.Tensor,
               pos: torch.Tensor, W: int) -> torch.Tensor:
    """The pre-conv inputs at positions ``pos`` of sequences ``seq`` (int64, one shape S): token ``cu[seq] + pos``
    of flat ``[T, D]`` where pos >= 0, else slot ``W-1+pos`` of the sequence's carried state ``[N, D, W-1]`` (zeros
    without one). Positions must lie in [-(W-1), length of the sequence). Returns ``[*S, D]`` in flat's dtype.

    Two gathers and a select rather than one gather from tokens and states concatenated: that would copy all of
    flat, where a state snapshot needs a few rows of it."""
    carried = (pos < 0)[..., None]
    if flat.shape[0] == 0:  # no token to read (only carried slots are asked for then)
        values = flat.new_zeros(*pos.shape, flat.shape[1])
    else:
        values = flat[(cu[seq] + pos).clamp(0, flat.shape[0] - 1)]
    if state is None or W == 1:  # W = 1 carries nothing
        return values.masked_fill(carried, 0)
    # state[seq, :, slot]: the two index tensors broadcast to S and the channel dim comes last, [*S, D]
    past = state[seq, :, (pos + W - 1).clamp(0, W - 2)].to(flat.dtype)
    return torch.where(carried, past, values)


def conv_state_at(
    x: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    seq_index: torch.Tensor,
    lengths: torch.Tensor,
    *,
    width: int,
) -> torch.Tensor:
    """``[R, D, W-1]``: for each r, the last W-1 pre-conv inputs of sequence ``seq_index[r]`` after its first
    ``lengths[r]`` tokens (oldest first), reading the sequence's carried ``initial_state`` rows ``[N, D, W-1]`` (or
    zeros when None) where ``lengths[r] < W-1``.

    x: the packed pre-conv inputs, ``[T, D]`` or ``[1, T, D]``; cu_seqlens ``[N+1]`` int offsets of the sequences
    in x (on x's device or the host); seq_index, lengths ``[R]`` int on x's device, with
    ``0 <= lengths[r] <= `` the length of sequence ``seq_index[r]`` (not checked: that would read them). ``width``
    is the conv kernel size W (given, not taken from initial_state, which may be None). Returns x's dtype (the state
    rounded to it); differentiable in x and initial_state. Reads no tensor value on the host.
    """
    flat = x.reshape(-1, x.shape[-1]) if x.dim() == 3 and x.shape[0] == 1 else x
    if flat.dim() != 2:
        raise ValueError(f"x must be [T, D] or [1, T, D], got {tuple(x.shape)}")
    if width < 1:
        raise ValueError(f"width must be a positive kernel size, got {width}")
    if seq_index.dim() != 1 or lengths.shape != seq_index.shape:
        raise ValueError(f"seq_index and lengths must be [R] alike, got {tuple(seq_index.shape)} and "
                         f"{tuple(lengths.shape)}")
    check_conv_state(initial_state, cu_seqlens.numel() - 1, flat.shape[1], width)
    cu = cu_seqlens.to(device=flat.device, dtype=torch.long)
    slots = torch.arange(width - 1, device=flat.device)
    pos = lengths.long()[:, None] - (width - 1) + slots  # [R, W-1]: position of each slot's input
    seq = seq_index.long()[:, None].expand_as(pos)
    return _inputs_at(flat, initial_state, cu, seq, pos, width).transpose(1, 2)


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
    returns y in x's dtype. Reads no tensor value on the host.
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
    flat = x.reshape(B * T, D)
    token = torch.arange(B * T, device=x.device)
    # Each token's sequence: the number of sequence ends at or before it (empty sequences are skipped).
    seq = torch.searchsorted(cu[1:], token, right=True)
    pos = token - cu[seq]
    w = weight.to(acc)
    y = sum(w[:, W - 1 - j] * _inputs_at(flat, initial_state, cu, seq, pos - j, W).to(acc) for j in range(W))
    y = (F.silu(y) if activation else y).to(x.dtype).reshape(B, T, D)
    if not output_final_state:
        return y, None
    return y, conv_state_at(flat, initial_state, cu, torch.arange(N, device=x.device), cu[1:] - cu[:-1], width=W)
