"""One model step over many sequences: the tokens laid end to end, and what every layer needs to know about them.

A step is ``num_tokens`` flat tokens belonging to N sequences, in sequence order, the one-token decodes first. Each
sequence brings ``query_lens[n]`` new tokens on top of ``context_lens[n]`` tokens it already has in the cache.
Layers read the step only through this object, and the caches only through the slots, block tables and write
positions it holds, so one forward serves a training batch, a static generation batch and a serving engine's
mixed step of prefill chunks and decodes alike.

Design choices:
- **Host and device fields.** Counts and lengths are Python ints and tuples, so no branch of the forward ever reads
  a device tensor (the forward never synchronises with the host; decode steps can be CUDA graphs). Everything a
  kernel indexes with is a device tensor, built once per step by :meth:`StepMetadata.build`.
- **Producers validate, layers trust.** Token ids, lengths, slots and block tables are checked where a step is made
  (the training wrapper, :class:`kimi_linear.cache.HybridCache`, the engine), never inside the forward.
- **Decodes first.** Rows ``[0, num_decodes)`` are single-token continuations: KDA sends them through the recurrent
  kernel and MLA through the paged absorbed decode; the remaining sequences are prefill chunks (chunk kernels).
- **Snapshots.** A prefill sequence may ask for its KDA and conv states after some of its new tokens — at a
  64-token chunk boundary of this step (``64 j``) or at its last token — written straight into pool slots
  (prefix caching without an extra prefill split).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

# KDA chunk size: the chunk kernels emit states at multiples of it, counted from the start of a sequence's step.
SNAPSHOT_ALIGN = 64


@dataclass(frozen=True)
class Snapshot:
    """Copy sequence ``seq``'s KDA and conv states after ``length`` of its new tokens into pool slot ``slot``."""

    seq: int
    length: int
    slot: int


