"""Tensor parallelism of the model over the W GPUs of one host: each rank holds 1/W of every layer's heads and
feed-forward width, and all of the rest; one all-reduce per sublayer puts the rank's partial sums together.

What rank r of W holds (rows = a Linear's output features, dim 0 of its weight; "its heads" = heads
``[r H/W, (r+1) H/W)``):

- KDA ``q/k/v_proj``, ``q/k/v_conv1d``, ``f_b_proj``, ``g_b_proj``, ``dt_bias``, ``A_log``, ``b_proj``: the rows of
  its heads. A head's channels stay together through the depthwise conv, the gate, the delta rule and the gated
  norm, so heads need nothing from each other until ``o_proj``.
- KDA ``f_a_proj``, ``g_a_proj`` (the low-rank inputs of every head's gates, D x K) and ``o_norm`` (one weight per
  channel, shared by the heads): replicated.
- MLA ``q_proj``, ``kv_b_proj``: the rows of its heads. ``kv_a_proj_with_mqa`` and ``kv_a_layernorm``: replicated —
  the latent is shared by all heads, so every rank computes and caches all of it.
- ``o_proj`` of both: the columns of its heads (row-parallel): each rank's output is a partial sum.
- The dense MLP (layer 0) and the shared expert: ``gate/up`` rows and ``down`` columns (column then row parallel:
  nothing moves in between); the routed experts: 1/W of each expert's width (below).
- Router, norms, embeddings, ``lm_head``: replicated. Every rank computes the same routing. ``lm_head`` is not split
  by vocabulary: only rank 0 computes logits (it samples), so a split would add a gather for nothing; it costs
  0.75 GB per rank for the 48B in bf16.

So a rank's KDA state is ``[H/W, K, V]`` per slot and its conv tail ``[3 H K / W, W_conv - 1]``; its MLA latent
cache is the whole ``[blocks, block_size, C + R]``. The all-reduces: after each ``o_proj`` and after each
feed-forward (the MoE's routed + shared output together), 2 per decoder layer.

Routed experts are split *inside* each expert (its ``I`` intermediate features) rather than expert-parallel (rank r
owning E/W whole experts): every rank then does exactly 1/W of every token's expert work whatever the routing, and
the all-reduce waits for the slowest rank. Expert-parallel load is the routing's: a decode step of one sequence
sends its 8 experts to 2 ranks as a coin flip, and the busier rank holds 5.1 of them on average (64 % of the work
instead of 50 %). Splitting keeps ``moe_experts`` and its indices unchanged, only the matrices narrower
(``I/W`` = 512 for the 48B on 2 GPUs); at W = 8 (``I/W`` = 128) expert parallelism would be worth adding.

The rank's model is an ordinary :class:`~kimi_linear.model.KimiLinearForCausalLM` built from
:func:`tensor_parallel_config` — the config with H/W heads and I/W widths — so the layers' own constructors size
it, and the same config sizes the rank's :class:`~kimi_linear.cache.CachePool`. The layers know nothing of
parallelism: forward hooks on ``o_proj`` and on the feed-forward modules do the all-reduces. Inference only (the
all-reduce is not differentiable).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kimi_linear.config import KimiLinearConfig
from kimi_linear.model import KimiLinearForCausalLM


@dataclass(frozen=True)
class Split:
    """Rank r holds block r of W along ``dim`` — of each of ``parts`` equal pieces of that dim, when it stacks several
    (the experts' ``gate_up_proj`` is the gate rows then the up rows: each rank takes its block of both)."""

    dim: int
    parts: int = 1


# Sharded tensors by the end of their state-dict name (module.tensor or tensor); every other tensor is replicated.
SPLITS: dict[str, Split] = {
    **{f"{p}_proj.weight": Split(0) for p in ("q", "k", "v", "f_b", "g_b", "b", "kv_b", "gate", "up")},
    **{f"{p}_conv1d.weight": Split(0) for p in ("q", "k", "v")},
    "dt_bias": Split(0),
    "A_log": Split(2),  # [1, 1, H, 1]
    "o_proj.weight": Split(1),
    "down_proj.weight": Split(1),
    "experts.gate_up_proj": Split(1, parts=2),  # [E, 2 I, D]
    "experts.down_proj": Split(2),  # [E, D, I]
}


def split_of(name: str) -> Split | None:
    """How the state-dict entry ``name`` is sharded; None when every rank holds all of it."""
    parts = name.split(".")
    return SPLITS.get(".".join(parts[-2:]), SPLITS.get(parts[-1]))


def block_ranges(size: int, split: Split, rank: int, world: int) -> list[slice]:
    """The index ranges of rank ``rank``'s block along ``split.dim``, a dim of ``size`` (one range per part)."""
    if size % (split.parts * world):
        raise ValueError(f"a dim of {size} does not split into {split.parts} x {world} equal blocks")
    piece, block = size // split.parts, size // split.parts // world
    return [slice(p * piece + rank * block, p * piece + (rank + 1) * block) for p in range(split.parts)]


def shard(tensor: torch.Tensor, split: Split | None, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s block of ``tensor`` (a view when it is one range; the tensor itself when replicated)."""
    if split is None:
        return tensor
    blocks = [tensor.narrow(split.dim, r.start, r.stop - r.start)
              for r in block_ranges(tensor.shape[split.dim], split, rank, world)]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=split.dim)


def tensor_parallel_config(config: KimiLinearConfig, world: int) -> KimiLinearConfig:
    """The config of one rank's modules: H/W KDA and MLA heads, I/W dense, expert and shared-expert widths. A model
    built from it has the shapes of a shard, and a :class:`~kimi_linear.cache.CachePool` built from it the shapes of
    the rank's pools (KDA state ``[slots, H/W, K, V]``, conv ``[slots, 3 H K / W, W_conv - 1]``, full latents)."""
    if world < 1:
        raise ValueError(f"tensor parallel needs at least 1 rank, got {world}")
    sizes = {"KDA heads": config.kda_num_heads, "MLA heads": config.num_attention_heads,
             "intermediate_size": config.intermediate_size}
    if config.num_experts:
        sizes["moe_intermediate_size"] = config.moe_intermediate_size
    bad = [f"{name} ({n})" for name, n in sizes.items() if n % world]
    if bad:
        raise ValueError(f"tensor parallel over {world} ranks needs {', '.join(bad)} divisible by it")
    data = config.to_dict()
    data["linear_attn_config"]["num_heads"] //= world
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "moe_intermediate_size"):
        data[name] //= world
    return KimiLinearConfig.from_dict(data)


def build_shard(config: KimiLinearConfig, rank: int, world: int, group: dist.ProcessGroup | None,
                state: dict[str, torch.Tensor]) -> KimiLinearForCausalLM:
    """Rank ``rank``'s model: built on the meta device from :func:`tensor_parallel_config` and given ``state``, its
    tensors (already this rank's blocks; lm_head may be absent when tied), with the all-reduces attached."""
    local = tensor_parallel_config(config, world)
    with torch.device("meta"):
        model = KimiLinearForCausalLM(local)
    if local.tie_word_embeddings:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    model.load_state_dict(state, assign=True, strict=True)
    if local.tie_word_embeddings:  # assign=True put two tensors in the tied pair
        model.lm_head.weight = model.model.embed_tokens.weight
    attach_all_reduces(model, group)
    return model


@torch.no_grad()
def shard_model(model: KimiLinearForCausalLM, rank: int, world: int,
                group: dist.ProcessGroup | None = None) -> KimiLinearForCausalLM:
    """Rank ``rank`` of ``world``'s model cut from a full one (same device and dtypes); its ``config`` is the local
    one. Sharded blocks are copies and replicated tensors are shared, so the full model can be dropped afterwards.
    The 48B model does not fit whole in every rank: :func:`kimi_linear.parallel.loading.load_shard` reads only the
    rank's blocks from a checkpoint."""
    state = {name: t if (split := split_of(name)) is None else shard(t, split, rank, world).clone()
             for name, t in model.state_dict().items()}
    return build_shard(model.config, rank, world, group, state).train(model.training)


class _AllReduce:
    """Forward hook: sums a row-parallel module's partial output over the group, in place."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        dist.all_reduce(output, group=self.group)


def attach_all_reduces(model: KimiLinearForCausalLM, group: dist.ProcessGroup | None) -> None:
    """One all-reduce per sublayer: after each attention's ``o_proj`` and after each feed-forward (the MoE sums its
    routed and shared experts first, so one all-reduce serves both)."""
    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_hook(_AllReduce(group))
        (layer.block_sparse_moe if layer.is_moe else layer.mlp).register_forward_hook(_AllReduce(group))
