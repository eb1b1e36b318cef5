"""Training: Muon + AdamW, WSD schedule, packed byte-level data, aux-loss-free MoE balancing, FSDP2 and expert
parallelism. Entry points: :class:`kimi_linear.train.trainer.Trainer` and ``kimi-linear train``."""
