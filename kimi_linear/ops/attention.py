"""Causal softmax attention over variable-length sequences, without dense masks (MLA's prefill and training).

Sequence n has ``q_lens[n]`` queries, the last ones of its ``k_lens[n]`` keys (``k_lens >= q_lens``: the keys before
them are cached context); query i sees keys ``j <= k_len - q_len + i`` (causal, aligned to the bottom right).

- Every sequence the same length and no context (a plain training batch): one batched SDPA call with
  ``is_causal`` (a flash kernel on GPU).
- CUDA with PyTorch's varlen flash attention (``torch.nn.attention.varlen``): one call over the packed tokens.
  Flash kernels want one head size for q, k and v; MLA's values (128) are narrower than its keys (192), so values are
  zero-padded to the key size and the padding is dropped from the output.
- Otherwise (the CPU): one SDPA call per sequence, slicing by the host lengths (no device value is read).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F

try:  # PyTorch >= 2.9
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older PyTorch
    varlen_attn = None
# PyTorch 2.9 spelled causality ``is_causal=True``; later versions ``window_size=(-1, 0)``.
_CAUSAL = ({"window_size": (-1, 0)}
           if varlen_attn is not None and "window_size" in inspect.signature(varlen_attn).parameters
           else {"is_causal": True})


def varlen_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    q_lens: Sequence[int],
    k_lens: Sequence[int],
    scale: float,
) -> torch.Tensor:
    """q ``[Tq, H, D]``, k ``[Tk, H, D]``, v ``[Tk, H, Dv]`` packed by sequence (offsets ``cu_q``, ``cu_k`` int32
    ``[N + 1]`` on the device; the same lengths as host ints in ``q_lens``, ``k_lens``). Returns ``[Tq, H, Dv]``."""
    N = len(q_lens)
    H = q.shape[1]
    uniform = len(set(q_lens)) == 1 and tuple(q_lens) == tuple(k_lens)
    if uniform and N:
        L = q_lens[0]
        qb, kb, vb = (x.view(N, L, H, -1).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale)
        return o.transpose(1, 2).reshape(N * L, H, -1)
    if q.is_cuda and varlen_attn is not None and q.dtype in (torch.bfloat16, torch.float16):
        D, Dv = q.shape[-1], v.shape[-1]
        v_pad = F.pad(v, (0, D - Dv)) if Dv < D else v
        o = varlen_attn(q, k, v_pad, cu_q, cu_k, max(q_lens, default=0), max(k_lens, default=0), scale=scale,
                        **_CAUSAL)
        return o[..., :Dv]
    out = []
    q_at = k_at = 0
    for nq, nk in zip(q_lens, k_lens):
        if nq == 0:
            k_at += nk
            continue
        qs = q[q_at:q_at + nq].transpose(0, 1)
        ks, vs = (x[k_at:k_at + nk].transpose(0, 1) for x in (k, v))
        if nq == nk:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        else:
            # the last nq of nk positions: query i sees keys up to nk - nq + i
            mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        out.append(o.transpose(0, 1))
        q_at, k_at = q_at + nq, k_at + nk
    return torch.cat(out) if out else q.new_zeros(0, H, v.shape[-1])
