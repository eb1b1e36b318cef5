"""Chunk-KDA benchmark: our Triton op vs fla-core's ``chunk_kda`` vs causal SDPA (flash), bf16, H = 32, K = V = 128.

    python benchmarks/kda.py [--shapes 16x4096,4x16384,1x65536] [--results-dir benchmarks/results] [--no-decode]

Both KDA ops run the model's hot path: raw gate, q/k L2 norm and beta sigmoid inside the op. ``ours`` uses the
bounded gate (``lower_bound=-5``, what fla's ``safe_gate=True`` runs); ``ours_released`` the released model's
unbounded gate, whose diagonal blocks need exact pairwise exponentials. Times are ``triton.testing.do_bench``
medians. fwd runs under ``torch.no_grad`` (prefill: our op then takes its two-kernel path over 16-token chunks);
fwd+bwd is one forward and one backward with all grads (our autograd op, 64-token chunks).
Roofline per shape: bytes = one read of q, k, v, raw gate (bf16), beta and one write of o (fwd; fwd+bwd adds
reading do and writing dq, dk, dv, dg); FLOPs = the paper's 6Td² + 3TCd + TC² per head for the forward and
three times that for fwd+bwd. At the end it runs ``benchmarks/kda_decode.py``'s ``run`` (decode step) if present.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, fla_version, markdown_table, write_results
from kimi_linear.ops.kda import KDAOptions
from kimi_linear.ops.kda.triton_chunk import chunk_kda_triton

H, D, CHUNK = 32, 128, 64
SHAPES = ((16, 4096), (4, 16384), (1, 65536))
MATMUL_TFLOPS, COPY_TBPS = 730.0, 3.0  # H100 ceilings measured with the fla numbers (kda.md §4)


def inputs(B: int, T: int, seed: int = 0) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)

    return dict(q=rnd(B, T, H, D), k=rnd(B, T, H, D), v=rnd(B, T, H, D), g=rnd(B, T, H, D), beta=rnd(B, T, H),
                A_log=torch.rand(H, generator=gen, device="cuda").log(), dt_bias=rnd(H * D, dtype=torch.float32))


def fused_options(x: dict, lower_bound: float | None) -> tuple[dict, KDAOptions]:
    """x without A_log and dt_bias, and the options that fuse the gate (with x's A_log and dt_bias), the q/k L2 norm
    and the beta sigmoid into the op."""
    rest = {n: t for n, t in x.items() if n not in ("A_log", "dt_bias")}
    return rest, KDAOptions(A_log=x["A_log"], dt_bias=x["dt_bias"], lower_bound=lower_bound, qk_l2norm=True,
                            beta_sigmoid=True)


def ours(x: dict, lower_bound: float | None = -5.0, **extra):
    """Our chunk KDA with gate, q/k L2 norm and beta sigmoid fused; x: q, k, v, g, beta, A_log, dt_bias (and
    optionally initial_state); extra: further chunk_kda arguments."""
    rest, options = fused_options(x, lower_bound)
    return chunk_kda_triton(**rest, options=options, **extra)


def fla(x: dict, lower_bound: float | None = -5.0, **extra):
    """fla-core's chunk_kda with the same fusions (its safe_gate is our bounded gate)."""
    from fla.ops.kda import chunk_kda

    return chunk_kda(**x, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                     safe_gate=lower_bound is not None, lower_bound=lower_bound, **extra)


def sdpa(x: dict):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return (torch.nn.functional.scaled_dot_product_attention(
            x["q"].transpose(1, 2), x["k"].transpose(1, 2), x["v"].transpose(1, 2), is_causal=True),)


def time_fwd(fn, x: dict) -> float:
    with torch.no_grad():
        return do_bench(lambda: fn(x), warmup=50, rep=200, return_mode="median")


def time_fwd_bwd(fn, x: dict) -> float:
    leaves = {n: t.detach().requires_grad_() for n, t in x.items()}
    do = torch.randn_like(fn(leaves)[0])

    def step():
        for t in leaves.values():
            t.grad = None
        fn(leaves)[0].backward(do)

    return do_bench(step, warmup=50, rep=200, return_mode="median")


def roofline(B: int, T: int) -> dict:
    tok = B * T * H
    fwd_bytes = tok * (4 * D * 2 + 2 + D * 2)
    bwd_bytes = fwd_bytes + tok * (D * 2 + 4 * D * 2 + 2)
    flops = tok * (6 * D * D + 3 * CHUNK * D + CHUNK * CHUNK)
    return dict(fwd_bytes=fwd_bytes, fwd_flops=flops, fwd_bwd_bytes=bwd_bytes, fwd_bwd_flops=3 * flops,
                fwd_floor_ms=max(fwd_bytes / COPY_TBPS / 1e9, flops / MATMUL_TFLOPS / 1e9),
                fwd_bwd_floor_ms=max(bwd_bytes / COPY_TBPS / 1e9, 3 * flops / MATMUL_TFLOPS / 1e9))


def agreement(x: dict) -> float:
    """‖o_ours − o_fla‖ / ‖o_fla‖ on the same inputs (bounded gate)."""
    with torch.no_grad():
        a, b = ours(x)[0].float(), fla(x)[0].float()
    return ((a - b).norm() / b.norm()).item()


def run(shapes=SHAPES, results_dir: str | Path | None = "benchmarks/results",
        names: tuple[str, ...] = ("ours", "ours_released", "fla", "sdpa"), append: bool = False) -> list[dict]:
    have_fla = fla_version() is not None
    every = {"ours": ours, "ours_released": lambda x: ours(x, None), "sdpa": sdpa, "fla": fla}
    impls = {n: every[n] for n in names if n != "fla" or have_fla}
    have_fla = "fla" in impls
    rows = []
    for B, T in shapes:
        x = inputs(B, T)
        row = dict(B=B, T=T, H=H, K=D, V=D, **roofline(B, T))
        for name, fn in impls.items():
            row[f"{name}_fwd_ms"] = round(time_fwd(fn, x), 3)
            row[f"{name}_fwd_bwd_ms"] = round(time_fwd_bwd(fn, x), 3)
            torch.cuda.empty_cache()
        if have_fla:
            row["rel_err_vs_fla"] = agreement(x)
            row["fwd_ratio_vs_fla"] = round(row["ours_fwd_ms"] / row["fla_fwd_ms"], 3)
            row["fwd_bwd_ratio_vs_fla"] = round(row["ours_fwd_bwd_ms"] / row["fla_fwd_bwd_ms"], 3)
        rows.append(row)
        print(table(rows[-1:]), flush=True)
        if results_dir is not None:  # after every shape: a run cut short still leaves its rows
            write(Path(results_dir), rows, append)
        del x
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    names = [n for n in ("ours", "ours_released", "fla", "sdpa") if f"{n}_fwd_ms" in rows[0]]
    head = "| B × T | " + " | ".join(f"{n} fwd | {n} fwd+bwd" for n in names) + \
        " | ours/fla fwd | ours/fla fwd+bwd | floor fwd | floor fwd+bwd |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [f"{r[f'{n}_fwd_ms']:.2f} ms | {r[f'{n}_fwd_bwd_ms']:.2f} ms" for n in names]
        ratios = [f"{r.get(key, float('nan')):.2f}" for key in ("fwd_ratio_vs_fla", "fwd_bwd_ratio_vs_fla")]
        floors = [f"{r['fwd_floor_ms']:.2f} ms", f"{r['fwd_bwd_floor_ms']:.2f} ms"]
        lines.append(f"| {r['B']} × {r['T']} | " + " | ".join(cells + ratios + floors) + " |")
    return "\n".join(lines)


def write(results_dir: Path, rows: list[dict], append: bool = False) -> None:
    """Write kda.json / kda.md. With ``append``, rows of other shapes already there stay, if they were measured
    on the same device with the same versions (one run per shape, when a whole run would take too long)."""
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                fla=fla_version(), command="python " + " ".join(sys.argv),
                ceilings=dict(matmul_TFLOPs=MATMUL_TFLOPS, copy_TBps=COPY_TBPS))
    old = results_dir / "kda.json"
    if append and old.exists():
        before = json.loads(old.read_text())
        same = all(before["meta"].get(key) == meta[key] for key in ("device", "torch", "triton", "fla"))
        if not same:
            raise SystemExit(f"--append: {old} was measured with {before['meta']}, this run is {meta}")
        shapes = {(r["B"], r["T"]) for r in rows}
        rows = [r for r in before["rows"] if (r["B"], r["T"]) not in shapes] + rows
        previous = before["meta"]["command"]
        meta["command"] = "; ".join(dict.fromkeys([*previous.split("; "), meta["command"]]))
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "kda.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    header = [f"# chunk KDA, bf16, H = {H}, K = V = {D}", "",
              f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, fla-core {meta['fla']}",
              f"Command: `{meta['command']}`", "",
              "Times: do_bench medians. ours = bounded gate (lower_bound -5, as fla safe_gate); ours_released = "
              "the released unbounded gate. Floors: bytes / 3.0 TB/s vs FLOPs / 730 TFLOP/s, the larger.", ""]
    (results_dir / "kda.md").write_text("\n".join(header) + table(rows) + "\n")


