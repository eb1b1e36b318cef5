"""Paged MLA decode benchmark: the Triton kernel (in a CUDA graph) and the PyTorch path at the released model's
absorbed shape (H = 32 heads, C = 512 latent + R = 64 shared key part, bf16 cache, 64-token blocks), with the
latent bandwidth next to the device's measured copy bandwidth.

    python benchmarks/mla_decode.py [--sweep] [--results-dir benchmarks/results]

Every sequence has the full context; its blocks are a random permutation of the pool. A step reads each cached
latent once: bytes = N * context * (C + R) * 2 (q, the output and the block table are negligible). ``kernel``:
one captured call (the split heuristic's count, or each count with ``--sweep``) replayed with the L2 cache
flushed before each replay (median); ``torch``: the PyTorch path, eager. Writes ``mla_decode.json`` / ``.md``
under the results directory. Without CUDA it runs a tiny shape once, interpreted, as a smoke check, and writes
nothing: GPU numbers need a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before any kernel module is imported: triton.jit reads it then
    os.environ.setdefault("TRITON_INTERPRET", "1")

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import copy_bandwidth_tbps, environment, graphed, markdown_table, write_results
from kimi_linear.ops.mla_decode import paged_mla_decode_torch
from kimi_linear.ops.triton_mla_decode import default_num_splits, paged_mla_decode_triton

H, C, R, BLOCK_SIZE = 32, 512, 64, 64
SCALE = (128 + 64) ** -0.5  # qk_head_dim of the released model
SIZES = (1, 8, 64)
CONTEXTS = (4096, 32768)
SWEEP_SPLITS = (1, 2, 4, 8, 16, 32, 64, 128)


def decode_inputs(N: int, context: int, *, H: int = H, C: int = C, R: int = R, block_size: int = BLOCK_SIZE,
                  device: str = "cuda", seed: int = 0) -> dict:
    """One decode step's arguments: every sequence ``context`` tokens long, blocks permuted over the pool."""
    gen = torch.Generator(device=device).manual_seed(seed)
    per_seq = -(-context // block_size)
    num_blocks = N * per_seq

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16)

    table = torch.randperm(num_blocks, generator=gen, device=device).view(N, per_seq).to(torch.int32)
    return dict(q=randn(N, H, C + R), cache=randn(num_blocks, block_size, C + R), block_table=table,
                seq_lens=torch.full((N,), context, dtype=torch.int32, device=device), scale=SCALE, value_dim=C)


def median_us(fn: Callable[[], object]) -> float:
    """Median device time of fn (do_bench flushes the L2 cache before every repetition)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def run(results_dir: str | Path | None = "benchmarks/results", sweep: bool = False) -> list[dict]:
    """Time the kernel and the PyTorch path for every (N, context); returns the rows and writes
    ``mla_decode.json`` / ``.md`` under results_dir unless it is None. CUDA only."""
    copy_bw = copy_bandwidth_tbps()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for N in SIZES:
        for context in CONTEXTS:
            x = decode_inputs(N, context)
            n_bytes = N * context * (C + R) * x["cache"].element_size()
            expected = paged_mla_decode_torch(**x)
            heuristic = default_num_splits(N, x["block_table"].shape[1] * BLOCK_SIZE, sms)
            splits = sorted({heuristic, *SWEEP_SPLITS}) if sweep else [heuristic]
            timings = {"kernel": {s: _kernel_us(x, s) for s in splits}, "torch": {None: median_us(
                lambda x=x: paged_mla_decode_torch(**x))}}
            for impl, by_split in timings.items():
                for num_splits, t in by_split.items():
                    tbps = n_bytes / (t * 1e-6) / 1e12
                    row = dict(op="mla_decode", impl=impl, N=N, context=context, H=H, C=C, R=R,
                               block_size=BLOCK_SIZE, num_splits=num_splits, time_us=round(t, 2),
                               latent_TBps=round(tbps, 3), copy_TBps=round(copy_bw, 3),
                               frac_of_copy=round(tbps / copy_bw, 3))
                    if impl == "kernel":
                        out = paged_mla_decode_triton(**x, num_splits=num_splits)
                        row.update(heuristic=num_splits == heuristic,
                                   rel_err_vs_torch=round(rel_err(out, expected), 6))
                    rows.append(row)
            del x, expected
            torch.cuda.empty_cache()
    if results_dir is not None:
        meta = {**environment(), "sms": sms, "copy_TBps": round(copy_bw, 3)}
        write_results("mla_decode", meta, rows, _table(rows), Path(results_dir))
    return rows


def _kernel_us(x: dict, num_splits: int) -> float:
    return median_us(graphed(lambda: paged_mla_decode_triton(**x, num_splits=num_splits)))


def _table(rows: list[dict]) -> str:
    note = (f"Device copy bandwidth (read + write): {rows[0]['copy_TBps']:.2f} TB/s. H = {H}, C = {C}, R = {R}, bf16 "
            f"cache in {BLOCK_SIZE}-token blocks; latent TB/s = N * context * (C + R) * 2 bytes / time. kernel: one "
            "captured call replayed, L2 flushed before each replay; torch: the PyTorch path, eager. heuristic: the "
            "split count num_splits=None picks.")
    columns = ["impl", "N", "context", "num_splits", "heuristic", "time_us", "latent_TBps", "frac_of_copy",
               "rel_err_vs_torch"]
    return note + "\n\n" + markdown_table(rows, columns)


def smoke() -> None:
    """Without CUDA: one tiny step through the interpreted kernel and the PyTorch path, compared."""
    x = decode_inputs(3, 70, H=4, C=64, R=16, block_size=16, device="cpu")
    x["seq_lens"] = torch.tensor([70, 0, 33], dtype=torch.int32)
    kernel = paged_mla_decode_triton(**x, num_splits=2)
    expected = paged_mla_decode_torch(**x)
    err = rel_err(kernel, expected)
    print(f"smoke check (CPU, Triton interpreter): N = 3, H = 4, C = 64, R = 16, block size 16, lengths 70/0/33: "
          f"kernel vs PyTorch path rel err {err:.2e}")
    if not (err < 1e-2 and torch.all(kernel[1] == 0)):
        raise SystemExit("smoke check failed")
    print("GPU numbers need a GPU: nothing timed, no results written.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", default="benchmarks/results")
    parser.add_argument("--sweep", action="store_true", help=f"also time num_splits in {SWEEP_SPLITS}")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        smoke()
        return
    rows = run(args.results_dir, sweep=args.sweep)
    print(_table(rows))


if __name__ == "__main__":
    main()
