"""Muon for hidden matrices and AdamW for everything else, in one optimizer (the Moonlight recipe).

Muon (per matrix W of shape [A, B], gradient G):
    M <- mu * M + G;   U = G + mu * M (Nesterov);   O = NewtonSchulz5(U)
    W <- W - lr * (0.2 * sqrt(max(A, B)) * O + wd * W)
The 0.2 * sqrt(max(A, B)) factor gives the update the RMS of an AdamW update, so both halves share one learning
rate and weight decay. Stacked expert weights [E, A, B] are E separate matrices: Newton-Schulz runs batched over
the leading dimension and each expert is scaled by its own [A, B].

Distributed (FSDP2): parameters and gradients are DTensors sharded on dim 0. Newton-Schulz must see the FULL
matrix (running it on a row shard is a different optimizer), so each rank updates its momentum shard, all-gathers
the full update, orthogonalises it and keeps its own rows (Moonlight's ZeRO-1 scheme). When every matrix lies
whole in the local shard — expert stacks sharded on the expert dimension — no gather is needed.

AdamW (betas (0.9, 0.95), eps 1e-8, bias-corrected) is elementwise, so it works on local shards unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise each matrix of ``g`` [..., A, B] (quintic Newton-Schulz iteration).

    Runs in bf16 on GPU (as Moonlight does) and fp32 on CPU, where bf16 matmuls are slow; returns ``g``'s dtype.
    """
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * (s @ s)) @ x
    if tall:
        x = x.mT
    return x.to(g.dtype)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _shards_whole_matrices(p: DTensor) -> bool:
    """True when each local shard holds complete [A, B] matrices (sharded only on leading batch dimensions)."""
    return all(not isinstance(pl, Shard) or pl.dim < p.ndim - 2 for pl in p.placements)


def orthogonalized_update(p: Tensor, u: Tensor, steps: int) -> Tensor:
    """Newton-Schulz of the update ``u`` (local shard of ``p``'s shape), on the full matrix; returns the local part."""
    if not isinstance(p, DTensor) or p.device_mesh.size() == 1 or _shards_whole_matrices(p):
        return newton_schulz(u, steps)
    full = DTensor.from_local(u, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
    ortho = newton_schulz(full, steps)
    return distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None).to_local()


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer, two rules: groups with ``use_muon=True`` get Muon, the others AdamW.

    Group options: ``lr``, ``weight_decay``; Muon: ``momentum`` (0.95), ``nesterov`` (True), ``ns_steps`` (5);
    AdamW: ``betas`` ((0.9, 0.95)), ``eps`` (1e-8). Muon parameters must have ndim >= 2 (matrices or stacks).
    """

    def __init__(self, param_groups: Iterable[dict], lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, use_muon=False, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, betas=betas, eps=eps)
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            if group["use_muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon parameters must be matrices or stacks of matrices (ndim >= 2)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["use_muon"]:
                    self._muon(p, group)
                else:
                    self._adamw(p, group)
        return loss

    def _muon(self, p: Tensor, group: dict) -> None:
        g, w = _local(p.grad), _local(p)
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(g)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(g)
        u = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        ortho = orthogonalized_update(p, u, group["ns_steps"])
        scale = 0.2 * math.sqrt(max(p.shape[-2], p.shape[-1]))
        w.mul_(1 - group["lr"] * group["weight_decay"]).add_(ortho, alpha=-group["lr"] * scale)

    def _adamw(self, p: Tensor, group: dict) -> None:
        g, w = _local(p.grad), _local(p)
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(g)
            state["exp_avg_sq"] = torch.zeros_like(g)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        state["exp_avg"].lerp_(g, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias1 = 1 - beta1 ** state["step"]
        bias2 = 1 - beta2 ** state["step"]
        denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
        w.mul_(1 - group["lr"] * group["weight_decay"]).addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias1)


# Parameters that are never hidden matrices, whatever their shape (matched against the parameter name).
ADAMW_NAME_PARTS = ("embed_tokens", "lm_head", "conv1d", "A_log", "dt_bias")


def is_hidden_matrix(name: str, p: Tensor) -> bool:
    """Muon's domain: 2-D weights and 3-D expert stacks, except embeddings, lm_head, conv kernels and KDA gates."""
    return p.ndim in (2, 3) and not any(part in name for part in ADAMW_NAME_PARTS)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> MuonAdamW:
    """Muon for hidden matrices; AdamW with weight decay for embeddings / lm_head, without it for 1-D gains,
    biases and the KDA gate parameters (decaying a norm gain or ``A_log`` towards 0 changes the function, not
    just the scale)."""
    muon, adam_decay, adam_plain = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_hidden_matrix(name, p):
            muon.append(p)
        elif p.ndim >= 2 and not any(part in name for part in ("A_log", "conv1d")):
            adam_decay.append(p)
        else:
            adam_plain.append(p)
    groups = [
        dict(params=muon, use_muon=True),
        dict(params=adam_decay, use_muon=False),
        dict(params=adam_plain, use_muon=False, weight_decay=0.0),
    ]
    return MuonAdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)
