"""What rank 0 of a tensor-parallel group tells the other ranks, each message one flat int64 tensor.

Rank 0 runs the scheduler; the other ranks only need, per step, what makes the same
:class:`~kimi_linear.step.StepMetadata` and the same writes to their pools, so that every rank's pools hold the same
sequences in the same slots and blocks:

- :class:`PoolSizes` (once): the pools' slots, blocks and block size, which rank 0 chose;
- :class:`Step`: the pool writes made since the last step (prefix-hit slot copies, copy-on-write block copies, NaN
  fills of freed memory), in order, then the step: query and context lengths, decodes, state slots, block tables
  (each row cut to the blocks its sequence uses: the rest is never read), snapshots and token ids;
- shutdown.

Layout of a step, after its kind: ``[num_ops, (op, n, value) x num_ops, N, num_decodes, num_tokens, num_snapshots,
query_lens, context_lens, (seq, length, slot) x num_snapshots]`` then the op indices, state slots, block-table rows
and token ids. Host integers travel as they are; the device tensors of rank 0's metadata are read back in one
copy (:func:`encode_step`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kimi_linear.cache import CachePool
from kimi_linear.step import Snapshot, StepMetadata

POOL, STEP, SHUTDOWN = 1, 2, 3
# CachePool's writes, by op code, with how many index tensors each takes; the fills also take a value.
POOL_WRITES = {"copy_slots": 2, "copy_blocks": 2, "fill_slots": 1, "fill_blocks": 1}
_CODES = {name: code for code, name in enumerate(POOL_WRITES)}


@dataclass(frozen=True)
class PoolSizes:
    num_slots: int
    num_blocks: int
    block_size: int


@dataclass
class PoolWrite:
    """One call of a :class:`~kimi_linear.cache.CachePool` write: ``getattr(pool, name)(*indices[, value])``."""

    name: str
    indices: tuple[torch.Tensor, ...]  # int64 [n] each
    value: float = 0.0

    def apply(self, pool: CachePool) -> None:
        indices = [i.to(pool.device) for i in self.indices]
        args = (*indices, self.value) if self.name.startswith("fill") else indices
        getattr(pool, self.name)(*args)


@dataclass
class Step:
    writes: list[PoolWrite]
    input_ids: torch.Tensor  # [num_tokens] int64, host
    query_lens: list[int]
    context_lens: list[int]
    num_decodes: int
    state_slots: list[int]
    block_tables: list[list[int]]
    snapshots: list[Snapshot]

    def metadata(self, device: torch.device, block_size: int) -> StepMetadata:
        return StepMetadata.build(self.query_lens, self.context_lens, device=device, num_decodes=self.num_decodes,
                                  state_slots=self.state_slots, block_tables=self.block_tables,
                                  block_size=block_size, snapshots=self.snapshots)


def encode_pool(sizes: PoolSizes) -> torch.Tensor:
    return torch.tensor([POOL, sizes.num_slots, sizes.num_blocks, sizes.block_size])


def encode_shutdown() -> torch.Tensor:
    return torch.tensor([SHUTDOWN])


def encode_step(input_ids: torch.Tensor, meta: StepMetadata, writes: list[PoolWrite], block_size: int) -> torch.Tensor:
    """Rank 0's step (its ids ``[num_tokens]`` and metadata over a cache) and the pool writes before it. The device
    tensors — ids, state slots, block table, write indices — come back to the host in one copy: on CUDA one sync,
    at a point where the GPU has nothing queued but those small copies (sampling synchronised after the last step)."""
    N, S = meta.num_seqs, len(meta.snapshots)
    header = [STEP, len(writes)]
    for w in writes:
        header += [_CODES[w.name], w.indices[0].numel(), _float_bits(w.value)]
    header += [N, meta.num_decodes, meta.num_tokens, S, *meta.query_lens, *meta.context_lens]
    for s in meta.snapshots:
        header += [s.seq, s.length, s.slot]
    table = meta.block_table
    device_parts = [i for w in writes for i in w.indices] + [meta.state_slots, table.reshape(-1), input_ids]
    host = torch.cat([t.to(torch.int64) for t in device_parts]).cpu()
    head_len = host.numel() - N - table.numel() - meta.num_tokens
    ops, slots, flat_table, ids = host.split([head_len, N, table.numel(), meta.num_tokens])
    used = torch.tensor(_blocks_used(meta.context_lens, meta.query_lens, block_size))
    rows = flat_table.view(table.shape)[torch.arange(table.shape[1]) < used[:, None]]  # row by row
    return torch.cat([torch.tensor(header), ops, slots, rows, ids])


def decode(message: torch.Tensor, block_size: int | None) -> PoolSizes | Step | None:
    """A message from rank 0 (``block_size``: the pools', known once :class:`PoolSizes` came); None = shut down."""
    kind = int(message[0])
    if kind == SHUTDOWN:
        return None
    if kind == POOL:
        return PoolSizes(*message[1:4].tolist())
    if kind != STEP:
        raise ValueError(f"unknown message kind {kind}")
    at = _Cursor(message, 1)
    num_writes = at.int()
    specs = [at.ints(3) for _ in range(num_writes)]
    N, num_decodes, num_tokens, S = at.ints(4)
    query_lens, context_lens = at.ints(N), at.ints(N)
    snapshots = [Snapshot(*at.ints(3)) for _ in range(S)]
    names = list(POOL_WRITES)
    writes = []
    for code, n, bits in specs:
        name = names[code]
        writes.append(PoolWrite(name, tuple(at.take(n) for _ in range(POOL_WRITES[name])), _float_value(bits)))
    state_slots = at.ints(N)
    used = _blocks_used(context_lens, query_lens, block_size)
    flat = at.take(sum(used)).tolist()
    block_tables = [flat[start - n:start] for start, n in zip(itertools.accumulate(used), used)]
    return Step(writes, at.take(num_tokens), query_lens, context_lens, num_decodes, state_slots, block_tables,
                snapshots)


class _Cursor:
    def __init__(self, message: torch.Tensor, start: int) -> None:
        self.message, self.at = message, start

    def take(self, n: int) -> torch.Tensor:
        out = self.message[self.at:self.at + n]
        self.at += n
        return out

    def ints(self, n: int) -> list[int]:
        return self.take(n).tolist()

    def int(self) -> int:
        return int(self.take(1))


def _blocks_used(context_lens: Sequence[int], query_lens: Sequence[int], block_size: int) -> list[int]:
    """The blocks each sequence's table needs for its context and query tokens (the rest of a row is never read)."""
    return [-(-(c + q) // block_size) for c, q in zip(context_lens, query_lens)]


def _float_bits(value: float) -> int:
    return int(torch.tensor([value], dtype=torch.float64).view(torch.int64))


def _float_value(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int64).view(torch.float64))
