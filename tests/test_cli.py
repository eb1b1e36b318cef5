import subprocess
import sys

import pytest
import torch

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    KimiLinearForCausalLM(KimiLinearConfig.from_preset("test")).save_pretrained(path)
    return path


def test_info_48b(capsys):
    assert main(["info", "--preset", "kimi-linear-48b-a3b"]) == 0
    out = capsys.readouterr().out
    assert "49,122,681,728" in out
    assert "8,064 bytes per token" in out  # 7 MLA layers x 576 latent values x 2 bytes
    assert "20 KDA, 7 MLA" in out


def test_info_model_dir(capsys, model_dir):
    assert main(["info", "--model", str(model_dir)]) == 0
    assert "total parameters" in capsys.readouterr().out


def test_generate_streams_text(capsys, model_dir):
    assert main(["generate", "--model", str(model_dir), "--prompt", "def ", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def _error(capsys, argv):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ")
    return err[0]


def test_cli_errors(capsys, model_dir, tmp_path):
    assert "does not exist" in _error(capsys, ["generate", "--model", str(tmp_path / "x"), "--prompt", "a"])
    (tmp_path / "config.json").write_text("{broken")
    assert "not valid JSON" in _error(capsys, ["info", "--model", str(tmp_path)])
    assert "must be positive" in _error(
        capsys, ["generate", "--model", str(model_dir), "--prompt", "a", "--max-new-tokens", "0"])
    small = tmp_path / "small"
    torch.manual_seed(0)
    KimiLinearForCausalLM(KimiLinearConfig.from_preset("test", vocab_size=100)).save_pretrained(small)
    assert "outside the model's vocabulary" in _error(capsys, ["generate", "--model", str(small), "--prompt", "hi"])


def test_no_traceback_for_user_errors(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kimi_linear.cli", "generate", "--model", str(tmp_path / "no"),
                             "--prompt", "x"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
