"""Parity with transformers' native ``kimi_linear`` (an independent implementation): weights created by
transformers, saved in the Hugging Face layout, loaded by us."""

import pytest
import torch

from kimi_linear import KimiLinearForCausalLM

transformers = pytest.importorskip("transformers")


def hf_model(seed: int, layers: int, mla_layers: list[int], experts: int, top_k: int, groups: int = 1):
    cfg = transformers.KimiLinearConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, num_experts=experts, num_experts_per_token=top_k, num_shared_experts=1,
        num_expert_group=groups, topk_group=1,
        linear_attn_config={
            "kda_layers": [i for i in range(1, layers + 1) if i not in mla_layers],
            "full_attn_layers": mla_layers, "num_heads": 2, "head_dim": 16, "short_conv_kernel_size": 4,
        },
        first_k_dense_replace=1, pad_token_id=0, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = transformers.KimiLinearForCausalLM(cfg).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):  # exercise selection-only bias semantics
                module.e_score_correction_bias.normal_(0, 0.05)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


CASES = [  # (seed, layers, mla layers (1-indexed), experts, top_k, groups)
    (0, 4, [4], 8, 2, 1),
    (1, 4, [2], 8, 3, 1),
    (2, 5, [1, 4], 16, 4, 4),
]


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(tmp_path, case):
    seed, layers, mla, experts, top_k, groups = case
    hf = hf_model(seed, layers, mla, experts, top_k, groups)
    hf.save_pretrained(tmp_path)
    ours = KimiLinearForCausalLM.from_pretrained(tmp_path).eval()
    gen = torch.Generator().manual_seed(seed)
    for length in (1, 37, 64, 100, 130):
        ids = torch.randint(3, 512, (2, length), generator=gen)
        with torch.no_grad():
            ref = hf(ids).logits
            out = ours(ids).logits
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel <= 1e-5, f"length {length}: relative error {rel:.2e}"


def test_greedy_generation_matches_transformers(tmp_path):
    hf = hf_model(3, 4, [4], 8, 2)
    hf.save_pretrained(tmp_path)
    ours = KimiLinearForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 512, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = ours.generate(ids, 16, eos_token_id=[])
    assert ref.shape == (2, 37)
    assert torch.equal(out, ref)
