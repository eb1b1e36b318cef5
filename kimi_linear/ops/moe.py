"""Mixture-of-Experts routing and expert compute over stacked expert weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_linear.ops.backend import needs_grad


def route(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    correction_bias: torch.Tensor,
    *,
    top_k: int,
    num_expert_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    weights_from_biased_scores: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid router with a selection-only correction bias (DeepSeek-V3 semantics).

    x ``[N, D]``; gate_weight ``[E, D]``; correction_bias ``[E]``. The bias picks the experts but the weights
    are gathered from the unbiased scores (as vLLM, SGLang and transformers do), renormalised to sum 1 and
    scaled by ``routed_scaling_factor``. ``weights_from_biased_scores`` gathers them from ``scores + bias`` instead,
    as the model's released remote code does (its gate adds the bias to the scores in place; architecture.md,
    MoE); the experts chosen and the returned scores are the same either way. Group-limited selection keeps the
    ``topk_group`` groups whose two best biased scores sum highest (a no-op with one group).
    Returns (weights ``[N, k]`` fp32, indices ``[N, k]`` int64, scores ``[N, E]`` fp32, unbiased).
    """
    scores = torch.sigmoid(F.linear(x.float(), gate_weight.float()))
    biased = scores + correction_bias.float()
    choice = biased.detach()
    if num_expert_group > 1:
        n, e = choice.shape
        grouped = choice.view(n, num_expert_group, e // num_expert_group)
        group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(n, e)
    indices = choice.topk(top_k, dim=-1).indices
    weights = (biased if weights_from_biased_scores else scores).gather(1, indices)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, indices, scores


def _grouped_mm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run this grouped product: its row strides (in and out dims) must be
    multiples of 16 bytes; on CUDA it takes bf16, forward and backward; on the CPU fp32, bf16 and fp16, forward only
    (its CPU backward fails)."""
    if not hasattr(torch, "_grouped_mm") or any(d * x.element_size() % 16 for d in weight.shape[1:]):
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16
    return x.dtype in (torch.float32, torch.bfloat16, torch.float16) and not needs_grad(x, weight)


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert, ``counts[e]`` rows for expert e (``offsets`` their int32 cumulative sum):
    y_rows(e) = x_rows(e) @ weight[e]^T.

    x ``[M, in]``; weight ``[E, out, in]``. ``torch._grouped_mm`` where it applies (:func:`_grouped_mm_applies`):
    one kernel, and no tensor value read on the host. Elsewhere a loop over the experts that received tokens, which
    reads ``counts`` on the host (a synchronisation on CUDA).
    """
    if _grouped_mm_applies(x, weight):
        # Under autocast x arrives in bf16 while the stacked weight stays fp32: grouped_mm needs one dtype.
        return torch._grouped_mm(x, weight.to(x.dtype).transpose(1, 2), offs=offsets)
    parts = [x_e @ weight[e].t() for e, x_e in enumerate(x.split(counts.tolist())) if x_e.shape[0]]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])


def expert_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E]`` int64: how many token copies each expert received (indices ``[N, k]``). scatter_add rather than
    bincount, which on CUDA reads the largest index on the host to size its output."""
    flat = indices.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def moe_experts(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """``y_n = sum_j weights[n, j] * Expert_{indices[n, j]}(x_n)`` with SwiGLU experts.

    x ``[N, D]``; gate_up_proj ``[E, 2I, D]`` (gate rows first, then up); down_proj ``[E, D, I]``;
    indices, weights ``[N, k]``. Token copies are sorted by expert so each expert runs one matmul; the k copies of a
    token come back to their places and are summed in a fixed order (in fp32), not added by atomics, whose order
    changes from run to run on a GPU: the same inputs give the same bits (graph replay, batch invariance).
    """
    N, k = indices.shape
    E = gate_up_proj.shape[0]
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    token = order // k
    counts = expert_counts(indices, E)
    offsets = counts.cumsum(0).to(torch.int32)
    h = _grouped_linear(x[token], gate_up_proj, counts, offsets)
    gate, up = h.chunk(2, dim=-1)
    out = _grouped_linear(F.silu(gate) * up, down_proj, counts, offsets)
    out = out * weights.reshape(-1)[order, None].to(out.dtype)
    copies = torch.empty_like(out).index_copy_(0, order, out)  # row n * k + j: copy j of token n
    return copies.view(N, k, -1).float().sum(1).to(x.dtype)


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, averaged over sequences.

    scores ``[B, T, E]`` (router sigmoid scores); indices ``[B, T, k]``. Per sequence:
    ``sum_i f_i * P_i`` with ``f_i = E / (k T) * #(tokens routed to i)`` and ``P_i`` the mean of the scores
    normalised over experts. Equals 1 for perfectly uniform routing.
    """
    B, T, k = indices.shape
    load = torch.zeros(B, num_experts, device=scores.device, dtype=scores.dtype)
    load.scatter_add_(1, indices.reshape(B, -1), torch.ones_like(indices.reshape(B, -1), dtype=scores.dtype))
    f = load * num_experts / (k * T)
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)
    return (f * p).sum(-1).mean()
