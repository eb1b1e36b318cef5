"""Tool calls end to end: a model whose weights force a tool-call token sequence, through the server and the
``openai`` client's ``tool_calls``, streaming and not, for each ``tool_choice``, and malformed calls as content."""

from __future__ import annotations

import json

import pytest
from serving_helpers import MARKERS, LiveServer, chain_model, text_ids

MID, SB, SE = MARKERS["<|im_middle|>"], MARKERS["<|tool_calls_section_begin|>"], MARKERS["<|tool_calls_section_end|>"]
CB, AB, CE = MARKERS["<|tool_call_begin|>"], MARKERS["<|tool_call_argument_begin|>"], MARKERS["<|tool_call_end|>"]
END = MARKERS["<|im_end|>"]

# After the generation prompt (which ends with <|im_middle|>) the model says "OK", then calls search with "{}".
# Every token of a chain is distinct (the next token depends on the current one only), hence the short id
# "search:0", which the parser reads as functions.search:0 (models do drop the prefix).
CALL = [MID, *text_ids("OK"), SB, CB, *text_ids("search:0"), AB, *text_ids("{}"), CE, SE, END]
UNCLOSED = [MID, SB, CB, *text_ids("search:0"), AB, *text_ids("{"), END]  # generation ends mid-call
TOOLS = [{"type": "function", "function": {"name": "search", "description": "Search the web",
                                           "parameters": {"type": "object", "properties": {}}}}]
ASK = [{"role": "user", "content": "Look it up"}]
EXPECTED_CALL = {"id": "functions.search:0", "type": "function", "function": {"name": "search", "arguments": "{}"}}


@pytest.fixture(scope="module")
def client():
    with LiveServer(chain_model(CALL, default=SB), max_num_seqs=8) as server:
        yield server.client()


def create(client, **kwargs):
    return client.chat.completions.create(model="test-model", messages=ASK, tools=TOOLS, temperature=0,
                                          max_tokens=40, **kwargs)


def streamed(client, **kwargs) -> tuple[str, list[dict], str]:
    """(content, tool calls assembled from the deltas, finish reason) of a streamed reply."""
    content, calls, finish = "", {}, None
    for chunk in create(client, stream=True, **kwargs):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "type": "function", "function": {"name": None,
                                                                                         "arguments": ""}})
            call["id"] = d.id or call["id"]
            if d.function is not None:
                call["function"]["name"] = d.function.name or call["function"]["name"]
                call["function"]["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def as_dicts(calls) -> list[dict]:
    return [json.loads(c.model_dump_json(exclude_none=True)) for c in calls or []]


@pytest.mark.parametrize("tool_choice", ["auto", "required", {"type": "function", "function": {"name": "search"}}])
def test_tool_call_whole_and_streamed(client, tool_choice):
    r = create(client, tool_choice=tool_choice)
    message = r.choices[0].message
    assert as_dicts(message.tool_calls) == [EXPECTED_CALL]
    assert r.choices[0].finish_reason == "tool_calls"
    # auto: the model's own "OK" first; required / named: the prompt already opened the section or the call
    assert message.content == ("OK" if tool_choice == "auto" else None)
    content, calls, finish = streamed(client, tool_choice=tool_choice)
    assert calls == [EXPECTED_CALL] and finish == "tool_calls"
    assert content == ("OK" if tool_choice == "auto" else "")


def test_tool_choice_none_leaves_markers_as_text(client):
    r = create(client, tool_choice="none")
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == ("OK<|tool_call_begin|>search:0<|tool_call_argument_begin|>{}"
                                            "<|tool_call_end|>")


def test_tool_result_turn_renders(client):
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "nothing found"}]
    r = client.chat.completions.create(model="test-model", messages=messages, tools=TOOLS, temperature=0,
                                       max_tokens=40)
    assert r.choices[0].finish_reason == "tool_calls"


def test_bad_tool_requests_are_400(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="not in tools"):
        create(client, tool_choice={"type": "function", "function": {"name": "other"}})
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        create(client, tool_choice="sometimes")


def test_a_call_never_closed_is_content_not_an_error():
    with LiveServer(chain_model(UNCLOSED, default=SB), max_num_seqs=4) as server:
        client = server.client()
        r = create(client)
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.content == "<|tool_call_begin|>search:0<|tool_call_argument_begin|>{"
        content, calls, finish = streamed(client)
        # streamed, the call was announced when its arguments began; it never closed, so the finish is "stop"
        assert calls == [{"id": "functions.search:0", "type": "function",
                          "function": {"name": "search", "arguments": "{"}}]
        assert content == "" and finish == "stop"
