"""KDA decode step on a state pool (continuous batching), PyTorch implementation.

Forward only. Each of N sequences owns one slot of a state pool; ``state_indices`` maps sequence n to its
slot, and the slot is updated in place, so a server can keep states of many requests in one tensor. A negative
slot index marks a padding row (a batch padded to a CUDA-graph size): its state is neither read nor written and
its output is zeros.

Backend: CUDA tensors go to the fused Triton kernel (:mod:`kimi_linear.ops.kda.triton_recurrent`), everything
else to PyTorch, unless :mod:`kimi_linear.ops.backend` says otherwise.
"""

from __future__ import annotations

import torch

from kimi_linear.ops.backend import kernel_module
from kimi_linear.ops.kda.gate import KDAOptions
from kimi_linear.ops.kda.naive import naive_recurrent_kda


@torch.no_grad()
def fused_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    scale: float | None = None,
    options: KDAOptions | None = None,
) -> torch.Tensor:
    """Advance N sequences by T tokens (usually 1).

    q, k, g ``[N, T, H, K]``; v ``[N, T, H, V]``; beta ``[N, T, H]`` (gate/norm/sigmoid options as in
    ``chunk_kda``); state_pool ``[P, H, K, V]`` fp32, updated in place at rows ``state_indices`` ``[N]`` (int).
    Returns o ``[N, T, H, V]`` in v's dtype. Slot indices must be distinct apart from negative (padding) ones.
    """
    kernels = kernel_module(q, "kimi_linear.ops.kda.triton_recurrent", q, v)
    if kernels is not None:
        return kernels.fused_recurrent_kda_triton(
            q, k, v, g, beta, state_pool=state_pool, state_indices=state_indices, scale=scale, options=options
        )
    if state_indices.dim() != 1 or state_indices.numel() != q.shape[0]:
        raise ValueError(f"state_indices must be [N] with N = {q.shape[0]}, got {tuple(state_indices.shape)}")
    if state_pool.dim() != 4 or state_pool.dtype != torch.float32:
        raise ValueError(f"state_pool must be a 4-D fp32 tensor [P, H, K, V], got {state_pool.dtype} "
                         f"{tuple(state_pool.shape)}")
    q, k, g, beta = (options or KDAOptions()).prepare(q, k, g, beta)
    valid = state_indices >= 0
    idx = state_indices.long().clamp(min=0)
    o, final = naive_recurrent_kda(
        q, k, v, g, beta, scale=scale, initial_state=state_pool[idx], output_final_state=True
    )
    state_pool[idx[valid]] = final[valid]
    return o.masked_fill(~valid[:, None, None, None], 0)
