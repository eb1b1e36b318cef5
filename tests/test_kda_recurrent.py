"""Decode step on a state pool: the Triton kernel (interpreted on the CPU) and the PyTorch path against the
fp64 token-loop oracle, plus the backend switch. GPU tests at the model's shapes run only with CUDA."""

from __future__ import annotations

import pytest
import torch
from sync_guard import no_cuda_sync, no_host_reads

from kimi_linear.ops.backend import use_backend
from kimi_linear.ops.kda import fused_recurrent_kda
from kimi_linear.ops.kda.gate import KDAOptions
from kimi_linear.ops.kda.naive import naive_recurrent_kda
from kimi_linear.ops.kda.triton_recurrent import _kda_decode_kernel, fused_recurrent_kda_triton

# Small-shape tests run interpreted on the CPU, compiled on a GPU machine.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GATES = {  # name -> (uses A_log/dt_bias, lower_bound)
    "log_decay": (False, None),
    "softplus": (True, None),
    "bounded": (True, -5.0),
}


def make_inputs(N, T, H, K, V, gate, dtype=torch.float32, device=DEVICE, seed=0):
    """Random decode inputs: raw gate/beta logits when the op applies the activations, else activated ones."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    with_gate, lower_bound = GATES[gate]
    x = dict(q=rand(N, T, H, K).to(dtype), k=rand(N, T, H, K).to(dtype), v=rand(N, T, H, V).to(dtype),
             beta=rand(N, T, H))
    if with_gate:
        x["g"] = rand(N, T, H, K)
        gate = dict(A_log=rand(H) * 0.5, dt_bias=rand(H * K), lower_bound=lower_bound)
    else:
        x["g"] = -torch.rand(N, T, H, K, generator=gen).to(device) * 0.5
        gate = {}
    return x, KDAOptions(qk_l2norm=True, beta_sigmoid=True, **gate)


def reference(x, opts, pool, slots):
    """fp64 oracle of the pool update: returns (o, pool after the step)."""
    q, k, g, beta = opts.prepare(x["q"].double(), x["k"].double(), x["g"].double(), x["beta"].double())
    valid = slots >= 0
    rows = slots.long().clamp(min=0)
    o, final = naive_recurrent_kda(q.double(), k.double(), x["v"].double(), g.double(), beta.double(),
                                   initial_state=pool[rows].double(), output_final_state=True)
    expected = pool.clone()
    expected[rows[valid]] = final[valid].float()
    return o.masked_fill(~valid[:, None, None, None], 0), expected


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_step(op, N, T, H, K, V, gate, slots, dtype=torch.float32, device=DEVICE, P=None, seed=0):
    x, opts = make_inputs(N, T, H, K, V, gate, dtype, device, seed)
    P = P or int(slots.max()) + 3
    pool = torch.randn(P, H, K, V, device=device)
    slots = slots.to(device)
    o_ref, pool_ref = reference(x, opts, pool, slots)
    out_pool = pool.clone()
    o = op(x["q"], x["k"], x["v"], x["g"], x["beta"], state_pool=out_pool, state_indices=slots, options=opts)
    assert o.dtype == x["v"].dtype and o.shape == x["v"].shape
    touched = torch.zeros(P, dtype=torch.bool, device=device)
    touched[slots[slots >= 0].long()] = True
    assert torch.equal(out_pool[~touched], pool[~touched]), "rows not addressed must stay bit-exact"
    assert torch.all(o[slots < 0] == 0), "padding rows output zeros"
    o_tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(o, o_ref) < o_tol
    assert rel_err(out_pool[touched], pool_ref[touched]) < 1e-5


def test_interpreter_is_active_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("compiled kernels on a GPU machine")
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(_kda_decode_kernel, InterpretedFunction)


SLOTS = torch.tensor([6, -1, 0, 3, 9])  # a permutation with gaps, and one padding row; N = 5 is odd


@pytest.mark.parametrize("gate", list(GATES))
@pytest.mark.parametrize("T", [1, 3])
def test_triton_matches_oracle(gate, T):
    check_step(fused_recurrent_kda_triton, 5, T, 2, 16, 16, gate, SLOTS, seed=T)


def test_triton_bf16_and_int32_slots():
    check_step(fused_recurrent_kda_triton, 3, 2, 2, 16, 32, "softplus", torch.tensor([2, 0, 4], dtype=torch.int32),
               dtype=torch.bfloat16)


@pytest.mark.parametrize("T", [1, 2])
def test_triton_strided_inputs_plain_gates_and_pool_slice(T):
    """q, k, v as slices of one fused qkv projection (read in place through a row stride), no in-kernel
    activations, an explicit scale, and a pool that is a slice of a larger cache."""
    N, H, K, V = 3, 2, 8, 8
    x, _ = make_inputs(N, T, H, K, V, "log_decay")
    qkv = torch.randn(N, T, 3 * H * K, device=DEVICE)
    x["q"], x["k"], x["v"] = (t.view(N, T, H, K) for t in qkv.chunk(3, dim=-1))
    x["beta"] = x["beta"].sigmoid()
    cache = torch.randn(2, 4, H, K, V, device=DEVICE)
    slots = torch.tensor([3, 1, 0], device=DEVICE)
    opts = KDAOptions()
    o_ref, pool_ref = reference(x, opts, cache[1], slots)
    o = fused_recurrent_kda_triton(x["q"], x["k"], x["v"], x["g"], x["beta"], state_pool=cache[1],
                                   state_indices=slots, scale=K**-0.5, options=opts)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(cache[1], pool_ref) < 1e-5


@pytest.mark.parametrize("gate", ["softplus", "bounded"])
def test_torch_path_matches_oracle(gate):
    with use_backend("torch"):
        check_step(fused_recurrent_kda, 5, 2, 2, 16, 16, gate, SLOTS)


def test_backend_switch():
    x, opts = make_inputs(3, 1, 2, 16, 16, "bounded")
    pool = torch.randn(4, 2, 16, 16, device=DEVICE)
    slots = torch.tensor([1, 3, 0], device=DEVICE)
    outs = {}
    for choice in ("torch", "triton"):
        p = pool.clone()
        with use_backend(choice):
            outs[choice] = (fused_recurrent_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], state_pool=p,
                                                state_indices=slots, options=opts), p)
    assert rel_err(outs["triton"][0], outs["torch"][0]) < 1e-5
    assert rel_err(outs["triton"][1], outs["torch"][1]) < 1e-5
    # an unknown backend is refused when chosen (test_backend.py: also when it comes from the environment)
    with pytest.raises(ValueError, match="backend"), use_backend("cuda"):
        fused_recurrent_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], state_pool=pool, state_indices=slots,
                            options=opts)


STEP_OPS = {"torch": fused_recurrent_kda, "triton": fused_recurrent_kda_triton}


def torch_or_triton(name):
    """The decode step of one backend (the dispatching op is forced onto its PyTorch path)."""
    def step(*args, **kwargs):
        with use_backend("torch" if name == "torch" else "auto"):
            return STEP_OPS[name](*args, **kwargs)
    return step


@pytest.mark.parametrize("impl", list(STEP_OPS))
@pytest.mark.parametrize("slots", [[-1, 0, -1, 2], [0, -1], [-1, -1, 0]], ids=["around", "after", "before"])
def test_padding_rows_beside_a_row_on_slot_0(impl, slots):
    """Padding rows read slot 0 and (PyTorch) write back the first real row's state: with a real row on slot 0,
    that row's new state must win, wherever the padding rows sit."""
    check_step(torch_or_triton(impl), len(slots), 2, 2, 16, 16, "softplus", torch.tensor(slots), P=4)


