"""The serving engine over a tensor-parallel group: rank 0 runs the engine, every rank runs each step.

Rank 0 is an ordinary :class:`~kimi_linear.engine.LLMEngine` — scheduler, prefix cache, allocators, sampling, the
server on top — over its shard of the model, with two stand-ins put between the engine and what it drives
(composition: the engine's code is unchanged):

- its pool is a :class:`ReplicatedPool`, which applies every write (slot and block copies, NaN fills) and queues it;
- its model is a :class:`GroupModel`, whose ``forward_step`` first broadcasts the queued writes and the step
  (:mod:`kimi_linear.parallel.protocol`), then runs rank 0's shard. Logits and sampling stay on rank 0.

The other ranks run :func:`run_worker`: replay the writes, build the same :class:`~kimi_linear.step.StepMetadata`,
run their shard; the all-reduces inside the forward join the ranks. Every rank's pools thus hold the same sequences
in the same slots and blocks: 1/W of the KDA heads' states and all the MLA latents. Per step: one broadcast, then
the forward's 2 all-reduces per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from kimi_linear.cache import CachePool
from kimi_linear.engine import EngineConfig, LLMEngine
from kimi_linear.parallel.group import TensorParallelGroup
from kimi_linear.parallel.protocol import (
    PoolSizes,
    PoolWrite,
    decode,
    encode_pool,
    encode_shutdown,
    encode_step,
)
from kimi_linear.step import StepMetadata


class ReplicatedPool:
    """Rank 0's pools: each write is applied here and queued in ``pending`` for the other ranks, which replay the
    writes in order before their next step. Everything else (the pool tensors, sizes) is the pool's own."""

    def __init__(self, pool: CachePool) -> None:
        self.pool = pool
        self.pending: list[PoolWrite] = []

    def __getattr__(self, name: str):
        return getattr(self.pool, name)

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.pool.copy_slots(src, dst)
        self.pending.append(PoolWrite("copy_slots", (src, dst)))

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.pool.copy_blocks(src, dst)
        self.pending.append(PoolWrite("copy_blocks", (src, dst)))

    def fill_slots(self, slots: torch.Tensor, value: float) -> None:
        self.pool.fill_slots(slots, value)
        self.pending.append(PoolWrite("fill_slots", (slots,), value))

    def fill_blocks(self, blocks: torch.Tensor, value: float) -> None:
        self.pool.fill_blocks(blocks, value)
        self.pending.append(PoolWrite("fill_blocks", (blocks,), value))


class GroupModel:
    """What rank 0's engine sees as its model: :meth:`forward_step` runs on every rank of the group."""

    def __init__(self, model: nn.Module, group: TensorParallelGroup, block_size: int) -> None:
        self.module = model
        self.config = model.config
        self.group = group
        self.block_size = block_size

    def forward_step(self, input_ids: torch.Tensor, meta: StepMetadata, cache: ReplicatedPool) -> torch.Tensor:
        self.group.check()
        try:
            self.group.channel.send(encode_step(input_ids, meta, cache.pending, self.block_size))
            cache.pending.clear()
            return self.module.forward_step(input_ids, meta, cache.pool)
        except BaseException as e:  # the ranks may be out of step now: the group is done
            self.group.abort(f"rank 0's step raised {type(e).__name__}: {e}")
            raise

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.module.compute_logits(hidden)


class TensorParallelEngine(LLMEngine):
    """Rank 0's engine over ``model`` (its shard, from :func:`~kimi_linear.parallel.tensor.shard_model` or
    :func:`~kimi_linear.parallel.loading.load_shard`). The pools are sized here (by ``config``, or the
    memory budget against the local config's smaller slots) and the other ranks are told the sizes. When done,
    :func:`stop_workers` ends the other ranks' :func:`run_worker`."""

    def __init__(self, model: nn.Module, group: TensorParallelGroup, config: EngineConfig | None = None, *,
                 decode: Callable[[list[int]], str] | None = None, eos_token_ids: Iterable[int] | None = None) -> None:
        super().__init__(model, config, decode=decode, eos_token_ids=eos_token_ids)
        self.group = group
        group.check()
        group.channel.send(encode_pool(PoolSizes(self.pool.num_slots, self.pool.num_blocks, self.pool.block_size)))
        self.pool = ReplicatedPool(self.pool)
        self.model = GroupModel(model, group, self.pool.block_size)


def stop_workers(group: TensorParallelGroup) -> None:
    """Rank 0: end the other ranks' :func:`run_worker` (nothing to tell when the group failed)."""
    if group.failure is None:
        group.channel.send(encode_shutdown())


@torch.inference_mode()
def run_worker(model: nn.Module, group: TensorParallelGroup) -> CachePool | None:
    """Ranks > 0: build the pools rank 0 sized, then replay its writes and run its steps on ``model`` (this rank's
    shard) until it says stop. Returns the pools (tests compare them with a single process's). An exception leaves
    the loop: the caller must then end the process, whose closing connections fail rank 0's collectives."""
    pool = None
    block_size = None
    weight = model.model.embed_tokens.weight
    while (message := decode(group.channel.recv(), block_size)) is not None:
        if isinstance(message, PoolSizes):
            block_size = message.block_size
            pool = CachePool(model.config, message.num_slots, message.num_blocks, block_size=block_size,
                             device=group.device, dtype=weight.dtype)
            continue
        for write in message.writes:
            write.apply(pool)
        meta = message.metadata(group.device, block_size)
        model.forward_step(message.input_ids.to(group.device), meta, pool)
    return pool
