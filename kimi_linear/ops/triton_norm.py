"""RMSNorm and the sigmoid-gated RMSNorm as single Triton kernels.

Same contracts and rounding as :mod:`kimi_linear.ops.norm`: the PyTorch versions launch six to nine element-wise
kernels, each a pass over the tensor; this is one pass (read x, the gate and the weight once, write the output
once) and one launch, which is what matters in a decode step where every tensor is tiny.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x, gate, weight, out, M, eps,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, HAS_GATE: tl.constexpr,
):
    """Rows [pid * BM, pid * BM + BM) of x ``[M, D]`` (contiguous), normalised in fp32."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    mask = (rows[:, None] < M) & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    xf = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(weight + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = xf * tl.rsqrt(tl.sum(xf * xf, 1) / D + eps)[:, None]
    if HAS_GATE:
        y = y * w[None, :] * tl.sigmoid(tl.load(gate + offs, mask=mask, other=0.0).to(tl.float32))
    else:
        # The plain norm rounds to x's dtype before the weight multiply, as the PyTorch version does.
        y = y.to(x.dtype.element_ty).to(tl.float32) * w[None, :]
    tl.store(out + offs, y.to(out.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, eps: float,
            out_dtype: torch.dtype) -> torch.Tensor:
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"weight must be [D] = [{D}], got {tuple(weight.shape)}")
    x2 = x.reshape(-1, D).contiguous()
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    M = x2.shape[0]
    if M == 0:
        return out
    BD = triton.next_power_of_2(D)
    # About 4K elements per program: whole rows, several rows when D is small (KDA's per-head D = 128).
    BM = max(1, min(4096 // BD, triton.next_power_of_2(M)))
    g2 = None if gate is None else gate.reshape(-1, D).contiguous()
    _rms_norm_kernel[(triton.cdiv(M, BM),)](
        x2, g2, weight.contiguous(), out, M, eps, D=D, BD=BD, BM=BM, HAS_GATE=gate is not None,
        num_warps=4 if BD * BM >= 2048 else 2,
    )
    return out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Contract of :func:`kimi_linear.ops.norm.rms_norm`: x ``[..., D]``, weight ``[D]``; returns
    ``weight * normalised(x).to(x.dtype)`` in ``promote_types(x.dtype, weight.dtype)``."""
    return _launch(x, None, weight, eps, torch.promote_types(x.dtype, weight.dtype))


def gated_rms_norm_triton(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Contract of :func:`kimi_linear.ops.norm.gated_rms_norm`: x, gate ``[..., D]``, weight ``[D]``; returns
    ``normalised(x) * weight * sigmoid(gate)`` computed in fp32, in x's dtype."""
    if gate.shape != x.shape:
        raise ValueError(f"gate must have x's shape {tuple(x.shape)}, got {tuple(gate.shape)}")
    return _launch(x, gate, weight, eps, x.dtype)
