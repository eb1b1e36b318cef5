"""Pieces shared by the Triton chunk-KDA kernels: tile loads, the fused gate, diagonal-block safety checks.

Layout conventions of every kernel in :mod:`kimi_linear.ops.kda.triton_chunk_fwd` / ``triton_chunk_bwd``:
the batch is flattened to one token axis (equal-length batches become packed sequences), per-token tensors
are ``[T_total, H, D]`` contiguous, and a chunk (C tokens of one sequence: 64 for autograd, 16 in the prefill) is
named by its global index ``i_c``; ``chunk_start[i_c]`` / ``chunk_len[i_c]`` give its first token and its number of
valid rows (<= C).
"""

from __future__ import annotations

import triton
import triton.language as tl

CHUNK = 64  # tokens per chunk (host side; kernels take it as the constexpr C)
PREFILL_CHUNK = 16  # tokens per chunk of the forward pass without autograd (see triton_chunk._prefill)
SUB = tl.constexpr(16)  # rows per sub-chunk
# largest in-block decay (nats, first row to last) for which a diagonal block may use an anchored product
SAFE_DECAY = tl.constexpr(80.0)


@triton.jit
def tile_ptr(ptr, t0, r0, n, H, i_h, STRIDE: tl.constexpr, c0, D: tl.constexpr, R: tl.constexpr):
    """Block pointer to an ``[R, D]`` tile of a ``[T, H, STRIDE]`` tensor: rows t0+r0.. of head i_h, columns
    c0..; the chunk's n valid rows bound it (a scalar base and strides keep index math out of registers)."""
    base = ptr + (t0.to(tl.int64) * H + i_h) * STRIDE
    return tl.make_block_ptr(base, (n, STRIDE), (H * STRIDE, 1), (r0, c0), (R, D), (1, 0))


@triton.jit
def load_tile(ptr, t0, r0, n, H, i_h, STRIDE: tl.constexpr, c0, D: tl.constexpr, R: tl.constexpr):
    """``[R, D]`` fp32 tile (see :func:`tile_ptr`); rows >= n (past the chunk) read as 0."""
    return load_tile_native(ptr, t0, r0, n, H, i_h, STRIDE, c0, D, R).to(tl.float32)


@triton.jit
def load_tile_native(ptr, t0, r0, n, H, i_h, STRIDE: tl.constexpr, c0, D: tl.constexpr, R: tl.constexpr):
    """:func:`load_tile` in the tensor's own dtype (a load that feeds a matrix product directly, which lets
    the compiler's pipeliner prefetch it)."""
    p = tile_ptr(ptr, t0, r0, n, H, i_h, STRIDE, c0, D, R)
    return tl.load(p, boundary_check=(0,), padding_option="zero")


@triton.jit
def store_tile(ptr, x, t0, r0, n, H, i_h, STRIDE: tl.constexpr, c0, D: tl.constexpr, R: tl.constexpr):
    """Store an ``[R, D]`` tile (see :func:`tile_ptr`); rows >= n are skipped."""
    p = tile_ptr(ptr, t0, r0, n, H, i_h, STRIDE, c0, D, R)
    tl.store(p, x.to(ptr.dtype.element_ty), boundary_check=(0,))


@triton.jit
def load_rows(ptr, t0, r0, n, H, i_h, D: tl.constexpr, R: tl.constexpr):
    """Full-width ``[R, D]`` tile of a ``[T, H, D]`` tensor (see :func:`load_tile`)."""
    return load_tile(ptr, t0, r0, n, H, i_h, D, 0, D, R)


@triton.jit
def store_rows(ptr, x, t0, r0, n, H, i_h, D: tl.constexpr, R: tl.constexpr):
    store_tile(ptr, x, t0, r0, n, H, i_h, D, 0, D, R)


@triton.jit
def prefetch_rows(ptr, t0, n, H, i_h, D: tl.constexpr, R: tl.constexpr):
    """Ask L2 for the ``[n, D]`` rows t0.. of head i_h of a ``[T, H, D]`` tensor (n <= R), without waiting for
    them: one ``prefetch.global.L2`` per 128-byte line. Row indices past n repeat row n-1, so no address leaves
    the tensor. Compiled only (the interpreter cannot run PTX)."""
    BYTES: tl.constexpr = D * ptr.dtype.element_ty.primitive_bitwidth // 8
    LINES: tl.constexpr = (BYTES + 127) // 128
    STEP: tl.constexpr = D // LINES
    i = tl.arange(0, R * LINES)
    row = tl.minimum(i // LINES, n - 1)
    p = ptr + ((t0 + row).to(tl.int64) * H + i_h) * D + (i % LINES) * STEP
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [p], dtype=tl.int32, is_pure=False,
                              pack=1)


