"""The training loop end to end on the ``test`` preset: learning, exact resume, crash-safe checkpoints,
MoE balancing, the train / plot CLI and its one-line errors."""

import json
import shlex

import pytest
import torch

from kimi_linear import KimiLinearForCausalLM
from kimi_linear.cli import build_parser, main
from kimi_linear.train import checkpointing
from kimi_linear.train.balance import load_imbalance, update_router_bias
from kimi_linear.train.checkpointing import find_checkpoint, load_trainer_state
from kimi_linear.train.cli import interrupt_message, resume_command, train_config_from_args
from kimi_linear.train.metrics import read_metrics
from kimi_linear.train.trainer import TrainConfig, Trainer


def write_corpus(directory, n_docs=40):
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        body = "".join(f"    x{j} = {i} * {j} + {j % 7}\n" for j in range(i % 5 + 3))
        (directory / f"mod{i:02d}.py").write_text(f"def f{i}(a, b):\n{body}    return a + b\n")
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def config(tmp_path, corpus, **overrides):
    base = dict(name="run", runs_dir=str(tmp_path / "runs"), preset="test", data=[str(corpus)], seq_len=32,
                batch_size=4, steps=6, warmup_steps=2, eval_every=3, save_every=3, log_every=1, val_fraction=0.1,
                val_rows=4, progress=False, device="cpu")
    return TrainConfig(**{**base, **overrides})


def train_losses(run_dir):
    return [r["loss"] for r in read_metrics(str(run_dir / "metrics.jsonl")) if r["kind"] == "train"]


def test_training_learns_and_saves_a_loadable_model(tmp_path, corpus):
    cfg = config(tmp_path, corpus, steps=12, lr=1e-2)
    trainer = Trainer(cfg)
    summary = trainer.train()
    losses = train_losses(cfg.run_dir)
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5
    assert summary["val_bits_per_byte"] < summary["unigram_bits_per_byte"] + 1.5
    loaded = KimiLinearForCausalLM.from_pretrained(cfg.run_dir)
    ids, pos = trainer.data.train_batch(0)
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, position_ids=pos).logits, trainer.model(ids, position_ids=pos).logits)
    biases = [m.gate.e_score_correction_bias for m in loaded.moe_layers()]
    assert all(b.abs().sum() > 0 for b in biases)  # aux-loss-free balancing moved (and saved) the router bias
    records = read_metrics(str(cfg.run_dir / "metrics.jsonl"))
    assert all(len(r["imbalance"]) == len(biases) for r in records if r["kind"] == "train")
    assert any(r["kind"] == "val" for r in records)


