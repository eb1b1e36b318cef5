"""Decode over 2 GPUs: tensor parallel (TP2, one engine over both) against one GPU (TP1) and against two
data-parallel replicas (DP2: an engine per GPU, each with half the requests, running at the same time).

Weights: the 48B preset in bf16, random, when it fits one GPU with a quarter of the GPU left for the pools (an H200
holds its ~98 GB); else the 48B layer shapes with as many of its 27 layers as fit (the results say which). Each
TP2 rank draws its shard directly in its local shapes: a shard of *some* 48B model, which times the same and never
needs the whole model in one place.

For each concurrency c: c requests of ``--prompt-tokens`` random tokens and ``--output-tokens`` greedy tokens each,
all arriving at once (prefix caching off). TPOT = a request's time between output tokens, averaged over requests;
throughput = output tokens / wall time (prefill included). Every configuration runs in fresh processes.

On a machine without 2 GPUs the three configurations run on the CPU with the ``test`` preset (gloo for TP2): a
check that the paths work; nothing is written.

Run: ``python benchmarks/tensor_parallel.py`` (writes benchmarks/results/tensor_parallel.{json,md} on GPUs).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, markdown_table, write_results  # noqa: E402
from benchmarks.engine import drive, percentile  # noqa: E402
from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM  # noqa: E402
from kimi_linear.engine import EngineConfig, LLMEngine, SamplingParams, SchedulerConfig  # noqa: E402
from kimi_linear.parallel.engine import TensorParallelEngine  # noqa: E402
from kimi_linear.parallel.group import TensorParallelGroup  # noqa: E402
from kimi_linear.parallel.launch import start_group  # noqa: E402
from kimi_linear.parallel.tensor import attach_all_reduces, tensor_parallel_config  # noqa: E402

WORLD = 2
WEIGHT_SHARE = 0.75  # of a GPU's memory the weights may take (the rest: pools and activations)


@dataclass(frozen=True)
class Spec:
    config: dict  # KimiLinearConfig.to_dict()
    dtype: torch.dtype
    device: str  # "cuda" or "cpu"
    concurrency: tuple[int, ...]
    prompt_tokens: int
    output_tokens: int
    memory_budget: int | None  # bytes for the pools; None: the engine's default (90 % of free GPU memory)
    seed: int = 0

    def device_of(self, rank: int) -> str:
        return f"cuda:{rank}" if self.device == "cuda" else "cpu"


@contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_model(spec: Spec, world: int, device: str) -> KimiLinearForCausalLM:
    """Random weights drawn in place on ``device`` in the spec's dtype (A_log, dt_bias and the router's correction
    bias fp32, as loaded checkpoints keep them); with ``world`` > 1, in one rank's local shapes."""
    config = KimiLinearConfig.from_dict(spec.config)
    torch.manual_seed(spec.seed)
    with torch.device(device), default_dtype(spec.dtype):
        return KimiLinearForCausalLM(tensor_parallel_config(config, world)).eval()


def random_shard(rank: int, world: int, group: TensorParallelGroup, *, spec: Spec) -> KimiLinearForCausalLM:
    """A :data:`~kimi_linear.parallel.launch.Loader`: a random rank shard with its all-reduces."""
    model = random_model(spec, world, str(group.device))
    attach_all_reduces(model, group.data)
    return model


def engine_config(spec: Spec, max_num_seqs: int, budget: int | None) -> EngineConfig:
    return EngineConfig(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=4096,
                                        enable_prefix_caching=False),
                        memory_budget=budget, max_model_len=spec.prompt_tokens + spec.output_tokens + 1)


