"""Shared helpers of the engine's adversarial tests: a small model, engines with tiny pools, a driver that adds and
aborts requests at chosen steps, and an invariant checker that walks the scheduler, the prefix cache and the
allocators (who owns every slot and block, and what is written where)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import torch

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.engine import EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from kimi_linear.engine.request import Status


def make_model() -> KimiLinearForCausalLM:
    """The `test` preset in fp32 with a non-trivial router bias (the model of tests/test_engine.py)."""
    torch.manual_seed(0)
    m = KimiLinearForCausalLM(KimiLinearConfig.from_preset("test")).eval()
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return m


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(max_tokens: int = 6, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def make_engine(model, *, slots=16, blocks=96, block_size=16, budget=256, max_seqs=8, caching=True, interval=0,
                poison=True, decode=None, eos=None) -> LLMEngine:
    config = EngineConfig(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                          enable_prefix_caching=caching, snapshot_interval=interval),
                          num_slots=slots, num_blocks=blocks, block_size=block_size, poison_freed=poison)
    return LLMEngine(model, config, decode=decode, eos_token_ids=eos)


@dataclass
class Result:
    """Everything one request streamed: tokens and logprobs per completion, finish reasons, cached prompt tokens."""

    tokens: dict[int, list[int]] = field(default_factory=dict)
    logprobs: dict[int, list] = field(default_factory=dict)
    text: dict[int, str] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)
    cached: int = 0
    finished: bool = False
    outputs: int = 0

    @property
    def completions(self) -> list[list[int]]:
        return [self.tokens[k] for k in sorted(self.tokens)]


def drive(eng: LLMEngine, arrivals: dict[int, list[tuple[list[int], SamplingParams]]],
          aborts: dict[int, list[int]] | None = None, *, check: bool = True, max_steps: int = 3000) -> list[Result]:
    """Add requests at the given steps (and abort the k-th added request at the steps in ``aborts``), step until
    everything finished, checking every plan (watch_plans) and the invariants after every step (unless ``check`` is
    False); returns one Result per request, in order."""
    aborts = aborts or {}
    if check:
        watch_plans(eng)
    ids: list[str] = []
    results: dict[str, Result] = {}
    step = 0
    last = max([*arrivals, *aborts], default=0)
    while step <= last or eng.has_unfinished():
        for p, params in arrivals.get(step, []):
            rid = eng.add_request(p, params)
            ids.append(rid)
            results[rid] = Result()
        for k in aborts.get(step, []):
            eng.abort(ids[k])
        for out in eng.step():
            r = results[out.request_id]
            assert not r.finished, f"{out.request_id} streamed after it finished"
            r.outputs += 1
            r.cached = out.num_cached_tokens
            r.finished = out.finished
            for o in out.outputs:
                r.tokens.setdefault(o.index, []).extend(o.token_ids)
                r.logprobs.setdefault(o.index, []).extend(o.logprobs or [])
                r.text[o.index] = r.text.get(o.index, "") + o.text
                if o.finish_reason is not None:
                    assert r.finish.get(o.index) is None, "a completion finished twice"
                r.finish[o.index] = o.finish_reason
        if check:
            check_invariants(eng)
        step += 1
        assert step < max_steps, "engine did not finish"
    assert all(r.finished for r in results.values())
    return [results[i] for i in ids]


def run_one(eng: LLMEngine, tokens: list[int], params: SamplingParams) -> Result:
    return drive(eng, {0: [(tokens, params)]})[0]


# ---- plans -----------------------------------------------------------------------------------------------------------
Piece = tuple[int, int, int, int, list[int]]  # computed, tokens, grid origin, sequence length, snapshot offsets


def watch_plans(eng: LLMEngine) -> list[list[Piece]]:
    """Wrap the scheduler so every plan is checked as it is made: no more tokens than the budget, no more running
    sequences than max_num_seqs, each sequence once; decodes are one-token continuations, full hits have nothing
    left to compute; a prefill piece that does not finish its tokens ends 64 k tokens after where its run began;
    snapshots sit at a multiple of 64 inside the piece or at its end, in fresh slots nobody else holds; copies read
    from cache entries into the admitted sequences' own slot and unshared blocks. Returns the prefill pieces of
    every step (appended as the engine runs)."""
    sch = eng.scheduler
    if hasattr(sch, "plan_log"):  # already watched
        return sch.plan_log
    steps = sch.plan_log = []
    schedule = sch.schedule

    def checked():
        plan = schedule()
        cfg = eng.config.scheduler
        seqs = plan.decodes + [r.seq for r in plan.prefills] + plan.ready
        assert len({id(q) for q in seqs}) == len(seqs), "a sequence is planned twice"
        assert len(plan.decodes) + sum(r.num_tokens for r in plan.prefills) <= cfg.max_num_batched_tokens
        assert len(sch.running) <= cfg.max_num_seqs and all(q in sch.running for q in seqs)
        assert all(q.computed > 0 and q.computed + 1 == len(q.tokens) for q in plan.decodes)
        assert all(q.computed == len(q.tokens) and q.ready_hidden is not None for q in plan.ready)
        entries = sch.prefix_cache.entries if sch.prefix_cache is not None else frozenset()
        held = {q.slot for q in sch.running} | {e.slot for e in entries}
        snap_slots = [slot for r in plan.prefills for _, slot in r.snapshots]
        assert len(set(snap_slots)) == len(snap_slots) and not set(snap_slots) & held
        assert not set(snap_slots) & set(eng.slots._free)
        pieces = []
        for r in plan.prefills:
            q, n = r.seq, r.num_tokens
            assert 0 < n and q.computed + n <= len(q.tokens)
            assert q.computed + n == len(q.tokens) or (q.computed + n - q.grid_origin) % 64 == 0
            assert all(0 < off <= n and (off == n or off % 64 == 0) for off, _ in r.snapshots)
            pieces.append((q.computed, n, q.grid_origin, len(q.tokens), [off for off, _ in r.snapshots]))
        for src, dst in plan.slot_copies:
            assert src in {e.slot for e in entries} and dst in {q.slot for q in seqs}
        for _, dst in plan.block_copies:
            assert eng.blocks.holders(dst) == 1 and any(dst in q.blocks for q in seqs)
        steps.append(pieces)
        return plan

    sch.schedule = checked
    return steps


def random_workload(seed: int, num_requests: int, max_len: int, max_seqs: int) -> tuple[dict, dict, list]:
    """Requests (prompts of 1..max_len tokens, many sharing prefixes of two stems, some ending on a 64-token boundary
    of a stem, some repeating earlier prompts;
    greedy or seeded sampling; n up to 3; 1..10 tokens) arriving at random steps, and aborts of random requests at
    random steps. Returns (arrivals, aborts, requests in the order they are added)."""
    rng = random.Random(seed)
    stems = [prompt(max_len, seed=10_000 + 10 * seed + i) for i in range(2)]
    requests = []
    for i in range(num_requests):
        r = rng.random()
        if requests and r < 0.15:
            tokens = list(rng.choice(requests)[0])  # the same prompt again: a full hit
        elif r < 0.25 and max_len >= 64:  # a stem up to a 64-token boundary: ends where snapshots are taken
            tokens = rng.choice(stems)[:64 * rng.randint(1, max_len // 64)]
        else:
            length = rng.randint(1, max_len)
            cut = rng.randint(1, length) if r < 0.6 else 0
            tokens = rng.choice(stems)[:cut] + prompt(length - cut, seed=1000 * seed + i)
        n, max_tokens = min(rng.choice([1, 1, 1, 2, 3]), max_seqs), rng.randint(1, 10)
        if rng.random() < 0.5:
            params = greedy(max_tokens, n=n)
        else:
            params = SamplingParams(temperature=0.8, top_k=rng.choice([0, 20]), seed=rng.randint(0, 10**6),
                                    max_tokens=max_tokens, ignore_eos=True, n=n)
        requests.append((tokens, params))
    arrivals: dict[int, list] = {}
    for req in requests:
        arrivals.setdefault(rng.randint(0, 2 * num_requests), []).append(req)
    order = [req for step in sorted(arrivals) for req in arrivals[step]]
    aborts: dict[int, list[int]] = {}
    for _ in range(rng.randint(0, num_requests // 4)):
        step = rng.randint(1, 3 * num_requests)
        added = sum(len(reqs) for s, reqs in arrivals.items() if s <= step)
        k = rng.randrange(added) if added else None
        if k is not None and k not in aborts.get(step, []):  # (twice in one step: see test_engine_adversarial)
            aborts.setdefault(step, []).append(k)
    return arrivals, aborts, order


# ---- invariants ------------------------------------------------------------------------------------------------------
def entry_tokens(entry) -> list[int]:
    """The tokens of a prefix-cache entry: the edges from the root to its node."""
    edges, node = [], entry.node
    while node.parent is not None:
        edges.append(node.edge)
        node = node.parent
    return [t for edge in reversed(edges) for t in edge]


def check_invariants(eng: LLMEngine) -> None:
    """Between steps: every slot is free, or held by exactly one running sequence or one prefix-cache entry; every
    block's reference count equals its holders (running sequences and entries), free blocks are exactly those nobody
    holds; waiting sequences hold nothing; holders of one block agree on its position and on the tokens written in
    it; no block a running sequence will write into is held by another sequence or by an entry deeper than what the
    sequence wrote; live state, and latents below what each holder wrote, are never NaN (freed memory is poisoned)."""
    sch, bs = eng.scheduler, eng.config.block_size
    entries = list(sch.prefix_cache.entries) if sch.prefix_cache is not None else []
    num_slots, num_blocks = eng.slots.num_slots, eng.blocks.num_blocks
    # slots: exactly one owner each
    owner: dict[int, str] = {}
    for who, slot in ([("free", s) for s in eng.slots._free] + [(f"seq {q.seq_id}", q.slot) for q in sch.running]
                      + [(f"entry@{e.depth}", e.slot) for e in entries]):
        assert slot is not None and 0 < slot < num_slots, f"{who} holds slot {slot}"
        assert slot not in owner, f"slot {slot} held by {owner[slot]} and {who}"
        owner[slot] = who
    assert len(owner) == num_slots - 1, f"slots nobody holds: {set(range(1, num_slots)) - set(owner)}"
    # sequences: one place each, waiting ones hold nothing
    seqs = list(sch.running) + list(sch.waiting)
    assert len({id(q) for q in seqs}) == len(seqs), "a sequence is queued twice"
    for q in sch.waiting:
        assert q.status is Status.WAITING and q.slot is None and not q.blocks and q.computed == 0
    for q in sch.running:
        assert q.status is Status.RUNNING and q.ready_hidden is None
        assert 0 < q.computed < len(q.tokens) and len(q.blocks) * bs >= q.computed, (q.computed, len(q.blocks))
        assert len(set(q.blocks)) == len(q.blocks), f"seq {q.seq_id} holds a block twice"
    # blocks: reference counts equal holders; what each holder wrote in a block agrees
    holders: dict[int, list[tuple[int, list[int], int, str]]] = {}  # block -> (index, tokens, written, who)
    for q in sch.running:
        for j, b in enumerate(q.blocks):
            holders.setdefault(b, []).append((j, q.tokens, q.computed, f"seq {q.seq_id}"))
    for e in entries:
        toks = entry_tokens(e)
        assert len(toks) == e.depth and len(e.blocks) == -(-e.depth // bs), (len(toks), e.depth, len(e.blocks))
        for j, b in enumerate(e.blocks):
            holders.setdefault(b, []).append((j, toks, e.depth, f"entry@{e.depth}"))
    counts = Counter({b: len(h) for b, h in holders.items()})
    free = eng.blocks._free
    assert len(set(free)) == len(free) and 0 not in counts and 0 not in free
    for b in range(1, num_blocks):
        assert eng.blocks.holders(b) == counts[b], f"block {b}: refcount {eng.blocks.holders(b)}, holders {counts[b]}"
        assert (b in free) == (counts[b] == 0), f"block {b} free-list membership wrong"
    for b, hs in holders.items():
        assert len({j for j, *_ in hs}) == 1, f"block {b} held at different positions: {[(w, j) for j, *_, w in hs]}"
        spans = sorted((toks[j * bs:min((j + 1) * bs, written)] for j, toks, written, _ in hs), key=len)
        for short, long in zip(spans, spans[1:]):
            assert long[:len(short)] == short, f"holders of block {b} disagree on its tokens"
        for q in sch.running:  # blocks q writes into next
            if b in q.blocks and (q.blocks.index(b) + 1) * bs > q.computed:
                for _, _, written, who in hs:
                    if who != f"seq {q.seq_id}":
                        assert who.startswith("entry") and written <= q.computed, \
                            f"block {b}: seq {q.seq_id} writes into it while {who} holds it"
    _check_not_poisoned(eng, sch.running, entries)


def _check_not_poisoned(eng: LLMEngine, running, entries) -> None:
    pool = eng.pool
    live = [(q.slot, q.blocks, q.computed, f"seq {q.seq_id}") for q in running]
    live += [(e.slot, e.blocks, e.depth, f"entry@{e.depth}") for e in entries]
    for slot, blocks, written, who in live:
        for p in (*pool.kda_state.values(), *pool.conv_state.values()):
            assert not p[slot].isnan().any(), f"{who}: state slot {slot} is NaN"
        for store in pool.mla_latent.values():
            rows = store[torch.tensor(blocks, dtype=torch.long)].reshape(-1, store.shape[-1])[:written]
            assert not rows.isnan().any(), f"{who}: latents are NaN"


def assert_all_free(eng: LLMEngine) -> None:
    """After clearing the prefix cache, every slot and block is back on its free list, nothing is queued."""
    assert not eng.has_unfinished() and not eng.scheduler.has_work()
    eng.clear_prefix_cache()
    assert eng.slots.num_free == eng.slots.num_slots - 1
    assert eng.blocks.num_free == eng.blocks.num_blocks - 1
    assert all(eng.blocks.holders(b) == 0 for b in range(eng.blocks.num_blocks))


# ---- a model that checks the cache contract --------------------------------------------------------------------------
HASH_MOD = 1_000_003  # hashes live in fp32 pool entries: keep them below 2**24


def _roll(h: int, token: int) -> int:
    return (h * 257 + token + 1) % HASH_MOD


class CacheCheckingModel(torch.nn.Module):
    """Stands in for the model (fast, exact, no floating point) and checks what a step reads and writes.

    The "recurrent state" in a slot is a rolling hash of every token so far, their count and the last 3 tokens (the
    conv tail); the "latents" are each token's id and position. Each step continues each sequence from its slot (from
    zero when ``has_initial_state`` is False, whatever the slot holds), writes the latents, takes the snapshots asked
    for, and checks: the state read is not NaN and counts exactly the sequence's context; the latents read back over
    the block table are the context's tokens at their positions, and hash to the state's hash; no pad slot or block is
    touched; no two writes of the step land on the same slot or latent row. The next-token logits are a pseudo-random
    function of the hash, so any wrong state changes the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.config = KimiLinearConfig.from_preset("test")
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(1, 1)
        self.kda_layer = self.config.layer_types.index("kda")
        self.mla_layer = self.config.layer_types.index("mla")
        self.steps = 0

    def forward_step(self, input_ids: torch.Tensor, meta, pool) -> torch.Tensor:
        self.steps += 1
        state, conv = pool.kda_state[self.kda_layer], pool.conv_state[self.kda_layer]
        latent = pool.mla_latent[self.mla_layer].view(-1, pool.mla_latent[self.mla_layer].shape[-1])
        ids = input_ids.tolist()
        cu, slots = meta.cu_seqlens_host, meta.state_slots.tolist()
        has, table = meta.has_initial_state.tolist(), meta.block_table
        mapping, bs = meta.slot_mapping.tolist(), pool.block_size
        snaps = [(s.seq, s.length, s.slot) for s in meta.snapshots]
        assert all(n == 1 and c > 0 for n, c in zip(meta.query_lens[:meta.num_decodes], meta.context_lens)), \
            "a decode row is not a one-token continuation"
        written_slots = slots + [s for *_, s in snaps]
        assert 0 not in written_slots and len(set(written_slots)) == len(written_slots), \
            f"state writes collide or hit the pad slot: {written_slots}"
        assert len(set(mapping)) == len(mapping) and all(m >= bs for m in mapping), "latent writes collide / pad"
        hidden = torch.zeros(len(ids), 3, dtype=torch.float64)
        for n, slot in enumerate(slots):
            context = meta.context_lens[n]
            assert has[n] == (context > 0)
            if has[n]:
                h, length = state[slot, 0, 0, 0].item(), state[slot, 0, 0, 1].item()
                assert h == h, f"sequence {n} read a poisoned (NaN) state from slot {slot}"
                assert int(length) == context, f"slot {slot} holds the state after {int(length)} tokens, not {context}"
                h, tail = int(h), [int(x) for x in conv[slot, 0, :3].tolist()]
            else:
                h, tail = 0, [-1, -1, -1]
            history = self._history(latent, table[n], context, bs)
            expect = 0
            for t in history:
                expect = _roll(expect, t)
            assert expect == h, f"sequence {n}: the state does not belong to the cached tokens (context {context})"
            assert tail == ([-1, -1, -1] + history)[-3:], f"sequence {n}: conv tail {tail} is not the context's"
            new = ids[cu[n]:cu[n + 1]]
            for i, t in enumerate(new):
                latent[mapping[cu[n] + i]] = 0
                latent[mapping[cu[n] + i], :2] = torch.tensor([t, context + i], dtype=latent.dtype)
            rolled = [h]
            for t in new:
                rolled.append(_roll(rolled[-1], t))
            full_tail = [-1, -1, -1] + history + new
            for seq, length, snap_slot in snaps:
                if seq == n:
                    self._write(pool, snap_slot, rolled[length], context + length,
                                full_tail[:3 + context + length][-3:])
            self._write(pool, slot, rolled[-1], context + len(new), full_tail[-3:])
            if new:
                hidden[cu[n + 1] - 1] = torch.tensor([rolled[-1], context + len(new), 1.0], dtype=torch.float64)
        return hidden

    @staticmethod
    def _history(latent: torch.Tensor, row: torch.Tensor, length: int, bs: int) -> list[int]:
        if not length:
            return []
        blocks = row[: -(-length // bs)].long()
        rows = (blocks[:, None] * bs + torch.arange(bs)).reshape(-1)[:length]
        got = latent[rows, :2]
        assert not got.isnan().any(), "read a poisoned (NaN) latent"
        assert got[:, 1].tolist() == list(range(length)), "latents out of place (a block of another position)"
        return [int(x) for x in got[:, 0].tolist()]

    def _write(self, pool, slot: int, h: int, length: int, tail: list[int]) -> None:
        """Overwrite the whole slot, in every KDA layer, as the model does."""
        for p in (*pool.kda_state.values(), *pool.conv_state.values()):
            p[slot] = 0
        state, conv = pool.kda_state[self.kda_layer], pool.conv_state[self.kda_layer]
        state[slot, 0, 0, 0] = h
        state[slot, 0, 0, 1] = length
        conv[slot, 0, :3] = torch.tensor(tail, dtype=conv.dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        assert (hidden[:, 2] == 1).all(), "logits asked for a row that is not a sequence's last token"
        out = [torch.randn(self.config.vocab_size, generator=torch.Generator().manual_seed(int(h[0]) * 7 + 1)) * 4
               for h in hidden]
        return torch.stack(out)


class ScriptedModel(CacheCheckingModel):
    """The cache-checking stand-in whose greedy output, after a prompt of ``prompt_len`` tokens, is ``script`` (then
    ``script[-1]`` again and again): text-level tests with a real tokenizer's bytes, cache contract still checked."""

    def __init__(self, script: list[int], prompt_len: int) -> None:
        super().__init__()
        self.script, self.prompt_len = script, prompt_len

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(hidden), self.config.vocab_size)
        for r, h in enumerate(hidden):
            logits[r, self.script[min(int(h[1]) - self.prompt_len, len(self.script) - 1)]] = 10.0
        return logits