@dataclass(eq=False)
class StepMetadata:
    # ---- host: shapes and counts --------------------------------------------------------------------------------
    query_lens: tuple[int, ...]  # new tokens of each sequence in this step
    context_lens: tuple[int, ...]  # tokens each sequence already has in the cache (all 0 without one)
    num_decodes: int  # sequences [0, num_decodes) are one-token decodes over a cache
    batch_shape: tuple[int, int] | None  # (B, T) when the tokens are the B rows of a [B, T] batch, row by row
    snapshots: tuple[Snapshot, ...]
    # ---- device ---------------------------------------------------------------------------------------------------
    cu_seqlens: torch.Tensor  # [N + 1] int32: sequence n's tokens are [cu_seqlens[n], cu_seqlens[n + 1])
    seq_lens: torch.Tensor  # [N] int32: context + query tokens of each sequence
    state_slots: torch.Tensor | None = None  # [N] int64: KDA / conv pool slot of each sequence (< 0: padding row)
    has_initial_state: torch.Tensor | None = None  # [N] bool: the slot holds the state after the context
    block_table: torch.Tensor | None = None  # [N, max_blocks] int32: MLA latent blocks of each sequence, in order
    slot_mapping: torch.Tensor | None = None  # [num_tokens] int64: flat latent row (block * size + offset) per token
    snapshot_seqs: torch.Tensor | None = None  # [R] int64
    snapshot_lens: torch.Tensor | None = None  # [R] int64
    snapshot_slots: torch.Tensor | None = None  # [R] int64
    snapshot_state_rows: torch.Tensor | None = None  # [R] int64: rows of KDA's (chunk states ++ final states)

    # ---- derived host views -----------------------------------------------------------------------------------------
    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @cached_property
    def cu_seqlens_host(self) -> tuple[int, ...]:
        return _offsets(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return self.cu_seqlens_host[-1]

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes

    @property
    def has_cache(self) -> bool:
        return self.state_slots is not None

    @cached_property
    def uniform_query_len(self) -> int | None:
        """The common query length when every sequence has the same one (a plain batch, or a decode-only step)."""
        lens = set(self.query_lens)
        return lens.pop() if len(lens) == 1 else None

    @cached_property
    def prefill_context_free(self) -> bool:
        """True when no prefill sequence has cached context (attention needs only this step's keys)."""
        return not any(self.context_lens[self.num_decodes:])

    @cached_property
    def prefill_cu_seqlens(self) -> torch.Tensor:
        """``[num_prefills + 1]`` int32 offsets of the prefill sequences within the prefill tokens."""
        return self.cu_seqlens[self.num_decodes:] - self.num_decodes

    @cached_property
    def prefill_cu_seqlens_host(self) -> tuple[int, ...]:
        return _offsets(self.query_lens[self.num_decodes:])

    @cached_property
    def prefill_seq_lens_host(self) -> tuple[int, ...]:
        """Context + query tokens of each prefill sequence: its attention keys."""
        d = self.num_decodes
        return tuple(c + n for c, n in zip(self.context_lens[d:], self.query_lens[d:]))

    @cached_property
    def prefill_key_cu_seqlens(self) -> torch.Tensor:
        """``[num_prefills + 1]`` int32 offsets of the prefill sequences' keys (context + query) packed."""
        lens = self.seq_lens[self.num_decodes:]
        return torch.cat([lens.new_zeros(1), lens.cumsum(0, dtype=torch.int32)])

    # ---- producers ----------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        context_lens: Sequence[int] | None = None,
        *,
        device: torch.device | str,
        num_decodes: int = 0,
        state_slots: Sequence[int] | None = None,
        block_tables: Sequence[Sequence[int]] | None = None,
        block_size: int | None = None,
        snapshots: Sequence[Snapshot] = (),
        batch_shape: tuple[int, int] | None = None,
    ) -> StepMetadata:
        """Make a step from host lists (validated here) and copy what kernels index with to ``device`` at once.

        ``state_slots`` and ``block_tables`` (with ``block_size``) come together, for a step over a cache; block
        table rows may have different lengths (they are padded with block 0, which a cache never hands out).
        """
        query_lens = tuple(int(n) for n in query_lens)
        N = len(query_lens)
        context_lens = (0,) * N if context_lens is None else tuple(int(n) for n in context_lens)
        _check_lengths(query_lens, context_lens, num_decodes)
        if (state_slots is None) != (block_tables is None):
            raise ValueError("state_slots and block_tables come together (a step over a cache needs both)")
        if state_slots is None and (num_decodes or any(context_lens) or snapshots):
            raise ValueError("decodes, context and snapshots need a cache: pass state_slots and block_tables")
        seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
        host = {
            "cu_seqlens": torch.tensor(_offsets(query_lens), dtype=torch.int32),
            "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
        }
        if state_slots is not None:
            if len(state_slots) != N or len(block_tables) != N:
                raise ValueError(f"need one state slot and one block table per sequence ({N}), got "
                                 f"{len(state_slots)} and {len(block_tables)}")
            if block_size is None or block_size <= 0:
                raise ValueError(f"block_size must be a positive integer with block tables, got {block_size!r}")
            for n, (table, total) in enumerate(zip(block_tables, seq_lens)):
                if len(table) * block_size < total:
                    raise ValueError(f"sequence {n} holds {total} tokens but its block table has only {len(table)} "
                                     f"blocks of {block_size}")
                if any(b < 0 for b in table):
                    raise ValueError(f"sequence {n}'s block table holds a negative block id: {list(table)}")
            targets = [*state_slots, *(s.slot for s in snapshots)]
            if any(s < 0 for s in targets) or len(set(targets)) != len(targets):
                raise ValueError(f"state slots and snapshot slots must be distinct and >= 0 (one writer each), got "
                                 f"slots {list(state_slots)} and snapshot slots {[s.slot for s in snapshots]}")
            host["state_slots"] = torch.tensor(list(state_slots), dtype=torch.int64)
            host["has_initial_state"] = torch.tensor([c > 0 for c in context_lens], dtype=torch.bool)
            width = max((len(t) for t in block_tables), default=0)
            table = torch.zeros(N, max(width, 1), dtype=torch.int32)
            for n, row in enumerate(block_tables):
                table[n, :len(row)] = torch.tensor(list(row), dtype=torch.int32)
            host["block_table"] = table
            host["slot_mapping"] = _slot_mapping(table, query_lens, context_lens, block_size)
            if host["slot_mapping"].unique().numel() != host["slot_mapping"].numel():
                raise ValueError("two tokens of the step would write one latent row: block tables overlap")
        snapshots = tuple(snapshots)
        if snapshots:
            rows = _snapshot_rows(snapshots, query_lens, num_decodes)
            host["snapshot_seqs"] = torch.tensor([s.seq for s in snapshots], dtype=torch.int64)
            host["snapshot_lens"] = torch.tensor([s.length for s in snapshots], dtype=torch.int64)
            host["snapshot_slots"] = torch.tensor([s.slot for s in snapshots], dtype=torch.int64)
            host["snapshot_state_rows"] = torch.tensor(rows, dtype=torch.int64)
        if batch_shape is not None and batch_shape[0] * batch_shape[1] != sum(query_lens):
            raise ValueError(f"batch_shape {batch_shape} does not hold the step's {sum(query_lens)} tokens")
        device = torch.device(device)
        tensors = {name: _to_device(t, device) for name, t in host.items()}
        return cls(query_lens=query_lens, context_lens=context_lens, num_decodes=num_decodes, batch_shape=batch_shape,
                   snapshots=snapshots, **tensors)

    @classmethod
    def for_batch(cls, batch_size: int, seq_len: int, device: torch.device | str,
                  doc_lens: Sequence[int] | None = None) -> StepMetadata:
        """A training / scoring batch without a cache: B rows of T tokens, each row one sequence, or (``doc_lens``)
        the documents packed into the rows, in order (a document never spans two rows)."""
        lens = [seq_len] * batch_size if doc_lens is None else list(doc_lens)
        return cls.build(lens, device=device, batch_shape=(batch_size, seq_len))

    # ---- derived device views -----------------------------------------------------------------------------------
    def document_starts(self) -> torch.Tensor:
        """``[num_tokens]`` bool: True at each sequence's first token (nothing before it predicts it)."""
        first = [c for c, n in zip(self.cu_seqlens_host, self.query_lens) if n]
        starts = torch.zeros(self.num_tokens, dtype=torch.bool)
        starts[first] = True
        return starts.to(self.cu_seqlens.device)


