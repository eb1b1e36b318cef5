"""Input checks shared by every KDA implementation, so each one fails the same clear way on bad input."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def host_offsets(cu_seqlens: torch.Tensor | None, cu_seqlens_host: Sequence[int] | None) -> list[int] | None:
    """The packed-sequence offsets as Python ints: the host copy when the caller has one (nothing is read from the
    device), else ``cu_seqlens`` read back (a host synchronisation on CUDA); None for unpacked batches."""
    if cu_seqlens is None:
        return None
    return list(cu_seqlens_host) if cu_seqlens_host is not None else cu_seqlens.tolist()


def check_kda_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    cu_seqlens_host: Sequence[int] | None = None,
) -> int:
    """Validate the ``chunk_kda`` contract and return N, the number of sequences (rows of the state).

    ``cu_seqlens_host``: the offsets of ``cu_seqlens`` as Python ints. When given, the offsets are checked on it
    and ``cu_seqlens`` contributes only its shape and dtype (no device read); that the two agree is the caller's
    promise, which cannot be checked without reading the device.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    if g.shape != q.shape:
        raise ValueError(f"g (log-decay) must have q's shape {tuple(q.shape)}, got {tuple(g.shape)}")
    if beta.shape != (B, T, H):
        raise ValueError(f"beta must be [B, T, H] = [{B}, {T}, {H}], got {tuple(beta.shape)}")
    if cu_seqlens is None:
        if cu_seqlens_host is not None:
            raise ValueError("cu_seqlens_host was given without cu_seqlens")
        n_seq = B
    else:
        if B != 1:
            raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got B = {B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D tensor of N + 1 offsets")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        bounds = host_offsets(cu_seqlens, cu_seqlens_host)
        if len(bounds) != cu_seqlens.numel():  # only a host copy can differ
            raise ValueError(f"cu_seqlens_host has {len(bounds)} offsets, cu_seqlens {cu_seqlens.numel()}")
        if bounds[0] != 0 or bounds[-1] != T or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
            raise ValueError(f"cu_seqlens must rise from 0 to T = {T} without decreasing, got {bounds}")
        n_seq = len(bounds) - 1
    if initial_state is not None:
        expected = (n_seq, H, K, v.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state must be [N, H, K, V] = {list(expected)}, got {tuple(initial_state.shape)}")
    return n_seq
