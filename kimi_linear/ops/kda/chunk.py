"""Chunkwise KDA in PyTorch (kda.md §2): the CPU path and the readable statement of the chunk algorithm.

Per chunk of C = 64 tokens (per head), with G the in-chunk cumulative sum of g and Γ = exp(G):

- ``L_ij = β_i Σ_d k_id k_jd exp(G_id − G_jd)`` for j < i;  ``M = (I + L)^-1``;
- ``W = M (β ⊙ Γ ⊙ K)``,  ``U = M (β ⊙ V)``;
- ``Aqk_ij = scale Σ_d q_id k_jd exp(G_id − G_jd)`` for j <= i;
- across chunks: ``V' = U − W S``;  ``O = scale (Q ⊙ Γ) S + Aqk V'``;
  ``S ← Diag(Γ_last) S + (K ⊙ exp(G_last − G))^T V'``.

Everything is built from differentiable torch ops, so autograd gives the backward pass. Math runs in fp32, or in
fp64 when q is fp64. Every exponential has a non-positive argument (see :func:`_decayed_scores`), so nothing can
overflow whatever the gate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kimi_linear.ops.kda.gate import KDAOptions
from kimi_linear.ops.kda.validate import check_kda_inputs, host_offsets

CHUNK = 64
SUB_CHUNK = 16


def _decayed_scores(a: torch.Tensor, k: torch.Tensor, G: torch.Tensor, *, strict: bool) -> torch.Tensor:
    """``out_ij = Σ_d a_id k_jd exp(G_id − G_jd)`` on the causal part of each chunk (j < i, or j <= i).

    a, k, G ``[..., C, K]`` with G non-increasing along C (a cumulative log-decay). Returns ``[..., C, C]``.

    ``exp(G_i − G_j)`` cannot be split as ``exp(G_i)·exp(−G_j)`` over a whole chunk: ``exp(−G_j)`` overflows.
    Sub-chunks of 16 rows fix that: a block of rows I against an earlier block of columns J uses the anchor
    ``G_a`` = G at I's first row, ``exp(G_i − G_a) · exp(G_a − G_j)``, both factors <= 1 because
    j < a <= i. The anchor is a row of the block itself, never a later token, so no future gate reaches an
    earlier output. Diagonal blocks use the exact pairwise differences, masked before the exponential.
    """
    *lead, C, K = a.shape
    n_sub = C // SUB_CHUNK
    a, k, G = (x.reshape(*lead, n_sub, SUB_CHUNK, K) for x in (a, k, G))
    anchor = G[..., :1, :]  # [..., I, 1, K]
    a_hat = a * (G - anchor).exp()  # [..., I, S, K]
    # exp(G_a(I) − G_j(J)) for every block pair; only I > J is used, the rest is zeroed before exp.
    block_lower = torch.ones(n_sub, n_sub, dtype=torch.bool, device=a.device).tril(-1)
    cross = anchor.unsqueeze(-3) - G.unsqueeze(-4)  # [..., I, J, S, K]
    cross = torch.where(block_lower[:, :, None, None], cross, torch.zeros((), dtype=G.dtype, device=G.device))
    k_hat = k.unsqueeze(-4) * cross.exp() * block_lower[:, :, None, None]
    off = torch.einsum("...isd,...ijtd->...ijst", a_hat, k_hat)  # [..., I, J, S, S]

    row_mask = torch.ones(SUB_CHUNK, SUB_CHUNK, dtype=torch.bool, device=a.device).tril(-1 if strict else 0)
    pair = G.unsqueeze(-2) - G.unsqueeze(-3)  # [..., I, S(i), S(j), K]: G_i − G_j
    pair = torch.where(row_mask[:, :, None], pair, torch.zeros((), dtype=G.dtype, device=G.device))
    diag = torch.einsum("...isd,...itd,...istd->...ist", a, k, pair.exp()) * row_mask
    block_eye = torch.eye(n_sub, dtype=a.dtype, device=a.device)[:, :, None, None]
    off = off + diag.unsqueeze(-3) * block_eye
    return off.transpose(-3, -2).reshape(*lead, C, C)


def _chunk_kda_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk algorithm on equal-length sequences, all in the accumulation dtype.

    q, k, g ``[B, T, H, K]``; v ``[B, T, H, V]``; beta ``[B, T, H]``; state ``[B, H, K, V]``.
    Returns o ``[B, T, H, V]``, the final state ``[B, H, K, V]`` and the states at chunk starts
    ``[B, NC, H, K, V]`` (NC = ceil(T / 64)).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    n_chunks = -(-T // CHUNK)
    pad = n_chunks * CHUNK - T
    # Padded tail tokens have k = v = beta = 0 and g = 0 (decay 1): they neither write nor decay the state.
    q, k, v, g = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
    beta = F.pad(beta, (0, 0, 0, pad))

    def chunked(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, D] -> [B, H, NC, C, D]
        return x.reshape(B, n_chunks, CHUNK, H, -1).permute(0, 3, 1, 2, 4)

    q, k, v, g = (chunked(x) for x in (q, k, v, g))
    beta = chunked(beta.unsqueeze(-1))
    G = g.cumsum(-2)
    eye = torch.eye(CHUNK, dtype=q.dtype, device=q.device)
    L = beta * _decayed_scores(k, k, G, strict=True)
    W = torch.linalg.solve_triangular(eye + L, beta * G.exp() * k, upper=False, unitriangular=True)
    U = torch.linalg.solve_triangular(eye + L, beta * v, upper=False, unitriangular=True)
    Aqk = scale * _decayed_scores(q, k, G, strict=False)
    q_decayed = scale * q * G.exp()
    G_last = G[..., -1:, :]
    k_to_end = k * (G_last - G).exp()

    outputs, chunk_states = [], []
    for c in range(n_chunks):
        chunk_states.append(state)
        v_new = U[:, :, c] - W[:, :, c] @ state
        outputs.append(q_decayed[:, :, c] @ state + Aqk[:, :, c] @ v_new)
        state = G_last[:, :, c].exp().transpose(-1, -2) * state + k_to_end[:, :, c].transpose(-1, -2) @ v_new
    o = torch.stack(outputs, dim=2).reshape(B, H, n_chunks * CHUNK, V)[:, :, :T].transpose(1, 2)
    return o, state, torch.stack(chunk_states, dim=1)


def chunk_kda(
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
    options: KDAOptions | None = None,
    output_chunk_states: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Chunkwise KDA; the contract of :mod:`kimi_linear.ops.kda` (shapes and options there).

    Returns ``(o, final_state)``; with ``output_chunk_states`` also the states at the start of every 64-token
    chunk of every sequence, ``[sum_n ceil(T_n / 64), H, K, V]`` fp32 in sequence order (for equal-length
    batches, ``.view(B, ceil(T / 64), H, K, V)``); the state after the first 64·j tokens of a sequence is the
    entry of its chunk j, and the state after all of them is ``final_state``.

    Packed sequences are run one by one, sliced at their offsets; with ``cu_seqlens_host`` those come from the host
    copy and no value is read from the device.
    """
    n_seq = check_kda_inputs(q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_host)
    bounds = host_offsets(cu_seqlens, cu_seqlens_host)
    q, k, g, beta = (options or KDAOptions()).prepare(q, k, g, beta)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_dtype = v.dtype
    q, k, v, g, beta = (x.to(acc) for x in (q, k, v, g, beta))
    if initial_state is None:
        initial_state = torch.zeros(n_seq, H, K, V, dtype=acc, device=q.device)
    initial_state = initial_state.to(acc)

    if bounds is None:
        o, final, chunk_states = _chunk_kda_dense(q, k, v, g, beta, scale, initial_state)
        chunk_states = chunk_states.flatten(0, 1)
    else:
        pieces, finals, states = [], [], []
        for n in range(n_seq):
            sl = slice(bounds[n], bounds[n + 1])
            if bounds[n + 1] == bounds[n]:  # an empty sequence keeps its state and owns no chunk
                finals.append(initial_state[n : n + 1])
                continue
            o_n, final_n, states_n = _chunk_kda_dense(
                q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], scale, initial_state[n : n + 1]
            )
            pieces.append(o_n)
            finals.append(final_n)
            states.append(states_n.flatten(0, 1))
        o = torch.cat(pieces, dim=1) if pieces else q.new_zeros(1, 0, H, V)
        final = torch.cat(finals)
        chunk_states = torch.cat(states) if states else q.new_zeros(0, H, K, V)

    state_dtype = torch.float32 if acc == torch.float32 else acc
    result = (o.to(out_dtype), final.to(state_dtype) if output_final_state else None)
    if output_chunk_states:
        result += (chunk_states.to(state_dtype),)
    return result
