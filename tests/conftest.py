"""Test setup: without CUDA, Triton kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
