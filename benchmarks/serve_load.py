"""Load on the HTTP server through the ``openai`` client: TTFT, inter-token latency and throughput percentiles
against concurrency, and a multi-turn chat mix sharing a system prompt with the prefix cache on and off.

Two workloads, both streamed (times are what a client sees, HTTP and JSON included):

- **random**: a closed loop of ``c`` clients per concurrency level; each request is a completion of a token-id prompt
  whose length is drawn uniformly from ``--prompt-len`` with an output length drawn from ``--output-len``
  (``ignore_eos``, so it is exact).
- **chat**: ``--conversations`` conversations of ``--turns`` turns run side by side; every conversation starts with
  the same system prompt (``--system-words`` words) and each turn sends the whole history (system prompt, earlier
  messages and replies, a new user message). With the prefix cache a turn recomputes only its new message; without,
  it recomputes everything. Reported with the cache on and off (a second server started with
  ``--no-prefix-caching``).

The server is either one already running (``--url``; then the chat mix runs once, with whatever that server does) or
started here, as ``kimi-linear serve`` subprocesses, from ``--model DIR`` or from a random model of ``--preset``
(default: the tiny preset with the byte tokenizer and chat markers, written to a temporary directory).

Run: ``python benchmarks/serve_load.py`` (writes benchmarks/results/serve_load.{json,md}).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, markdown_table, write_results  # noqa: E402

WORDS = ("the a of model state token cache prefix chunk layer kernel request stream server latency batch decode "
         "prefill memory slot block tree hybrid linear attention recurrent snapshot queue step sample reply").split()


# ---- the server ----------------------------------------------------------------------------------------------------
def make_model_dir(preset: str, directory: str) -> str:
    import torch

    from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
    from kimi_linear.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    KimiLinearForCausalLM(KimiLinearConfig.from_preset(preset)).save_pretrained(directory)
    ByteTokenizer.with_chat_markers().save_pretrained(directory)
    return directory


class Server:
    """A ``kimi-linear serve`` subprocess on a free port of 127.0.0.1."""

    def __init__(self, model_dir: str, extra: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kimi_linear.cli", "serve", "--model", model_dir, "--port", "0", "--log-level",
             "warning", "--no-access-log", *extra], stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.proc.poll() is None:
            if select.select([self.proc.stdout], [], [], 1.0)[0]:
                line = self.proc.stdout.readline()
                if line.startswith("kimi-linear: serving"):
                    self.url = line.split(" on ", 1)[1].strip()
                    return
        self.log.seek(0)
        raise RuntimeError(f"the server did not start:\n{self.log.read()}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def scrape(url: str, names: tuple[str, ...]) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    out = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


CACHE_METRICS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "kimi:prefix_cache_latent_hit_tokens_total", "kimi:computed_tokens_total")


# ---- measuring -----------------------------------------------------------------------------------------------------
class Record:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.itl: list[float] = []  # gaps between consecutive streamed chunks with text
        self.tpot: list[float] = []  # per request: (last chunk - first chunk) / (output tokens - 1)
        self.output_tokens = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.requests = 0

    async def stream(self, coro) -> str:
        """Consume a streamed response, timing it; returns its text."""
        start = time.perf_counter()
        stream = await coro
        first = last = None
        text, usage = [], None
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                c = chunk.choices[0]
                piece = getattr(c, "text", None)
                if piece is None:
                    piece = c.delta.content
                if piece is not None or getattr(c, "logprobs", None) is not None:
                    if last is None:
                        self.ttft.append(now - start)
                        first = now
                    elif piece:
                        self.itl.append(now - last)
                    last = now
                    text.append(piece or "")
            usage = chunk.usage or usage
        self.requests += 1
        if usage is not None:
            self.output_tokens += usage.completion_tokens
            self.prompt_tokens += usage.prompt_tokens
            details = usage.prompt_tokens_details
            self.cached_tokens += (details.cached_tokens or 0) if details else 0
            if usage.completion_tokens > 1 and first is not None:
                self.tpot.append((last - first) / (usage.completion_tokens - 1))
        return "".join(text)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summary(record: Record, elapsed: float) -> dict:
    return {"requests": record.requests, "elapsed s": elapsed,
            "output tok/s": record.output_tokens / elapsed, "requests/s": record.requests / elapsed,
            "TTFT p50 s": percentile(record.ttft, 0.5), "TTFT p90 s": percentile(record.ttft, 0.9),
            "TTFT p99 s": percentile(record.ttft, 0.99),
            "ITL p50 ms": 1e3 * percentile(record.itl, 0.5), "ITL p90 ms": 1e3 * percentile(record.itl, 0.9),
            "ITL p99 ms": 1e3 * percentile(record.itl, 0.99),
            "ITL mean ms": 1e3 * statistics.mean(record.itl) if record.itl else float("nan"),
            "TPOT p50 ms": 1e3 * percentile(record.tpot, 0.5), "TPOT p90 ms": 1e3 * percentile(record.tpot, 0.9),
            "prompt tokens": record.prompt_tokens, "cached tokens": record.cached_tokens}


def span(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


# ---- workloads -----------------------------------------------------------------------------------------------------
async def random_load(url: str, model: str, concurrency: int, requests: int, args, rng: random.Random) -> dict:
    import openai

    jobs = [([rng.randrange(32, 127) for _ in range(rng.randint(*span(args.prompt_len)))],
             rng.randint(*span(args.output_len))) for _ in range(requests)]
    record = Record()
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=args.api_key, max_retries=0, timeout=600)

    async def worker() -> None:
        while jobs:
            prompt, max_tokens = jobs.pop()
            await record.stream(client.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    return summary(record, elapsed)


async def chat_mix(url: str, model: str, args, seed: int) -> dict:
    import openai

    rng = random.Random(seed)
    system = " ".join(rng.choice(WORDS) for _ in range(args.system_words))
    # one generator per conversation: the same messages whatever order the replies come back in
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=args.api_key, max_retries=0, timeout=600)
    record, later_turns = Record(), Record()
    before = scrape(url, CACHE_METRICS)

    async def conversation(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        messages = [{"role": "system", "content": system}]
        for turn in range(args.turns):
            words = rng.randint(*span(args.message_words))
            messages.append({"role": "user", "content": f"({k}) " + " ".join(rng.choice(WORDS) for _ in range(words))})
            target = record if turn == 0 else later_turns
            reply = await target.stream(client.chat.completions.create(
                model=model, messages=messages, max_tokens=args.reply_tokens, temperature=0.0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
            messages.append({"role": "assistant", "content": reply})

    start = time.perf_counter()
    await asyncio.gather(*(conversation(k) for k in range(args.conversations)))
    elapsed = time.perf_counter() - start
    await client.close()
    after = scrape(url, CACHE_METRICS)
    delta = {k: after[k] - before[k] for k in CACHE_METRICS}
    row = summary(later_turns, elapsed)
    # TTFT over turns 2+ (where the shared history can be reused); throughput over everything
    all_output = record.output_tokens + later_turns.output_tokens
    row.update({"requests": record.requests + later_turns.requests, "output tok/s": all_output / elapsed,
                "requests/s": (record.requests + later_turns.requests) / elapsed,
                "TTFT turn 1 p50 s": percentile(record.ttft, 0.5),
                "prompt tokens": record.prompt_tokens + later_turns.prompt_tokens,
                "cached tokens": record.cached_tokens + later_turns.cached_tokens,
                "tokens computed": int(delta["kimi:computed_tokens_total"]),
                "state hit tokens": int(delta["vllm:prefix_cache_hits_total"]),
                "latent hit tokens": int(delta["kimi:prefix_cache_latent_hit_tokens_total"])})
    return row


# ---- main ----------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start kimi-linear serve here)")
    parser.add_argument("--model", help="model directory for the servers started here")
    parser.add_argument("--preset", default="tiny", help="without --url or --model: a random model of this preset")
    parser.add_argument("--served-model-name", default="bench")
    parser.add_argument("--api-key", default=os.environ.get("KIMI_LINEAR_API_KEY", "none"))
    parser.add_argument("--serve-args", default="--memory-budget 1GiB",
                        help="extra arguments for the servers started here")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: 2 x concurrency, >= 8)")
    parser.add_argument("--prompt-len", default="32:256", help="prompt tokens, uniform in LOW:HIGH")
    parser.add_argument("--output-len", default="16:48", help="output tokens, uniform in LOW:HIGH")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-words", type=int, default=120, help="shared system prompt length, in words")
    parser.add_argument("--message-words", default="8:24", help="user message length, words, uniform in LOW:HIGH")
    parser.add_argument("--reply-tokens", type=int, default=24)
    parser.add_argument("--machine", default=f"CPU, {os.cpu_count()} cores, shared with other engineers' test runs",
                        help="a description of the machine, for the results file")
    parser.add_argument("--out", default="serve_load")
    args = parser.parse_args()

    model = args.served_model_name
    servers: list[Server] = []
    tmp = tempfile.TemporaryDirectory()
    try:
        if args.url:
            targets = {"as running": args.url.rstrip("/")}
            with urllib.request.urlopen(f"{args.url.rstrip('/')}/v1/models", timeout=30) as r:
                model = json.loads(r.read())["data"][0]["id"]
        else:
            model_dir = args.model or make_model_dir(args.preset, tmp.name)
            common = ["--served-model-name", model, *args.serve_args.split()]
            servers.append(Server(model_dir, common))
            servers.append(Server(model_dir, [*common, "--no-prefix-caching"]))
            targets = {"on": servers[0].url, "off": servers[1].url}
        url = next(iter(targets.values()))
        rng = random.Random(0)
        for target in targets.values():  # warm-up
            asyncio.run(random_load(target, model, 1, 2, args, random.Random(1)))
        sweep = []
        for c in args.concurrency:
            n = args.requests or max(8, 2 * c)
            sweep.append({"concurrency": c, **asyncio.run(random_load(url, model, c, n, args, rng))})
            print(sweep[-1], flush=True)
        chat = []
        for caching, target in targets.items():
            chat.append({"prefix cache": caching, "conversations": args.conversations, "turns": args.turns,
                         **asyncio.run(chat_mix(target, model, args, seed=1))})
            print(chat[-1], flush=True)
    finally:
        for server in servers:
            server.stop()
        tmp.cleanup()

    cols_sweep = ["concurrency", "requests", "output tok/s", "requests/s", "TTFT p50 s", "TTFT p90 s", "TTFT p99 s",
                  "ITL p50 ms", "ITL p90 ms", "ITL p99 ms", "TPOT p50 ms", "TPOT p90 ms"]
    cols_chat = ["prefix cache", "conversations", "turns", "output tok/s", "TTFT turn 1 p50 s", "TTFT p50 s",
                 "TTFT p90 s", "TPOT p50 ms", "prompt tokens", "cached tokens", "tokens computed", "state hit tokens",
                 "latent hit tokens"]
    table = (f"## Random load (completions, prompts of {args.prompt_len} tokens, outputs of {args.output_len} tokens, "
             f"greedy, streamed; closed loop of `concurrency` clients)\n\n" + markdown_table(sweep, cols_sweep)
             + f"\n\n## Chat mix ({args.conversations} conversations x {args.turns} turns, a shared "
             f"{args.system_words}-word system prompt, {args.message_words}-word messages, {args.reply_tokens}-token "
             "replies; TTFT columns after turn 1 are over turns 2+)\n\n" + markdown_table(chat, cols_chat)
             + "\n\nITL: gaps between streamed chunks that carry text (a chunk is one token, but a token ending "
             "inside a UTF-8 character sends nothing until the character completes: random weights emit many); TPOT: "
             "per request, (last chunk - first chunk) / (output tokens - 1).\n")
    print(table)
    meta = {**environment(), "machine": args.machine, "cpu_count": os.cpu_count(),
            "model": args.url or args.model or f"random {args.preset} preset (fp32), byte tokenizer",
            "serve args": args.serve_args}
    write_results(args.out, meta, [*({"part": "random", **r} for r in sweep), *({"part": "chat", **r} for r in chat)],
                  table)


if __name__ == "__main__":
    main()
