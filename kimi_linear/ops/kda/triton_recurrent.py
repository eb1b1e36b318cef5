"""KDA decode step on a state pool, as one fused Triton kernel (forward only).

Same contract as :func:`kimi_linear.ops.kda.recurrent.fused_recurrent_kda`: N sequences advance by T tokens
(usually 1), each reading and writing its state row ``state_pool[state_indices[n]]`` in place. The gate
activation, the q/k L2 norm and the beta sigmoid are computed in-kernel.

Work split: one program per (sequence, head, block of BV value columns). The delta rule couples all K rows of
the state through ``S^T k``, but value columns are independent, so splitting V is free: each program keeps its
``[K, BV]`` fp32 state tile in registers across the T tokens, reads it once and writes it once. Small batches
use narrow BV to put enough programs on the GPU; large batches use wide BV to cut per-program overhead.
On an H100 (H = 32, K = V = 128) a step of 256 sequences streams the state at ~95% of the device's copy rate.

The launch does no host synchronisation, reads no tensor values on the host and allocates only the output, so
it can be captured in a CUDA graph. A negative slot index marks a padding row: its state is neither read nor
written and its output is zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.kda.gate import KDAOptions
from kimi_linear.ops.kda.triton_common import gate_fwd

# Gate modes of the kernel (a constexpr): g is already the log-decay, the released softplus gate, or the
# bounded sigmoid gate.
_GATE_NONE, _GATE_SOFTPLUS, _GATE_BOUNDED = 0, 1, 2


@triton.jit
def _kda_decode_kernel(
    q, k, v, g, beta, o, pool, slots, A_log, dt_bias,
    scale, lower_bound, stride_pool, s_q, s_k, s_v, s_g, s_beta,
    T: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    GATE: tl.constexpr, L2NORM: tl.constexpr, BETA_SIGMOID: tl.constexpr,
):
    """One program: sequence n, head h, value columns [i_v * BV, (i_v + 1) * BV), all T tokens.

    Token row r = n * T + t of an input starts at ``r * s_<input>``; inside a row the head and feature dims are
    contiguous. The output is contiguous.
    """
    pid = tl.program_id(0).to(tl.int64)
    i_v = pid % (V // BV)
    i_nh = pid // (V // BV)
    i_n = i_nh // H
    i_h = i_nh % H
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    slot = tl.load(slots + i_n).to(tl.int64)
    if slot < 0:
        for t in range(T):
            tl.store(o + ((i_n * T + t) * H + i_h) * V + o_v, tl.zeros([BV], dtype=o.dtype.element_ty))
    else:
        p_state = pool + slot * stride_pool + i_h * K * V + o_k[:, None] * V + o_v[None, :]
        state = tl.load(p_state)
        if GATE != 0:
            a = tl.exp(tl.load(A_log + i_h).to(tl.float32))
            bias = tl.load(dt_bias + i_h * K + o_k).to(tl.float32)
        for t in range(T):
            tok = i_n * T + t
            b_q = tl.load(q + tok * s_q + i_h * K + o_k).to(tl.float32)
            b_k = tl.load(k + tok * s_k + i_h * K + o_k).to(tl.float32)
            b_g = tl.load(g + tok * s_g + i_h * K + o_k).to(tl.float32)
            b_v = tl.load(v + tok * s_v + i_h * V + o_v).to(tl.float32)
            b_beta = tl.load(beta + tok * s_beta + i_h).to(tl.float32)
            if L2NORM:
                b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q) + 1e-6)
                b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k) + 1e-6)
            if GATE != 0:
                b_g = gate_fwd(b_g + bias, a, lower_bound, GATE == 2)
            if BETA_SIGMOID:
                b_beta = tl.sigmoid(b_beta)
            b_q = b_q * scale
            state = state * tl.exp(b_g)[:, None]
            # Both reductions read the decayed state, so they run side by side: with S' = S + k r^T,
            # S'^T q = S^T q + (k . q) r needs no second pass over the updated state.
            sk = tl.sum(state * b_k[:, None], 0)
            sq = tl.sum(state * b_q[:, None], 0)
            r = (b_v - sk) * b_beta
            state = state + b_k[:, None] * r[None, :]
            b_o = sq + tl.sum(b_k * b_q) * r
            tl.store(o + (tok * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty))
        tl.store(p_state, state)


def _launch_config(n_rows: int, V: int) -> tuple[int, int]:
    """(BV, num_warps) for N*H (sequence, head) rows. Measured on an H100 (benchmarks/results/kda_decode_sweep.md):
    from 512 rows up, 64-column blocks with 4 warps (128 registers, no spills) stream the state fastest; below,
    16-column blocks spread a few rows over enough programs."""
    bv, num_warps = (64, 4) if n_rows >= 512 else (16, 2)
    return min(bv, V), num_warps


def _token_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x ``[N, T, ...]`` as token rows with contiguous trailing dims: (x, row stride). Copies only when the rows
    cannot be addressed with one stride, so slices of a fused projection (q, k, v of one qkv) are read in place."""
    inner = 1
    for size, stride in zip(reversed(x.shape[2:]), reversed(x.stride()[2:])):
        if size > 1 and stride != inner:
            return _token_rows(x.contiguous())
        inner *= size
    N, T = x.shape[:2]
    row = x.stride(1) if T > 1 else x.stride(0)
    if N > 1 and T > 1 and x.stride(0) != T * row:
        return _token_rows(x.contiguous())
    return x, row


