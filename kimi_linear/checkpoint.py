"""Checkpoint mapping between our modules and the released Hugging Face layout.

Our state dict uses the checkpoint's names except for the routed experts, which we keep stacked for grouped
matmuls. The mapping, in both directions:

  ``...experts.gate_up_proj [E, 2I, D]`` = stack_j cat(``experts.{j}.w1.weight``, ``experts.{j}.w3.weight``)
  ``...experts.down_proj    [E, D, I]``  = stack_j ``experts.{j}.w2.weight``

Loading also accepts ``model.layers.{i}.block_sparse_moe.{gate,up,down}_proj`` for a dense layer's MLP, the
names transformers' ``save_pretrained`` writes for it (the released checkpoint says ``mlp``).
Loading streams tensors from safetensors straight to the target device into a model built on the meta
device, so a model is never materialised twice; saving writes one shard at a time.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kimi_linear.config import KimiLinearConfig

# Parameters and buffers that stay fp32 whatever the model's dtype (as in every engine).
FP32_TENSORS = ("A_log", "dt_bias", "e_score_correction_bias")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_GATE_UP = re.compile(r"^(.*)\.experts\.gate_up_proj$")
_DOWN = re.compile(r"^(.*)\.experts\.down_proj$")
_DENSE_ALIAS = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.((?:gate|up|down)_proj\.weight)$")

M = TypeVar("M", bound=torch.nn.Module)


class CheckpointError(ValueError):
    """The files do not match the model the config describes; the message lists every problem."""


def checkpoint_names(name: str, num_experts: int) -> list[str]:
    """The checkpoint tensors one of our state-dict entries is made of, in stacking order."""
    if m := _GATE_UP.match(name):
        return [f"{m[1]}.experts.{j}.{w}.weight" for j in range(num_experts) for w in ("w1", "w3")]
    if m := _DOWN.match(name):
        return [f"{m[1]}.experts.{j}.w2.weight" for j in range(num_experts)]
    return [name]


def to_checkpoint(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Our (name, tensor) → the checkpoint's (name, tensor) pairs (fresh, unshared storage)."""
    if m := _GATE_UP.match(name):
        w1, w3 = tensor.chunk(2, dim=1)
        for j in range(tensor.shape[0]):
            yield f"{m[1]}.experts.{j}.w1.weight", w1[j].clone()
            yield f"{m[1]}.experts.{j}.w3.weight", w3[j].clone()
    elif m := _DOWN.match(name):
        for j in range(tensor.shape[0]):
            yield f"{m[1]}.experts.{j}.w2.weight", tensor[j].clone()
    else:
        yield name, tensor.contiguous()


