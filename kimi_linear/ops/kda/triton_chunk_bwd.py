"""Triton kernels of the chunk-KDA backward pass, three launches (notation of triton_chunk_fwd):

1. :func:`state_bwd_kernel` (sequential, reverse over a sequence's chunks): with dS the gradient of the state
   at a chunk's end, ``dV' = P^T dO + kg dS`` and ``dS <- exp(G_last) dS + qg^T dO - W^T dV'``; stores dS per
   chunk (``dh``), dV', and the initial state's gradient.
2. :func:`grads_kernel_a` (chunk-parallel, whole K and V rows): through ``O = qg S + P V'``,
   ``V' = U - W S``, ``S_end = exp(G_last) S + kg^T V'`` and the UT transform ``W = M β Γ K``, ``U = M β V``,
   ``M = (I + diag(β) A)^-1`` (``dL = -M^T dM M^T``): dv, dβ, dA, dP, and the parts of dq, dk, dG that are
   element-wise in the channel.
3. :func:`grads_kernel_b` (chunk-parallel, 16-row blocks): the gradients of the decayed scores A and P with
   the same anchoring as the forward, the reverse cumsum from dG to dg, and the backward of the fused
   L2 norm and gate activation (with per-chunk partial sums for dA_log and ddt_bias).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kimi_linear.ops.kda.triton_common import (
    SUB,
    anchor_safe,
    first_row,
    load_G,
    load_qk,
    load_row,
    load_rows,
    load_state_or_zeros,
    load_tile,
    load_tile_native,
    load_vec,
    state_program,
    store_rows,
    store_tile,
    store_vec,
)


@triton.jit
def state_bwd_step(dS, c, bos, eos, c0, i_v, i_h, do, P, qg, kg, W, G, dh, dv_new, H, K: tl.constexpr,
                   V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                   PREC: tl.constexpr):
    """Chunk c of one sequence, backward: dS ``[K, BV]`` is the gradient at its end; returns it at its start."""
    t0 = bos + c * C
    n = tl.minimum(eos - t0, C)
    cdt = W.dtype.element_ty
    dk = tl.arange(0, K)
    dv = i_v * BV + tl.arange(0, BV)
    tl.store(dh + ((c0 + c).to(tl.int64) * H + i_h) * K * V + dk[:, None] * V + dv[None, :],
             dS.to(dh.dtype.element_ty))
    d_o = load_tile(do, t0, 0, n, H, i_h, V, i_v * BV, BV, C).to(cdt)
    dvn = tl.dot(tl.trans(load_tile_native(P, t0, 0, n, H, i_h, C, 0, C, C)), d_o, input_precision=PREC)
    dvn += tl.dot(load_tile_native(kg, t0, 0, n, H, i_h, K, 0, K, C), dS.to(cdt), input_precision=PREC)
    store_tile(dv_new, dvn, t0, 0, n, H, i_h, V, i_v * BV, BV, C)
    G_last = load_row(G, t0 + n - 1, H, i_h, K)
    dS = dS * tl.exp(G_last)[:, None]
    dS += tl.dot(tl.trans(load_tile_native(qg, t0, 0, n, H, i_h, K, 0, K, C)), d_o, input_precision=PREC)
    return dS - tl.dot(tl.trans(load_tile_native(W, t0, 0, n, H, i_h, K, 0, K, C)), dvn.to(cdt), input_precision=PREC)


@triton.jit
def state_bwd_kernel(
    do, P, qg, kg, W, G, dhT, dh, dv_new, dh0, cu_seqlens, chunk_offset, H,
    K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, HAS_DHT: tl.constexpr,
    PIPELINE: tl.constexpr, PREC: tl.constexpr,
):
    i_v, i_h, bos, eos, c0, n_chunks, state_offs = state_program(cu_seqlens, chunk_offset, H, K, V, BV, C)
    dS = load_state_or_zeros(dhT, state_offs, HAS_DHT, K, BV)
    if PIPELINE:  # see state_out_kernel
        for i in tl.range(0, n_chunks, num_stages=2):
            dS = state_bwd_step(dS, n_chunks - 1 - i, bos, eos, c0, i_v, i_h, do, P, qg, kg, W, G, dh, dv_new, H,
                                K, V, BV, C, PREC)
    else:
        i = 0
        while i < n_chunks:
            dS = state_bwd_step(dS, n_chunks - 1 - i, bos, eos, c0, i_v, i_h, do, P, qg, kg, W, G, dh, dv_new, H,
                                K, V, BV, C, PREC)
            i += 1
    tl.store(dh0 + state_offs, dS)


@triton.jit
def load_state(ptr, i_c, i_h, H, K: tl.constexpr, V: tl.constexpr, c0, BV: tl.constexpr):
    """``[K, BV]`` columns c0.. of chunk i_c's state (head i_h) in a ``[NC, H, K, V]`` tensor, in its dtype."""
    offs = (i_c.to(tl.int64) * H + i_h) * K * V + tl.arange(0, K)[:, None] * V + c0 + tl.arange(0, BV)[None, :]
    return tl.load(ptr + offs)