def supports(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel handles these head sizes (powers of two, at least 8: no masks in the hot loop)."""
    K, V = q.shape[-1], v.shape[-1]
    return all(d >= 8 and d & (d - 1) == 0 for d in (K, V))


@torch.no_grad()
def fused_recurrent_kda_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    scale: float | None = None,
    options: KDAOptions | None = None,
    config: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Advance N sequences by T tokens; see :func:`kimi_linear.ops.kda.recurrent.fused_recurrent_kda`.

    q, k, g ``[N, T, H, K]``; v ``[N, T, H, V]``; beta ``[N, T, H]`` (any float dtypes; computed in fp32);
    state_pool ``[P, H, K, V]`` fp32 whose rows are contiguous (a slice of a larger cache is fine);
    state_indices ``[N]`` int32/int64, distinct except for negative entries (padding rows); ``options``: the
    in-kernel pre-processing (:class:`~kimi_linear.ops.kda.gate.KDAOptions`). Returns o ``[N, T, H, V]`` in v's
    dtype. Indices are not checked against P on the device (that would need a host sync): an index >= P is out of
    bounds. T is a compile-time constant of the kernel (one compilation per distinct T). ``config`` overrides
    (BV, num_warps), for benchmarking.
    """
    N, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape or g.shape != q.shape or v.shape[:3] != (N, T, H) or beta.shape != (N, T, H):
        raise ValueError(f"expected q, k, g [N, T, H, K], v [N, T, H, V], beta [N, T, H]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, g {tuple(g.shape)}, v {tuple(v.shape)}, beta {tuple(beta.shape)}")
    if not supports(q, v):
        raise ValueError(f"head sizes must be powers of two >= 8, got K = {K}, V = {V}")
    if state_pool.dtype != torch.float32 or state_pool.shape[1:] != (H, K, V) or not state_pool[0].is_contiguous():
        raise ValueError(f"state_pool must be fp32 [P, {H}, {K}, {V}] with contiguous rows, got "
                         f"{state_pool.dtype} {tuple(state_pool.shape)} strides {state_pool.stride()}")
    if state_indices.shape != (N,) or state_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"state_indices must be int32/int64 [N = {N}], got {state_indices.dtype} "
                         f"{tuple(state_indices.shape)}")
    options = options or KDAOptions()
    options.check(H, K)
    A_log, dt_bias, lower_bound = options.A_log, options.dt_bias, options.lower_bound
    if A_log is None:
        gate = _GATE_NONE
    else:
        gate = _GATE_SOFTPLUS if lower_bound is None else _GATE_BOUNDED
        A_log, dt_bias = A_log.contiguous(), dt_bias.contiguous()
    (q, s_q), (k, s_k), (v, s_v), (g, s_g), (beta, s_beta) = (_token_rows(x) for x in (q, k, v, g, beta))
    o = torch.empty(N, T, H, V, dtype=v.dtype, device=v.device)
    if N * T == 0:
        return o
    bv, num_warps = config or _launch_config(N * H, V)
    _kda_decode_kernel[(N * H * (V // bv),)](
        q, k, v, g, beta, o, state_pool, state_indices.contiguous(), A_log, dt_bias,
        K**-0.5 if scale is None else scale, 0.0 if lower_bound is None else lower_bound, state_pool.stride(0),
        s_q, s_k, s_v, s_g, s_beta, T,
        H=H, K=K, V=V, BV=bv, GATE=gate, L2NORM=options.qk_l2norm, BETA_SIGMOID=options.beta_sigmoid,
        num_warps=num_warps,
    )
    return o
