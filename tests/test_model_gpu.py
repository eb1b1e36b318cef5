"""The model on CUDA (Triton KDA kernels, bf16) against the PyTorch path and an fp64 CPU reference."""

import copy

import pytest
import torch

from kimi_linear import HybridCache, KimiLinearConfig, KimiLinearForCausalLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    gpu = KimiLinearForCausalLM(KimiLinearConfig.from_preset("tiny")).to("cuda", torch.bfloat16)
    for name, p in gpu.named_parameters():  # keep the fp32 gate parameters fp32, as loading does
        if name.endswith(("A_log", "dt_bias")):
            p.data = p.data.float()
    for m in gpu.moe_layers():
        m.gate.e_score_correction_bias.data = m.gate.e_score_correction_bias.data.float()
    ref = copy.deepcopy(gpu).to("cpu", torch.float64)  # the same (bf16-rounded) weights, fp64 arithmetic
    return ref.eval(), gpu.eval()


def test_bf16_cuda_forward_matches_fp64(models):
    ref, gpu = models
    x = torch.randint(0, 256, (4, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x).logits
        out = gpu(x.cuda()).logits
    assert rel(out.cpu(), expected) <= 2e-2


def test_triton_and_torch_backends_agree_forward_and_backward(models, monkeypatch):
    _, gpu = models
    x = torch.randint(0, 256, (2, 200), device="cuda")
    pos = torch.cat([torch.arange(77), torch.arange(123)]).cuda()[None].expand(2, -1)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("KIMI_LINEAR_BACKEND", backend)
        gpu.zero_grad()
        out = gpu(x, labels=x, position_ids=pos)
        out.loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in gpu.parameters() if p.grad is not None])
        results[backend] = (out.logits.float(), out.loss.float(), grads)
    gpu.zero_grad()
    assert rel(results["triton"][0], results["torch"][0]) <= 1e-2
    assert rel(results["triton"][2], results["torch"][2]) <= 3e-2


@torch.no_grad()
def test_cuda_prefill_then_decode_equals_full_forward(models):
    _, gpu = models
    x = torch.randint(0, 256, (3, 150), device="cuda")
    full = gpu(x).logits
    cache = HybridCache(gpu.config, 3, 150, device="cuda", dtype=torch.bfloat16)
    parts = [gpu(x[:, :130], cache=cache).logits]
    parts += [gpu(x[:, t:t + 1], cache=cache).logits for t in range(130, 150)]
    assert rel(torch.cat(parts, 1), full) <= 2e-2


def test_cuda_generate(models):
    _, gpu = models
    out = gpu.generate(torch.randint(0, 256, (2, 10), device="cuda"), 20, temperature=0.8, top_k=20)
    assert out.shape[0] == 2 and out.shape[1] <= 30 and out.is_cuda
