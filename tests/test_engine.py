"""The serving engine on the CPU (fp32, the `test` preset: 3 KDA + 1 MLA layer, MoE): equal to ``model.generate``,
prefix hits equal to misses, preemption, batch invariance, memory hygiene and bad input."""

from __future__ import annotations

import random

import pytest
import torch

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.engine import EngineConfig, LLMEngine, RequestError, SamplingParams, SchedulerConfig

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = KimiLinearForCausalLM(KimiLinearConfig.from_preset("test")).eval()
    with torch.no_grad():  # a non-trivial router bias
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return m


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine(model, *, slots=16, blocks=64, block_size=16, budget=256, max_seqs=8, caching=True, interval=0,
           poison=True) -> LLMEngine:
    config = EngineConfig(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                          enable_prefix_caching=caching, snapshot_interval=interval),
                          num_slots=slots, num_blocks=blocks, block_size=block_size, poison_freed=poison)
    return LLMEngine(model, config)


def reference(model, tokens: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([tokens]), n, eos_token_id=[])
    return out[0, len(tokens):].tolist()


def run(eng: LLMEngine, arrivals: dict[int, list[tuple[list[int], SamplingParams]]]) -> dict[str, list[list[int]]]:
    """Add requests at the given steps, step until all finish; returns each request's completions."""
    tokens: dict[str, dict[int, list[int]]] = {}
    order = []
    step = 0
    while step <= max(arrivals, default=0) or eng.has_unfinished():
        for p, params in arrivals.get(step, []):
            rid = eng.add_request(p, params)
            tokens[rid] = {}
            order.append(rid)
        for out in eng.step():
            for o in out.outputs:
                tokens[out.request_id].setdefault(o.index, []).extend(o.token_ids)
        step += 1
        assert step < 2000, "engine did not finish"
    return {rid: [tokens[rid][k] for k in sorted(tokens[rid])] for rid in order}


def assert_all_free(eng: LLMEngine) -> None:
    eng.clear_prefix_cache()
    assert eng.slots.num_free == eng.slots.num_slots - 1
    assert eng.blocks.num_free == eng.blocks.num_blocks - 1


def test_greedy_outputs_equal_generate_with_staggered_requests(model):
    lengths = [5, 70, 33, 130, 1, 64]
    prompts = [prompt(n, seed=i) for i, n in enumerate(lengths)]
    arrivals = {0: [(prompts[0], GREEDY), (prompts[1], GREEDY)], 2: [(prompts[2], GREEDY)],
                3: [(prompts[3], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))],
                7: [(prompts[4], GREEDY), (prompts[5], GREEDY)]}
    eng = engine(model, budget=96)  # chunked prefill: the 130-token prompt takes several steps
    out = run(eng, arrivals)
    expected = [reference(model, p, 3 if i == 3 else 8) for i, p in enumerate(prompts)]
    assert [o[0] for o in out.values()] == expected
    assert_all_free(eng)


@torch.no_grad()
def test_prefix_hits_equal_misses(model):
    """Hits at a 64-token boundary inside a prompt, at an exact prompt end that is not a multiple of 64, on a
    multi-turn continuation, for n > 1, after the request that made the snapshot was freed: same tokens as no cache,
    and the same logits as a full forward to fp32 rounding."""
    base = prompt(100, seed=1)
    miss = engine(model, caching=False)
    hit = engine(model, interval=64)
    cases = [
        base,  # snapshots at 64 and at its end (100)
        base + prompt(40, seed=2),  # extends: hit at 100 (a prompt end, not a multiple of 64)
        base[:64] + prompt(30, seed=3),  # branches after 64: hit at the interval snapshot
        base,  # the same prompt again: a full hit, sampled from the cached hidden state
    ]
    for tokens in cases:
        want = run(miss, {0: [(tokens, GREEDY)]})
        got = run(hit, {0: [(tokens, GREEDY)]})
        assert list(got.values()) == list(want.values())
    stats = hit.scheduler.prefix_cache.stats
    assert stats.state_hit_tokens == 100 + 64 + 100 and stats.state_hits == 3
    # multi-turn: the second turn's prompt is the first turn with its answer and a new message
    turn1 = run(hit, {0: [(base, GREEDY)]})
    answer = next(iter(turn1.values()))[0]
    turn2 = base + answer + prompt(20, seed=4)
    assert list(run(hit, {0: [(turn2, GREEDY)]}).values()) == list(run(miss, {0: [(turn2, GREEDY)]}).values())
    # n > 1 shares the prompt: every completion equals the single greedy one
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, n=3)
    fresh = prompt(77, seed=5)
    got = next(iter(run(hit, {0: [(fresh, params)]}).values()))
    assert got == [reference(model, fresh, 6)] * 3
    assert_all_free(hit)