@pytest.mark.parametrize("impl", list(STEP_OPS))
@pytest.mark.parametrize("slots", [[3, -1, 5], [-1, -1]], ids=["mixed", "padding_only"])
def test_free_slots_may_hold_nan(impl, slots):
    """A pool that is NaN everywhere but in the slots in use (freed slots hold anything): outputs and the used
    slots stay finite and equal to a run on a clean pool, padding rows output zeros, free slots keep their NaN."""
    N, P = len(slots), 7
    x, opts = make_inputs(N, 1, 2, 16, 16, "softplus")
    slots = torch.tensor(slots, device=DEVICE)
    used = torch.zeros(P, dtype=torch.bool, device=DEVICE)
    used[slots[slots >= 0]] = True
    clean = torch.randn(P, 2, 16, 16, device=DEVICE)
    dirty = torch.where(used[:, None, None, None], clean, torch.full_like(clean, float("nan")))
    step = torch_or_triton(impl)
    o_clean = step(x["q"], x["k"], x["v"], x["g"], x["beta"], state_pool=clean, state_indices=slots, options=opts)
    o = step(x["q"], x["k"], x["v"], x["g"], x["beta"], state_pool=dirty, state_indices=slots, options=opts)
    assert torch.isfinite(o).all() and torch.equal(o, o_clean)
    assert torch.all(o[slots < 0] == 0)
    assert torch.equal(dirty[used], clean[used]) and dirty[~used].isnan().all()


def test_torch_step_bf16_and_int32_slots():
    """bf16 activations: the output comes back in bf16 and agrees with the kernel's. (The PyTorch path rounds the
    normalised q and k to bf16, as its chunk path does; the kernel keeps them in fp32: the states differ by ~1e-3.)"""
    x, opts = make_inputs(3, 2, 2, 16, 32, "softplus", torch.bfloat16)
    slots = torch.tensor([2, -1, 0], dtype=torch.int32, device=DEVICE)
    pool = torch.randn(4, 2, 16, 32, device=DEVICE)
    outs = [step(x["q"], x["k"], x["v"], x["g"], x["beta"], state_pool=p, state_indices=slots, options=opts)
            for step, p in ((torch_or_triton("torch"), pool.clone()), (fused_recurrent_kda_triton, pool.clone()))]
    assert outs[0].dtype == torch.bfloat16 and torch.all(outs[0][1] == 0)
    assert rel_err(outs[0], outs[1]) < 1e-2


