"""Chunk KDA on Triton behind the ``chunk_kda`` contract: an autograd op (forward and backward kernels) when a
gradient is wanted, and a two-kernel forward over 16-token chunks otherwise (``_prefill``: prefill, evaluation).

Forward: :mod:`kimi_linear.ops.kda.triton_chunk_fwd`; backward: :mod:`kimi_linear.ops.kda.triton_chunk_bwd`.
Gate activation, q/k L2 norm and beta sigmoid run inside the kernels; gradients flow to q, k, v, the raw gate
(or g), A_log, dt_bias, the raw beta (or beta) and the initial state.

Intermediates (W, U, Aqk, the per-chunk states) are kept in the inputs' dtype when that is bf16/fp16 and in fp32
otherwise; the cumulative log-decay, the UT-transform inverse, the running state and every gradient
accumulator stay fp32, except grads A's share of dq, which is stored in the inputs' dtype (see ``_backward``).
With 16-bit inputs the products whose errors kda_accuracy.md shows unchanged take bf16 operands (the score
products, three of grads A's), the rest TF32, and the backward's anchored diagonal products split bf16 (about
16 bits); fp32 inputs take three-pass TF32 everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton

from kimi_linear.ops.kda.gate import KDAOptions
from kimi_linear.ops.kda.triton_chunk_bwd import (
    gate_bwd_kernel,
    grads_kernel_a,
    grads_kernel_b,
    state_bwd_kernel,
)
from kimi_linear.ops.kda.triton_chunk_fwd import (
    intra_kernel,
    prefill_chunk_kernel,
    prep_kernel,
    scores_kernel,
    state_out_kernel,
)
from kimi_linear.ops.kda.triton_common import CHUNK, PREFILL_CHUNK
from kimi_linear.ops.kda.validate import check_kda_inputs, host_offsets


def supports(q: torch.Tensor, v: torch.Tensor) -> bool:
    """What the kernels handle: head sizes that are powers of two from 32 to 256 (whole rows live in one
    tile; at 16 the backward kernel reads out of bounds on H100 with Triton 3.6) and bf16/fp16/fp32 inputs
    (fp64 stays on the PyTorch path, which computes in fp64)."""
    sizes_ok = all(32 <= d <= 256 and d & (d - 1) == 0 for d in (q.shape[-1], v.shape[-1]))
    return sizes_ok and q.dtype in (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class _Chunks:
    """Where the chunks are: ``cu`` [N+1] token offsets; per chunk its first token and valid length;
    per sequence the global index of its first chunk."""

    cu: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    offset: torch.Tensor

    @property
    def count(self) -> int:
        return self.start.numel()


def _chunks(B: int, T: int, bounds: list[int] | None, size: int, device: torch.device) -> _Chunks:
    """The chunks of ``size`` tokens of each sequence (the last one of a sequence may be shorter): of B sequences
    of T tokens, built on the device; of packed sequences (``bounds``: their offsets as Python ints), built on the
    host and sent in one asynchronous copy. Neither reads a value from the device or waits for it."""
    if bounds is None:
        per_seq = -(-T // size)
        cu = torch.arange(B + 1, dtype=torch.int32, device=device) * T
        local = torch.arange(per_seq, dtype=torch.int32, device=device) * size
        start = (cu[:-1, None] + local[None, :]).flatten()
        length = (T - local).clamp(max=size).repeat(B)
        return _Chunks(cu, start, length, torch.arange(B, dtype=torch.int32, device=device) * per_seq)
    cu = torch.tensor(bounds, dtype=torch.long)
    lengths = cu.diff()
    counts = (lengths + size - 1) // size
    offset = torch.cumsum(counts, 0) - counts
    # The number of chunks from the ints, so that repeat_interleave need not read it from its (host) input.
    total = sum(-(-(end - first) // size) for first, end in zip(bounds[:-1], bounds[1:]))
    seq = torch.repeat_interleave(torch.arange(counts.numel()), counts, output_size=total)
    local = (torch.arange(total) - offset[seq]) * size
    parts = (cu, cu[:-1][seq] + local, (lengths[seq] - local).clamp(max=size), offset)
    table = torch.cat(parts).to(torch.int32)
    if torch.device(device).type == "cuda":
        # From pageable memory a copy to the GPU first waits for the stream (a host synchronisation); from pinned
        # memory it is queued like a kernel. The caching host allocator keeps the buffer until the copy is done.
        table = table.pin_memory().to(device, non_blocking=True)
    return _Chunks(*table.split([p.numel() for p in parts]))


def _block_v(V: int, seq_heads: int, min_programs: int = 264) -> int:
    """State columns per program of the sequential kernels: 64, or 32 when 64 would leave fewer than
    ``min_programs`` programs (one long sequence: sequences × heads is small). H100, 1 × 65536 with 64-token
    chunks: 264 (two programs per SM); with the prefill's 16-token chunks: 132 (4 × 16384 runs 1.26 ms at 64 against
    1.93 at 32, 1 × 65536 2.5 at 32 against 3.0 at 64)."""
    return 32 if V >= 32 and seq_heads * (V // 64) < min_programs else min(V, 64)


def _forward(q, k, v, g, beta, A_log, dt_bias, h0, chunks, scale, lower_bound, l2norm, sigmoid,
             want_final, want_states):
    """The forward pass for autograd: the four kernels on flattened ``[T, H, D]`` views; returns o, the final
    state, the chunk states (or None) and what backward needs."""
    T, H, K = q.shape
    V = v.shape[-1]
    dev = q.device
    cdt = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.float32
    f32 = dict(dtype=torch.float32, device=dev)
    n_seq = chunks.offset.numel()
    has_gate = A_log is not None
    G = torch.empty(T, H, K, **f32)
    beta_f = torch.empty(T, H, **f32)
    rq, rk = (torch.empty(T, H, **f32), torch.empty(T, H, **f32)) if l2norm else (G, G)
    grid = (chunks.count, H)
    prep_kernel[grid](
        q, k, g, beta, A_log if has_gate else G, dt_bias if has_gate else G, G, beta_f, rq, rk,
        chunks.start, chunks.length, float(lower_bound or 0.0), H,
        K=K, C=CHUNK, HAS_GATE=has_gate, BOUNDED=lower_bound is not None, L2NORM=l2norm, SIGMOID=sigmoid,
        num_warps=8,
    )
    W, qg, kg = (torch.empty(T, H, K, dtype=cdt, device=dev) for _ in range(3))
    U = torch.empty(T, H, V, dtype=cdt, device=dev)
    P = torch.empty(T, H, CHUNK, dtype=cdt, device=dev)
    M = torch.empty(T, H, CHUNK, **f32)
    A = torch.empty(T, H, CHUNK, **f32)
    scores_kernel[(chunks.count * 4, H)](
        q, k, G, rq, rk, P, A, chunks.start, chunks.length, scale, H,
        K=K, C=CHUNK, L2NORM=l2norm, PREC=_precision(cdt),
        num_warps=2,  # H100, 1 x 65536: 2.0 ms (4.0 at 1 warp, 3.2 at 4)
    )
    intra_kernel[grid](
        q, k, v, G, beta_f, rq, rk, W, U, M, A, qg, kg, chunks.start, chunks.length, scale, H,
        K=K, V=V, C=CHUNK, BK=min(K, V, 64), L2NORM=l2norm, PREC=_precision(cdt),
        num_warps=4,  # H100, 1 x 65536: 3.0 ms (4.1 at 8 warps)
    )
    o = torch.empty(T, H, V, dtype=v.dtype, device=dev)
    final = torch.empty(n_seq, H, K, V, **f32) if want_final else None
    h = torch.empty(chunks.count, H, K, V, dtype=torch.float32 if want_states else cdt, device=dev)
    v_new = torch.empty(T, H, V, dtype=cdt, device=dev)
    BV = _block_v(V, n_seq * H)
    state_out_kernel[(triton.cdiv(V, BV), n_seq * H)](
        W, U, P, qg, kg, G, o, h0 if h0 is not None else G, final if want_final else G, h, v_new, chunks.cu,
        chunks.offset, chunks.offset, H, 0, chunks.count,
        K=K, V=V, BV=BV, C=CHUNK, G_PER_CHUNK=False, HAS_H0=h0 is not None, STORE_HT=want_final, STORE_H=True,
        H_EVERY=1, STORE_V=True, LAUNCH_NEXT=False, STAGES=_state_stages(cdt, K), num_warps=4 if BV < 64 else 8,
        PREC=_precision(cdt),
    )
    saved = dict(G=G, beta_f=beta_f, rq=rq, rk=rk, W=W, P=P, qg=qg, kg=kg, M=M, A=A, h=h, v_new=v_new)
    return o, final, h if want_states else None, saved


# The prefill's chunk kernel asks L2 for the inputs of the chunk this many programs ahead (same head), so that they
# arrive from L2 rather than DRAM when that program starts (H100, 1 x 65536: 2.57 -> 2.43 ms; 16 to 128 ahead all
# help, 512 and more hurt).
PREFETCH_AHEAD = 64
# One sequence on CUDA: the prefill's two passes run as a pipeline over blocks of this many tokens (see _prefill).
PIPELINE_TOKENS = 8192
PIPELINE_EDGE = 2  # the first and last blocks are this many times shorter


def _prefill(q, k, v, g, beta, A_log, dt_bias, h0, B, bounds, scale, lower_bound, l2norm, sigmoid, want_final,
             want_states):
    """The forward pass without autograd (prefill, evaluation): two kernels over 16-token chunks on flattened
    ``[B·T, H, D]`` views of B sequences (or of the packed sequences at offsets ``bounds``, B = 1); returns o, the final
    state and the chunk states (or None).

    Nothing has to be kept for a backward pass, so the chunk is cut to 16 tokens: one program does all of a
    chunk's in-chunk work (:func:`prefill_chunk_kernel`: no 64×64 inverse assembled from blocks, no G, A or M
    through memory), and :func:`state_out_kernel` walks four times as many, smaller chunks.

    With many sequences × heads the chunk pass runs over everything, then the state pass. With one sequence the
    state pass has only heads × V blocks programs (128 on 132 SMs for H = 32), each bound by its chain of dependent
    steps, and leaves most of every SM idle; so the sequence is cut into blocks of PIPELINE_TOKENS, and the chunk
    pass of block b + 1 runs beside the state pass of block b, the state carried from block to block in memory.
    One stream, in the order chunk 0, state 0, chunk 1, state 1, ...: each state pass lets the next chunk pass
    launch once its own programs have started (programmatic dependent launch, ``LAUNCH_NEXT``), so they hold their
    SMs first; the chunk pass's last program waits for that state pass to end (``AFTER_STATE``), so that the next
    state pass, queued behind the chunk pass, starts from a complete state. H100, 1 × 65536: see
    benchmarks/results/kda.md (times) and kda_notes.md (how the pipeline was arrived at)."""
    T, H, K = q.shape
    V = v.shape[-1]
    dev = q.device
    cdt = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.float32
    chunks = _chunks(B, T // B, bounds, PREFILL_CHUNK, dev)
    n_seq = chunks.offset.numel()
    W, qg, kg = (torch.empty(T, H, K, dtype=cdt, device=dev) for _ in range(3))
    U = torch.empty(T, H, V, dtype=cdt, device=dev)
    P = torch.empty(T, H, PREFILL_CHUNK, dtype=cdt, device=dev)
    G_end = torch.empty(chunks.count, H, K, dtype=torch.float32, device=dev)
    o = torch.empty(T, H, V, dtype=v.dtype, device=dev)
    final = torch.empty(n_seq, H, K, V, dtype=torch.float32, device=dev) if want_final else None
    h_chunks = _chunks(B, T // B, bounds, CHUNK, dev) if want_states else chunks
    h = torch.empty(h_chunks.count, H, K, V, dtype=torch.float32, device=dev) if want_states else None
    has_gate = A_log is not None
    BV = _block_v(V, n_seq * H, min_programs=132)

    def chunk_pass(first: int, count: int, after_state: bool = False) -> None:
        prefill_chunk_kernel[(count, H)](
            q, k, v, g, beta, A_log if has_gate else G_end, dt_bias if has_gate else G_end, W, U, P, qg, kg, G_end,
            chunks.start, chunks.length, chunks.count, first, scale, float(lower_bound or 0.0), H,
            K=K, V=V, HAS_GATE=has_gate, BOUNDED=lower_bound is not None, L2NORM=l2norm, SIGMOID=sigmoid,
            PREC=_precision(cdt), PREFETCH=0 if _interpreting() else PREFETCH_AHEAD, AFTER_STATE=after_state,
            num_warps=2,  # H100, 1 x 65536: 2.4 ms (3.8 at 4 warps; capping registers to fit more programs: slower)
            launch_pdl=after_state,
        )

    def state_pass(start, end, c_begin: int, c_end: int, bv: int = BV, next_chunks: bool = False) -> None:
        """Chunks c_begin .. c_end-1 of every sequence, from the state in ``start`` (None: h0 or zeros) to ``end``."""
        state_out_kernel[(triton.cdiv(V, bv), n_seq * H)](
            W, U, P, qg, kg, G_end, o, G_end if start is None else start, G_end if end is None else end,
            h if want_states else G_end, G_end, chunks.cu, chunks.offset, h_chunks.offset, H, c_begin, c_end,
            K=K, V=V, BV=bv, C=PREFILL_CHUNK, G_PER_CHUNK=True, HAS_H0=start is not None, STORE_HT=end is not None,
            STORE_H=want_states, H_EVERY=CHUNK // PREFILL_CHUNK, STORE_V=False, LAUNCH_NEXT=next_chunks,
            STAGES=_state_stages(cdt, K, PREFILL_CHUNK), num_warps=4,  # H100: 8 warps took twice as long
            PREC=_precision(cdt),
        )

    per = PIPELINE_TOKENS // PREFILL_CHUNK
    if n_seq > 1 or chunks.count < 2 * per or not _dependent_launch(dev):
        chunk_pass(0, chunks.count)
        state_pass(h0, final, 0, chunks.count)
        return o, final, h
    # the state after each block goes to `carry` (the final state's buffer when it is wanted), read by the next
    carry = final if want_final else torch.empty(1, H, K, V, dtype=torch.float32, device=dev)
    on_gpu = dev.type == "cuda"
    edges = _block_edges(chunks.count, per)
    for c0, c1, c2 in zip(edges, edges[1:], [*edges[2:], None]):
        chunk_pass(c0, c1 - c0, after_state=on_gpu and c0 > 0)
        # beside a chunk pass as long, wider state blocks (half the programs) leave more SMs to it (H100, 1 x 65536:
        # 4.40 ms against 4.75 at 32 columns); a state pass that runs alone, or mostly, is faster narrow
        beside = c2 is not None and c2 - c1 >= c1 - c0
        state_pass(h0 if c0 == 0 else carry, carry, c0, c1, bv=min(V, 64) if beside else BV,
                   next_chunks=on_gpu and c2 is not None)
    return o, final, h


def _block_edges(n_chunks: int, per: int) -> list[int]:
    """Where the pipelined prefill's blocks of chunks begin, then n_chunks: blocks of about ``per`` chunks between
    a first and a last of per / PIPELINE_EDGE. Those two run alone (the chunk pass before any state pass, the state
    pass after the last chunk pass), so they are kept short."""
    edge = max(per // PIPELINE_EDGE, 1)
    inner = n_chunks - 2 * edge
    parts = max(round(inner / per), 1)
    return [0, *(edge + inner * i // parts for i in range(parts + 1)), n_chunks]


def _dependent_launch(dev: torch.device) -> bool:
    """Whether dev overlaps a kernel with the one before it in the stream (programmatic dependent launch: Hopper
    and later). The interpreter (CPU) runs the pipelined prefill's blocks in order, so that tests cover it."""
    return dev.type != "cuda" or torch.cuda.get_device_capability(dev)[0] >= 9


