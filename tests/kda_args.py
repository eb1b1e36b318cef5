"""Calling a KDA op on a dict of test inputs whose gate parameters are leaves (so gradients reach them)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kimi_linear.ops.kda import KDAOptions

GATE_PARAMS = ("A_log", "dt_bias")


def kda_call(fn: Callable, x: dict[str, torch.Tensor], flags: dict | None = None, **kw):
    """``fn`` on the tensors of x; x's A_log and dt_bias (if any) and ``flags`` (other :class:`KDAOptions` fields)
    go in as ``options``. Nothing to fuse: no ``options`` keyword, so the call also fits naive_recurrent_kda."""
    gate = {n: x[n] for n in GATE_PARAMS if n in x}
    if gate or flags:
        kw["options"] = KDAOptions(**gate, **(flags or {}))
    return fn(**{n: t for n, t in x.items() if n not in gate}, **kw)
