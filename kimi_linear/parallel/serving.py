"""``kimi-linear serve --tensor-parallel N``: the engine over N processes of this host, rank 0 serving HTTP.

The options are ``serve``'s, read as :func:`kimi_linear.server.loading.load_engine` reads them; each rank loads
only its shard from the model directory (:func:`~kimi_linear.parallel.loading.load_shard`), and the pools are sized
by the least free GPU memory over the ranks (every rank's pools have the same slots and blocks). If the group fails
(a rank raised or died), the server is stopped as by SIGTERM — the requests in flight end with the error — and the
command exits with status 1: a group that failed cannot serve again.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from kimi_linear.config import KimiLinearConfig
from kimi_linear.engine import LLMEngine
from kimi_linear.errors import UserError
from kimi_linear.parallel.engine import TensorParallelEngine
from kimi_linear.parallel.group import TensorParallelGroup
from kimi_linear.parallel.launch import start_group
from kimi_linear.parallel.loading import load_shard
from kimi_linear.parallel.tensor import tensor_parallel_config
from kimi_linear.server.loading import engine_config, engine_options, model_tokenizer
from kimi_linear.tokenizer import Tokenizer


def load_rank(rank: int, world: int, group: TensorParallelGroup, *, directory: str,
              dtype: torch.dtype) -> torch.nn.Module:
    """A :data:`~kimi_linear.parallel.launch.Loader`: the rank's shard of ``directory`` on its device."""
    return load_shard(directory, rank, world, group.data, dtype=dtype, device=group.device)


@contextmanager
def tensor_parallel_engine(args: argparse.Namespace) -> Iterator[tuple[LLMEngine, Tokenizer, str]]:
    """(engine, tokenizer, model directory) like ``load_engine``, over ``args.tensor_parallel`` ranks; the workers
    stop when the block exits."""
    world = args.tensor_parallel
    directory, device, dtype = engine_options(args)
    tensor_parallel_config(KimiLinearConfig.from_pretrained(directory), world)  # sizes that do not split: say so now
    load = functools.partial(load_rank, directory=directory, dtype=dtype)
    with start_group(world, load, device=device) as (group, model):
        tokenizer, eos = model_tokenizer(directory, model.config)
        budget = args.memory_budget
        if budget is None and group.device.type == "cuda":  # the engine's default, over the fullest GPU
            budget = int(0.9 * group.free_memory)
        engine = TensorParallelEngine(model, group, engine_config(args, budget), decode=tokenizer.decode,
                                      eos_token_ids=eos)
        group.on_abort.append(lambda: os.kill(os.getpid(), signal.SIGTERM))  # drain and stop the server
        yield engine, tokenizer, directory
    if group.failure is not None:
        raise UserError(f"tensor-parallel serving stopped: {group.failure}")
