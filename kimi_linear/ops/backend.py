"""One switch for every op that has a kernel: ``auto`` (kernels on CUDA, PyTorch elsewhere), ``torch`` (the
PyTorch reference everywhere) or ``triton`` (kernels everywhere; on the CPU that needs ``TRITON_INTERPRET=1``).

The environment variable ``KIMI_LINEAR_BACKEND`` gives the choice when this module is imported, and only then:
ops consult a module-level value, so a hot loop reads no environment, and setting the variable later changes
nothing. Change the choice with :func:`set_backend`, or for a block of code with :func:`use_backend` (benchmarks
and tests compare the two paths that way); :func:`get_backend` reports it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch

BACKEND_ENV = "KIMI_LINEAR_BACKEND"
CHOICES = ("auto", "torch", "triton")


def _checked(name: str, source: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"{source} must be one of {', '.join(CHOICES)}, got {name!r}")
    return name


_choice = _checked(os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto", BACKEND_ENV)


def get_backend() -> str:
    """The backend every op uses now: ``"auto"``, ``"torch"`` or ``"triton"``."""
    return _choice


def set_backend(name: str) -> None:
    """Choose the backend for this process (see the module docstring)."""
    global _choice
    _choice = _checked(name, "backend")


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block on backend ``name``; the previous choice comes back on exit, also when the block raises."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_kernel(x: torch.Tensor, *, supported: bool = True) -> bool:
    """Whether an op called on ``x`` should run its Triton kernel. ``supported`` is the kernel's own verdict on
    the inputs (shapes, dtypes, whether it can give the gradients asked for): an unsupported call always takes
    the PyTorch path, so forcing ``triton`` never silently drops a gradient."""
    return supported and (_choice == "triton" or (_choice == "auto" and x.is_cuda))


def kernel_module(x: torch.Tensor, name: str, *inputs: torch.Tensor) -> ModuleType | None:
    """The Triton module ``name`` when an op on ``x`` should run it (:func:`use_kernel`) and the module's
    ``supports(*inputs)`` accepts the inputs, else None. The import happens only then: a CPU-only install may
    have no Triton."""
    if not use_kernel(x):
        return None
    module = importlib.import_module(name)
    return module if module.supports(*inputs) else None


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """True when autograd will differentiate through these tensors (forward-only kernels must not run then)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
