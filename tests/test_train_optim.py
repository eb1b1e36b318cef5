"""Muon / AdamW, parameter grouping, schedules and gradient clipping (single process)."""

import math

import pytest
import torch

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.train.distributed import clip_grad_norm
from kimi_linear.train.muon import MuonAdamW, build_optimizer, newton_schulz
from kimi_linear.train.schedule import Schedule


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (3, 12, 20)])
def test_newton_schulz_orthogonalises(shape):
    g = torch.randn(*shape, dtype=torch.float64)
    o = newton_schulz(g)
    assert o.shape == g.shape and o.dtype == g.dtype
    sv = torch.linalg.svdvals(o)
    # The quintic iteration pushes every singular value into roughly [0.7, 1.2] (it trades exactness for speed).
    assert sv.min() > 0.6 and sv.max() < 1.25
    # Same singular vectors as the exact polar factor U V^T.
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cos = (o * (u @ vh)).sum((-2, -1)) / (o.norm(dim=(-2, -1)) * (u @ vh).norm(dim=(-2, -1)))
    assert (cos > 0.95).all()


def test_muon_step_matches_formula_and_treats_experts_separately():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 8, 5))  # 3 experts of [8, 5]
    opt = MuonAdamW([dict(params=[w], use_muon=True)], lr=0.1, weight_decay=0.01)
    w_ref, buf = w.detach().clone(), torch.zeros_like(w)
    for _ in range(3):
        g = torch.randn_like(w)
        w.grad = g.clone()
        opt.step()
        buf = 0.95 * buf + g
        update = torch.stack([newton_schulz(g[e] + 0.95 * buf[e]) for e in range(3)])
        w_ref = w_ref * (1 - 0.1 * 0.01) - 0.1 * 0.2 * math.sqrt(8) * update
    torch.testing.assert_close(w.detach(), w_ref, rtol=1e-5, atol=1e-6)


def test_adamw_half_matches_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(10))
    b = torch.nn.Parameter(a.detach().clone())
    ours = MuonAdamW([dict(params=[a], use_muon=False)], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(10)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b)


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="ndim >= 2"):
        MuonAdamW([dict(params=[torch.nn.Parameter(torch.zeros(4))], use_muon=True)])


def test_parameter_groups():
    model = KimiLinearForCausalLM(KimiLinearConfig.from_preset("test"))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "model.layers.0.self_attn.q_proj.weight" in muon
    assert "model.layers.1.block_sparse_moe.experts.gate_up_proj" in muon
    assert "model.layers.1.block_sparse_moe.gate.weight" in muon
    for adamw in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.A_log",
                  "model.layers.0.self_attn.dt_bias", "model.layers.0.self_attn.q_conv1d.weight",
                  "model.norm.weight"):
        assert adamw not in muon
    assert {"model.norm.weight", "model.layers.0.self_attn.A_log"} <= no_decay
    assert "model.embed_tokens.weight" not in no_decay
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_wsd_schedule():
    s = Schedule(total_steps=100, warmup_steps=10, kind="wsd", decay_fraction=0.2, min_lr_ratio=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == s(50) == s(79) == 1.0
    assert s(80) < 1.0 and s(99) == pytest.approx(0.1)
    values = [s(i) for i in range(80, 100)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_cosine_schedule():
    s = Schedule(total_steps=50, warmup_steps=5, kind="cosine", min_lr_ratio=0.0)
    assert s(5) == pytest.approx(1.0)
    assert s(5 + 45 // 2) == pytest.approx(0.5, abs=0.05)
    assert s(49) < 0.01


@pytest.mark.parametrize("kwargs", [dict(kind="linear"), dict(warmup_steps=200), dict(decay_fraction=1.5)])
def test_schedule_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        Schedule(total_steps=100, **kwargs)


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p) * 3
        q.grad = p.grad.clone()
    norm = clip_grad_norm(a, 1.0)
    ref = torch.nn.utils.clip_grad_norm_(b, 1.0)
    torch.testing.assert_close(norm, ref)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)
