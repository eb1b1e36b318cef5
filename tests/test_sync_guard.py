"""The host-read guard of tests/sync_guard.py catches every kind of read it claims to, and nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sync_guard import HostReadError, no_host_reads

t = torch.tensor([3, 1, 2])
mask = torch.tensor([True, False, True])

READS = {
    "item": lambda: t[0].item(),
    "tolist": lambda: t.tolist(),
    "int": lambda: int(t[0]),
    "float": lambda: float(t[0]),
    "bool": lambda: bool(t[0]),
    "if": lambda: 1 if t[0] else 0,
    "index": lambda: list(range(10))[t[0]],
    "range": lambda: range(t[0]),
    "numpy": lambda: t.numpy(),
    "np.asarray": lambda: np.asarray(t),
    "cpu": lambda: t.cpu(),
    "nonzero": lambda: t.nonzero(),
    "torch.nonzero": lambda: torch.nonzero(t),
    "where(cond)": lambda: torch.where(mask),
    "mask index": lambda: t[mask],
    "mask assign": lambda: t.clone().__setitem__(mask, 0),
    "masked_select": lambda: t.masked_select(mask),
    "repeat_interleave(counts)": lambda: torch.repeat_interleave(t, t),
    "repeat_interleave(x, counts)": lambda: torch.arange(3).repeat_interleave(t),
    "unique": lambda: t.unique(),
    "bincount": lambda: t.bincount(minlength=5),
    "equal": lambda: torch.equal(t, t),
}


@pytest.mark.parametrize("name", list(READS))
def test_catches(name):
    with pytest.raises(HostReadError), no_host_reads():
        READS[name]()


def test_lets_device_work_through_and_restores_tensor():
    with no_host_reads():
        x = torch.arange(6).view(2, 3) * 2
        y = x[:, torch.tensor([2, 0])]  # integer (not boolean) indexing
        z = torch.where(mask, t, torch.zeros_like(t))  # three-argument where: no data-dependent size
        r = torch.repeat_interleave(t, t, output_size=6)  # the output size given
        s = torch.arange(4).repeat_interleave(2)  # a repeat count on the host
        c = torch.searchsorted(torch.tensor([0, 2, 5]), torch.arange(5), right=True)
        x.index_copy_(0, torch.tensor([1]), x[:1].clone())
    assert y.tolist() == [[4, 0], [10, 6]] and z.tolist() == [3, 0, 2]
    assert r.tolist() == [3, 3, 3, 1, 2, 2] and s.numel() == 8 and c.tolist() == [1, 1, 2, 2, 2]
    assert bool(t[0]) and int(t[0]) == 3 and t.cpu() is t  # patched methods are restored

