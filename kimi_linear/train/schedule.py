"""Learning-rate schedules as pure functions of the step, so a resumed run needs no scheduler state.

WSD (warmup-stable-decay, as Kimi Linear and Moonlight train): linear warmup to the peak, a long constant phase,
then a linear decay over the last ``decay_fraction`` of the steps down to ``min_lr_ratio * peak``.
Cosine: the same warmup, then a half cosine from the peak down to the same floor.

A WSD warmup that runs into the decay phase is refused rather than silently cut short: the schedule would never
reach its peak, or never decay (warmup takes precedence step by step), and the user would not notice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("wsd", "cosine")


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    warmup_steps: int = 0
    kind: str = "wsd"
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.0

    @property
    def decay_steps(self) -> int:
        """WSD: the number of final steps spent decaying."""
        return round(self.decay_fraction * self.total_steps)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.kind!r}")
        if self.total_steps <= 0:
            raise ValueError(f"steps must be positive, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup steps must be in 0..{self.total_steps}, got {self.warmup_steps}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay fraction must be in [0, 1], got {self.decay_fraction}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min lr ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.kind == "wsd" and self.warmup_steps + self.decay_steps > self.total_steps:
            raise ValueError(f"warmup ({self.warmup_steps} steps) and decay ({self.decay_steps} steps = decay fraction "
                             f"{self.decay_fraction} of {self.total_steps}) overlap: lower --warmup-steps or "
                             "--decay-fraction, or raise --steps")

    def __call__(self, step: int) -> float:
        """Multiplier of the peak learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        floor = self.min_lr_ratio
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_steps = self.decay_steps
        decay_start = self.total_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = (step - decay_start + 1) / decay_steps
        return floor + (1 - floor) * max(0.0, 1 - progress)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
