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
"""

from kimi_linear.ops.kda.chunk import chunk_kda
from kimi_linear.ops.kda.naive import naive_recurrent_kda
from kimi_linear.ops.kda.recurrent import fused_recurrent_kda

__all__ = ["chunk_kda", "fused_recurrent_kda", "naive_recurrent_kda"]
