"""The model's building blocks: KDA, MLA, MoE / MLP, RMSNorm and the decoder layer."""
