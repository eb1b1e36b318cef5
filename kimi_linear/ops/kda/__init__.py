"""Kimi Delta Attention ops.

Public contract (every implementation — PyTorch reference, PyTorch chunkwise, Triton — follows it):

``chunk_kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
            cu_seqlens_host=None, options=None, output_chunk_states=False) -> (o, final_state[, chunk_states])``

- q, k ``[B, T, H, K]``, v ``[B, T, H, V]`` (bf16/fp16/fp32); o ``[B, T, H, V]`` in v's dtype.
- g ``[B, T, H, K]``: the log-decay (<= 0, fp32), or the raw gate pre-activation ``f`` when the options carry the
  gate's parameters.
- beta ``[B, T, H]``: post-sigmoid, or the raw logit when the options say so.
- ``options``: a :class:`KDAOptions` (None: none of them), what the op computes from raw inputs before the
  recurrence: the gate ``g = -exp(A_log[h]) * softplus(f + dt_bias)`` (A_log ``[H]``, dt_bias ``[H * K]``, fp32),
  or its bounded variant ``g = lower_bound * sigmoid(exp(A_log[h]) * (f + dt_bias))``; the per-head L2 norm of q
  and k (``x / sqrt(sum x^2 + 1e-6)``); the sigmoid of beta.
- states ``[N, H, K, V]`` fp32; N = B, or N = len(cu_seqlens) - 1 for packed batches (B = 1).
- ``cu_seqlens`` ``[N + 1]`` int32/int64 offsets of packed sequences (FlashAttention convention);
  ``cu_seqlens_host``: the same offsets as Python ints (a serving step's metadata has them on the host). When it is
  given no value of ``cu_seqlens`` is read on the host: validation, the PyTorch path's per-sequence slices and the
  Triton path's chunk tables all use the host copy, so the call does not synchronise with the device. Without it,
  the offsets are read back from ``cu_seqlens`` (a synchronisation on CUDA).
- ``output_chunk_states=True`` appends the states at the start of every 64-token chunk,
  ``[sum_n ceil(T_n / 64), H, K, V]`` fp32 (for prefix caching; see :mod:`kimi_linear.ops.kda.chunk`).

``fused_recurrent_kda``: the decode step on a state pool, with the same ``options`` (see
:mod:`kimi_linear.ops.kda.recurrent`).

Backend: CUDA tensors run the Triton kernels (:mod:`kimi_linear.ops.kda.triton_chunk`), anything else the
PyTorch chunkwise path; :func:`kimi_linear.ops.backend.set_backend` (``"torch"``, ``"triton"``, ``"auto"``, also
as :func:`~kimi_linear.ops.backend.use_backend` for a block) or the environment variable ``KIMI_LINEAR_BACKEND``
(read once, at import) overrides that for every op at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kimi_linear.ops.backend import kernel_module, set_backend
from kimi_linear.ops.kda.chunk import chunk_kda as chunk_kda_torch
from kimi_linear.ops.kda.gate import KDAOptions
from kimi_linear.ops.kda.naive import naive_recurrent_kda
from kimi_linear.ops.kda.recurrent import fused_recurrent_kda

__all__ = ["KDAOptions", "chunk_kda", "chunk_kda_torch", "fused_recurrent_kda", "naive_recurrent_kda", "set_backend"]


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
    """Chunkwise KDA (the contract above), on the backend chosen by :func:`set_backend`."""
    kernels = kernel_module(q, "kimi_linear.ops.kda.triton_chunk", q, v)
    impl = kernels.chunk_kda_triton if kernels is not None else chunk_kda_torch
    return impl(q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, cu_seqlens_host=cu_seqlens_host, options=options,
                output_chunk_states=output_chunk_states)
