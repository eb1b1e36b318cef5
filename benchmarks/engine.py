"""The serving engine under load: throughput and time to first token against concurrency, and a multi-turn chat
workload with the prefix cache on and off.

Runs on the CPU with the `tiny` preset (random weights, fp32) by default; the GPU serving issue reruns it on the real
shapes (``--preset kimi-linear-48b-a3b --device cuda --dtype bfloat16``). Requests are driven through the synchronous
engine (``LLMEngine.step``), so the times are the engine's own, without HTTP.

Run: ``python benchmarks/engine.py`` (writes benchmarks/results/engine.{json,md}).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, markdown_table, write_results  # noqa: E402
from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM  # noqa: E402
from kimi_linear.engine import EngineConfig, LLMEngine, SamplingParams, SchedulerConfig  # noqa: E402


def drive(engine: LLMEngine, arrivals: list[tuple[float, list[int], SamplingParams]]) -> dict:
    """Feed requests at their arrival offsets (seconds), step until all finish; per-request TTFT and ITL."""
    start = time.perf_counter()
    pending = sorted(arrivals, key=lambda a: a[0])
    added, first, last, count = {}, {}, {}, {}
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            _, prompt, params = pending.pop(0)
            added[engine.add_request(prompt, params)] = time.perf_counter()
        for out in engine.step():
            t = time.perf_counter()
            n = sum(len(o.token_ids) for o in out.outputs)
            if n:
                first.setdefault(out.request_id, t)
                last[out.request_id] = t
                count[out.request_id] = count.get(out.request_id, 0) + n
        if not engine.has_unfinished() and pending:
            time.sleep(max(0.0, pending[0][0] - (time.perf_counter() - start)))
    elapsed = time.perf_counter() - start
    ttft = [first[r] - added[r] for r in added]
    itl = [(last[r] - first[r]) / (count[r] - 1) for r in added if count[r] > 1]
    return {"elapsed": elapsed, "ttft": ttft, "itl": itl, "output_tokens": sum(count.values())}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def make_engine(model, args, caching: bool = True) -> LLMEngine:
    config = EngineConfig(SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.token_budget,
                                          enable_prefix_caching=caching), memory_budget=args.memory_budget,
                          block_size=args.block_size)
    return LLMEngine(model, config)


def concurrency_sweep(model, args, gen: torch.Generator) -> list[dict]:
    rows = []
    vocab = min(model.config.vocab_size, 256)
    for c in args.concurrency:
        prompts = [torch.randint(0, vocab, (int(torch.randint(64, 257, (1,), generator=gen)),), generator=gen).tolist()
                   for _ in range(c)]
        params = SamplingParams(temperature=0.0, max_tokens=args.output_tokens, ignore_eos=True)
        engine = make_engine(model, args)
        drive(engine, [(0.0, prompts[0][:8], SamplingParams(max_tokens=2))])  # warm-up
        r = drive(engine, [(0.0, p, params) for p in prompts])
        rows.append({"concurrency": c, "requests": c, "output tok/s": r["output_tokens"] / r["elapsed"],
                     "total tok/s": (r["output_tokens"] + sum(map(len, prompts))) / r["elapsed"],
                     "TTFT mean s": statistics.mean(r["ttft"]), "TTFT p90 s": percentile(r["ttft"], 0.9),
                     "ITL mean ms": 1e3 * statistics.mean(r["itl"]) if r["itl"] else float("nan")})
        print(rows[-1], flush=True)
    return rows


def multi_turn(model, args, gen: torch.Generator) -> list[dict]:
    """K conversations of T turns: each turn sends the whole history (previous prompt, the answer, a new message)."""
    vocab = min(model.config.vocab_size, 256)
    system = torch.randint(0, vocab, (args.system_tokens,), generator=gen).tolist()
    messages = [[torch.randint(0, vocab, (48,), generator=gen).tolist() for _ in range(args.turns)]
                for _ in range(args.conversations)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_tokens, ignore_eos=True)
    rows = []
    for caching in (False, True):
        engine = make_engine(model, args, caching)
        history = [list(system) for _ in range(args.conversations)]
        ttfts, computed = [], 0
        for turn in range(args.turns):
            prompts = [h + m[turn] for h, m in zip(history, messages)]
            before = engine.stats.computed_tokens
            ids = [engine.add_request(p, params) for p in prompts]
            start, first, answers = time.perf_counter(), {}, {i: [] for i in ids}
            while engine.has_unfinished():
                for out in engine.step():
                    if out.outputs and out.outputs[0].token_ids:
                        first.setdefault(out.request_id, time.perf_counter() - start)
                        answers[out.request_id] += out.outputs[0].token_ids
            ttfts.append(statistics.mean(first.values()))
            computed += engine.stats.computed_tokens - before
            history = [p + answers[i] for p, i in zip(prompts, ids)]
        stats = engine.scheduler.prefix_cache.stats if caching else None
        rows.append({"prefix cache": "on" if caching else "off", "turns": args.turns,
                     "conversations": args.conversations, "TTFT mean s (all turns)": statistics.mean(ttfts),
                     "TTFT mean s (turns 2+)": statistics.mean(ttfts[1:]), "tokens computed": computed,
                     "state hit tokens": stats.state_hit_tokens if stats else 0,
                     "latent hit tokens": stats.latent_hit_tokens if stats else 0})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--token-budget", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--memory-budget", type=int, default=1 << 30)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=300)
    parser.add_argument("--out", default="engine")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = KimiLinearForCausalLM(KimiLinearConfig.from_preset(args.preset)).to(args.device, dtype).eval()
    gen = torch.Generator().manual_seed(0)
    sweep = concurrency_sweep(model, args, gen)
    chat = multi_turn(model, args, gen)
    cols_sweep = ["concurrency", "output tok/s", "total tok/s", "TTFT mean s", "TTFT p90 s", "ITL mean ms"]
    cols_chat = ["prefix cache", "conversations", "turns", "TTFT mean s (all turns)", "TTFT mean s (turns 2+)",
                 "tokens computed", "state hit tokens", "latent hit tokens"]
    table = (f"## Concurrency ({args.output_tokens} output tokens, prompts of 64-256 tokens, greedy)\n\n"
             + markdown_table(sweep, cols_sweep)
             + f"\n\n## Multi-turn chat ({args.system_tokens}-token system prompt, 48-token messages)\n\n"
             + markdown_table(chat, cols_chat))
    print(table)
    meta = {**environment(), "preset": args.preset, "dtype": args.dtype, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "note": "random weights; on a shared machine, times vary with its load"}
    write_results(args.out, meta, [*({"part": "concurrency", **r} for r in sweep),
                                   *({"part": "multi-turn", **r} for r in chat)], table)


if __name__ == "__main__":
    main()
