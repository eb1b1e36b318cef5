"""Randomized workloads against the scheduler, the prefix cache and the allocators: seeded arrival times, prompt
lengths 1..max, shared prefixes and repeated prompts, greedy and seeded sampling with n up to 3, aborts at random
steps, pools so small that entries are evicted and sequences preempted, budgets that chunk prefills, max_num_seqs
limits. After every plan and every step the invariants of engine_checks hold (each slot has one owner, each block's
reference count equals its holders, what shares a block agrees on its tokens, nobody writes into a block another
sequence reads, nothing live is NaN, pieces stay on their grid, budgets and limits hold); every request finishes;
each completion equals that of a roomy engine without prefix caching (aborted ones: a prefix of it); after clearing
the prefix cache everything is free.

Most runs use the exact cache-checking stand-in model (engine_checks.CacheCheckingModel: a state that does not
belong to the cached tokens fails the step at once); a few use the real model.

Pools keep two blocks more than the longest request needs and at least two usable slots. The cache-checking runs
found the double-abort bug of test_engine_adversarial.py (seed 1011 of 50 requests of up to 260 tokens).
"""

from __future__ import annotations

import random

import pytest
from engine_checks import (
    CacheCheckingModel,
    assert_all_free,
    drive,
    make_engine,
    make_model,
    random_workload,
)

from kimi_linear.engine.allocator import BlockAllocator, SlotAllocator
from kimi_linear.engine.scheduler import Scheduler, SchedulerConfig


@pytest.fixture(scope="module")
def model():
    return make_model()


def random_engine(model, seed: int, max_len: int, caching: bool = True):
    """Tiny pools for requests of up to max_len + 10 tokens: block size 1, 7, 16, 32 or 64; 2..9 usable slots;
    budgets 64..1000; 1..5 sequences at once; snapshots every 0, 64 or 128 tokens."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 7, 16, 32, 64])
    blocks = -(-(max_len + 10) // block_size) + 2 + rng.choice([0, 1, 3, 8])
    return make_engine(model, slots=rng.randint(3, 10), blocks=blocks, block_size=block_size,
                       budget=rng.choice([64, 96, 128, 200, 1000]), max_seqs=rng.randint(1, 5),
                       interval=rng.choice([0, 64, 128]), caching=caching)


def check_against_roomy(model, seed: int, num_requests: int, max_len: int, caching: bool = True):
    eng = random_engine(model, seed, max_len, caching)
    arrivals, aborts, order = random_workload(seed, num_requests, max_len, eng.config.scheduler.max_num_seqs)
    got = drive(eng, arrivals, aborts)
    roomy = make_engine(model, caching=False, slots=3 * num_requests + 2, budget=100_000, max_seqs=3 * num_requests,
                        blocks=3 * num_requests * (max_len + 12) // 16 + 2)
    want = drive(roomy, {0: order}, check=False)
    aborted = {k for ks in aborts.values() for k in ks}
    for k, (g, w) in enumerate(zip(got, want)):
        if k in aborted:
            for i, tokens in g.tokens.items():
                assert tokens == w.tokens[i][:len(tokens)], f"aborted request {k}, completion {i}"
        else:
            assert g.completions == w.completions, f"request {k}: {order[k][1]}"
            assert all(reason in ("length", "stop") for reason in g.finish.values())
    assert_all_free(eng)
    return eng, aborts


STUB_SEEDS = range(24)
_reached: dict[int, tuple[int, int, int, int]] = {}  # seed -> (preemptions, evictions, state hits, aborts)


def _stub_run(seed: int) -> None:
    """30 requests of up to 200 tokens (the first three seeds without prefix caching); records what they reached."""
    eng, aborts = check_against_roomy(CacheCheckingModel(), seed, num_requests=30, max_len=200, caching=seed >= 3)
    stats = eng.scheduler.prefix_cache.stats if eng.scheduler.prefix_cache is not None else None
    _reached[seed] = (eng.scheduler.num_preemptions, stats.evictions if stats else 0,
                      stats.state_hits if stats else 0, len(aborts))


@pytest.mark.parametrize("seed", STUB_SEEDS)
def test_random_workloads_with_the_cache_checking_model(seed):
    """30 requests of up to 200 tokens per seed (the first three seeds without prefix caching)."""
    _stub_run(seed)


def test_the_random_workloads_reach_the_hard_cases():
    """The seeds above are not idle: together they preempt, evict, take state hits and abort (runs the seeds that
    did not run in this session)."""
    for seed in STUB_SEEDS:
        if seed not in _reached:
            _stub_run(seed)
    preemptions, evictions, state_hits, aborts = (sum(v) for v in zip(*_reached.values()))
    assert preemptions >= 10 and evictions >= 100 and state_hits >= 100 and aborts >= 10


@pytest.mark.parametrize("seed", [100, 101, 102, 103])
def test_random_workloads_with_the_model(model, seed):
    """The same with the real model: 12 requests of up to 300 tokens per seed."""
    check_against_roomy(model, seed, num_requests=12, max_len=300)


def test_eviction_skips_entries_that_free_no_memory():
    """A system prompt's entry (8 tokens) whose blocks a running sequence also holds, and a younger, deeper entry with
    blocks of its own: asking for 3 blocks evicts the entry that frees them, and keeps the system prompt."""
    slots, blocks = SlotAllocator(8), BlockAllocator(8)
    sch = Scheduler(SchedulerConfig(), slots, blocks, block_size=4)
    cache = sch.prefix_cache
    running = blocks.allocate(2)  # a running sequence's blocks, holding the system prompt
    system = cache.insert(list(range(8)), slots.allocate(), running)
    own = blocks.allocate(3)
    cache.insert(list(range(100, 112)), slots.allocate(), own)
    blocks.release(own)  # only the entry holds these
    assert sch._take_blocks(3, set()) is not None
    assert cache.entries == {system}, f"kept {[e.depth for e in cache.entries]}, evicted the other"
