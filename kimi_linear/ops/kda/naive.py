"""Token-by-token KDA recurrence: the reference every other KDA implementation is tested against.

Slow (a Python loop over time) and exact: it computes in float32, or float64 when given float64 inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kimi_linear.ops.kda.validate import check_kda_inputs, host_offsets


def delta_rule_step(
    S: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence (kda.md §1) for any leading dims ``...`` (heads, sequences and heads, ...).

    S ``[..., K, V]``; q (already scaled), k, g ``[..., K]``; v ``[..., V]``; beta ``[...]``, all in one dtype.
    Returns the new state ``[..., K, V]`` and the output ``[..., V]``.
    """
    S = S * g.exp()[..., None]
    residual = v - torch.einsum("...kv,...k->...v", S, k)
    S = S + beta[..., None, None] * k[..., None] * residual[..., None, :]
    return S, torch.einsum("...kv,...k->...v", S, q)


def naive_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_host: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as :func:`kimi_linear.ops.kda.chunk_kda`.

    Per token: ``S = diag(exp(g_t)) S; S += beta_t k_t (v_t - S^T k_t)^T; o_t = S^T (scale q_t)``.
    Shapes: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; g ``[B, T, H, K]`` (log-decay); beta ``[B, T, H]``;
    states ``[N, H, K, V]`` with N = B, or the number of sequences when ``cu_seqlens`` packs them (B = 1), whose
    offsets come from ``cu_seqlens_host`` (Python ints) when given, else are read from ``cu_seqlens``.
    """
    n_seq = check_kda_inputs(q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_host)
    bounds = host_offsets(cu_seqlens, cu_seqlens_host)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_dtype = v.dtype
    q, k, v, g, beta = (x.to(acc) for x in (q, k, v, g, beta))
    if bounds is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        spans = [(0, bounds[i], bounds[i + 1]) for i in range(n_seq)]
    o = torch.zeros(B, T, H, V, dtype=acc, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(spans):
        if initial_state is None:
            S = torch.zeros(H, K, V, dtype=acc, device=q.device)
        else:
            S = initial_state[n].to(acc)
        for t in range(start, end):
            S, o[b, t] = delta_rule_step(S, q[b, t] * scale, k[b, t], v[b, t], g[b, t], beta[b, t])
        finals.append(S)
    final = torch.stack(finals).to(torch.float32 if acc == torch.float32 else acc) if output_final_state else None
    return o.to(out_dtype), final