def _fwd_bwd(x: dict, lower_bound: float | None, do: torch.Tensor) -> None:
    for t in x.values():
        t.grad = None  # as in training: no accumulation into earlier gradients
    ours(x, lower_bound)[0].backward(do)


@torch.no_grad()
def _prefill(x: dict, lower_bound: float | None) -> None:
    ours(x, lower_bound)


def profile(shapes, results_dir: str | Path | None) -> list[dict]:
    """Device time of each kernel in one forward+backward of ours and in one forward without autograd (prefill),
    bounded and released gates, from torch.profiler; written to ``kda_kernels.json`` / ``.md``. Kernels that
    overlap (the pipelined prefill of one sequence) sum to more than the step takes: kda.md (written by
    :func:`run`) has the step times."""
    rows = []
    for B, T in shapes:
        for gate, lower_bound in (("bounded", -5.0), ("released", None)):
            x = {n: t.requires_grad_() for n, t in inputs(B, T).items()}
            do = torch.randn_like(ours(x, lower_bound)[0])
            steps = (("fwd+bwd", partial(_fwd_bwd, x, lower_bound, do)), ("prefill", partial(_prefill, x, lower_bound)))
            for name, step in steps:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    step()
                    torch.cuda.synchronize()
                events = sorted((e for e in prof.key_averages() if e.device_time_total > 0),
                                key=lambda e: -e.device_time_total)
                head = dict(shape=f"{B}x{T}", gate=gate, run=name)
                for e in events:
                    rows.append(head | dict(kernel=e.key[:60], calls=e.count, ms=round(e.device_time_total / 1e3, 3)))
                rows.append(head | dict(kernel="total", calls=sum(e.count for e in events),
                                        ms=round(sum(e.device_time_total for e in events) / 1e3, 3)))

            del x
    table = markdown_table(rows, ["shape", "gate", "run", "kernel", "calls", "ms"])
    print(table)
    if results_dir is not None:
        write_results("kda_kernels", environment(), rows, table, Path(results_dir))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(f"{b}x{t}" for b, t in SHAPES))
    parser.add_argument("--results-dir", default="benchmarks/results")
    parser.add_argument("--no-decode", action="store_true", help="skip benchmarks/kda_decode.py")
    parser.add_argument("--profile", action="store_true",
                        help="only the per-kernel device times of ours (one fwd+bwd, one prefill forward) at each "
                             "shape (kda_kernels.*)")
    parser.add_argument("--impls", default="ours,ours_released,fla,sdpa", help="which implementations to time")
    parser.add_argument("--append", action="store_true",
                        help="keep the other shapes' rows of an earlier run (same device and versions)")
    args = parser.parse_args()
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    if args.profile:
        profile(shapes, args.results_dir)
        return
    rows = run(shapes, args.results_dir, tuple(args.impls.split(",")), args.append)
    print(table(rows))
    if not args.no_decode:
        try:
            from benchmarks import kda_decode
        except ImportError:
            return
        kda_decode.run(args.results_dir)
        print((Path(args.results_dir) / "kda_decode.md").read_text())


if __name__ == "__main__":
    main()
