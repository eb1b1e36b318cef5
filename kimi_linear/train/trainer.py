"""The training loop: configuration, setup (model, data, parallelism, optimizer), steps, validation, checkpoints.

One step: global batch ``step`` of the packed data (this rank's rows) -> forward in bf16 (GPU: FSDP2 mixed
precision over fp32 master weights) or fp32 (CPU) -> backward -> clip the global gradient norm -> Muon/AdamW step
at the scheduled learning rate -> router bias update from the global expert load. Everything that influences a
step is a function of (checkpointed weights, optimizer state, step), so resuming continues the loss curve exactly.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from kimi_linear.config import KimiLinearConfig
from kimi_linear.errors import UserError
from kimi_linear.model import KimiLinearForCausalLM
from kimi_linear.tokenizer import ByteTokenizer
from kimi_linear.train.balance import expert_loads, load_imbalance, update_router_bias
from kimi_linear.train.checkpointing import find_checkpoint, load_rank_state, load_trainer_state, save_checkpoint
from kimi_linear.train.data import PackedData, describe_source, prepare_data, unigram_bits_per_token
from kimi_linear.train.depth_stats import DepthProbe
from kimi_linear.train.distributed import (
    DistEnv,
    apply_expert_parallel,
    apply_fsdp,
    clip_grad_norm,
    init_distributed,
    uses_fsdp,
)
from kimi_linear.train.metrics import MetricsLog, peak_flops, train_flops_per_token
from kimi_linear.train.muon import build_optimizer
from kimi_linear.train.schedule import Schedule, set_lr

LN2 = math.log(2)
# Default warmup, as a fraction of the steps: warmup must follow --steps (a fixed count breaks short runs).
WARMUP_FRACTION = 0.1


@dataclass
class TrainConfig:
    """Everything a run depends on. ``RESUME_KEYS`` must match when resuming; the rest may change.

    Derived defaults are resolved when the config is built (``warmup_steps`` None -> ``WARMUP_FRACTION`` of
    ``steps``), so the checkpoint stores the values the run actually used: a resumed run keeps its warmup even
    if ``--steps`` changes (the warmup already happened; recomputing it would make the learning rate jump).
    ``SESSION_KEYS`` are choices of one invocation that a resumed run does not take from the checkpoint.
    """

    name: str = ""  # default: "<preset or config>-<data>", e.g. "tiny-stdlib"
    runs_dir: str = "runs"
    preset: str = "tiny"
    model_config: str | None = None  # path to a config.json / model dir; replaces the preset
    data: list[str] = field(default_factory=list)  # files / directories; empty: the stdlib corpus
    seq_len: int = 256
    batch_size: int = 16  # rows per optimizer step, all ranks together
    steps: int = 200
    lr: float = 3e-3
    schedule: str = "wsd"
    warmup_steps: int | None = None  # default: WARMUP_FRACTION of steps
    decay_fraction: float = 0.3
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Router-bias step per optimizer step. DeepSeek-V3 uses 1e-3 over ~10^5 steps; runs here are hundreds of steps
    # long, and at 1e-3 the bias cannot catch up with the router before the run ends.
    balance_gamma: float = 1e-2
    balance_loss_coef: float = 0.0
    val_fraction: float = 0.01
    val_rows: int = 64
    eval_every: int = 50
    save_every: int = 100
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    expert_parallel: bool = False
    attn_res_block_size: int | None = None  # Block Attention Residuals in the model (sublayers per block)
    resume: bool = False
    progress: bool = True

    RESUME_KEYS = ("preset", "model_config", "data", "seq_len", "batch_size", "seed", "val_fraction",
                   "expert_parallel", "attn_res_block_size")
    SESSION_KEYS = ("progress", "resume")

    def __post_init__(self) -> None:
        if not self.name:
            model = Path(self.model_config).stem if self.model_config else self.preset
            self.name = f"{model}-{Path(self.data[0]).stem if self.data else 'stdlib'}"
        if self.warmup_steps is None:
            self.warmup_steps = round(WARMUP_FRACTION * self.steps)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def model_config_for(cfg: TrainConfig) -> KimiLinearConfig:
    """The preset or config file, with Block AttnRes when the run asks for it."""
    try:
        config = (KimiLinearConfig.from_preset(cfg.preset) if cfg.model_config is None
                  else KimiLinearConfig.from_pretrained(cfg.model_config))
        if cfg.attn_res_block_size is not None:
            config = KimiLinearConfig.from_dict({**config.to_dict(), "attn_res_block_size": cfg.attn_res_block_size})
    except FileNotFoundError as e:
        raise UserError(str(e)) from e
    return config


def check_resumable(saved: dict, cfg: TrainConfig, world: int) -> None:
    """Raise UserError naming every setting that differs from the checkpoint's."""
    current = cfg.to_dict()
    diffs = [f"{k}: checkpoint {saved['config'][k]!r}, now {current[k]!r}"
             for k in TrainConfig.RESUME_KEYS if saved["config"].get(k) != current[k]]
    if saved["world_size"] != world:
        diffs.append(f"processes: checkpoint {saved['world_size']}, now {world}")
    if diffs:
        raise UserError(f"cannot resume {cfg.run_dir}: the run was started with other settings ({'; '.join(diffs)})")


