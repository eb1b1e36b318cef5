"""Model-level effect of the KDA kernels: training step and decode, Triton backend vs the PyTorch path.

Shapes: the released layer shapes (hidden 2304, KDA 32 heads x 128, MLA as released) with 4 layers
(3 KDA + 1 MLA) and 16 experts, bf16 on one GPU. Run: ``python benchmarks/model.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, markdown_table, median_seconds, write_results  # noqa: E402
from kimi_linear import HybridCache, KimiLinearConfig, KimiLinearForCausalLM  # noqa: E402
from kimi_linear.ops.backend import use_backend  # noqa: E402

BACKENDS = ("torch", "triton")


def bench_config() -> KimiLinearConfig:
    return KimiLinearConfig.from_preset(
        "kimi-linear-48b-a3b", num_hidden_layers=4, num_experts=16, vocab_size=32768,
        linear_attn_config={"kda_layers": [1, 2, 3], "full_attn_layers": [4], "num_heads": 32, "head_dim": 128,
                            "short_conv_kernel_size": 4},
    )


def main() -> None:
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(bench_config()).to("cuda", torch.bfloat16)
    rows = []
    for B, T in ((1, 2048), (2, 2048)):
        x = torch.randint(0, 32768, (B, T), device="cuda")
        row = {"case": f"train step B={B} T={T}"}
        for backend in BACKENDS:
            def step(x=x):
                model.zero_grad(set_to_none=True)
                model(x, labels=x).loss.backward()

            try:
                with use_backend(backend):
                    row[f"{backend} ms"] = 1e3 * median_seconds(step, warmup=2, iters=3)
            except torch.OutOfMemoryError:  # the PyTorch chunkwise KDA materialises per-chunk decay tensors
                torch.cuda.empty_cache()
                row[f"{backend} ms"] = float("nan")
        row["speedup"] = row["torch ms"] / row["triton ms"]
        rows.append(row)
    model.eval()
    for N, context in ((1, 1024), (64, 256)):
        row = {"case": f"decode N={N} context={context}"}
        prompt = torch.randint(0, 32768, (N, context), device="cuda")
        for backend in BACKENDS:
            with use_backend(backend), torch.no_grad():
                cache = HybridCache(model.config, N, context + 64, device="cuda", dtype=torch.bfloat16)
                model(prompt, cache=cache, num_logits_to_keep=1)
                token = prompt[:, -1:]

                def decode(token=token, cache=cache):
                    model(token, cache=cache, num_logits_to_keep=1)
                    cache.length -= 1  # keep the context length fixed across repetitions

                row[f"{backend} ms"] = 1e3 * median_seconds(decode, warmup=3, iters=20)
        row["speedup"] = row["torch ms"] / row["triton ms"]
        rows.append(row)
    table = markdown_table(rows, ["case", "torch ms", "triton ms", "speedup"])
    print(table)
    write_results("model", environment(), rows, table)


if __name__ == "__main__":
    main()
