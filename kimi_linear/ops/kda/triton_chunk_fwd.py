"""Triton kernels of the chunk-KDA forward pass (kda.md §2). For autograd, four launches over 64-token chunks:

1. :func:`prep_kernel` (chunk-parallel): gate activation, in-chunk cumsum G (fp32), beta sigmoid, and the q/k
   L2-norm factors.
2. :func:`scores_kernel` (one program per 16-row block): that block's rows of the 64×64 decayed scores
   A (k·k) and P = scale·Aqk, 16×16 blocks anchored at the block's first row (never a later token), with exact
   pairwise exponentials on a diagonal block whose decay is too steep.
3. :func:`intra_kernel` (chunk-parallel): ``M = (I + diag(β) A)^-1`` by 16×16 blocks; ``W = M (β Γ K)``,
   ``U = M (β V)``; and the decayed ``qg = scale Q Γ``, ``kg = K exp(G_last - G)``.
4. :func:`state_out_kernel` (sequential over a sequence's chunks, parallel over sequences × heads × V
   blocks): ``V' = U - W S``, ``O = qg S + P V'``, ``S <- exp(G_last) S + kg^T V'``; optionally stores the
   state at every chunk start and V' (both needed by the backward pass).

Without autograd (prefill), two kernels over 16-token chunks: :func:`prefill_chunk_kernel` (all of a chunk's
in-chunk work in one program) and :func:`state_out_kernel` with C = 16 (for one long sequence, pipelined over
blocks of it: see ``triton_chunk._prefill``).

Layouts: see :mod:`kimi_linear.ops.kda.triton_common`.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kimi_linear.ops.kda.triton_common import (
    SAFE_DECAY,
    SUB,
    anchor_safe,
    bf16_operand,
    exact_diag_scores,
    first_row,
    gate_fwd,
    load_G,
    load_G_cols,
    load_qk,
    load_qk_cols,
    load_row,
    load_row_cols,
    load_rows,
    load_state_or_zeros,
    load_tile,
    load_tile_native,
    load_vec,
    prefetch_rows,
    state_program,
    store_rows,
    store_tile,
    store_vec,
)


@triton.jit
def prep_kernel(
    q, k, g, beta, A_log, dt_bias, G_out, beta_out, rq_out, rk_out, chunk_start, chunk_len, lower_bound, H,
    K: tl.constexpr, C: tl.constexpr, HAS_GATE: tl.constexpr, BOUNDED: tl.constexpr, L2NORM: tl.constexpr,
    SIGMOID: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0 = tl.load(chunk_start + i_c)
    n = tl.load(chunk_len + i_c)
    rows = tl.arange(0, C)
    gt = load_rows(g, t0, 0, n, H, i_h, K, C)
    if HAS_GATE:
        a = tl.exp(tl.load(A_log + i_h))
        dt = tl.load(dt_bias + i_h * K + tl.arange(0, K))
        gt = tl.where((rows < n)[:, None], gate_fwd(gt + dt[None, :], a, lower_bound, BOUNDED), 0.0)
    store_rows(G_out, tl.cumsum(gt, axis=0), t0, 0, n, H, i_h, K, C)
    b = load_vec(beta, t0, 0, n, H, i_h, C)
    if SIGMOID:
        b = tl.sigmoid(b)
    store_vec(beta_out, b, t0, 0, n, H, i_h, C)
    if L2NORM:
        xq = load_rows(q, t0, 0, n, H, i_h, K, C)
        store_vec(rq_out, 1.0 / tl.sqrt(tl.sum(xq * xq, axis=1) + 1e-6), t0, 0, n, H, i_h, C)
        xk = load_rows(k, t0, 0, n, H, i_h, K, C)
        store_vec(rk_out, 1.0 / tl.sqrt(tl.sum(xk * xk, axis=1) + 1e-6), t0, 0, n, H, i_h, C)


@triton.jit
def store_block(ptr, x, t0, I, J, n, H, i_h, C: tl.constexpr):
    """Store the 16×16 block (I, J) of a per-chunk C×C matrix kept as ``[T, H, C]`` rows."""
    r = I * SUB + tl.arange(0, SUB)
    c = J * SUB + tl.arange(0, SUB)
    offs = ((t0 + r).to(tl.int64)[:, None] * H + i_h) * C + c[None, :]
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=(r < n)[:, None])


@triton.jit
def inv_unit_lower(L, R: tl.constexpr, PREC: tl.constexpr):
    """``(I + L)^-1`` for a strictly lower ``[16, 16]`` L. L is nilpotent (L^16 = 0), so the inverse is the
    finite Neumann series, evaluated as ``(I - L)(I + L^2)(I + L^4)(I + L^8)``: six small matrix products
    (in precision PREC) instead of sixteen dependent row updates."""
    rows = tl.arange(0, R)
    L2 = tl.dot(L, L, input_precision=PREC)
    L4 = tl.dot(L2, L2, input_precision=PREC)
    inv = (rows[:, None] == rows[None, :]).to(tl.float32) - L
    inv += tl.dot(inv, L2, input_precision=PREC)
    inv += tl.dot(inv, L4, input_precision=PREC)
    return inv + tl.dot(inv, tl.dot(L4, L4, input_precision=PREC), input_precision=PREC)


@triton.jit
def mm(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def scores_kernel(
    q, k, G, rq, rk, P, A, chunk_start, chunk_len, scale, H,
    K: tl.constexpr, C: tl.constexpr, L2NORM: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (chunk, 16-row block I): rows I of A (k·k, strictly lower) and P (scale·q·k, lower),
    block by block over the columns J <= I (later blocks are stored as zeros). Rows are scaled by
    exp(G_i - G_a), columns by exp(G_a - G_j), G_a the block's first row, so no row sees a later anchor: columns
    before the block give factors <= 1; on the diagonal block the factor is at most e^SAFE_DECAY (finite), and a
    block whose decay exceeds that takes exact pairwise exponentials instead. The off-diagonal products take
    bf16 operands for 16-bit inputs (:func:`bf16_operand`; H100, 1 x 65536: 2.0 ms against 2.6 with TF32; the
    output's error in kda_accuracy.md 3.1e-3 -> 3.2e-3 at most)."""
    i_c, I, i_h = tl.program_id(0) // 4, tl.program_id(0) % 4, tl.program_id(1)
    t0 = tl.load(chunk_start + i_c)
    n = tl.load(chunk_len + i_c)
    r0 = I * SUB
    G_last = load_row(G, t0 + n - 1, H, i_h, K)
    G_i = load_G(G, t0, r0, n, H, i_h, G_last, K, SUB)
    G_a = first_row(G_i, SUB)
    e_row = tl.exp(G_i - G_a[None, :])
    k_x = load_qk(k, rk, t0, r0, n, H, i_h, K, SUB, L2NORM)
    q_x = load_qk(q, rq, t0, r0, n, H, i_h, K, SUB, L2NORM)
    k_e, q_e = k_x * e_row, q_x * e_row
    k_r, q_r = bf16_operand(k_e, PREC), bf16_operand(q_e, PREC)
    J = 0
    while J < I:  # (while: the interpreter cannot range() over a program id)
        G_j = load_G(G, t0, J * SUB, n, H, i_h, G_last, K, SUB)
        k_j = load_qk(k, rk, t0, J * SUB, n, H, i_h, K, SUB, L2NORM) * tl.exp(G_a[None, :] - G_j)
        k_j = tl.trans(bf16_operand(k_j, PREC))
        store_block(A, tl.dot(k_r, k_j, input_precision=PREC), t0, I, J, n, H, i_h, C)
        store_block(P, scale * tl.dot(q_r, k_j, input_precision=PREC), t0, I, J, n, H, i_h, C)
        J += 1
    rows = tl.arange(0, SUB)
    if anchor_safe(G, t0, r0, n, H, i_h, K, 0, K):
        # TF32 here: the diagonal block holds the largest scores (the least decayed); with bf16 operands o's
        # error in kda_accuracy.md rose from 3.1e-3 to 3.7e-3
        k_d = tl.trans(k_x * tl.exp(G_a[None, :] - G_i))
        a_ii = tl.where(rows[:, None] > rows[None, :], tl.dot(k_e, k_d, input_precision=PREC), 0.0)
        p_ii = tl.where(rows[:, None] >= rows[None, :], tl.dot(q_e, k_d, input_precision=PREC), 0.0)
    else:
        a_ii = exact_diag_scores(k_x, k_x, G_i, False, SUB)
        p_ii = exact_diag_scores(q_x, k_x, G_i, True, SUB)
    store_block(A, a_ii, t0, I, I, n, H, i_h, C)
    store_block(P, scale * p_ii, t0, I, I, n, H, i_h, C)
    zero = tl.zeros([SUB, SUB], dtype=tl.float32)
    J = I + 1
    while J < 4:
        store_block(A, zero, t0, I, J, n, H, i_h, C)
        store_block(P, zero, t0, I, J, n, H, i_h, C)
        J += 1


