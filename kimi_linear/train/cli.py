"""``kimi-linear train`` and ``kimi-linear plot``: argument parsing on top of :class:`TrainConfig`.

Every training option defaults to ``None`` on the command line so that ``--resume`` can tell what the user set:
unset options take the checkpoint's values (or, for a new run, :class:`TrainConfig`'s defaults); set ones must
agree with the checkpoint where that matters (see ``TrainConfig.RESUME_KEYS``). ``--help`` still shows every
default: :class:`TrainHelpFormatter` appends :class:`TrainConfig`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from typing import TYPE_CHECKING

import torch

from kimi_linear.config import PRESETS
from kimi_linear.errors import UserError
from kimi_linear.train.checkpointing import find_checkpoint, load_trainer_state
from kimi_linear.train.data import TEXT_SUFFIXES

if TYPE_CHECKING:  # imported lazily at run time: the trainer's imports would slow every command's start
    from kimi_linear.train.trainer import TrainConfig

DATA_HELP = (
    "training data: files and/or directories. A .jsonl file holds one document per line, a JSON object with a "
    'string "text" field ({"text": "..."}; other fields are ignored); any other file is one document (read as '
    "UTF-8); a directory is searched recursively for files ending in " + " ".join(TEXT_SUFFIXES)
)

# (flag, TrainConfig field, argparse options)
OPTIONS: list[tuple[str, str, dict]] = [
    ("--name", "name", dict(help="run name: the run is saved to RUNS_DIR/NAME")),
    ("--runs-dir", "runs_dir", dict(help="directory of runs")),
    ("--preset", "preset", dict(choices=sorted(PRESETS), help="model preset")),
    ("--config", "model_config", dict(help="model config.json (or a model directory) instead of a preset")),
    ("--data", "data", dict(nargs="+", help=DATA_HELP)),
    ("--seq-len", "seq_len", dict(type=int, help="tokens per row")),
    ("--batch-size", "batch_size", dict(type=int, help="rows per optimizer step, all processes together")),
    ("--steps", "steps", dict(type=int, help="optimizer steps")),
    ("--lr", "lr", dict(type=float, help="peak learning rate of Muon and AdamW")),
    ("--schedule", "schedule", dict(choices=["wsd", "cosine"], help="learning-rate schedule")),
    ("--warmup-steps", "warmup_steps", dict(type=int, help="steps of linear warmup to the peak learning rate")),
    ("--decay-fraction", "decay_fraction", dict(type=float, help="WSD: fraction of the steps spent decaying")),
    ("--min-lr-ratio", "min_lr_ratio", dict(type=float, help="final learning rate / peak")),
    ("--weight-decay", "weight_decay", dict(type=float, help="decoupled weight decay of Muon and AdamW")),
    ("--grad-clip", "grad_clip", dict(type=float, help="max global gradient norm, 0 = no clipping")),
    ("--balance-gamma", "balance_gamma", dict(type=float, help="router bias update speed of aux-loss-free balancing")),
    ("--balance-loss-coef", "balance_loss_coef", dict(type=float, help="sequence-level balance loss weight")),
    ("--val-fraction", "val_fraction", dict(type=float, help="fraction of documents held out")),
    ("--val-rows", "val_rows", dict(type=int, help="at most this many validation rows")),
    ("--eval-every", "eval_every", dict(type=int, help="validate every this many steps and at the end")),
    ("--save-every", "save_every", dict(type=int, help="checkpoint every this many steps and at the end")),
    ("--log-every", "log_every", dict(type=int, help="log metrics every this many steps")),
    ("--seed", "seed", dict(type=int, help="seed of the initialisation and the data order")),
    ("--device", "device", dict(choices=["auto", "cpu", "cuda"], help="where to train; auto = cuda if available")),
    ("--compile", "compile", dict(action="store_const", const=True, help="torch.compile the model")),
    ("--activation-checkpointing", "activation_checkpointing",
     dict(action="store_const", const=True, help="recompute layer activations in the backward pass")),
    ("--expert-parallel", "expert_parallel",
     dict(action="store_const", const=True, help="shard MoE experts across processes, under torchrun")),
    ("--attn-res-block-size", "attn_res_block_size",
     dict(type=int, metavar="N", help="Block Attention Residuals with N sublayers per block (1: Full AttnRes; "
                                      "default: the model config's, usually the standard residual)")),
    ("--no-progress", "progress",
     dict(action="store_const", const=False, help="no progress bar; a resumed run does not inherit this choice")),
]

# Defaults that TrainConfig resolves later, or that read better in words than as its raw value.
DEFAULT_TEXT = {
    "name": "PRESET-DATA, e.g. tiny-stdlib",
    "model_config": "none, the preset is used",
    "data": "the Python standard library's .py sources",
    "warmup_steps": "10% of --steps",
    "progress": "a progress bar is shown",
    "resume": "start a new run",
}


def default_text(dest: str) -> str:
    """``TrainConfig``'s default for a field, as ``--help`` shows it."""
    if dest in DEFAULT_TEXT:
        return DEFAULT_TEXT[dest]
    from kimi_linear.train.trainer import TrainConfig

    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == dest)
    value = field.default_factory() if field.default is dataclasses.MISSING else field.default
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


class TrainHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: ...)`` from :class:`TrainConfig` to each option's help. The parser's own defaults are
    None (see the module docstring), so argparse's ``%(default)s`` would say nothing; TrainConfig (and the
    trainer it lives with) is imported only when help is printed, which keeps every other command's start fast."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.dest == "help" or not action.option_strings:
            return help_text
        return f"{help_text} (default: {default_text(action.dest).replace('%', '%%')})"


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = TrainHelpFormatter
    for flag, dest, options in OPTIONS:
        parser.add_argument(flag, dest=dest, default=None, **options)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run RUNS_DIR/NAME from its checkpoint; options not given keep the run's "
                             "values")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the arguments ask for (checkpoint values fill unset options when resuming, except the
    per-invocation ``TrainConfig.SESSION_KEYS``)."""
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
        fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(TrainConfig.SESSION_KEYS)
        values = {k: v for k, v in saved.items() if k in fields}
        if "model_config" in given:
            values.pop("preset", None)
        return TrainConfig(**{**values, **given, "resume": True})
    return TrainConfig(**given)


def check_train_device(device: str) -> None:
    """Refuse ``--device cuda`` (also when a resumed run's checkpoint asks for it) on a machine without one, as
    one error line instead of a traceback from deep inside ``torch.cuda``."""
    from kimi_linear.cli import device_problem

    if device.startswith("cuda"):
        problem = device_problem(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
        if problem:
            raise UserError(f"--device {device}: {problem}")


def _option_words(flag: str, options: dict, value: object) -> list[str]:
    """Command-line words that set an option to ``value`` ([] when the flag cannot express it)."""
    if options.get("action") == "store_const":
        return [flag] if value == options["const"] else []
    if options.get("nargs") == "+":
        return [flag, *map(str, value)]
    return [flag, str(value)]


def resume_command(cfg: TrainConfig, world: int, saved: dict) -> str:
    """The exact command that continues ``cfg``'s run from its checkpoint (whose config is ``saved``).

    Besides the run's name it repeats every option this session changed from the checkpoint's values (a longer
    ``--steps``, say: they are lost if no checkpoint of this session was written) and ``--no-progress``, which a
    resumed run does not take from the checkpoint."""
    from kimi_linear.train.trainer import TrainConfig

    words = ["kimi-linear", "train"]
    if world > 1:
        words = ["torchrun", "--nproc-per-node", str(world), "--no-python", *words]
    if cfg.runs_dir != TrainConfig.runs_dir:
        words += ["--runs-dir", cfg.runs_dir]
    words += ["--name", cfg.name]
    for flag, dest, options in OPTIONS:
        value = getattr(cfg, dest)
        if dest in ("name", "runs_dir") or (dest not in TrainConfig.SESSION_KEYS and saved.get(dest) == value):
            continue
        words += _option_words(flag, options, value)
    return shlex.join([*words, "--resume"])


def interrupt_message(cfg: TrainConfig, step: int | None, world: int) -> str:
    """What Ctrl-C leaves behind: the checkpoint kept (path, step) and the command that continues it."""
    at = f"interrupted at step {step}" if step is not None else "interrupted before training started"
    checkpoint = find_checkpoint(cfg.run_dir)
    if checkpoint is None:
        return f"{at}: no checkpoint was written yet (every {cfg.save_every} steps), so there is nothing to resume"
    state = load_trainer_state(checkpoint)
    lost = ""
    if step is not None and step > state["step"]:
        first = state["step"] + 1
        lost = f" (step {step} is lost)" if step == first else f" (steps {first}-{step} are lost)"
    return (f"{at}: kept the checkpoint of step {state['step']} in {checkpoint}{lost}\n"
            f"continue the run with: {resume_command(cfg, world, state['config'])}")


def run_train(args: argparse.Namespace) -> int:
    from kimi_linear.train.trainer import Trainer, close_distributed, summary_line

    start = time.perf_counter()
    cfg = train_config_from_args(args)
    check_train_device(cfg.device)
    trainer = None
    try:
        trainer = Trainer(cfg, report=lambda line: print(line, flush=True))
        summary = trainer.train()
        if trainer.env.is_main:
            print(summary_line(summary, time.perf_counter() - start), flush=True)
    except KeyboardInterrupt:
        rank = trainer.env.rank if trainer is not None else int(os.environ.get("RANK", "0"))
        if rank == 0:
            world = trainer.env.world if trainer is not None else int(os.environ.get("WORLD_SIZE", "1"))
            step = trainer.step if trainer is not None else None
            print(interrupt_message(cfg, step, world), file=sys.stderr, flush=True)
        return 130
    finally:
        close_distributed()
    return 0


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (holds metrics.jsonl)")
    parser.add_argument("--out", help="PNG to write (default: RUN_DIR/training.png)")


def run_plot(args: argparse.Namespace) -> int:
    from kimi_linear.train.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0
