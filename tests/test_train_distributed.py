"""Two gloo processes on the CPU: distributed Muon, expert-parallel MoE, and FSDP2 + EP training all agree with
single-process runs. One spawn serves every test (process start-up dominates the cost)."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train_loop import config, train_losses, write_corpus
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from kimi_linear import KimiLinearForCausalLM
from kimi_linear.layers.moe import Experts
from kimi_linear.train.distributed import ExpertParallelExperts
from kimi_linear.train.muon import MuonAdamW
from kimi_linear.train.trainer import Trainer

WORLD = 2


class Toy(nn.Module):
    """A matrix with rows that do not split evenly over 2 ranks, an expert stack, and a vector."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(7, 6))
        self.experts = nn.Parameter(torch.randn(4, 5, 6))
        self.b = nn.Parameter(torch.randn(7))

    def forward(self, x):
        return ((x @ self.w.T + self.b).tanh().sum() + (self.experts @ x.T).sin().sum())


def muon_run(distributed: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Toy()
    if distributed:
        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    opt = MuonAdamW([dict(params=[model.w, model.experts], use_muon=True), dict(params=[model.b])], lr=0.05)
    for step in range(3):
        model(torch.randn(3, 6, generator=torch.Generator().manual_seed(step))).backward()
        opt.step()
        opt.zero_grad()
    return {n: (p.full_tensor() if distributed else p).detach().clone() for n, p in model.named_parameters()}


def expert_parallel_check(rank: int) -> dict[str, float]:
    torch.manual_seed(0)
    experts = Experts(num_experts=4, hidden_size=8, intermediate_size=6, init_std=0.5)
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(9, 8, generator=gen, requires_grad=True)
    indices = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(9)])
    weights = torch.rand(9, 2, generator=gen)
    ref = experts(x, indices, weights)
    ref.square().sum().backward()
    ref_x_grad, x.grad = x.grad, None
    parallel = ExpertParallelExperts(experts)
    out = parallel(x, indices, weights)
    out.square().sum().backward()
    full_grad = experts.gate_up_proj.grad.clone()
    dist.all_reduce(full_grad)
    block = full_grad[rank * 2:(rank + 1) * 2] / WORLD
    return {"out": float((out - ref).abs().max()), "x_grad": float((x.grad - ref_x_grad).abs().max()),
            "w_grad": float((parallel.gate_up_proj.grad - block).abs().max())}


def worker(rank: int, port: int, tmp: str, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        muon = muon_run(distributed=True)
        ep = expert_parallel_check(rank)
        Trainer(config(Path(tmp), Path(tmp) / "corpus", name="dist", expert_parallel=True)).train()
        Trainer(config(Path(tmp), Path(tmp) / "corpus", name="dist-attnres", expert_parallel=True,
                       attn_res_block_size=3)).train()
        if rank == 0:
            results.update(muon=muon, ep=ep)
        else:
            results.update(ep1=ep)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    write_corpus(tmp / "corpus")
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = free_port()
        procs = [ctx.Process(target=worker, args=(r, port, str(tmp), results)) for r in range(WORLD)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=240)
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
        assert not alive, "distributed workers timed out"
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        return tmp, dict(results)


def test_distributed_muon_equals_single_process(distributed_results):
    _, results = distributed_results
    single = muon_run(distributed=False)
    for name, value in single.items():
        torch.testing.assert_close(results["muon"][name], value, rtol=1e-5, atol=1e-6)


def test_expert_parallel_matches_local_experts(distributed_results):
    _, results = distributed_results
    for key in ("ep", "ep1"):
        assert max(results[key].values()) < 1e-4, results[key]  # fp32 summation order only


@pytest.mark.parametrize("run, attn_res", [("dist", None), ("dist-attnres", 3)])
def test_fsdp2_expert_parallel_training_matches_single_process(distributed_results, tmp_path, run, attn_res):
    """Also with Block AttnRes, whose residual stream the layers hand on through FSDP2's hooks."""
    tmp, _ = distributed_results
    single = config(tmp_path, tmp / "corpus", name="single", attn_res_block_size=attn_res)
    Trainer(single).train()
    dist_losses, single_losses = train_losses(tmp / "runs" / run), train_losses(single.run_dir)
    assert len(dist_losses) == len(single_losses) == 6
    torch.testing.assert_close(torch.tensor(dist_losses), torch.tensor(single_losses), rtol=2e-3, atol=0)
    a = KimiLinearForCausalLM.from_pretrained(tmp / "runs" / run).state_dict()
    b = KimiLinearForCausalLM.from_pretrained(single.run_dir).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=2e-3, msg=name)
