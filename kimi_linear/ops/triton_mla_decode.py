"""Paged MLA decode attention (absorbed form) as Triton kernels, forward only.

Same contract as :func:`kimi_linear.ops.mla_decode.paged_mla_decode`. Decode reads every cached latent of
every sequence once per step, so the kernel is built to stream the cache at memory bandwidth:

- One program per (sequence, split) holds *all* H heads of its sequence (a ``[H_pad, C + R]`` query tile, heads
  padded to a power of two >= 16 so ``tl.dot`` applies). Every latent tile ``[BN, C + R]`` is loaded once and
  serves all heads, as the key (all C + R values) and as the value (its first C values): the multi-query
  structure of absorbed MLA is where the bandwidth comes from. (More than 32 heads, which Kimi Linear does not
  have, run as head groups of 32, each reading the latents: the accumulator has to fit in registers.)
- The scores are two dots, over the value part (C) and the rest (R), each padded to a power of two with masks:
  C + R is 576 in the released model (512 + 64), which is no power of two.
- Online softmax in the exp2 domain with an fp32 ``[H_pad, C]`` accumulator; the dots run in the cache's dtype
  (q is rounded to it; the probabilities are rounded to it before the value dot), with fp32 accumulation; an
  fp32 cache uses IEEE fp32 dots, not TF32.
- Split-K ("flash decoding"): a sequence's tiles are divided among ``num_splits`` programs, each writing a
  partial (normalised output, log-sum-exp) to fp32 scratch; a second kernel merges them per (sequence, head).
  A split with no tokens writes (0, -inf) and weighs nothing in the merge. With one split the first kernel
  writes the output itself.
- Paging: each row of a tile finds its block through the block table, so the tile size BN need not match the
  block size (a tile may span several blocks or a part of one). Rows past the sequence's length are masked
  loads: neither their block-table entry nor their latent is read, so garbage ids and NaN latents there are
  harmless, and a padding row (length 0) reads nothing at all.

The launch reads no tensor values on the host and allocates only the output and the scratch, so it can be
captured in a CUDA graph. The split count is picked from shapes alone (:func:`default_num_splits`).
Without a GPU the kernels run in Triton's interpreter (tests), and :func:`compile_for_target` builds them for a
GPU architecture offline, to check registers, spills and shared memory. Launch parameters have not been timed
on a GPU yet (see ``benchmarks/mla_decode.py``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kimi_linear.ops.backend import needs_grad
from kimi_linear.ops.mla_decode import CACHE_DTYPES, check_paged_mla_inputs

LOG2E = math.log2(math.e)
# Split-K heuristic: aim for two programs per SM, give each split at least this many tokens of the table's
# capacity (a split's partial costs 4 * H * C bytes of scratch, written then read), and cap the count.
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 128
NOMINAL_SMS = 132  # H100 / H200; used when no CUDA device can be asked
MAX_HEADS_PER_PROGRAM = 32  # the fp32 [heads, C] accumulator lives in registers


@triton.jit
def _operand(x, dtype, UPCAST: tl.constexpr):
    """x rounded to the dot's input dtype; with UPCAST held in fp32 after the rounding (same values), for Triton's
    interpreter, whose bf16 dot multiplies the raw 16-bit patterns as integers."""
    x = x.to(dtype)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _attend_tile(
    m_i, l_i, acc, q_v, q_r, t, end, p_table, cache, qk_scale, s_cb, s_ct, s_cd, s_bb,
    DV: tl.constexpr, DR: tl.constexpr, BLOCK_SIZE: tl.constexpr, BV: tl.constexpr, BR: tl.constexpr,
    BN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Online-softmax update of (running max m_i [HP], running sum l_i [HP], accumulator acc [HP, BV]) with the
    tokens [t, min(t + BN, end)) of one sequence (log2 domain: qk_scale includes log2(e)). The tile holds at
    least one valid token, so the new max is finite from the first tile on."""
    o_t = t + tl.arange(0, BN)
    t_ok = o_t < end
    o_v = tl.arange(0, BV)
    o_r = tl.arange(0, BR)
    block = tl.load(p_table + (o_t // BLOCK_SIZE) * s_bb, mask=t_ok, other=0).to(tl.int64)
    p_row = cache + block * s_cb + (o_t % BLOCK_SIZE).to(tl.int64) * s_ct
    # The value part is loaded once: key (with the rest) for the scores, then value for the output.
    k_v = tl.load(p_row[:, None] + o_v[None, :] * s_cd, mask=t_ok[:, None] & (o_v < DV)[None, :], other=0.0)
    dtype = k_v.dtype
    k_v = _operand(k_v, dtype, UPCAST)
    s = tl.dot(q_v, tl.trans(k_v), input_precision=PRECISION)
    if DR > 0:
        k_r = tl.load(p_row[:, None] + (DV + o_r)[None, :] * s_cd, mask=t_ok[:, None] & (o_r < DR)[None, :],
                      other=0.0)
        s += tl.dot(q_r, tl.trans(_operand(k_r, dtype, UPCAST)), input_precision=PRECISION)
    s = tl.where(t_ok[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(_operand(p, dtype, UPCAST), k_v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _mla_decode_kernel(
    q, cache, block_table, seq_lens, out, part_o, part_lse,
    qk_scale, capacity, num_splits,
    s_qn, s_qh, s_qd, s_cb, s_ct, s_cd, s_bn, s_bb,
    H: tl.constexpr, DV: tl.constexpr, DR: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HP: tl.constexpr, BV: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
    SINGLE: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program (n, split, head group): sequence n's tokens of this split, for heads [group * HP, + HP) (all of
    them when H <= HP, the usual case).

    The split owns whole BN-token tiles: the sequence's ``ceil(len / BN)`` tiles are divided into runs of
    ``ceil(tiles / num_splits)``, so the partition depends only on this sequence's length and the split count
    (batch invariance). ``SINGLE``: one split, write the output; else write the partial of this split to
    ``part_o [N, S, H, DV]`` and ``part_lse [N, S, H]`` (log2 domain).
    """
    i_n = tl.program_id(0)
    i_s = tl.program_id(1)
    o_h = tl.program_id(2) * HP + tl.arange(0, HP)
    o_v = tl.arange(0, BV)
    o_r = tl.arange(0, BR)
    h_ok = o_h < H
    v_ok = o_v < DV
    r_ok = o_r < DR

    seq_len = tl.minimum(tl.maximum(tl.load(seq_lens + i_n).to(tl.int32), 0), capacity)
    n_tiles = tl.cdiv(seq_len, BN)
    per_split = tl.cdiv(n_tiles, num_splits)
    start = i_s * per_split * BN
    end = tl.minimum(start + per_split * BN, seq_len)

    p_q = q + i_n.to(tl.int64) * s_qn + o_h[:, None] * s_qh
    dtype = cache.dtype.element_ty
    q_v = _operand(tl.load(p_q + o_v[None, :] * s_qd, mask=h_ok[:, None] & v_ok[None, :], other=0.0), dtype, UPCAST)
    q_r = _operand(tl.load(p_q + (DV + o_r)[None, :] * s_qd, mask=h_ok[:, None] & r_ok[None, :], other=0.0), dtype,
                   UPCAST)

    m_i = tl.full([HP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([HP], dtype=tl.float32)
    acc = tl.zeros([HP, BV], dtype=tl.float32)
    p_table = block_table + i_n.to(tl.int64) * s_bn
    if STAGES > 1:  # compiled: a pipelined loop prefetches the next tiles
        for t in tl.range(start, end, BN, num_stages=STAGES):
            m_i, l_i, acc = _attend_tile(
                m_i, l_i, acc, q_v, q_r, t, end, p_table, cache, qk_scale, s_cb, s_ct, s_cd, s_bb,
                DV, DR, BLOCK_SIZE, BV, BR, BN, PRECISION, UPCAST)
    else:  # the interpreter (numpy >= 2.3) cannot take a run-time trip count in range()
        t = start
        while t < end:
            m_i, l_i, acc = _attend_tile(
                m_i, l_i, acc, q_v, q_r, t, end, p_table, cache, qk_scale, s_cb, s_ct, s_cd, s_bb,
                DV, DR, BLOCK_SIZE, BV, BR, BN, PRECISION, UPCAST)
            t += BN

    # An empty split (or padding row) has l_i = 0: output 0 and log-sum-exp -inf, never 0 / 0.
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    out_mask = h_ok[:, None] & v_ok[None, :]
    if SINGLE:
        tl.store(out + (i_n * H + o_h)[:, None] * DV + o_v[None, :], o.to(out.dtype.element_ty), mask=out_mask)
    else:
        row = (i_n * num_splits + i_s).to(tl.int64) * H + o_h
        tl.store(part_o + row[:, None] * DV + o_v[None, :], o, mask=out_mask)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_lse + row, lse, mask=h_ok)


@triton.jit
def _mla_merge_kernel(
    part_o, part_lse, out, num_splits,
    H: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, SP: tl.constexpr,
):
    """Program (n, h): out = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse). All splits empty (a
    padding row): every weight is 0 and the output 0."""
    i_n = tl.program_id(0)
    i_h = tl.program_id(1)
    o_s = tl.arange(0, SP)
    o_v = tl.arange(0, BV)
    v_ok = o_v < DV
    base = i_n.to(tl.int64) * num_splits * H + i_h
    lse = tl.load(part_lse + base + o_s * H, mask=o_s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2(lse - m), 0)
    acc = tl.zeros([BV], dtype=tl.float32)
    s = 0
    while s < num_splits:  # (while: the interpreter cannot range() over a run-time count)
        w = tl.exp2(tl.load(part_lse + base + s * H) - m)
        acc += w * tl.load(part_o + (base + s * H) * DV + o_v, mask=v_ok, other=0.0)
        s += 1
    o = acc / tl.where(total > 0, total, 1.0)
    tl.store(out + (i_n * H + i_h) * DV + o_v, o.to(out.dtype.element_ty), mask=v_ok)


def supports(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether the kernel takes this call: a bf16/fp16/fp32 cache, a float query, and no gradient asked for
    (the kernel is forward-only; the PyTorch path is differentiable)."""
    return cache.dtype in CACHE_DTYPES and q.is_floating_point() and not needs_grad(q, cache)


def default_num_splits(num_seqs: int, capacity: int, num_sms: int = NOMINAL_SMS, head_groups: int = 1) -> int:
    """Split count from shapes alone (lengths live on the device): enough (sequence, split, head group) programs
    for about two per SM, each split covering at least ``MIN_SPLIT_TOKENS`` of the block table's capacity
    ``max_blocks * block_size``, at most ``MAX_SPLITS``; 1 for short tables or large batches.

    The capacity is an upper bound of the lengths: an engine whose table is much wider than its sequences gets
    splits with nothing to do (cheap, but not free); it knows its lengths on the host and can pass
    ``num_splits`` itself.
    """
    by_occupancy = -(-2 * num_sms // max(num_seqs * head_groups, 1))
    by_length = capacity // MIN_SPLIT_TOKENS
    return max(1, min(by_occupancy, by_length, MAX_SPLITS))


@dataclass(frozen=True)
class _Launch:
    """Compile-time parameters of the attention kernel and its launch shape."""

    constexprs: dict
    num_warps: int
    head_groups: int


def _launch(H: int, value_dim: int, rest_dim: int, block_size: int, cache_dtype: torch.dtype, single: bool,
            block_n: int | None, interpreting: bool) -> _Launch:
    """Tile sizes, warps and pipeline depth. Chosen from offline sm_90 compiles (Triton 3.6, ``compile_for_target``;
    not yet timed on a GPU): at H = 32, C = 512, R = 64 in bf16, 32-token tiles with 8 warps and 3 stages take
    241 registers and 85 KiB of shared memory with no spills (64-token tiles spill; so do 4 warps). The fp32
    ``[HP, C]`` accumulator is the bulk of the registers, hence at most 32 heads a program: more heads run as
    head groups, each reading the latents again. An fp32 cache (IEEE dots) takes 16-token tiles."""
    hp = min(triton.next_power_of_2(max(H, 16)), MAX_HEADS_PER_PROGRAM)
    bv = triton.next_power_of_2(max(value_dim, 16))
    if hp * bv < 8192:
        bn, num_warps, stages = 32, 4, 2
    elif cache_dtype == torch.float32:
        bn, num_warps, stages = 16, 8, 2
    else:
        bn, num_warps, stages = 32, 8, 3
    if block_n is not None:
        if block_n < 16 or block_n & (block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16 (tl.dot needs 16), got {block_n}")
        bn = block_n
    # Triton's interpreter multiplies bf16 operands of tl.dot as raw 16-bit integers: there the operands are
    # rounded to bf16 and then held in fp32 (same values, exact fp32 products).
    upcast = interpreting and cache_dtype == torch.bfloat16
    constexprs = dict(
        H=H, DV=value_dim, DR=rest_dim, BLOCK_SIZE=block_size, HP=hp, BV=bv,
        BR=triton.next_power_of_2(max(rest_dim, 16)), BN=bn, SINGLE=single,
        # 16-bit operands ignore the precision; fp32 ones get exact products, not TF32.
        PRECISION="ieee" if cache_dtype == torch.float32 or upcast else "tf32",
        STAGES=1 if interpreting else stages, UPCAST=upcast,
    )
    return _Launch(constexprs, num_warps, -(-H // hp))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_SM_COUNTS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return NOMINAL_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:  # a host-side property query, no synchronisation
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


@torch.no_grad()
def paged_mla_decode_triton(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                            seq_lens: torch.Tensor, *, scale: float, value_dim: int, num_splits: int | None = None,
                            block_n: int | None = None) -> torch.Tensor:
    """Kernel version of :func:`kimi_linear.ops.mla_decode.paged_mla_decode` (same arguments, any strides).

    ``block_n`` overrides the token tile BN (a power of two >= 16), for tests and tuning. Block ids are not
    checked against ``num_blocks`` on the device (that would need a host sync): an out-of-range id in a *used*
    entry reads out of bounds. Allocates the output and, with more than one split, fp32 scratch of
    ``N * num_splits * H * (value_dim + 1)`` values.
    """
    check_paged_mla_inputs(q, cache, block_table, seq_lens, value_dim, num_splits)
    if not supports(q, cache):
        raise ValueError(f"the kernel takes a bf16/fp16/fp32 cache and no gradients, got cache {cache.dtype}, "
                         f"q.requires_grad={q.requires_grad}, cache.requires_grad={cache.requires_grad}")
    N, H, D = q.shape
    block_size = cache.shape[1]
    capacity = block_table.shape[1] * block_size
    probe = _launch(H, value_dim, D - value_dim, block_size, cache.dtype, True, block_n, _interpreting())
    splits = num_splits or default_num_splits(N, capacity, _sm_count(q.device), probe.head_groups)
    launch = _launch(H, value_dim, D - value_dim, block_size, cache.dtype, splits == 1, block_n, _interpreting())
    out = torch.empty(N, H, value_dim, dtype=q.dtype, device=q.device)
    if N == 0:
        return out
    if splits == 1:  # the kernel writes the output itself; the scratch arguments are never touched
        part_o = part_lse = out
    else:
        part_o = torch.empty(N, splits, H, value_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(N, splits, H, dtype=torch.float32, device=q.device)
    _mla_decode_kernel[(N, splits, launch.head_groups)](
        q, cache, block_table, seq_lens, out, part_o, part_lse,
        scale * LOG2E, capacity, splits,
        *q.stride(), *cache.stride(), *block_table.stride(),
        **launch.constexprs, num_warps=launch.num_warps,
    )
    if splits > 1:
        _mla_merge_kernel[(N, H)](
            part_o, part_lse, out, splits,
            H=H, DV=value_dim, BV=triton.next_power_of_2(value_dim), SP=triton.next_power_of_2(splits),
            num_warps=4,
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Offline compilation: check the compiled kernel (it compiles; registers, spills, shared memory) on a machine
# without a GPU, through Triton's bundled ptxas.

_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def compile_for_target(H: int, value_dim: int, rest_dim: int, block_size: int, *,
                       cache_dtype: torch.dtype = torch.bfloat16, q_dtype: torch.dtype = torch.bfloat16,
                       single: bool = False, block_n: int | None = None, arch: int = 90):
    """Compile the attention kernel as a launch with contiguous inputs would (int32 tables) for CUDA compute
    capability ``arch`` (90: Hopper) without a GPU. Returns Triton's compiled kernel (``.asm["cubin"]``,
    ``.metadata.shared``); see :func:`compiled_resources`. Must run without ``TRITON_INTERPRET``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launch = _launch(H, value_dim, rest_dim, block_size, cache_dtype, single, block_n, interpreting=False)
    q_ty, c_ty = _TRITON_TYPES[q_dtype], _TRITON_TYPES[cache_dtype]
    pointers = dict(q=f"*{q_ty}", cache=f"*{c_ty}", block_table="*i32", seq_lens="*i32", out=f"*{q_ty}",
                    part_o="*fp32", part_lse="*fp32")
    unit_strides = ("s_qd", "s_cd", "s_bb")  # Triton specialises integer arguments equal to 1
    signature = {**pointers, "qk_scale": "fp32", "capacity": "i32", "num_splits": "i32",
                 **{name: "constexpr" if name in unit_strides else "i32"
                    for name in ("s_qn", "s_qh", "s_qd", "s_cb", "s_ct", "s_cd", "s_bn", "s_bb")},
                 **dict.fromkeys(launch.constexprs, "constexpr")}
    constants = {**launch.constexprs, **dict.fromkeys(unit_strides, 1)}
    aligned = {(name,): [["tt.divisibility", 16]] for name in pointers}
    source = ASTSource(_mla_decode_kernel, signature, constants, aligned)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=launch.num_warps, num_stages=launch.constexprs["STAGES"]))


def compiled_resources(kernel) -> dict:
    """Registers and stack bytes per thread (spills land on the stack) and shared memory of a compiled kernel, read
    from its cubin with the ``cuobjdump`` that ships with Triton (registers and stack are None without it)."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    usage = dict(registers=None, stack_bytes=None, shared_bytes=kernel.metadata.shared)
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return usage
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        text = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if found:
        usage.update(registers=int(found.group(1)), stack_bytes=int(found.group(2)))
    return usage
