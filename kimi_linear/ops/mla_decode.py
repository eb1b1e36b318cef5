"""Paged MLA decode attention in absorbed form: every head attends over the shared per-token latent.

An MLA layer caches one latent per token, ``[c_kv ; k_pe]`` of C + R values (C = kv_lora_rank, R =
qk_rope_head_dim). With W_UK folded into the query and W_UV into the output, decode is multi-query attention
with one shared key/value "head": the key is the whole latent (C + R), the value its first C entries. The
serving engine keeps the latents in a paged store, ``cache [num_blocks, block_size, C + R]``; sequence n owns
the blocks listed in row n of a block table, in order, so token p of it is at
``cache[block_table[n, p // block_size], p % block_size]``.

Contract shared by both implementations (no host synchronisation, so a decode step can be graph-captured):
- a row with ``seq_lens[n] <= 0`` is padding: its output is zeros;
- only the first ``ceil(seq_lens[n] / block_size)`` block-table entries of a row and only the first
  ``seq_lens[n]`` cached positions are used; the rest may hold anything (garbage ids, NaN latents) and cannot
  change the result. Lengths above the table's capacity ``max_blocks * block_size`` are clamped to it.

Backend: CUDA tensors (or the backend forced to ``triton``) go to the Triton kernel of
:mod:`kimi_linear.ops.triton_mla_decode`, everything else, and any call that needs gradients, to the PyTorch
reference below.
"""

from __future__ import annotations

import torch

from kimi_linear.ops.backend import kernel_module

CACHE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_paged_mla_inputs(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                           value_dim: int, num_splits: int | None) -> None:
    """Raise ``ValueError`` for inputs that break the :func:`paged_mla_decode` contract. Shapes, dtypes and
    devices only: tensor values are never read (that would synchronise with the host)."""
    if q.dim() != 3 or not q.is_floating_point():
        raise ValueError(f"q must be a float tensor [N, H, C + R], got {q.dtype} {tuple(q.shape)}")
    N, H, D = q.shape
    if cache.dim() != 3 or cache.dtype not in CACHE_DTYPES:
        raise ValueError(f"cache must be [num_blocks, block_size, C + R] in bf16/fp16/fp32, got {cache.dtype} "
                         f"{tuple(cache.shape)}")
    if cache.shape[-1] != D:
        raise ValueError(f"cache rows hold {cache.shape[-1]} values but q has {D} (C + R) per head: they must match")
    if cache.shape[0] == 0 or cache.shape[1] == 0:
        raise ValueError(f"cache must have at least one block of at least one token, got {tuple(cache.shape)}")
    if block_table.dim() != 2 or block_table.shape[0] != N or block_table.dtype not in INDEX_DTYPES:
        raise ValueError(f"block_table must be int32/int64 [N = {N}, max_blocks], got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    if seq_lens.shape != (N,) or seq_lens.dtype not in INDEX_DTYPES:
        raise ValueError(f"seq_lens must be int32/int64 [N = {N}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if isinstance(value_dim, bool) or not isinstance(value_dim, int) or not 0 < value_dim <= D:
        raise ValueError(f"value_dim must be an int in 1..{D} (C, the latent part of the C + R = {D} values), "
                         f"got {value_dim!r}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"num_splits must be None or a positive int, got {num_splits!r}")
    devices = {t.device for t in (q, cache, block_table, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"q, cache, block_table and seq_lens must be on one device, got "
                         f"{q.device}, {cache.device}, {block_table.device}, {seq_lens.device}")


def paged_mla_decode(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, *,
                     scale: float, value_dim: int, num_splits: int | None = None) -> torch.Tensor:
    """One decode step of absorbed MLA over a paged latent cache: ``softmax(scale * q k^T) v`` per (row, head).

    q ``[N, H, C + R]`` any float dtype (the query in latent space: ``q_nope @ W_UK`` then ``q_pe``);
    cache ``[num_blocks, block_size, C + R]`` bf16/fp16/fp32; block_table ``[N, max_blocks]`` int32/int64;
    seq_lens ``[N]`` int32/int64 (see the module docstring for padding rows and unused entries).
    Key = the whole latent, value = its first ``value_dim`` (= C) entries. Returns ``[N, H, value_dim]`` in q's
    dtype, accumulated in fp32.

    ``num_splits`` is the kernel's split-K factor over the sequence length (None: a heuristic on shapes, see
    :func:`kimi_linear.ops.triton_mla_decode.default_num_splits`). A row's result depends only on its own inputs
    and the split count, so it is bit-identical alone or in any batch for the same ``num_splits``. The PyTorch
    path has no splits and ignores it.
    """
    check_paged_mla_inputs(q, cache, block_table, seq_lens, value_dim, num_splits)
    kernels = kernel_module(q, "kimi_linear.ops.triton_mla_decode", q, cache)
    if kernels is not None:
        return kernels.paged_mla_decode_triton(q, cache, block_table, seq_lens, scale=scale, value_dim=value_dim,
                                               num_splits=num_splits)
    return paged_mla_decode_torch(q, cache, block_table, seq_lens, scale=scale, value_dim=value_dim)


def paged_mla_decode_torch(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                           *, scale: float, value_dim: int) -> torch.Tensor:
    """The PyTorch reference of :func:`paged_mla_decode` (also the CPU path; differentiable in q and cache).

    Gathers every row's whole block-table width, ``[N, max_blocks * block_size, C + R]``, so it costs memory
    proportional to the table's capacity, not to the lengths. Garbage block ids are clamped into range before the
    gather, and every position past a row's length is *selected* away (``torch.where``) before any arithmetic:
    a NaN latent there would survive a multiply by zero.
    """
    check_paged_mla_inputs(q, cache, block_table, seq_lens, value_dim, None)
    N, H, D = q.shape
    num_blocks, block_size, _ = cache.shape
    capacity = block_table.shape[1] * block_size
    if capacity == 0:  # an empty table: every row is padding (and a max over no key is undefined)
        return q.new_zeros(N, H, value_dim)
    acc = torch.promote_types(q.dtype, torch.float32)
    positions = torch.arange(capacity, device=q.device)
    valid = positions[None, :] < seq_lens[:, None]  # [N, capacity]; false everywhere on padding rows
    ids = block_table.long().clamp(0, num_blocks - 1)
    latents = cache[ids].reshape(N, capacity, D)
    latents = torch.where(valid[..., None], latents, torch.zeros((), dtype=cache.dtype, device=cache.device))
    latents = latents.to(acc)
    scores = torch.einsum("nhd,nld->nhl", q.to(acc), latents) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    # A softmax written out so that a padding row (no valid key) gives zero weights instead of NaN, in the
    # forward and in the backward: its max is -inf, taken as 0, so every exp is exp(-inf) = 0 and the sum 0.
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(total > 0, total, torch.ones_like(total))
    out = torch.einsum("nhl,nlc->nhc", probs, latents[..., :value_dim])
    return out.to(q.dtype)
