"""Throughput accounting (FLOPs per token, MFU) and the JSONL metrics log.

Training FLOPs per token = 3 x forward FLOPs (backward costs twice the forward):
- matmuls: 2 FLOPs per activated weight (every weight a token passes through: attention projections, dense
  MLP, shared expert, router, its top-k routed experts, lm_head; not the embedding lookup);
- MLA attention (causal, NoPE): QK^T and AV over on average (T + 1) / 2 keys per query,
  2 * H * (d_qk + d_v) * (T + 1) / 2 per layer;
- KDA (chunkwise, chunk C = 64): the state read and write, 2 * 2 * H * K * V, plus the intra-chunk
  attention-like products over on average C / 2 positions, 2 * H * (K + V) * C / 2, per layer.
MFU divides the achieved FLOP rate by the device's dense bf16 peak; unknown devices (and CPUs) report none.
"""

from __future__ import annotations

import json
import os

import torch

from kimi_linear.config import KimiLinearConfig

KDA_CHUNK = 64

# Dense bf16 tensor-core peak, FLOP/s, by substring of the CUDA device name.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "A100": 312e12, "L40S": 362e12}


def attention_flops_per_token(config: KimiLinearConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the sequence mixing itself (not its projections), summed over layers."""
    mla = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * (seq_len + 1)
    H, K = config.kda_num_heads, config.kda_head_dim
    kda = 4 * H * K * K + H * 2 * K * KDA_CHUNK
    types = config.layer_types
    return types.count("mla") * mla + types.count("kda") * kda


def train_flops_per_token(config: KimiLinearConfig, activated_params: int, seq_len: int) -> float:
    return 3 * (2 * activated_params + attention_flops_per_token(config, seq_len))


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class MetricsLog:
    """Append-only JSONL, one object per event (``{"kind": "train" | "val" | "summary", "step": ..., ...}``)."""

    def __init__(self, path: str, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step``: a resumed run rewrites what the interrupted run logged after its
        last checkpoint, so the log reads as one uninterrupted run."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(keep)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
