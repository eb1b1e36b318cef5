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

from kimi_linear.cache import CachePool, HybridCache
from kimi_linear.checkpoint import load_pretrained, save_pretrained
from kimi_linear.config import KimiLinearConfig
from kimi_linear.generation import generate
from kimi_linear.layers.attn_res import DepthRead, DepthState, Residual, SublayerReads
from kimi_linear.layers.kda import KimiDeltaAttention
from kimi_linear.layers.mla import MultiHeadLatentAttention
from kimi_linear.layers.moe import MLP, MoE
from kimi_linear.layers.norm import RMSNorm
from kimi_linear.step import StepMetadata


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, T, V] (or [B, n, V] with num_logits_to_keep = n)
    loss: torch.Tensor | None = None  # mean next-token cross-entropy (+ balance loss when asked for)
    aux_loss: torch.Tensor | None = None  # sum over MoE layers of the sequence-wise balance loss


class DecoderLayer(nn.Module):
    """Two pre-norm sublayers over a step's flat tokens ``[T, D]``: ``Attn(norm(x))`` then ``FFN(norm(x))``, each
    reading its input from the residual stream and adding its output to it. The standard stream reads the running
    sum (``h = x + Attn(norm(x)); out = h + FFN(norm(h))``); Block AttnRes reads a softmax mix over depth
    (:mod:`kimi_linear.layers.attn_res`)."""

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
        self.attn_res = (SublayerReads(config.hidden_size, config.rms_norm_eps)
                         if config.attn_res_block_size else None)

    def forward(self, stream: Residual | DepthState, meta: StepMetadata, cache: CachePool | None,
                balance_rows: tuple[int, int] | None = None) -> Residual | DepthState:
        reads = self.attn_res
        x = self.input_layernorm(stream.read(reads and reads.attn))
        stream = stream.add(self.self_attn(x, meta, cache))
        x = self.post_attention_layernorm(stream.read(reads and reads.ffn))
        return stream.add(self.block_sparse_moe(x, balance_rows) if self.is_moe else self.mlp(x))


