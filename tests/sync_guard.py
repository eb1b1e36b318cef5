"""``no_host_reads()``: fail on anything that reads a tensor's values on the host.

On CUDA such a read is a host synchronisation: it stalls the CPU until the GPU catches up, and it cannot be
captured in a CUDA graph. The serving step must not do any; this guard proves it for code run on CPU tensors,
where every tensor stands for a device tensor (so host metadata must come as Python ints, not tensors).

What it catches:
- through a TorchDispatchMode, the aten ops that read values on the host or whose output size depends on them:
  ``_local_scalar_dense`` (``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``), ``nonzero``, ``masked_select``,
  ``repeat_interleave`` without ``output_size``, boolean-mask ``index`` / ``index_put_`` (``x[mask]``,
  ``x[mask] = v``), ``unique`` and friends, ``bincount`` (sizes its output from the maximum on CUDA), ``equal``,
  and copies from a non-CPU tensor to the CPU;
- by patching ``torch.Tensor``: ``tolist``, ``numpy``, ``cpu``, ``item`` and the ``__bool__``, ``__int__``,
  ``__float__``, ``__index__`` conversions (``tolist`` and ``numpy`` read CPU memory without any aten op).

It is a test helper: it changes ``torch.Tensor`` for the duration of the block (not thread-safe).

``no_cuda_sync()`` is its counterpart on a GPU: PyTorch's CUDA sync debug mode, which also sees what no value read
shows, such as a copy to the GPU from pageable host memory (it waits for the stream).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class HostReadError(AssertionError):
    """Raised by :func:`no_host_reads` at the offending call."""


# Ops that always read values on the host, or size their output from them.
_ALWAYS = {
    aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.equal, aten.bincount,
    aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive,
}
_PATCHED = ("tolist", "numpy", "cpu", "item", "__bool__", "__int__", "__float__", "__index__")


def _is_mask(index: object) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _reads_host(func, args: tuple, kwargs: dict) -> bool:
    packet = func.overloadpacket
    if packet in _ALWAYS:
        return True
    if func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor):
        return kwargs.get("output_size") is None  # else the output length is sum(repeats)
    if packet in (aten.index, aten.index_put, aten.index_put_):
        return any(_is_mask(i) for i in args[1])
    if packet in (aten._to_copy, aten.copy_):
        src = args[1] if packet is aten.copy_ else args[0]
        dst_cpu = (args[0].device.type == "cpu") if packet is aten.copy_ else (
            kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu")
        return dst_cpu and src.device.type != "cpu"
    return False


class _Guard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _reads_host(func, args, kwargs):
            raise HostReadError(f"host read of a tensor value: {func}")
        return func(*args, **kwargs)


@contextmanager
def no_host_reads() -> Iterator[None]:
    """Run a block that must read no tensor value on the host; the first read raises :class:`HostReadError`."""
    saved = {name: torch.Tensor.__dict__.get(name) for name in _PATCHED}

    def refuse(name: str):
        def method(self, *args, **kwargs):
            raise HostReadError(f"host read of a tensor value: Tensor.{name}")
        return method

    for name in _PATCHED:
        setattr(torch.Tensor, name, refuse(name))
    try:
        with _Guard():
            yield
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


@contextmanager
def no_cuda_sync() -> Iterator[None]:
    """On CUDA: fail (RuntimeError) on any operation that synchronises the host with the GPU, as far as PyTorch's
    sync debug mode sees them (a prototype: not every kind of synchronisation is covered)."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
