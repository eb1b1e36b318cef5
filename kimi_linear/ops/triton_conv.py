"""Depthwise causal short convolution with carried state, as Triton kernels.

Same contract as :func:`kimi_linear.ops.conv.causal_conv1d`. The PyTorch version gathers every tap through index
tensors, a few passes over the tokens per tap; here one kernel computes the W taps, the bias-free sum and the SiLU
for a tile of tokens x channels, and a second, tiny kernel writes each sequence's final state. Neither reads
tensor values on the host.

Sequence lookup for packed batches: each token finds its sequence by binary search over ``cu_seqlens`` inside
the kernel, so tiles need not align with sequence boundaries and no host-side split is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.conv_check import check_conv_inputs


@triton.jit
def _sequence_of(rows, cu, T, N, VARLEN: tl.constexpr, LOG_N: tl.constexpr):
    """(sequence index, first row of that sequence) for each flat token row."""
    if VARLEN:
        # Largest n with cu[n] <= row; empty sequences (cu[n] == cu[n + 1]) are skipped naturally.
        lo = tl.zeros_like(rows)
        hi = tl.zeros_like(rows) + N - 1
        for _ in tl.static_range(LOG_N):
            mid = (lo + hi + 1) // 2
            go = tl.load(cu + mid).to(tl.int64) <= rows
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid - 1)
        return lo, tl.load(cu + lo).to(tl.int64)
    seq = rows // T
    return seq, seq * T


@triton.jit
def _conv_kernel(
    x, weight, state, cu, y, stride_x, total, T, N,
    D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    VARLEN: tl.constexpr, LOG_N: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr,
):
    """y rows [pid0 * BT, + BT), channels [pid1 * BD, + BD): y[t] = act(sum_j w[W-1-j] x[t-j]).

    Each tap is its own [BT, BD] load: the W loads of a tile overlap and hit the L1 cache. (Loading each row's
    carried state as one [BT, BD, W-1] tile instead was slower on an H100: more registers, fewer programs.)
    """
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    row_ok = rows < total
    col_ok = cols < D
    seq, start = _sequence_of(tl.where(row_ok, rows, 0), cu, T, N, VARLEN, LOG_N)
    pos = rows - start
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for j in tl.static_range(W):
        w = tl.load(weight + cols * W + (W - 1 - j), mask=col_ok, other=0.0).to(tl.float32)
        p = pos - j
        in_seq = (p >= 0)[:, None] & row_ok[:, None] & col_ok[None, :]
        tap = tl.load(x + (rows - j)[:, None] * stride_x + cols[None, :], mask=in_seq, other=0.0)
        if HAS_STATE:
            # Taps before the sequence start read carried slot W-1+p of the [N, D, W-1] state.
            in_state = (p < 0)[:, None] & row_ok[:, None] & col_ok[None, :]
            carried = tl.load(state + (seq[:, None] * D + cols[None, :]) * (W - 1) + (W - 1 + p)[:, None],
                              mask=in_state, other=0.0)
            tap = tl.where(in_seq, tap, carried)
        acc += w[None, :] * tap.to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + rows[:, None] * D + cols[None, :], acc.to(y.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _final_state_kernel(
    x, state, cu, final, stride_x, T,
    D: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, BD: tl.constexpr, VARLEN: tl.constexpr,
    HAS_STATE: tl.constexpr,
):
    """Sequence pid0, channels [pid1 * BD, + BD): its last W-1 pre-conv inputs, oldest first, written as one
    contiguous [BD, W-1] run of the [N, D, W-1] output."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    col_ok = cols < D
    if VARLEN:
        start = tl.load(cu + n).to(tl.int64)
        length = tl.load(cu + n + 1).to(tl.int64) - start
    else:
        start = n * T
        length = T
    slot = tl.arange(0, WP)
    vp = length - (W - 1) + slot  # position in the sequence of each slot's input; negative: still carried
    tile = (n * D + cols[:, None]) * (W - 1) + slot[None, :]
    in_tile = col_ok[:, None] & (slot < W - 1)[None, :]
    val = tl.load(x + (start + vp)[None, :] * stride_x + cols[:, None], mask=in_tile & (vp >= 0)[None, :], other=0.0)
    if HAS_STATE:
        # Slot s keeps carried slot s + length when the sequence is shorter than W-1.
        carried = tl.load(state + tile + length, mask=in_tile & (vp < 0)[None, :], other=0.0)
        val = tl.where((vp >= 0)[None, :], val, carried)
    tl.store(final + tile, val.to(final.dtype.element_ty), mask=in_tile)


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    activation: str | None = "silu",
    config: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Contract of :func:`kimi_linear.ops.conv.causal_conv1d` (fp32 accumulation; fp64 input is not supported).

    x ``[B, T, D]`` (the channel dim contiguous; rows may be strided, e.g. a slice of a fused projection);
    weight ``[D, W]``; initial_state / final state ``[N, D, W-1]`` in x's dtype; cu_seqlens ``[N + 1]`` int
    offsets with B = 1. Returns y ``[B, T, D]`` in x's dtype and the final state (or None).
    """
    N = check_conv_inputs(x, weight, initial_state, cu_seqlens, activation)
    B, T, D = x.shape
    W = weight.shape[-1]
    if x.dtype == torch.float64:
        raise ValueError("the Triton conv accumulates in fp32: use the PyTorch path for fp64")
    if x.stride(-1) != 1 or x.stride(0) != T * x.stride(1):
        x = x.contiguous()
    stride_x = x.stride(1)
    state = None if initial_state is None else initial_state.to(x.dtype).contiguous()
    cu = None if cu_seqlens is None else cu_seqlens.contiguous()
    weight = weight.contiguous()
    y = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
    BD = min(128, triton.next_power_of_2(D))
    WP = triton.next_power_of_2(max(W - 1, 1))
    if B * T > 0:
        # 8 token rows per program was fastest on an H100 for decode (N = 1..256) and prefill alike.
        BT, num_warps = config or (min(8, triton.next_power_of_2(B * T)), 4)
        _conv_kernel[(triton.cdiv(B * T, BT), triton.cdiv(D, BD))](
            x, weight, state, cu, y, stride_x, B * T, T, N,
            D=D, W=W, BT=BT, BD=BD, VARLEN=cu is not None, LOG_N=max(N, 1).bit_length(),
            HAS_STATE=state is not None, SILU=activation == "silu", num_warps=num_warps,
        )
    if not output_final_state:
        return y, None
    final = torch.empty(N, D, W - 1, dtype=x.dtype, device=x.device)
    if N > 0:
        _final_state_kernel[(N, triton.cdiv(D, BD))](
            x, state, cu, final, stride_x, T, D=D, W=W, WP=WP, BD=BD, VARLEN=cu is not None,
            HAS_STATE=state is not None, num_warps=4,
        )
    return y, final
