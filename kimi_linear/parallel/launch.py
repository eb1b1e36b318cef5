"""Start a tensor-parallel group on this host from the process that becomes its rank 0.

Rank 0 is the calling process — the one that serves HTTP and receives the signals — and spawns ranks 1..W-1
(``torch.multiprocessing``, spawn). Rank r uses ``cuda:r`` (NCCL) or the CPU (gloo; tests). The ranks meet
through a TCP store that rank 0 opens on a free port.

Lifetimes: a worker ignores SIGINT (a Ctrl-C reaches the whole terminal process group: rank 0 decides), loads its
shard, runs :func:`~kimi_linear.parallel.engine.run_worker` and exits when rank 0 says so, or with an error when a
collective fails — also when rank 0 dies (its sockets close). Rank 0 watches the workers: one that exits before it
is told to aborts the group (:meth:`~kimi_linear.parallel.group.TensorParallelGroup.abort`), which terminates the
others. On exit rank 0 tells the workers to stop, waits for them, then kills any left.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kimi_linear.parallel.engine import run_worker, stop_workers
from kimi_linear.parallel.group import DEFAULT_STEP_TIMEOUT, TensorParallelGroup, init_group

log = logging.getLogger(__name__)

# (rank, world, group) -> the rank's shard, on group.device; picklable (it travels to the spawned workers).
Loader = Callable[[int, int, TensorParallelGroup], nn.Module]
JOIN_TIMEOUT = 30.0


def rank_devices(device: str, world: int) -> list[torch.device]:
    """``"cuda"``: ``cuda:0`` .. ``cuda:W-1`` (CUDA_VISIBLE_DEVICES picks which GPUs); ``"cpu"``: the CPU for all."""
    kind = torch.device(device).type
    if kind == "cpu":
        return [torch.device("cpu")] * world
    if device != "cuda":
        raise ValueError(f"tensor parallel takes --device cuda (rank r on cuda:r) or cpu, got {device!r}")
    if torch.cuda.device_count() < world:
        raise ValueError(f"tensor parallel over {world} GPUs, but {torch.cuda.device_count()} are visible")
    return [torch.device("cuda", r) for r in range(world)]


@contextmanager
def start_group(world: int, load: Loader, *, device: str,
                step_timeout: float = DEFAULT_STEP_TIMEOUT) -> Iterator[tuple[TensorParallelGroup, nn.Module]]:
    """Make this process rank 0 of ``world`` ranks; every rank loads its shard with ``load``. Yields (group, rank 0's
    shard) once every rank has loaded; ``group.free_memory`` is then the least free device memory over the ranks.
    The caller builds a :class:`~kimi_linear.parallel.engine.TensorParallelEngine` on them."""
    devices = rank_devices(device, world)
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    spawn = mp.get_context("spawn")
    workers = [spawn.Process(target=_worker_main, args=(r, world, store.port, load, devices[r], step_timeout),
                             name=f"kimi-linear-tp{r}", daemon=True) for r in range(1, world)]
    for w in workers:
        w.start()
    closing = threading.Event()
    group = None
    serving = False  # the workers wait for rank 0's messages (before that, they are loading or agreeing)
    try:
        group = init_group(0, world, store, devices[0], step_timeout=step_timeout)
        group.on_abort.append(lambda: _terminate(workers))
        threading.Thread(target=_watch, args=(workers, group, closing), name="kimi-linear-tp-watch",
                         daemon=True).start()
        model = load(0, world, group)
        group.free_memory = group.min_free_memory()
        serving = True
        yield group, model
    finally:
        closing.set()
        if serving:  # else the workers wait in a load or a collective that rank 0 will not join: terminate them
            try:
                stop_workers(group)
            except Exception:  # a worker already gone: the joins below settle it
                log.warning("could not tell the tensor-parallel workers to stop", exc_info=True)
            for w in workers:
                w.join(JOIN_TIMEOUT)
        _terminate(workers)
        if group is not None:
            group.close()


def _watch(workers: list[mp.Process], group: TensorParallelGroup, closing: threading.Event) -> None:
    """Abort the group when a worker exits before rank 0 told it to."""
    ready = multiprocessing.connection.wait([w.sentinel for w in workers])
    if not closing.is_set():
        gone = [w for w in workers if w.sentinel in ready]
        for w in gone:
            w.join(1.0)  # the sentinel fires as the process ends, a moment before its exit code is known
        group.abort("worker exited: " + ", ".join(f"{w.name} (exit code {w.exitcode})" for w in gone))


def _terminate(workers: list[mp.Process]) -> None:
    for w in workers:
        if w.is_alive():
            w.terminate()
    for w in workers:
        w.join(5.0)
        if w.is_alive():
            w.kill()
            w.join()


def _worker_main(rank: int, world: int, port: int, load: Loader, device: torch.device, step_timeout: float) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False)
    group = init_group(rank, world, store, device, step_timeout=step_timeout)
    try:
        model = load(rank, world, group)
        group.min_free_memory()  # rank 0 sizes the pools by the fullest device
        run_worker(model, group)
    finally:
        group.close()
