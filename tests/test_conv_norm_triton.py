"""Triton short conv and norms (interpreted on the CPU) against the PyTorch versions they replace."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.ops.conv import causal_conv1d
from kimi_linear.ops.norm import gated_rms_norm, rms_norm
from kimi_linear.ops.triton_conv import causal_conv1d_triton
from kimi_linear.ops.triton_norm import gated_rms_norm_triton, rms_norm_triton

# Small-shape tests run interpreted on the CPU, compiled on a GPU machine.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D, W = 48, 4
CONV_CASES = {  # name -> (x shape, cu_seqlens)
    "batch": ((3, 5, D), None),
    "decode": ((5, 1, D), None),
    "varlen": ((1, 11, D), [0, 2, 2, 3, 11]),  # an empty and two sequences shorter than W - 1
}


def assert_close_rounding(out, ref, dtype):
    """fp32 outputs agree element-wise to rounding. Half-precision outputs may differ by a unit in the last place
    (Triton's interpreter does not even round fp32 -> bf16 to nearest), so they are compared by
    ||out - ref|| / ||ref||."""
    assert out.dtype == ref.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        err = (out.float() - ref.float()).norm() / ref.float().norm()
        assert err < {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype], err


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("with_state", [False, True])
def test_conv_matches_torch(case, with_state):
    shape, offsets = CONV_CASES[case]
    cu = None if offsets is None else torch.tensor(offsets, device=DEVICE)
    N = shape[0] if cu is None else len(offsets) - 1
    x, w = torch.randn(shape, device=DEVICE), torch.randn(D, W, device=DEVICE)
    state = torch.randn(N, D, W - 1, device=DEVICE) if with_state else None
    y, final = causal_conv1d_triton(x, w, initial_state=state, output_final_state=True, cu_seqlens=cu)
    y_ref, final_ref = causal_conv1d(x, w, initial_state=state, output_final_state=True, cu_seqlens=cu)
    assert_close_rounding(y, y_ref, x.dtype)
    assert torch.equal(final, final_ref), "the final state is a copy of inputs: bit-exact"


def test_conv_strided_bf16_no_activation():
    """A channel slice of a fused projection (strided rows), bf16, no SiLU, no final state."""
    fused = torch.randn(2, 6, 3 * D, device=DEVICE).to(torch.bfloat16)
    x = fused[..., D:2 * D]
    w = torch.randn(D, W, device=DEVICE).to(torch.bfloat16)
    state = torch.randn(2, D, W - 1, device=DEVICE).to(torch.bfloat16)
    y, final = causal_conv1d_triton(x, w, initial_state=state, activation=None)
    y_ref, _ = causal_conv1d(x, w, initial_state=state, activation=None)
    assert final is None
    assert_close_rounding(y, y_ref, torch.bfloat16)


def test_conv_rejects_bad_inputs():
    x = torch.randn(2, 3, D)
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d_triton(x, torch.randn(D + 1, W))
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d_triton(x, torch.randn(D, W), initial_state=torch.randn(3, D, W - 1))
    with pytest.raises(ValueError, match="batch size 1"):
        causal_conv1d_triton(x, torch.randn(D, W), cu_seqlens=torch.tensor([0, 3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [128, 100])
def test_norms_match_torch(dtype, dim):
    x, gate = torch.randn(3, 5, dim, device=DEVICE).to(dtype), torch.randn(3, 5, dim, device=DEVICE).to(dtype)
    w = torch.randn(dim, device=DEVICE).to(dtype)
    assert_close_rounding(gated_rms_norm_triton(x, gate, w, 1e-5), gated_rms_norm(x, gate, w, 1e-5), dtype)
    assert_close_rounding(rms_norm_triton(x, w, 1e-6), rms_norm(x, w, 1e-6), dtype)


def test_rms_norm_promotes_like_torch():
    """fp16 activations with an fp32 weight: normalised, rounded to fp16, then multiplied in fp32."""
    x, w = torch.randn(4, 64, device=DEVICE).to(torch.float16), torch.randn(64, device=DEVICE)
    out, ref = rms_norm_triton(x, w, 1e-5), rms_norm(x, w, 1e-5)
    assert out.dtype == ref.dtype == torch.float32
    assert (out - ref).norm() / ref.norm() < 2e-3


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_gpu_model_sizes():
    """3 x 4096 conv channels over a packed prefill and a decode step; norms at hidden 2304 and 32 x 128."""
    dev, bf16 = "cuda", torch.bfloat16
    Dm = 3 * 4096
    w = torch.randn(Dm, W, device=dev, dtype=bf16)
    for x, cu in ((torch.randn(1, 1000, Dm, device=dev, dtype=bf16), torch.tensor([0, 1, 400, 1000], device=dev)),
                  (torch.randn(64, 1, Dm, device=dev, dtype=bf16), None)):
        N = x.shape[0] if cu is None else cu.numel() - 1
        state = torch.randn(N, Dm, W - 1, device=dev, dtype=bf16)
        y, final = causal_conv1d_triton(x, w, initial_state=state, output_final_state=True, cu_seqlens=cu)
        y_ref, final_ref = causal_conv1d(x, w, initial_state=state, output_final_state=True, cu_seqlens=cu)
        assert_close_rounding(y, y_ref, bf16)
        assert torch.equal(final, final_ref)
    h, wh = torch.randn(64, 2304, device=dev, dtype=bf16), torch.randn(2304, device=dev, dtype=bf16)
    assert_close_rounding(rms_norm_triton(h, wh, 1e-5), rms_norm(h, wh, 1e-5), bf16)
    o, g = torch.randn(2, 64, 32, 128, device=dev, dtype=bf16), torch.randn(2, 64, 32, 128, device=dev, dtype=bf16)
    wo = torch.randn(128, device=dev, dtype=bf16)
    assert_close_rounding(gated_rms_norm_triton(o, g, wo, 1e-5), gated_rms_norm(o, g, wo, 1e-5), bf16)
