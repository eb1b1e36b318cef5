"""Shared pieces of the benchmarks: device ceilings, environment record, result files."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    """Device and software versions, and the exact command, for the results file."""
    import triton

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def copy_bandwidth_tbps(n_bytes: int = 1 << 30) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written."""
    from triton.testing import do_bench

    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * n_bytes / ms / 1e9


def matmul_tflops(n: int = 8192) -> float:
    """bf16 matmul rate on random data."""
    from triton.testing import do_bench

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return 2 * n**3 / ms / 1e9


def fla_version() -> str | None:
    """fla-core's version if it is installed (the peer the KDA benchmarks compare against), else None."""
    try:
        import fla
    except ImportError:
        return None
    return getattr(fla, "__version__", "unknown")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, meta: dict, rows: list[dict], table: str, results_dir: Path = RESULTS) -> None:
    """``{name}.json`` (meta + rows) and ``{name}.md`` (meta + table) under ``results_dir``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    (results_dir / f"{name}.md").write_text(f"# {name}\n\n{header}\n\n{table}\n")


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


def median_seconds(fn: Callable[[], object], warmup: int = 1, iters: int = 5) -> float:
    """Median wall time of ``fn`` after ``warmup`` calls, synchronising CUDA around each call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_model(config, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A model of ``config`` with random weights made directly on ``device`` in ``dtype`` (the 48B model fits one H200
    in bf16 but not in fp32, nor twice); the KDA gate parameters stay fp32, as loading keeps them."""
    from kimi_linear import KimiLinearForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = KimiLinearForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()
