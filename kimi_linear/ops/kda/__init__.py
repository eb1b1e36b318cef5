"""Kimi Delta Attention ops.

Public contract (every implementation — PyTorch reference, PyTorch chunkwise, Triton — follows it):

``chunk_kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
            A_log=None, dt_bias=None, lower_bound=None, use_qk_l2norm_in_kernel=False,
            use_beta_sigmoid_in_kernel=False) -> (o, final_state)``

- q, k ``[B, T, H, K]``, v ``[B, T, H, V]`` (bf16/fp16/fp32); o ``[B, T, H, V]`` in v's dtype.
- g ``[B, T, H, K]``: the log-decay (<= 0, fp32) — or, when ``A_log`` is given, the raw gate pre-activation
  ``f`` from which the op computes ``g = -exp(A_log[h]) * softplus(f + dt_bias)`` (or, with ``lower_bound``,
  ``g = lower_bound * sigmoid(exp(A_log[h]) * (f + dt_bias))``). A_log ``[H]``, dt_bias ``[H * K]``, fp32.
- beta ``[B, T, H]``: post-sigmoid, or the raw logit with ``use_beta_sigmoid_in_kernel``.
- ``use_qk_l2norm_in_kernel``: q, k are L2-normalised per head inside the op (``x / sqrt(sum x^2 + 1e-6)``).
- states ``[N, H, K, V]`` fp32; N = B, or N = len(cu_seqlens) - 1 for packed batches (B = 1).

``fused_recurrent_kda``: the decode step on a state pool (see :mod:`kimi_linear.ops.kda.recurrent`).

Extra keyword of ``chunk_kda``: ``output_chunk_states=True`` appends the states at the start of every 64-token
chunk, ``[sum_n ceil(T_n / 64), H, K, V]`` fp32 (for prefix caching; see :mod:`kimi_linear.ops.kda.chunk`).

Backend: CUDA tensors run the Triton kernels (:mod:`kimi_linear.ops.kda.triton_chunk`), anything else the
PyTorch chunkwise path; :func:`kimi_linear.ops.backend.set_backend` (``"torch"``, ``"triton"``, ``"auto"``, also
as :func:`~kimi_linear.ops.backend.use_backend` for a block) or the environment variable ``KIMI_LINEAR_BACKEND``
(read once, at import) overrides that for every op at once.
"""

from __future__ import annotations

import torch

from kimi_linear.ops.backend import kernel_module, set_backend
from kimi_linear.ops.kda.chunk import chunk_kda as chunk_kda_torch
from kimi_linear.ops.kda.naive import naive_recurrent_kda
from kimi_linear.ops.kda.recurrent import fused_recurrent_kda

__all__ = ["chunk_kda", "chunk_kda_torch", "fused_recurrent_kda", "naive_recurrent_kda", "set_backend"]


def chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    **kwargs,
) -> tuple[torch.Tensor, ...]:
    """Chunkwise KDA (the contract above), on the backend chosen by :func:`set_backend`."""
    kernels = kernel_module(q, "kimi_linear.ops.kda.triton_chunk", q, v)
    if kernels is not None:
        return kernels.chunk_kda_triton(q, k, v, g, beta, **kwargs)
    return chunk_kda_torch(q, k, v, g, beta, **kwargs)
