"""The prefix cache's radix tree and the allocators, without a model."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.engine.allocator import BlockAllocator, SlotAllocator
from kimi_linear.engine.prefix_cache import PrefixCache


def make(slots=8, blocks=16, block_size=4):
    s, b = SlotAllocator(slots), BlockAllocator(blocks)
    return PrefixCache(s, b, block_size), s, b


def cached(cache, slots, blocks, tokens, hidden=None):
    """Insert tokens as if a sequence had computed them into fresh blocks and a fresh slot."""
    own = blocks.allocate(-(-len(tokens) // cache.block_size))
    slot = slots.allocate()
    entry = cache.insert(tokens, slot, own, hidden)
    blocks.release(own)  # the sequence goes away; the cache keeps its own references
    if entry is None:
        slots.free(slot)
    return entry


def test_match_returns_the_deepest_entry_that_leaves_work():
    cache, s, b = make()
    a = cached(cache, s, b, [1, 2, 3, 4, 5, 6])
    mid = cached(cache, s, b, [1, 2, 3])
    m = cache.match([1, 2, 3, 4, 5, 6, 7])
    assert m.entry is a and m.matched == 6
    m = cache.match([1, 2, 3, 4, 5, 6])  # a is the whole prompt and has no hidden state: clamp to 3
    assert m.entry is mid and m.matched == 6
    m = cache.match([1, 2, 3, 9])
    assert m.entry is mid and m.matched == 3
    m = cache.match([1, 2, 9])  # the tree knows 2 tokens, but no state is kept there
    assert m.entry is None and m.matched == 2
    full = cached(cache, s, b, [7, 7, 7], hidden=torch.zeros(4))
    m = cache.match([7, 7, 7])
    assert m.entry is full  # with a hidden state, the whole prompt may be a hit
    cache.record(m, 3)
    cache.record(cache.match([1, 2, 9]), 3)
    st = cache.stats
    assert (st.queries, st.state_hits, st.state_hit_tokens, st.latent_hit_tokens) == (2, 1, 3, 3 + 2)


def test_branch_points_are_reported():
    cache, s, b = make()
    cached(cache, s, b, [1, 2, 3, 4, 5])
    m = cache.match([1, 2, 3, 8, 8])  # leaves the path inside an edge: the tree now branches at 3
    assert m.branch == 3
    cached(cache, s, b, [1, 2, 3])
    assert cache.match([1, 2, 3, 9]).branch is None  # an entry is there already
    assert cache.match([1, 2, 3, 4, 5, 6]).branch is None  # extends a leaf: not a branch


def test_insert_twice_keeps_one_entry_and_refcounts_blocks():
    cache, s, b = make(blocks=8, block_size=4)
    own = b.allocate(2)
    slot = s.allocate()
    entry = cache.insert(list(range(6)), slot, own)
    assert entry is not None and all(b.holders(x) == 2 for x in own)
    assert cache.insert(list(range(6)), s.allocate(), own) is None  # caller keeps (and frees) its slot
    b.release(own)
    assert all(b.holders(x) == 1 for x in own)
    cache.clear()
    assert b.num_free == 7 and s.num_free == 6  # the caller's second slot is still out


def test_eviction_prefers_old_and_short_and_respects_pins():
    cache, s, b = make()
    short_old = cached(cache, s, b, [1, 2])
    long_old = cached(cache, s, b, [3] * 12)
    recent = cached(cache, s, b, [4, 4])
    assert cache.evict()
    assert cache.entries == {long_old, recent}  # depth 2 aged: least recompute saved per unit of age
    assert cache.evict(pinned={long_old, recent}) is False
    cache.match([4, 4, 1])  # touch
    while cache.evict():
        pass
    assert len(cache) == 0 and s.num_free == s.num_slots - 1 and b.num_free == b.num_blocks - 1
    assert short_old.node.parent is None or short_old.node not in short_old.node.parent.children.values()


def test_allocators_refuse_double_free():
    s, b = SlotAllocator(3), BlockAllocator(3)
    slot = s.allocate()
    s.free(slot)
    with pytest.raises(RuntimeError, match="freed twice"):
        s.free(slot)
    blocks = b.allocate(2)
    assert b.allocate(1) is None and b.num_free == 0
    b.release(blocks)
    with pytest.raises(RuntimeError, match="released more often"):
        b.release(blocks[:1])
    freed = []
    s2 = SlotAllocator(3, on_free=freed.extend)
    s2.free(s2.allocate())
    assert freed == [1]
