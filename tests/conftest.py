"""Test setup:
- without CUDA, Triton kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1);
- one intra-op thread: the tests' tensors are tiny, and on a shared 2-core machine (CI's) thread contention made
  their steps 10-20x slower than on one thread.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)
