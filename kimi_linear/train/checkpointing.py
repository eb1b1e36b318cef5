"""Training checkpoints: the model in Hugging Face layout plus everything an exact resume needs.

Layout of a run directory ``runs/<name>/``::

    config.json, model.safetensors    the latest checkpoint's model (loadable with from_pretrained / generate)
    metrics.jsonl                     the metrics log
    checkpoint/                       the latest complete checkpoint:
        config.json, model.safetensors    model (HF layout; fp32 master weights, router biases included)
        trainer_state.json                step, data position, the training config
        trainer_optimizer.rank{r}.pt      rank r's optimizer state (its shards)
        trainer_rng.rank{r}.pt            rank r's RNG states

Crash safety: a checkpoint is written whole into ``checkpoint.tmp/``, then swapped in by renames
(``checkpoint`` -> ``checkpoint.prev``, ``checkpoint.tmp`` -> ``checkpoint``, delete ``checkpoint.prev``); a crash
at any point leaves either ``checkpoint`` or ``checkpoint.prev`` complete, and :func:`find_checkpoint` takes
whichever survives. The top-level model files are then replaced one by one with ``os.replace``.

Loading executes nothing from the run directory: the model is safetensors, the trainer state JSON, and the
optimizer / RNG files are read with ``torch.load(weights_only=True)``, whose unpickler rebuilds only tensors and
plain containers / numbers / strings (all that an optimizer state dict and ``random.getstate()`` hold). A file
holding anything else (a tampered run directory) is refused with a :class:`UserError`.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from kimi_linear.errors import UserError
from kimi_linear.model import KimiLinearForCausalLM

STATE_FILE = "trainer_state.json"
TRAINER_PREFIX = "trainer_"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (collective: every rank must call it). FSDP shards are all-gathered;
    expert-parallel blocks are all-gathered and concatenated along the expert dimension."""
    expert_parallel = {n for n, p in model.named_parameters() if getattr(p, "expert_parallel", False)}
    state = {}
    for name, t in model.state_dict().items():
        if isinstance(t, DTensor):
            t = t.full_tensor()
        elif name in expert_parallel:
            blocks = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(blocks, t.contiguous())
            t = torch.cat(blocks)
        state[name] = t.detach().cpu()
    return state


def write_model(config, state: dict[str, torch.Tensor], directory: str | os.PathLike) -> None:
    """Save an unsharded state dict (from :func:`full_state_dict`) in Hugging Face layout."""
    with torch.device("meta"):
        holder = KimiLinearForCausalLM(config)
    holder.load_state_dict(state, assign=True)
    holder.save_pretrained(directory)


def save_model(model: nn.Module, directory: str | os.PathLike, rank: int) -> None:
    """Save a (possibly sharded) model in Hugging Face layout; collective, rank 0 writes."""
    state = full_state_dict(model)
    if rank == 0:
        write_model(model.config, state, directory)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _check_rng_state(state: object, path: Path) -> dict:
    """The RNG state of :func:`rng_state`, or a UserError: a malformed one would fail deep inside ``random``."""
    if not (isinstance(state, dict) and isinstance(state.get("python"), tuple)
            and isinstance(state.get("torch"), torch.Tensor)):
        raise UserError(f"{path} is not an RNG state written by kimi-linear")
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _replace_file(src: Path, dst: Path) -> None:
    """Atomically make ``dst`` a copy (hard link where possible) of ``src``."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def save_checkpoint(run_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, rank: int, tokenizer=None) -> None:
    """Write a complete checkpoint atomically (collective under torch.distributed; see the module docstring), with
    the tokenizer's files beside the model when it has any to write."""
    run_dir = Path(run_dir)
    tmp, final, prev = run_dir / "checkpoint.tmp", run_dir / "checkpoint", run_dir / "checkpoint.prev"
    state = full_state_dict(model)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        torch.save(optimizer.state_dict(), tmp / f"{TRAINER_PREFIX}optimizer.rank{rank}.pt")
        torch.save(rng_state(), tmp / f"{TRAINER_PREFIX}rng.rank{rank}.pt")
        if rank == 0:
            write_model(model.config, state, tmp)
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(tmp)
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    if rank == 0:
        shutil.rmtree(prev, ignore_errors=True)
        if final.exists():
            final.rename(prev)
        tmp.rename(final)
        shutil.rmtree(prev, ignore_errors=True)
        for f in sorted(final.iterdir()):
            if not f.name.startswith(TRAINER_PREFIX):
                _replace_file(f, run_dir / f.name)
    _barrier()


def find_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The latest complete checkpoint directory of a run, or None."""
    for candidate in ("checkpoint", "checkpoint.prev"):
        path = Path(run_dir) / candidate
        if (path / STATE_FILE).is_file():
            return path
    return None


def load_trainer_state(checkpoint: Path) -> dict:
    """``trainer_state.json``, checked for the fields a resume reads (UserError when they are missing)."""
    path = checkpoint / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): the checkpoint is damaged") from e
    if not (isinstance(state, dict) and isinstance(state.get("config"), dict)
            and isinstance(state.get("step"), int) and isinstance(state.get("world_size"), int)):
        raise UserError(f"{path} lacks the step, world_size or config of a kimi-linear checkpoint")
    return state


def _unpickling_detail(error: Exception) -> str:
    """The line of torch's long weights-only error that names what was refused (e.g. ``posix.system``), if any:
    the rest of that message is advice to retry with ``weights_only=False``, exactly what must not be done."""
    lines = [line.strip() for line in str(error).splitlines()]
    found = next((line for line in lines if "unsupported" in line.lower() and "global" in line.lower()), "")
    return f": {found.rstrip('.')}" if found else ""


def load_tensor_file(path: Path) -> object:
    """``torch.load`` restricted to tensors and plain values (no code runs, whatever the file holds).

    Tensors are read onto the CPU, so a GPU run's checkpoint also resumes elsewhere; ``load_state_dict`` moves
    optimizer state to each parameter's device, and CUDA RNG states are CPU tensors anyway."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"refusing to load {path}: it holds more than tensors and plain values (a damaged, tampered "
                        f"or foreign file; unpickling it in full could run code){_unpickling_detail(e)}") from e
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    except (RuntimeError, EOFError) as e:  # torch's own reading errors: not a zip archive, truncated, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {path}: the checkpoint is damaged ({reason})") from e


def load_rank_state(checkpoint: Path, optimizer: torch.optim.Optimizer, rank: int) -> None:
    """Restore this rank's optimizer and RNG states."""
    files = [checkpoint / f"{TRAINER_PREFIX}{kind}.rank{rank}.pt" for kind in ("optimizer", "rng")]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"checkpoint {checkpoint} lacks {', '.join(missing)}: was it saved with fewer processes?")
    optimizer_state = load_tensor_file(files[0])
    if not isinstance(optimizer_state, dict):
        raise UserError(f"{files[0]} is not an optimizer state written by kimi-linear")
    optimizer.load_state_dict(optimizer_state)
    set_rng_state(_check_rng_state(load_tensor_file(files[1]), files[1]))
