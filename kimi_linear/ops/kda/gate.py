"""The element-wise pieces that KDA kernels may fuse: gate activation, q/k L2 norm, beta sigmoid.

The PyTorch paths call :func:`prepare_kda_inputs` before the core recurrence; fused kernels compute the same
functions in-kernel and are tested against these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_linear.ops.kda.validate import check_gate_options


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim, in fp32 (the convention of the released model)."""
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def kda_gate(
    f: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, lower_bound: float | None = None
) -> torch.Tensor:
    """Log-decay from the raw gate. f ``[..., H, K]``; A_log ``[H]`` (any shape with H elements); dt_bias ``[H*K]``.

    Released form: ``-exp(A_log) * softplus(f + dt_bias)``; bounded form (``lower_bound`` < 0):
    ``lower_bound * sigmoid(exp(A_log) * (f + dt_bias))``, which keeps every step's decay >= exp(lower_bound).
    Returns fp32 ``[..., H, K]``.
    """
    H, K = f.shape[-2:]
    x = f.float() + dt_bias.float().view(H, K)
    a = A_log.float().reshape(H, 1).exp()
    if lower_bound is None:
        return -a * F.softplus(x)
    return lower_bound * torch.sigmoid(a * x)


def prepare_kda_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    lower_bound: float | None,
    use_qk_l2norm_in_kernel: bool,
    use_beta_sigmoid_in_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply the optional fused pre-processing of the ``chunk_kda`` contract in PyTorch."""
    check_gate_options(A_log, dt_bias, lower_bound, *g.shape[-2:])
    if A_log is not None:
        g = kda_gate(g, A_log, dt_bias, lower_bound)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q).to(q.dtype), l2norm(k).to(k.dtype)
    if use_beta_sigmoid_in_kernel:
        beta = torch.sigmoid(beta.float())
    return q, k, g, beta
