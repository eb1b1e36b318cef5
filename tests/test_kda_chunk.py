"""PyTorch chunkwise KDA (`kimi_linear.ops.kda.chunk`) against the token-loop oracle `naive_recurrent_kda`."""

from __future__ import annotations

import pytest
import torch
from kda_args import kda_call
from sync_guard import HostReadError, no_host_reads

from kimi_linear.ops.kda.chunk import chunk_kda
from kimi_linear.ops.kda.gate import KDAOptions, l2norm
from kimi_linear.ops.kda.naive import naive_recurrent_kda


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_inputs(B, T, H, K, V, *, seed, dtype=torch.float32, fused=False, n_state=None):
    """Random inputs; with ``fused`` the raw gate / logit forms plus A_log and dt_bias (the model's hot path)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    x = {"q": rnd(B, T, H, K), "k": rnd(B, T, H, K), "v": rnd(B, T, H, V)}
    x["initial_state"] = rnd(n_state or B, H, K, V)
    if fused:
        x["g"] = rnd(B, T, H, K)
        x["beta"] = rnd(B, T, H)
        x["A_log"] = torch.rand(H, generator=gen, dtype=dtype) * 2 - 1
        x["dt_bias"] = rnd(H * K)
    else:
        x["q"], x["k"] = l2norm(x["q"]).to(dtype), l2norm(x["k"]).to(dtype)
        # log-decays spanning slow to fast (down to -4 a step) so sub-chunk anchoring is exercised
        x["g"] = -torch.rand(B, T, H, K, generator=gen, dtype=dtype) * 4
        x["beta"] = torch.rand(B, T, H, generator=gen, dtype=dtype)
    return {name: t.requires_grad_() for name, t in x.items()}


def options(fused, lower_bound=None):
    """The KDAOptions flags of a test (the gate's parameters come from the inputs, see kda_args.kda_call)."""
    if not fused:
        return {}
    return {"qk_l2norm": True, "beta_sigmoid": True, "lower_bound": lower_bound}


def naive_with_options(q, k, v, g, beta, *, options, **kw):
    """The oracle behind the same PyTorch pre-processing the chunk path uses."""
    q, k, g, beta = options.prepare(q, k, g, beta)
    return naive_recurrent_kda(q, k, v, g, beta, **kw)


def cotangents(o_shape, state_shape, seed):
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(o_shape, generator=gen), torch.randn(state_shape, generator=gen)


def grads_for(fn, x, do, dh, **kw):
    """Forward, then the gradient of ``<o, do> + <final_state, dh>`` w.r.t. every tensor of ``x``."""
    o, final = kda_call(fn, x, output_final_state=True, **kw)
    grads = torch.autograd.grad((o * do.to(o.dtype)).sum() + (final * dh.to(final.dtype)).sum(), list(x.values()))
    return o, final, dict(zip(x.keys(), grads))


def run_with_grads(fn, x, seed, **kw):
    B, T, H, V = x["v"].shape
    do, dh = cotangents((B, T, H, V), x["initial_state"].shape, seed)
    return grads_for(fn, x, do, dh, **kw)


def assert_match(fn_a, fn_b, x, seed, tol, **kw):
    o_a, f_a, g_a = run_with_grads(fn_a, x, seed, **kw)
    o_b, f_b, g_b = run_with_grads(fn_b, x, seed, **kw)
    assert rel_err(o_a, o_b) <= tol, ("o", rel_err(o_a, o_b))
    assert rel_err(f_a, f_b) <= tol, ("final_state", rel_err(f_a, f_b))
    for name in x:
        assert rel_err(g_a[name], g_b[name]) <= tol, (f"d{name}", rel_err(g_a[name], g_b[name]))


@pytest.mark.parametrize("T", [1, 63, 65, 130])
def test_matches_naive_outputs_states_and_grads(T):
    x = make_inputs(2, T, 2, 32, 16, seed=T)
    assert_match(chunk_kda, naive_recurrent_kda, x, seed=T, tol=1e-5)


@pytest.mark.parametrize("lower_bound", [None, -5.0])
def test_fused_options_match_naive_with_grads(lower_bound):
    x = make_inputs(1, 97, 2, 32, 16, seed=7, fused=True)
    assert_match(chunk_kda, naive_with_options, x, seed=7, tol=1e-5, flags=options(True, lower_bound))


def test_strong_decay_stays_finite_and_exact():
    """Log-decays down to -12 a step: exp(-G) over a chunk (up to e^768) overflows fp32 without anchoring."""
    x = make_inputs(1, 80, 2, 16, 8, seed=3)
    with torch.no_grad():
        x["g"].mul_(3.0)
    o, f, grads = run_with_grads(chunk_kda, x, seed=3)
    assert all(torch.isfinite(t).all() for t in (o, f, *grads.values()))
    assert_match(chunk_kda, naive_recurrent_kda, x, seed=3, tol=1e-5)


def test_float64_inputs_compute_in_float64():
    x = make_inputs(1, 70, 2, 16, 8, seed=11, dtype=torch.float64)
    o, f = chunk_kda(**x, output_final_state=True)
    o_ref, f_ref = naive_recurrent_kda(**x, output_final_state=True)
    assert o.dtype == torch.float64 and f.dtype == torch.float64
    assert rel_err(o, o_ref) <= 1e-12 and rel_err(f, f_ref) <= 1e-12


def test_low_precision_inputs_return_their_dtype():
    x = make_inputs(1, 40, 2, 16, 8, seed=12)
    xb = {n: (t.detach().bfloat16() if n in ("q", "k", "v") else t.detach()) for n, t in x.items()}
    o, f = chunk_kda(**xb, output_final_state=True)
    o_ref, f_ref = naive_recurrent_kda(**xb, output_final_state=True)
    assert o.dtype == torch.bfloat16 and f.dtype == torch.float32
    assert rel_err(o, o_ref) <= 1e-2 and rel_err(f, f_ref) <= 1e-5


@pytest.mark.parametrize("fused", [False, True])
def test_packed_sequences_equal_separate_runs(fused):
    """Packed = separate runs, for outputs, states and every gradient; an empty sequence keeps its state."""
    lengths = [5, 64, 0, 77, 1]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    x = make_inputs(1, sum(lengths), 2, 16, 8, seed=21, fused=fused, n_state=len(lengths))
    do, dh = cotangents(x["v"].shape, x["initial_state"].shape, seed=21)
    o, f, grads = grads_for(chunk_kda, x, do, dh, cu_seqlens=cu, flags=options(fused))
    shared = {"A_log", "dt_bias"} & x.keys()
    shared_total = {name: torch.zeros_like(grads[name]) for name in shared}
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if e == s:
            assert torch.equal(f[n], x["initial_state"][n])
            assert not grads["initial_state"][n].sub(dh[n]).any()
            continue
        xs = {
            name: (t if name in shared else t[n : n + 1] if name == "initial_state" else t[:, s:e])
            .detach().clone().requires_grad_()
            for name, t in x.items()
        }
        o_n, f_n, g_n = grads_for(chunk_kda, xs, do[:, s:e], dh[n : n + 1], flags=options(fused))
        assert rel_err(o[:, s:e], o_n) <= 1e-6
        assert rel_err(f[n : n + 1], f_n) <= 1e-6
        for name, gr in g_n.items():
            if name in shared:
                shared_total[name] += gr
            else:
                mine = grads[name][n : n + 1] if name == "initial_state" else grads[name][:, s:e]
                assert rel_err(mine, gr) <= 1e-6, name
    for name, total in shared_total.items():
        assert rel_err(grads[name], total) <= 1e-5, name


@pytest.mark.parametrize("t", [0, 17, 64, 100])
def test_causality_exact(t):
    """Perturbing token t changes no output before t; a loss on outputs before t has zero gradient from t on."""
    T = 128
    x = make_inputs(1, T, 2, 16, 8, seed=31)
    base = {n: v.detach() for n, v in x.items()}
    o_ref, _ = chunk_kda(**base)
    bumped = {n: v.clone() for n, v in base.items()}
    for name in ("q", "k", "v", "g", "beta"):
        bumped[name][:, t] = bumped[name][:, t] * 0.5 - 0.3
    o_new, _ = chunk_kda(**bumped)
    assert torch.equal(o_new[:, :t], o_ref[:, :t])
    assert not torch.equal(o_new[:, t], o_ref[:, t])
    if t == 0:
        return
    w = torch.randn(1, t, 2, 8, generator=torch.Generator().manual_seed(5))
    grads = []
    for inputs in (base, bumped):
        leaves = {n: v.clone().requires_grad_() for n, v in inputs.items()}
        o, _ = chunk_kda(**leaves)
        grads.append(dict(zip(leaves, torch.autograd.grad((o[:, :t] * w).sum(), list(leaves.values())))))
    for name in ("q", "k", "v", "g", "beta"):
        assert torch.equal(grads[0][name][:, :t], grads[1][name][:, :t]), name
        assert not grads[0][name][:, t:].any(), name


def test_batch_size_invariance():
    x = make_inputs(4, 90, 2, 16, 8, seed=41)
    x = {n: v.detach() for n, v in x.items()}
    o, f = chunk_kda(**x, output_final_state=True)
    for b in range(4):
        ob, fb = chunk_kda(**{n: v[b : b + 1] for n, v in x.items()}, output_final_state=True)
        assert rel_err(o[b : b + 1], ob) <= 1e-6 and rel_err(f[b : b + 1], fb) <= 1e-6


def test_chunk_states_are_prefix_states():
    lengths = [130, 64, 20]
    cu = torch.tensor([0, 130, 194, 214])
    x = {n: v.detach() for n, v in make_inputs(1, 214, 2, 16, 8, seed=51, n_state=3).items()}
    _, _, states = chunk_kda(**x, cu_seqlens=cu, output_chunk_states=True)
    assert states.shape == (3 + 1 + 1, 2, 16, 8)
    i = 0
    for n, length in enumerate(lengths):
        for c in range(-(-length // 64)):
            s = cu[n].item()
            prefix = {m: v[:, s : s + 64 * c] for m, v in x.items() if m != "initial_state"}
            expected = x["initial_state"][n : n + 1]
            if c:
                _, expected = naive_recurrent_kda(**prefix, initial_state=expected, output_final_state=True)
            assert rel_err(states[i : i + 1], expected) <= 1e-5
            i += 1


def test_bad_inputs_raise():
    x = {n: v.detach() for n, v in make_inputs(2, 8, 2, 16, 8, seed=61).items()}
    cases = [
        dict(q=x["q"][0]),
        dict(k=x["k"][:, :4]),
        dict(v=x["v"][:, :, :1]),
        dict(g=x["g"][..., :8]),
        dict(beta=x["beta"][..., None]),
        dict(initial_state=x["initial_state"][:1]),
        dict(cu_seqlens=torch.tensor([0, 4, 8])),  # B = 2 with packed sequences
    ]
    for bad in cases:
        with pytest.raises(ValueError):
            chunk_kda(**{**x, **bad})
    one = {n: v[:1] for n, v in x.items()}
    for cu in (torch.tensor([0, 5, 3, 8]), torch.tensor([0, 4, 7]), torch.tensor([0.0, 8.0]), torch.tensor([8])):
        with pytest.raises(ValueError):
            chunk_kda(**{**one, "initial_state": None}, cu_seqlens=cu)
    with pytest.raises(ValueError):
        chunk_kda(**x, options=KDAOptions(A_log=torch.zeros(2)))  # no dt_bias
    with pytest.raises(ValueError):
        chunk_kda(**x, options=KDAOptions(lower_bound=-5.0))  # bounded gate without A_log
    with pytest.raises(ValueError, match="without A_log"):
        chunk_kda(**x, options=KDAOptions(dt_bias=torch.zeros(32)))  # a gate bias that would be ignored
    with pytest.raises(ValueError, match="dt_bias H \\* K = 32"):
        chunk_kda(**x, options=KDAOptions(A_log=torch.zeros(2), dt_bias=torch.zeros(16)))


def test_host_offsets_give_identical_results():
    """cu_seqlens_host (the offsets as Python ints) changes nothing: outputs, states and gradients bit for bit."""
    lengths = [5, 64, 0, 77, 1]
    host = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    cu = torch.tensor(host, dtype=torch.int32)
    x = make_inputs(1, sum(lengths), 2, 16, 8, seed=71, fused=True, n_state=len(lengths))
    do, dh = cotangents(x["v"].shape, x["initial_state"].shape, seed=71)
    o, f, grads = grads_for(chunk_kda, x, do, dh, cu_seqlens=cu, flags=options(True))
    o_h, f_h, grads_h = grads_for(chunk_kda, x, do, dh, cu_seqlens=cu, cu_seqlens_host=host, flags=options(True))
    assert torch.equal(o, o_h) and torch.equal(f, f_h)
    assert all(torch.equal(grads[n], grads_h[n]) for n in grads)
    plain = {n: t.detach() for n, t in make_inputs(1, sum(lengths), 2, 16, 8, seed=72, n_state=5).items()}
    a = naive_recurrent_kda(**plain, cu_seqlens=cu, output_final_state=True)
    b = naive_recurrent_kda(**plain, cu_seqlens=cu, cu_seqlens_host=tuple(host), output_final_state=True)
    assert all(torch.equal(s, t) for s, t in zip(a, b))


def test_host_offsets_read_nothing_from_the_device():
    """With cu_seqlens_host, the forward and backward of the PyTorch chunk path and the token loop read no tensor
    value on the host (each would be a device synchronisation on CUDA)."""
    host = [0, 20, 20, 90]
    cu = torch.tensor(host)
    x = make_inputs(1, 90, 2, 16, 8, seed=73, fused=True, n_state=3)
    with no_host_reads():
        o, final, _ = kda_call(chunk_kda, x, options(True), cu_seqlens=cu, cu_seqlens_host=host,
                               output_final_state=True, output_chunk_states=True)
        (o.sum() + final.sum()).backward()
        plain = {n: t.detach() for n, t in x.items() if n not in ("A_log", "dt_bias")}
        naive_recurrent_kda(**plain, cu_seqlens=cu, cu_seqlens_host=host)
    with pytest.raises(HostReadError), no_host_reads():  # without the host copy the offsets are read back
        kda_call(chunk_kda, x, options(True), cu_seqlens=cu)


def test_bad_host_offsets_raise():
    x = {n: v.detach() for n, v in make_inputs(1, 8, 2, 16, 8, seed=74, n_state=2).items()}
    cu = torch.tensor([0, 3, 8])
    for host, match in (([0, 8], "2 offsets"), ([0, 9, 8], "rise"), ([0, 3, 7], "rise")):
        with pytest.raises(ValueError, match=match):
            chunk_kda(**x, cu_seqlens=cu, cu_seqlens_host=host)
    with pytest.raises(ValueError, match="without cu_seqlens"):
        chunk_kda(**{**x, "initial_state": None}, cu_seqlens_host=[0, 8])
