"""The Kimi Linear decoder: embeddings, hybrid KDA / MLA layers with MLP / MoE feed-forwards, LM head.

Module names follow the checkpoint (``model.layers.{i}.self_attn.q_proj`` …), so the state dict *is* the
Hugging Face layout except for the stacked experts, which :mod:`kimi_linear.checkpoint` converts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kimi_linear.cache import HybridCache
from kimi_linear.checkpoint import load_pretrained, save_pretrained
from kimi_linear.config import KimiLinearConfig
from kimi_linear.generation import generate
from kimi_linear.layers.kda import KimiDeltaAttention
from kimi_linear.layers.mla import MultiHeadLatentAttention
from kimi_linear.layers.moe import MLP, MoE
from kimi_linear.layers.norm import RMSNorm
from kimi_linear.layers.packing import SequenceInfo


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, T, V] (or [B, n, V] with num_logits_to_keep = n)
    loss: torch.Tensor | None = None  # mean next-token cross-entropy (+ balance loss when asked for)
    aux_loss: torch.Tensor | None = None  # sum over MoE layers of the sequence-wise balance loss


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + Attn(norm(x)); out = h + FFN(norm(h))``."""

    def __init__(self, config: KimiLinearConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_mla = config.layer_types[layer_idx] == "mla"
        self.is_moe = config.is_moe_layer(layer_idx)
        attn = MultiHeadLatentAttention if self.is_mla else KimiDeltaAttention
        self.self_attn = attn(config, layer_idx)
        # The checkpoint names the FFN by its kind; keep those names so the state dict matches it.
        if self.is_moe:
            self.block_sparse_moe = MoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, info: SequenceInfo, cache: HybridCache | None,
                with_balance_loss: bool = False) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), info, cache)
        normed = self.post_attention_layernorm(h)
        ffn = self.block_sparse_moe(normed, with_balance_loss) if self.is_moe else self.mlp(normed)
        return h + ffn


class KimiLinearModel(nn.Module):
    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class KimiLinearForCausalLM(nn.Module):
    """Kimi Linear language model.

    Build under ``torch.device("meta")`` to get the structure without allocating weights (the 48B config).
    """

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        self.config = config
        self.model = KimiLinearModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.activation_checkpointing = False
        self._init_projections()

    @torch.no_grad()
    def _init_projections(self) -> None:
        """Normal(0, initializer_range) for projections and embeddings, instead of PyTorch's defaults. Every other
        module initialises itself when built: norms to ones, convs by default, router and experts normal with
        a zero correction bias, KDA gates as in the released recipe (``KimiDeltaAttention.reset_gate_parameters``)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)

    # ----------------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        balance_loss_coef: float = 0.0,
        num_logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """input_ids ``[B, T]`` int64.

        - ``labels`` ``[B, T]``: logits at t are scored against ``labels[:, t + 1]``; -100 is ignored, and so is
          the first token of each packed document (nothing before it in its document predicts it).
        - Packed documents: ``position_ids`` restarting at 0, or ``cu_seqlens`` (B = 1). Padding:
          ``attention_mask`` (1 = real token; left padding for generation).
        - ``cache``: continue the sequences held in it (generation).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        vocab = self.config.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ValueError(f"token ids must be in [0, {vocab}), got range "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        B, T = input_ids.shape
        info = SequenceInfo.build((B, T), input_ids.device, position_ids, cu_seqlens, attention_mask)
        if cache is not None:
            if info.packed:
                raise ValueError("packed sequences cannot be combined with a generation cache")
            cache.begin_step(T, info.attention_mask)
        with_balance = balance_loss_coef > 0
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, info, cache, with_balance, use_reentrant=False)
            else:
                h = layer(h, info, cache, with_balance)
        if cache is not None:
            cache.end_step(T)
        h = self.model.norm(h)
        if num_logits_to_keep:
            h = h[:, -num_logits_to_keep:]
        logits = self.lm_head(h)

        loss = aux_loss = None
        if labels is not None:
            targets = labels[:, 1:].clone()
            starts = info.document_starts()
            if starts is not None:
                targets[starts[:, 1:]] = -100
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), targets.reshape(-1), ignore_index=-100)
        if with_balance:
            aux_loss = sum(m.balance_loss for m in self.moe_layers())
            if loss is not None:
                loss = loss + balance_loss_coef * aux_loss
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=aux_loss)

    # ----------------------------------------------------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [layer.block_sparse_moe for layer in self.model.layers if layer.is_moe]

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each decoder layer in the backward pass instead of keeping its activations."""
        self.activation_checkpointing = enabled

    def num_parameters(self) -> int:
        """All weights, counting the routers' correction biases (as the released model's count does)."""
        params = {id(p): p.numel() for p in self.parameters()}
        return sum(params.values()) + sum(m.gate.e_score_correction_bias.numel() for m in self.moe_layers())

    def num_activated_parameters(self) -> int:
        """Weights used per token: all but the unrouted experts and the input embedding (a lookup, not a
        matmul) — the convention behind the released model's "3B activated"."""
        c = self.config
        unrouted = sum(
            (m.experts.gate_up_proj.numel() + m.experts.down_proj.numel())
            * (c.num_experts - c.num_experts_per_token) // c.num_experts
            for m in self.moe_layers()
        )
        embed = 0 if c.tie_word_embeddings else self.model.embed_tokens.weight.numel()
        return self.num_parameters() - unrouted - embed

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu") -> KimiLinearForCausalLM:
        """Load a Hugging Face layout directory (config.json + safetensors, sharded or not)."""
        return load_pretrained(cls, directory, dtype=dtype, device=device)

    def save_pretrained(self, directory: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> None:
        """Write config.json and safetensors with the released checkpoint's tensor names."""
        save_pretrained(self, directory, max_shard_size=max_shard_size)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """See :func:`kimi_linear.generation.generate`."""
        return generate(self, input_ids, max_new_tokens, **kwargs)