def _precision(cdt: torch.dtype) -> str:
    """How the kernels run fp32 matrix products: TF32 when the inputs are bf16/fp16 (its rounding is finer than
    theirs), three-pass TF32 (about fp32 accuracy) when the caller passed fp32. The kernels read "tf32" as "16-bit
    inputs" (see :func:`triton_common.bf16_operand` and :func:`triton_common.split_dot`)."""
    return "tf32x3" if cdt == torch.float32 else "tf32"


def _state_stages(cdt: torch.dtype, K: int, C: int = CHUNK) -> int:
    """Software-pipeline depth of the sequential kernels' chunk loop (stages > 1 prefetch the next chunks' tiles).
    64-token chunks: 3 for 16-bit inputs up to K = 128 (H100, 1 x 65536: state fwd 2.70 -> 1.77 ms, state bwd
    2.42 -> 1.56 against 2 stages; 16 x 4096: 2.14 -> 1.66, 1.69 -> 1.46); 2 where three stages would not fit in
    H100's 227 KB of shared memory (16-bit K = 256, fp32 K <= 128); none for fp32 tiles with K = 256 (two stages
    need ~300 KB). 16-token chunks (a quarter of the tiles): 4 for 16-bit K <= 128 (1 x 65536: 2.50 ms against
    2.63 at 3), else 3. None in the interpreter."""
    if _interpreting():
        return 1
    wide = cdt == torch.float32 or K > 128
    if C < CHUNK:
        return 3 if wide else 4
    if cdt == torch.float32:
        return 2 if K <= 128 else 1
    return 3 if K <= 128 else 2


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class ChunkKDAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, A_log, dt_bias, h0, bounds, scale, lower_bound, l2norm, sigmoid,
                want_final, want_states):
        B, T, H, K = q.shape
        V = v.shape[-1]
        chunks = _chunks(B, T, bounds, CHUNK, q.device)
        flat = [x.reshape(B * T, H, -1) for x in (q, k, v, g)]
        o, final, states, saved = _forward(
            *flat, beta.reshape(B * T, H), A_log, dt_bias, h0, chunks, scale, lower_bound, l2norm, sigmoid,
            want_final, want_states,
        )
        if states is not None:
            ctx.mark_non_differentiable(states)
        ctx.save_for_backward(q, k, v, g, beta, A_log, dt_bias, h0, *saved.values())
        ctx.saved_names = list(saved)
        ctx.meta = (chunks, scale, lower_bound, l2norm, sigmoid)
        return o.reshape(B, T, H, V), final, states

    @staticmethod
    def backward(ctx, do, dfinal, _dstates):
        q, k, v, g, beta, A_log, dt_bias, h0, *rest = ctx.saved_tensors
        saved = dict(zip(ctx.saved_names, rest))
        chunks, scale, lower_bound, l2norm, sigmoid = ctx.meta
        B, T, H, K = q.shape
        grads = _backward(
            q.reshape(B * T, H, K), k.reshape(B * T, H, K), v.reshape(B * T, H, -1), g.reshape(B * T, H, K),
            beta.reshape(B * T, H), A_log, dt_bias, h0, do.reshape(B * T, H, -1).contiguous(),
            # the kernels index both cotangents as dense arrays; autograd may hand over broadcast views (the
            # gradient of a sum is one element expanded: stride 0), so they are made contiguous here
            None if dfinal is None else dfinal.contiguous(), saved,
            chunks, scale, lower_bound, l2norm, sigmoid,
        )
        dq, dk, dv, dg, dbeta, dA_log, ddt_bias, dh0 = grads
        return (dq.view_as(q), dk.view_as(k), dv.view_as(v), dg.view_as(g), dbeta.view_as(beta), dA_log, ddt_bias,
                dh0, None, None, None, None, None, None, None)