@triton.jit
def grads_kernel_a(
    q, k, v, rq, rk, G, beta_f, M, A, h, v_new, do, dh, dv_new,
    dA, dP, dq_part, dk_part, dG_part, dG_last, dbeta, dv, chunk_start, chunk_len, scale, H,
    K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, L2NORM: tl.constexpr,
    SIGMOID: tl.constexpr, PREC: tl.constexpr,
):
    """Three passes over V (S, dS: the state at the chunk's start and its gradient at the end), one [C, K]
    accumulator live at a time; the per-token partials go straight to memory (re-read when added to)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0 = tl.load(chunk_start + i_c)
    n = tl.load(chunk_len + i_c)
    rows = tl.arange(0, C)
    cdt = v_new.dtype.element_ty
    G_last = load_row(G, t0 + n - 1, H, i_h, K)

    # 1. through O = qg S + P V': dqg = dO S^T (-> dq, dG) and dP = dO V'^T
    dqg = tl.zeros([C, K], dtype=tl.float32)
    dp = tl.zeros([C, C], dtype=tl.float32)
    for iv in tl.static_range(V // BV):
        d_o = load_tile(do, t0, 0, n, H, i_h, V, iv * BV, BV, C).to(cdt)
        dqg += tl.dot(d_o, tl.trans(load_state(h, i_c, i_h, H, K, V, iv * BV, BV).to(cdt)), input_precision=PREC)
        dp += tl.dot(d_o, tl.trans(load_tile(v_new, t0, 0, n, H, i_h, V, iv * BV, BV, C).to(cdt)), input_precision=PREC)
    store_rows(dP, tl.where(rows[:, None] >= rows[None, :], dp, 0.0), t0, 0, n, H, i_h, C, C)
    qg = scale * tl.exp(load_G(G, t0, 0, n, H, i_h, G_last, K, C)) * load_qk(q, rq, t0, 0, n, H, i_h, K, C, L2NORM)
    store_rows(dq_part, scale * tl.exp(load_G(G, t0, 0, n, H, i_h, G_last, K, C)) * dqg, t0, 0, n, H, i_h, K, C)
    store_rows(dG_part, qg * dqg, t0, 0, n, H, i_h, K, C)

    # 2. through S_end = exp(G_last) S + kg^T V': dkg = V' dS^T (-> dk, dG, dG_last)
    dkg = tl.zeros([C, K], dtype=tl.float32)
    dgl = tl.zeros([K], dtype=tl.float32)
    for iv in tl.static_range(V // BV):
        dS = load_state(dh, i_c, i_h, H, K, V, iv * BV, BV)
        dkg += tl.dot(load_tile(v_new, t0, 0, n, H, i_h, V, iv * BV, BV, C).to(cdt), tl.trans(dS.to(cdt)),
                      input_precision=PREC)
        dgl += tl.sum(dS.to(tl.float32) * load_state(h, i_c, i_h, H, K, V, iv * BV, BV).to(tl.float32), axis=1)
    to_end = tl.exp(G_last[None, :] - load_G(G, t0, 0, n, H, i_h, G_last, K, C))
    kg = load_qk(k, rk, t0, 0, n, H, i_h, K, C, L2NORM) * to_end
    store_rows(dk_part, to_end * dkg, t0, 0, n, H, i_h, K, C)
    tl.debug_barrier()  # this program's own earlier stores, read back by other threads
    store_rows(dG_part, load_rows(dG_part, t0, 0, n, H, i_h, K, C) - kg * dkg, t0, 0, n, H, i_h, K, C)
    dgl = tl.sum(kg * dkg, axis=0) + tl.exp(G_last) * dgl
    tl.store(dG_last + (i_c.to(tl.int64) * H + i_h) * K + tl.arange(0, K), dgl)

    # 3. through V' = U - W S and the UT transform: dW = -dV' S^T, dU = dV' (-> dv, dβ, dM)
    b = load_vec(beta_f, t0, 0, n, H, i_h, C)
    m = load_rows(M, t0, 0, n, H, i_h, C, C)
    dW = tl.zeros([C, K], dtype=tl.float32)
    dM = tl.zeros([C, C], dtype=tl.float32)
    db = tl.zeros([C], dtype=tl.float32)
    for iv in tl.static_range(V // BV):
        dvn = load_tile(dv_new, t0, 0, n, H, i_h, V, iv * BV, BV, C)
        vt = load_tile(v, t0, 0, n, H, i_h, V, iv * BV, BV, C)
        dW -= tl.dot(dvn.to(cdt), tl.trans(load_state(h, i_c, i_h, H, K, V, iv * BV, BV).to(cdt)), input_precision=PREC)
        dx_u = tl.dot(tl.trans(m), dvn, input_precision=PREC)
        dM += tl.dot(dvn, tl.trans(b[:, None] * vt), input_precision=PREC)
        db += tl.sum(dx_u * vt, axis=1)
        store_tile(dv, b[:, None] * dx_u, t0, 0, n, H, i_h, V, iv * BV, BV, C)
    gam = tl.exp(load_G(G, t0, 0, n, H, i_h, G_last, K, C))
    kn = load_qk(k, rk, t0, 0, n, H, i_h, K, C, L2NORM)
    dx_w = tl.dot(tl.trans(m), dW, input_precision=PREC)
    dM += tl.dot(dW, tl.trans(b[:, None] * gam * kn), input_precision=PREC)
    tl.debug_barrier()
    store_rows(dk_part, load_rows(dk_part, t0, 0, n, H, i_h, K, C) + b[:, None] * gam * dx_w, t0, 0, n, H, i_h, K, C)
    store_rows(dG_part, load_rows(dG_part, t0, 0, n, H, i_h, K, C) + dx_w * (b[:, None] * gam * kn),
               t0, 0, n, H, i_h, K, C)
    db += tl.sum(dx_w * gam * kn, axis=1)
    dL = -tl.dot(tl.dot(tl.trans(m), dM, input_precision=PREC), tl.trans(m), input_precision=PREC)
    dL = tl.where(rows[:, None] > rows[None, :], dL, 0.0)
    db += tl.sum(dL * load_rows(A, t0, 0, n, H, i_h, C, C), axis=1)
    if SIGMOID:
        db = db * b * (1.0 - b)
    store_vec(dbeta, db, t0, 0, n, H, i_h, C)
    store_rows(dA, b[:, None] * dL, t0, 0, n, H, i_h, C, C)


@triton.jit
def exact_diag_grads(D, k, x, G, R: tl.constexpr):
    """Gradients of a diagonal block of decayed scores from exact pairwise exponentials:
    ``row[i] = sum_{j<=i} D_ij k_j e^{G_i - G_j}``, ``col[j] = sum_{i>=j} D_ij x_i e^{G_i - G_j}`` (``[R, K]``)."""
    rows = tl.arange(0, R)
    row = tl.zeros(k.shape, dtype=tl.float32)
    col = tl.zeros(k.shape, dtype=tl.float32)
    for j in range(R):
        pick = rows == j
        k_j = tl.sum(tl.where(pick[:, None], k, 0.0), axis=0)
        G_j = tl.sum(tl.where(pick[:, None], G, 0.0), axis=0)
        D_j = tl.sum(tl.where(pick[None, :], D, 0.0), axis=1)
        e = tl.where((rows >= j)[:, None], tl.exp(tl.minimum(G - G_j[None, :], 0.0)), 0.0)
        row += D_j[:, None] * k_j[None, :] * e
        col = tl.where(pick[:, None], tl.sum(D_j[:, None] * x * e, axis=0)[None, :], col)
    return row, col


@triton.jit
def grads_kernel_b(
    q, k, g, rq, rk, G, A_log, dt_bias, dA, dP, dq_part, dk_part, dG_part, dG_last, dq, dk, dg,
    dA_log_part, ddt_part, chunk_start, chunk_len, lower_bound, scale, H,
    K: tl.constexpr, C: tl.constexpr, HAS_GATE: tl.constexpr, BOUNDED: tl.constexpr, L2NORM: tl.constexpr,
    PREC: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0 = tl.load(chunk_start + i_c)
    n = tl.load(chunk_len + i_c)
    G_last = load_row(G, t0 + n - 1, H, i_h, K)
    # gradients reach every g of the chunk through G_last (the cumsum's last row)
    carry = tl.load(dG_last + (i_c.to(tl.int64) * H + i_h) * K + tl.arange(0, K))
    if HAS_GATE:
        a_h = tl.exp(tl.load(A_log + i_h))
        dt = tl.load(dt_bias + i_h * K + tl.arange(0, K))
        dA_log_acc = tl.zeros([K], dtype=tl.float32)
        ddt_acc = tl.zeros([K], dtype=tl.float32)
    for X in tl.static_range(3, -1, -1):  # last block first: the reverse cumsum carries from later rows
        r0 = X * SUB
        G_x = load_G(G, t0, r0, n, H, i_h, G_last, K, SUB)
        k_x = load_qk(k, rk, t0, r0, n, H, i_h, K, SUB, L2NORM)
        q_x = load_qk(q, rq, t0, r0, n, H, i_h, K, SUB, L2NORM)
        G_ax = first_row(G_x, SUB)
        e_x = tl.exp(G_x - G_ax[None, :])
        row_a = tl.zeros([SUB, K], dtype=tl.float32)
        row_p = tl.zeros([SUB, K], dtype=tl.float32)
        col_a = tl.zeros([SUB, K], dtype=tl.float32)
        col_p = tl.zeros([SUB, K], dtype=tl.float32)
        # rows of X against earlier column blocks J (anchor: X's first row)
        for J in tl.static_range(X):
            G_j = load_G(G, t0, J * SUB, n, H, i_h, G_last, K, SUB)
            k_ja = load_qk(k, rk, t0, J * SUB, n, H, i_h, K, SUB, L2NORM) * tl.exp(G_ax[None, :] - G_j)
            row_a += e_x * tl.dot(load_tile(dA, t0, r0, n, H, i_h, C, J * SUB, SUB, SUB), k_ja, input_precision=PREC)
            row_p += e_x * tl.dot(load_tile(dP, t0, r0, n, H, i_h, C, J * SUB, SUB, SUB), k_ja, input_precision=PREC)
        # columns of X against later row blocks I (anchor: I's first row)
        for I in tl.static_range(X + 1, 4):
            G_i = load_G(G, t0, I * SUB, n, H, i_h, G_last, K, SUB)
            G_ai = first_row(G_i, SUB)
            e_i = tl.exp(G_i - G_ai[None, :])
            k_i = load_qk(k, rk, t0, I * SUB, n, H, i_h, K, SUB, L2NORM) * e_i
            q_i = load_qk(q, rq, t0, I * SUB, n, H, i_h, K, SUB, L2NORM) * e_i
            e_col = tl.exp(G_ai[None, :] - G_x)
            col_a += e_col * tl.dot(tl.trans(load_tile(dA, t0, I * SUB, n, H, i_h, C, r0, SUB, SUB)), k_i,
                                    input_precision=PREC)
            col_p += e_col * tl.dot(tl.trans(load_tile(dP, t0, I * SUB, n, H, i_h, C, r0, SUB, SUB)), q_i,
                                    input_precision=PREC)
        dA_xx = load_tile(dA, t0, r0, n, H, i_h, C, r0, SUB, SUB)
        dP_xx = load_tile(dP, t0, r0, n, H, i_h, C, r0, SUB, SUB)
        if anchor_safe(G, t0, r0, n, H, i_h, K):
            e_inv = tl.exp(G_ax[None, :] - G_x)
            row_a += e_x * tl.dot(dA_xx, k_x * e_inv, input_precision=PREC)
            row_p += e_x * tl.dot(dP_xx, k_x * e_inv, input_precision=PREC)
            col_a += e_inv * tl.dot(tl.trans(dA_xx), k_x * e_x, input_precision=PREC)
            col_p += e_inv * tl.dot(tl.trans(dP_xx), q_x * e_x, input_precision=PREC)
        else:
            ra, ca = exact_diag_grads(dA_xx, k_x, k_x, G_x, SUB)
            rp, cp = exact_diag_grads(dP_xx, k_x, q_x, G_x, SUB)
            row_a += ra
            col_a += ca
            row_p += rp
            col_p += cp
        row_p = row_p * scale
        col_p = col_p * scale
        dq_hat = load_rows(dq_part, t0, r0, n, H, i_h, K, SUB) + row_p
        dk_hat = load_rows(dk_part, t0, r0, n, H, i_h, K, SUB) + row_a + col_a + col_p
        dG = load_rows(dG_part, t0, r0, n, H, i_h, K, SUB) + q_x * row_p + k_x * (row_a - col_a - col_p)
        # g -> G is a cumsum inside the chunk, so dg is the reverse cumsum of dG (plus what later blocks carry)
        dgx = tl.sum(dG, axis=0)[None, :] - tl.cumsum(dG, axis=0) + dG + carry[None, :]
        carry += tl.sum(dG, axis=0)
        if L2NORM:
            r_q = load_vec(rq, t0, r0, n, H, i_h, SUB)[:, None]
            r_k = load_vec(rk, t0, r0, n, H, i_h, SUB)[:, None]
            dq_hat = r_q * (dq_hat - q_x * tl.sum(q_x * dq_hat, axis=1)[:, None])
            dk_hat = r_k * (dk_hat - k_x * tl.sum(k_x * dk_hat, axis=1)[:, None])
        store_rows(dq, dq_hat, t0, r0, n, H, i_h, K, SUB)
        store_rows(dk, dk_hat, t0, r0, n, H, i_h, K, SUB)
        if HAS_GATE:
            valid = ((r0 + tl.arange(0, SUB)) < n)[:, None]
            x = load_rows(g, t0, r0, n, H, i_h, K, SUB) + dt[None, :]
            if BOUNDED:
                s = tl.sigmoid(a_h * x)
                dgate = lower_bound * s * (1.0 - s)  # d g / d (a x)
                dx = dgx * dgate * a_h
                dA_log_acc += tl.sum(tl.where(valid, dx * x, 0.0), axis=0)
            else:
                softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
                dx = -dgx * a_h * tl.sigmoid(x)
                dA_log_acc += tl.sum(tl.where(valid, -dgx * a_h * softplus, 0.0), axis=0)
            ddt_acc += tl.sum(tl.where(valid, dx, 0.0), axis=0)
            store_rows(dg, dx, t0, r0, n, H, i_h, K, SUB)
        else:
            store_rows(dg, dgx, t0, r0, n, H, i_h, K, SUB)
    if HAS_GATE:
        tl.store(dA_log_part + i_c.to(tl.int64) * H + i_h, tl.sum(dA_log_acc, axis=0))
        tl.store(ddt_part + (i_c.to(tl.int64) * H + i_h) * K + tl.arange(0, K), ddt_acc)