def _offsets(lengths: Sequence[int]) -> tuple[int, ...]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return tuple(out)


def _check_lengths(query_lens: tuple[int, ...], context_lens: tuple[int, ...], num_decodes: int) -> None:
    if len(context_lens) != len(query_lens):
        raise ValueError(f"context_lens has {len(context_lens)} entries for {len(query_lens)} sequences")
    if any(n < 0 for n in query_lens) or any(n < 0 for n in context_lens):
        raise ValueError(f"lengths must be >= 0, got query_lens {query_lens}, context_lens {context_lens}")
    if not 0 <= num_decodes <= len(query_lens):
        raise ValueError(f"num_decodes must be in 0..{len(query_lens)}, got {num_decodes}")
    bad = [n for n in range(num_decodes) if query_lens[n] != 1 or context_lens[n] == 0]
    if bad:
        raise ValueError(f"decode rows must bring one token on top of a cached context; rows {bad} do not")


def _slot_mapping(table: torch.Tensor, query_lens: tuple[int, ...], context_lens: tuple[int, ...],
                  block_size: int) -> torch.Tensor:
    """``[num_tokens]`` int64: where each new token's latent goes in the flat ``[blocks * block_size]`` store."""
    if not query_lens:
        return torch.zeros(0, dtype=torch.int64)
    seq = torch.repeat_interleave(torch.arange(len(query_lens)), torch.tensor(query_lens))
    first = torch.tensor(_offsets(query_lens)[:-1])
    pos = torch.arange(seq.numel()) - first[seq] + torch.tensor(context_lens)[seq]
    block = table[seq, pos // block_size].long()
    return block * block_size + pos % block_size


def _snapshot_rows(snapshots: tuple[Snapshot, ...], query_lens: tuple[int, ...], num_decodes: int) -> list[int]:
    """Row of each snapshot in KDA's ``cat(chunk_states, final_states)`` over the prefill sequences: chunk j of
    prefill sequence p starts after its first 64 j tokens; final state p comes after all chunk states."""
    prefill = query_lens[num_decodes:]
    chunk_first = _offsets([-(-n // SNAPSHOT_ALIGN) for n in prefill])
    rows = []
    for s in snapshots:
        p = s.seq - num_decodes
        if not 0 <= p < len(prefill):
            raise ValueError(f"snapshot of sequence {s.seq}: only prefill sequences ({num_decodes}.."
                             f"{len(query_lens) - 1}) take snapshots")
        n = prefill[p]
        if s.length == n:
            rows.append(chunk_first[-1] + p)
        elif 0 < s.length < n and s.length % SNAPSHOT_ALIGN == 0:
            rows.append(chunk_first[p] + s.length // SNAPSHOT_ALIGN)
        else:
            raise ValueError(f"snapshot of sequence {s.seq} after {s.length} of its {n} new tokens: must be a "
                             f"multiple of {SNAPSHOT_ALIGN} inside the step, or its last token")
    return rows


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