def test_torch_step_reads_nothing_from_the_device():
    """The PyTorch step, padding rows included, reads no tensor value on the host (graph-capturable on CUDA)."""
    x, opts = make_inputs(4, 2, 2, 16, 16, "bounded")
    pool = torch.randn(6, 2, 16, 16, device=DEVICE)
    for slots in ([4, -1, 0, 2], [-1, -1, -1, -1]):
        with use_backend("torch"), no_host_reads():
            fused_recurrent_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], state_pool=pool,
                                state_indices=torch.tensor(slots, device=DEVICE), options=opts)


def test_triton_rejects_bad_inputs():
    x, opts = make_inputs(2, 1, 2, 16, 16, "softplus")
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"])
    slots = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="state_pool"):
        fused_recurrent_kda_triton(*args, state_pool=torch.zeros(2, 2, 16, 16, dtype=torch.float64),
                                   state_indices=slots, options=opts)
    with pytest.raises(ValueError, match="state_indices"):
        fused_recurrent_kda_triton(*args, state_pool=torch.zeros(2, 2, 16, 16), state_indices=slots[:1],
                                   options=opts)
    with pytest.raises(ValueError, match="powers of two"):
        fused_recurrent_kda_triton(x["q"][..., :12], x["k"][..., :12], x["v"], x["g"][..., :12], x["beta"],
                                   state_pool=torch.zeros(2, 2, 12, 16), state_indices=slots)
    with pytest.raises(ValueError, match="dt_bias"):
        fused_recurrent_kda_triton(*args, state_pool=torch.zeros(2, 2, 16, 16), state_indices=slots,
                                   options=KDAOptions(A_log=opts.A_log))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("N", [1, 7, 64, 300])
@pytest.mark.parametrize("gate", ["softplus", "bounded"])
def test_gpu_model_shapes(N, gate):
    slots = torch.randperm(N + 9)[:N]
    if N > 1:
        slots[N // 2] = -1
    check_step(fused_recurrent_kda_triton, N, 1, 32, 128, 128, gate, slots, dtype=torch.bfloat16, device="cuda")


@cuda
def test_gpu_multi_token_and_log_decay():
    check_step(fused_recurrent_kda_triton, 9, 4, 32, 128, 128, "log_decay", torch.randperm(12)[:9],
               dtype=torch.bfloat16, device="cuda")


@cuda
def test_gpu_output_independent_of_batch_size():
    """A sequence's output and state must not depend on how many other sequences share the batch (the launch
    configuration changes with N, so the reduction order may too: equal up to fp32 rounding)."""
    x, opts = make_inputs(256, 1, 32, 128, 128, "softplus", torch.float32, "cuda")
    pool = torch.randn(256, 32, 128, 128, device="cuda")
    slots = torch.arange(256, device="cuda")
    big = pool.clone()
    o_big = fused_recurrent_kda_triton(x["q"], x["k"], x["v"], x["g"], x["beta"], state_pool=big,
                                       state_indices=slots, options=opts)
    small = pool.clone()
    o_small = fused_recurrent_kda_triton(x["q"][:1], x["k"][:1], x["v"][:1], x["g"][:1], x["beta"][:1],
                                         state_pool=small, state_indices=slots[:1], options=opts)
    torch.testing.assert_close(o_small, o_big[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(small[0], big[0], rtol=1e-5, atol=1e-5)


@cuda
def test_gpu_cuda_graph_replay():
    """Captured once, replayed on new inputs copied into the same buffers: matches the eager step."""
    N, H, K, V = 5, 32, 128, 128
    x, opts = make_inputs(N, 1, H, K, V, "softplus", torch.bfloat16, "cuda")
    slots = torch.tensor([4, -1, 0, 7, 2], device="cuda")
    pool = torch.randn(8, H, K, V, device="cuda")
    scratch = pool.clone()

    def step():
        return fused_recurrent_kda_triton(x["q"], x["k"], x["v"], x["g"], x["beta"], state_pool=scratch,
                                          state_indices=slots, options=opts)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_graph = step()
    fresh, _ = make_inputs(N, 1, H, K, V, "softplus", torch.bfloat16, "cuda", seed=1)
    for name in x:
        x[name].copy_(fresh[name])
    scratch.copy_(pool)
    graph.replay()
    eager_pool = pool.clone()
    o_eager = fused_recurrent_kda_triton(x["q"], x["k"], x["v"], x["g"], x["beta"], state_pool=eager_pool,
                                         state_indices=slots, options=opts)
    torch.testing.assert_close(o_graph, o_eager, rtol=0, atol=0)
    torch.testing.assert_close(scratch, eager_pool, rtol=0, atol=0)


@cuda
def test_gpu_torch_step_does_not_synchronise():
    x, opts = make_inputs(5, 1, 32, 128, 128, "softplus", torch.bfloat16, "cuda")
    pool = torch.randn(8, 32, 128, 128, device="cuda")
    slots = torch.tensor([4, -1, 0, 7, 2], device="cuda")
    with use_backend("torch"), no_cuda_sync():
        fused_recurrent_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], state_pool=pool, state_indices=slots,
                            options=opts)
