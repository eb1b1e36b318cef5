"""Chunk KDA accuracy against fp64: ours vs fla-core 0.6.0 (if installed), bf16 inputs, fused gate / norm / beta.

    python benchmarks/kda_accuracy.py

The reference is our PyTorch chunk path run in fp64 on the same bf16 values (it matches the naive recurrence to
fp64 rounding: tests/test_kda_chunk.py). Errors are ||x - ref|| / ||ref|| for the output, the final state and
the gradients of a fixed random linear functional of both with respect to every input (``ours_prefill``: our
forward without autograd, o and the final state only). The last case is the one
that separates kernels: gates near their lower bound over 64K tokens, where the gate gradients are sums whose
terms cancel. Prints a table; writes kda_accuracy.json / .md to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import kda
from benchmarks.common import environment, fla_version, markdown_table, write_results
from kimi_linear.ops.kda import chunk_kda_torch

D = kda.D  # head size of the speed benchmark
# name, B, T, H, lower_bound, dt_bias (None: random)
CASES = [
    ("released gate, 2 x 4096", 2, 4096, 4, None, None),
    ("bounded gate, 2 x 4096", 2, 4096, 4, -5.0, None),
    ("bounded, near the bound, 1 x 65536", 1, 65536, 1, -5.0, 6.0),
]
RESULTS = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dA_log", "ddt_bias", "dinitial_state"]


def case_inputs(B: int, T: int, H: int, dt_bias: float | None, seed: int = 0) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device="cuda") * scale

    x = dict(q=rnd(B, T, H, D), k=rnd(B, T, H, D), v=rnd(B, T, H, D), g=rnd(B, T, H, D, scale=2.0), beta=rnd(B, T, H))
    x = {n: t.bfloat16() for n, t in x.items()}
    x["A_log"] = torch.rand(H, generator=gen, device="cuda") * 2 - 1
    x["dt_bias"] = rnd(H * D) if dt_bias is None else torch.full((H * D,), dt_bias, device="cuda")
    x["initial_state"] = rnd(B, H, D, D)
    return x


def reference(x: dict, lower_bound: float | None, **extra):
    """The PyTorch chunk path in fp64 on the same values, with the fusions of :func:`benchmarks.kda.ours`."""
    rest, options = kda.fused_options({n: t.double() for n, t in x.items()}, lower_bound)
    return chunk_kda_torch(**rest, options=options, **extra)


def outputs_and_grads(fn, x: dict, lower_bound: float | None) -> dict:
    """o, the final state and the gradients of ``sum(o * do) + sum(final * dh)`` (do, dh fixed) w.r.t. every input."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    o, final = fn(leaves, lower_bound, output_final_state=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    do = torch.randn(o.shape, generator=gen, device="cuda").bfloat16()
    dh = torch.randn(final.shape, generator=gen, device="cuda")
    loss = (o * do.to(o.dtype)).sum() + (final * dh.to(final.dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"o": o.detach(), "final_state": final.detach()} | {f"d{n}": g for n, g in zip(leaves, grads)}


def outputs(fn, x: dict, lower_bound: float | None) -> dict:
    """o and the final state without autograd (our prefill path)."""
    with torch.no_grad():
        o, final = fn(x, lower_bound, output_final_state=True)
    return {"o": o, "final_state": final}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def keep_earlier(results_dir: Path, meta: dict, rows: list[dict]) -> tuple[dict, list[dict]]:
    """Add the rows of the implementations this run left out from the kda_accuracy.json already in results_dir,
    if it was measured on the same device with the same versions (fla's errors need no re-run when only ours
    changed: its code and the inputs are fixed); the commands of both runs are recorded."""
    old = results_dir / "kda_accuracy.json"
    if not old.exists():
        return meta, rows
    before = json.loads(old.read_text())
    keys = ("device", "torch", "triton", "fla-core")
    if any(before["meta"].get(key) != meta.get(key) for key in keys):
        raise SystemExit(f"--append: {old} was measured with {before['meta']}, this run is {meta}")
    ran = {r["impl"] for r in rows}
    cases = [c[0] for c in CASES]
    merged = sorted([r for r in before["rows"] if r["impl"] not in ran] + rows,
                    key=lambda r: (cases.index(r["case"]), r["impl"] != "ours"))
    command = "; ".join(dict.fromkeys([*before["meta"]["command"].split("; "), meta["command"]]))
    return meta | {"command": command}, merged


def run(results_dir: Path | None, wanted: tuple[str, ...] = ("ours", "ours_prefill", "fla"),
        append: bool = False) -> list[dict]:
    """``ours_prefill``: our forward without autograd (16-token chunks; no gradients, so those cells read "-")."""
    meta = environment() | {"fla-core": fla_version()}
    available = {"ours": kda.ours, "ours_prefill": kda.ours} | ({"fla": kda.fla} if meta["fla-core"] else {})
    impls = {n: fn for n, fn in available.items() if n in wanted}
    rows, shown = [], []
    for name, B, T, H, lower_bound, dt_bias in CASES:
        x = case_inputs(B, T, H, dt_bias)
        ref = outputs_and_grads(reference, x, lower_bound)
        for impl, fn in impls.items():
            got = (outputs if impl.endswith("_prefill") else outputs_and_grads)(fn, x, lower_bound)
            rows.append({"case": name, "impl": impl} |
                        {r: f"{rel_err(got[r], ref[r]):.1e}" if r in got else "-" for r in RESULTS})
            print(rows[-1], flush=True)
        del ref
        shown_meta, shown = keep_earlier(results_dir, meta, rows) if append and results_dir else (meta, rows)
        table = markdown_table(shown, ["case", "impl", *RESULTS])
        if results_dir is not None:  # after every case: a run cut short still leaves its rows
            write_results("kda_accuracy", shown_meta, shown, table, results_dir)
    print(table)
    return shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--impls", default="ours,ours_prefill,fla", help="which implementations to check")
    parser.add_argument("--append", action="store_true",
                        help="keep the other implementations' rows of an earlier run (same device and versions)")
    args = parser.parse_args()
    run(args.results_dir, tuple(args.impls.split(",")), args.append)


if __name__ == "__main__":
    main()
