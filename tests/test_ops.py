"""PyTorch ops against direct, naive formulations (fp64)."""

import pytest
import torch
import torch.nn.functional as F
from sync_guard import no_cuda_sync, no_host_reads

from kimi_linear.ops.backend import use_backend
from kimi_linear.ops.conv import causal_conv1d, conv_state_at
from kimi_linear.ops.moe import _grouped_linear, _grouped_mm_applies, moe_experts, route, sequence_balance_loss
from kimi_linear.ops.norm import gated_rms_norm, rms_norm

f64 = torch.float64


def naive_conv(x, w, state=None):
    """Per token, per channel: sum_j w[:, W-1-j] * x[t-j], with the state (or zeros) before the start."""
    B, T, D = x.shape
    W = w.shape[1]
    ext = torch.cat([state.transpose(1, 2) if state is not None else x.new_zeros(B, W - 1, D), x], 1)
    y = torch.stack([(ext[:, t:t + W] * w.t()).sum(1) for t in range(T)], 1)
    return F.silu(y), ext[:, -(W - 1):].transpose(1, 2)


@pytest.mark.parametrize("T", [1, 2, 3, 9])
def test_conv_with_state_matches_naive(T):
    x, w, s = torch.randn(2, T, 6, dtype=f64), torch.randn(6, 4, dtype=f64), torch.randn(2, 6, 3, dtype=f64)
    y, final = causal_conv1d(x, w, initial_state=s, output_final_state=True)
    ref_y, ref_final = naive_conv(x, w, s)
    assert torch.allclose(y, ref_y) and torch.equal(final, ref_final)
    y0, _ = causal_conv1d(x, w)
    assert torch.allclose(y0, naive_conv(x, w)[0])


def test_conv_varlen_matches_per_sequence_and_grads():
    lengths = [5, 1, 2, 8]
    xs = [torch.randn(1, n, 6, dtype=f64, requires_grad=True) for n in lengths]
    states = torch.randn(len(lengths), 6, 3, dtype=f64, requires_grad=True)
    w = torch.randn(6, 4, dtype=f64, requires_grad=True)
    cu = torch.tensor([0, 5, 6, 8, 16])
    y, final = causal_conv1d(torch.cat(xs, 1), w, initial_state=states, output_final_state=True, cu_seqlens=cu)
    refs = [naive_conv(x, w, states[i:i + 1]) for i, x in enumerate(xs)]
    assert torch.allclose(y, torch.cat([r[0] for r in refs], 1))
    assert torch.allclose(final, torch.cat([r[1] for r in refs]))
    assert torch.autograd.gradcheck(
        lambda x, s, w: causal_conv1d(x, w, initial_state=s, output_final_state=True, cu_seqlens=cu),
        (torch.cat(xs, 1).detach().requires_grad_(), states, w))


def state_after(x_seq, state, length, W):
    """The last W-1 pre-conv inputs after the first ``length`` tokens of one sequence: x_seq [T_n, D], state
    [D, W-1] or None. Returns [D, W-1]."""
    carried = state.t() if state is not None else x_seq.new_zeros(W - 1, x_seq.shape[1])
    return torch.cat([carried, x_seq[:length]])[len(carried) + length - (W - 1):].t()


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("W", [4, 2])
def test_conv_state_at_matches_per_sequence(with_state, W):
    """Every prefix length of every sequence (0, 1, below W-1, W-1 and beyond, the full length), in any order and
    with repeats, from [T, D] and [1, T, D] inputs."""
    lengths, D = [5, 0, 1, 2, 9], 6
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    x = torch.randn(sum(lengths), D, dtype=f64)
    state = torch.randn(len(lengths), D, W - 1, dtype=f64) if with_state else None
    pairs = [(n, m) for n, L in enumerate(lengths) for m in range(L + 1)][::-1]
    seq_index, upto = (torch.tensor(col) for col in zip(*pairs))
    for xs in (x, x[None]):
        got = conv_state_at(xs, state, cu, seq_index, upto, width=W)
        assert got.shape == (len(pairs), D, W - 1)
        for r, (n, m) in enumerate(pairs):
            ref = state_after(x[cu[n]:cu[n + 1]], state[n] if with_state else None, m, W)
            assert torch.equal(got[r], ref), (n, m)


