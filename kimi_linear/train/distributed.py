"""Data parallelism with FSDP2 and expert parallelism for the MoE layers.

Layout: one process per device, one process group of W ranks (``torchrun``). Every rank sees different rows of
the batch. FSDP2 (``fully_shard``) shards all dense parameters on dim 0 across the W ranks, per decoder layer,
gathering them for compute and reduce-scattering (averaging) the gradients.

Precision: on GPU, FSDP2's mixed-precision policy computes in bf16 from bf16 copies of the fp32 master weights
and reduces gradients in fp32; it is used even on one GPU (a one-rank group), because it is both the faster
recipe and the one every layer supports (the fused expert matmul needs weights and activations of one dtype,
which autocast does not give it). On CPU everything stays fp32.

Expert parallelism (optional) splits each MoE layer's E experts into W contiguous blocks of E / W; rank r keeps
block r as ordinary (non-FSDP) parameters. Token copies travel to the rank of their expert and back with two
differentiable all-to-alls. An expert's gradient then sums the contributions of every rank's tokens, while the
loss is a per-rank mean; a gradient hook divides by W so that it equals the data-parallel average FSDP applies
to every other parameter. Parameters held this way carry ``expert_parallel = True``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from kimi_linear.ops.moe import moe_experts


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistEnv:
    """Read torchrun's environment; start the process group (NCCL on GPU, gloo on CPU) when W > 1.

    ``device``: "auto" (CUDA when available), "cpu" or "cuda"."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if world > 1:
            dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
        elif use_cuda:  # a one-rank group, for FSDP2's mixed precision
            dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    return DistEnv(rank, world, local_rank, dev)


def uses_fsdp(env: DistEnv) -> bool:
    return env.world > 1 or env.device.type == "cuda"


class ExpertParallelExperts(nn.Module):
    """This rank's block of one MoE layer's experts; same forward contract as the model's ``Experts``:
    ``forward(x [N, D], indices [N, k], weights [N, k]) -> [N, D]`` over *global* expert indices."""

    def __init__(self, experts: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.group = group
        self.world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        num_experts = experts.gate_up_proj.shape[0]
        if num_experts % self.world:
            raise ValueError(f"expert parallel needs num_experts ({num_experts}) divisible by the world size "
                             f"({self.world})")
        self.num_local = num_experts // self.world
        block = slice(rank * self.num_local, (rank + 1) * self.num_local)
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[block].clone())
        self.down_proj = nn.Parameter(experts.down_proj.detach()[block].clone())
        for p in (self.gate_up_proj, self.down_proj):
            p.expert_parallel = True
            p.register_hook(lambda g: g / self.world)

    def _exchange(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        """Differentiable all-to-all of rows (the backward pass sends the gradients the opposite way)."""
        group = self.group if self.group is not None else dist.group.WORLD
        return all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        N, k = indices.shape
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)  # token copies sorted by expert, hence by destination rank
        token = order // k
        expert = flat[order]
        send = torch.bincount(expert // self.num_local, minlength=self.world)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_splits, recv_splits = send.tolist(), recv.tolist()
        local_expert = torch.empty(sum(recv_splits), dtype=expert.dtype, device=expert.device)
        dist.all_to_all_single(local_expert, expert % self.num_local, recv_splits, send_splits, group=self.group)
        arrived = self._exchange(x[token], recv_splits, send_splits)
        ones = torch.ones(arrived.shape[0], 1, dtype=torch.float32, device=x.device)
        # FSDP's mixed precision does not reach these (non-FSDP) weights: compute in the activations' dtype.
        gate_up, down = self.gate_up_proj.to(x.dtype), self.down_proj.to(x.dtype)
        y = moe_experts(arrived, gate_up, down, local_expert[:, None], ones)
        back = self._exchange(y, send_splits, recv_splits)
        back = back * weights.reshape(-1)[order, None].to(back.dtype)
        return torch.zeros_like(x).index_add_(0, token, back.to(x.dtype))


def apply_expert_parallel(model: nn.Module) -> None:
    """Replace every MoE layer's experts with this rank's expert-parallel block (over the default group)."""
    for moe in model.moe_layers():
        moe.experts = ExpertParallelExperts(moe.experts)


def apply_fsdp(model: nn.Module, env: DistEnv) -> None:
    """``fully_shard`` each decoder layer (``model.model.layers``), then the root (embeddings, final norm,
    lm_head); expert-parallel parameters are left out (each rank owns different experts). bf16 compute on GPU."""
    mesh = init_device_mesh(env.device.type, (env.world,))
    ignored = {p for p in model.parameters() if getattr(p, "expert_parallel", False)}
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if env.device.type == "cuda" else MixedPrecisionPolicy())
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, ignored_params=ignored, mp_policy=policy)
    fully_shard(model, mesh=mesh, ignored_params=ignored, mp_policy=policy)
    model.model.attn_res_two_phase = False  # two-phase reads gather a block's queries across sharded layers


def is_sharded(p: torch.Tensor) -> bool:
    """Does each rank hold a different part of ``p`` (FSDP shard or expert-parallel block)?"""
    return isinstance(p, DTensor) or getattr(p, "expert_parallel", False)


def local_grad(p: nn.Parameter) -> torch.Tensor:
    return p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm (over all ranks' shards) to ``max_norm``; returns the norm before clipping.

    Sharded gradients add their squared norms over ranks; replicated ones count once."""
    params = [p for p in params if p.grad is not None]
    zero = torch.zeros((), device=local_grad(params[0]).device)
    sq_sharded = sum((local_grad(p).float().pow(2).sum() for p in params if is_sharded(p)), zero)
    sq_replicated = sum((local_grad(p).float().pow(2).sum() for p in params if not is_sharded(p)), zero)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq_sharded)
    norm = (sq_sharded + sq_replicated).sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            local_grad(p).mul_(scale)
    return norm
