"""Triton kernels of the chunk-KDA backward pass, four launches (notation of triton_chunk_fwd):

1. :func:`state_bwd_kernel` (sequential, reverse over a sequence's chunks): with dS the gradient of the state
   at a chunk's end, ``dV' = P^T dO + kg dS`` and ``dS <- exp(G_last) dS + qg^T dO - W^T dV'``; stores dS per
   chunk (``dh``), dV', and the initial state's gradient.
2. :func:`grads_kernel_a` (chunk-parallel): through ``O = qg S + P V'``,
   ``V' = U - W S``, ``S_end = exp(G_last) S + kg^T V'`` and the UT transform ``W = M β Γ K``, ``U = M β V``,
   ``M = (I + diag(β) A)^-1`` (``dL = -M^T dM M^T``): dv, dβ, dA, dP, and the parts of dq, dk, dG that are
   element-wise in the channel.
3. :func:`grads_kernel_b` (one 16-row block per program, whole rows of K): the gradients through the decayed
   scores A and P with the same anchoring as the forward; finishes dq and dk (with the fused L2 norm's
   backward).
4. :func:`gate_bwd_kernel` (chunk-parallel): the reverse cumsum from dG to dg and the backward of the fused
   gate activation.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kimi_linear.ops.kda.triton_common import (
    SUB,
    anchor_safe,
    bf16_operand,
    first_row,
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
    softplus_exp,
    split_dot,
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
    STAGES: tl.constexpr, PREC: tl.constexpr,
):
    i_v, i_h, bos, eos, c0, n_chunks, state_offs = state_program(cu_seqlens, chunk_offset, H, K, V, BV, C)
    dS = load_state_or_zeros(dhT, state_offs, HAS_DHT, K, BV)
    if STAGES > 1:  # see state_out_kernel
        for i in tl.range(0, n_chunks, num_stages=STAGES):
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
def load_state(ptr, i_c, i_h, H, K: tl.constexpr, V: tl.constexpr, k0, BK: tl.constexpr, v0, BV: tl.constexpr):
    """``[BK, BV]`` block (rows k0.., columns v0..) of chunk i_c's state (head i_h) in a ``[NC, H, K, V]``
    tensor, in its dtype."""
    offs = (i_c.to(tl.int64) * H + i_h) * K * V + (k0 + tl.arange(0, BK))[:, None] * V + v0 + tl.arange(0, BV)[None, :]
    return tl.load(ptr + offs)


@triton.jit
def grads_kernel_a(
    q, k, v, rq, rk, G, beta_f, M, A, h, v_new, do, dh, dv_new,
    dA, dP, dq_part, dk_part, dG_part, dG_last, dbeta, dv, chunk_start, chunk_len, scale, H,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, L2NORM: tl.constexpr,
    SIGMOID: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (chunk, head); S, dS: the state at the chunk's start and its gradient at the end. The
    K-wide results are built one slice of BK channels at a time (three [C, BK] accumulators over a loop on V),
    so no [C, K] tile is ever live and each partial is written once."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0 = tl.load(chunk_start + i_c)
    n = tl.load(chunk_len + i_c)
    rows = tl.arange(0, C)
    cdt = v_new.dtype.element_ty
    b = load_vec(beta_f, t0, 0, n, H, i_h, C)
    m = load_rows(M, t0, 0, n, H, i_h, C, C)
    m_op = bf16_operand(m, PREC)

    # through O = P V' (dP = dO V'^T) and U = M β V (dU = dV': dv, dβ, dM)
    dp = tl.zeros([C, C], dtype=tl.float32)
    dM = tl.zeros([C, C], dtype=tl.float32)
    db = tl.zeros([C], dtype=tl.float32)
    for iv in range(V // BV):
        d_o = load_tile_native(do, t0, 0, n, H, i_h, V, iv * BV, BV, C).to(cdt)
        dp += tl.dot(d_o, tl.trans(load_tile_native(v_new, t0, 0, n, H, i_h, V, iv * BV, BV, C)), input_precision=PREC)
        dvn = load_tile(dv_new, t0, 0, n, H, i_h, V, iv * BV, BV, C)
        vt = load_tile(v, t0, 0, n, H, i_h, V, iv * BV, BV, C)
        dx_u = tl.dot(tl.trans(m_op), bf16_operand(dvn, PREC), input_precision=PREC)
        # TF32 here: with bf16 operands dA_log's error at 64K near the gate's bound rose from 7e-5 to 3.5e-4
        dM += tl.dot(dvn, tl.trans(b[:, None] * vt), input_precision=PREC)
        db += tl.sum(dx_u * vt, axis=1)
        store_tile(dv, b[:, None] * dx_u, t0, 0, n, H, i_h, V, iv * BV, BV, C)
    store_rows(dP, tl.where(rows[:, None] >= rows[None, :], dp, 0.0), t0, 0, n, H, i_h, C, C)

    # per slice of K, through O = qg S (dqg = dO S^T), S_end = exp(G_last) S + kg^T V' (dkg = V' dS^T) and
    # V' = U - W S with W = M β Γ K (dW = -dV' S^T)
    for ik in range(K // BK):
        c0 = ik * BK
        dqg = tl.zeros([C, BK], dtype=tl.float32)
        dkg = tl.zeros([C, BK], dtype=tl.float32)
        dW = tl.zeros([C, BK], dtype=tl.float32)
        dgl = tl.zeros([BK], dtype=tl.float32)
        for iv in range(V // BV):
            S = load_state(h, i_c, i_h, H, K, V, c0, BK, iv * BV, BV)
            dS = load_state(dh, i_c, i_h, H, K, V, c0, BK, iv * BV, BV)
            d_o = load_tile_native(do, t0, 0, n, H, i_h, V, iv * BV, BV, C).to(cdt)
            dqg += tl.dot(d_o, tl.trans(S.to(cdt)), input_precision=PREC)
            dkg += tl.dot(load_tile_native(v_new, t0, 0, n, H, i_h, V, iv * BV, BV, C), tl.trans(dS.to(cdt)),
                          input_precision=PREC)
            dW -= tl.dot(load_tile_native(dv_new, t0, 0, n, H, i_h, V, iv * BV, BV, C), tl.trans(S.to(cdt)),
                         input_precision=PREC)
            dgl += tl.sum(dS.to(tl.float32) * S.to(tl.float32), axis=1)
        # ordered so each [C, BK] tile dies as soon as it can (fewer live tiles, less spilling)
        G_end = load_row_cols(G, t0 + n - 1, H, i_h, K, c0, BK)
        G_s = load_G_cols(G, t0, 0, n, H, i_h, G_end, K, c0, BK, C)
        gam = tl.exp(G_s)
        dq_s = scale * gam * dqg
        store_tile(dq_part, dq_s, t0, 0, n, H, i_h, K, c0, BK, C)
        dG = load_qk_cols(q, rq, t0, 0, n, H, i_h, K, c0, BK, C, L2NORM) * dq_s
        to_end = tl.exp(G_end[None, :] - G_s)
        dk_s = to_end * dkg
        k_s = load_qk_cols(k, rk, t0, 0, n, H, i_h, K, c0, BK, C, L2NORM)
        dkg_s = k_s * dk_s
        tl.store(dG_last + (i_c.to(tl.int64) * H + i_h) * K + c0 + tl.arange(0, BK),
                 tl.sum(dkg_s, axis=0) + tl.exp(G_end) * dgl)
        bgk = b[:, None] * gam * k_s
        # bf16 operands (H100, 1 x 65536: 1.2 ms of this kernel's 9.7; every error in kda_accuracy.md unchanged)
        dW_op = bf16_operand(dW, PREC)
        dM += tl.dot(dW_op, tl.trans(bf16_operand(bgk, PREC)), input_precision=PREC)
        dx_w = tl.dot(tl.trans(m_op), dW_op, input_precision=PREC)
        db += tl.sum(dx_w * gam * k_s, axis=1)
        store_tile(dk_part, dk_s + b[:, None] * gam * dx_w, t0, 0, n, H, i_h, K, c0, BK, C)
        store_tile(dG_part, dG - dkg_s + dx_w * bgk, t0, 0, n, H, i_h, K, c0, BK, C)

    # through M = (I + diag(β) A)^-1: dL = -M^T dM M^T
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
    q, k, rq, rk, G, dA, dP, dq_part, dk_part, dG_part, dq, dk, chunk_start, chunk_len, scale, H,
    K: tl.constexpr, C: tl.constexpr, L2NORM: tl.constexpr, PREC: tl.constexpr,
):
    """One program per (chunk, 16-row block X), whole rows of K: the gradients through the decayed scores
    ``A_ij = β_i Σ_d k_id k_jd e^(G_id - G_jd)`` and ``P_ij = scale Σ_d q_id k_jd e^(G_id - G_jd)`` of X's rows
    (against earlier blocks, anchored at X's first row) and X's columns (against later blocks, anchored at
    theirs), added to grads A's partials. X's dq and dk are then complete: the L2 norm's backward (which needs
    whole rows) turns them into the final gradients; dG goes back into its fp32 partial for
    :func:`gate_bwd_kernel`, whose reverse cumsum needs the whole chunk."""
    pid = tl.program_id(0)
    i_c, X, i_h = pid // 4, pid % 4, tl.program_id(1)
    r0 = X * SUB
    t0 = tl.load(chunk_start + i_c)
    n = tl.load(chunk_len + i_c)
    G_last = load_row(G, t0 + n - 1, H, i_h, K)
    G_x = load_G(G, t0, r0, n, H, i_h, G_last, K, SUB)
    G_ax = first_row(G_x, SUB)
    # row terms: every product is scaled by e_x = exp(G_x - G_ax) (<= 1), applied once at the end; the column
    # terms of A and P share one accumulator (P's scaled as they come)
    row_a = tl.zeros([SUB, K], dtype=tl.float32)
    row_p = tl.zeros([SUB, K], dtype=tl.float32)
    col = tl.zeros([SUB, K], dtype=tl.float32)
    # rows of X against earlier column blocks J (anchor: X's first row)
    J = 0
    while J < X:  # (while: the interpreter cannot range() over a program id)
        G_j = load_G(G, t0, J * SUB, n, H, i_h, G_last, K, SUB)
        k_ja = load_qk(k, rk, t0, J * SUB, n, H, i_h, K, SUB, L2NORM) * tl.exp(G_ax[None, :] - G_j)
        row_a += tl.dot(load_tile(dA, t0, r0, n, H, i_h, C, J * SUB, SUB, SUB), k_ja, input_precision=PREC)
        row_p += tl.dot(load_tile(dP, t0, r0, n, H, i_h, C, J * SUB, SUB, SUB), k_ja, input_precision=PREC)
        J += 1
    # columns of X against later row blocks I (anchor: I's first row)
    I = X + 1
    while I < 4:
        G_i = load_G(G, t0, I * SUB, n, H, i_h, G_last, K, SUB)
        G_ai = first_row(G_i, SUB)
        e_i = tl.exp(G_i - G_ai[None, :])
        k_i = load_qk(k, rk, t0, I * SUB, n, H, i_h, K, SUB, L2NORM) * e_i
        q_i = load_qk(q, rq, t0, I * SUB, n, H, i_h, K, SUB, L2NORM) * e_i
        d = tl.dot(tl.trans(load_tile(dA, t0, I * SUB, n, H, i_h, C, r0, SUB, SUB)), k_i, input_precision=PREC)
        d += scale * tl.dot(tl.trans(load_tile(dP, t0, I * SUB, n, H, i_h, C, r0, SUB, SUB)), q_i,
                            input_precision=PREC)
        col += tl.exp(G_ai[None, :] - G_x) * d
        I += 1
    dA_xx = load_tile(dA, t0, r0, n, H, i_h, C, r0, SUB, SUB)
    dP_xx = load_tile(dP, t0, r0, n, H, i_h, C, r0, SUB, SUB)
    k_x = load_qk(k, rk, t0, r0, n, H, i_h, K, SUB, L2NORM)
    q_x = load_qk(q, rq, t0, r0, n, H, i_h, K, SUB, L2NORM)
    e_x = tl.exp(G_x - G_ax[None, :])
    if anchor_safe(G, t0, r0, n, H, i_h, K, 0, K):
        # Factors here span up to e^SAFE_DECAY, and in dG these row and column terms cancel down to the pairs
        # across a row: single-pass TF32 left the gate gradients of a 64K-token sequence near the lower bound off
        # by 3.6e-2 (dg) and 1e-1 (dA_log, ddt_bias) from fp64 (fla-core 0.6.0: 4.3e-3, 2.5e-3, 4.3e-3). Split
        # bf16 products give 2.7e-3, 1.5e-5, 1.8e-3 (three-pass TF32: 2.7e-3, 7e-5, 1.8e-3, 0.55 ms slower at
        # 1 x 65536, H = 32). Off-diagonal blocks need neither.
        e_inv = tl.exp(G_ax[None, :] - G_x)
        row_a = e_x * (row_a + split_dot(dA_xx, k_x * e_inv, PREC))
        row_p = e_x * (row_p + split_dot(dP_xx, k_x * e_inv, PREC))
        d = split_dot(tl.trans(dA_xx), k_x * e_x, PREC)
        d += scale * split_dot(tl.trans(dP_xx), q_x * e_x, PREC)
        col += e_inv * d
    else:
        ra, ca = exact_diag_grads(dA_xx, k_x, k_x, G_x, SUB)
        rp, cp = exact_diag_grads(dP_xx, k_x, q_x, G_x, SUB)
        row_a = e_x * row_a + ra
        row_p = e_x * row_p + rp
        col += ca + scale * cp
    row_p = row_p * scale
    dG = load_rows(dG_part, t0, r0, n, H, i_h, K, SUB) + q_x * row_p + k_x * (row_a - col)
    store_rows(dG_part, dG, t0, r0, n, H, i_h, K, SUB)
    dq_hat = load_rows(dq_part, t0, r0, n, H, i_h, K, SUB) + row_p
    dk_hat = load_rows(dk_part, t0, r0, n, H, i_h, K, SUB) + row_a + col
    store_rows(dq, l2norm_bwd(q_x, rq, dq_hat, t0, r0, n, H, i_h, L2NORM), t0, r0, n, H, i_h, K, SUB)
    store_rows(dk, l2norm_bwd(k_x, rk, dk_hat, t0, r0, n, H, i_h, L2NORM), t0, r0, n, H, i_h, K, SUB)


@triton.jit
def l2norm_bwd(x_n, r, dx_n, t0, r0, n, H, i_h, L2NORM: tl.constexpr):
    """``dx = r (dx̂ - x̂ (x̂ · dx̂))`` for 16 whole rows (r0..) of a chunk: x̂ = r x the normalised rows
    ``[16, K]``, r = 1 / sqrt(sum x² + eps) read from the ``[T, H]`` tensor r; without the fused norm dx = dx̂."""
    if L2NORM:
        dx_n = load_vec(r, t0, r0, n, H, i_h, SUB)[:, None] * (dx_n - x_n * tl.sum(x_n * dx_n, axis=1)[:, None])
    return dx_n


@triton.jit
def gate_bwd_kernel(
    g, A_log, dt_bias, dG, dG_last, dg, dA_log_part, ddt_part, chunk_start, chunk_len, lower_bound, H,
    K: tl.constexpr, HAS_GATE: tl.constexpr, BOUNDED: tl.constexpr,
):
    """Backward of the pre-processing's gate, one program per (chunk, head), 16 rows at a time: the reverse
    cumsum from dG to dg and the gate activation's backward (with per-chunk partial sums for dA_log and
    ddt_bias)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0 = tl.load(chunk_start + i_c)
    n = tl.load(chunk_len + i_c)
    cols = tl.arange(0, K)
    # gradients reach every g of the chunk through G_last (the cumsum's last row)
    carry = tl.load(dG_last + (i_c.to(tl.int64) * H + i_h) * K + cols)
    if HAS_GATE:
        a_h = tl.exp(tl.load(A_log + i_h))
        dt = tl.load(dt_bias + i_h * K + cols)
        dA_log_acc = tl.zeros([K], dtype=tl.float32)
        ddt_acc = tl.zeros([K], dtype=tl.float32)
    for X in range(3, -1, -1):  # last block first: the reverse cumsum carries from later rows
        r0 = X * SUB
        dG_x = load_rows(dG, t0, r0, n, H, i_h, K, SUB)
        # g -> G is a cumsum inside the chunk, so dg is the reverse cumsum of dG (plus what later blocks carry).
        # A true reverse scan: block sum - cumsum + dG leaked ~1e-9 into the rows after the last one with a
        # gradient (the causality test caught it); flip-cumsum-flip runs in 0.92 ms at 1 x 65536 (H100), the
        # scan's reverse=True in 1.13
        dgx = tl.flip(tl.cumsum(tl.flip(dG_x, 0), axis=0), 0) + carry[None, :]
        carry += tl.sum(dG_x, axis=0)
        if HAS_GATE:
            valid = ((r0 + tl.arange(0, SUB)) < n)[:, None]
            x = load_rows(g, t0, r0, n, H, i_h, K, SUB) + dt[None, :]
            if BOUNDED:
                s = tl.sigmoid(a_h * x)
                dgate = lower_bound * s * (1.0 - s)  # d g / d (a x)
                dx = dgx * dgate * a_h
                dA_log_acc += tl.sum(tl.where(valid, dx * x, 0.0), axis=0)
            else:
                softplus, e = softplus_exp(x)
                dx = -dgx * a_h * (e / (1.0 + e))  # sigmoid(x)
                dA_log_acc += tl.sum(tl.where(valid, -dgx * a_h * softplus, 0.0), axis=0)
            ddt_acc += tl.sum(tl.where(valid, dx, 0.0), axis=0)
            store_rows(dg, dx, t0, r0, n, H, i_h, K, SUB)
        else:
            store_rows(dg, dgx, t0, r0, n, H, i_h, K, SUB)
    if HAS_GATE:
        tl.store(dA_log_part + i_c.to(tl.int64) * H + i_h, tl.sum(dA_log_acc, axis=0))
        tl.store(ddt_part + (i_c.to(tl.int64) * H + i_h) * K + cols, ddt_acc)
