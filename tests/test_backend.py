"""The backend switch (kimi_linear.ops.backend): the environment is read once, at import; set_backend and
use_backend change the choice afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kimi_linear.ops import backend
from kimi_linear.ops.backend import BACKEND_ENV, get_backend, set_backend, use_backend, use_kernel

ROOT = Path(__file__).resolve().parents[1]


def import_with_env(value: str) -> subprocess.CompletedProcess:
    """Import the backend module in a fresh interpreter whose environment sets the variable to ``value``."""
    code = "from kimi_linear.ops.backend import get_backend; print(get_backend())"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, BACKEND_ENV: value})


@pytest.mark.parametrize("value,expected", [("triton", "triton"), (" Torch ", "torch"), ("", "auto")])
def test_environment_is_honoured_at_import(value, expected):
    result = import_with_env(value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_unknown_backend_in_environment_fails_at_import():
    result = import_with_env("cuda")
    assert result.returncode != 0
    assert "ValueError" in result.stderr and BACKEND_ENV in result.stderr


def test_environment_after_import_changes_nothing(monkeypatch):
    before = get_backend()
    monkeypatch.setenv(BACKEND_ENV, "triton" if before != "triton" else "torch")
    assert get_backend() == before


def test_use_backend_restores_the_previous_choice():
    before = get_backend()
    x = torch.zeros(1)
    with use_backend("triton"):
        assert get_backend() == "triton" and use_kernel(x)
        with use_backend("torch"):
            assert not use_kernel(x)
        assert get_backend() == "triton"
    assert get_backend() == before
    with pytest.raises(RuntimeError), use_backend("torch"):
        raise RuntimeError
    assert get_backend() == before
    with use_backend("triton"):  # inputs the kernel does not support never take it, even when forced
        assert not use_kernel(x, supported=False)


def test_set_backend_checks_the_name():
    before = get_backend()
    with pytest.raises(ValueError, match="backend"):
        set_backend("cuda")
    assert backend.get_backend() == before
