"""``kimi-linear plot RUN_DIR``: train/validation loss and throughput of a run, from its ``metrics.jsonl``."""

from __future__ import annotations

import os

from kimi_linear.errors import UserError
from kimi_linear.train.metrics import read_metrics


def plot_run(run_dir: str, out: str | None = None) -> str:
    """Write a PNG (default ``RUN_DIR/training.png``) with loss curves (left) and tokens/s (right)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} has no metrics.jsonl: is it a training run directory?")
    records = read_metrics(path)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    if not train:
        raise UserError(f"{path} holds no training steps yet")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_speed.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
    ax_speed.set(xlabel="step", ylabel="tokens / s", title="throughput")
    ax_speed.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)))
    fig.tight_layout()
    out = out or os.path.join(run_dir, "training.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
