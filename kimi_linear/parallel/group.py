"""The processes of a tensor-parallel group on one host: their two process groups, rank 0's message channel, and
what happens when a rank fails.

Two process groups over the same ranks:

- ``data``: the forward's all-reduces — NCCL on CUDA, gloo on the CPU — with a finite ``step_timeout``: a rank that
  stops answering inside a step fails the others' collectives instead of hanging them (gloo also fails them at once
  when a peer's process dies; NCCL's watchdog tears a process down when a collective times out).
- ``control``: gloo, for rank 0's messages (:class:`Broadcast`). Between requests the other ranks wait in it as
  long as the server idles, hence a timeout of a year; a dead rank 0 still ends their wait at once (its sockets
  close). On 2 shared CPU cores a message costs 0.1-0.5 ms with the load, against tens of ms per step.

Failure: after any exception inside a step, the ranks' collectives may be out of step (one rank may wait in an
all-reduce that the others will never join, or match it with the wrong one), so a group that failed is never used
again, and its other ranks must end. A rank's connections close when its process ends — not when it destroys its
process groups — and gloo then fails its peers' waits at once. So a worker that raises exits (which fails rank 0's
step), and rank 0 :meth:`~TensorParallelGroup.abort` s the group when its step raises: every later step raises, and
the ``on_abort`` callbacks run — the launcher's terminates the workers it spawned, the server's stops the server.
A collective that never completes (NCCL, whose waits a dead peer does not end) fails after ``step_timeout``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

IDLE_TIMEOUT = timedelta(days=365)
DEFAULT_STEP_TIMEOUT = 300.0  # seconds; a first step that compiles kernels takes well under a minute


class TensorParallelError(RuntimeError):
    """The tensor-parallel group failed (a rank raised or died); it cannot serve any more."""


class Broadcast:
    """Rank 0 → every other rank, one int64 tensor per message, in one collective: a buffer of ``capacity`` holds the
    length and the message. A longer message grows both sides' buffers to the next power of two (the first
    broadcast then carries only the length, a second one the message); they never shrink, so messages of a size
    seen before take one broadcast again. One measurement on 2 gloo ranks (2 shared CPU cores), for a message of 4k
    ints: this buffer (32 KB) 0.09 ms; a length then the payload (two broadcasts) 0.16 ms; ``broadcast_object_list``
    of the list 0.4 ms (4.4 ms at 64k ints: pickling)."""

    def __init__(self, group: dist.ProcessGroup, capacity: int = 4096) -> None:
        self.group = group
        self.buffer = torch.empty(capacity, dtype=torch.int64)

    def send(self, message: torch.Tensor) -> None:
        n = message.numel()
        self.buffer[0] = n
        if n + 1 > self.buffer.numel():
            dist.broadcast(self.buffer, 0, group=self.group)
            self._grow(n + 1)
            self.buffer[0] = n
        self.buffer[1:n + 1] = message
        dist.broadcast(self.buffer, 0, group=self.group)

    def recv(self) -> torch.Tensor:
        dist.broadcast(self.buffer, 0, group=self.group)
        n = int(self.buffer[0])
        if n + 1 > self.buffer.numel():
            self._grow(n + 1)
            dist.broadcast(self.buffer, 0, group=self.group)
        return self.buffer[1:n + 1].clone()

    def _grow(self, size: int) -> None:
        self.buffer = torch.empty(1 << (size - 1).bit_length(), dtype=torch.int64)


@dataclass(eq=False)
class TensorParallelGroup:
    """One rank's membership: its rank, device, process groups and rank 0's channel."""

    rank: int
    world: int
    device: torch.device
    data: dist.ProcessGroup
    control: dist.ProcessGroup
    channel: Broadcast
    failure: str | None = None
    on_abort: list[Callable[[], None]] = field(default_factory=list)
    free_memory: int = 0  # the least free device memory over the ranks once all shards are loaded (launcher)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def check(self) -> None:
        if self.failure is not None:
            raise TensorParallelError(f"the tensor-parallel group failed earlier ({self.failure}); restart it")

    def abort(self, reason: str) -> None:
        """Give the group up after a failure: record why (every later step raises) and run the ``on_abort``
        callbacks, once; from any thread."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = reason
        log.error("tensor-parallel group aborted: %s", reason)
        for callback in self.on_abort:
            callback()

    def close(self) -> None:
        """Destroy the process groups (idempotent; once no step runs)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    def min_free_memory(self) -> int:
        """The least free device memory over the ranks, in bytes (0 on the CPU): pools are sized the same on every
        rank, so the fullest device decides. A collective: every rank calls it at the same point."""
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else 0
        value = torch.tensor([free], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.control)
        return int(value)


def init_group(rank: int, world: int, store: dist.Store, device: torch.device | str, *,
               step_timeout: float = DEFAULT_STEP_TIMEOUT) -> TensorParallelGroup:
    """Join the group as ``rank`` (every rank calls this with the same ``store``): NCCL data group on a CUDA
    ``device``, gloo otherwise, and the gloo control group. On the CPU the rank takes its share of the cores."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL binds to it
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=step_timeout), device_id=device if cuda else None)
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return TensorParallelGroup(rank, world, device, dist.group.WORLD, control, Broadcast(control))