def _from_checkpoint(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    if _GATE_UP.match(name):
        return torch.stack([torch.cat(parts[j:j + 2]) for j in range(0, len(parts), 2)])
    if _DOWN.match(name):
        return torch.stack(parts)
    return parts[0]


def _tensor_files(directory: str) -> dict[str, tuple[str, str]]:
    """Checkpoint tensor name (as our mapping expects it) → (file holding it, name stored in that file)."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        missing = sorted({file for file in weight_map.values() if not os.path.isfile(os.path.join(directory, file))})
        if missing:
            raise CheckpointError(f"{INDEX_FILE} names shard files that do not exist: {missing}")
        stored = {name: os.path.join(directory, file) for name, file in weight_map.items()}
    else:
        single = os.path.join(directory, SINGLE_FILE)
        if not os.path.isfile(single):
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
        with safe_open(single, framework="pt") as f:
            stored = {name: single for name in f.keys()}
    files = {}
    for name, file in stored.items():
        m = _DENSE_ALIAS.match(name)
        alias = f"{m[1]}.mlp.{m[2]}" if m else None
        files[alias if alias and alias not in stored else name] = (file, name)
    return files


def load_pretrained(cls: type[M], directory: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> M:
    """Build ``cls(config)`` on the meta device and fill it from the directory's safetensors.

    Floating tensors are cast to ``dtype`` when given (else kept as stored), except :data:`FP32_TENSORS`.
    Raises :class:`CheckpointError` listing every missing, unexpected and wrongly shaped tensor.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"model directory {directory} does not exist")
    config = KimiLinearConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = cls(config)
    files = _tensor_files(directory)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    handles: dict[str, object] = {}

    def handle(file: str):
        if file not in handles:
            handles[file] = safe_open(file, framework="pt", device=str(device))
        return handles[file]

    missing, wrong_shape, used = [], [], set()
    plan: dict[str, list[tuple[str, str]]] = {}
    for name, ref in expected.items():
        wanted = checkpoint_names(name, config.num_experts)
        absent = [n for n in wanted if n not in files]
        missing += absent
        used.update(wanted)
        if absent:
            continue
        plan[name] = [files[n] for n in wanted]
        shape = _stacked_shape(name, [tuple(handle(f).get_slice(n).get_shape()) for f, n in plan[name]])
        if shape != tuple(ref.shape):
            wrong_shape.append(f"{name}: expected {list(ref.shape)}, found {list(shape)}")
    unexpected = sorted(files[n][1] for n in set(files) - used)
    if missing or unexpected or wrong_shape:
        lines = [f"checkpoint in {directory} does not match its config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:50])
                             + (f", ... {len(items) - 50} more" if len(items) > 50 else ""))
        raise CheckpointError("\n".join(lines))

    state = {}
    for name, parts in plan.items():
        tensor = _from_checkpoint(name, [handle(f).get_tensor(n) for f, n in parts])
        if name.rsplit(".", 1)[-1] in FP32_TENSORS:
            tensor = tensor.float()
        elif dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _stacked_shape(name: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    if _GATE_UP.match(name):
        return (len(shapes) // 2, shapes[0][0] + shapes[1][0], *shapes[0][1:])
    if _DOWN.match(name):
        return (len(shapes), *shapes[0])
    return shapes[0]


def parse_size(size: int | str) -> int:
    """``"5GB"`` → 5e9 bytes (GB = 10^9, GiB = 2^30, as Hugging Face does)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size must be bytes or like '5GB', got {size!r}")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m[1]) * units[(m[2] or "B").upper()])


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike, *,
                    max_shard_size: int | str = "5GB") -> None:
    """Write ``config.json`` and the weights in the released layout: one ``model.safetensors`` if it fits in
    ``max_shard_size``, else ``model-0000k-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``.
    Shards are written as they fill, so at most one shard's worth of converted tensors is held in memory."""
    directory = os.fspath(directory)
    limit = parse_size(max_shard_size)
    config: KimiLinearConfig = model.config
    os.makedirs(directory, exist_ok=True)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)

    written: list[tuple[str, list[str]]] = []  # (temporary file, tensor names)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0

    def flush() -> None:
        file = os.path.join(directory, f".shard-{len(written):05d}.tmp")
        save_file(shard, file, metadata={"format": "pt"})
        written.append((file, list(shard)))
        shard.clear()

    for name, tensor in state.items():
        for ckpt_name, part in to_checkpoint(name, tensor.detach().cpu()):
            nbytes = part.numel() * part.element_size()
            if shard and shard_bytes + nbytes > limit:
                flush()
                shard_bytes = 0
            shard[ckpt_name] = part
            shard_bytes += nbytes
            total += nbytes
    flush()

    for stale in (SINGLE_FILE, INDEX_FILE):
        if os.path.exists(os.path.join(directory, stale)):
            os.remove(os.path.join(directory, stale))
    if len(written) == 1:
        os.replace(written[0][0], os.path.join(directory, SINGLE_FILE))
    else:
        weight_map = {}
        for k, (tmp, names) in enumerate(written, start=1):
            file = f"model-{k:05d}-of-{len(written):05d}.safetensors"
            os.replace(tmp, os.path.join(directory, file))
            weight_map.update(dict.fromkeys(names, file))
        with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
            f.write("\n")
    config.save_pretrained(directory)