def _backward(q, k, v, g, beta, A_log, dt_bias, h0, do, dfinal, saved, chunks, scale, lower_bound, l2norm,
              sigmoid):
    T, H, K = q.shape
    V = v.shape[-1]
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    cdt = saved["W"].dtype
    n_seq = chunks.offset.numel()
    has_gate = A_log is not None
    # 1. backward over chunks: dh (gradient at each chunk's end), dV', and the initial state's gradient
    dh = torch.empty(chunks.count, H, K, V, dtype=cdt, device=dev)
    dv_new = torch.empty(T, H, V, dtype=cdt, device=dev)
    dh0 = torch.empty(n_seq, H, K, V, **f32)
    BV = _block_v(V, n_seq * H)
    G = saved["G"]
    rq, rk = saved["rq"], saved["rk"]
    state_bwd_kernel[(triton.cdiv(V, BV), n_seq * H)](
        do, saved["P"], saved["qg"], saved["kg"], saved["W"], G, dfinal if dfinal is not None else G, dh, dv_new,
        dh0, chunks.cu, chunks.offset, H,
        K=K, V=V, BV=BV, C=CHUNK, HAS_DHT=dfinal is not None, STAGES=_state_stages(cdt, K),
        num_warps=4 if BV < 64 else 8, PREC=_precision(cdt),
    )
    # 2. per chunk: the gradients through the state, the output's intra-chunk part and the UT transform
    dA = torch.empty(T, H, CHUNK, **f32)
    dP = torch.empty(T, H, CHUNK, **f32)
    # grads A's share of dq goes through bf16/fp16 (cdt): it changed no error in kda_accuracy.md to two digits and
    # saves 0.24 ms at 1 x 65536; its share of dk did not (3.1e-3 -> 3.5e-3), nor can dG's, whose terms cancel
    dq_part = torch.empty(T, H, K, dtype=cdt, device=dev)
    dk_part, dG_part = (torch.empty(T, H, K, **f32) for _ in range(2))
    dG_last = torch.empty(chunks.count, H, K, **f32)
    dbeta = torch.empty_like(beta)
    dv = torch.empty_like(v)
    grid = (chunks.count, H)
    grads_kernel_a[grid](
        q, k, v, rq, rk, G, saved["beta_f"], saved["M"], saved["A"], saved["h"], saved["v_new"], do, dh,
        dv_new, dA, dP, dq_part, dk_part, dG_part, dG_last, dbeta, dv, chunks.start, chunks.length, scale, H,
        K=K, V=V, BK=min(K, 64), BV=min(V, 64), C=CHUNK, L2NORM=l2norm, SIGMOID=sigmoid, PREC=_precision(cdt),
        num_warps=8,  # H100, 1 x 65536: 8.1 ms; 12.7 at 4 warps (and 10.2-12.9 ms for other BK, BV in {32, 64})
        # H100, 1 x 65536: 8.1 ms at 3 stages, 8.5 at 2, 9.7 at 1; fp32 inputs need 289 KB of shared memory at 3
        num_stages=3 if cdt != torch.float32 else 2,
    )
    # 3. per 16-row block: the gradients through the decayed scores, finishing dq and dk
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    grads_kernel_b[(chunks.count * 4, H)](
        q, k, rq, rk, G, dA, dP, dq_part, dk_part, dG_part, dq, dk, chunks.start, chunks.length, scale, H,
        K=K, C=CHUNK, L2NORM=l2norm, PREC=_precision(cdt),
        # H100, 1 x 65536: 9.0 ms at 4 warps, 14.5 at 8 (where ptxas reports no spills); with K in two 64-channel
        # programs of 2 warps it took 7.8 ms but sent 2.1 GB of fp32 partials to a separate L2-norm kernel (1.6 ms)
        num_warps=2 if K <= 64 else 4 if K <= 128 else 8,
    )
    # 4. per chunk: the backward of the gate (reverse cumsum and activation)
    dg = torch.empty_like(g)
    dA_log_part = torch.empty(chunks.count, H, **f32) if has_gate else None
    ddt_part = torch.empty(chunks.count, H, K, **f32) if has_gate else None
    gate_bwd_kernel[grid](
        g, A_log if has_gate else G, dt_bias if has_gate else G, dG_part, dG_last, dg,
        dA_log_part if has_gate else G, ddt_part if has_gate else G, chunks.start, chunks.length,
        float(lower_bound or 0.0), H, K=K, HAS_GATE=has_gate, BOUNDED=lower_bound is not None,
        num_warps=1,  # H100, 1 x 65536: 0.92 ms (1.20 at 2 warps, 2.3 at 4)
    )
    dA_log = dA_log_part.sum(0).view_as(A_log) if has_gate else None
    ddt_bias = ddt_part.sum(0).view_as(dt_bias) if has_gate else None
    return dq, dk, dv, dg, dbeta, dA_log, ddt_bias, dh0 if h0 is not None else None