@triton.jit
def intra_kernel(
    q, k, v, G, beta, rq, rk, W, U, M, A, qg, kg, chunk_start, chunk_len, scale, H,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, L2NORM: tl.constexpr, PREC: tl.constexpr,
):
    """One program per chunk: ``M = (I + diag(β) A)^-1`` by 16×16 blocks from the A of :func:`scores_kernel`;
    ``W = M (β Γ K)``, ``U = M (β V)``, ``qg = scale Q Γ``, ``kg = K exp(G_last - G)`` by column slices."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0 = tl.load(chunk_start + i_c)
    n = tl.load(chunk_len + i_c)
    a00 = load_tile(A, t0, 0, n, H, i_h, C, 0, SUB, SUB)
    a10 = load_tile(A, t0, SUB, n, H, i_h, C, 0, SUB, SUB)
    a11 = load_tile(A, t0, SUB, n, H, i_h, C, SUB, SUB, SUB)
    a20 = load_tile(A, t0, 2 * SUB, n, H, i_h, C, 0, SUB, SUB)
    a21 = load_tile(A, t0, 2 * SUB, n, H, i_h, C, SUB, SUB, SUB)
    a22 = load_tile(A, t0, 2 * SUB, n, H, i_h, C, 2 * SUB, SUB, SUB)
    a30 = load_tile(A, t0, 3 * SUB, n, H, i_h, C, 0, SUB, SUB)
    a31 = load_tile(A, t0, 3 * SUB, n, H, i_h, C, SUB, SUB, SUB)
    a32 = load_tile(A, t0, 3 * SUB, n, H, i_h, C, 2 * SUB, SUB, SUB)
    a33 = load_tile(A, t0, 3 * SUB, n, H, i_h, C, 3 * SUB, SUB, SUB)
    zero = tl.zeros([SUB, SUB], dtype=tl.float32)

    b0 = load_vec(beta, t0, 0, n, H, i_h, SUB)[:, None]
    b1 = load_vec(beta, t0, SUB, n, H, i_h, SUB)[:, None]
    b2 = load_vec(beta, t0, 2 * SUB, n, H, i_h, SUB)[:, None]
    b3 = load_vec(beta, t0, 3 * SUB, n, H, i_h, SUB)[:, None]
    # M = (I + L)^-1 with L = diag(β) A, block by block: M_ii = (I + L_ii)^-1,
    # M_ij = -M_ii sum_{j <= m < i} L_im M_mj.
    m00 = inv_unit_lower(b0 * a00, SUB, "ieee")
    m11 = inv_unit_lower(b1 * a11, SUB, "ieee")
    m22 = inv_unit_lower(b2 * a22, SUB, "ieee")
    m33 = inv_unit_lower(b3 * a33, SUB, "ieee")
    m10 = -mm(m11, mm(b1 * a10, m00))
    m21 = -mm(m22, mm(b2 * a21, m11))
    m32 = -mm(m33, mm(b3 * a32, m22))
    m20 = -mm(m22, mm(b2 * a20, m00) + mm(b2 * a21, m10))
    m31 = -mm(m33, mm(b3 * a31, m11) + mm(b3 * a32, m21))
    m30 = -mm(m33, mm(b3 * a30, m00) + mm(b3 * a31, m10) + mm(b3 * a32, m20))

    store_block(M, m00, t0, 0, 0, n, H, i_h, C)
    store_block(M, m10, t0, 1, 0, n, H, i_h, C)
    store_block(M, m11, t0, 1, 1, n, H, i_h, C)
    store_block(M, m20, t0, 2, 0, n, H, i_h, C)
    store_block(M, m21, t0, 2, 1, n, H, i_h, C)
    store_block(M, m22, t0, 2, 2, n, H, i_h, C)
    store_block(M, m30, t0, 3, 0, n, H, i_h, C)
    store_block(M, m31, t0, 3, 1, n, H, i_h, C)
    store_block(M, m32, t0, 3, 2, n, H, i_h, C)
    store_block(M, m33, t0, 3, 3, n, H, i_h, C)
    for I in tl.static_range(3):
        for J in tl.static_range(I + 1, 4):
            store_block(M, zero, t0, I, J, n, H, i_h, C)
    # W = M (β Γ K), U = M (β V), qg and kg by column slices of BK (whole rows of K would spill registers); M
    # comes back from memory (this program just wrote it; the barrier makes its rows visible to every thread)
    tl.debug_barrier()
    m = load_rows(M, t0, 0, n, H, i_h, C, C)
    b = load_vec(beta, t0, 0, n, H, i_h, C)[:, None]
    for s in tl.static_range(K // BK):
        G_end = load_row_cols(G, t0 + n - 1, H, i_h, K, s * BK, BK)
        G_s = load_G_cols(G, t0, 0, n, H, i_h, G_end, K, s * BK, BK, C)
        k_s = load_qk_cols(k, rk, t0, 0, n, H, i_h, K, s * BK, BK, C, L2NORM)
        gamma = tl.exp(G_s)
        store_tile(W, tl.dot(m, b * gamma * k_s, input_precision=PREC), t0, 0, n, H, i_h, K, s * BK, BK, C)
        store_tile(kg, tl.exp(G_end[None, :] - G_s) * k_s, t0, 0, n, H, i_h, K, s * BK, BK, C)
        q_s = load_qk_cols(q, rq, t0, 0, n, H, i_h, K, s * BK, BK, C, L2NORM)
        store_tile(qg, scale * gamma * q_s, t0, 0, n, H, i_h, K, s * BK, BK, C)
    for s in tl.static_range(V // BK):
        u = tl.dot(m, b * load_tile(v, t0, 0, n, H, i_h, V, s * BK, BK, C), input_precision=PREC)
        store_tile(U, u, t0, 0, n, H, i_h, V, s * BK, BK, C)


@triton.jit
def prefill_chunk_kernel(
    q, k, v, g, beta, A_log, dt_bias, W, U, P, qg, kg, G_end, chunk_start, chunk_len, n_chunks, first, scale,
    lower_bound, H, K: tl.constexpr, V: tl.constexpr, HAS_GATE: tl.constexpr, BOUNDED: tl.constexpr,
    L2NORM: tl.constexpr, SIGMOID: tl.constexpr, PREC: tl.constexpr, PREFETCH: tl.constexpr,
    AFTER_STATE: tl.constexpr,
):
    """Everything inside one 16-token chunk, for the forward pass without autograd (prefill): the gate and its
    cumsum G (from the chunk's start), beta sigmoid, q/k L2 norms, the scores A and P, ``M = (I + diag(β) A)^-1``,
    and W, U, qg, kg, P (``[T, H, 16]``) for :func:`state_out_kernel`, plus G's last row (``[chunks, H, K]``).

    With 16 rows the whole chunk is one diagonal block, anchored at the chunk's start (the state's own position,
    never a later token): rows take exp(G_i) <= 1, columns exp(-G_j), which stays finite while the chunk's decay
    is under e^SAFE_DECAY (a gate bounded at -5 a step gives at most e^80); steeper chunks take exact pairwise
    exponentials. The L2 norms enter as row and column factors of the 16×16 products and as row factors of the
    outputs, so no normalised copy of q or k is held (H100, 1 × 65536: 3.5 → 3.0 ms with the spills this saves).
    Program (i, h) takes chunk ``first + i`` of n_chunks. PREFETCH > 0: it first asks L2 for the inputs of chunk
    ``first + i + PREFETCH``, which a later program reads. AFTER_STATE (a dependent launch beside a state pass,
    see ``triton_chunk._prefill``): the last program ends only after that state pass has."""
    i_c, i_h = first + tl.program_id(0), tl.program_id(1)
    t0 = tl.load(chunk_start + i_c)
    n = tl.load(chunk_len + i_c)
    rows = tl.arange(0, SUB)
    valid = rows < n
    if PREFETCH > 0:
        ahead = i_c + PREFETCH
        if ahead < n_chunks:
            t_a = tl.load(chunk_start + ahead)
            n_a = tl.load(chunk_len + ahead)
            prefetch_rows(g, t_a, n_a, H, i_h, K, SUB)
            prefetch_rows(k, t_a, n_a, H, i_h, K, SUB)
            prefetch_rows(q, t_a, n_a, H, i_h, K, SUB)
            prefetch_rows(v, t_a, n_a, H, i_h, V, SUB)
    gt = load_rows(g, t0, 0, n, H, i_h, K, SUB)
    if HAS_GATE:
        a = tl.exp(tl.load(A_log + i_h))
        dt = tl.load(dt_bias + i_h * K + tl.arange(0, K))
        gt = gate_fwd(gt + dt[None, :], a, lower_bound, BOUNDED)
    gt = tl.where(valid[:, None], gt, 0.0)
    G = tl.cumsum(gt, axis=0)
    G_last = tl.sum(gt, axis=0)
    tl.store(G_end + (i_c.to(tl.int64) * H + i_h) * K + tl.arange(0, K), G_last)
    b = load_vec(beta, t0, 0, n, H, i_h, SUB)
    if SIGMOID:
        b = tl.where(valid, tl.sigmoid(b), 0.0)
    kx = load_rows(k, t0, 0, n, H, i_h, K, SUB)
    qx = load_rows(q, t0, 0, n, H, i_h, K, SUB)
    if L2NORM:
        rk = 1.0 / tl.sqrt(tl.sum(kx * kx, axis=1) + 1e-6)
        rq = scale / tl.sqrt(tl.sum(qx * qx, axis=1) + 1e-6)
    else:
        rk = tl.full([SUB], 1.0, tl.float32)
        rq = tl.full([SUB], scale, tl.float32)
    gamma = tl.exp(G)
    k_dn = kx * gamma
    q_dn = qx * gamma
    # clamped: a steep chunk takes the exact branch, but this tile must stay finite for it all the same
    k_up = kx * tl.exp(tl.minimum(-G, SAFE_DECAY))
    if tl.max(-G_last, axis=0) < SAFE_DECAY:
        k_t = tl.trans(k_up)
        a_raw = tl.dot(k_dn, k_t, input_precision=PREC)
        p_raw = tl.dot(q_dn, k_t, input_precision=PREC)
        # -G < SAFE_DECAY here, so k_up's exp(-G) was not clamped: k exp(G_last - G) for one exponential a column
        k_end = k_up * tl.exp(G_last)[None, :]
    else:
        a_raw = exact_diag_scores(kx, kx, G, False, SUB)
        p_raw = exact_diag_scores(qx, kx, G, True, SUB)
        k_end = kx * tl.exp(G_last[None, :] - G)
    # stored before the inverse, so that q_dn and k_end are dead across it
    store_rows(kg, k_end * rk[:, None], t0, 0, n, H, i_h, K, SUB)
    store_rows(qg, q_dn * rq[:, None], t0, 0, n, H, i_h, K, SUB)
    a_ii = tl.where(rows[:, None] > rows[None, :], a_raw * rk[:, None] * rk[None, :], 0.0)
    store_tile(P, tl.where(rows[:, None] >= rows[None, :], p_raw * rq[:, None] * rk[None, :], 0.0),
               t0, 0, n, H, i_h, SUB, 0, SUB, SUB)
    mb = inv_unit_lower(b[:, None] * a_ii, SUB, PREC) * b[None, :]  # M diag(β)
    store_rows(W, tl.dot(mb * rk[None, :], k_dn, input_precision=PREC), t0, 0, n, H, i_h, K, SUB)
    store_rows(U, tl.dot(mb, load_rows(v, t0, 0, n, H, i_h, V, SUB), input_precision=PREC), t0, 0, n, H, i_h, V,
               SUB)
    if AFTER_STATE:
        # one program is enough to hold the kernel's end back; the others free their SM slots as usual
        if (tl.program_id(0) == tl.num_programs(0) - 1) & (i_h == tl.num_programs(1) - 1):
            gdc_wait()


@triton.jit
def state_out_step(S, i, bos, eos, c0, h_first, i_v, i_h, W, U, P, qg, kg, G, o, h, v_new, H, K: tl.constexpr,
                   V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, G_PER_CHUNK: tl.constexpr,
                   STORE_H: tl.constexpr, H_EVERY: tl.constexpr, STORE_V: tl.constexpr, PREC: tl.constexpr):
    """Chunk i of one sequence: outputs from the state S ``[K, BV]`` at its start; returns the state at its end."""
    t0 = bos + i * C
    n = tl.minimum(eos - t0, C)
    cdt = W.dtype.element_ty
    if STORE_H:
        if i % H_EVERY == 0:
            dk = tl.arange(0, K)
            dv = i_v * BV + tl.arange(0, BV)
            offs = ((h_first + i // H_EVERY).to(tl.int64) * H + i_h) * K * V + dk[:, None] * V + dv[None, :]
            tl.store(h + offs, S.to(h.dtype.element_ty))
    w = load_tile_native(W, t0, 0, n, H, i_h, K, 0, K, C)
    vn = load_tile(U, t0, 0, n, H, i_h, V, i_v * BV, BV, C) - tl.dot(w, S.to(cdt), input_precision=PREC)
    if STORE_V:
        store_tile(v_new, vn, t0, 0, n, H, i_h, V, i_v * BV, BV, C)
    out = tl.dot(load_tile_native(qg, t0, 0, n, H, i_h, K, 0, K, C), S.to(cdt), input_precision=PREC)
    out += tl.dot(load_tile_native(P, t0, 0, n, H, i_h, C, 0, C, C), vn.to(cdt), input_precision=PREC)
    store_tile(o, out, t0, 0, n, H, i_h, V, i_v * BV, BV, C)
    if G_PER_CHUNK:
        G_last = tl.load(G + ((c0 + i).to(tl.int64) * H + i_h) * K + tl.arange(0, K))
    else:
        G_last = load_row(G, t0 + n - 1, H, i_h, K)
    kgt = load_tile_native(kg, t0, 0, n, H, i_h, K, 0, K, C)
    return S * tl.exp(G_last)[:, None] + tl.dot(tl.trans(kgt), vn.to(cdt), input_precision=PREC)


@triton.jit
def state_out_kernel(
    W, U, P, qg, kg, G, o, h0, hT, h, v_new, cu_seqlens, chunk_offset, h_offset, H, c_begin, c_end,
    K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, G_PER_CHUNK: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_H: tl.constexpr, H_EVERY: tl.constexpr,
    STORE_V: tl.constexpr, LAUNCH_NEXT: tl.constexpr, STAGES: tl.constexpr, PREC: tl.constexpr,
):
    """One program owns the state columns [i_v·BV, (i_v+1)·BV) of one (sequence, head) and walks its chunks
    c_begin .. c_end-1 (capped at the sequence's last) of C rows, from h0 (or zeros) to hT. G: the in-chunk
    cumulative log-decay per token ``[T, H, K]``, or (G_PER_CHUNK) only each chunk's last row ``[chunks, H, K]``.
    h takes the state at the start of every H_EVERY-th chunk (64-token chunks when C = 64 / H_EVERY), numbered
    from ``h_offset[sequence]``. h0 and hT may be one tensor: each program reads and writes only its own block.
    LAUNCH_NEXT: the next kernel in the stream, if launched as dependent, may start once every program here has."""
    if LAUNCH_NEXT:
        gdc_launch_dependents()
    i_v, i_h, bos, eos, c0, n_chunks, state_offs = state_program(cu_seqlens, chunk_offset, H, K, V, BV, C)
    h_first = tl.load(h_offset + tl.program_id(1) // H)
    S = load_state_or_zeros(h0, state_offs, HAS_H0, K, BV)
    last = tl.minimum(n_chunks, c_end)
    if STAGES > 1:  # compiled: a pipelined loop prefetches the next chunks' tiles
        for i in tl.range(c_begin, last, num_stages=STAGES):
            S = state_out_step(S, i, bos, eos, c0, h_first, i_v, i_h, W, U, P, qg, kg, G, o, h, v_new, H, K, V, BV,
                               C, G_PER_CHUNK, STORE_H, H_EVERY, STORE_V, PREC)
    else:  # no prefetch; and the interpreter (numpy >= 2.3) cannot take a run-time trip count in range()
        i = c_begin
        while i < last:
            S = state_out_step(S, i, bos, eos, c0, h_first, i_v, i_h, W, U, P, qg, kg, G, o, h, v_new, H, K, V, BV,
                               C, G_PER_CHUNK, STORE_H, H_EVERY, STORE_V, PREC)
            i += 1
    if STORE_HT:
        tl.store(hT + state_offs, S)