def test_resume_continues_the_loss_curve_exactly(tmp_path, corpus):
    straight = config(tmp_path, corpus, name="straight")
    Trainer(straight).train()
    interrupted = config(tmp_path, corpus, name="interrupted")
    Trainer(interrupted).train(until_step=3)
    assert load_trainer_state(find_checkpoint(interrupted.run_dir))["step"] == 3
    Trainer(config(tmp_path, corpus, name="interrupted", resume=True)).train()
    assert train_losses(interrupted.run_dir) == train_losses(straight.run_dir)
    a = KimiLinearForCausalLM.from_pretrained(straight.run_dir).state_dict()
    b = KimiLinearForCausalLM.from_pretrained(interrupted.run_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_activation_checkpointing_and_balance_loss(tmp_path, corpus):
    runs = {name: config(tmp_path, corpus, name=name, steps=3, **kw) for name, kw in {
        "plain": {}, "balanced": dict(balance_loss_coef=0.1),
        "recomputed": dict(balance_loss_coef=0.1, activation_checkpointing=True)}.items()}
    for cfg in runs.values():
        Trainer(cfg).train()
    losses = {name: train_losses(cfg.run_dir) for name, cfg in runs.items()}
    assert losses["balanced"][0] > losses["plain"][0] + 0.05  # the sequence-level balance loss is added (~0.1 x 3)
    torch.testing.assert_close(losses["recomputed"], losses["balanced"], rtol=1e-6, atol=0)


def test_failed_save_keeps_the_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    cfg = config(tmp_path, corpus)
    trainer = Trainer(cfg)
    trainer.train(until_step=3)
    good = (cfg.run_dir / "checkpoint" / "model.safetensors").read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    assert not (cfg.run_dir / "checkpoint.tmp").exists()
    assert load_trainer_state(find_checkpoint(cfg.run_dir))["step"] == 3
    assert (cfg.run_dir / "checkpoint" / "model.safetensors").read_bytes() == good
    assert (cfg.run_dir / "model.safetensors").read_bytes() == good


def test_crash_between_renames_falls_back_to_previous(tmp_path, corpus):
    cfg = config(tmp_path, corpus)
    Trainer(cfg).train(until_step=3)
    (cfg.run_dir / "checkpoint").rename(cfg.run_dir / "checkpoint.prev")
    assert find_checkpoint(cfg.run_dir) == cfg.run_dir / "checkpoint.prev"


def test_router_bias_update_rule():
    class Gate:
        e_score_correction_bias = torch.zeros(4)

    class Layer:
        gate = Gate()

    layer = Layer()
    loads = torch.tensor([[10.0, 2.0, 4.0, 4.0]])
    update_router_bias([layer], loads, gamma=0.5)
    assert layer.gate.e_score_correction_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]
    assert load_imbalance(loads) == [2.0]


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def test_cli_train_then_plot(tmp_path, corpus, capsys):
    pytest.importorskip("matplotlib")
    runs = str(tmp_path / "runs")
    code = main(["train", "--preset", "test", "--data", str(corpus), "--runs-dir", runs, "--name", "c",
                 "--seq-len", "32", "--batch-size", "4", "--steps", "3", "--warmup-steps", "1", "--val-rows", "2",
                 "--val-fraction", "0.1", "--no-progress", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "bits/byte vs unigram baseline" in out
    # before the first step: device, corpus, model, plan
    header = out.splitlines()[:4]
    assert header[0] == f"device: cpu ({torch.get_num_threads()} threads), fp32"
    assert header[1].startswith(f"data: {corpus}: 40 documents (4 held out for validation), ")
    assert " tokens; " in header[1] and header[1].endswith(" validation rows of 32 tokens")
    assert header[2].startswith("model: preset test, 4 layers (3 KDA, 1 MLA): ") and "activated per token" in header[2]
    assert header[3].startswith("training: 3 steps, each 4 rows x 32 tokens")
    assert "done: 3 steps in " in out
    assert main(["plot", str(tmp_path / "runs" / "c")]) == 0
    png = tmp_path / "runs" / "c" / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "/nonexistent/corpus"], "does not exist"),
        (["--batch-size", "4096"], "larger than the training data"),
        (["--preset", "test", "--config", "x"], "--preset and --config"),
        (["--expert-parallel"], "several processes"),
        (["--resume"], "nothing to resume"),
        (["--warmup-steps", "50"], "warmup"),
        (["--warmup-steps", "3", "--decay-fraction", "0.5"], "overlap"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, corpus, capsys, extra, message):
    argv = ["train", "--runs-dir", str(tmp_path / "runs"), "--seq-len", "32", "--steps", "3", "--no-progress",
            "--device", "cpu"]
    if "--warmup-steps" not in extra:
        argv += ["--warmup-steps", "1"]
    if "--data" not in extra:
        argv += ["--data", str(corpus)]
    if "--preset" not in extra:
        argv += ["--preset", "test"]
    code, err = run_cli(argv + extra, capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_cli_resume_with_other_settings_is_refused(tmp_path, corpus, capsys):
    cfg = config(tmp_path, corpus)
    Trainer(cfg).train(until_step=3)
    base = ["train", "--runs-dir", cfg.runs_dir, "--name", cfg.name, "--resume", "--no-progress"]
    code, err = run_cli(base + ["--seq-len", "16"], capsys)
    assert code == 1 and len(err) == 1 and "seq_len" in err[0]
    code, err = run_cli(["train", "--runs-dir", cfg.runs_dir, "--name", cfg.name, "--no-progress"], capsys)
    assert code == 1 and "already holds a run" in err[0]
    state = json.loads((cfg.run_dir / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3  # the refused runs left the checkpoint alone


def test_warmup_follows_steps():
    assert TrainConfig(steps=200).warmup_steps == 20
    assert TrainConfig(steps=10).warmup_steps == 1
    assert TrainConfig(steps=10, warmup_steps=0).warmup_steps == 0


def lrs(run_dir):
    return [r["lr"] for r in read_metrics(str(run_dir / "metrics.jsonl")) if r["kind"] == "train"]


def interrupt_at(monkeypatch, step):
    """Make the training loop receive Ctrl-C when it is about to run step ``step + 1``."""
    original = Trainer.train_step

    def train_step(self):
        if self.step == step:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_cli_short_run_interrupted_and_resumed(tmp_path, corpus, capsys, monkeypatch):
    """A short run without --warmup-steps (a fixed warmup of 20 used to refuse --steps 10 and swallow the decay of
    --steps 20) warms up and decays; Ctrl-C names the checkpoint kept and the command that resumes it; that command
    says it resumed, does not inherit --no-progress, and reproduces the uninterrupted run's schedule and losses."""
    straight = config(tmp_path, corpus, name="straight", warmup_steps=None, steps=10, eval_every=10, save_every=10)
    Trainer(straight).train()
    rates = lrs(straight.run_dir)
    assert rates[0] == rates[1] == rates[-4] == 3e-3  # one warmup step, then the peak ...
    assert rates[-4] > rates[-3] > rates[-2] > rates[-1]  # ... and the last 3 steps decay

    runs = tmp_path / "my runs"
    interrupt_at(monkeypatch, 6)
    assert main(["train", "--preset", "test", "--data", str(corpus), "--runs-dir", str(runs), "--name", "cut",
                 "--seq-len", "32", "--batch-size", "4", "--steps", "10", "--save-every", "5", "--eval-every", "10",
                 "--log-every", "1", "--val-rows", "4", "--val-fraction", "0.1", "--no-progress", "--device",
                 "cpu"]) == 130
    captured = capsys.readouterr()
    assert "(warmup 1 step, decay over the last 3 steps)" in captured.out
    err = captured.err.strip().splitlines()
    kept = runs / "cut" / "checkpoint"
    assert err[0] == f"interrupted at step 6: kept the checkpoint of step 5 in {kept} (step 6 is lost)"
    command = f"kimi-linear train --runs-dir '{runs}' --name cut --no-progress --resume"
    assert err[1] == f"continue the run with: {command}"
    assert load_trainer_state(find_checkpoint(runs / "cut"))["config"]["warmup_steps"] == 1  # resolved, stored

    monkeypatch.undo()
    resume_args = build_parser().parse_args(["train", "--runs-dir", str(runs), "--name", "cut", "--resume"])
    assert train_config_from_args(resume_args).progress  # the checkpoint's --no-progress is not inherited
    assert main(shlex.split(command)[1:]) == 0
    out = capsys.readouterr().out
    assert f"resuming {runs / 'cut'} from its checkpoint at step 5" in out
    assert "training: steps 6-10 of 10, each 4 rows x 32 tokens" in out
    assert "done: steps 6-10 of 10 (resumed from step 5) in " in out
    assert lrs(runs / "cut") == rates
    assert train_losses(runs / "cut") == train_losses(straight.run_dir)


def test_ctrl_c_before_the_first_checkpoint(tmp_path, corpus):
    cfg = config(tmp_path, corpus)
    assert interrupt_message(cfg, 2, 1) == ("interrupted at step 2: no checkpoint was written yet (every 3 steps), so "
                                            "there is nothing to resume")
    assert interrupt_message(cfg, None, 1).startswith("interrupted before training started: ")


def test_resume_command_repeats_changed_options(tmp_path, corpus):
    cfg = config(tmp_path, corpus, steps=12, compile=True)
    saved = {**cfg.to_dict(), "steps": 6, "compile": False}
    assert resume_command(cfg, 2, saved) == (f"torchrun --nproc-per-node 2 --no-python kimi-linear train --runs-dir "
                                             f"{cfg.runs_dir} --name run --steps 12 --compile --no-progress --resume")


def test_attn_res_training_logs_depth_dynamics(tmp_path, corpus):
    """`--attn-res-block-size` builds Block AttnRes into the trained model (saved in its config.json) and every log
    line carries the per-layer hidden-state RMS and gradient norm (for the paper's training-dynamics plots)."""
    cfg = config(tmp_path, corpus, steps=3, attn_res_block_size=2)
    Trainer(cfg).train()
    loaded = KimiLinearForCausalLM.from_pretrained(cfg.run_dir)
    assert loaded.config.attn_res_block_size == 2 and loaded.model.attn_res_final is not None
    records = [r for r in read_metrics(str(cfg.run_dir / "metrics.jsonl")) if r["kind"] == "train"]
    layers = loaded.config.num_hidden_layers
    assert all(len(r["layer_rms"]) == layers and len(r["layer_grad_norm"]) == layers for r in records)
    assert all(v > 0 for r in records for v in r["layer_rms"] + r["layer_grad_norm"])
    args = build_parser().parse_args(["train", "--attn-res-block-size", "4"])
    assert train_config_from_args(args).attn_res_block_size == 4
