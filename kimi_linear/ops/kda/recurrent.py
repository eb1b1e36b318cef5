"""KDA decode step on a state pool (continuous batching), PyTorch implementation.

Forward only. Each of N sequences owns one slot of a state pool; ``state_indices`` maps sequence n to its
slot, and the slot is updated in place, so a server can keep states of many requests in one tensor. A negative
slot index marks a padding row (a batch padded to a CUDA-graph size): its state is neither read nor written and
its output is zeros.

The PyTorch step reads no tensor value on the host (no synchronisation on CUDA, so it can be graph-captured):
all N sequences advance together (a loop over the T tokens only), and the pool is read with one gather and
written with one ``index_copy_`` of N rows. That write has no room for a data-dependent number of rows, so
padding rows write too, harmlessly: to the slot of one real row, the very state that row writes (duplicate
indices carry identical values, so the order of the writes does not matter), or, in a batch of padding rows
only, to slot 0 its own old value. A padding row computes on slot 0's state, which may be anything (a freed slot,
even NaN), so its results are dropped with ``torch.where``, never multiplied by a mask (NaN * 0 = NaN).

Backend: CUDA tensors go to the fused Triton kernel (:mod:`kimi_linear.ops.kda.triton_recurrent`), everything
else to PyTorch, unless :mod:`kimi_linear.ops.backend` says otherwise.
"""

from __future__ import annotations

import torch

from kimi_linear.ops.backend import kernel_module
from kimi_linear.ops.kda.gate import KDAOptions
from kimi_linear.ops.kda.naive import delta_rule_step
from kimi_linear.ops.kda.validate import check_kda_inputs


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

    q, k, g ``[N, T, H, K]``; v ``[N, T, H, V]``; beta ``[N, T, H]`` (raw or prepared as ``options`` say, see
    :class:`KDAOptions`); state_pool ``[P, H, K, V]`` fp32 (P >= 1), updated in place at rows ``state_indices``
    ``[N]`` (int). Returns o ``[N, T, H, V]`` in v's dtype. Slot indices must be distinct apart from negative
    (padding) ones, and below P (not checked: that would read them on the host). Computes in fp32 (fp64 for fp64
    inputs).
    """
    kernels = kernel_module(q, "kimi_linear.ops.kda.triton_recurrent", q, v)
    if kernels is not None:
        return kernels.fused_recurrent_kda_triton(
            q, k, v, g, beta, state_pool=state_pool, state_indices=state_indices, scale=scale, options=options
        )
    check_kda_inputs(q, k, v, g, beta, None, None)
    N, T, H, K = q.shape
    V = v.shape[-1]
    if state_indices.dim() != 1 or state_indices.numel() != N:
        raise ValueError(f"state_indices must be [N] with N = {N}, got {tuple(state_indices.shape)}")
    if state_pool.dtype != torch.float32 or state_pool.dim() != 4 or state_pool.shape[1:] != (H, K, V) \
            or state_pool.shape[0] == 0:
        raise ValueError(f"state_pool must be fp32 [P >= 1, {H}, {K}, {V}], got {state_pool.dtype} "
                         f"{tuple(state_pool.shape)}")
    q, k, g, beta = (options or KDAOptions()).prepare(q, k, g, beta)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_dtype = v.dtype
    q, k, v, g, beta = (x.to(acc) for x in (q, k, v, g, beta))
    scale = K**-0.5 if scale is None else scale
    o = torch.zeros(N, T, H, V, dtype=acc, device=q.device)
    if N == 0:
        return o.to(out_dtype)

    valid = state_indices >= 0
    slot = state_indices.long().clamp(min=0)
    old = state_pool.index_select(0, slot)  # [N, H, K, V]
    S = old.to(acc)
    for t in range(T):
        S, o[:, t] = delta_rule_step(S, q[:, t] * scale, k[:, t], v[:, t], g[:, t], beta[:, t])
    S = S.to(state_pool.dtype)

    # A real row if there is one (argmax: a row holding the maximum; any real row would do), else a padding row,
    # whose slot is 0. A 1-element index, not a 0-dim one: indexing with a 0-dim tensor reads it on the host.
    first = valid.to(torch.int32).argmax(0, keepdim=True)
    rows = valid[:, None, None, None]
    fill = torch.where(rows[first], S[first], old[first])  # [1, H, K, V]
    state_pool.index_copy_(0, torch.where(valid, slot, slot[first]), torch.where(rows, S, fill))
    return torch.where(rows, o, torch.zeros((), dtype=o.dtype, device=o.device)).to(out_dtype)
