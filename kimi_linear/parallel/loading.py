"""Load one tensor-parallel rank's shard straight from a checkpoint directory, reading only its blocks.

The 48B model is ~98 GB in bf16: no rank may load it whole. Each checkpoint tensor is opened lazily
(``safe_open(...).get_slice``) and only the rank's block is materialised, on the host one tensor at a time, then
copied to the device. The files are memory-mapped, so the ranks of one host share the page cache; a row block is a
contiguous range of its file, while a column block (``o_proj``, ``down_proj``, the experts' w2) still touches every
page of its tensor. Routed experts are stored one matrix per expert (``experts.{j}.w1 / w3 / w2``): rank r reads
rows ``[r I/W, (r+1) I/W)`` of each w1 and w3 (the halves of ``gate_up_proj``'s dim 1) and those columns of each
w2, then stacks them as the full loader does.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from safetensors import safe_open

from kimi_linear.checkpoint import FP32_TENSORS, CheckpointError, _from_checkpoint, _tensor_files, checkpoint_names
from kimi_linear.config import KimiLinearConfig
from kimi_linear.model import KimiLinearForCausalLM
from kimi_linear.parallel.tensor import Split, block_ranges, build_shard, split_of, tensor_parallel_config


def load_shard(directory: str | os.PathLike, rank: int, world: int, group: dist.ProcessGroup | None, *,
               dtype: torch.dtype | None, device: torch.device | str) -> KimiLinearForCausalLM:
    """Rank ``rank`` of ``world``'s model (see :func:`kimi_linear.parallel.tensor.shard_model`) from the Hugging
    Face layout ``directory``. Floating tensors are cast to ``dtype`` (when given) except the fp32 ones, as
    :func:`kimi_linear.checkpoint.load_pretrained` does. Raises :class:`CheckpointError` listing missing, unexpected
    and wrongly shaped tensors."""
    directory = os.fspath(directory)
    config = KimiLinearConfig.from_pretrained(directory)
    with torch.device("meta"):
        expected = KimiLinearForCausalLM(tensor_parallel_config(config, world)).state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    files = _tensor_files(directory)
    handles = {}

    def handle(ckpt_name: str):
        file, stored = files[ckpt_name]
        if file not in handles:
            handles[file] = safe_open(file, framework="pt", device="cpu")
        return handles[file].get_slice(stored)

    missing, wrong, used = [], [], set()
    state = {}
    for name, ref in expected.items():
        wanted = checkpoint_names(name, config.num_experts)
        used.update(wanted)
        absent = [n for n in wanted if n not in files]
        if absent:
            missing += absent
            continue
        split = split_of(name)
        # A stacked expert tensor's parts are its experts' matrices, one dim fewer: dim 1 of gate_up (w1 ++ w3) is
        # dim 0 of each w1 and w3, dim 2 of down_proj is dim 1 of each w2.
        part_split = split if split is None or len(wanted) == 1 else Split(split.dim - 1)
        try:
            parts = [_read_block(handle(ckpt_name), part_split, rank, world) for ckpt_name in wanted]
        except ValueError as e:
            wrong.append(f"{name}: {e}")
            continue
        tensor = _from_checkpoint(name, parts)
        if tensor.shape != ref.shape:
            wrong.append(f"{name}: rank {rank} of {world} expects {list(ref.shape)}, read {list(tensor.shape)}")
            continue
        if name.rsplit(".", 1)[-1] in FP32_TENSORS:
            tensor = tensor.float()
        elif dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.to(device)
    unexpected = sorted(files[n][1] for n in set(files) - used)
    if missing or unexpected or wrong:
        lines = [f"checkpoint in {directory} does not match its config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20])
                             + (f", ... {len(items) - 20} more" if len(items) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    return build_shard(config, rank, world, group, state).eval()


def _read_block(tensor_slice, split: Split | None, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s block of a lazily opened checkpoint tensor (all of it when replicated), read alone."""
    if split is None:
        return tensor_slice[:]
    shape = tensor_slice.get_shape()
    blocks = []
    for r in block_ranges(shape[split.dim], split, rank, world):
        index = [slice(None)] * len(shape)
        index[split.dim] = r
        blocks.append(tensor_slice[tuple(index)])
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=split.dim)
