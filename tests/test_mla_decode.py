"""Paged absorbed-MLA decode: the PyTorch path and the Triton kernel (interpreted on the CPU) against an fp64
dense oracle built by plain per-sequence concatenation; never-read memory, batch invariance, input checks and
the backend switch. The model-shape test runs only with CUDA."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton

from kimi_linear.ops.backend import BACKEND_ENV
from kimi_linear.ops.mla_decode import paged_mla_decode, paged_mla_decode_torch
from kimi_linear.ops.triton_mla_decode import (
    MAX_SPLITS,
    _mla_decode_kernel,
    default_num_splits,
    paged_mla_decode_triton,
)

# Small-shape tests run interpreted on the CPU, compiled on a GPU machine.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = {"torch": paged_mla_decode_torch, "triton": paged_mla_decode_triton}
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}  # relative error vs the fp64 oracle
GARBAGE = (-1, 2**31 - 1)  # block-table entries past the used blocks: never read


def reference(q, cache, block_table, seq_lens, scale, value_dim):
    """fp64 oracle: each sequence's tokens concatenated block by block, then a dense softmax attention."""
    N, H, _ = q.shape
    block_size = cache.shape[1]
    out = torch.zeros(N, H, value_dim, dtype=torch.float64)
    for n in range(N):
        length = int(seq_lens[n])
        if length <= 0:
            continue
        blocks = [cache[int(block_table[n, j])].cpu() for j in range(math.ceil(length / block_size))]
        kv = torch.cat(blocks)[:length].double()
        probs = torch.softmax(q[n].cpu().double() @ kv.T * scale, dim=-1)
        out[n] = probs @ kv[:, :value_dim]
    return out


def make_case(lens, H=4, C=64, R=16, block_size=8, dtype=torch.float32, q_dtype=None, spare_blocks=3,
              extra_columns=1, poison=False, index_dtype=torch.int32, seed=0):
    """Random inputs for sequences of lengths ``lens``: blocks handed out in a random permutation of the pool.

    poison: unused blocks and positions past each length hold NaN, and table entries past the used blocks hold
    -1 or 2**31 - 1; otherwise those entries point at real (other sequences' or spare) blocks, so reading them
    would change the result rather than produce NaN."""
    gen = torch.Generator().manual_seed(seed)
    D = C + R
    used = [math.ceil(max(length, 0) / block_size) for length in lens]
    num_blocks = sum(used) + spare_blocks
    max_blocks = max(used, default=0) + extra_columns
    cache = torch.randn(num_blocks, block_size, D, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen)
    if poison:
        fill = torch.tensor(GARBAGE * max_blocks)[:max_blocks]
        table = fill.repeat(len(lens), 1)
        valid = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    else:
        table = torch.randint(0, num_blocks, (len(lens), max_blocks), generator=gen)
    taken = 0
    for n, (length, count) in enumerate(zip(lens, used)):
        ids = perm[taken:taken + count]
        taken += count
        table[n, :count] = ids
        if poison:
            rows = torch.arange(count * block_size) < length
            valid[ids] = rows.view(count, block_size)
    if poison:
        cache[~valid] = float("nan")
    q = torch.randn(len(lens), H, D, generator=gen)
    return dict(q=q.to(DEVICE, q_dtype or dtype), cache=cache.to(DEVICE, dtype),
                block_table=table.to(DEVICE, index_dtype), seq_lens=torch.tensor(lens, device=DEVICE),
                scale=1.5 * D**-0.5, value_dim=C)


def rel_err(out, ref):
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def check(impl, case, **kwargs):
    ref = reference(**case)
    out = IMPLS[impl](**case, **kwargs)
    N, H, _ = case["q"].shape
    assert out.shape == (N, H, case["value_dim"]) and out.dtype == case["q"].dtype
    assert torch.isfinite(out).all()
    padding = case["seq_lens"] <= 0
    assert torch.all(out[padding] == 0), "padding rows output zeros"
    assert rel_err(out, ref) < TOL[case["cache"].dtype], (impl, kwargs, rel_err(out, ref))
    return out


