"""The generation cache as two pools: KDA state slots and paged MLA latent blocks.

Per KDA layer, a slot holds one sequence's recurrent state ``[H, K, V]`` (fp32) and its conv tail
``[3 * H * K, W - 1]`` (the last W-1 pre-conv inputs of q, k, v), whatever the sequence's length. Per MLA layer, a
block holds ``block_size`` tokens' 576-value latents (``RMSNorm(c_kv)`` 512 + shared ``k_pe`` 64 for the 48B
shape): the absorbed decode attends over them directly, so per-head keys and values are never stored. A sequence
owns one slot and a list of blocks (its block table); layers touch the pools only through a step's
:class:`~kimi_linear.step.StepMetadata`.

Slot 0 and block 0 are never handed to a sequence: padding rows (CUDA-graph batches) and unused block-table entries
point at them, so no padding write can land in real data.

:class:`HybridCache` is the static batch on top of the pools that ``model.generate`` and ``model(..., cache=...)``
use: B sequences that each own one slot and a fixed run of blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kimi_linear.config import KimiLinearConfig
from kimi_linear.step import StepMetadata

PAD_SLOT = 0
PAD_BLOCK = 0
DEFAULT_BLOCK_SIZE = 64


@dataclass(frozen=True)
class CacheSpec:
    """Bytes of one state slot (every KDA layer) and of one latent block (every MLA layer)."""

    bytes_per_slot: int
    bytes_per_block: int
    block_size: int

    @property
    def bytes_per_token(self) -> int:
        """MLA latent bytes per cached token (all MLA layers)."""
        return self.bytes_per_block // self.block_size


def cache_spec(config: KimiLinearConfig, dtype: torch.dtype = torch.bfloat16,
               block_size: int = DEFAULT_BLOCK_SIZE) -> CacheSpec:
    """Sizes of a slot and a block for ``config`` with the conv tails and latents in ``dtype`` (states are fp32)."""
    types = config.layer_types
    item = torch.empty((), dtype=dtype).element_size()
    hk = config.kda_num_heads * config.kda_head_dim
    slot = types.count("kda") * (hk * config.kda_head_dim * 4 + 3 * hk * (config.conv_kernel_size - 1) * item)
    latent = config.kv_lora_rank + config.qk_rope_head_dim
    return CacheSpec(slot, types.count("mla") * block_size * latent * item, block_size)


class CachePool:
    """The pools of every layer: ``kda_state[i]`` ``[num_slots, H, K, V]`` fp32, ``conv_state[i]``
    ``[num_slots, 3 H K, W - 1]`` and ``mla_latent[j]`` ``[num_blocks, block_size, kv_lora + rope]`` in ``dtype``,
    keyed by layer index. Slot 0 and block 0 are the padding slot and block (see the module docstring)."""

    def __init__(self, config: KimiLinearConfig, num_slots: int, num_blocks: int, *,
                 block_size: int = DEFAULT_BLOCK_SIZE, device: torch.device | str, dtype: torch.dtype) -> None:
        if num_slots < 2 or num_blocks < 2 or block_size < 1:
            raise ValueError(f"a cache needs at least 2 slots and 2 blocks (slot and block 0 are padding) and a "
                             f"positive block size, got {num_slots} slots, {num_blocks} blocks of {block_size}")
        self.config = config
        self.num_slots = num_slots
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        H, K, W = config.kda_num_heads, config.kda_head_dim, config.conv_kernel_size
        latent = config.kv_lora_rank + config.qk_rope_head_dim
        self.kda_state: dict[int, torch.Tensor] = {}
        self.conv_state: dict[int, torch.Tensor] = {}
        self.mla_latent: dict[int, torch.Tensor] = {}
        for i, kind in enumerate(config.layer_types):
            if kind == "kda":
                self.kda_state[i] = torch.zeros(num_slots, H, K, K, device=device, dtype=torch.float32)
                self.conv_state[i] = torch.zeros(num_slots, 3 * H * K, W - 1, device=device, dtype=dtype)
            else:
                self.mla_latent[i] = torch.zeros(num_blocks, block_size, latent, device=device, dtype=dtype)

    @classmethod
    def from_budget(cls, config: KimiLinearConfig, budget_bytes: int, *, num_slots: int,
                    block_size: int = DEFAULT_BLOCK_SIZE, device: torch.device | str,
                    dtype: torch.dtype) -> CachePool:
        """``num_slots`` state slots, and as many latent blocks as the rest of ``budget_bytes`` holds."""
        spec = cache_spec(config, dtype, block_size)
        left = budget_bytes - num_slots * spec.bytes_per_slot
        num_blocks = left // spec.bytes_per_block if spec.bytes_per_block else 2
        if num_blocks < 2:
            raise ValueError(f"a budget of {budget_bytes:,} bytes does not hold {num_slots} state slots of "
                             f"{spec.bytes_per_slot:,} bytes and 2 latent blocks of {spec.bytes_per_block:,}")
        return cls(config, num_slots, num_blocks, block_size=block_size, device=device, dtype=dtype)

    @property
    def spec(self) -> CacheSpec:
        return cache_spec(self.config, self.dtype, self.block_size)

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Every KDA layer's state and conv tail: slot ``dst[i]`` takes slot ``src[i]`` (int64 ``[n]``, device)."""
        for pool in (*self.kda_state.values(), *self.conv_state.values()):
            pool.index_copy_(0, dst, pool.index_select(0, src))

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Every MLA layer: block ``dst[i]`` takes block ``src[i]`` (copy-on-write of a shared partial block)."""
        for pool in self.mla_latent.values():
            pool.index_copy_(0, dst, pool.index_select(0, src))

    def fill_slots(self, slots: torch.Tensor, value: float) -> None:
        """Overwrite slots in every KDA layer (tests fill freed slots with NaN to prove nothing reads them)."""
        for pool in (*self.kda_state.values(), *self.conv_state.values()):
            pool[slots] = value

    def fill_blocks(self, blocks: torch.Tensor, value: float) -> None:
        for pool in self.mla_latent.values():
            pool[blocks] = value


class HybridCache:
    """A static batch of ``batch_size`` sequences of up to ``max_length`` tokens over a :class:`CachePool`:
    sequence b owns slot b + 1 and blocks ``[1 + b·M, 1 + (b+1)·M)`` (M = max_length / block_size, rounded up).
    ``lengths[b]`` counts the tokens sequence b holds."""

    def __init__(self, config: KimiLinearConfig, batch_size: int, max_length: int, *, device: torch.device | str,
                 dtype: torch.dtype, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be positive, got {batch_size}, {max_length}")
        self.batch_size = batch_size
        self.max_length = max_length
        per_seq = -(-max_length // block_size)
        self.pool = CachePool(config, batch_size + 1, batch_size * per_seq + 1, block_size=block_size, device=device,
                              dtype=dtype)
        self.lengths = [0] * batch_size
        self._tables = [list(range(1 + b * per_seq, 1 + (b + 1) * per_seq)) for b in range(batch_size)]

    def step(self, rows: list[int], counts: list[int]) -> StepMetadata:
        """Metadata for a step in which sequence ``rows[i]`` brings ``counts[i]`` new tokens (rows in step order,
        one-token continuations first), and the lengths advanced by it."""
        if len(set(rows)) != len(rows) or any(not 0 <= b < self.batch_size for b in rows):
            raise ValueError(f"rows must be distinct sequences in 0..{self.batch_size - 1}, got {rows}")
        over = [b for b, n in zip(rows, counts) if self.lengths[b] + n > self.max_length]
        if over:
            raise ValueError(f"cache holds {self.max_length} tokens per sequence; sequences {over} would exceed it")
        context = [self.lengths[b] for b in rows]
        decodes = 0
        while decodes < len(rows) and counts[decodes] == 1 and context[decodes] > 0:
            decodes += 1
        meta = StepMetadata.build(counts, context, device=self.pool.device, num_decodes=decodes,
                                  state_slots=[b + 1 for b in rows], block_tables=[self._tables[b] for b in rows],
                                  block_size=self.pool.block_size)
        for b, n in zip(rows, counts):
            self.lengths[b] += n
        return meta