@triton.jit
def load_row(ptr, t, H, i_h, D: tl.constexpr):
    """One token's ``[D]`` vector of a ``[T, H, D]`` tensor, fp32."""
    return load_row_cols(ptr, t, H, i_h, D, 0, D)


@triton.jit
def load_row_cols(ptr, t, H, i_h, STRIDE: tl.constexpr, c0, D: tl.constexpr):
    """Columns c0 .. c0+D-1 of one token's row of a ``[T, H, STRIDE]`` tensor, fp32."""
    return tl.load(ptr + (t.to(tl.int64) * H + i_h) * STRIDE + c0 + tl.arange(0, D)).to(tl.float32)


@triton.jit
def load_vec(ptr, t0, r0, n, H, i_h, R: tl.constexpr):
    """``[R]`` slice of a ``[T, H]`` tensor (rows >= n read as 0)."""
    r = r0 + tl.arange(0, R)
    return tl.load(ptr + (t0 + r).to(tl.int64) * H + i_h, mask=r < n, other=0.0).to(tl.float32)


@triton.jit
def store_vec(ptr, x, t0, r0, n, H, i_h, R: tl.constexpr):
    r = r0 + tl.arange(0, R)
    tl.store(ptr + (t0 + r).to(tl.int64) * H + i_h, x.to(ptr.dtype.element_ty), mask=r < n)


@triton.jit
def load_G(G_ptr, t0, r0, n, H, i_h, G_last, K: tl.constexpr, R: tl.constexpr):
    """Cumulative log-decay tile; rows past the chunk's end repeat G_last (they stand for g = 0), so every
    difference of two G rows stays <= 0 in the right direction and no exponential can overflow."""
    return load_G_cols(G_ptr, t0, r0, n, H, i_h, G_last, K, 0, K, R)


@triton.jit
def load_G_cols(G_ptr, t0, r0, n, H, i_h, G_last, K: tl.constexpr, c0, D: tl.constexpr, R: tl.constexpr):
    """Columns c0.. of :func:`load_G` (G_last: those columns of the chunk's last row)."""
    r = r0 + tl.arange(0, R)
    G = load_tile(G_ptr, t0, r0, n, H, i_h, K, c0, D, R)
    return tl.where((r < n)[:, None], G, G_last[None, :])


@triton.jit
def load_qk(ptr, rnorm_ptr, t0, r0, n, H, i_h, K: tl.constexpr, R: tl.constexpr, L2NORM: tl.constexpr):
    """q or k tile, L2-normalised with the per-row factors 1/sqrt(sum x^2 + eps) when L2NORM."""
    return load_qk_cols(ptr, rnorm_ptr, t0, r0, n, H, i_h, K, 0, K, R, L2NORM)


@triton.jit
def load_qk_cols(ptr, rnorm_ptr, t0, r0, n, H, i_h, K: tl.constexpr, c0, D: tl.constexpr, R: tl.constexpr,
                 L2NORM: tl.constexpr):
    """Columns c0.. of :func:`load_qk`."""
    x = load_tile(ptr, t0, r0, n, H, i_h, K, c0, D, R)
    if L2NORM:
        x = x * load_vec(rnorm_ptr, t0, r0, n, H, i_h, R)[:, None]
    return x


@triton.jit
def softplus_exp(x):
    """softplus(x) with PyTorch's threshold (x for x > 20, else log(1 + e^x)), and the exponential it took,
    e = e^min(x, 20), from which a backward gets sigmoid(x) = e / (1 + e) without a second exponential."""
    e = tl.exp(tl.minimum(x, 20.0))
    return tl.where(x > 20.0, x, tl.log(1.0 + e)), e


@triton.jit
def gate_fwd(x, a, lower_bound, BOUNDED: tl.constexpr):
    """The log-decay g from x = raw gate + dt_bias (any shape; a = exp(A_log[h]), a scalar; see gate.py): the
    bounded ``lower_bound * sigmoid(a x)`` or the released ``-a softplus(x)``. The chunk and decode kernels share it."""
    if BOUNDED:
        g = lower_bound * tl.sigmoid(a * x)
    else:
        softplus, _ = softplus_exp(x)
        g = -a * softplus
    return g


