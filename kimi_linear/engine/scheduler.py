"""Which sequences advance in the next step, by how many tokens, and where their state lives.

Continuous batching under a token budget: every step, the running sequences go first (oldest first: a decode
takes one token, an unfinished prefill its next chunk), then waiting sequences are admitted in arrival order
while the budget, ``max_num_seqs`` and both pools allow. Admission looks the tokens up in the prefix cache: a hit
copies the entry's state snapshot into the sequence's own slot, shares the entry's full latent blocks and copies
its partial last block (the sequence will write into it), so nothing a sequence writes is seen by another.

Chunked prefill keeps chunk boundaries on one grid per run of prefill: a piece that does not finish the tokens
ends ``64 k`` tokens after where the run started (``grid_origin``), so the chunk kernel's interior states fall on
the same positions however the budget cut the prompt, and snapshots can be taken there.

When a running sequence needs a block and none is free (after evicting prefix-cache entries), the newest running
sequence is preempted: its state goes into the prefix cache (it is exact: the state after the tokens it processed)
and it waits again at the head of the queue, to resume through that entry — or recompute, if it was evicted.

Snapshot policy for a prefill piece: at the end of the tokens (with the final hidden state, so the same tokens
again need no forward at all), every ``snapshot_interval`` tokens of the run, and at a branch point the prefix
cache reported (rounded down to the grid). Snapshots use free slots (evicting colder entries), never preemption.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kimi_linear.engine.allocator import BlockAllocator, SlotAllocator
from kimi_linear.engine.prefix_cache import Entry, Match, PrefixCache
from kimi_linear.engine.request import Completion, Status
from kimi_linear.step import SNAPSHOT_ALIGN


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 2048  # tokens per step
    enable_prefix_caching: bool = True
    snapshot_interval: int = 1024  # tokens between snapshots inside a long prefill (a multiple of 64; 0: off)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < SNAPSHOT_ALIGN:
            raise ValueError(f"max_num_batched_tokens must be at least {SNAPSHOT_ALIGN} (one chunk), got "
                             f"{self.max_num_batched_tokens}")
        if self.snapshot_interval < 0 or self.snapshot_interval % SNAPSHOT_ALIGN:
            raise ValueError(f"snapshot_interval must be a non-negative multiple of {SNAPSHOT_ALIGN}, got "
                             f"{self.snapshot_interval}")


@dataclass
class Prefill:
    seq: Completion
    num_tokens: int
    snapshots: list[tuple[int, int]] = field(default_factory=list)  # (tokens of this piece, slot)


@dataclass
class StepPlan:
    decodes: list[Completion] = field(default_factory=list)
    prefills: list[Prefill] = field(default_factory=list)
    ready: list[Completion] = field(default_factory=list)  # full hits: sample from a cached hidden state
    slot_copies: list[tuple[int, int]] = field(default_factory=list)  # (source, destination), before the step
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.decodes or self.prefills or self.ready)


class Scheduler:
    def __init__(self, config: SchedulerConfig, slots: SlotAllocator, blocks: BlockAllocator, block_size: int) -> None:
        self.config = config
        self.slots = slots
        self.blocks = blocks
        self.block_size = block_size
        self.prefix_cache = PrefixCache(slots, blocks, block_size) if config.enable_prefix_caching else None
        self.waiting: deque[Completion] = deque()
        self.running: list[Completion] = []  # in admission order
        self.num_preemptions = 0
        self._admissions = 0

    # ---- queue -------------------------------------------------------------------------------------------------------
    def add(self, seq: Completion, front: bool = False) -> None:
        seq.status = Status.WAITING
        (self.waiting.appendleft if front else self.waiting.append)(seq)

    def finish(self, seq: Completion, keep_state: bool = True) -> None:
        """Let a finished (or aborted) sequence go: its state becomes a prefix-cache entry (unless ``keep_state`` is
        False), its memory returns."""
        if seq in self.running:
            self.running.remove(seq)
            self._release(seq, keep_state)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step ----------------------------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.config.max_num_batched_tokens
        pinned: set[Entry] = set()  # entries read by this step's copies: not to be evicted before they run
        queue = list(self.running)
        while queue and budget > 0:
            seq = queue.pop(0)
            n = self._piece(seq, budget)
            if n == 0:
                continue
            while not self._reserve_blocks(seq, seq.computed + n, pinned):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                budget -= n
                self._plan_run(plan, seq, n, pinned)
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            n = self._admit(plan, self.waiting[0], budget, pinned)
            if n is None:
                break
            budget -= n
        return plan

    def _plan_run(self, plan: StepPlan, seq: Completion, n: int, pinned: set[Entry]) -> None:
        if n == 1 and seq.computed > 0 and seq.computed + 1 == len(seq.tokens):
            plan.decodes.append(seq)
        else:
            plan.prefills.append(Prefill(seq, n, self._snapshots(seq, n, pinned)))

    def _admit(self, plan: StepPlan, seq: Completion, budget: int, pinned: set[Entry]) -> int | None:
        """Start the first waiting sequence; returns the tokens it takes this step, or None if it cannot start.

        With a prefix hit, the entry stays pinned while it is used. If the hit does not fit, the sequence waits for
        running sequences to free memory; when none runs, the hit itself is what does not fit (its entry holds the
        last free slot, or the blocks its copy-on-write needs), so the sequence starts without it."""
        match = self.prefix_cache.match(seq.tokens) if self.prefix_cache is not None else None
        if match is not None and match.entry is not None:
            n = self._start(plan, seq, budget, pinned, match)
            if n is not None or self.running:
                return n
            match = Match(None, match.matched, match.branch)
        return self._start(plan, seq, budget, pinned, match)

    def _start(self, plan: StepPlan, seq: Completion, budget: int, pinned: set[Entry],
               match: Match | None) -> int | None:
        entry = match.entry if match is not None else None
        newly_pinned = entry is not None and entry not in pinned
        if entry is not None:
            pinned.add(entry)
        n = self._take_resources(seq, budget, pinned, entry)
        if n is None:
            if newly_pinned:
                pinned.discard(entry)
            return None
        self.waiting.popleft()
        seq.status = Status.RUNNING
        seq.admitted_at = self._admissions
        self._admissions += 1
        self.running.append(seq)
        if seq.cached_tokens < 0:
            seq.cached_tokens = min(seq.computed, seq.num_prompt)
        if match is not None:
            self.prefix_cache.record(match, len(seq.tokens))
        seq.snapshot_at = match.branch if match is not None else None
        if entry is not None:
            plan.slot_copies.append((entry.slot, seq.slot))
            tail = entry.depth // self.block_size
            if entry.depth % self.block_size:  # the sequence writes into this block: its own copy
                plan.block_copies.append((entry.blocks[tail], seq.blocks[tail]))
        if seq.computed < len(seq.tokens):
            self._plan_run(plan, seq, n, pinned)
        else:
            seq.ready_hidden = entry.hidden
            plan.ready.append(seq)
        return n

    def _take_resources(self, seq: Completion, budget: int, pinned: set[Entry], entry: Entry | None) -> int | None:
        """A slot, the entry's shared blocks (and a private copy of its partial last block), and blocks for the first
        piece; returns the piece's length (0: a full hit), or None, having given everything back."""
        slot = self._take_slot(pinned)
        if slot is None:
            return None
        seq.slot, seq.blocks, seq.computed = slot, [], 0
        if entry is not None:
            full = entry.depth // self.block_size
            seq.blocks = list(entry.blocks[:full])
            self.blocks.share(seq.blocks)
            seq.computed = entry.depth
            if entry.depth % self.block_size:
                tail = self._take_blocks(1, pinned)
                if tail is None:
                    self._undo(seq)
                    return None
                seq.blocks.append(tail[0])
        if seq.computed == len(seq.tokens):
            return 0
        seq.grid_origin = seq.computed
        n = self._piece(seq, budget)
        if n == 0 or not self._reserve_blocks(seq, seq.computed + n, pinned):
            self._undo(seq)
            return None
        return n

    # ---- pieces and snapshots ----------------------------------------------------------------------------------------
    def _piece(self, seq: Completion, budget: int) -> int:
        """Tokens of seq to process now: all that remain if the budget allows, else the most that end on its grid."""
        remaining = len(seq.tokens) - seq.computed
        if remaining <= budget:
            return remaining
        end = seq.computed + budget
        end = seq.grid_origin + (end - seq.grid_origin) // SNAPSHOT_ALIGN * SNAPSHOT_ALIGN
        return max(end - seq.computed, 0)

    def _snapshots(self, seq: Completion, n: int, pinned: set[Entry]) -> list[tuple[int, int]]:
        if self.prefix_cache is None:
            return []
        start, end = seq.computed, seq.computed + n
        wanted = set()
        if end == len(seq.tokens):
            wanted.add(end)
        interval = self.config.snapshot_interval
        if interval:
            first = seq.grid_origin + ((start - seq.grid_origin) // interval + 1) * interval
            wanted.update(range(first, end + 1, interval))
        if seq.snapshot_at is not None:
            at = seq.grid_origin + (seq.snapshot_at - seq.grid_origin) // SNAPSHOT_ALIGN * SNAPSHOT_ALIGN
            if start < at <= end:
                wanted.add(at)
                seq.snapshot_at = None
        out = []
        for position in sorted(wanted):
            slot = self._take_slot(pinned)
            if slot is None:
                break
            out.append((position - start, slot))
        return out

    # ---- memory ------------------------------------------------------------------------------------------------------
    def _take_slot(self, pinned: set[Entry]) -> int | None:
        while (slot := self.slots.allocate()) is None:
            if self.prefix_cache is None or not self.prefix_cache.evict(pinned):
                return None
        return slot

    def _take_blocks(self, n: int, pinned: set[Entry]) -> list[int] | None:
        while self.blocks.num_free < n:
            if self.prefix_cache is None or not self.prefix_cache.evict(pinned, for_blocks=True):
                return None
        return self.blocks.allocate(n)

    def _reserve_blocks(self, seq: Completion, tokens: int, pinned: set[Entry]) -> bool:
        need = -(-tokens // self.block_size) - len(seq.blocks)
        if need <= 0:
            return True
        new = self._take_blocks(need, pinned)
        if new is None:
            return False
        seq.blocks.extend(new)
        return True

    def _preempt(self, seq: Completion) -> None:
        self.running.remove(seq)
        self._release(seq)
        self.num_preemptions += 1
        self.add(seq, front=True)

    def _release(self, seq: Completion, keep_state: bool = True) -> None:
        """Return seq's slot and blocks; its state (exact after ``computed`` tokens) is kept as a cache entry."""
        kept = (keep_state and self.prefix_cache is not None and seq.computed > 0
                and self.prefix_cache.insert(seq.tokens[:seq.computed], seq.slot, seq.blocks) is not None)
        if not kept:
            self.slots.free(seq.slot)
        self.blocks.release(seq.blocks)
        seq.slot, seq.blocks, seq.computed, seq.ready_hidden = None, [], 0, None

    def _undo(self, seq: Completion) -> None:
        """Admission failed half way: give back what it took."""
        self.blocks.release(seq.blocks)
        self.slots.free(seq.slot)
        seq.slot, seq.blocks, seq.computed = None, [], 0
