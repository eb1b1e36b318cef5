"""Resuming reads nothing through unrestricted unpickling: a tampered run directory is refused with one error
line, and the code its pickles carry never runs."""

import json
import os
import shlex

import pytest
import torch
from test_train_loop import config, write_corpus

from kimi_linear.cli import main
from kimi_linear.train.trainer import Trainer


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run interrupted at step 3, and the bytes of its checkpoint files (each test restores what it changes)."""
    tmp = tmp_path_factory.mktemp("safety")
    cfg = config(tmp, write_corpus(tmp / "corpus"))
    Trainer(cfg).train(until_step=3)
    checkpoint = cfg.run_dir / "checkpoint"
    return cfg, checkpoint, {f.name: f.read_bytes() for f in checkpoint.iterdir()}


@pytest.fixture
def checkpoint(run):
    cfg, path, files = run
    yield cfg, path
    for name, data in files.items():
        (path / name).write_bytes(data)


def resume_error(cfg, capsys) -> list[str]:
    code = main(["train", "--runs-dir", cfg.runs_dir, "--name", cfg.name, "--resume", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("file", ["trainer_optimizer.rank0.pt", "trainer_rng.rank0.pt"])
def test_malicious_pickle_is_refused_and_never_runs(checkpoint, capsys, tmp_path, file):
    cfg, path = checkpoint
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker)}, path / file)
    torch.load(path / file, weights_only=False)  # the payload works: unrestricted unpickling runs it
    assert marker.exists()
    marker.unlink()
    error = resume_error(cfg, capsys)
    assert f"refusing to load {path / file}" in error and "could run code" in error and "system" in error
    assert not marker.exists()


@pytest.mark.parametrize("file, content, message", [
    ("trainer_rng.rank0.pt", b"not a torch file", "damaged"),
    ("trainer_optimizer.rank0.pt", b"", "damaged"),
    ("trainer_state.json", b"{broken", "not valid JSON"),
    ("trainer_state.json", json.dumps({"step": 3}).encode(), "lacks the step, world_size or config"),
])
def test_damaged_checkpoint_is_one_line(checkpoint, capsys, file, content, message):
    cfg, path = checkpoint
    (path / file).write_bytes(content)
    assert message in resume_error(cfg, capsys)


def test_wrong_kind_of_state_is_refused(checkpoint, capsys):
    cfg, path = checkpoint
    torch.save([1, 2, 3], path / "trainer_rng.rank0.pt")  # loadable, but not an RNG state
    assert "is not an RNG state written by kimi-linear" in resume_error(cfg, capsys)

