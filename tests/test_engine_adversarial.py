"""Trying to break the serving engine (CPU, fp32, the `test` preset; or, where only bookkeeping is at stake, the
exact cache-checking stand-in model of engine_checks.py). Every run checks the scheduler / prefix-cache /
allocator invariants after each step (engine_checks.check_invariants).

- prefix hits at every kind of snapshot (interval, branch point, prompt end, finished request, preemption, abort,
  mid-prefill), at depths on and off the block size, with concurrent sharers, equal a cache-less engine to the
  logprob;
- chunked prefill stays on the 64-token grid of where the run began, and its results do not depend on the budget;
- a request's tokens do not depend on what else runs, when it arrives, or whether it was preempted;
- new sequences start from zero state whatever the pools hold (NaN everywhere, pad slot and block included);
- stop strings / tokens, min / max tokens, ignore_eos, logprobs, text at a cut character;
- aborts in every state, a failed step, a client that vanished without aborting;
- the static-batch path (left padding, early finishers) equals per-sequence generation;
- the metadata producers refuse what the layers cannot serve.

The tests under "bugs found in this review" reproduced bugs this review found; they are regression tests now.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from engine_checks import (
    CacheCheckingModel,
    Result,
    ScriptedModel,
    assert_all_free,
    check_invariants,
    drive,
    greedy,
    make_engine,
    make_model,
    prompt,
    run_one,
    watch_plans,
)

from kimi_linear import KimiLinearConfig
from kimi_linear.cache import HybridCache
from kimi_linear.engine import RequestError, SamplingParams
from kimi_linear.engine.async_engine import AsyncEngine
from kimi_linear.engine.request import Detokenizer
from kimi_linear.step import Snapshot, StepMetadata
from kimi_linear.tokenizer import ByteTokenizer

LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def stub():
    return CacheCheckingModel()


def char_decode(ids: list[int]) -> str:
    """One printable character per token (never a partial UTF-8 sequence): stop-string logic without byte issues."""
    return "".join(chr(0x4E00 + i) for i in ids)


def reference(model, requests: list[tuple[list[int], SamplingParams]]) -> list[Result]:
    """The same requests through a roomy engine without prefix caching (all at once)."""
    eng = make_engine(model, caching=False, slots=64, blocks=600, budget=8192, max_seqs=48)
    return drive(eng, {0: requests}, check=False)


def assert_same(got: Result, want: Result, what: str = "") -> None:
    """Same tokens for every completion, and the same logprobs (sampled and top alternatives) to fp32 rounding."""
    assert got.completions == want.completions, what
    for k, lps in want.logprobs.items():
        assert len(got.logprobs[k]) == len(lps), what
        for a, b in zip(got.logprobs[k], lps):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < LOGPROB_ATOL, what
            assert [t for t, _ in a.top] == [t for t, _ in b.top], what
            assert max(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top)) < LOGPROB_ATOL, what


# ---- exactness of prefix hits ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [16, 7])
def test_every_snapshot_kind_is_an_exact_hit(model, block_size):
    """Hits at an interval snapshot (128), a branch-point snapshot (192, taken because two prompts left the tree at
    200), a prompt end off the 64 grid (260, with its hidden state: a full hit needs no forward), a finished
    request's state (262: prompt + 2 of its 3 tokens), a prompt end that equals an interval snapshot without a
    hidden state (clamped to 192, then a full hit once that prompt ran), and a 3-token extension of a snapshot (the
    conv tail reaches into the cached context). Block size 16 puts some depths on a block boundary and some not;
    7 puts none there (copy-on-write of the partial last block). Each hit depth is asserted (no silent miss), the
    tokens computed are exactly those after the hit, and every output equals a cache-less engine's, logprobs
    included."""
    a = prompt(260, seed=1)
    params = greedy(3, logprobs=3)
    eng = make_engine(model, slots=24, blocks=400, block_size=block_size, budget=1024, interval=128)
    first = run_one(eng, a, params)
    cases = [  # (tokens, expected cached prompt tokens)
        (a[:200] + prompt(20, seed=2), 128),  # interval snapshot; leaving the tree at 200 marks a branch point
        (a[:200] + prompt(10, seed=3), 192),  # the branch snapshot (200 rounded down to the grid)
        (a + first.tokens[0][:2] + prompt(10, seed=4), 262),  # the finished request's state
        (a, 260),  # full hit: the prompt's end state and hidden
        (a[:256], 192),  # the interval snapshot at 256 has no hidden state: clamped to the branch snapshot
        (a[:256], 256),  # ... until a prompt ended there
        (a[:256] + prompt(3, seed=5), 256),  # 3 new tokens: the conv tail comes partly from the cache
    ]
    got = []
    for tokens, depth in cases:
        before = eng.stats.computed_tokens
        r = run_one(eng, tokens, params)
        assert r.cached == depth, (len(tokens), r.cached, depth)
        assert eng.stats.computed_tokens - before == len(tokens) - depth + 2  # prefill after the hit + 2 decodes
        got.append(r)
    want = reference(model, [(a, params), *[(t, params) for t, _ in cases]])
    for i, (g, w) in enumerate(zip([first, *got], want)):
        assert_same(g, w, f"case {i}")
    assert_all_free(eng)


def test_preempted_and_aborted_states_are_exact_hits(model):
    """States donated by preemption (the newest sequence, out of blocks, steps aside and later resumes from the state
    it left: a hit deeper than its prompt), by an abort in the middle of a chunked prefill (the state after 128 of
    200 prompt tokens) and by an abort while decoding are reused, and what resumes from them equals a cache-less
    engine: greedy and seeded sampling, logprobs included."""
    a, b = prompt(30, seed=10), prompt(12, seed=11)
    sampled = SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=24, ignore_eos=True, logprobs=2)
    tight = make_engine(model, slots=8, blocks=12, block_size=8, budget=256)  # 11 blocks of 8 for 54 + 36 tokens
    got = drive(tight, {0: [(a, greedy(24, logprobs=2))], 1: [(b, sampled)]})
    assert tight.scheduler.num_preemptions >= 1
    assert tight.scheduler.prefix_cache.stats.state_hit_tokens > len(b), "no resumption from a donated state"
    for g, w in zip(got, reference(model, [(a, greedy(24, logprobs=2)), (b, sampled)])):
        assert_same(g, w)

    mid = prompt(200, seed=12)
    eng = make_engine(model, slots=12, blocks=80, block_size=16, budget=64)
    aborted = drive(eng, {0: [(mid, greedy(4))]}, aborts={2: [0]})[0]  # after two 64-token pieces
    assert aborted.finish == {0: "abort"} and aborted.tokens in ({}, {0: []})
    resumed = run_one(eng, mid + prompt(10, seed=13), greedy(3, logprobs=2))
    assert resumed.cached == 128
    decoding = drive(eng, {0: [(prompt(40, seed=14), greedy(20))]}, aborts={4: [0]})[0]
    out = decoding.tokens[0]
    assert decoding.finish == {0: "abort"} and 0 < len(out) < 20
    turn = prompt(40, seed=14) + out + prompt(5, seed=15)
    continued = run_one(eng, turn, greedy(3, logprobs=2))
    assert continued.cached == 40 + len(out) - 1  # the last streamed token was never fed back
    want = reference(model, [(mid + prompt(10, seed=13), greedy(3, logprobs=2)), (turn, greedy(3, logprobs=2))])
    assert_same(resumed, want[0])
    assert_same(continued, want[1])
    assert_all_free(eng)
    assert_all_free(tight)


def test_sharers_running_together_never_see_each_others_writes(model):
    """A 100-token prompt (not a multiple of the block size 16) keeps decoding, writing into the partial block its
    cache entry shares, while three requests that hit that entry run beside it: a full hit (the same prompt, n = 2,
    seeded sampling), and two extensions that diverge at once. All five completions equal a cache-less engine."""
    base = prompt(100, seed=20)
    ext1, ext2 = base + prompt(20, seed=21), base + prompt(33, seed=22)
    sampled = SamplingParams(temperature=0.8, seed=5, n=2, max_tokens=6, ignore_eos=True, logprobs=1)
    eng = make_engine(model, slots=16, blocks=60, block_size=16, budget=512)
    got = drive(eng, {0: [(base, greedy(10, logprobs=1))],
                      2: [(base, sampled), (ext1, greedy(6, logprobs=1)), (ext2, greedy(6, logprobs=1))]})
    assert [r.cached for r in got] == [0, 100, 100, 100]
    assert got[1].completions[0] != got[1].completions[1]  # each completion has its own seeded stream
    want = reference(model, [(base, greedy(10, logprobs=1)), (base, sampled), (ext1, greedy(6, logprobs=1)),
                             (ext2, greedy(6, logprobs=1))])
    for g, w in zip(got, want):
        assert_same(g, w)
    assert_all_free(eng)


# ---- chunked prefill and batch invariance ---------------------------------------------------------------------------
def test_chunked_prefill_stays_on_its_grid_whatever_the_budget(model):
    """With budgets of 64, 96 and 1000 tokens, a 200-token prompt beside a 40-token one (so odd budget remainders
    occur), then a prompt hitting a cached prefix at 100 (its grid starts at 100, not 0): every plan passes
    watch_plans (pieces that do not finish their tokens end 64 k tokens after where their run began, snapshot offsets
    are multiples of 64 or the piece's end, no step exceeds the budget), a run did start at 100, and tokens and
    logprobs are the same for every budget."""
    long, short = prompt(200, seed=30), prompt(40, seed=31)
    hit = long[:100]
    outputs = []
    for budget in (64, 96, 1000):
        eng = make_engine(model, slots=16, blocks=80, block_size=16, budget=budget, interval=128)
        plans = watch_plans(eng)
        first = drive(eng, {0: [(long, greedy(2, logprobs=2)), (short, greedy(2, logprobs=2))]})
        run_one(eng, hit, greedy(1))  # a cached prompt end at 100
        second = run_one(eng, hit + prompt(120, seed=32), greedy(2, logprobs=2))
        assert second.cached == 100
        pieces = [p for step in plans for p in step]
        assert any(origin == 100 for _, _, origin, _, _ in pieces)
        outputs.append([*first, second])
    for other in outputs[1:]:
        for g, w in zip(other, outputs[0]):
            assert_same(g, w)


def test_tokens_do_not_depend_on_company_arrival_or_preemption(model):
    """One greedy and one seeded-sampling request give the same tokens alone; in a crowd admitted with them; arriving
    at step 2 while a long prompt is being chunked (budget 96); and in a pool so small that sequences get
    preempted."""
    target = prompt(24, seed=40)
    pair = [(target, greedy(10)),
            (target[:12] + prompt(10, seed=41), SamplingParams(temperature=0.9, top_k=40, seed=7, max_tokens=10,
                                                               ignore_eos=True))]
    crowd = [(prompt(10 + 5 * i, seed=42 + i), SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True))
             for i in range(3)]
    alone = [r.completions for r in drive(make_engine(model), {0: pair})]
    together = drive(make_engine(model), {0: crowd[:2] + pair + crowd[2:]})
    assert [r.completions for r in together[2:4]] == alone
    late = drive(make_engine(model, budget=96), {0: [(prompt(200, seed=50), greedy(2))] + crowd[:2], 2: pair})
    assert [r.completions for r in late[3:]] == alone
    tight = make_engine(model, blocks=12, block_size=8, slots=8, max_seqs=6)
    squeezed = drive(tight, {0: crowd, 1: pair})
    assert tight.scheduler.num_preemptions > 0
    assert [r.completions for r in squeezed[3:]] == alone
    assert_all_free(tight)


# ---- memory hygiene -----------------------------------------------------------------------------------------------
def test_new_sequences_start_from_zero_whatever_the_pools_hold(model):
    """Every slot and block, the padding slot 0 and block 0 included, is NaN before the first request: outputs are
    still finite and equal a clean engine's (a new sequence's state is chosen, not multiplied, and nothing reads
    padding or unwritten latents)."""
    eng = make_engine(model, slots=6, blocks=40, block_size=16, budget=64)
    for pool in (*eng.pool.kda_state.values(), *eng.pool.conv_state.values(), *eng.pool.mla_latent.values()):
        pool.fill_(float("nan"))
    requests = [(prompt(n, seed=60 + n), greedy(5, logprobs=1)) for n in (1, 5, 70, 130)]
    got = drive(eng, {0: requests})
    for g, w in zip(got, reference(model, requests)):
        assert_same(g, w)


# ---- the static batch -----------------------------------------------------------------------------------------------
def test_static_batch_with_left_padding_and_early_finishers(model):
    """``model.generate`` on a left-padded batch whose sequences meet EOS at different steps equals each sequence
    generated alone: the same tokens up to and including its EOS, padding after it."""
    prompts = [prompt(n, seed=60 + n) for n in (3, 17, 40, 9)]
    alone = [model.generate(torch.tensor([p]), 12, eos_token_id=[])[0, len(p):].tolist() for p in prompts]
    eos = [alone[0][2], alone[1][4], alone[2][3]]  # ends sequences at different steps; the last one runs on
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, 12, eos_token_id=eos, attention_mask=mask)[:, width:].tolist()
    pad = model.config.pad_token_id
    for row, free in zip(out, alone):
        end = next((i + 1 for i, t in enumerate(free) if t in eos), len(free))
        assert row[:end] == free[:end] and all(t == pad for t in row[end:]), (row, free)


# ---- stops, lengths, logprobs ---------------------------------------------------------------------------------------
def test_stop_strings_are_held_back_cut_and_never_streamed(model):
    """Several stop strings: the first one to be completed wins, even when another, longer one began earlier in the
    text; text that could still begin a stop string is never streamed and then taken back; a stop string that
    occurs in the prompt does not count; finish_reason / stop_reason say which stop ended the output."""
    p = prompt(20, seed=70)
    eng = make_engine(model, decode=char_decode, eos=[])
    free = run_one(eng, p, greedy(16))
    text = free.text[0]
    assert len(text) == 16 and free.finish == {0: "length"}
    late, early = text[3:9], text[4:6]  # late begins first but is completed after early
    outs = []
    eng.add_request(p, SamplingParams(temperature=0.0, max_tokens=16, stop=[late, early, char_decode(p[:2])]))
    while eng.has_unfinished():
        outs += [o for out in eng.step() for o in out.outputs]
    assert "".join(o.text for o in outs) == text[:4]
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == early
    streamed = ""
    for o in outs:
        streamed += o.text
        assert text.startswith(streamed) and len(streamed) <= 4  # nothing streamed was cut later
    assert_all_free(eng)


def test_stop_strings_over_multibyte_characters_with_the_byte_tokenizer():
    """With the byte tokenizer, output "aé€bcd" arrives one byte-token at a time: a stop string that begins inside
    a multi-byte character's bytes ("€b": 4 tokens) or is one ("é") cuts the text right before it; no streamed piece
    ever holds a broken character or text that is later taken back."""
    tok = ByteTokenizer()
    script = tok.encode("aé€bcd")
    for stops, expected in ((["€b"], "aé"), (["zz", "é"], "a"), (["bcd"], "aé€")):
        eng = make_engine(ScriptedModel(script, 5), decode=tok.decode, eos=[])
        eng.add_request(prompt(5, seed=74), SamplingParams(temperature=0.0, max_tokens=len(script), stop=stops))
        pieces = []
        while eng.has_unfinished():
            pieces += [o for out in eng.step() for o in out.outputs]
        assert "".join(o.text for o in pieces) == expected and pieces[-1].finish_reason == "stop"
        assert all("\ufffd" not in o.text for o in pieces)
        assert_all_free(eng)


def test_eos_ignore_eos_min_and_max_tokens(model):
    """EOS (the engine's) ends the output on the EOS token itself, which is not in the text; ignore_eos runs to
    max_tokens; min_tokens holds EOS back exactly that many tokens; max_tokens is exact."""
    p = prompt(25, seed=71)
    free = run_one(make_engine(model, decode=char_decode, eos=[]), p, greedy(12)).tokens[0]
    eos = free[3]
    k = free.index(eos)
    eng = make_engine(model, decode=char_decode, eos=[eos])
    stopped = run_one(eng, p, SamplingParams(temperature=0.0, max_tokens=12))
    assert stopped.tokens[0] == free[:k + 1] and stopped.finish == {0: "stop"}
    assert stopped.text[0] == char_decode(free[:k])
    assert run_one(eng, p, greedy(12)).tokens[0] == free
    held = run_one(eng, p, SamplingParams(temperature=0.0, max_tokens=12, min_tokens=k + 1)).tokens[0]
    assert held[:k] == free[:k] and eos not in held[:k + 1]
    for n in (1, 2, 7):
        assert len(run_one(eng, p, greedy(n)).tokens[0]) == n


def test_logprobs_are_the_models_and_shaped_as_asked(model):
    """logprobs = k gives one entry per token with k alternatives, best first, the sampled token's log-probability
    from the raw model distribution (the first one equal to a plain forward's log_softmax); logprobs = 0 gives no
    alternatives; None gives no logprobs at all."""
    p = prompt(33, seed=72)
    eng = make_engine(model)
    with torch.no_grad():
        first = model(torch.tensor([p])).logits[0, -1].log_softmax(-1)
    for k in (0, 1, 5):
        r = run_one(eng, p, SamplingParams(temperature=0.7, seed=3, max_tokens=4, logprobs=k, ignore_eos=True))
        lps = r.logprobs[0]
        assert len(lps) == 4 and [e.token_id for e in lps] == r.tokens[0]
        for e in lps:
            assert len(e.top) == k and all(a[1] >= b[1] for a, b in zip(e.top, e.top[1:]))
            assert e.logprob <= 0 and (not k or e.logprob <= e.top[0][1] + 1e-6)
        assert abs(lps[0].logprob - first[lps[0].token_id].item()) < 1e-4
        if k:
            assert lps[0].top[0][0] == int(first.argmax())
    assert run_one(eng, p, greedy(3)).logprobs == {0: []}


def test_detokenizer_never_splits_a_character():
    """UTF-8 characters of 2, 3 and 4 bytes fed one byte-token at a time come out whole, never as U+FFFD."""
    tok = ByteTokenizer()
    text = "aé€😀b"
    d = Detokenizer(tok.decode)
    pieces = [d.add(t) for t in tok.encode(text)]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert pieces == ["a", "", "é", "", "", "€", "", "", "", "😀", "b"]


def test_final_text_is_the_decoding_of_all_output_tokens(model):
    """A completion cut by max_tokens inside an unfinished UTF-8 character still ends with it (as U+FFFD): its text
    is the decoding of all its token ids. (Regression for the held-back bytes dropped before f9eb427.)"""
    tok = ByteTokenizer()
    eng = make_engine(model, decode=tok.decode, eos=[])
    p = prompt(20, seed=500)
    ids = run_one(eng, p, greedy(12)).tokens[0]
    cut = next(k for k in range(1, 13) if tok.decode(ids[:k]).endswith("\ufffd"))
    r = run_one(eng, p, greedy(cut))
    assert r.text[0] == tok.decode(ids[:cut])


# ---- aborts, failures, vanished clients (bookkeeping only: the exact stand-in model) -------------------------------
def test_abort_in_every_state(stub):
    """Abort a request waiting (max_num_seqs = 1), one in the middle of its chunked prefill, one decoding, one in the
    same step it was added, one already finished and an unknown id: each aborted request ends once, with
    finish_reason "abort" and no token after the abort; the others are untouched; everything is freed."""
    eng = make_engine(stub, max_seqs=1, budget=64)
    ps = [prompt(150, seed=80), prompt(10, seed=81), prompt(10, seed=82), prompt(10, seed=83)]
    arrivals = {0: [(ps[0], greedy(5)), (ps[1], greedy(5))], 1: [(ps[2], greedy(5))], 6: [(ps[3], greedy(5))]}
    got = drive(eng, arrivals, aborts={1: [0, 1], 6: [3], 7: [0]})  # 0: mid-prefill, 1: waiting, 3: same step
    eng.abort("no-such-request")
    assert [r.finish for r in got] == [{0: "abort"}, {0: "abort"}, {0: "length"}, {0: "abort"}]
    assert [len(r.tokens.get(0, [])) for r in got] == [0, 0, 5, 0] and all(r.finished for r in got)
    assert got[2].completions == reference(stub, [(ps[2], greedy(5))])[0].completions
    eng.step()  # the late abort of a finished request and the unknown id change nothing
    assert not eng.has_unfinished()
    assert_all_free(eng)


def test_abort_a_request_with_several_completions(stub):
    """Aborting an n = 3 request after its completions started ends every one of them (finish_reason "abort"),
    frees everything, and a request running beside it is unaffected."""
    eng = make_engine(stub)
    params = SamplingParams(temperature=1.0, seed=4, n=3, max_tokens=30, ignore_eos=True)
    got = drive(eng, {0: [(prompt(40, seed=84), params), (prompt(12, seed=85), greedy(12))]}, aborts={4: [0]})
    assert got[0].finish == {0: "abort", 1: "abort", 2: "abort"}
    assert all(0 < len(t) < 30 for t in got[0].completions)
    assert got[1].completions == reference(stub, [(prompt(12, seed=85), greedy(12))])[0].completions
    assert_all_free(eng)


def test_a_failed_step_leaves_nothing_behind(stub, monkeypatch):
    """A forward that raises in a step full of work (a full hit, a partial-block hit, a fresh prompt taking
    snapshots, a decode): after fail_all every request has ended, the invariants hold, every slot and block comes
    back, and the engine then serves the same prompts exactly."""
    eng = make_engine(stub, slots=10, blocks=40, block_size=16, budget=512, interval=64)
    base = prompt(150, seed=90)
    run_one(eng, base, greedy(2))
    eng.add_request(prompt(30, seed=91), greedy(10))
    eng.step()
    eng.step()
    requests = [(base, greedy(3)), (base[:100] + prompt(40, seed=92), greedy(3)), (prompt(140, seed=93), greedy(3))]
    for tokens, params in requests:
        eng.add_request(tokens, params)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    with monkeypatch.context() as m:
        m.setattr(stub, "forward_step", boom)
        with pytest.raises(RuntimeError, match="boom"):
            eng.step()
    eng.fail_all("internal error")
    check_invariants(eng)
    assert_all_free(eng)
    got = drive(eng, {0: requests})
    assert [r.completions for r in got] == [r.completions for r in reference(stub, requests)]


def test_a_consumer_whose_loop_closed_does_not_stop_the_engine(stub):
    """A client that stops iterating its stream and whose event loop is then closed, without aborting: the engine
    drops it (its request ends) and goes on serving others. (Regression: before f9eb427 the closed loop made every
    publish raise, fail_all raised again inside AsyncEngine._run, and the engine thread died.)"""
    runner = AsyncEngine(make_engine(stub)).start()
    stream = runner.generate(prompt(20, seed=1), greedy(200))
    try:
        gone = asyncio.new_event_loop()
        gone.run_until_complete(stream.__anext__())
        gone.close()  # the consumer vanishes without closing its stream
        deadline = time.monotonic() + 10
        while runner.running and runner.engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert runner.running, f"engine thread died: {runner.last_error!r}"

        async def other():
            return [t async for out in runner.generate(prompt(8, seed=2), greedy(3)) for o in out.outputs
                    for t in o.token_ids]

        assert len(asyncio.run(asyncio.wait_for(other(), 10))) == 3
    finally:
        asyncio.run(stream.aclose())
        runner.shutdown(1)


# ---- bugs found in this review (fixed; regression tests) ---------------------------------------------------------
def test_duplicate_request_id_is_refused_or_both_are_served(stub):
    """Two requests with one id: either the second is refused, or both are served in full."""
    eng = make_engine(stub)
    eng.add_request(prompt(5, seed=1), greedy(4), request_id="same")
    try:
        eng.add_request(prompt(6, seed=2), greedy(8), request_id="same")
    except RequestError:
        return
    streamed = 0
    while eng.has_unfinished():
        streamed += sum(len(o.token_ids) for out in eng.step() for o in out.outputs)
    assert streamed == 4 + 8


def test_a_request_aborted_twice_in_one_step_ends_once(stub):
    """Abort one request twice before the next step: that step reports it, finished, once."""
    eng = make_engine(stub)
    rid = eng.add_request(prompt(10, seed=1), greedy(20))
    eng.step()
    eng.abort(rid)
    eng.abort(rid)
    finals = [out for out in eng.step() if out.request_id == rid]
    assert len(finals) == 1 and finals[0].finished


def test_a_prefix_hit_is_served_with_one_state_slot(stub):
    """An engine with one usable state slot serves a request that extends a finished one (whose cached state holds
    that slot). Refusing such a pool up front would be a fix too."""
    try:
        eng = make_engine(stub, slots=2, max_seqs=1)
    except ValueError:
        return
    first = prompt(40, seed=1)
    run_one(eng, first, greedy(1))  # its state (40 tokens) becomes the cache entry holding the only slot
    eng.add_request(first + prompt(10, seed=2), greedy(3))
    for _ in range(20):
        eng.step()
    assert not eng.has_unfinished()


def test_a_near_capacity_prompt_after_a_partial_block_hit_is_served(stub):
    """A request that fits max_model_len is served even when its prefix hit ends inside a block (so admission needs a
    private copy of that block while the entry still holds the original)."""
    eng = make_engine(stub, slots=8, blocks=9, block_size=16)  # 8 blocks of 16: max_model_len 128
    first = prompt(100, seed=1)
    run_one(eng, first, greedy(1))  # cache entry at 100: 6 full blocks and a partial one
    try:
        eng.add_request(first + prompt(27, seed=2), greedy(1))  # 127 + 1 tokens = max_model_len
    except RequestError:  # a max_model_len that leaves room for the copy would be a fix too
        return
    for _ in range(20):
        eng.step()
    assert not eng.has_unfinished()


def test_stop_given_as_one_string_is_refused_or_matched_whole(stub):
    """stop = "xy" (a str, as the OpenAI field allows) is either refused or matched as one stop string, never as the
    characters "x" and "y"."""
    eng = make_engine(stub, decode=char_decode, eos=[])
    p = prompt(12, seed=3)
    text = run_one(eng, p, greedy(10)).text[0]
    stop = text[6] + "\u2603"  # never in the output as a whole
    try:
        r = run_one(eng, p, SamplingParams(temperature=0.0, max_tokens=10, stop=stop))
    except RequestError:
        return
    assert r.text[0] == text


def test_min_tokens_also_holds_back_stop_strings(stub):
    """With min_tokens = 6, a stop string that appears in the second token does not end the output (vLLM skips all
    stop checks before min_tokens)."""
    eng = make_engine(stub, decode=char_decode, eos=[])
    p = prompt(12, seed=4)
    text = run_one(eng, p, greedy(10)).text[0]
    r = run_one(eng, p, SamplingParams(temperature=0.0, max_tokens=10, min_tokens=6, stop=[text[1]]))
    assert len(r.tokens[0]) >= 6


# ---- the metadata producers -----------------------------------------------------------------------------------------
def build(query_lens, context_lens=None, **kw):
    kw.setdefault("block_size", 8)
    n = len(query_lens)
    kw.setdefault("state_slots", list(range(1, n + 1)))
    kw.setdefault("block_tables", [list(range(1 + 10 * i, 11 + 10 * i)) for i in range(n)])
    return StepMetadata.build(query_lens, context_lens, device="cpu", **kw)


@pytest.mark.parametrize("case, message", [
    (dict(query_lens=[1, 5], context_lens=[0, 3], num_decodes=1), "decode rows"),
    (dict(query_lens=[5], num_decodes=2), "num_decodes"),
    (dict(query_lens=[5, -1]), "lengths must be >= 0"),
    (dict(query_lens=[5], context_lens=[1, 2]), "context_lens has 2"),
    (dict(query_lens=[5, 5], state_slots=[1]), "one state slot and one block table"),
    (dict(query_lens=[5], block_size=0), "block_size"),
    (dict(query_lens=[5], context_lens=[80]), "block table has only"),
    (dict(query_lens=[1, 70], context_lens=[4, 0], num_decodes=1, snapshots=[Snapshot(0, 1, 9)]),
     "only prefill sequences"),
    (dict(query_lens=[70], snapshots=[Snapshot(1, 64, 9)]), "only prefill sequences"),
    (dict(query_lens=[70], snapshots=[Snapshot(0, 0, 9)]), "multiple of 64"),
    (dict(query_lens=[70], snapshots=[Snapshot(0, 71, 9)]), "multiple of 64"),
    (dict(query_lens=[70], snapshots=[Snapshot(0, 128, 9)]), "multiple of 64"),
    (dict(query_lens=[5], batch_shape=(2, 3)), "batch_shape"),
])
def test_step_metadata_refuses_malformed_steps(case, message):
    """Each malformed step is refused by StepMetadata.build with a message naming the problem."""
    with pytest.raises(ValueError, match=message):
        build(**case)


@pytest.mark.parametrize("case", [
    pytest.param(dict(query_lens=[3, 3], state_slots=[1, 1]), id="two-sequences-one-state-slot"),
    pytest.param(dict(query_lens=[3, 3], block_tables=[[1], [1]]), id="two-sequences-write-one-latent-row"),
    pytest.param(dict(query_lens=[70], snapshots=[Snapshot(0, 64, 1)]), id="snapshot-into-the-sequences-own-slot"),
    pytest.param(dict(query_lens=[70, 70], snapshots=[Snapshot(0, 64, 5), Snapshot(1, 64, 5)]),
                 id="two-snapshots-one-slot"),
    pytest.param(dict(query_lens=[3], state_slots=[-1]), id="negative-state-slot"),
    pytest.param(dict(query_lens=[3], block_tables=[[-2]]), id="negative-block"),
])
def test_step_metadata_refuses_colliding_or_negative_targets(case):
    """Two writes of one step to one state slot or latent row, and negative slot or block ids, are refused where the
    step is made."""
    with pytest.raises(ValueError):
        build(**case)


def test_static_cache_refuses_steps_past_its_length():
    """HybridCache.step refuses a step that would take a sequence past max_length, and a refused step changes no
    length."""
    cache = HybridCache(KimiLinearConfig.from_preset("test"), 2, 20, device="cpu", dtype=torch.float32, block_size=8)
    cache.step([0, 1], [20, 4])
    with pytest.raises(ValueError, match="would exceed"):
        cache.step([1], [17])
    assert cache.lengths == [20, 4]  # a refused step changes nothing
    with pytest.raises(ValueError, match="would exceed"):
        cache.step([0], [1])


@pytest.mark.parametrize("rows, counts", [pytest.param([-1], [3], id="negative-row-uses-pad-slot-0"),
                                          pytest.param([0, 0], [3, 3], id="one-row-twice")])
def test_static_cache_refuses_bad_rows(rows, counts):
    """HybridCache.step refuses rows outside 0..B-1 and a row named twice in one step."""
    cache = HybridCache(KimiLinearConfig.from_preset("test"), 2, 20, device="cpu", dtype=torch.float32, block_size=8)
    with pytest.raises((ValueError, IndexError)):
        cache.step(rows, counts)
