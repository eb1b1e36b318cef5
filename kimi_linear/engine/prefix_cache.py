"""Exact prefix caching for a hybrid model: a radix tree over tokens whose entries are recurrent-state snapshots.

KDA's state after t tokens summarises all of them; it can be reused only at a token count where it was actually
taken (with the conv tail of that same position). So an entry is a whole reusable prefix:

- ``depth`` tokens (the path from the root to the entry's node);
- ``slot``: a state slot holding every KDA layer's recurrent state and conv tail after exactly those tokens;
- ``blocks``: the latent blocks holding every MLA layer's latents of tokens ``[0, depth)`` (shared by reference:
  a block is written once per position, in order, so its first positions never change once written);
- ``hidden``: for entries at a prompt's end, the final hidden state of the last token, so that the same prompt
  again (a retry, or the other ``n - 1`` completions of a request) needs no prefill at all.

A lookup walks the tree as far as the tokens agree (the latent hit) and returns the deepest entry on that path
(the state hit): the prefix really reused. The two are counted separately, so a poor snapshot placement shows up as
a latent hit without a state hit instead of a silent miss.

Where snapshots are taken is the scheduler's policy (prompt ends, an interval, branch points). Branch points are
found here: when a lookup's tokens leave the tree where it already goes on differently, that point has been seen
by two different continuations, and the lookup reports it so that its request can take a snapshot there.
Eviction removes the entry with the least ``depth / (1 + age)``: recency weighted by the recompute it saves.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kimi_linear.engine.allocator import BlockAllocator, SlotAllocator


class _Node:
    __slots__ = ("parent", "edge", "children", "depth", "entry")

    def __init__(self, parent: _Node | None, edge: tuple[int, ...], depth: int) -> None:
        self.parent = parent
        self.edge = edge  # tokens from the parent to this node
        self.children: dict[int, _Node] = {}
        self.depth = depth
        self.entry: Entry | None = None


@dataclass(eq=False)
class Entry:
    depth: int
    slot: int
    blocks: list[int]
    hidden: torch.Tensor | None
    node: _Node
    last_used: int


@dataclass
class Match:
    entry: Entry | None  # the deepest usable entry on the path, or None
    matched: int  # tokens the tree agreed with (latent hit)
    branch: int | None  # where the tokens left the tree at a branch without an entry (take a snapshot there)

    @property
    def depth(self) -> int:
        return self.entry.depth if self.entry else 0


@dataclass
class PrefixCacheStats:
    queries: int = 0  # lookups
    query_tokens: int = 0
    latent_hit_tokens: int = 0  # tokens whose latents the tree held
    state_hit_tokens: int = 0  # tokens reused (entry depth)
    state_hits: int = 0  # lookups that reused an entry
    inserts: int = 0
    evictions: int = 0


class PrefixCache:
    def __init__(self, slots: SlotAllocator, blocks: BlockAllocator, block_size: int) -> None:
        self._slots = slots
        self._blocks = blocks
        self.block_size = block_size
        self._root = _Node(None, (), 0)
        self._entries: set[Entry] = set()
        self._entry_refs: Counter[int] = Counter()  # block -> how many entries hold it
        self._tick = 0
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> frozenset[Entry]:
        return frozenset(self._entries)

    # ---- lookup ---------------------------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int]) -> Match:
        """The deepest entry whose tokens start ``tokens`` and that leaves something to compute: depth < len(tokens),
        or depth == len(tokens) with a stored hidden state (no compute at all)."""
        self._tick += 1
        node, at, best = self._root, 0, None
        while True:
            if node.entry is not None and (node.depth < len(tokens) or node.entry.hidden is not None):
                best = node.entry
            if at == len(tokens):
                break
            child = node.children.get(tokens[at])
            if child is None:
                break
            common = _common_prefix(child.edge, tokens, at)
            if common < len(child.edge):
                at += common
                node = self._split(child, common) if at < len(tokens) else node
                break
            node, at = child, at + common
        # The tokens leave the tree where it already goes on differently: a branch point, seen twice now.
        leaves_at_branch = 0 < at < len(tokens) and node.depth == at and node.children and node.entry is None
        branch = at if leaves_at_branch else None
        if best is not None:
            best.last_used = self._tick
        return Match(best, at, branch)

    def record(self, match: Match, num_tokens: int) -> None:
        """Count a lookup whose result was used (a sequence admitted with it)."""
        s = self.stats
        s.queries += 1
        s.query_tokens += num_tokens
        s.latent_hit_tokens += match.matched
        s.state_hit_tokens += match.depth
        s.state_hits += match.entry is not None

    # ---- insertion and eviction ------------------------------------------------------------------------------------
    def insert(self, tokens: Sequence[int], slot: int, blocks: Sequence[int],
               hidden: torch.Tensor | None = None) -> Entry | None:
        """Cache the state after ``tokens`` (held in ``slot``, which the cache then owns) with the latent ``blocks``
        covering them (the cache takes its own reference). Returns None, taking nothing, when an entry for exactly
        these tokens exists already (the caller keeps its slot)."""
        node = self._root
        at = 0
        while at < len(tokens):
            child = node.children.get(tokens[at])
            if child is None:
                leaf = _Node(node, tuple(tokens[at:]), len(tokens))
                node.children[tokens[at]] = leaf
                node, at = leaf, len(tokens)
                break
            common = _common_prefix(child.edge, tokens, at)
            if common < len(child.edge):
                child = self._split(child, common)
            node, at = child, at + common
        self._tick += 1
        if node.entry is not None:
            node.entry.last_used = self._tick
            if hidden is not None and node.entry.hidden is None:
                node.entry.hidden = hidden
            return None
        covering = list(blocks[: -(-len(tokens) // self.block_size)])
        self._blocks.share(covering)
        self._entry_refs.update(covering)
        entry = Entry(len(tokens), slot, covering, hidden, node, self._tick)
        node.entry = entry
        self._entries.add(entry)
        self.stats.inserts += 1
        return entry

    def evict(self, pinned: set[Entry] | frozenset[Entry] = frozenset(), for_blocks: bool = False) -> bool:
        """Drop the entry worth least (``depth / (1 + age)``) that is not pinned; False when there is none.
        ``for_blocks``: only among entries holding a block that no running sequence holds (evicting entries can free
        it) — an entry whose blocks running sequences share frees nothing but its slot."""
        candidates = [e for e in self._entries if e not in pinned
                      and (not for_blocks or any(self._held_by_entries_only(b) for b in e.blocks))]
        if not candidates:
            return False
        self._drop(min(candidates, key=lambda e: e.depth / (1 + self._tick - e.last_used)))
        self.stats.evictions += 1
        return True

    def _held_by_entries_only(self, block: int) -> bool:
        """No running sequence holds the block: evicting entries can free it."""
        return self._blocks.holders(block) == self._entry_refs[block]

    def clear(self) -> None:
        for entry in list(self._entries):
            self._drop(entry)

    def _drop(self, entry: Entry) -> None:
        self._entries.discard(entry)
        self._slots.free(entry.slot)
        self._blocks.release(entry.blocks)
        self._entry_refs.subtract(entry.blocks)
        node = entry.node
        node.entry = None
        while node.parent is not None and node.entry is None and not node.children:
            del node.parent.children[node.edge[0]]
            node = node.parent

    def _split(self, child: _Node, at: int) -> _Node:
        """Cut ``child``'s edge after ``at`` tokens; returns the new node in the middle."""
        parent = child.parent
        middle = _Node(parent, child.edge[:at], parent.depth + at)
        parent.children[child.edge[0]] = middle
        child.edge = child.edge[at:]
        child.parent = middle
        middle.children[child.edge[0]] = child
        return middle


def _common_prefix(edge: tuple[int, ...], tokens: Sequence[int], at: int) -> int:
    n = 0
    limit = min(len(edge), len(tokens) - at)
    while n < limit and edge[n] == tokens[at + n]:
        n += 1
    return n
