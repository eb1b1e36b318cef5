"""Decode and prefill speed of the serving path on one GPU (issue 20): against the bandwidth floor, against the same
model with every layer MLA (the paper's baseline), and against transformers' native ``kimi_linear``.

Subcommands (random bf16 weights of the ``kimi-linear-48b-a3b`` preset unless ``--preset`` says otherwise):

- ``floor``: time per output token at batch 1 / 4K context (the decode step replayed from its CUDA graph, over a
  synthetic cache) against the floor = activated weight bytes / the device copy bandwidth measured in the same run;
  then decode throughput for batch sizes 1 .. 256.
- ``long``: Kimi Linear against the all-MLA model of the same shapes: decode time per token at 128K, 512K and 1M
  context, at batch 1 and at a batch where the MLA cache dominates; prefill time at 128K and 1M.
- ``peer``: decode throughput of our engine against transformers' ``kimi_linear`` (with fla-core's kernels when its
  wheel is importable) on the same weights, at batch 1 and 32 with a 4K context.

Decode timings use a synthetic context: the pools are filled with random states and latents (a decode step's time
does not depend on their values), so a 1M-token context costs no 1M-token prefill. Without CUDA each subcommand runs
once at the `test` preset's shapes as a check of the code, and writes nothing.

Run: ``python benchmarks/serving.py floor|long|peer [--preset ...]`` → benchmarks/results/serving_*.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import copy_bandwidth_tbps, environment, markdown_table, random_model, write_results  # noqa: E402
from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM  # noqa: E402
from kimi_linear.cache import CachePool, cache_spec  # noqa: E402
from kimi_linear.engine.cuda_graphs import DecodeGraphs  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
BLOCK = 64


def build(config: KimiLinearConfig) -> KimiLinearForCausalLM:
    return random_model(config, DEVICE, DTYPE)


def all_mla(config: KimiLinearConfig) -> KimiLinearConfig:
    layers = config.num_hidden_layers
    lac = {**config.linear_attn_config, "kda_layers": [], "full_attn_layers": list(range(1, layers + 1))}
    return KimiLinearConfig.from_dict({**config.to_dict(), "linear_attn_config": lac})


def synthetic_decode(model: KimiLinearForCausalLM, batch: int, context: int, steps: int) -> float:
    """Seconds per decode step of ``batch`` sequences of ``context`` cached tokens (random cache contents)."""
    blocks_per_seq = -(-(context + steps + 1) // BLOCK)
    pool = CachePool(model.config, batch + 1, batch * blocks_per_seq + 1, block_size=BLOCK, device=DEVICE,
                     dtype=DTYPE)
    for p in [*pool.kda_state.values(), *pool.conv_state.values(), *pool.mla_latent.values()]:
        p.normal_(0, 0.02)
    tables = [list(range(1 + b * blocks_per_seq, 1 + (b + 1) * blocks_per_seq)) for b in range(batch)]
    graphs = DecodeGraphs(model, pool, batch, blocks_per_seq, graphs=CUDA)
    slots = list(range(1, batch + 1))
    times = []
    with torch.no_grad():
        for step in range(steps + 2):
            if CUDA:
                torch.cuda.synchronize()
            start = time.perf_counter()
            hidden = graphs.run([1] * batch, slots, tables, [context + step] * batch)
            model.compute_logits(hidden).argmax(-1)
            if CUDA:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def prefill_seconds(model: KimiLinearForCausalLM, length: int) -> float:
    ids = torch.randint(0, 256, (1, length), device=DEVICE)
    with torch.no_grad():
        model(ids[:, :min(length, 1024)], num_logits_to_keep=1)  # warm-up (compiles kernels)
        if CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(ids, num_logits_to_keep=1)
        if CUDA:
            torch.cuda.synchronize()
    return time.perf_counter() - start


def activated_weight_bytes(model: KimiLinearForCausalLM) -> int:
    return (model.num_activated_parameters() + model.config.hidden_size) * torch.finfo(DTYPE).bits // 8


def floor(args: argparse.Namespace) -> None:
    model = build(KimiLinearConfig.from_preset(args.preset) if CUDA else KimiLinearConfig.from_preset("test"))
    context = 4096 if CUDA else 64
    bandwidth = copy_bandwidth_tbps() if CUDA else float("nan")
    weights = activated_weight_bytes(model)
    floor_ms = weights / (bandwidth * 1e12) * 1e3
    rows = []
    for batch in args.batches if CUDA else [1, 2]:
        seconds = synthetic_decode(model, batch, context, args.steps if CUDA else 2)
        rows.append({"batch": batch, "context": context, "ms per step": 1e3 * seconds,
                     "output tok/s": batch / seconds, "x floor (batch 1)": 1e3 * seconds / floor_ms})
        print(rows[-1], flush=True)
    table = (f"activated weights {weights / 1e9:.2f} GB, copy bandwidth {bandwidth:.2f} TB/s: floor "
             f"{floor_ms:.3f} ms per token at batch 1 (target: at most 2x)\n\n"
             + markdown_table(rows, ["batch", "context", "ms per step", "output tok/s", "x floor (batch 1)"]))
    finish("serving_floor", args, table, rows, {"copy TB/s": bandwidth, "activated weight bytes": weights})


def long_context(args: argparse.Namespace) -> None:
    base = KimiLinearConfig.from_preset(args.preset) if CUDA else KimiLinearConfig.from_preset("test")
    contexts = [131072, 524288, 1048576] if CUDA else [256, 512]
    rows = []
    for name, config in (("kimi-linear", base), ("all-mla", all_mla(base))):
        model = build(config)
        spec = cache_spec(config, DTYPE, BLOCK)
        free = torch.cuda.mem_get_info()[0] * 0.8 if CUDA else 1 << 30
        for context in contexts:
            # batch 1, and the largest batch the all-MLA cache allows at this context (so its cache dominates)
            big = max(1, int(free // (cache_spec(all_mla(base), DTYPE, BLOCK).bytes_per_token * context)))
            for batch in sorted({1, min(big, args.max_batch)}):
                if spec.bytes_per_token * context * batch + spec.bytes_per_slot * batch > free:
                    rows.append({"model": name, "context": context, "batch": batch, "decode ms": "out of memory"})
                    continue
                ms = 1e3 * synthetic_decode(model, batch, context, args.steps if CUDA else 2)
                rows.append({"model": name, "context": context, "batch": batch, "decode ms": ms})
                print(rows[-1], flush=True)
        for length in ([131072, 1048576] if CUDA else [128]):
            rows.append({"model": name, "context": length, "batch": 1, "prefill s": prefill_seconds(model, length)})
            print(rows[-1], flush=True)
        del model
        if CUDA:
            torch.cuda.empty_cache()
    table = markdown_table(rows, ["model", "context", "batch", "decode ms", "prefill s"])
    finish("serving_long", args, table, rows, {})


def peer(args: argparse.Namespace) -> None:
    """Ours against transformers' native model on the same weights, handed over as a saved checkpoint (the 48B
    model's 98 GB need as much free disk: ``--experts`` scales the expert count down where there is less)."""
    import tempfile

    import transformers

    from kimi_linear.engine import EngineConfig, LLMEngine, SamplingParams, SchedulerConfig

    overrides = {"num_experts": args.experts} if args.experts else {}
    config = (KimiLinearConfig.from_preset(args.preset, **overrides) if CUDA
              else KimiLinearConfig.from_preset("test"))
    context, tokens = (4096, args.steps) if CUDA else (64, 4)
    rows = []
    model = build(config)
    for batch in (1, 32) if CUDA else (1, 2):
        engine = LLMEngine(model, EngineConfig(SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=16384)))
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        for _ in range(batch):
            engine.add_request(torch.randint(0, 256, (context,)).tolist(), params)
        while engine.num_waiting or any(s.computed < len(s.tokens) - 1 for s in engine.scheduler.running):
            engine.step()
        start, steps = time.perf_counter(), 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        rows.append({"impl": "kimi-linear", "batch": batch, "context": context,
                     "ms per token": 1e3 * (time.perf_counter() - start) / steps})
        print(rows[-1], flush=True)
        del engine
    with tempfile.TemporaryDirectory(dir=args.tmp) as directory:
        model.save_pretrained(directory)
        del model
        if CUDA:
            torch.cuda.empty_cache()
        hf = transformers.KimiLinearForCausalLM.from_pretrained(directory, dtype=DTYPE).to(DEVICE).eval()
    for batch in (1, 32) if CUDA else (1, 2):
        ids = torch.randint(0, 256, (batch, context), device=DEVICE)
        with torch.no_grad():
            hf.generate(ids[:, :8], max_new_tokens=2, do_sample=False)  # warm-up
            if CUDA:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            if CUDA:
                torch.cuda.synchronize()
        rows.append({"impl": "transformers", "batch": batch, "context": context,
                     "ms per token": 1e3 * (time.perf_counter() - start) / (out.shape[1] - context)})
        print(rows[-1], flush=True)
    for r in rows:
        if r["impl"] == "transformers":
            ours = next(o for o in rows if o["impl"] == "kimi-linear" and o["batch"] == r["batch"])
            r["ours faster by"] = r["ms per token"] / ours["ms per token"]
    table = markdown_table(rows, ["impl", "batch", "context", "ms per token", "ours faster by"])
    finish("serving_peer", args, table, rows, {"fla": _fla_version(), "transformers": transformers.__version__,
                                               "experts": config.num_experts})


def _fla_version() -> str | None:
    try:
        import fla
    except ImportError:
        return None
    return getattr(fla, "__version__", "unknown")


def finish(name: str, args: argparse.Namespace, table: str, rows: list[dict], extra: dict) -> None:
    print(table)
    if CUDA:
        write_results(name, {**environment(), "preset": args.preset, **extra}, rows, table)
    else:
        print("(a check of the code at the `test` preset's shapes on the CPU: GPU numbers need CUDA)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["floor", "long", "peer"])
    parser.add_argument("--preset", default="kimi-linear-48b-a3b")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--experts", type=int, default=0, help="peer: fewer experts, to fit the checkpoint on disk")
    parser.add_argument("--tmp", default=None, help="peer: where the checkpoint handed to transformers is written")
    args = parser.parse_args()
    {"floor": floor, "long": long_context, "peer": peer}[args.what](args)


if __name__ == "__main__":
    main()
