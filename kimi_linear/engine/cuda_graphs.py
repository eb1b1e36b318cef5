"""Decode-only steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step is many tiny kernels; launching them costs more than running them at small batches. A step whose
rows are all one-token decodes has a shape fixed by its row count alone (every host field of its
:class:`~kimi_linear.step.StepMetadata` follows from it), so it can be captured once per bucket (1, 2, 4, 8, 16,
24, 32, ... rows) into static buffers and replayed with new values copied in.

A batch of N rows runs in the smallest bucket B >= N. The B - N padding rows are harmless by construction:
- state slot -1: the KDA decode kernel neither reads nor writes their state and outputs zeros for them; the conv
  writes its scratch to the padding slot 0, which no sequence owns (it starts from zeros: has_initial_state False);
- sequence length 0 and block table rows of block 0: the paged MLA decode reads nothing for them and outputs zeros;
  their latent goes to position 0 of the padding block 0, which no sequence owns;
- token 0: its embedding is finite, so every per-row op downstream stays finite, and no op mixes rows.
Their hidden states are dropped before sampling. The same padded step runs eagerly (``graphs=False``: the CPU
tests), so the padding is tested without a GPU; a GPU test checks replay against eager, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kimi_linear.cache import PAD_BLOCK, CachePool
from kimi_linear.step import StepMetadata

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class DecodeGraphs:
    """Padded decode steps of ``model`` over ``pool`` for up to ``max_batch`` rows whose block tables have at most
    ``max_blocks`` entries. ``graphs``: capture and replay CUDA graphs (else run the padded step eagerly)."""

    def __init__(self, model: torch.nn.Module, pool: CachePool, max_batch: int, max_blocks: int,
                 graphs: bool = True) -> None:
        self.model = model
        self.pool = pool
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_blocks = max_blocks
        self.graphs = graphs and pool.device.type == "cuda"
        self._captured: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._static: dict[int, tuple[torch.Tensor, StepMetadata]] = {}

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _buffers(self, B: int) -> tuple[torch.Tensor, StepMetadata]:
        """The bucket's static inputs: token ids ``[B]`` and a decode-only StepMetadata whose tensors are filled in
        place before each run."""
        if B not in self._static:
            dev = self.pool.device
            meta = StepMetadata(
                query_lens=(1,) * B, context_lens=(1,) * B, num_decodes=B, batch_shape=None, snapshots=(),
                cu_seqlens=torch.arange(B + 1, dtype=torch.int32, device=dev),
                seq_lens=torch.zeros(B, dtype=torch.int32, device=dev),
                state_slots=torch.full((B,), -1, dtype=torch.int64, device=dev),
                has_initial_state=torch.zeros(B, dtype=torch.bool, device=dev),
                block_table=torch.full((B, self.max_blocks), PAD_BLOCK, dtype=torch.int32, device=dev),
                slot_mapping=torch.zeros(B, dtype=torch.int64, device=dev),
            )
            self._static[B] = (torch.zeros(B, dtype=torch.long, device=dev), meta)
        return self._static[B]

    def run(self, ids: Sequence[int], slots: Sequence[int], tables: Sequence[Sequence[int]],
            context_lens: Sequence[int]) -> torch.Tensor:
        """Decode one token for each of N sequences (``context_lens`` tokens each in the cache); returns the
        final hidden states ``[N, D]``."""
        N = len(ids)
        B = self.bucket(N)
        if self.graphs and B not in self._captured:  # before the real rows are copied in: warm-up steps run
            self._capture(B)
        ids_buf, meta = self._buffers(B)
        bs = self.pool.block_size
        table = torch.full((B, self.max_blocks), PAD_BLOCK, dtype=torch.int32)
        for n, row in enumerate(tables):
            table[n, :len(row)] = torch.tensor(list(row), dtype=torch.int32)
        pad = [0] * (B - N)
        host = {
            "ids": torch.tensor(list(ids) + pad, dtype=torch.long),
            "seq_lens": torch.tensor([c + 1 for c in context_lens] + pad, dtype=torch.int32),
            "slots": torch.tensor(list(slots) + [-1] * (B - N), dtype=torch.int64),
            "has_state": torch.tensor([True] * N + [False] * (B - N)),
            "slot_mapping": torch.tensor([tables[n][p // bs] * bs + p % bs for n, p in enumerate(context_lens)]
                                         + pad, dtype=torch.int64),
        }
        ids_buf.copy_(host["ids"], non_blocking=True)
        meta.seq_lens.copy_(host["seq_lens"], non_blocking=True)
        meta.state_slots.copy_(host["slots"], non_blocking=True)
        meta.has_initial_state.copy_(host["has_state"], non_blocking=True)
        meta.slot_mapping.copy_(host["slot_mapping"], non_blocking=True)
        meta.block_table.copy_(table, non_blocking=True)
        if not self.graphs:
            return self.model.forward_step(ids_buf, meta, self.pool)[:N]
        graph, hidden = self._captured[B]
        graph.replay()
        return hidden[:N]

    def _capture(self, B: int) -> None:
        """Record the bucket's step. Its buffers hold only padding rows here, so the warm-up steps run touch nothing
        but the padding slot and block."""
        ids_buf, meta = self._buffers(B)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph: Triton compiles, allocator settles
            for _ in range(2):
                self.model.forward_step(ids_buf, meta, self.pool)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            hidden = self.model.forward_step(ids_buf, meta, self.pool)
        self._captured[B] = (graph, hidden)