def test_preemption_and_resume_equal_an_uninterrupted_run(model):
    prompts = [prompt(40 + 13 * i, seed=10 + i) for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    roomy = run(engine(model, blocks=128), {0: [(p, params) for p in prompts]})
    tight = engine(model, blocks=14)  # 13 usable blocks of 16 tokens: not all six fit at once
    cramped = run(tight, {0: [(p, params) for p in prompts]})
    assert list(cramped.values()) == list(roomy.values())
    assert tight.scheduler.num_preemptions > 0
    assert_all_free(tight)


def test_tokens_do_not_depend_on_what_else_runs(model):
    """Seeded sampling and greedy decoding give the same tokens alone and in a busy batch."""
    target = prompt(50, seed=20)
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = next(iter(run(engine(model), {0: [(target, params)]}).values()))
    busy_eng = engine(model)
    noise = [(prompt(30 + i, seed=30 + i), SamplingParams(temperature=1.0, max_tokens=10)) for i in range(4)]
    busy = run(busy_eng, {0: noise[:2], 1: [(target, params)], 3: noise[2:]})
    assert list(busy.values())[2] == alone


def test_freed_memory_is_never_read_and_all_returns(model):
    """Freed slots and blocks are NaN-filled (poison_freed): a live output that read them would turn NaN or change.
    Hundreds of requests through pools at capacity, aborts included, and every slot and block is free again."""
    rng = random.Random(0)
    eng = engine(model, slots=6, blocks=24, max_seqs=4, budget=128, interval=64)
    ids = []
    for i in range(200):
        params = SamplingParams(temperature=0.0 if i % 2 else 0.8, max_tokens=rng.randint(1, 6), seed=i)
        ids.append(eng.add_request(prompt(rng.randint(1, 90), seed=100 + i % 7 + rng.randint(0, 1)), params))
        if i % 9 == 4:
            eng.abort(ids[rng.randrange(len(ids))])
        if i % 3 == 0:
            eng.step()
    while eng.has_unfinished():
        eng.step()
    entries = eng.scheduler.prefix_cache.entries
    assert entries
    for e in entries:  # what the cache keeps was never poisoned
        assert all(not p[e.slot].isnan().any() for p in eng.pool.kda_state.values())
        for store in eng.pool.mla_latent.values():
            assert not store[e.blocks].reshape(-1, store.shape[-1])[:e.depth].isnan().any()
    # the cache's entries still hold valid states: a hit reproduces the uncached tokens
    check = prompt(80, seed=101)
    assert list(run(eng, {0: [(check, GREEDY)]}).values()) == list(
        run(engine(model, caching=False), {0: [(check, GREEDY)]}).values())
    assert_all_free(eng)


def test_bad_requests_get_clear_errors_and_the_engine_keeps_serving(model):
    eng = engine(model)
    eng.max_model_len = 200
    good = eng.add_request(prompt(10, seed=1), GREEDY)
    cases = [
        ([], SamplingParams(), "empty"),
        (prompt(200, seed=2), SamplingParams(), "model length"),
        (prompt(10, seed=3), SamplingParams(max_tokens=0), "max_tokens"),
        (prompt(10, seed=3), SamplingParams(max_tokens=195), "exceeds the model length"),
        (prompt(10, seed=3), SamplingParams(temperature=-1), "temperature"),
        (prompt(10, seed=3), SamplingParams(top_p=0), "top_p"),
        (prompt(10, seed=3), SamplingParams(logprobs=50), "logprobs"),
        ([1, 2, 320], SamplingParams(), r"token ids must be in \[0, 320\)"),
        ([1, -1], SamplingParams(), "token ids"),
        (prompt(10, seed=3), SamplingParams(stop=["x"]), "tokenizer"),
    ]
    for tokens, params, message in cases:
        with pytest.raises(RequestError, match=message):
            eng.add_request(tokens, params)
    tokens = []
    while eng.has_unfinished():
        for out in eng.step():
            assert out.request_id == good and out.error is None
            tokens += out.outputs[0].token_ids
    assert tokens == reference(model, prompt(10, seed=1), 8)


def text_engine(model) -> LLMEngine:
    from kimi_linear.tokenizer import ByteTokenizer

    config = EngineConfig(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=128), num_slots=12, num_blocks=40,
                          block_size=16)
    return LLMEngine(model, config, decode=ByteTokenizer().decode, eos_token_ids=[])


