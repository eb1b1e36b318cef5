"""Block Attention Residuals at small scale: the study (CPU) and the cost (GPU).

``study`` (default; runs on the CPU): the built-in corpus, the `tiny` preset (4 decoder layers = 8 sublayers) trained
three ways with the same tokens and seeds — the standard residual, Block AttnRes (2 sublayers per block: 4 blocks +
the embedding) and Full AttnRes (every sublayer a source) — 3 seeds each. Reports validation bits per byte (mean and
spread over seeds) and plots the per-layer hidden-state RMS and gradient norm at the end of training, which the
paper reports as bounded and more uniform with AttnRes.

``cost --device cuda`` (the GPU issue): training-step time with and without AttnRes on a 54-sublayer model with the
released layer pattern scaled to one GPU, decode time per output token through the engine for the 48B presets with
and without AttnRes (random bf16 weights, batch 1 and 64 at 4K context), and prefill time at 32K. On the CPU it runs
the same code once at tiny shapes as a check and writes nothing.

Run: ``python benchmarks/attnres.py [study|cost] ...`` (results in benchmarks/results/attnres_*.{json,md,png}).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, environment, markdown_table, median_seconds, random_model, write_results  # noqa: E402,E501
from kimi_linear import KimiLinearConfig  # noqa: E402
from kimi_linear.train.metrics import read_metrics  # noqa: E402
from kimi_linear.train.trainer import TrainConfig, Trainer  # noqa: E402

VARIANTS = {"baseline": None, "block": 2, "full": 1}  # attn_res_block_size


def study(args: argparse.Namespace) -> None:
    rows, final = [], {}
    with tempfile.TemporaryDirectory() as runs:
        for name, block in VARIANTS.items():
            for seed in args.seeds:
                cfg = TrainConfig(name=f"{name}-{seed}", runs_dir=runs, preset=args.preset, steps=args.steps,
                                  seq_len=args.seq_len, batch_size=args.batch_size, seed=seed,
                                  attn_res_block_size=block, eval_every=args.steps, save_every=args.steps,
                                  log_every=args.log_every, progress=False, device="cpu")
                start = time.perf_counter()
                summary = Trainer(cfg).train()
                records = [r for r in read_metrics(str(cfg.run_dir / "metrics.jsonl")) if r["kind"] == "train"]
                final[(name, seed)] = records[-1]
                rows.append({"variant": name, "attn_res_block_size": block, "seed": seed,
                             "val bits/byte": summary["val_bits_per_byte"], "seconds": time.perf_counter() - start})
                print(rows[-1], flush=True)
    table_rows = []
    for name in VARIANTS:
        bpb = [r["val bits/byte"] for r in rows if r["variant"] == name]
        table_rows.append({"variant": name, "attn_res_block_size": VARIANTS[name], "seeds": len(bpb),
                           "val bits/byte mean": statistics.mean(bpb),
                           "spread (max-min)": max(bpb) - min(bpb),
                           "std": statistics.stdev(bpb) if len(bpb) > 1 else 0.0})
    plot_depth(final, RESULTS / "attnres_depth.png")
    table = markdown_table(table_rows, ["variant", "attn_res_block_size", "seeds", "val bits/byte mean",
                                        "spread (max-min)", "std"])
    table += "\n\n" + markdown_table(rows, ["variant", "seed", "val bits/byte", "seconds"])
    table += "\n\nPer-layer hidden-state RMS and gradient norm at the last step: attnres_depth.png\n"
    print(table)
    meta = {**environment(), "preset": args.preset, "steps": args.steps, "seq_len": args.seq_len,
            "batch_size": args.batch_size, "threads": torch.get_num_threads()}
    write_results("attnres_study", meta, rows, table)


def plot_depth(final: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (name, seed), record in sorted(final.items()):
        style = {"baseline": "-", "block": "--", "full": ":"}[name]
        layers = range(1, len(record["layer_rms"]) + 1)
        axes[0].plot(layers, record["layer_rms"], style, label=f"{name} (seed {seed})")
        axes[1].plot(layers, record["layer_grad_norm"], style, label=f"{name} (seed {seed})")
    axes[0].set(title="hidden-state RMS (layer input)", xlabel="decoder layer")
    axes[1].set(title="gradient norm of the layer's parameters", xlabel="decoder layer", yscale="log")
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# ---- cost (GPU) ------------------------------------------------------------------------------------------------------
def scaled_54_sublayers(attn_res: int | None, hidden: int, experts: int) -> KimiLinearConfig:
    """The released 27-layer pattern (54 sublayers) with narrower layers and fewer experts so it fits one GPU."""
    return KimiLinearConfig.from_preset(
        "kimi-linear-48b-a3b", hidden_size=hidden, num_experts=experts, vocab_size=32768,
        attn_res_block_size=attn_res)


def cost(args: argparse.Namespace) -> None:
    from kimi_linear.engine import EngineConfig, LLMEngine, SamplingParams, SchedulerConfig

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    hidden, experts = (args.hidden, args.experts) if cuda else (64, 4)
    rows = []
    for attn_res in (None, 6):  # training step
        config = scaled_54_sublayers(attn_res, hidden, experts) if cuda else KimiLinearConfig.from_preset(
            "test", attn_res_block_size=attn_res)
        model = random_model(config, args.device, dtype).train()
        x = torch.randint(0, 256, (args.train_batch, args.train_len if cuda else 64), device=args.device)

        def step(model=model, x=x):
            model(x, labels=x).loss.backward()
            model.zero_grad(set_to_none=True)

        seconds = median_seconds(step, iters=args.repeat if cuda else 1)
        rows.append({"case": "train step", "attn_res": attn_res, "ms": 1e3 * seconds})
        del model
    for preset in ("kimi-linear-48b-a3b", "kimi-linear-48b-a3b-attnres"):  # decode and prefill through the engine
        config = KimiLinearConfig.from_preset(preset) if cuda else KimiLinearConfig.from_preset(
            "test", attn_res_block_size=6 if preset.endswith("attnres") else None)
        model = random_model(config, args.device, dtype)
        for batch in (1, 64) if cuda else (1, 2):
            context = 4096 if cuda else 64
            engine = LLMEngine(model, EngineConfig(SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=8192)))
            params = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens if cuda else 4, ignore_eos=True)
            for _ in range(batch):
                engine.add_request(torch.randint(0, 256, (context,)).tolist(), params)
            while any(s.computed < len(s.tokens) - 1 for s in engine.scheduler.running) or engine.num_waiting:
                engine.step()  # the prefills
            steps, start = 0, time.perf_counter()
            while engine.has_unfinished():
                engine.step()
                steps += 1
            if cuda:
                torch.cuda.synchronize()
            rows.append({"case": f"decode batch {batch} @ {context}", "attn_res": preset.endswith("attnres"),
                         "ms": 1e3 * (time.perf_counter() - start) / max(steps, 1)})
        ids = torch.randint(0, 256, (1, 32768 if cuda else 128), device=args.device)
        with torch.no_grad():
            rows.append({"case": f"prefill {ids.shape[1]}", "attn_res": preset.endswith("attnres"),
                         "ms": 1e3 * median_seconds(lambda model=model, ids=ids: model(ids, num_logits_to_keep=1),
                                                    iters=args.repeat if cuda else 1)})
        del model
    table = markdown_table(rows, ["case", "attn_res", "ms"])
    print(table)
    if cuda:
        write_results("attnres_cost", {**environment(), "hidden (train)": hidden, "experts (train)": experts}, rows,
                      table)
    else:
        print("(a check at tiny shapes on the CPU: GPU numbers need --device cuda on a GPU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode")
    s = sub.add_parser("study")
    s.add_argument("--preset", default="tiny")
    s.add_argument("--steps", type=int, default=150)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    s.add_argument("--log-every", type=int, default=10)
    c = sub.add_parser("cost")
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c.add_argument("--hidden", type=int, default=1024)
    c.add_argument("--experts", type=int, default=16)
    c.add_argument("--train-batch", type=int, default=4)
    c.add_argument("--train-len", type=int, default=4096)
    c.add_argument("--decode-tokens", type=int, default=64)
    c.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if args.mode == "cost":
        cost(args)
    else:
        if args.mode is None:
            args = s.parse_args([])
        study(args)


if __name__ == "__main__":
    main()
