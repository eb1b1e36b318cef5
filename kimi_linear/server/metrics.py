"""Prometheus metrics of one server, in a registry of its own (several servers in one process never collide).

Two kinds of numbers:

- **Engine state, read at scrape time** by a collector (:class:`_EngineCollector`): queue lengths, token and
  preemption counters, prefix-cache counters, pool usage. Reading them when scraped costs nothing per step and can
  never drift from the engine's own counts. The engine thread updates them concurrently; each value is one integer
  or length read, so a scrape sees each number consistent, if not all of them from the same instant.
- **Per-request latencies, observed by the HTTP layer** (:class:`RequestTimer`): time to first token, inter-token
  latency, end-to-end latency, prompt and output lengths, finished requests by reason.

Names are vLLM's where one exists (``vllm:num_requests_running``, ``vllm:time_to_first_token_seconds``, ...) so that
existing dashboards work; they carry vLLM's ``model_name`` label. vLLM's prefix-cache counters count tokens:
``vllm:prefix_cache_queries`` counts prompt tokens looked up and ``vllm:prefix_cache_hits`` the tokens actually
reused, which for this hybrid model is the state-snapshot hit. Our own metrics (prefix ``kimi:``) separate that
from the latent hit (tokens the radix tree matched, reusable only down to the deepest snapshot) and report the two
pools (KDA state slots, MLA latent blocks) as free / total, without the padding slot and block.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kimi_linear.engine import LLMEngine, RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                    80.0, 160.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000,
                  500000, 1000000)


class _EngineCollector(Collector):
    def __init__(self, engine: LLMEngine, model_name: str) -> None:
        self.engine = engine
        self.labels = {"model_name": model_name}

    def _family(self, cls: type, name: str, doc: str, value: float) -> Metric:
        family = cls(name, doc, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family

    def collect(self) -> Iterator[Metric]:
        e = self.engine
        gauge = lambda n, d, v: self._family(GaugeMetricFamily, n, d, v)  # noqa: E731
        counter = lambda n, d, v: self._family(CounterMetricFamily, n, d, v)  # noqa: E731
        yield gauge("vllm:num_requests_running", "Sequences running (holding a state slot).", e.num_running)
        yield gauge("vllm:num_requests_waiting", "Sequences waiting to be admitted.", e.num_waiting)
        yield counter("vllm:num_preemptions", "Preemptions (a sequence sent back to wait for memory).",
                      e.scheduler.num_preemptions)
        yield counter("vllm:prompt_tokens", "Prompt tokens of the requests received.", e.stats.prompt_tokens)
        yield counter("vllm:generation_tokens", "Tokens generated.", e.stats.generated_tokens)
        yield counter("kimi:engine_steps", "Engine steps (forward passes).", e.stats.steps)
        yield counter("kimi:computed_tokens", "Tokens the model processed (prefill and decode).",
                      e.stats.computed_tokens)
        slots_total, blocks_total = e.slots.num_slots - 1, e.blocks.num_blocks - 1  # without the padding slot/block
        blocks_free = e.blocks.num_free
        yield gauge("kimi:state_slots_free", "KDA state slots free.", e.slots.num_free)
        yield gauge("kimi:state_slots_total", "KDA state slots (without the padding slot).", slots_total)
        yield gauge("kimi:latent_blocks_free", "MLA latent blocks free.", blocks_free)
        yield gauge("kimi:latent_blocks_total", "MLA latent blocks (without the padding block).", blocks_total)
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of the MLA latent blocks in use (1 = all).",
                    1 - blocks_free / blocks_total if blocks_total else 0.0)
        cache = e.scheduler.prefix_cache
        if cache is None:
            return
        s = cache.stats
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.query_tokens)
        yield counter("vllm:prefix_cache_hits", "Prompt tokens reused from the prefix cache (state-snapshot hits).",
                      s.state_hit_tokens)
        yield counter("kimi:prefix_cache_lookups", "Prefix-cache lookups (admissions).", s.queries)
        yield counter("kimi:prefix_cache_state_hits", "Lookups that reused a state snapshot.", s.state_hits)
        yield counter("kimi:prefix_cache_state_hit_tokens", "Tokens reused through a state snapshot.",
                      s.state_hit_tokens)
        yield counter("kimi:prefix_cache_latent_hit_tokens", "Tokens whose latents the cache held (reusable only down "
                      "to the deepest snapshot).", s.latent_hit_tokens)
        yield counter("kimi:prefix_cache_inserts", "Prefix-cache entries created.", s.inserts)
        yield counter("kimi:prefix_cache_evictions", "Prefix-cache entries evicted.", s.evictions)
        entries = cache.entries  # a copy made in one C call: safe against the engine thread
        yield gauge("kimi:prefix_cache_entries", "Prefix-cache entries (each holds one state slot).", len(entries))
        yield gauge("kimi:prefix_cache_blocks", "Distinct latent blocks held by prefix-cache entries.",
                    len({b for entry in entries for b in entry.blocks}))


class ServerMetrics:
    def __init__(self, engine: LLMEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, labels = self.registry, ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time from arrival to the first output token.",
                              labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between consecutive outputs of a request.",
                             labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Time from arrival to the end of a request.",
                             labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.prompt_len = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", labels,
                                    buckets=_TOKEN_BUCKETS, registry=r).labels(model_name)
        self.output_len = Histogram("vllm:request_generation_tokens", "Generated tokens per request.", labels,
                                    buckets=_TOKEN_BUCKETS, registry=r).labels(model_name)
        self._finished = Counter("vllm:request_success", "Finished completions by reason (stop, length, abort, "
                                 "error).", ["model_name", "finished_reason"], registry=r)
        for reason in ("stop", "length", "abort", "error"):  # present from the start, at 0
            self._finished.labels(model_name, reason)
        self._http_errors = Counter("kimi:http_errors", "Error responses by status code.", ["status"], registry=r)
        r.register(_EngineCollector(engine, model_name))

    def finished(self, reason: str, count: int = 1) -> None:
        self._finished.labels(self.model_name, reason).inc(count)

    def http_error(self, status: int) -> None:
        self._http_errors.labels(str(status)).inc()

    def timer(self, n: int = 1) -> RequestTimer:
        return RequestTimer(self, n)

    content_type = CONTENT_TYPE_LATEST

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latencies and outcome of one engine request (``n`` completions), fed with its outputs."""

    def __init__(self, metrics: ServerMetrics, n: int) -> None:
        self._m = metrics
        self._start = self._last = time.monotonic()
        self._first = True
        self._open = n  # completions whose end was not counted yet

    def observe(self, out: RequestOutput) -> None:
        m, now = self._m, time.monotonic()
        if any(o.token_ids for o in out.outputs):
            (m.ttft if self._first else m.itl).observe(now - self._last)
            self._first, self._last = False, now
        for o in out.outputs:  # with n > 1, completions end in different outputs
            if o.finish_reason is not None and self._open:
                m.finished(o.finish_reason)
                self._open -= 1
        if out.finished:
            m.e2e.observe(now - self._start)
            m.prompt_len.observe(out.num_prompt_tokens)
            m.output_len.observe(out.num_output_tokens)
            self.end("error" if out.error is not None else "abort")

    def end(self, reason: str) -> None:
        """Count the completions not counted yet as ended by ``reason`` (an error, or a client that left)."""
        if self._open:
            self._m.finished(reason, self._open)
            self._open = 0
