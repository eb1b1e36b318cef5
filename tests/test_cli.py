import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.cli import main, unescape


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


def _help(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command, required", [
    ("generate", {"--model", "--prompt", "--prompt-file"}), ("train", set()), ("plot", set())])
def test_help_shows_every_default(capsys, command, required):
    out = _help(capsys, [command, "--help"])
    options = re.findall(r"^  (--?[\w-]+)", out, re.MULTILINE)
    assert "-h" in options and required <= set(options)
    # every option but -h and the required ones states its default, once
    assert out.count("(default:") == len(options) - 1 - len(required), out
    if command == "generate":
        assert "sampling temperature, 0 = greedy (default: 0.8)" in " ".join(out.split())
    if command == "train":
        assert "(default: 10% of --steps)" in " ".join(out.split())


def test_prompt_escapes():
    assert unescape(r"import os\n\tx = '\\n'") == "import os\n\tx = '\\n'"
    assert unescape(r"C:\data\x") == r"C:\data\x"  # other backslashes stay


def test_generate_interprets_prompt_escapes(capsys, model_dir):
    assert main(["generate", "--model", str(model_dir), "--prompt", r"import os\n", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("import os\n")


def test_generate_prompt_from_file_and_stdin(capsys, model_dir, tmp_path, monkeypatch):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def f():\\n\n    return ", encoding="utf-8")  # a file is taken verbatim: no escapes
    argv = ["generate", "--model", str(model_dir), "--max-new-tokens", "2"]
    assert main(argv + ["--prompt-file", str(prompt)]) == 0
    assert capsys.readouterr().out.startswith("def f():\\n\n    return ")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("é = 1\n".encode()), encoding="utf-8"))
    assert main(argv + ["--prompt-file", "-"]) == 0
    assert capsys.readouterr().out.startswith("é = 1\n")
    assert "does not exist" in _error(capsys, argv + ["--prompt-file", str(tmp_path / "none.txt")])
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    assert "not UTF-8" in _error(capsys, argv + ["--prompt-file", str(tmp_path / "latin1.txt")])


@pytest.mark.parametrize("device, message", [
    ("cuda:99", "--device cuda:99: "),  # without CUDA: this PyTorch has none; with it: no 100th GPU
    ("foo", "not a device name"),
    ("meta", "holds no data"),
])
def test_generate_unavailable_device_is_one_line(capsys, model_dir, device, message):
    assert message in _error(capsys, ["generate", "--model", str(model_dir), "--prompt", "a", "--device", device])


def test_train_unavailable_device_is_one_line(tmp_path, monkeypatch):
    if torch.cuda.is_available():  # a GPU machine: ask for a GPU it lacks instead
        monkeypatch.setenv("LOCAL_RANK", "99")
    result = subprocess.run([sys.executable, "-m", "kimi_linear.cli", "train", "--preset", "test", "--device", "cuda",
                             "--runs-dir", str(tmp_path)], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: --device cuda: ") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "test-stdlib").exists()