def training_tokenizer(model_config: KimiLinearConfig) -> ByteTokenizer:
    """The byte-level tokenizer, with the Kimi chat markers at ids of their own when the vocabulary has room for them
    (the `tiny` preset's 320 ids do), so that a model trained here speaks the chat format once fine-tuned to; the
    markers change no document's tokens. Saved beside the model (``tokenizer_config.json``)."""
    chat = ByteTokenizer.with_chat_markers()
    return chat if model_config.vocab_size >= chat.vocab_size else ByteTokenizer()


def validate_config(cfg: TrainConfig, env: DistEnv, model_config: KimiLinearConfig) -> None:
    """Reject inconsistent settings before any work is done."""
    if cfg.batch_size % env.world:
        raise UserError(f"batch size {cfg.batch_size} must be divisible by the number of processes ({env.world})")
    if cfg.expert_parallel and env.world < 2:
        raise UserError("--expert-parallel needs several processes: launch with torchrun --nproc-per-node N")
    if cfg.expert_parallel and model_config.num_experts % env.world:
        raise UserError(f"--expert-parallel needs num_experts ({model_config.num_experts}) divisible by the number "
                        f"of processes ({env.world})")
    if model_config.bos_token_id != ByteTokenizer().bos_token_id or model_config.vocab_size < ByteTokenizer.vocab_size:
        raise UserError(f"training uses the byte-level tokenizer: the model needs vocab_size >= "
                        f"{ByteTokenizer.vocab_size} and bos_token_id 256 (use a byte-level preset such as 'tiny')")
    for name in ("steps", "seq_len", "eval_every", "save_every", "log_every", "val_rows"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise UserError(f"learning rate must be positive, got {cfg.lr}")


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def describe_device(env: DistEnv) -> str:
    """``device: ...`` line: where the steps run and in which precision."""
    if env.device.type == "cuda":
        where = f"{env.device} ({torch.cuda.get_device_name(env.device)}), bf16 compute over fp32 weights"
    else:
        where = f"cpu ({torch.get_num_threads()} threads), fp32"
    processes = f", {env.world} processes" if env.world > 1 else ""
    return f"device: {where}{processes}"


def describe_data(cfg: TrainConfig, data: PackedData) -> str:
    """``data: ...`` line: the source, its documents and tokens, and the rows they pack into."""
    train_docs, val_docs = data.documents
    tokens = data.train_tokens.numel() + data.val_tokens.numel()
    return (f"data: {describe_source(cfg.data)}: {train_docs + val_docs:,} documents ({val_docs:,} held out for "
            f"validation), {tokens:,} tokens; {data.train_rows.size(0):,} training rows and "
            f"{data.val_rows.size(0):,} validation rows of {cfg.seq_len} tokens")


def describe_model(cfg: TrainConfig, config: KimiLinearConfig, total: int, activated: int) -> str:
    """``model: ...`` line: what it is, its layers and its parameter counts."""
    source = f"config {cfg.model_config}" if cfg.model_config else f"preset {cfg.preset}"
    types = config.layer_types
    return (f"model: {source}, {len(types)} layers ({types.count('kda')} KDA, {types.count('mla')} MLA): "
            f"{total:,} parameters, {activated:,} activated per token")


def describe_plan(cfg: TrainConfig, data: PackedData, schedule: Schedule, start_step: int) -> str:
    """``training: ...`` line: the steps still to run, the batch, the schedule and where checkpoints go."""
    if start_step >= cfg.steps:
        return (f"training: nothing to do, the run is already at step {start_step} of {cfg.steps} "
                "(pass --steps N to train longer)")
    steps = f"steps {start_step + 1}-{cfg.steps} of {cfg.steps}" if start_step else f"{cfg.steps} steps"
    steps += f", each {cfg.batch_size} rows x {cfg.seq_len} tokens"
    epochs = cfg.steps * cfg.batch_size / data.train_rows.size(0)
    phases = f"warmup {_count(schedule.warmup_steps, 'step')}"
    if schedule.kind == "wsd":
        phases += f", decay over the last {_count(schedule.decay_steps, 'step')}"
    return (f"training: {steps} ({epochs:.2f} epochs in all); "
            f"lr {cfg.lr:g}, {schedule.kind} schedule ({phases}); checkpoint every {_count(cfg.save_every, 'step')} "
            f"in {cfg.run_dir}")


class Trainer:
    """One training run. ``report``, if given, receives (on the main process) one line per setup stage: device,
    resume point, data, model, plan — so a user sees what is happening before the first step, which can be far
    away (the built-in corpus takes seconds to tokenize). Library use (tests, benchmarks) stays silent."""

    def __init__(self, cfg: TrainConfig, report: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.env = env = init_distributed(cfg.device)
        self._report = report if env.is_main else None
        self.say(describe_device(env))
        if env.device.type == "cpu":
            # As the KDA gates train, decay products underflow into denormal floats, which x86 CPUs process
            # an order of magnitude slower: steps of the built-in job went from 2 s to 15 s. Flush them to zero.
            torch.set_flush_denormal(True)
        self.model_config = model_config_for(cfg)
        validate_config(cfg, env, self.model_config)
        try:
            self.schedule = Schedule(cfg.steps, cfg.warmup_steps, cfg.schedule, cfg.decay_fraction, cfg.min_lr_ratio)
        except ValueError as e:
            raise UserError(str(e)) from e

        checkpoint = find_checkpoint(cfg.run_dir)
        if cfg.resume and checkpoint is None:
            raise UserError(f"nothing to resume: {cfg.run_dir} holds no checkpoint")
        if not cfg.resume and checkpoint is not None:
            raise UserError(f"{cfg.run_dir} already holds a run: pass --resume to continue it, or another --name")
        saved = load_trainer_state(checkpoint) if cfg.resume else None
        if saved is not None:
            check_resumable(saved, cfg, env.world)
            self.say(f"resuming {cfg.run_dir} from its checkpoint at step {saved['step']}")

        self.tokenizer = training_tokenizer(self.model_config)
        self.data: PackedData = prepare_data(cfg.data, self.tokenizer, cfg.seq_len, cfg.batch_size, cfg.seed,
                                             cfg.val_fraction, cfg.val_rows)
        self.say(describe_data(cfg, self.data))

        torch.manual_seed(cfg.seed)
        if saved is None:
            with env.device:  # initialise in place: a 1B model takes long to initialise on the CPU
                model = KimiLinearForCausalLM(self.model_config)
        else:
            model = KimiLinearForCausalLM.from_pretrained(checkpoint)
            if model.config.to_dict() != self.model_config.to_dict():
                raise UserError(f"cannot resume {cfg.run_dir}: its model config differs from the requested one")
        self.flops_per_token = train_flops_per_token(self.model_config, model.num_activated_parameters(),
                                                     cfg.seq_len)
        self.num_parameters = model.num_parameters()
        self.say(describe_model(cfg, self.model_config, self.num_parameters, model.num_activated_parameters()))
        model.to(env.device)
        model.set_activation_checkpointing(cfg.activation_checkpointing)
        if cfg.expert_parallel:
            apply_expert_parallel(model)
        if uses_fsdp(env):
            apply_fsdp(model, env)
        self.model = model
        self.forward = torch.compile(model) if cfg.compile else model
        self.depth = DepthProbe(model)
        self.optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
        self.step = 0
        if saved is not None:
            load_rank_state(checkpoint, self.optimizer, env.rank)
            self.step = saved["step"]
        self.log = MetricsLog(str(cfg.run_dir / "metrics.jsonl"), enabled=env.is_main)
        if env.is_main:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            self.log.truncate_after(self.step)
        self.peak = peak_flops(env.device)
        self.say(describe_plan(cfg, self.data, self.schedule, self.step))

    def say(self, line: str) -> None:
        if self._report is not None:
            self._report(line)

    # ------------------------------------------------------------------------------------------------------------
    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        """Average over ranks (of token-share-weighted losses: the mean loss over all predicted tokens)."""
        value = value.detach()
        if self.env.world > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.env.world
        return float(value)

    def _token_share(self, pos: torch.Tensor) -> torch.Tensor | float:
        """Weight of this rank's mean loss so that the data-parallel gradient average (FSDP divides by W) is the
        gradient of the mean over all ranks' predicted tokens, whatever number of document starts each holds."""
        if self.env.world == 1:
            return 1.0
        counts = (pos[:, 1:] != 0).sum().to(torch.float32).reshape(1)
        total = counts.clone()
        dist.all_reduce(total)
        return counts[0] * self.env.world / total[0]

    def train_step(self) -> dict:
        cfg, env = self.cfg, self.env
        lr = cfg.lr * self.schedule(self.step)
        set_lr(self.optimizer, lr)
        ids, pos = self.data.train_batch(self.step, env.rank, env.world)
        ids, pos = ids.to(env.device, non_blocking=True), pos.to(env.device, non_blocking=True)
        self.model.train()
        out = self.forward(ids, labels=ids, position_ids=pos, balance_loss_coef=cfg.balance_loss_coef)
        loss = out.loss * self._token_share(pos)
        loss.backward()
        depth = {"layer_rms": self.depth.hidden_rms(), "layer_grad_norm": self.depth.grad_norms()}
        grad_norm = clip_grad_norm([p for p in self.model.parameters() if p.requires_grad], cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        moe = self.model.moe_layers()
        imbalance = []
        if moe:
            loads = expert_loads(moe)
            update_router_bias(moe, loads, cfg.balance_gamma)
            imbalance = load_imbalance(loads)
        self.step += 1
        return {"loss": self._mean_over_ranks(loss), "lr": lr, "grad_norm": float(grad_norm),
                "imbalance": imbalance, **depth}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token cross-entropy (nats) over the validation rows, all ranks together."""
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        for ids, pos in self.data.val_batches(self.cfg.batch_size // self.env.world, self.env.rank, self.env.world):
            ids, pos = ids.to(self.env.device), pos.to(self.env.device)
            out = self.forward(ids, labels=ids, position_ids=pos)
            count = int((pos[:, 1:] != 0).sum())
            total += torch.tensor([float(out.loss) * count, count], dtype=torch.float64, device=self.env.device)
        if self.env.world > 1:
            dist.all_reduce(total)
        return float(total[0] / total[1])

    def save(self) -> None:
        state = {"step": self.step, "rows_consumed": self.step * self.cfg.batch_size, "world_size": self.env.world,
                 "config": self.cfg.to_dict()}
        save_checkpoint(self.cfg.run_dir, self.model, self.optimizer, state, self.env.rank, self.tokenizer)

    # ------------------------------------------------------------------------------------------------------------
    def train(self, until_step: int | None = None) -> dict:
        """Train to ``cfg.steps`` (or stop early at ``until_step``, still saving a checkpoint); returns a summary.

        After a resume the bar counts the run's steps (``initial``: it starts at the checkpoint's step) while its
        rate and times cover this session only, as does the summary's ``train_seconds`` (``start_step`` says
        where the session began)."""
        start_step = self.step
        show = self.cfg.progress and self.env.is_main and self.step < self.cfg.steps
        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not show, dynamic_ncols=True, desc=self.cfg.name)
        start = time.perf_counter()
        try:
            val_loss = self._train_loop(bar, until_step)
        finally:  # an interrupted run (Ctrl-C) must not leave the bar's line unfinished under its message
            bar.close()
        if val_loss is None:
            val_loss = self.evaluate()
        return self.summary(val_loss, time.perf_counter() - start, start_step)

    def _train_loop(self, bar: tqdm, until_step: int | None) -> float | None:
        """The steps, with logging, validation and checkpoints; returns the last validation loss (None if none)."""
        cfg, env = self.cfg, self.env
        stop = min(cfg.steps, until_step or cfg.steps)
        tokens_per_step = cfg.batch_size * cfg.seq_len
        window_seconds, window_steps = 0.0, 0  # training steps only: evaluation and saving are not throughput
        val_loss = None
        while self.step < stop:
            step_start = time.perf_counter()
            metrics = self.train_step()
            window_seconds += time.perf_counter() - step_start
            window_steps += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == stop:
                tps = window_steps * tokens_per_step / window_seconds
                mfu = tps * self.flops_per_token / (self.peak * env.world) if self.peak else None
                record = {"kind": "train", "step": self.step, **metrics, "tokens_per_s": tps, "mfu": mfu,
                          "tokens": self.step * tokens_per_step}
                self.log.write(record)
                postfix = {"loss": f"{metrics['loss']:.3f}", "lr": f"{metrics['lr']:.2e}", "tok/s": f"{tps:,.0f}"}
                if mfu is not None:
                    postfix["mfu"] = f"{100 * mfu:.1f}%"
                if metrics["imbalance"]:
                    postfix["moe max/mean"] = f"{max(metrics['imbalance']):.2f}"
                bar.set_postfix(postfix)
                window_seconds, window_steps = 0.0, 0
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                val_loss = self.evaluate()
                self.log.write({"kind": "val", "step": self.step, "val_loss": val_loss,
                                "val_bits_per_byte": val_loss / LN2})
                if env.is_main:
                    bar.write(f"step {self.step}: val loss {val_loss:.4f} ({val_loss / LN2:.3f} bits/byte)")
            if self.step % cfg.save_every == 0 or self.step == stop:
                self.save()
        return val_loss

    def summary(self, val_loss: float, seconds: float, start_step: int = 0) -> dict:
        """``train_seconds`` is this session's time, spent on steps ``start_step + 1 .. step`` of ``total_steps``."""
        unigram = unigram_bits_per_token(self.data.train_tokens, self.data.val_rows, self.model_config.vocab_size,
                                         self.tokenizer.bos_token_id)
        summary = {"kind": "summary", "step": self.step, "start_step": start_step, "total_steps": self.cfg.steps,
                   "val_loss": val_loss, "val_bits_per_byte": val_loss / LN2, "unigram_bits_per_byte": unigram,
                   "train_seconds": seconds, "parameters": self.num_parameters, "run_dir": str(self.cfg.run_dir)}
        self.log.write(summary)
        return summary


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def summary_line(summary: dict, wall_seconds: float) -> str:
    """The last line of ``kimi-linear train``. ``wall_seconds`` is this session's: after a resume the line names
    the steps this session ran beside it, not the run's total."""
    step, start = summary["step"], summary.get("start_step", 0)
    total = summary.get("total_steps", step)
    if step == start:
        steps = f"no steps to run (the run is at step {step} of {total})"
    elif start:
        steps = f"steps {start + 1}-{step} of {total} (resumed from step {start}) in {wall_seconds:.0f}s"
    else:
        steps = f"{step} steps in {wall_seconds:.0f}s" + (f" (of {total})" if step < total else "")
    return (f"done: {steps}; val loss {summary['val_loss']:.4f} = {summary['val_bits_per_byte']:.3f} bits/byte vs "
            f"unigram baseline {summary['unigram_bits_per_byte']:.3f} bits/byte; model saved to {summary['run_dir']}")