def test_conv_state_at_grads_and_bad_inputs():
    cu, x = torch.tensor([0, 3, 7]), torch.randn(7, 5, dtype=f64, requires_grad=True)
    state = torch.randn(2, 5, 3, dtype=f64, requires_grad=True)
    seq_index, upto = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 4])
    assert torch.autograd.gradcheck(lambda x, s: conv_state_at(x, s, cu, seq_index, upto, width=4), (x, state))
    with pytest.raises(ValueError, match="initial_state"):
        conv_state_at(x, state, cu, seq_index, upto, width=3)
    with pytest.raises(ValueError, match="lengths"):
        conv_state_at(x, state, cu, seq_index, upto[:2], width=4)
    with pytest.raises(ValueError, match="x must be"):
        conv_state_at(x[None, None], state, cu, seq_index, upto, width=4)


def test_conv_reads_nothing_from_the_device():
    """The PyTorch conv (packed, with state, final state) and conv_state_at read no tensor value on the host."""
    cu = torch.tensor([0, 5, 5, 6, 14])
    x, w, s = torch.randn(1, 14, 6), torch.randn(6, 4), torch.randn(4, 6, 3)
    with use_backend("torch"), no_host_reads():
        causal_conv1d(x, w, initial_state=s, output_final_state=True, cu_seqlens=cu)
        causal_conv1d(x.view(14, 1, 6), w, initial_state=torch.randn(14, 6, 3), output_final_state=True)  # decode
        conv_state_at(x, s, cu, torch.tensor([3, 0]), torch.tensor([8, 2]), width=4)


def test_norms():
    x, g, w = torch.randn(3, 8, dtype=f64), torch.randn(3, 8, dtype=f64), torch.randn(8, dtype=f64)
    assert torch.allclose(rms_norm(x, w, 1e-5), w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5))
    ref = w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * torch.sigmoid(g)
    assert torch.allclose(gated_rms_norm(x, g, w, 1e-5), ref)
    half = x.to(torch.bfloat16)
    assert rms_norm(half, w.to(torch.bfloat16), 1e-5).dtype == torch.bfloat16


def test_routing_uses_bias_for_selection_only():
    x, gate = torch.randn(64, 16, dtype=f64), torch.randn(8, 16, dtype=f64)
    bias = torch.zeros(8, dtype=torch.float32)
    bias[3] = 10.0  # forces expert 3 into every selection
    weights, idx, scores = route(x, gate, bias, top_k=2, routed_scaling_factor=2.5)
    assert (idx == 3).any(-1).all()
    s = torch.sigmoid(x.float() @ gate.float().t())
    expected = s.gather(1, idx) / s.gather(1, idx).sum(-1, keepdim=True) * 2.5
    assert torch.allclose(weights, expected, atol=1e-6) and torch.allclose(scores, s)


