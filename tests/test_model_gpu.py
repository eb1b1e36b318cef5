"""The model on CUDA (Triton kernels, bf16) against an fp64 CPU reference with the same weights.

The numerics checks use a dense-FFN variant of the tiny preset: with MoE, bf16 rounding alone flips the
top-k choice of some tokens (random routers score experts nearly alike), which swamps every other error.
The Triton path must be as accurate as the PyTorch path run on the same GPU in the same precision.
"""

import copy

import pytest
import torch

from kimi_linear import HybridCache, KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.ops.backend import use_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def build(num_experts: int) -> tuple[KimiLinearForCausalLM, KimiLinearForCausalLM]:
    torch.manual_seed(0)
    gpu = KimiLinearForCausalLM(KimiLinearConfig.from_preset("tiny", num_experts=num_experts))
    gpu = gpu.to("cuda", torch.bfloat16)
    for name, p in gpu.named_parameters():  # the fp32 gate parameters stay fp32, as loading does
        if name.endswith(("A_log", "dt_bias")):
            p.data = p.data.float()
    ref = copy.deepcopy(gpu).to("cpu", torch.float64)  # the same (bf16-rounded) weights, fp64 arithmetic
    return ref, gpu


@pytest.fixture(scope="module")
def dense():
    return build(num_experts=0)


def _run(model, x, pos, backward: bool):
    model.zero_grad(set_to_none=True)
    out = model(x, labels=x if backward else None, position_ids=pos)
    if not backward:
        return out.logits, None
    out.loss.backward()
    return out.logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("backward", [False, True], ids=["inference", "training"])
def test_triton_path_is_as_accurate_as_torch_path(dense, backward):
    ref, gpu = dense
    x = torch.randint(0, 256, (3, 300), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(77), torch.arange(223)])[None].expand(3, -1)
    ref_logits, ref_grads = _run(ref, x, pos, backward)
    errors = {}
    for backend in ("torch", "triton"):
        with use_backend(backend), torch.set_grad_enabled(backward):
            logits, grads = _run(gpu, x.cuda(), pos.cuda(), backward)
        errors[backend] = (rel(logits, ref_logits), rel(grads, ref_grads) if backward else 0.0)
    (torch_out, torch_grad), (triton_out, triton_grad) = errors["torch"], errors["triton"]
    assert triton_out <= 3e-2 and triton_grad <= 5e-2, errors
    assert triton_out <= 1.5 * torch_out + 1e-3, errors
    assert triton_grad <= 1.5 * torch_grad + 1e-3, errors


@torch.no_grad()
def test_cuda_prefill_then_decode_equals_full_forward(dense):
    _, gpu = dense
    x = torch.randint(0, 256, (3, 150), device="cuda")
    full = gpu(x).logits
    cache = HybridCache(gpu.config, 3, 150, device="cuda", dtype=torch.bfloat16)
    parts = [gpu(x[:, :130], cache=cache).logits]
    parts += [gpu(x[:, t:t + 1], cache=cache).logits for t in range(130, 150)]
    assert rel(torch.cat(parts, 1), full) <= 2e-2


def test_cuda_generate_with_moe():
    _, gpu = build(num_experts=8)
    out = gpu.generate(torch.randint(0, 256, (2, 10), device="cuda"), 20, temperature=0.8, top_k=20)
    assert out.shape[0] == 2 and out.shape[1] <= 30 and out.is_cuda