def completion(eng: LLMEngine, tokens: list[int], params: SamplingParams) -> list:
    """Every CompletionOutput of one request, in order."""
    eng.add_request(tokens, params)
    outs = []
    while eng.has_unfinished():
        for out in eng.step():
            outs += out.outputs
    return outs


def test_stop_strings_across_token_boundaries_are_cut(model):
    p = prompt(20, seed=40)
    free = completion(text_engine(model), p, SamplingParams(temperature=0.0, max_tokens=12))
    text = "".join(o.text for o in free)
    assert len(text) >= 6 and free[-1].finish_reason == "length"
    stop = text[3:6]  # spans tokens 3..5 (one byte each): matched across token boundaries
    outs = completion(text_engine(model), p, SamplingParams(temperature=0.0, max_tokens=12, stop=["zzz", stop]))
    assert "".join(o.text for o in outs) == text[:text.find(stop)]
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop
    # streamed pieces never contained a prefix of the stop string that later turned out to be one
    assert all(stop not in o.text for o in outs)


def test_stop_tokens_min_and_max_tokens_logprobs(model):
    p = prompt(15, seed=41)
    free = [t for o in completion(text_engine(model), p, SamplingParams(temperature=0.0, max_tokens=10))
            for t in o.token_ids]
    stop_id = free[4]
    outs = completion(text_engine(model), p, SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_id]))
    ids = [t for o in outs for t in o.token_ids]
    first = free.index(stop_id)
    assert ids == free[:first + 1] and outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop_id
    held = completion(text_engine(model), p, SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_id],
                                                            min_tokens=first + 2))
    held_ids = [t for o in held for t in o.token_ids]
    assert len(held_ids) > first + 1 and stop_id not in held_ids[:first + 2]
    lp = completion(text_engine(model), p, SamplingParams(temperature=0.0, max_tokens=3, logprobs=2))
    entries = [e for o in lp for e in o.logprobs]
    assert [e.token_id for e in entries] == free[:3]
    assert all(len(e.top) == 2 and e.top[0][0] == e.token_id and e.logprob <= 0 for e in entries)


def test_n_completions_are_seeded_and_distinct(model):
    p = prompt(30, seed=42)
    params = SamplingParams(temperature=1.0, max_tokens=8, n=3, seed=7, ignore_eos=True)
    first = next(iter(run(engine(model), {0: [(p, params)]}).values()))
    again = next(iter(run(engine(model, caching=False), {0: [(p, params)]}).values()))
    assert first == again and len(first) == 3 and len({tuple(c) for c in first}) > 1