def test_group_limited_routing():
    x, gate = torch.randn(32, 16), torch.randn(8, 16)
    _, idx, scores = route(x, gate, torch.zeros(8), top_k=2, num_expert_group=4, topk_group=1)
    assert ((idx // 2)[:, 0] == (idx // 2)[:, 1]).all()  # both experts from the single kept group
    best_group = scores.view(32, 4, 2).sum(-1).argmax(-1)
    assert torch.equal(idx[:, 0] // 2, best_group)


def test_experts_match_a_loop_over_tokens():
    N, D, I, E, k = 20, 8, 6, 5, 2
    x = torch.randn(N, D, dtype=f64, requires_grad=True)
    gu, down = torch.randn(E, 2 * I, D, dtype=f64), torch.randn(E, D, I, dtype=f64)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    idx[:, 0] = 4  # expert 4 busy, some experts idle
    w = torch.rand(N, k, dtype=f64)
    y = moe_experts(x, gu, down, idx, w)
    ref = torch.stack([
        sum(w[n, j] * (down[e] @ (F.silu(gu[e, :I] @ x[n]) * (gu[e, I:] @ x[n])))
            for j, e in enumerate(idx[n].tolist()))
        for n in range(N)
    ])
    assert torch.allclose(y, ref)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def loop_linear(x, weight, counts):
    """The grouped product expert by expert: rows of x sorted by expert, counts[e] of them for expert e."""
    return torch.cat([x_e @ weight[e].t() for e, x_e in enumerate(x.split(counts.tolist()))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_matches_the_loop(dtype):
    """Without a gradient, aligned dims and a supported dtype take torch._grouped_mm (where torch has it), which
    must agree with the loop over experts; anything else keeps the loop."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    counts = torch.tensor([3, 0, 5, 1, 0])
    offsets = counts.cumsum(0).to(torch.int32)
    x, weight = torch.randn(9, 16).to(dtype), torch.randn(5, 24, 16).to(dtype)
    assert _grouped_mm_applies(x, weight)
    y = _grouped_linear(x, weight, counts, offsets)
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(y, loop_linear(x, weight, counts), rtol=tol, atol=tol)
    assert not _grouped_mm_applies(x.requires_grad_(), weight)  # its CPU backward fails
    assert not _grouped_mm_applies(torch.randn(9, 6).to(dtype), torch.randn(5, 24, 6).to(dtype))  # 6 x 4 bytes
    assert not _grouped_mm_applies(x.double(), weight.double())


@torch.no_grad()
def test_inference_experts_read_nothing_from_the_device():
    """The MoE inference path (grouped product) reads no tensor value on the host, and matches fp64."""
    N, D, I, E, k = 20, 16, 8, 5, 2
    x, gu, down = torch.randn(N, D), torch.randn(E, 2 * I, D), torch.randn(E, D, I)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    idx[:, 0] = 4  # expert 4 busy, some experts idle
    w = torch.rand(N, k)
    with no_host_reads():
        y = moe_experts(x, gu, down, idx, w)
    ref = moe_experts(x.double(), gu.double(), down.double(), idx, w.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_balance_loss_is_one_for_uniform_routing():
    E, T = 4, 8
    idx = torch.tensor([[0, 1], [2, 3]] * (T // 2))[None]
    scores = torch.full((1, T, E), 0.5)
    assert torch.allclose(sequence_balance_loss(scores, idx, E), torch.tensor(1.0))
    skewed = torch.tensor([[0, 1]] * T)[None]
    peaked = torch.tensor([0.9, 0.9, 0.1, 0.1]).expand(1, T, E)
    assert torch.allclose(sequence_balance_loss(peaked, skewed, E), torch.tensor(1.8))  # f = 2, 2, 0, 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_conv_and_experts_do_not_synchronise():
    """The PyTorch conv, conv_state_at and the bf16 inference MoE on CUDA: no host synchronisation."""
    dev, bf16 = "cuda", torch.bfloat16
    cu = torch.tensor([0, 5, 5, 6, 14], device=dev)
    x, w, s = torch.randn(1, 14, 64, device=dev, dtype=bf16), torch.randn(64, 4, device=dev, dtype=bf16), \
        torch.randn(4, 64, 3, device=dev, dtype=bf16)
    seq_index, upto = torch.tensor([3, 0], device=dev), torch.tensor([8, 2], device=dev)
    E, D, I = 8, 64, 32
    xm, gu, down = (torch.randn(*shape, device=dev, dtype=bf16) for shape in ((20, D), (E, 2 * I, D), (E, D, I)))
    idx, wt = torch.randint(0, E, (20, 2), device=dev), torch.rand(20, 2, device=dev)
    with use_backend("torch"), torch.no_grad(), no_cuda_sync():
        causal_conv1d(x, w, initial_state=s, output_final_state=True, cu_seqlens=cu)
        conv_state_at(x, s, cu, seq_index, upto, width=4)
        moe_experts(xm, gu, down, idx, wt)