@triton.jit
def anchor_safe(G, t0, r0, n, H, i_h, K: tl.constexpr, c0, D: tl.constexpr):
    """Whether the 16-row block starting at row r0 may use an anchored product on its own diagonal block, in
    channels c0 .. c0+D-1: its decay from first to last row stays under e^SAFE_DECAY in each, so
    exp(G_first - G_j) (and the gradients it multiplies) stay inside fp32 (e^88). Checked at run time for every
    gate (a gate bounded at -5 a step always passes: 15 steps give at most 75); steeper blocks use exact
    pairwise exponentials."""
    first = load_row_cols(G, t0 + tl.minimum(r0, n - 1), H, i_h, K, c0, D)
    last = load_row_cols(G, t0 + tl.minimum(r0 + SUB - 1, n - 1), H, i_h, K, c0, D)
    return tl.max(first - last, axis=0) < SAFE_DECAY


@triton.jit
def exact_diag_scores(x, k, G, INCLUDE_DIAG: tl.constexpr, R: tl.constexpr):
    """Diagonal ``[R, R]`` block of the decayed scores from exact pairwise differences (any gate):
    ``out[i, j] = sum_d x_id k_jd exp(G_id - G_jd)`` for j < i (or j <= i), else 0."""
    rows = tl.arange(0, R)
    out = tl.zeros([R, R], dtype=tl.float32)
    for j in range(R):
        pick = (rows == j)[:, None]
        k_j = tl.sum(tl.where(pick, k, 0.0), axis=0)
        G_j = tl.sum(tl.where(pick, G, 0.0), axis=0)
        if INCLUDE_DIAG:
            keep = rows >= j
        else:
            keep = rows > j
        e = tl.where(keep[:, None], tl.exp(tl.minimum(G - G_j[None, :], 0.0)), 0.0)
        col = tl.sum(x * k_j[None, :] * e, axis=1)
        out = tl.where((rows == j)[None, :], col[:, None], out)
    return out


@triton.jit
def state_program(cu_seqlens, chunk_offset, H, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, C: tl.constexpr):
    """What one program of the sequential (state) kernels owns: the state columns [i_v·BV, (i_v+1)·BV) of one
    (sequence, head). Returns i_v, the head, the sequence's first and end tokens, the global index of its
    first chunk, its number of chunks, and the offsets of the owned ``[K, BV]`` block in a ``[N, H, K, V]``
    tensor."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n = i_nh // H
    bos = tl.load(cu_seqlens + i_n)
    eos = tl.load(cu_seqlens + i_n + 1)
    offs = (i_nh.to(tl.int64) * K + tl.arange(0, K)[:, None]) * V + i_v * BV + tl.arange(0, BV)[None, :]
    return i_v, i_nh % H, bos, eos, tl.load(chunk_offset + i_n), tl.cdiv(eos - bos, C), offs


@triton.jit
def load_state_or_zeros(ptr, offs, GIVEN: tl.constexpr, K: tl.constexpr, BV: tl.constexpr):
    """A ``[K, BV]`` fp32 state block (see :func:`state_program`), or zeros when GIVEN is false."""
    if GIVEN:
        return tl.load(ptr + offs).to(tl.float32)
    return tl.zeros([K, BV], dtype=tl.float32)


@triton.jit
def bf16_operand(x, PREC: tl.constexpr):
    """x as an operand of a tensor-core product: rounded to bf16 when the inputs are 16-bit (PREC "tf32"), which
    doubles the product rate and halves its shared memory; fp32 inputs (PREC "tf32x3") keep fp32. bf16 even for
    fp16 inputs: the anchored operands reach e^SAFE_DECAY, far past fp16's range."""
    if PREC == "tf32":
        x = x.to(tl.bfloat16)
    return x


@triton.jit
def split_dot(a, b, PREC: tl.constexpr):
    """fp32 ``a @ b`` to about 16 bits of mantissa: for 16-bit inputs (PREC "tf32") three bf16 products of the
    operands split into high and low halves (hi·hi + lo·hi + hi·lo), half the cost of three-pass TF32; for
    fp32 inputs three-pass TF32 (about fp32)."""
    if PREC == "tf32":
        a_hi = a.to(tl.bfloat16)
        b_hi = b.to(tl.bfloat16)
        a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
        b_lo = (b - b_hi.to(tl.float32)).to(tl.bfloat16)
        out = tl.dot(a_hi, b_hi) + tl.dot(a_lo, b_hi) + tl.dot(a_hi, b_lo)
    else:
        out = tl.dot(a, b, input_precision="tf32x3")
    return out


@triton.jit
def first_row(x, R: tl.constexpr):
    """Row 0 of an ``[R, D]`` tile, as a ``[D]`` vector."""
    return tl.sum(tl.where((tl.arange(0, R) == 0)[:, None], x, 0.0), axis=0)
