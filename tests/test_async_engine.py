"""The engine's background loop: concurrent streams, early disconnects, a failing step, shutdown."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.engine import EngineConfig, LLMEngine, RequestError, SamplingParams, SchedulerConfig
from kimi_linear.engine.async_engine import AsyncEngine

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return KimiLinearForCausalLM(KimiLinearConfig.from_preset("test")).eval()


def make_engine(model) -> LLMEngine:
    return LLMEngine(model, EngineConfig(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=128), num_slots=12,
                                         num_blocks=40, block_size=16, poison_freed=True))


def prompts(k: int) -> list[list[int]]:
    return [torch.randint(0, 256, (10 + 7 * i,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(k)]


async def collect(engine: AsyncEngine, prompt: list[int], params=PARAMS) -> list[int]:
    tokens = []
    async for out in engine.generate(prompt, params):
        tokens += out.outputs[0].token_ids if out.outputs else []
    return tokens


def test_concurrent_streams_match_the_synchronous_engine(model):
    ps = prompts(6)
    expected = [c[0] for c in make_engine(model).generate(ps, PARAMS)]
    runner = AsyncEngine(make_engine(model)).start()

    async def main():
        return await asyncio.gather(*(collect(runner, p) for p in ps))

    try:
        assert asyncio.run(main()) == expected
    finally:
        runner.shutdown()
    assert not runner.running


def test_a_consumer_that_leaves_aborts_its_request(model):
    engine = make_engine(model)
    runner = AsyncEngine(engine).start()

    async def main():
        stream = runner.generate(prompts(1)[0], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
        async for _ in stream:
            break  # the client went away
        await stream.aclose()
        for _ in range(200):
            if not engine.has_unfinished():
                return
            await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
        assert not engine.has_unfinished() and engine.num_running == 0
    finally:
        runner.shutdown()
    engine.clear_prefix_cache()
    assert engine.slots.num_free == engine.slots.num_slots - 1
    assert engine.blocks.num_free == engine.blocks.num_blocks - 1


def test_a_failing_step_ends_its_requests_and_the_loop_goes_on(model, monkeypatch):
    engine = make_engine(model)
    runner = AsyncEngine(engine).start()
    original = model.forward_step
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward_step", flaky)

    async def main():
        outs = [out async for out in runner.generate(prompts(1)[0], PARAMS)]
        assert outs[-1].finished and "boom" in outs[-1].error
        return await collect(runner, prompts(2)[1])

    try:
        assert len(asyncio.run(main())) == 6
    finally:
        runner.shutdown()
    assert isinstance(runner.last_error, RuntimeError)


def test_bad_request_raises_at_once(model):
    runner = AsyncEngine(make_engine(model)).start()

    async def main():
        with pytest.raises(RequestError, match="empty"):
            async for _ in runner.generate([], PARAMS):
                pass

    try:
        asyncio.run(main())
    finally:
        runner.shutdown()