def prompts(spec: Spec, n: int, vocab: int, offset: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(spec.seed + 1)
    every = torch.randint(0, vocab, (offset + n, spec.prompt_tokens), generator=gen)
    return every[offset:].tolist()


def timed_runs(engine: LLMEngine, spec: Spec, share: int = 1, part: int = 0, barrier=None) -> list[dict]:
    """For each concurrency c: this engine's part of c requests (``part`` of ``share``), after a warm-up request.
    Returns the raw timings of each run (elapsed, per-request TTFT and ITL, output tokens)."""
    params = SamplingParams(temperature=0.0, max_tokens=spec.output_tokens, ignore_eos=True)
    vocab = min(engine.vocab_size, 32000)
    drive(engine, [(0.0, prompts(spec, 1, vocab)[0][:16], SamplingParams(max_tokens=4))])  # compiles kernels
    runs = []
    for c in spec.concurrency:
        mine = prompts(spec, c, vocab)[part::share]
        if barrier is not None:
            barrier.wait()  # the replicas start each run together
        runs.append(drive(engine, [(0.0, p, params) for p in mine]))
    return runs


def run_tp1(spec: Spec, results: dict) -> None:
    _one_thread_on_cpu(spec)
    model = random_model(spec, 1, spec.device_of(0))
    engine = LLMEngine(model, engine_config(spec, max(spec.concurrency), spec.memory_budget))
    results["TP1"] = [timed_runs(engine, spec)]


def run_dp_replica(rank: int, spec: Spec, barrier, results: dict) -> None:
    _one_thread_on_cpu(spec)
    model = random_model(spec, 1, spec.device_of(rank))
    engine = LLMEngine(model, engine_config(spec, max(spec.concurrency), spec.memory_budget))
    results[f"DP2/{rank}"] = timed_runs(engine, spec, WORLD, rank, barrier)


def run_tp2(spec: Spec, results: dict) -> None:
    with start_group(WORLD, functools.partial(random_shard, spec=spec), device=spec.device) as (group, model):
        budget = spec.memory_budget if spec.device == "cpu" else int(0.9 * group.free_memory)
        engine = TensorParallelEngine(model, group, engine_config(spec, max(spec.concurrency), budget))
        results["TP2"] = [timed_runs(engine, spec)]


def _one_thread_on_cpu(spec: Spec) -> None:
    if spec.device == "cpu":  # the CPU check: two processes share the cores
        torch.set_num_threads(1)


def measure(spec: Spec) -> dict[str, list[list[dict]]]:
    """Each configuration's timings (one list of runs per replica), every configuration in fresh processes."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        for target in (run_tp1, run_tp2):
            _join([ctx.Process(target=target, args=(spec, results))])
        barrier = manager.Barrier(WORLD)
        _join([ctx.Process(target=run_dp_replica, args=(r, spec, barrier, results)) for r in range(WORLD)])
        out = dict(results)
    return {"TP1": out["TP1"], "TP2": out["TP2"], "DP2": [out[f"DP2/{r}"] for r in range(WORLD)]}


def _join(procs: list[mp.Process]) -> None:
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"a benchmark process failed: exit codes {[p.exitcode for p in procs]}")


def rows(spec: Spec, timings: dict[str, list[list[dict]]]) -> list[dict]:
    """One row per configuration and concurrency: the replicas of a run combined (their tokens over the longer
    wall time)."""
    out = []
    for name, replicas in timings.items():
        for i, c in enumerate(spec.concurrency):
            runs = [r[i] for r in replicas]
            itl = [x for r in runs for x in r["itl"]]
            ttft = [x for r in runs for x in r["ttft"]]
            tokens = sum(r["output_tokens"] for r in runs)
            out.append({"config": name, "concurrency": c, "TPOT ms": 1e3 * statistics.mean(itl),
                        "TPOT p90 ms": 1e3 * percentile(itl, 0.9), "TTFT mean s": statistics.mean(ttft),
                        "output tok/s": tokens / max(r["elapsed"] for r in runs), "output tokens": tokens})
    return out


def gpu_config(preset: str) -> tuple[KimiLinearConfig, str]:
    """The preset if its weights fit one GPU's WEIGHT_SHARE, else its shapes with fewer layers (MLA every 4th)."""
    config = KimiLinearConfig.from_preset(preset)
    with torch.device("meta"):
        params = KimiLinearForCausalLM(config).num_parameters()
    room = WEIGHT_SHARE * min(torch.cuda.get_device_properties(r).total_memory for r in range(WORLD))
    if 2 * params <= room:
        return config, f"{preset} ({2 * params / 1e9:.1f} GB bf16)"
    layers = int(config.num_hidden_layers * room / (2 * params))
    mla = [i for i in range(4, layers + 1, 4)] or [layers]
    scaled = KimiLinearConfig.from_preset(preset, num_hidden_layers=layers, linear_attn_config={
        **config.linear_attn_config, "full_attn_layers": mla,
        "kda_layers": [i for i in range(1, layers + 1) if i not in mla]})
    return scaled, f"{preset} shapes, {layers} of {config.num_hidden_layers} layers (the whole model does not fit)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="kimi-linear-48b-a3b")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=128)
    args = parser.parse_args()
    gpus = torch.cuda.device_count() >= WORLD
    if gpus:
        config, label = gpu_config(args.preset)
        spec = Spec(config.to_dict(), torch.bfloat16, "cuda", tuple(args.concurrency), args.prompt_tokens,
                    args.output_tokens, None)
    else:
        config, label = KimiLinearConfig.from_preset("test"), "test preset (CPU check)"
        spec = Spec(config.to_dict(), torch.float32, "cpu", (1, 4), 32, 8, 64 << 20)
    table = rows(spec, measure(spec))
    columns = ["config", "concurrency", "TPOT ms", "TPOT p90 ms", "TTFT mean s", "output tok/s", "output tokens"]
    print(markdown_table(table, columns))
    want = {c: c * spec.output_tokens for c in spec.concurrency}
    bad = [r for r in table if r["output tokens"] != want[r["concurrency"]]]
    if bad:
        raise SystemExit(f"runs that did not produce every token: {bad}")
    if not gpus:
        print("CPU check only (fewer than 2 GPUs): nothing written")
        return
    meta = {**environment(), "model": label, "dtype": "bfloat16", "prompt tokens": spec.prompt_tokens,
            "output tokens": spec.output_tokens, "weights": "random; TP2 ranks draw their shards directly",
            "configs": "TP1: one GPU; TP2: tensor parallel over 2 GPUs; DP2: an engine per GPU, half the requests "
                       "each, started together"}
    write_results("tensor_parallel", meta, table, markdown_table(table, columns))


if __name__ == "__main__":
    main()
