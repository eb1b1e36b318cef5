"""The element-wise pieces that KDA kernels may fuse: gate activation, q/k L2 norm, beta sigmoid.

:class:`KDAOptions` says which of them an op applies to its raw inputs. The PyTorch paths run
:meth:`KDAOptions.prepare` before the core recurrence; fused kernels compute the same functions in-kernel and are
tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


# eq=False: the fields hold tensors, whose == is element-wise; options compare (and hash) by identity.
@dataclass(frozen=True, eq=False)
class KDAOptions:
    """What the op computes from raw inputs before the recurrence (kda.md §1): the gate activation, the q/k L2 norm
    and the beta sigmoid, each run inside the fused kernels. The default applies none of them: g is the log-decay
    (<= 0), q and k are used as given, beta is post-sigmoid.

    - ``A_log`` ``[H]`` (any shape with H elements) with ``dt_bias`` ``[H*K]``, fp32: g is the raw gate f, and the
      op computes ``g = -exp(A_log[h]) * softplus(f + dt_bias)``; with ``lower_bound`` (< 0) the bounded variant
      ``g = lower_bound * sigmoid(exp(A_log[h]) * (f + dt_bias))``, which only exists with A_log.
    - ``qk_l2norm``: q and k are L2-normalised per head, ``x / sqrt(sum x^2 + 1e-6)`` in fp32.
    - ``beta_sigmoid``: beta is the raw logit; the op takes its sigmoid (fp32).

    Gradients flow to A_log and dt_bias when they require them (the chunk ops; the decode step is forward only).
    """

    A_log: torch.Tensor | None = None
    dt_bias: torch.Tensor | None = None
    lower_bound: float | None = None
    qk_l2norm: bool = False
    beta_sigmoid: bool = False

    def check(self, H: int, K: int) -> None:
        """Raise ``ValueError`` unless the gate's parameters fit H heads of K channels: A_log (H elements) and
        dt_bias (H * K) come together, and lower_bound only with them."""
        if self.A_log is None:
            if self.dt_bias is not None:
                raise ValueError("dt_bias was given without A_log: the in-kernel gate needs both")
            if self.lower_bound is not None:
                raise ValueError("lower_bound applies to the in-kernel gate only: pass A_log and dt_bias too")
            return
        if self.dt_bias is None:
            raise ValueError("A_log was given without dt_bias: the in-kernel gate needs both")
        if self.A_log.numel() != H or self.dt_bias.numel() != H * K:
            raise ValueError(f"A_log must have H = {H} elements and dt_bias H * K = {H * K}, got "
                             f"{self.A_log.numel()} and {self.dt_bias.numel()}")

    def prepare(
        self, q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pre-processing in PyTorch (differentiable). q, k, g ``[..., H, K]``; beta ``[..., H]``. Returns
        (q, k, g, beta) ready for the recurrence: q, k in their dtype; g fp32 when computed from the gate; beta fp32
        when computed from the logit; inputs an option does not touch are returned as they are."""
        self.check(*g.shape[-2:])
        if self.A_log is not None:
            g = kda_gate(g, self.A_log, self.dt_bias, self.lower_bound)
        if self.qk_l2norm:
            q, k = l2norm(q).to(q.dtype), l2norm(k).to(k.dtype)
        if self.beta_sigmoid:
            beta = torch.sigmoid(beta.float())
        return q, k, g, beta