def chunk_kda_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_host: Sequence[int] | None = None,
    options: KDAOptions | None = None,
    output_chunk_states: bool = False,
) -> tuple[torch.Tensor, ...]:
    """The ``chunk_kda`` contract on Triton (same arguments and returns as :func:`kimi_linear.ops.kda.chunk_kda`)."""
    check_kda_inputs(q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_host)
    bounds = host_offsets(cu_seqlens, cu_seqlens_host)
    if not supports(q, v):
        raise ValueError(
            f"the Triton chunk kernels take head sizes that are powers of two from 32 to 256 and bf16/fp16/fp32 "
            f"inputs, got K={q.shape[-1]}, V={v.shape[-1]}, {q.dtype}; use the PyTorch path (chunk_kda_torch)"
        )
    options = options or KDAOptions()
    options.check(*q.shape[-2:])
    A_log, dt_bias, lower_bound = options.A_log, options.dt_bias, options.lower_bound
    K = q.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    if A_log is not None:
        A_log, dt_bias = A_log.float().contiguous(), dt_bias.float().contiguous()
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    leaves = (q, k, v, g, beta, A_log, dt_bias, initial_state)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in leaves):
        o, final, states = ChunkKDAFunction.apply(
            q, k, v, g, beta, A_log, dt_bias, initial_state, bounds, scale, lower_bound,
            options.qk_l2norm, options.beta_sigmoid, output_final_state, output_chunk_states,
        )
    else:
        B, T, H, _ = q.shape
        o, final, states = _prefill(
            *(x.reshape(B * T, H, -1) for x in (q, k, v, g)), beta.reshape(B * T, H), A_log, dt_bias, initial_state,
            B, bounds, scale, lower_bound, options.qk_l2norm, options.beta_sigmoid,
            output_final_state, output_chunk_states,
        )
        o = o.view(B, T, H, -1)
    result = (o, final)
    if output_chunk_states:
        result += (states,)
    return result
