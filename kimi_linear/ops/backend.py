"""One switch for every op that has a kernel: ``auto`` (kernels on CUDA, PyTorch elsewhere), ``torch`` (the
PyTorch reference everywhere) or ``triton`` (kernels everywhere; on the CPU that needs ``TRITON_INTERPRET=1``).

Set it with :func:`set_backend` or the environment variable ``KIMI_LINEAR_BACKEND``; it is read at every call,
so it can be flipped between steps (benchmarks and tests compare the two paths that way).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKEND_ENV = "KIMI_LINEAR_BACKEND"
CHOICES = ("auto", "torch", "triton")


def backend() -> str:
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(CHOICES)}, got {choice!r}")
    return choice


def set_backend(name: str) -> None:
    """Choose the backend for this process (see the module docstring)."""
    if name not in CHOICES:
        raise ValueError(f"backend must be one of {', '.join(CHOICES)}, got {name!r}")
    os.environ[BACKEND_ENV] = name


def use_kernel(x: torch.Tensor, *, supported: bool = True) -> bool:
    """Whether an op called on ``x`` should run its Triton kernel. ``supported`` is the kernel's own verdict on
    the inputs (shapes, dtypes, whether it can give the gradients asked for): an unsupported call always takes
    the PyTorch path, so forcing ``triton`` never silently drops a gradient."""
    choice = backend()
    return supported and (choice == "triton" or (choice == "auto" and x.is_cuda))


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
