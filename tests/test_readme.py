"""Every ```python block of README.md runs as written on a fresh machine, before and after `kimi-linear train`
has saved runs/tiny-stdlib (the snippets take that model when it exists). Blocks run in order in one namespace,
in an empty working directory, so a snippet can use nothing but what the README itself sets up."""

import re
from pathlib import Path

import pytest
import torch

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.DOTALL | re.MULTILINE)


def test_readme_has_python_blocks():
    assert BLOCKS, "README.md has no ```python block: this test would check nothing"
    fences = re.findall(r"^```(\w*)", README.read_text(encoding="utf-8"), re.MULTILINE)
    assert fences.count("python") == len(BLOCKS)  # every python fence was extracted (none malformed)


@pytest.mark.parametrize("trained", [False, True], ids=["fresh", "after-train"])
def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys, trained):
    monkeypatch.chdir(tmp_path)
    saved = None
    if trained:  # stands in for the model `kimi-linear train` saves (same layout, a smaller preset)
        torch.manual_seed(1)
        saved = KimiLinearForCausalLM(KimiLinearConfig.from_preset("test"))
        saved.save_pretrained(tmp_path / "runs/tiny-stdlib")
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(BLOCKS):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    assert capsys.readouterr().out.strip()  # the snippets show their results
    if saved is not None:  # the snippet took the trained model, not a fresh one
        assert torch.equal(namespace["model"].lm_head.weight, saved.lm_head.weight)
