"""Training throughput and MFU of a full training step (forward, backward, clipping, Muon/AdamW, router-bias
update) on the ``1b`` preset (~0.9B parameters, ~0.3B activated), bf16 compute over fp32 master weights (FSDP2
mixed precision, also on one GPU).

Rows (one GPU): ours with the Triton KDA kernels (backend ``triton``), ours with the PyTorch
chunkwise KDA (``torch``), and transformers' native ``kimi_linear`` (fla-core kernels when installed) on the same
config and weights with the same optimizer. Ours trains on packed documents (the real pipeline: built-in corpus,
``position_ids`` restarting per document); transformers gets the same rows unpacked (it has no packed training path).

Distributed (``torchrun --nproc-per-node N benchmarks/train.py --distributed``): FSDP2 + expert parallel over N GPUs,
global batch = N x the per-GPU batch; with a one-GPU result of the same run (``--baseline``), the scaling
efficiency = tokens/s on N GPUs / (N x tokens/s on one).

MFU = tokens/s x training FLOPs per token (kimi_linear.train.metrics) / (GPUs x dense bf16 peak).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, environment, markdown_table, median_seconds, write_results  # noqa: E402
from kimi_linear.ops.backend import set_backend  # noqa: E402
from kimi_linear.train.checkpointing import save_model  # noqa: E402
from kimi_linear.train.distributed import apply_fsdp, clip_grad_norm, uses_fsdp  # noqa: E402
from kimi_linear.train.metrics import peak_flops  # noqa: E402
from kimi_linear.train.muon import build_optimizer  # noqa: E402
from kimi_linear.train.trainer import TrainConfig, Trainer  # noqa: E402

COLUMNS = ["impl", "gpus", "batch", "seq_len", "step ms", "tokens/s", "MFU %", "peak GiB"]


def release_memory() -> None:
    """Free cached blocks and restart the peak-memory counter (between rows)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def make_trainer(args, run_dir: str, batch: int, expert_parallel: bool = False) -> Trainer:
    cfg = TrainConfig(name="bench", runs_dir=run_dir, preset=args.preset, seq_len=args.seq_len, batch_size=batch,
                      steps=1000, warmup_steps=10, progress=False, device=args.device,
                      expert_parallel=expert_parallel, data=args.data or [])
    return Trainer(cfg)


def row(impl: str, trainer: Trainer, gpus: int, batch: int, seconds: float) -> dict:
    tokens = batch * trainer.cfg.seq_len
    tps = tokens / seconds
    peak = peak_flops(trainer.env.device)
    mfu = 100 * tps * trainer.flops_per_token / (gpus * peak) if peak else None
    memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"impl": impl, "gpus": gpus, "batch": batch, "seq_len": trainer.cfg.seq_len, "step ms": 1e3 * seconds,
            "tokens/s": tps, "MFU %": mfu, "peak GiB": memory}


def bench_ours(args, backend: str, batch: int, run_dir: str) -> tuple[dict, Trainer]:
    set_backend(backend)
    release_memory()
    trainer = make_trainer(args, run_dir, batch)
    seconds = median_seconds(trainer.train_step, args.warmup, args.iters)
    return row(f"ours ({backend} KDA)", trainer, 1, batch, seconds), trainer


def bench_transformers(args, trainer: Trainer, batch: int) -> dict:
    """transformers' model loaded from our weights, wrapped the same way (FSDP2 bf16 mixed precision), same
    optimizer and batch (unpacked)."""
    import transformers

    with tempfile.TemporaryDirectory() as weights:
        save_model(trainer.model, weights, trainer.env.rank)
        device = trainer.env.device
        del trainer.model, trainer.forward, trainer.optimizer
        release_memory()
        model = transformers.AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32).to(device).train()
    if uses_fsdp(trainer.env):
        apply_fsdp(model, trainer.env)
    optimizer = build_optimizer(model, args.lr, 0.1)
    ids = trainer.data.train_batch(0)[0].to(device)
    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        clip_grad_norm([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = median_seconds(step, args.warmup, args.iters)
    return row(f"transformers {transformers.__version__}", trainer, 1, batch, seconds)


def single_gpu(args) -> list[dict]:
    """One row per backend, then transformers on the last backend's weights and batch. A row that fails (say,
    out of memory) records its error and the others still run."""
    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        for backend in args.backends:
            batch = args.batch_size if backend == "triton" else args.torch_batch_size
            trainer = None
            try:
                result, trainer = bench_ours(args, backend, batch, os.path.join(run_dir, backend))
                rows.append(result)
                if args.transformers and backend == args.backends[-1]:
                    print(result, flush=True)
                    rows.append(bench_transformers(args, trainer, batch))
            except Exception as e:  # keep the other rows
                traceback.print_exc()
                rows.append({"impl": f"{backend} row", "batch": batch, "error": f"{type(e).__name__}: {e}"[:300]})
            print(rows[-1], flush=True)
            del trainer
            release_memory()
    return rows


def distributed(args) -> list[dict]:
    backend = "triton" if torch.cuda.is_available() else "torch"
    set_backend(backend)
    with tempfile.TemporaryDirectory() as run_dir:
        world = int(os.environ["WORLD_SIZE"])
        trainer = make_trainer(args, run_dir, args.batch_size * world, expert_parallel=True)
        seconds = median_seconds(trainer.train_step, args.warmup, args.iters)
        result = row(f"ours FSDP2 + EP ({backend} KDA)", trainer, world, args.batch_size * world, seconds)
    if args.baseline and os.path.exists(args.baseline):
        base = json.loads(Path(args.baseline).read_text())["rows"][0]
        result["scaling efficiency"] = result["tokens/s"] / (world * base["tokens/s"])
    return [result] if trainer.env.is_main else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per GPU (Triton rows)")
    parser.add_argument("--torch-batch-size", type=int, default=2, help="rows for the PyTorch-KDA row (memory)")
    parser.add_argument("--backends", nargs="+", default=["triton", "torch"], choices=["triton", "torch"])
    parser.add_argument("--no-transformers", dest="transformers", action="store_false")
    parser.add_argument("--distributed", action="store_true", help="FSDP2 + EP under torchrun")
    parser.add_argument("--baseline", help="one-GPU results JSON for the scaling efficiency")
    parser.add_argument("--data", nargs="+", help="training files (default: the built-in corpus)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--name", default=None, help="results file name (default train / train_distributed)")
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args()

    rows = distributed(args) if args.distributed else single_gpu(args)
    if not rows:
        return
    meta = {**environment(), "preset": args.preset, "KIMI_LINEAR_BACKEND": "per row"}
    try:
        import fla

        meta["fla-core"] = getattr(fla, "__version__", "installed")
    except ImportError:
        meta["fla-core"] = "not installed"
    columns = COLUMNS + [c for c in ("scaling efficiency", "error") if any(c in r for r in rows)]
    table = markdown_table(rows, columns)
    print(table)
    name = args.name or ("train_distributed" if args.distributed else "train")
    write_results(name, meta, rows, table, Path(args.results_dir))


if __name__ == "__main__":
    main()
