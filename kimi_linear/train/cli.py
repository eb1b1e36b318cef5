"""``kimi-linear train`` and ``kimi-linear plot``: argument parsing on top of :class:`TrainConfig`.

Every training option defaults to ``None`` on the command line so that ``--resume`` can tell what the user set:
unset options take the checkpoint's values (or, for a new run, :class:`TrainConfig`'s defaults); set ones must
agree with the checkpoint where that matters (see ``TrainConfig.RESUME_KEYS``).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from kimi_linear.config import PRESETS
from kimi_linear.errors import UserError
from kimi_linear.train.checkpointing import find_checkpoint, load_trainer_state

# (flag, TrainConfig field, argparse options)
OPTIONS: list[tuple[str, str, dict]] = [
    ("--name", "name", dict(help="run name: the run is saved to RUNS_DIR/NAME (default PRESET-DATA, e.g. "
                                 "tiny-stdlib)")),
    ("--runs-dir", "runs_dir", dict(help="directory of runs (default runs)")),
    ("--preset", "preset", dict(choices=sorted(PRESETS), help="model preset (default tiny)")),
    ("--config", "model_config", dict(help="model config.json (or a model directory) instead of a preset")),
    ("--data", "data", dict(nargs="+", help="text / .jsonl files or directories (default: the Python standard "
                                            "library's sources)")),
    ("--seq-len", "seq_len", dict(type=int, help="tokens per row")),
    ("--batch-size", "batch_size", dict(type=int, help="rows per optimizer step, all processes together")),
    ("--steps", "steps", dict(type=int, help="optimizer steps")),
    ("--lr", "lr", dict(type=float, help="peak learning rate (Muon and AdamW)")),
    ("--schedule", "schedule", dict(choices=["wsd", "cosine"], help="learning-rate schedule")),
    ("--warmup-steps", "warmup_steps", dict(type=int)),
    ("--decay-fraction", "decay_fraction", dict(type=float, help="WSD: fraction of the steps spent decaying")),
    ("--min-lr-ratio", "min_lr_ratio", dict(type=float, help="final learning rate / peak")),
    ("--weight-decay", "weight_decay", dict(type=float)),
    ("--grad-clip", "grad_clip", dict(type=float, help="max global gradient norm (0: off)")),
    ("--balance-gamma", "balance_gamma", dict(type=float, help="router bias update speed (aux-loss-free)")),
    ("--balance-loss-coef", "balance_loss_coef", dict(type=float, help="sequence-level balance loss weight")),
    ("--val-fraction", "val_fraction", dict(type=float, help="fraction of documents held out")),
    ("--val-rows", "val_rows", dict(type=int, help="at most this many validation rows")),
    ("--eval-every", "eval_every", dict(type=int)),
    ("--save-every", "save_every", dict(type=int)),
    ("--log-every", "log_every", dict(type=int)),
    ("--seed", "seed", dict(type=int)),
    ("--device", "device", dict(choices=["auto", "cpu", "cuda"])),
    ("--compile", "compile", dict(action="store_const", const=True, help="torch.compile the model")),
    ("--activation-checkpointing", "activation_checkpointing",
     dict(action="store_const", const=True, help="recompute layer activations in the backward pass")),
    ("--expert-parallel", "expert_parallel",
     dict(action="store_const", const=True, help="shard MoE experts across processes (torchrun)")),
    ("--no-progress", "progress", dict(action="store_const", const=False, help="no progress bar")),
]


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, dest, options in OPTIONS:
        parser.add_argument(flag, dest=dest, default=None, **options)
    parser.add_argument("--resume", action="store_true", help="continue the run RUNS_DIR/NAME from its checkpoint")


def train_config_from_args(args: argparse.Namespace):
    """The TrainConfig the arguments ask for (checkpoint values fill unset options when resuming)."""
    from kimi_linear.train.trainer import TrainConfig

    given = {dest: getattr(args, dest) for _, dest, _ in OPTIONS if getattr(args, dest, None) is not None}
    if "preset" in given and "model_config" in given:
        raise UserError("--preset and --config both choose the model: give one of them")
    base = TrainConfig(**{k: v for k, v in given.items() if k in ("name", "runs_dir", "preset", "model_config",
                                                                   "data")})
    if args.resume:
        checkpoint = find_checkpoint(base.run_dir)
        if checkpoint is None:
            raise UserError(f"nothing to resume: {base.run_dir} holds no checkpoint")
        saved = load_trainer_state(checkpoint)["config"]
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        values = {k: v for k, v in saved.items() if k in fields}
        if "model_config" in given:
            values.pop("preset", None)
        return TrainConfig(**{**values, **given, "resume": True})
    return TrainConfig(**given)


def run_train(args: argparse.Namespace) -> int:
    from kimi_linear.train.trainer import Trainer, close_distributed, summary_line

    start = time.perf_counter()
    cfg = train_config_from_args(args)
    try:
        trainer = Trainer(cfg)
        summary = trainer.train()
        if trainer.env.is_main:
            print(summary_line(summary, time.perf_counter() - start), flush=True)
    finally:
        close_distributed()
    return 0


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (holds metrics.jsonl)")
    parser.add_argument("--out", help="PNG to write (default RUN_DIR/training.png)")


def run_plot(args: argparse.Namespace) -> int:
    from kimi_linear.train.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0
