"""Engine bugs the server work found, kept as regression tests."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from serving_helpers import chain_model

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.engine import EngineConfig, LLMEngine, RequestError, SamplingParams, SchedulerConfig
from kimi_linear.engine.async_engine import AsyncEngine

PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def test_the_engine_thread_survives_a_listener_whose_loop_is_closed():
    """A listener that raises (its event loop closed) is dropped and its request aborted; the loop goes on."""
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(KimiLinearConfig.from_preset("test")).eval()
    engine = LLMEngine(model, EngineConfig(SchedulerConfig(max_num_seqs=4), num_slots=8, num_blocks=32,
                                           block_size=16))
    runner = AsyncEngine(engine).start()
    closed = asyncio.new_event_loop()
    closed.close()
    engine.add_request([1, 2, 3], PARAMS, listener=lambda out: closed.call_soon_threadsafe(lambda: None))
    runner.abort("none")  # wakes the loop thread
    deadline = time.monotonic() + 10
    while engine.has_unfinished() and runner.running and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert runner.running, "the engine thread died"

        async def again():
            return [out async for out in runner.generate([4, 5, 6], PARAMS)]

        assert asyncio.run(asyncio.wait_for(again(), 30))[-1].finished
    finally:
        runner.shutdown(timeout=1.0)


def test_a_completion_that_ends_inside_a_character_keeps_it():
    """Ids held back for an unfinished UTF-8 character are flushed when the completion ends (as U+FFFD)."""
    from kimi_linear.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer.with_chat_markers()
    model = chain_model([65, 0xE2, 0x82, 257], default=257)  # "A" -> the first two bytes of "\u20ac" -> EOS
    engine = LLMEngine(model, EngineConfig(SchedulerConfig(max_num_seqs=2), num_slots=4, num_blocks=16,
                                           block_size=16), decode=tokenizer.decode, eos_token_ids=[257])
    engine.add_request([65], SamplingParams(temperature=0.0, max_tokens=8))
    text, ids = "", []
    while engine.has_unfinished():
        for out in engine.step():
            text += out.outputs[0].text if out.outputs else ""
            ids += out.outputs[0].token_ids if out.outputs else []
    assert ids == [0xE2, 0x82, 257]
    assert text == tokenizer.decode(ids) == "\ufffd"


@pytest.mark.parametrize("field", [{"seed": 2**64}, {"top_k": 2**63}])
def test_a_64_bit_overflow_is_refused_at_add_request(field):
    """Values that would overflow int64 in the step are refused when the request arrives, not inside the step."""
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(KimiLinearConfig.from_preset("test")).eval()
    engine = LLMEngine(model, EngineConfig(SchedulerConfig(max_num_seqs=4), num_slots=8, num_blocks=32,
                                           block_size=16))
    engine.add_request([1, 2, 3], PARAMS)  # an innocent bystander
    with pytest.raises(RequestError):
        engine.add_request([4, 5, 6], SamplingParams(max_tokens=2, **field))
