"""The OpenAI-compatible server through the official ``openai`` client: chat and text completions, streaming and
not, usage, logprobs, stop strings, seeds, n, errors, disconnects, load, metrics. One server (uvicorn in a thread,
a random `test`-preset model, the byte tokenizer with chat markers) serves the whole module."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading

import openai
import pytest
from serving_helpers import LiveServer, metric, metrics, random_model

from kimi_linear.chat import render_chat
from kimi_linear.tokenizer import ByteTokenizer

KEY = "sk-test"
GREEDY = {"temperature": 0.0}
HI = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server():
    with LiveServer(random_model(), api_key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def raw(server: LiveServer, method: str, path: str, body: bytes | None = None, key: str | None = KEY,
        headers: dict | None = None) -> tuple[int, dict | str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    h = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=body, headers=h)
    response = conn.getresponse()
    data = response.read().decode()
    conn.close()
    try:
        return response.status, json.loads(data)
    except json.JSONDecodeError:
        return response.status, data


def prompt_len(messages) -> int:
    return len(render_chat(ByteTokenizer.with_chat_markers(), messages))


def assert_error(body, status_type: str, param: str | None = None) -> None:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == status_type and isinstance(error["code"], str) and error["message"]
    if param is not None:
        assert error["param"] == param


# ---- chat ------------------------------------------------------------------------------------------------------
def test_models_and_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["test-model"]
    assert models[0].model_extra["max_model_len"] == 2048
    assert raw(server, "GET", "/health", key=None) == (200, {"status": "ok"})


def test_chat_usage_and_cached_tokens(client):
    kwargs = dict(model="test-model", messages=HI, max_tokens=6, extra_body={"ignore_eos": True}, **GREEDY)
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert first.object == "chat.completion" and first.choices[0].message.role == "assistant"
    assert first.choices[0].finish_reason == "length"
    assert first.usage.prompt_tokens == prompt_len(HI) and first.usage.completion_tokens == 6
    assert first.usage.total_tokens == prompt_len(HI) + 6
    assert again.choices[0].message.content == first.choices[0].message.content  # greedy
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: a prefix-cache hit


def test_chat_streaming_matches_and_reports_usage(client):
    kwargs = dict(model="test-model", messages=HI, max_tokens=6, extra_body={"ignore_eos": True}, **GREEDY)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == prompt_len(HI)


def test_chat_logprobs_shape(client):
    r = client.chat.completions.create(model="test-model", messages=HI, max_tokens=4, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True}, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the sampled token is the top
        assert entry.bytes == list(entry.token.encode()) or entry.token == "\ufffd"


def test_chat_stop_string_streaming_and_not(client):
    kwargs = dict(model="test-model", messages=HI, extra_body={"ignore_eos": True}, **GREEDY)
    full = client.chat.completions.create(max_tokens=24, **kwargs).choices[0].message.content
    stop = next(ch for ch in full[1:] if ch.isascii() and ch.isprintable())
    expected = full[:full.index(stop)]
    r = client.chat.completions.create(max_tokens=24, stop=stop, **kwargs)
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(max_tokens=24, stop=[stop, "\x00never"], stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_n_completions_differ(client):
    def sample(seed):
        r = client.chat.completions.create(model="test-model", messages=HI, max_tokens=8, n=3, seed=seed,
                                           logprobs=True, extra_body={"ignore_eos": True})
        return [[t.token for t in c.logprobs.content] for c in sorted(r.choices, key=lambda c: c.index)]

    first, second = sample(7), sample(7)
    assert first == second and len(first) == 3
    assert len({tuple(c) for c in first}) > 1  # three completions, not three copies
    assert sample(8) != first


def test_chat_n_streaming(client):
    chunks = list(client.chat.completions.create(model="test-model", messages=HI, max_tokens=3, n=2, stream=True,
                                                 extra_body={"ignore_eos": True}))
    roles = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role)
    finishes = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert roles == [0, 1] and finishes == [0, 1]


# ---- completions --------------------------------------------------------------------------------------------------
def test_completion_prompt_forms(client):
    def complete(prompt, **kw):
        return client.completions.create(model="test-model", prompt=prompt, max_tokens=4,
                                         extra_body={"ignore_eos": True}, **GREEDY, **kw)

    text = complete("def f(x):")
    assert text.object == "text_completion" and text.usage.prompt_tokens == 1 + len("def f(x):")  # BOS + bytes
    ids = complete([256, *b"def f(x):"])
    assert ids.choices[0].text == text.choices[0].text  # the same tokens, given as ids
    many = complete(["ab", "def f(x):"], n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[2].text == text.choices[0].text
    assert many.usage.prompt_tokens == 3 + 10 and many.usage.completion_tokens == 16
    lists = complete([[256, 97], [256, *b"def f(x):"]])
    assert lists.choices[1].text == text.choices[0].text
    echo = complete("def f(x):", echo=True)
    assert echo.choices[0].text == "def f(x):" + text.choices[0].text


def test_completion_streaming_and_logprobs(client):
    kwargs = dict(model="test-model", prompt="import os", max_tokens=5, logprobs=2, extra_body={"ignore_eos": True},
                  **GREEDY)
    whole = client.completions.create(**kwargs)
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices) == 5
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


# ---- errors -------------------------------------------------------------------------------------------------------
def test_error_statuses_and_bodies(server, client):
    status, body = raw(server, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400
    assert_error(body, "invalid_request_error")
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=HI)
    assert_error({"error": e.value.body}, "invalid_request_error", "model")  # the client keeps the inner object
    with pytest.raises(openai.BadRequestError, match="exceeds the model length"):
        client.completions.create(model="test-model", prompt="x", max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="leaves no room"):
        client.completions.create(model="test-model", prompt=[65] * 2048)
    status, body = raw(server, "POST", "/v1/completions", json.dumps({"prompt": "x", "top_p": 2}).encode())
    assert status == 400
    assert_error(body, "invalid_request_error", "top_p")
    status, body = raw(server, "POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "robot",
                                                                                         "content": "x"}]}).encode())
    assert status == 400 and body["error"]["param"] == "messages[0]"
    status, body = raw(server, "POST", "/v1/completions", json.dumps({"prompt": 5}).encode())
    assert status == 400 and body["error"]["param"] == "prompt" and "accepted forms" in body["error"]["message"]
    status, body = raw(server, "POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 1,
                                                                      "some_vendor_field": {"a": 1}}).encode())
    assert status == 200  # unknown fields are ignored
    for field in ({"seed": 2**64}, {"top_k": 2**63}):  # would overflow in the engine's step
        status, body = raw(server, "POST", "/v1/completions", json.dumps({"prompt": "x", **field}).encode())
        assert status == 400 and body["error"]["param"] == next(iter(field))
    status, body = raw(server, "POST", "/v1/completions", json.dumps({"prompt": "x", "n": 1000}).encode())
    assert status == 400 and "max_num_seqs" in body["error"]["message"]


def test_auth_size_and_admission(server):
    status, body = raw(server, "GET", "/v1/models", key="wrong")
    assert status == 401
    assert_error(body, "authentication_error")
    assert raw(server, "GET", "/v1/models", key=None)[0] == 401
    assert raw(server, "GET", "/metrics", key=None)[0] == 200  # scrapers and probes need no key
    big = json.dumps({"prompt": "x" * (server.ctx.max_body_bytes + 10)}).encode()
    status, body = raw(server, "POST", "/v1/completions", big)
    assert status == 413
    assert_error(body, "invalid_request_error")
    status, body = raw(server, "GET", "/nowhere")
    assert status == 404
    assert_error(body, "not_found_error")
    status, body = raw(server, "GET", "/v1/completions")
    assert status == 405 and "does not accept GET" in body["error"]["message"]
    server.ctx.state = "draining"
    try:
        status, body = raw(server, "POST", "/v1/completions", b'{"prompt": "x"}')
        assert status == 503
        assert_error(body, "service_unavailable_error")
        assert raw(server, "GET", "/health", key=None)[0] == 503
    finally:
        server.ctx.state = "ready"


def test_a_bug_is_a_500_and_the_server_goes_on(server, client, monkeypatch):
    from kimi_linear.server import protocol

    def broken(self, tokenizer):
        raise RuntimeError("boom")

    monkeypatch.setattr(protocol.CompletionRequest, "prompts", broken)
    status, body = raw(server, "POST", "/v1/completions", b'{"prompt": "x"}')
    assert status == 500 and "boom" in body["error"]["message"]
    assert_error(body, "server_error")
    monkeypatch.undo()
    assert client.completions.create(model="test-model", prompt="x", max_tokens=1).choices[0].finish_reason


def test_a_failing_engine_step_ends_the_request_with_an_error(server, client, monkeypatch):
    original = server.engine.model.forward_step
    client.chat.completions.create(model="test-model", messages=HI, max_tokens=1)  # HI in the prefix cache
    failing = {"on": True}

    def flaky(*args, **kwargs):
        if failing["on"]:
            raise RuntimeError("step exploded")
        return original(*args, **kwargs)

    monkeypatch.setattr(server.engine.model, "forward_step", flaky)
    with pytest.raises(openai.InternalServerError, match="step exploded"):
        client.completions.create(model="test-model", prompt="fail", max_tokens=2)
    fresh = [{"role": "user", "content": "not cached yet"}]
    with pytest.raises(openai.InternalServerError, match="step exploded"):  # a 500 status, not a broken stream
        client.chat.completions.create(model="test-model", messages=fresh, max_tokens=2, stream=True)
    # HI is cached with its final hidden state: the first token needs no forward, the failure comes mid-stream
    stream = client.chat.completions.create(model="test-model", messages=HI, max_tokens=4, stream=True)
    with pytest.raises(openai.APIError, match="step exploded"):
        list(stream)
    failing["on"] = False
    assert client.completions.create(model="test-model", prompt="fine", max_tokens=2).choices[0].text is not None


# ---- load, disconnects, and memory afterwards ---------------------------------------------------------------------
def test_concurrent_streams_disconnects_and_nothing_leaks(server):
    async def stream(i: int, aclient) -> tuple[int, int, str]:
        s = await aclient.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=4, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        last, finish = None, None
        async for chunk in s:
            last = chunk
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return last.usage.prompt_tokens, last.usage.completion_tokens, finish

    async def leave(i: int, aclient) -> None:
        s = await aclient.completions.create(model="test-model", prompt=f"leave {i}", max_tokens=1000, stream=True,
                                             extra_body={"ignore_eos": True})
        async for _ in s:
            break  # the client goes away after its first chunk
        await s.close()

    async def time_out(i: int, aclient) -> None:
        with pytest.raises(openai.APITimeoutError):  # a non-streaming client that gives up
            await aclient.with_options(timeout=1.0).completions.create(
                model="test-model", prompt=f"wait {i}", max_tokens=1000, extra_body={"ignore_eos": True})

    async def main():
        async with server.async_client() as aclient:
            results = await asyncio.gather(*(stream(i, aclient) for i in range(64)))
            await asyncio.gather(*(leave(i, aclient) for i in range(10)), *(time_out(i, aclient) for i in range(3)))
        return results

    before = metrics(raw(server, "GET", "/metrics")[1])
    generated = server.engine.stats.generated_tokens
    results = asyncio.run(asyncio.wait_for(main(), 180))
    for i, (prompt_tokens, completion_tokens, finish) in enumerate(results):
        assert prompt_tokens == prompt_len([{"role": "user", "content": f"request {i}"}])
        assert (completion_tokens, finish) == (4, "length")
    server.wait_idle(timeout=30)
    # The 13 clients that left were aborted long before their 1000 tokens each.
    assert server.engine.stats.generated_tokens - generated < 64 * 4 + 13 * 300
    after = metrics(raw(server, "GET", "/metrics")[1])
    aborted = metric(after, "vllm:request_success_total", finished_reason="abort") - metric(
        before, "vllm:request_success_total", finished_reason="abort")
    assert aborted == 13
    assert metric(after, "vllm:num_requests_running") == 0 and metric(after, "vllm:num_requests_waiting") == 0
    # Every slot and block not free is held by the prefix cache...
    assert metric(after, "kimi:state_slots_free") + metric(after, "kimi:prefix_cache_entries") == metric(
        after, "kimi:state_slots_total")
    assert metric(after, "kimi:latent_blocks_free") + metric(after, "kimi:prefix_cache_blocks") == metric(
        after, "kimi:latent_blocks_total")
    assert metric(after, "vllm:prefix_cache_hits_total") <= metric(after, "vllm:prefix_cache_queries_total")
    server.engine.clear_prefix_cache()  # the engine is idle: safe from this thread
    cleared = metrics(raw(server, "GET", "/metrics")[1])
    assert metric(cleared, "kimi:state_slots_free") == metric(cleared, "kimi:state_slots_total")
    assert metric(cleared, "kimi:latent_blocks_free") == metric(cleared, "kimi:latent_blocks_total")


def test_metric_names(server):
    samples = metrics(raw(server, "GET", "/metrics")[1])
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:time_to_first_token_seconds_count",
                 "vllm:inter_token_latency_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
                 "kimi:prefix_cache_state_hit_tokens_total", "kimi:prefix_cache_latent_hit_tokens_total",
                 "kimi:state_slots_free", "kimi:latent_blocks_total", "vllm:kv_cache_usage_perc"]:
        metric(samples, name)
    assert metric(samples, "vllm:generation_tokens_total") > 0


def test_a_model_without_chat_format_serves_completions_only():
    with LiveServer(random_model(), ByteTokenizer(), name="plain") as plain:
        client = plain.client()
        with pytest.raises(openai.BadRequestError, match="no chat format"):
            client.chat.completions.create(model="plain", messages=HI)
        assert client.completions.create(model="plain", prompt="x", max_tokens=2).choices[0].finish_reason


def test_503_until_the_warm_up_request_has_run():
    model = random_model()
    release = threading.Event()
    original = model.forward_step

    def slow_first_step(*args, **kwargs):
        assert release.wait(60)
        return original(*args, **kwargs)

    model.forward_step = slow_first_step
    server = LiveServer(model, name="slow")
    server._thread.start()  # not __enter__, which waits for readiness
    try:
        server.wait_until(lambda: server.server.started)
        status, body = raw(server, "GET", "/health", key=None)
        assert status == 503 and "starting" in body["error"]["message"]
        assert raw(server, "POST", "/v1/completions", b'{"prompt": "x"}', key=None)[0] == 503
        release.set()
        server.wait_until(lambda: server.ctx.state == "ready")
        assert raw(server, "GET", "/health", key=None)[0] == 200
    finally:
        release.set()
        server.__exit__(None, None, None)
