"""The batched sampler: per-row settings, penalties, seeds that ignore the rest of the batch, logprobs."""

from __future__ import annotations

import pytest
import torch

from kimi_linear.sampling import RowState, SamplingParams, filter_logits, sample


def test_greedy_and_filters_per_row():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]]).repeat(4, 1)
    rows = [RowState(SamplingParams(temperature=0)), RowState(SamplingParams(top_k=1)),
            RowState(SamplingParams(top_p=0.01)), RowState(SamplingParams(min_p=0.99))]
    for _ in range(20):
        assert sample(logits, rows).tokens == [1, 1, 1, 1]
    kept = filter_logits(torch.tensor([[1.0, 3.0, 2.0, 0.5]] * 3), torch.tensor([2, 0, 0]),
                         torch.tensor([1.0, 0.8, 1.0]), torch.tensor([0.0, 0.0, 0.3]))
    # probabilities .086, .636, .234, .052
    assert torch.isfinite(kept).tolist() == [[False, True, True, False],  # top-2
                                             [False, True, True, False],  # top-p 0.8: .636 + .234 reach it
                                             [False, True, True, False]]  # min-p 0.3: at least .19


def test_sampling_matches_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.tensor(sample(logits, [RowState(SamplingParams())] * 4000, g).tokens)
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


def test_a_seed_gives_the_same_tokens_whatever_else_is_in_the_batch():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1))

    def draw(rows_before: int) -> list[int]:
        gen = torch.Generator().manual_seed(42)
        mine = RowState(SamplingParams(temperature=1.0), generator=gen)
        others = [RowState(SamplingParams(temperature=0.7)) for _ in range(rows_before)]
        out = []
        for _ in range(10):
            batch = torch.cat([logits[:rows_before], logits[4:5]])
            out.append(sample(batch, [*others, mine], torch.Generator().manual_seed(len(out))).tokens[-1])
        return out

    assert draw(0) == draw(4)


def test_penalties():
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.0]])
    rep = RowState(SamplingParams(temperature=0, repetition_penalty=2.0), prompt_ids=[0])
    assert sample(logits, [rep]).tokens == [1]  # 2.0 / 2 < 1.9
    pres = RowState(SamplingParams(temperature=0, presence_penalty=0.2), output_ids=[0])
    assert sample(logits, [pres]).tokens == [1]
    freq = RowState(SamplingParams(temperature=0, frequency_penalty=0.06), output_ids=[0, 0])
    assert sample(logits, [freq]).tokens == [1]  # 2.0 - 0.12 < 1.9
    held = RowState(SamplingParams(temperature=0, min_tokens=2), output_ids=[3], stop_ids=[0])
    assert sample(logits, [held]).tokens == [1]
    done = RowState(SamplingParams(temperature=0, min_tokens=1), output_ids=[3], stop_ids=[0])
    assert sample(logits, [done]).tokens == [0]


def test_logprobs_are_the_models_own():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    rows = [RowState(SamplingParams(temperature=0, logprobs=2)), RowState(SamplingParams(temperature=0.5))]
    out = sample(logits, rows)
    ref = logits[0].log_softmax(-1)
    assert out.tokens[0] == 2 and out.logprob[0] == pytest.approx(ref[2].item())
    assert [t for t, _ in out.top[0]] == [2, 1] and out.top[0][1][1] == pytest.approx(ref[1].item())
    assert out.logprob[1] is None and out.top[1] == []


@pytest.mark.parametrize("field, value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
                                          ("min_p", 2.0), ("presence_penalty", 3.0), ("repetition_penalty", 0.0),
                                          ("max_tokens", 0), ("n", 0), ("logprobs", 21), ("stop_token_ids", [999])])
def test_validation_names_the_field(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=field):
        params.validate(vocab_size=100)