def boundary_lens(block_size):
    """Odd and long, padding, one token, exactly two blocks, one past a block boundary."""
    return [67, 0, 1, 2 * block_size, block_size + 1]


def test_interpreter_is_active_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("compiled kernels on a GPU machine")
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(_mla_decode_kernel, InterpretedFunction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [4, 8, 16])
def test_torch_path_matches_oracle(block_size, dtype):
    check("torch", make_case(boundary_lens(block_size), block_size=block_size, dtype=dtype, seed=block_size))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [4, 8, 16])
def test_triton_matches_oracle(block_size, dtype):
    """Split counts: none, a few, more than the longest sequence has tiles (empty splits), and the heuristic."""
    case = make_case(boundary_lens(block_size), block_size=block_size, dtype=dtype, seed=block_size)
    for num_splits in (1, 3, 16, None):
        check("triton", case, num_splits=num_splits)


@pytest.mark.parametrize("block_size, block_n", [(4, 16), (16, 16), (32, 16), (12, 16), (8, 32)])
def test_triton_tiles_across_and_inside_blocks(block_size, block_n):
    """Token tiles spanning several blocks, exactly one, part of one, and a block size that is neither."""
    case = make_case([45, 7, 0, 2 * block_size], H=3, C=32, R=16, block_size=block_size, seed=block_n + block_size)
    for num_splits in (1, 2):
        check("triton", case, num_splits=num_splits, block_n=block_n)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_never_read_memory(impl, index_dtype):
    """NaN in every unused block and past every length, -1 / 2**31 - 1 in unused table entries (a padding row's
    whole row among them): the output stays finite and matches the oracle."""
    lens = [33, 0, 1, 16, 17]
    case = make_case(lens, block_size=8, poison=True, extra_columns=3, index_dtype=index_dtype, seed=7)
    assert torch.isnan(case["cache"]).any() and (case["block_table"] == -1).any()
    opts = [dict(num_splits=s) for s in (1, 4, 9)] if impl == "triton" else [{}]
    for kwargs in opts:
        check(impl, case, **kwargs)
    poisoned_bf16 = make_case(lens, block_size=8, dtype=torch.bfloat16, poison=True, index_dtype=index_dtype)
    check(impl, poisoned_bf16, **opts[-1])


@pytest.mark.parametrize("impl", list(IMPLS))
def test_empty_table_and_empty_batch(impl):
    """A block table with no columns (every row padding: zeros) and a batch of no rows."""
    case = make_case([5, 0], H=2, C=32, R=16, block_size=4)
    out = IMPLS[impl](**{**case, "block_table": case["block_table"][:, :0]})
    assert out.shape == (2, 2, 32) and torch.all(out == 0)
    empty = {**case, "q": case["q"][:0], "block_table": case["block_table"][:0], "seq_lens": case["seq_lens"][:0]}
    assert IMPLS[impl](**empty).shape == (0, 2, 32)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_triton_batch_invariance(num_splits):
    """A row's output is bit-identical alone, in a batch, and with a wider (garbage-padded) table row."""
    case = make_case([40, 0, 1, 17, 64], block_size=8, extra_columns=2, poison=True, seed=3)
    batch = paged_mla_decode_triton(**case, num_splits=num_splits)
    for n in range(len(case["seq_lens"])):
        row = {**case, "q": case["q"][n:n + 1], "block_table": case["block_table"][n:n + 1],
               "seq_lens": case["seq_lens"][n:n + 1]}
        assert torch.equal(paged_mla_decode_triton(**row, num_splits=num_splits), batch[n:n + 1])
        wide = torch.cat([row["block_table"], torch.full((1, 5), -1, dtype=torch.int32, device=DEVICE)], dim=1)
        assert torch.equal(paged_mla_decode_triton(**{**row, "block_table": wide}, num_splits=num_splits),
                           batch[n:n + 1])


