"""Decode-only steps in padded batches (the shape CUDA graphs replay): padding rows change no real row and touch
nothing but the padding slot and block; on a GPU, graph replay equals the eager padded step bit for bit."""

from __future__ import annotations

import pytest
import torch

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.cache import CachePool
from kimi_linear.engine.cuda_graphs import DecodeGraphs
from kimi_linear.step import StepMetadata

BS = 8


def setup(device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(KimiLinearConfig.from_preset("test")).to(device, dtype).eval()
    pool = CachePool(model.config, 8, 32, block_size=BS, device=device, dtype=dtype)
    for p in [*pool.kda_state.values(), *pool.conv_state.values(), *pool.mla_latent.values()]:
        p.normal_()  # the padding slot and block hold garbage: nothing real may depend on it
    slots, tables = [3, 5, 1], [[4, 9], [2], [7, 8, 10]]
    lengths = [13, 6, 20]
    for slot, table, n in zip(slots, tables, lengths):  # prefill three sequences
        ids = torch.randint(0, 256, (n,), device=device)
        meta = StepMetadata.build([n], device=device, state_slots=[slot], block_tables=[table], block_size=BS)
        with torch.no_grad():
            model.forward_step(ids, meta, pool)
    return model, pool, slots, tables, lengths


def snapshot(pool: CachePool) -> list[torch.Tensor]:
    return [p.clone() for p in [*pool.kda_state.values(), *pool.conv_state.values(), *pool.mla_latent.values()]]


@torch.no_grad()
def test_padding_rows_change_nothing_real():
    model, pool, slots, tables, lengths = setup("cpu", torch.float32)
    ids = [11, 22, 33]
    before = snapshot(pool)
    meta = StepMetadata.build([1, 1, 1], lengths, device="cpu", num_decodes=3, state_slots=slots, block_tables=tables,
                              block_size=BS)
    plain = model.forward_step(torch.tensor(ids), meta, pool)
    after_plain = snapshot(pool)
    for p, saved in zip([*pool.kda_state.values(), *pool.conv_state.values(), *pool.mla_latent.values()], before):
        p.copy_(saved)
    padded = DecodeGraphs(model, pool, max_batch=8, max_blocks=4, graphs=False).run(ids, slots, tables, lengths)
    assert torch.allclose(padded, plain, rtol=1e-5, atol=1e-6)  # 3 rows in a bucket of 4: one padding row
    for got, want in zip(snapshot(pool), after_plain):  # real slots and blocks (not the padding 0) as unpadded
        assert torch.allclose(got[1:], want[1:], rtol=1e-5, atol=1e-6)
    assert not any(t.isnan().any() for t in snapshot(pool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_graph_replay_equals_eager_bit_for_bit():
    results = []
    for graphs in (False, True):
        model, pool, slots, tables, lengths = setup("cuda", torch.bfloat16)
        runner = DecodeGraphs(model, pool, max_batch=8, max_blocks=4, graphs=graphs)
        out = [runner.run([11, 22, 33], slots, tables, lengths)]
        out.append(runner.run([44, 55, 66], slots, tables, [n + 1 for n in lengths]))
        out.append(runner.run([77], slots[:1], tables[:1], [lengths[0] + 2]))
        results.append((torch.cat(out), snapshot(pool)))
    (eager, eager_pool), (graph, graph_pool) = results
    assert torch.equal(graph, eager)
    for a, b in zip(graph_pool, eager_pool):
        assert torch.equal(a[1:], b[1:])
