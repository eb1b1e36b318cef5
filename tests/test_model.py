import pytest
import torch
import torch.nn.functional as F

from kimi_linear import HybridCache, KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.generation import sample_next


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = KimiLinearForCausalLM(KimiLinearConfig.from_preset("test")).eval()
    with torch.no_grad():  # non-trivial router bias and norms
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return m


def ids(*shape, seed=0):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(model):
    x = ids(3, 90)
    full = model(x).logits
    cache = HybridCache(model.config, 3, 90, device="cpu", dtype=torch.float32)
    parts = [model(x[:, :40], cache=cache).logits,  # prefill (chunk path)
             model(x[:, 40:70], cache=cache).logits]  # chunked prefill continuing from the states
    parts += [model(x[:, t:t + 1], cache=cache).logits for t in range(70, 87)]  # decode (recurrent, absorbed)
    parts.append(model(x[:, 87:], cache=cache).logits)  # a 3-token step
    assert rel(torch.cat(parts, 1), full) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("how", ["position_ids", "cu_seqlens"])
def test_packed_sequences_do_not_interact(model, how):
    lengths = [30, 1, 70, 17]
    docs = [ids(1, n, seed=i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, 1)
    if how == "position_ids":
        out = model(packed, position_ids=torch.cat([torch.arange(n) for n in lengths])[None]).logits
    else:
        out = model(packed, cu_seqlens=torch.tensor([0, 30, 31, 101, 118])).logits
    separate = torch.cat([model(d).logits for d in docs], 1)
    assert rel(out, separate) <= 1e-5


@torch.no_grad()
def test_packed_rows_in_a_batch(model):
    a, b, c = ids(1, 50, seed=1), ids(1, 14, seed=2), ids(1, 64, seed=3)
    rows = torch.cat([torch.cat([a, b], 1), c])
    pos = torch.stack([torch.cat([torch.arange(50), torch.arange(14)]), torch.arange(64)])
    out = model(rows, position_ids=pos).logits
    assert rel(out[0, :50], model(a).logits[0]) <= 1e-5
    assert rel(out[0, 50:], model(b).logits[0]) <= 1e-5
    assert rel(out[1], model(c).logits[0]) <= 1e-5


@torch.no_grad()
def test_causality(model):
    x = ids(1, 80)
    base = model(x).logits
    y = x.clone()
    y[0, 50] = (y[0, 50] + 1) % 256
    changed = model(y).logits
    assert torch.equal(changed[0, :50], base[0, :50])
    assert not torch.allclose(changed[0, 50:], base[0, 50:])


def test_loss_is_mean_next_token_cross_entropy(model):
    x = ids(2, 33)
    out = model(x, labels=x)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), x[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, ref)
    pos = torch.cat([torch.arange(20), torch.arange(13)])[None].expand(2, -1)
    packed = model(x, labels=x, position_ids=pos)
    targets = x[:, 1:].clone()
    targets[:, 19] = -100  # the first token of the second document is not predicted
    ref = F.cross_entropy(packed.logits[:, :-1].reshape(-1, packed.logits.shape[-1]), targets.reshape(-1),
                          ignore_index=-100)
    assert torch.allclose(packed.loss, ref)


def test_backward_and_activation_checkpointing(model):
    x = ids(2, 70)
    model.train()
    try:
        model.zero_grad()
        out = model(x, labels=x, balance_loss_coef=1e-2)
        assert out.aux_loss is not None and out.aux_loss > 0
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert "model.layers.0.self_attn.A_log" in grads and "model.layers.1.block_sparse_moe.gate.weight" in grads
        model.zero_grad()
        model.set_activation_checkpointing(True)
        model(x, labels=x, balance_loss_coef=1e-2).loss.backward()
        for n, p in model.named_parameters():
            if n in grads:
                assert torch.allclose(p.grad, grads[n], rtol=1e-4, atol=1e-6), n
    finally:
        model.set_activation_checkpointing(False)
        model.zero_grad()
        model.eval()
    assert all(m.last_expert_load.sum() == 2 * 70 * model.config.num_experts_per_token for m in model.moe_layers())


def test_left_padding_never_changes_other_sequences(model):
    prompts = [ids(1, n, seed=10 + n)[0] for n in (5, 23, 12)]
    T = max(len(p) for p in prompts)
    batch = torch.full((3, T), model.config.pad_token_id)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    out = model.generate(batch, 12, attention_mask=mask, eos_token_id=[])
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], 12, eos_token_id=[])
        assert torch.equal(out[i, T:], alone[0, len(p):]), i
    with torch.no_grad():  # and the prompt logits of the real tokens match too
        padded = model(batch, attention_mask=mask).logits
        for i, p in enumerate(prompts):
            assert rel(padded[i, T - len(p):], model(p[None]).logits[0]) <= 1e-5


def test_generation_stops_at_eos_and_pads(model):
    x = ids(2, 6)
    first = model.generate(x, 1, eos_token_id=[])[:, -1]
    out = model.generate(x, 10, eos_token_id=int(first[0]))
    assert out[0, 6] == first[0]
    assert (out[0, 7:] == model.config.pad_token_id).all()


def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]]).repeat(200, 1)
    assert (sample_next(logits) == 1).all()
    g = torch.Generator().manual_seed(0)
    assert (sample_next(logits, temperature=1.0, top_k=1, generator=g) == 1).all()
    assert (sample_next(logits, temperature=1.0, top_p=0.01, generator=g) == 1).all()
    two = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    assert set(two.tolist()) == {1, 2}
    nucleus = sample_next(logits, temperature=1.0, top_p=0.8, generator=g)  # p = .63, .23, .09, .05
    assert set(nucleus.tolist()) == {1, 2}


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="token ids must be in"):
        model(torch.tensor([[0, model.config.vocab_size]]))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\]"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="at most one of"):
        model(ids(1, 4), position_ids=torch.arange(4)[None], attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        model(ids(1, 4), cu_seqlens=torch.tensor([0, 3, 2, 4]))
    with pytest.raises(ValueError, match="max_new_tokens must be a positive"):
        model.generate(ids(1, 4), 0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids(1, 4), 2, top_p=0.0)


@torch.no_grad()
def test_bf16_model_prefill_and_decode(model):
    half = KimiLinearForCausalLM(model.config).to(torch.bfloat16).eval()
    half.load_state_dict(model.state_dict())
    x = ids(2, 20)
    full = half(x).logits
    assert full.dtype == torch.bfloat16
    cache = HybridCache(model.config, 2, 20, device="cpu", dtype=torch.bfloat16)
    steps = torch.cat([half(x[:, :15], cache=cache).logits] +
                      [half(x[:, t:t + 1], cache=cache).logits for t in range(15, 20)], 1)
    assert steps.dtype == torch.bfloat16 and rel(steps.float(), full.float()) <= 2e-2


def test_forcing_triton_keeps_every_gradient(model):
    """Forward-only kernels (conv, norms) must step aside when gradients are needed, even when forced."""
    from kimi_linear.ops.backend import use_backend

    x = ids(1, 20)
    grads = {}
    for choice in ("torch", "triton"):
        model.zero_grad(set_to_none=True)
        with use_backend(choice):
            model(x, labels=x).loss.backward()
        grads[choice] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert grads["triton"].keys() == grads["torch"].keys()
    assert len(grads["torch"]) == len(list(model.parameters()))
    for n in grads["torch"]:
        assert torch.allclose(grads["triton"][n], grads["torch"][n], rtol=1e-3, atol=1e-6), n
