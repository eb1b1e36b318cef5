"""The routing-weights switch ``moe_weights_from_biased_scores`` (the released remote code's convention): it changes
the routing weights and nothing else."""

from __future__ import annotations

import pytest
import torch

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.ops.moe import route


@pytest.mark.parametrize("groups", [1, 4])
def test_switch_changes_only_the_weights(groups):
    x, gate = torch.randn(64, 16), torch.randn(8, 16)
    bias = torch.randn(8) * 0.1
    kw = dict(top_k=2, num_expert_group=groups, topk_group=2 if groups > 1 else 1, routed_scaling_factor=2.446)
    w, idx, scores = route(x, gate, bias, **kw)
    w_b, idx_b, scores_b = route(x, gate, bias, weights_from_biased_scores=True, **kw)
    assert torch.equal(idx_b, idx) and torch.equal(scores_b, scores)
    biased = (scores + bias).gather(1, idx)
    torch.testing.assert_close(w_b, biased / biased.sum(-1, keepdim=True) * 2.446)
    assert not torch.allclose(w_b, w)


def model_with(config: KimiLinearConfig, state: dict) -> KimiLinearForCausalLM:
    model = KimiLinearForCausalLM(config).eval()
    model.load_state_dict(state)
    return model


@torch.no_grad()
def test_model_forward_depends_on_the_switch_only_through_the_bias():
    """Zero correction bias: the switch changes nothing in a forward. Non-zero bias: the logits move."""
    torch.manual_seed(0)
    config = KimiLinearConfig.from_preset("test")
    state = KimiLinearForCausalLM(config).state_dict()
    switched = KimiLinearConfig.from_preset("test", moe_weights_from_biased_scores=True)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    plain, biased = model_with(config, state), model_with(switched, state)
    assert torch.equal(plain(ids).logits, biased(ids).logits)
    for model in (plain, biased):
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.1, 0.1, config.num_experts))
    assert not torch.allclose(plain(ids).logits, biased(ids).logits)
