"""KDA decode-step benchmark: our fused Triton step (eager and in a CUDA graph) vs fla-core's, at the model's
head shape (H = 32, K = V = 128), with the fp32 state bandwidth next to the device's measured copy bandwidth.

    python benchmarks/kda_decode.py [--sweep] [--conv-norm] [--results-dir benchmarks/results]

``run(results_dir)`` is the entry point for other benchmark drivers: it times the table and returns its rows.
``--sweep`` also times every (BV, num_warps) launch configuration (how the kernel's defaults were chosen);
``--conv-norm`` times the Triton short conv and norms against the PyTorch versions at model size (eager, and
replayed from a CUDA graph where the call can be captured; kda_decode_conv_norm.md was measured while the PyTorch
conv still synchronised with the host, which it no longer does).
Each state row is read once and written once per step: bytes = 2 * N * H * K * V * 4. Modes: ``eager`` is the
time per call of back-to-back Python calls (host overhead included; at small N the 4 MiB-per-sequence state then
stays in L2); ``graph`` replays one captured step with the L2 cache flushed before each replay (median).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import fla_version
from kimi_linear.ops.kda import KDAOptions, fused_recurrent_kda
from kimi_linear.ops.kda.triton_recurrent import fused_recurrent_kda_triton

H, K, V = 32, 128, 128
SIZES = (1, 16, 64, 256)
CONFIGS = ((8, 1), (8, 2), (16, 2), (16, 4), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8))


def median_us(fn: Callable[[], object]) -> float:
    """Median device time of fn in microseconds. do_bench flushes the L2 cache before every repetition, so the
    state comes from device memory as in a model step; the flush also hides fn's host-side launch cost."""
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def eager_us(fn: Callable[[], object], n: int = 200) -> float:
    """Time per call of n back-to-back calls: what a Python loop of steps costs, host overhead included."""
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / n


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """Capture one call of fn (after warm-up calls on a side stream) and return its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth_tbps(n_bytes: int = 1 << 30) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written."""
    src = torch.randn(n_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n_bytes / (median_us(lambda: dst.copy_(src)) * 1e-6) / 1e12


def decode_inputs(N: int, seed: int = 0) -> dict:
    """Inputs of one released-model decode step: raw gate, beta logits, bf16 activations, a pool with gaps."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)

    pool = rand(2 * N, H, K, V)
    return dict(
        q=rand(N, 1, H, K, dtype=torch.bfloat16), k=rand(N, 1, H, K, dtype=torch.bfloat16),
        v=rand(N, 1, H, V, dtype=torch.bfloat16), g=rand(N, 1, H, K), beta=rand(N, 1, H, dtype=torch.bfloat16),
        A_log=rand(H) * 0.5, dt_bias=rand(H * K), state_pool=pool,
        state_indices=torch.randperm(2 * N, device="cuda", generator=gen)[:N].to(torch.int32),
    )


def ours(x: dict, config: tuple[int, int] | None = None) -> Callable[[], torch.Tensor]:
    if config is not None:
        return lambda: fused_recurrent_kda_triton(**_core(x), options=_options(x), config=config)
    return lambda: fused_recurrent_kda(**_core(x), options=_options(x))


def fla_step(x: dict) -> Callable[[], torch.Tensor]:
    """fla-core's decode step on the same pool: in-place state update through ssm_state_indices."""
    from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd

    return lambda: fused_recurrent_kda_fwd(
        x["q"], x["k"], x["v"], x["g"], x["beta"], A_log=x["A_log"], dt_bias=x["dt_bias"],
        initial_state=x["state_pool"], inplace_final_state=True, ssm_state_indices=x["state_indices"],
        use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
    )[0]


def _core(x: dict) -> dict:
    return {name: x[name] for name in ("q", "k", "v", "g", "beta", "state_pool", "state_indices")}


def _options(x: dict) -> KDAOptions:
    """The released model's decode step: gate, q/k L2 norm and beta sigmoid in the kernel."""
    return KDAOptions(A_log=x["A_log"], dt_bias=x["dt_bias"], qk_l2norm=True, beta_sigmoid=True)


def run(results_dir: str | Path | None = "benchmarks/results", sizes: tuple[int, ...] = SIZES) -> list[dict]:
    """Time the decode step for each N (ours eager and graphed; fla eager and graphed when importable).

    Returns one dict per (implementation, N); writes kda_decode.json / .md under results_dir unless it is None.
    """
    copy_bw = copy_bandwidth_tbps()
    have_fla = fla_version() is not None
    rows = []
    for N in sizes:
        x = decode_inputs(N)
        state_bytes = 2 * N * H * K * V * 4
        impls = {"ours": ours(x)}
        if have_fla:
            impls["fla"] = fla_step(x)
        for name, fn in impls.items():
            for mode, t in (("eager", eager_us(fn)), ("graph", median_us(graphed(fn)))):
                tbps = state_bytes / (t * 1e-6) / 1e12
                rows.append(dict(op="kda_decode", impl=name, mode=mode, N=N, H=H, K=K, V=V, time_us=round(t, 2),
                                 state_TBps=round(tbps, 3), copy_TBps=round(copy_bw, 3),
                                 frac_of_copy=round(tbps / copy_bw, 3)))
        if have_fla:
            rows[-1]["rel_err_vs_ours"] = rows[-2]["rel_err_vs_ours"] = _agreement(N)
        del x, impls
    if results_dir is not None:
        _write(Path(results_dir), "kda_decode", _meta(copy_bw), rows, _decode_table(rows))
    return rows


def _agreement(N: int) -> float:
    """‖o_fla − o_ours‖ / ‖o_ours‖ for one step from identical pools."""
    a, b = decode_inputs(N, seed=1), decode_inputs(N, seed=1)
    o_ours = ours(a)().float()
    o_fla = fla_step(b)().float()
    return round(((o_fla - o_ours).norm() / o_ours.norm()).item(), 6)


def sweep(sizes: tuple[int, ...] = SIZES) -> list[dict]:
    """Graph-replay time of every launch configuration at each N, with the compiled kernel's registers and
    spills (read from Triton's kernel cache: the entries a configuration's first call added)."""
    from kimi_linear.ops.kda.triton_recurrent import _kda_decode_kernel

    _kda_decode_kernel.device_caches.clear()  # recompile (from Triton's disk cache) so every config is seen
    resources = {}
    rows = []
    for N in sizes:
        x = decode_inputs(N)
        for config in CONFIGS:
            cache = _kernel_cache(_kda_decode_kernel)
            before = set(cache)
            t = median_us(graphed(ours(x, config)))
            for key in set(cache) - before:
                resources[config] = (cache[key].n_regs, cache[key].n_spills)
            regs, spills = resources.get(config, (None, None))
            rows.append(dict(op="kda_decode_sweep", N=N, BV=config[0], num_warps=config[1], time_us=round(t, 2),
                             state_TBps=round(2 * N * H * K * V * 4 / (t * 1e-6) / 1e12, 3), regs=regs,
                             spills=spills))
    return rows


def _kernel_cache(kernel) -> dict:
    """Triton's compiled-kernel cache of a JIT function on the current device (key -> CompiledKernel)."""
    return kernel.device_caches[torch.cuda.current_device()][0]


def conv_norm(copy_bw: float, sizes: tuple[int, ...] = (1, 64, 256), prefill_tokens: int = 16384) -> list[dict]:
    """PyTorch vs Triton short conv (3 x 4096 channels, kernel 4, SiLU, carried state) and norms (RMSNorm over
    hidden 2304; gated RMSNorm over 32 heads x 128) for decode steps of N sequences and a packed prefill.
    ``floor_us``: the fewest bytes each piece must move, at the measured copy rate copy_bw (TB/s)."""
    cases = [(f"decode N={n}", n, 1, None) for n in sizes]
    offsets = torch.tensor([0, prefill_tokens // 8, prefill_tokens // 2, prefill_tokens], device="cuda")
    cases.append((f"prefill {prefill_tokens} tok, 3 seqs", 1, prefill_tokens, offsets))
    rows = [row for case in cases for row in _conv_norm_case(*case)]
    for row in rows:
        row["floor_us"] = round(row["bytes"] / (copy_bw * 1e12) * 1e6, 2)
    return rows


def _conv_norm_case(label: str, B: int, T: int, cu: torch.Tensor | None) -> list[dict]:
    from kimi_linear.ops.conv import causal_conv1d
    from kimi_linear.ops.norm import gated_rms_norm, rms_norm
    from kimi_linear.ops.triton_conv import causal_conv1d_triton
    from kimi_linear.ops.triton_norm import gated_rms_norm_triton, rms_norm_triton

    D, hidden, W = 3 * 4096, 2304, 4
    N = B if cu is None else cu.numel() - 1

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    x, w, state = rand(B, T, D), rand(D, W), rand(N, D, W - 1)
    h, wh = rand(B, T, hidden), rand(hidden)
    o, gate, wo = rand(B, T, 32, 128), rand(B, T, 32, 128), rand(128)
    conv_args = dict(initial_state=state, output_final_state=True, cu_seqlens=cu)
    pieces = {  # name -> (torch call, triton call, bytes moved at least)
        "short conv": (partial(causal_conv1d, x, w, **conv_args), partial(causal_conv1d_triton, x, w, **conv_args),
                       x.nbytes * 2 + state.nbytes * 2),
        "rms_norm": (partial(rms_norm, h, wh, 1e-5), partial(rms_norm_triton, h, wh, 1e-5), h.nbytes * 2),
        "gated_rms_norm": (partial(gated_rms_norm, o, gate, wo, 1e-5),
                           partial(gated_rms_norm_triton, o, gate, wo, 1e-5), o.nbytes * 3),
    }
    rows = []
    for piece, (torch_fn, triton_fn, n_bytes) in pieces.items():
        ref, out = torch_fn(), triton_fn()
        ref, out = (ref[0], out[0]) if isinstance(ref, tuple) else (ref, out)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        row = dict(op="conv_norm", case=label, piece=piece, bytes=n_bytes, rel_err=round(err, 6))
        for impl, fn in (("torch", torch_fn), ("triton", triton_fn)):
            row[f"{impl}_us"] = round(eager_us(fn), 2)
            row[f"{impl}_graph_us"] = _graph_us(fn)
        rows.append(row)
    return rows


def _graph_us(fn: Callable[[], object]) -> float | None:
    """Graph-replay time of fn, or None when fn synchronises with the host and so cannot be captured (checked
    first through PyTorch's sync debug mode, so that no broken capture is attempted)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError:
        return None
    finally:
        torch.cuda.set_sync_debug_mode("default")
    try:
        return round(median_us(graphed(fn)), 2)
    except RuntimeError:  # a sync the debug mode does not see
        torch.cuda.synchronize()
        return None


def _meta(copy_bw: float) -> dict:
    props = torch.cuda.get_device_properties(0)
    return dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                triton=triton.__version__, fla=fla_version(), copy_TBps=round(copy_bw, 3),
                command="python " + " ".join(sys.argv) if sys.argv and sys.argv[0] else "run()")


def _decode_table(rows: list[dict]) -> str:
    lines = [f"Device copy bandwidth (read + write): {rows[0]['copy_TBps']:.2f} TB/s. H = {H}, K = V = {K}, bf16 "
             "activations, fp32 state; released gate, q/k L2 norm and beta sigmoid in-kernel. eager: time per call "
             "of back-to-back Python calls; graph: one captured step replayed, L2 flushed before each replay.", "",
             "| impl | mode | N | step (µs) | state TB/s | of copy BW | rel err vs ours |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['mode']} | {r['N']} | {r['time_us']:.1f} | {r['state_TBps']:.2f} | "
                     f"{r['frac_of_copy']:.0%} | {r.get('rel_err_vs_ours', '')} |")
    return "\n".join(lines)


def _sweep_table(rows: list[dict]) -> str:
    lines = ["| N | BV | warps | graph step (µs) | state TB/s | regs | spills |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['N']} | {r['BV']} | {r['num_warps']} | {r['time_us']:.1f} | {r['state_TBps']:.2f} | "
              f"{r['regs']} | {r['spills']} |" for r in rows]
    return "\n".join(lines)


def _conv_norm_table(rows: list[dict]) -> str:
    lines = ["bf16. eager: back-to-back calls; graph: one captured call replayed, L2 flushed before each replay; "
             "'host sync': the call synchronises with the host, so it cannot be captured. floor: fewest bytes at the "
             "measured copy rate. rel err: Triton vs PyTorch output.", "",
             "| case | piece | torch eager (µs) | triton eager (µs) | torch graph (µs) | triton graph (µs) | "
             "floor (µs) | rel err |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tg = "host sync" if r["torch_graph_us"] is None else f"{r['torch_graph_us']:.1f}"
        lines.append(f"| {r['case']} | {r['piece']} | {r['torch_us']:.1f} | {r['triton_us']:.1f} | {tg} | "
                     f"{r['triton_graph_us']:.1f} | {r['floor_us']:.1f} | {r['rel_err']:.1e} |")
    return "\n".join(lines)


def _write(results_dir: Path, name: str, meta: dict, rows: list[dict], table: str) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    header = [f"# {name}", "", f"Device: {meta['device']} ({meta['sms']} SMs); torch {meta['torch']}, "
              f"triton {meta['triton']}, fla-core {meta['fla']}", f"Command: `{meta['command']}`", ""]
    (results_dir / f"{name}.md").write_text("\n".join([*header, table]) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", default="benchmarks/results")
    parser.add_argument("--sweep", action="store_true", help="also time every launch configuration")
    parser.add_argument("--conv-norm", action="store_true", help="also time the Triton conv and norms vs PyTorch")
    args = parser.parse_args()
    rows = run(args.results_dir)
    print(_decode_table(rows))
    extras = []
    if args.sweep:
        extras.append(("kda_decode_sweep", sweep(), _sweep_table))
    if args.conv_norm:
        extras.append(("kda_decode_conv_norm", conv_norm(rows[0]["copy_TBps"]), _conv_norm_table))
    for name, extra_rows, table in extras:
        _write(Path(args.results_dir), name, _meta(rows[0]["copy_TBps"]), extra_rows, table(extra_rows))
        print(f"\n{name}\n{table(extra_rows)}")


if __name__ == "__main__":
    main()
