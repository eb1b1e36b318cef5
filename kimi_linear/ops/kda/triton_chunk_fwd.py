"""Triton kernels of the chunk-KDA forward pass (kda.md §2), three launches:

1. :func:`prep_kernel` (chunk-parallel): gate activation, in-chunk cumsum G (fp32), beta sigmoid, and the q/k
   L2-norm factors.
2. :func:`intra_kernel` (chunk-parallel): the 64×64 decayed scores in 16×16 blocks (anchored at each row
   block's first row, never a later token), ``M = (I + diag(β) A)^-1`` by blocks, ``W = M (β Γ K)``,
   ``U = M (β V)``, ``P = scale·Aqk``, and the decayed ``qg = scale Q Γ``, ``kg = K exp(G_last - G)``.
3. :func:`state_out_kernel` (sequential over a sequence's chunks, parallel over sequences × heads × V
   blocks): ``V' = U - W S``, ``O = qg S + P V'``, ``S <- exp(G_last) S + kg^T V'``; optionally stores the
   state at every chunk start and V' (both needed by the backward pass).

Layouts: see :mod:`kimi_linear.ops.kda.triton_common`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kimi_linear.ops.kda.triton_common import (
    SUB,
    anchored_scores,
    exact_diag_scores,
    first_row,
    gate_fwd,
    load_G,
    load_qk,
    load_row,
    load_rows,
    load_tile,
    load_vec,
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
        gt = tl.where((rows < n)[:, None], gate_fwd(gt, a, dt, lower_bound, BOUNDED), 0.0)
    store_rows(G_out, tl.cumsum(gt, axis=0), t0, 0, n, H, i_h, K, C)
    b = load_vec(beta, t0, 0, n, H, i_h, C)
    if SIGMOID:
        b = tl.sigmoid(b)
    store_vec(beta_out, b, t0, 0, n, H, i_h, C)
    if L2NORM:
        for src, dst in ((q, rq_out), (k, rk_out)):
            x = load_rows(src, t0, 0, n, H, i_h, K, C)
            store_vec(dst, 1.0 / tl.sqrt(tl.sum(x * x, axis=1) + 1e-6), t0, 0, n, H, i_h, C)


@triton.jit
def store_block(ptr, x, t0, I: tl.constexpr, J: tl.constexpr, n, H, i_h, C: tl.constexpr):
    """Store the 16×16 block (I, J) of a per-chunk C×C matrix kept as ``[T, H, C]`` rows."""
    r = I * SUB + tl.arange(0, SUB)
    c = J * SUB + tl.arange(0, SUB)
    offs = ((t0 + r).to(tl.int64)[:, None] * H + i_h) * C + c[None, :]
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=(r < n)[:, None])


@triton.jit
def block_scores(q, k, G, rq, rk, t0, n, H, i_h, G_last, I: tl.constexpr, J: tl.constexpr, K: tl.constexpr,
                 L2NORM: tl.constexpr, BOUNDED: tl.constexpr):
    """Block (I, J) of A (k·k, strictly lower) and of the unscaled Aqk (q·k, lower incl. diagonal)."""
    G_i = load_G(G, t0, I * SUB, n, H, i_h, G_last, K, SUB)
    k_i = load_qk(k, rk, t0, I * SUB, n, H, i_h, K, SUB, L2NORM)
    q_i = load_qk(q, rq, t0, I * SUB, n, H, i_h, K, SUB, L2NORM)
    if I == J:
        if BOUNDED:
            G_a = first_row(G_i, SUB)
            rows = tl.arange(0, SUB)
            a = anchored_scores(k_i, G_i, k_i, G_i, G_a)
            p = anchored_scores(q_i, G_i, k_i, G_i, G_a)
            a = tl.where(rows[:, None] > rows[None, :], a, 0.0)
            p = tl.where(rows[:, None] >= rows[None, :], p, 0.0)
        else:
            a = exact_diag_scores(k_i, k_i, G_i, False, SUB)
            p = exact_diag_scores(q_i, k_i, G_i, True, SUB)
    else:
        G_a = first_row(G_i, SUB)
        G_j = load_G(G, t0, J * SUB, n, H, i_h, G_last, K, SUB)
        k_j = load_qk(k, rk, t0, J * SUB, n, H, i_h, K, SUB, L2NORM)
        a = anchored_scores(k_i, G_i, k_j, G_j, G_a)
        p = anchored_scores(q_i, G_i, k_j, G_j, G_a)
    return a, p


@triton.jit
def inv_unit_lower(L, R: tl.constexpr):
    """``(I + L)^-1`` for a strictly lower ``[R, R]`` L, by forward substitution (row i = e_i - L_i·rows<i)."""
    rows = tl.arange(0, R)
    inv = (rows[:, None] == rows[None, :]).to(tl.float32)
    for i in range(1, R):
        l_i = tl.sum(tl.where((rows == i)[:, None], L, 0.0), axis=0)
        inv = inv - tl.where((rows == i)[:, None], tl.sum(l_i[:, None] * inv, axis=0)[None, :], 0.0)
    return inv


@triton.jit
def mm(a, b):
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def wu_operands(k, rk, G, beta, v, t0, J: tl.constexpr, n, H, i_h, G_last, K: tl.constexpr, V: tl.constexpr,
                L2NORM: tl.constexpr):
    """Rows J of β Γ K and β V: the right-hand sides of W = M (β Γ K), U = M (β V)."""
    b = load_vec(beta, t0, J * SUB, n, H, i_h, SUB)[:, None]
    G_j = load_G(G, t0, J * SUB, n, H, i_h, G_last, K, SUB)
    x_w = b * tl.exp(G_j) * load_qk(k, rk, t0, J * SUB, n, H, i_h, K, SUB, L2NORM)
    x_u = b * load_rows(v, t0, J * SUB, n, H, i_h, V, SUB)
    return x_w, x_u


@triton.jit
def intra_kernel(
    q, k, v, G, beta, rq, rk, W, U, P, M, A, qg, kg, chunk_start, chunk_len, scale, H,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, L2NORM: tl.constexpr, BOUNDED: tl.constexpr,
    SAVE_A: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0 = tl.load(chunk_start + i_c)
    n = tl.load(chunk_len + i_c)
    G_last = load_row(G, t0 + n - 1, H, i_h, K)

    a00, p00 = block_scores(q, k, G, rq, rk, t0, n, H, i_h, G_last, 0, 0, K, L2NORM, BOUNDED)
    a10, p10 = block_scores(q, k, G, rq, rk, t0, n, H, i_h, G_last, 1, 0, K, L2NORM, BOUNDED)
    a11, p11 = block_scores(q, k, G, rq, rk, t0, n, H, i_h, G_last, 1, 1, K, L2NORM, BOUNDED)
    a20, p20 = block_scores(q, k, G, rq, rk, t0, n, H, i_h, G_last, 2, 0, K, L2NORM, BOUNDED)
    a21, p21 = block_scores(q, k, G, rq, rk, t0, n, H, i_h, G_last, 2, 1, K, L2NORM, BOUNDED)
    a22, p22 = block_scores(q, k, G, rq, rk, t0, n, H, i_h, G_last, 2, 2, K, L2NORM, BOUNDED)
    a30, p30 = block_scores(q, k, G, rq, rk, t0, n, H, i_h, G_last, 3, 0, K, L2NORM, BOUNDED)
    a31, p31 = block_scores(q, k, G, rq, rk, t0, n, H, i_h, G_last, 3, 1, K, L2NORM, BOUNDED)
    a32, p32 = block_scores(q, k, G, rq, rk, t0, n, H, i_h, G_last, 3, 2, K, L2NORM, BOUNDED)
    a33, p33 = block_scores(q, k, G, rq, rk, t0, n, H, i_h, G_last, 3, 3, K, L2NORM, BOUNDED)

    zero = tl.zeros([SUB, SUB], dtype=tl.float32)
    store_block(P, p00 * scale, t0, 0, 0, n, H, i_h, C)
    store_block(P, zero, t0, 0, 1, n, H, i_h, C)
    store_block(P, zero, t0, 0, 2, n, H, i_h, C)
    store_block(P, zero, t0, 0, 3, n, H, i_h, C)
    store_block(P, p10 * scale, t0, 1, 0, n, H, i_h, C)
    store_block(P, p11 * scale, t0, 1, 1, n, H, i_h, C)
    store_block(P, zero, t0, 1, 2, n, H, i_h, C)
    store_block(P, zero, t0, 1, 3, n, H, i_h, C)
    store_block(P, p20 * scale, t0, 2, 0, n, H, i_h, C)
    store_block(P, p21 * scale, t0, 2, 1, n, H, i_h, C)
    store_block(P, p22 * scale, t0, 2, 2, n, H, i_h, C)
    store_block(P, zero, t0, 2, 3, n, H, i_h, C)
    store_block(P, p30 * scale, t0, 3, 0, n, H, i_h, C)
    store_block(P, p31 * scale, t0, 3, 1, n, H, i_h, C)
    store_block(P, p32 * scale, t0, 3, 2, n, H, i_h, C)
    store_block(P, p33 * scale, t0, 3, 3, n, H, i_h, C)

    b0 = load_vec(beta, t0, 0, n, H, i_h, SUB)[:, None]
    b1 = load_vec(beta, t0, SUB, n, H, i_h, SUB)[:, None]
    b2 = load_vec(beta, t0, 2 * SUB, n, H, i_h, SUB)[:, None]
    b3 = load_vec(beta, t0, 3 * SUB, n, H, i_h, SUB)[:, None]
    # M = (I + L)^-1 with L = diag(β) A, block by block: M_ii = (I + L_ii)^-1,
    # M_ij = -M_ii sum_{j <= m < i} L_im M_mj.
    m00 = inv_unit_lower(b0 * a00, SUB)
    m11 = inv_unit_lower(b1 * a11, SUB)
    m22 = inv_unit_lower(b2 * a22, SUB)
    m33 = inv_unit_lower(b3 * a33, SUB)
    m10 = -mm(m11, mm(b1 * a10, m00))
    m21 = -mm(m22, mm(b2 * a21, m11))
    m32 = -mm(m33, mm(b3 * a32, m22))
    m20 = -mm(m22, mm(b2 * a20, m00) + mm(b2 * a21, m10))
    m31 = -mm(m33, mm(b3 * a31, m11) + mm(b3 * a32, m21))
    m30 = -mm(m33, mm(b3 * a30, m00) + mm(b3 * a31, m10) + mm(b3 * a32, m20))

    store_block(M, m00, t0, 0, 0, n, H, i_h, C)
    store_block(M, zero, t0, 0, 1, n, H, i_h, C)
    store_block(M, zero, t0, 0, 2, n, H, i_h, C)
    store_block(M, zero, t0, 0, 3, n, H, i_h, C)
    store_block(M, m10, t0, 1, 0, n, H, i_h, C)
    store_block(M, m11, t0, 1, 1, n, H, i_h, C)
    store_block(M, zero, t0, 1, 2, n, H, i_h, C)
    store_block(M, zero, t0, 1, 3, n, H, i_h, C)
    store_block(M, m20, t0, 2, 0, n, H, i_h, C)
    store_block(M, m21, t0, 2, 1, n, H, i_h, C)
    store_block(M, m22, t0, 2, 2, n, H, i_h, C)
    store_block(M, zero, t0, 2, 3, n, H, i_h, C)
    store_block(M, m30, t0, 3, 0, n, H, i_h, C)
    store_block(M, m31, t0, 3, 1, n, H, i_h, C)
    store_block(M, m32, t0, 3, 2, n, H, i_h, C)
    store_block(M, m33, t0, 3, 3, n, H, i_h, C)
    if SAVE_A:
        store_block(A, a00, t0, 0, 0, n, H, i_h, C)
        store_block(A, zero, t0, 0, 1, n, H, i_h, C)
        store_block(A, zero, t0, 0, 2, n, H, i_h, C)
        store_block(A, zero, t0, 0, 3, n, H, i_h, C)
        store_block(A, a10, t0, 1, 0, n, H, i_h, C)
        store_block(A, a11, t0, 1, 1, n, H, i_h, C)
        store_block(A, zero, t0, 1, 2, n, H, i_h, C)
        store_block(A, zero, t0, 1, 3, n, H, i_h, C)
        store_block(A, a20, t0, 2, 0, n, H, i_h, C)
        store_block(A, a21, t0, 2, 1, n, H, i_h, C)
        store_block(A, a22, t0, 2, 2, n, H, i_h, C)
        store_block(A, zero, t0, 2, 3, n, H, i_h, C)
        store_block(A, a30, t0, 3, 0, n, H, i_h, C)
        store_block(A, a31, t0, 3, 1, n, H, i_h, C)
        store_block(A, a32, t0, 3, 2, n, H, i_h, C)
        store_block(A, a33, t0, 3, 3, n, H, i_h, C)

    xw0, xu0 = wu_operands(k, rk, G, beta, v, t0, 0, n, H, i_h, G_last, K, V, L2NORM)
    xw1, xu1 = wu_operands(k, rk, G, beta, v, t0, 1, n, H, i_h, G_last, K, V, L2NORM)
    xw2, xu2 = wu_operands(k, rk, G, beta, v, t0, 2, n, H, i_h, G_last, K, V, L2NORM)
    xw3, xu3 = wu_operands(k, rk, G, beta, v, t0, 3, n, H, i_h, G_last, K, V, L2NORM)
    store_rows(W, mm(m00, xw0), t0, 0, n, H, i_h, K, SUB)
    store_rows(U, mm(m00, xu0), t0, 0, n, H, i_h, V, SUB)
    store_rows(W, mm(m10, xw0) + mm(m11, xw1), t0, SUB, n, H, i_h, K, SUB)
    store_rows(U, mm(m10, xu0) + mm(m11, xu1), t0, SUB, n, H, i_h, V, SUB)
    store_rows(W, mm(m20, xw0) + mm(m21, xw1) + mm(m22, xw2), t0, 2 * SUB, n, H, i_h, K, SUB)
    store_rows(U, mm(m20, xu0) + mm(m21, xu1) + mm(m22, xu2), t0, 2 * SUB, n, H, i_h, V, SUB)
    store_rows(W, mm(m30, xw0) + mm(m31, xw1) + mm(m32, xw2) + mm(m33, xw3), t0, 3 * SUB, n, H, i_h, K, SUB)
    store_rows(U, mm(m30, xu0) + mm(m31, xu1) + mm(m32, xu2) + mm(m33, xu3), t0, 3 * SUB, n, H, i_h, V, SUB)

    G_c = load_G(G, t0, 0, n, H, i_h, G_last, K, C)
    store_rows(qg, scale * tl.exp(G_c) * load_qk(q, rq, t0, 0, n, H, i_h, K, C, L2NORM), t0, 0, n, H, i_h, K, C)
    store_rows(kg, tl.exp(G_last[None, :] - G_c) * load_qk(k, rk, t0, 0, n, H, i_h, K, C, L2NORM),
               t0, 0, n, H, i_h, K, C)


@triton.jit
def state_out_kernel(
    W, U, P, qg, kg, G, o, h0, hT, h, v_new, cu_seqlens, chunk_offset, H,
    K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr, STORE_H: tl.constexpr, STORE_V: tl.constexpr,
):
    """One program owns the state columns [i_v·BV, (i_v+1)·BV) of one (sequence, head) and walks its chunks."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n)
    eos = tl.load(cu_seqlens + i_n + 1)
    c0 = tl.load(chunk_offset + i_n)
    dk = tl.arange(0, K)
    dv = i_v * BV + tl.arange(0, BV)
    state_offs = (i_nh.to(tl.int64) * K + dk[:, None]) * V + dv[None, :]
    if HAS_H0:
        S = tl.load(h0 + state_offs).to(tl.float32)
    else:
        S = tl.zeros([K, BV], dtype=tl.float32)
    cdt = W.dtype.element_ty
    n_chunks = tl.cdiv(eos - bos, C)
    # a while loop: the interpreter (numpy >= 2.3) cannot take a run-time trip count in range()
    i = 0
    while i < n_chunks:
        t0 = bos + i * C
        n = tl.minimum(eos - t0, C)
        if STORE_H:
            tl.store(h + ((c0 + i).to(tl.int64) * H + i_h) * K * V + dk[:, None] * V + dv[None, :],
                     S.to(h.dtype.element_ty))
        w = load_rows(W, t0, 0, n, H, i_h, K, C).to(cdt)
        vn = load_tile(U, t0, 0, n, H, i_h, V, i_v * BV, BV, C) - tl.dot(w, S.to(cdt))
        if STORE_V:
            store_tile(v_new, vn, t0, 0, n, H, i_h, V, i_v * BV, BV, C)
        out = tl.dot(load_rows(qg, t0, 0, n, H, i_h, K, C).to(cdt), S.to(cdt))
        out += tl.dot(load_rows(P, t0, 0, n, H, i_h, C, C).to(cdt), vn.to(cdt))
        store_tile(o, out, t0, 0, n, H, i_h, V, i_v * BV, BV, C)
        G_last = load_row(G, t0 + n - 1, H, i_h, K)
        kgt = load_rows(kg, t0, 0, n, H, i_h, K, C).to(cdt)
        S = S * tl.exp(G_last)[:, None] + tl.dot(tl.trans(kgt), vn.to(cdt))
        i += 1
    if STORE_HT:
        tl.store(hT + state_offs, S)