def test_torch_path_batch_invariance():
    """The PyTorch path runs batched matmuls whose kernels may depend on the batch size: equal to rounding."""
    case = make_case([40, 0, 1, 17, 64], block_size=8, extra_columns=2, poison=True, seed=3)
    batch = paged_mla_decode_torch(**case)
    for n in range(len(case["seq_lens"])):
        row = {**case, "q": case["q"][n:n + 1], "block_table": case["block_table"][n:n + 1],
               "seq_lens": case["seq_lens"][n:n + 1]}
        torch.testing.assert_close(paged_mla_decode_torch(**row), batch[n:n + 1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_dims_that_are_not_powers_of_two(impl):
    """H = 3, C = 48, R = 8 (masked padding of every tile dim); and value_dim = C + R (no key-only part)."""
    case = make_case([29, 5, 0], H=3, C=48, R=8, block_size=8, seed=11)
    kwargs = dict(num_splits=2) if impl == "triton" else {}
    check(impl, case, **kwargs)
    check(impl, {**case, "value_dim": 56}, **kwargs)


def test_triton_head_groups():
    """More heads than one program holds (32): two head groups, the second with a single real head."""
    case = make_case([23, 0, 8], H=33, C=32, R=16, block_size=8, seed=12)
    for num_splits in (1, 2):
        check("triton", case, num_splits=num_splits)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_mixed_dtypes_and_strided_inputs(impl):
    """fp32 q over a bf16 cache (output fp32), fp16 throughout, and strided views: q a slice of a wider
    projection, the cache one half of an interleaved pool, the table a column slice, int64 lengths."""
    lens = [21, 0, 9]
    case = make_case(lens, H=2, C=32, R=16, block_size=4, dtype=torch.bfloat16, q_dtype=torch.float32, seed=5)
    check(impl, case)
    check(impl, make_case(lens, H=2, C=32, R=16, block_size=4, dtype=torch.float16, seed=6))

    base = make_case(lens, H=2, C=32, R=16, block_size=4, seed=8)
    N, H, D = base["q"].shape
    wide_q = torch.randn(N, H, D + 8, device=DEVICE)
    wide_q[..., :D] = base["q"]
    num_blocks, block_size, _ = base["cache"].shape
    pool = torch.randn(num_blocks, 2, block_size, D, device=DEVICE)  # two layers' blocks interleaved
    pool[:, 1] = base["cache"]
    table = torch.zeros(N, base["block_table"].shape[1] + 2, dtype=torch.int32, device=DEVICE)
    table[:, 1:-1] = base["block_table"]
    strided = {**base, "q": wide_q[..., :D], "cache": pool[:, 1], "block_table": table[:, 1:-1],
               "seq_lens": base["seq_lens"].long()}
    assert not (strided["q"].is_contiguous() or strided["cache"].is_contiguous()
                or strided["block_table"].is_contiguous())
    check(impl, strided)


def test_public_function_dispatch(monkeypatch):
    """Both backends through the public function agree; a call that needs gradients takes the differentiable
    PyTorch path even when the kernel is forced, and its gradients stay finite through a padding row."""
    case = make_case([19, 0, 6], H=2, C=32, R=16, block_size=4, poison=True, seed=9)
    outs = {}
    for choice in ("torch", "triton"):
        monkeypatch.setenv(BACKEND_ENV, choice)
        outs[choice] = paged_mla_decode(**case, num_splits=2)
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-5, atol=1e-5)

    monkeypatch.setenv(BACKEND_ENV, "triton")
    q = case["q"].clone().requires_grad_()
    cache = case["cache"].clone().requires_grad_()
    out = paged_mla_decode(**{**case, "q": q, "cache": cache})
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(cache.grad).all()
    assert torch.all(q.grad[1] == 0)


def bad_inputs():
    case = make_case([5, 3], H=2, C=32, R=16, block_size=4)
    N, H, D = case["q"].shape
    return [
        ({"q": case["q"][0]}, "q must be a float tensor"),
        ({"q": case["q"].long()}, "q must be a float tensor"),
        ({"q": torch.randn(N, H, D + 1, device=DEVICE)}, "must match"),
        ({"cache": case["cache"].double()}, "cache must be"),
        ({"cache": case["cache"][0]}, "cache must be"),
        ({"cache": case["cache"][:0]}, "at least one block"),
        ({"block_table": case["block_table"].float()}, "block_table must be"),
        ({"block_table": case["block_table"][:1]}, "block_table must be"),
        ({"seq_lens": case["seq_lens"][:1]}, "seq_lens must be"),
        ({"seq_lens": case["seq_lens"].float()}, "seq_lens must be"),
        ({"value_dim": 0}, "value_dim must be"),
        ({"value_dim": D + 1}, "value_dim must be"),
        ({"num_splits": 0}, "num_splits must be"),
        ({"num_splits": 2.0}, "num_splits must be"),
    ], case


@pytest.mark.parametrize("fn", [paged_mla_decode, paged_mla_decode_triton])
def test_rejects_bad_inputs(fn):
    cases, case = bad_inputs()
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            fn(**{**case, **change})
    with pytest.raises(ValueError, match="block_n"):
        paged_mla_decode_triton(**case, block_n=24)


PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton without its bundled CUDA toolchain")
def test_kernel_compiles_for_hopper_without_spills():
    """What the interpreter cannot see: the compiled kernel at the model's shape (bf16, split and single-split
    variants) builds for sm_90 without register spills and within an SM's shared memory; a tiny fp32 shape and
    the odd-sized one build too. Offline, through Triton's bundled ptxas (no GPU needed), in a subprocess
    without TRITON_INTERPRET."""
    script = textwrap.dedent("""
        import json, torch
        from kimi_linear.ops.triton_mla_decode import compile_for_target, compiled_resources
        model = dict(H=32, value_dim=512, rest_dim=64, block_size=64)
        cases = [model, dict(model, single=True), dict(model, H=16, q_dtype=torch.float32),
                 dict(H=4, value_dim=64, rest_dim=16, block_size=8, cache_dtype=torch.float32,
                      q_dtype=torch.float32),
                 dict(H=3, value_dim=48, rest_dim=8, block_size=12, cache_dtype=torch.float16)]
        print(json.dumps([compiled_resources(compile_for_target(**kw)) for kw in cases]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    usage = json.loads(done.stdout.strip().splitlines()[-1])
    for case in usage[:3]:
        assert case["shared_bytes"] <= 227 * 1024, usage
        assert case["stack_bytes"] in (0, None), usage


def test_default_num_splits():
    assert default_num_splits(8, 256) == 1  # short table
    assert default_num_splits(1024, 1 << 20) == 1  # enough sequences to fill the GPU
    assert default_num_splits(1, 1 << 20) == MAX_SPLITS
    assert default_num_splits(8, 32768) == 33  # about two programs per SM on 132 SMs
    assert all(1 <= default_num_splits(n, c) <= MAX_SPLITS for n in (1, 3, 64, 500) for c in (16, 4096, 65536))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="model-shape kernel test needs CUDA")
def test_gpu_model_shape_against_torch_path():
    """H = 32, C = 512, R = 64, bf16, block size 64, lengths up to 5000: the compiled kernel against the PyTorch
    path (heuristic and explicit split counts), with no host synchronisation and replayed from a CUDA graph."""
    lens = [5000, 1, 0, 4097, 64, 2500, 333, 4999]
    case = make_case(lens, H=32, C=512, R=64, block_size=64, dtype=torch.bfloat16, spare_blocks=50,
                     extra_columns=4, poison=True, seed=1)
    expected = paged_mla_decode_torch(**{**case, "q": case["q"].float()})
    for num_splits in (None, 1, 7, 64):
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = paged_mla_decode_triton(**case, num_splits=num_splits)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(out).all() and torch.all(out[2] == 0)
        assert ((out.float() - expected).norm() / expected.norm()).item() < 1e-2
    graph = torch.cuda.CUDAGraph()
    paged_mla_decode_triton(**case)
    with torch.cuda.graph(graph):
        captured = paged_mla_decode_triton(**case)
    graph.replay()
    torch.testing.assert_close(captured, paged_mla_decode_triton(**case), rtol=0, atol=0)