class KimiLinearModel(nn.Module):
    """Embeddings, the decoder loop over the residual stream, and the final norm (after AttnRes's final read)."""

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn_res_block_size = config.attn_res_block_size
        self.attn_res_final = DepthRead(config.hidden_size, config.rms_norm_eps) if self.attn_res_block_size else None
        self.activation_checkpointing = False
        # Two-phase AttnRes reads need every query of a block at its start: inference only, and not when the layers
        # are sharded (the parallel wrappers turn it off).
        self.attn_res_two_phase = True

    def forward(self, input_ids: torch.Tensor, meta: StepMetadata, cache: CachePool | None = None, *,
                balance_rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One step: input_ids ``[num_tokens]`` int64 laid out as ``meta`` says → final-normed hidden states
        ``[num_tokens, D]``. Reads no device value on the host (ids and metadata were checked by their producer)."""
        stream = self._stream(self.embed_tokens(input_ids))
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                stream = checkpoint(layer, stream, meta, cache, balance_rows, use_reentrant=False)
            else:
                stream = layer(stream, meta, cache, balance_rows)
        return self.norm(stream.read(self.attn_res_final))

    def _stream(self, embedding: torch.Tensor) -> Residual | DepthState:
        if not self.attn_res_block_size:
            return Residual(embedding)
        two_phase = self.attn_res_two_phase and not torch.is_grad_enabled()
        return DepthState.start(embedding, self.attn_res_block_size, self._block_reads if two_phase else None)

    def _block_reads(self, block: int) -> list[DepthRead]:
        """The reads of AttnRes block ``block`` (1-based, after the embedding), in order; the final read closes the
        last block."""
        reads = [r for layer in self.layers for r in (layer.attn_res.attn, layer.attn_res.ffn)]
        reads.append(self.attn_res_final)
        S = self.attn_res_block_size
        return reads[(block - 1) * S:block * S]


class KimiLinearForCausalLM(nn.Module):
    """Kimi Linear language model.

    Two ways in: :meth:`forward` for ``[B, T]`` batches (training with packed documents, scoring, a static generation
    batch over a :class:`~kimi_linear.cache.HybridCache`), and the serving step — :meth:`forward_step` over a
    :class:`~kimi_linear.step.StepMetadata` and a :class:`~kimi_linear.cache.CachePool`, then
    :meth:`compute_logits` for the rows that need them. The first is a thin producer of the second.

    Build under ``torch.device("meta")`` to get the structure without allocating weights (the 48B config).
    """

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        self.config = config
        self.model = KimiLinearModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
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
    def forward_step(self, input_ids: torch.Tensor, meta: StepMetadata, cache: CachePool | None = None) -> torch.Tensor:
        """The serving step: ``[num_tokens]`` ids → final-normed hidden states ``[num_tokens, D]``; the cache's
        slots and blocks named by ``meta`` are read and updated."""
        return self.model(input_ids, meta, cache)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` hidden states (of the rows that need logits) → ``[..., V]``."""
        return self.lm_head(hidden)

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
          ``attention_mask`` (1 = real token; pads are left out of the step, and their logits are 0).
        - ``cache``: continue the sequences held in it (generation).
        """
        B, T = _check_ids(input_ids, self.config.vocab_size)
        with_balance = balance_loss_coef > 0
        flat, meta, index = batch_step(input_ids, position_ids, cu_seqlens, attention_mask, cache)
        if with_balance and meta.batch_shape is None:
            raise ValueError("the balance loss needs a batch without padding (attention_mask)")
        hidden = self.model(flat, meta, cache.pool if cache is not None else None,
                            balance_rows=meta.batch_shape if with_balance else None)
        if index is not None:  # back to the [B, T] grid, pads as zeros
            hidden = hidden.new_zeros(B * T, hidden.shape[-1]).index_copy_(0, index, hidden)
        hidden = hidden.view(B, T, -1)
        if num_logits_to_keep:
            hidden = hidden[:, -num_logits_to_keep:]
        logits = self.compute_logits(hidden)

        loss = aux_loss = None
        if labels is not None:
            targets = labels[:, 1:].clone()
            if meta.batch_shape is not None:
                targets[meta.document_starts().view(B, T)[:, 1:]] = -100
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100)
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
        self.model.activation_checkpointing = enabled

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


def _check_ids(input_ids: torch.Tensor, vocab: int) -> tuple[int, int]:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab}), got range "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    return input_ids.shape


def batch_step(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    cache: HybridCache | None,
) -> tuple[torch.Tensor, StepMetadata, torch.Tensor | None]:
    """The step a ``[B, T]`` batch makes: flat ids, metadata, and each step token's index in the flattened ``[B, T]``
    grid (None when the step is the whole grid in order). Reads the batch description on the host (this is where
    it is validated).

    - plain: each row is one sequence;
    - ``position_ids`` restarting at 0 (any B) or ``cu_seqlens`` (B = 1): documents packed into rows;
    - ``attention_mask``: each row's real tokens form its sequence (rows without any are left out);
    - ``cache``: each row continues its sequence in the cache; one-token continuations go first in the step.
    """
    B, T = input_ids.shape
    device = input_ids.device
    given = [name for name, v in (("position_ids", position_ids), ("cu_seqlens", cu_seqlens),
                                  ("attention_mask", attention_mask)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"pass at most one of position_ids, cu_seqlens, attention_mask; got {given}")
    if cache is not None and given and given[0] != "attention_mask":
        raise ValueError("packed sequences cannot be combined with a generation cache")
    flat = input_ids.reshape(-1)
    if attention_mask is None and cache is None:
        return flat, StepMetadata.for_batch(B, T, device, _document_lengths(B, T, position_ids, cu_seqlens)), None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must be [B, T] = [{B}, {T}], got {tuple(attention_mask.shape)}")
        real = attention_mask.to(torch.bool).cpu()
        positions = [real[b].nonzero().flatten().tolist() for b in range(B)]
    else:
        positions = [list(range(T))] * B
    rows = [b for b in range(B) if positions[b]]
    if cache is not None:  # one-token continuations first (decode rows)
        rows.sort(key=lambda b: not (len(positions[b]) == 1 and cache.lengths[b] > 0))
        meta = cache.step(rows, [len(positions[b]) for b in rows])
    else:
        meta = StepMetadata.build([len(positions[b]) for b in rows], device=device)
    order = [b * T + t for b in rows for t in positions[b]]
    if order == list(range(B * T)):
        return flat, meta, None
    index = torch.tensor(order, dtype=torch.long, device=device)
    return flat[index], meta, index


def _document_lengths(B: int, T: int, position_ids: torch.Tensor | None,
                      cu_seqlens: torch.Tensor | None) -> list[int] | None:
    """Lengths of the documents packed into the rows (in order), or None when each row is one sequence."""
    if position_ids is not None:
        if tuple(position_ids.shape) != (B, T):
            raise ValueError(f"position_ids must be [B, T] = [{B}, {T}], got {tuple(position_ids.shape)}")
        starts = position_ids.cpu() == 0
        starts[:, 0] = True
        bounds = [*starts.reshape(-1).nonzero().flatten().tolist(), B * T]
    elif cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens packs sequences into one row: batch size must be 1, got {B}")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != T or any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens must rise strictly from 0 to T = {T}, got {bounds}")
    else:
        return None
    return [b - a for a, b in zip(bounds, bounds[1:])]
