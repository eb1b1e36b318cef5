"""The model step over the pools: a mixed step (decodes, chunked prefill with context, fresh prompts) in scattered
slots and blocks equals each sequence's own full forward; snapshots restore exactly; the forward reads nothing back
from the device; the metadata producer refuses what the layers could not serve."""

from __future__ import annotations

import pytest
import torch
from sync_guard import no_host_reads

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.cache import CachePool, HybridCache, cache_spec
from kimi_linear.step import Snapshot, StepMetadata

BS = 8  # latent block size


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = KimiLinearForCausalLM(KimiLinearConfig.from_preset("test")).eval()
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return m


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


class Pools:
    """A pool with slots and blocks handed out in a scrambled order, and the sequences placed in it."""

    def __init__(self, model, num_slots=12, num_blocks=64):
        self.pool = CachePool(model.config, num_slots, num_blocks, block_size=BS, device="cpu", dtype=torch.float32)
        for p in [*self.pool.kda_state.values(), *self.pool.conv_state.values(), *self.pool.mla_latent.values()]:
            p.fill_(float("nan"))  # nothing that was never written may be read
        gen = torch.Generator().manual_seed(1)
        self.free_slots = (torch.randperm(num_slots - 1, generator=gen) + 1).tolist()
        self.free_blocks = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
        self.slot, self.blocks, self.length = {}, {}, {}

    def place(self, name: str, total: int) -> None:
        self.slot[name] = self.free_slots.pop()
        self.blocks[name] = [self.free_blocks.pop() for _ in range(-(-total // BS))]
        self.length[name] = 0

    def step(self, model, runs: list[tuple[str, torch.Tensor]], num_decodes=0, snapshots=()):
        meta = StepMetadata.build([len(t) for _, t in runs], [self.length[n] for n, _ in runs], device="cpu",
                                  num_decodes=num_decodes, state_slots=[self.slot[n] for n, _ in runs],
                                  block_tables=[self.blocks[n] for n, _ in runs], block_size=BS, snapshots=snapshots)
        for name, t in runs:
            self.length[name] += len(t)
        with torch.no_grad():
            hidden = model.forward_step(torch.cat([t for _, t in runs]), meta, self.pool)
        return model.compute_logits(hidden), meta


def full_logits(model, ids):
    with torch.no_grad():
        return model(ids[None]).logits[0]


def test_mixed_step_equals_full_forwards(model):
    a, b, c, d = tokens(75, 1), tokens(140, 2), tokens(9, 3), tokens(66, 4)
    pools = Pools(model)
    for name, t in zip("abcd", (a, b, c, d)):
        pools.place(name, len(t) + 2)
    first, _ = pools.step(model, [("a", a[:74]), ("b", b[:64]), ("d", d[:65])])
    # decodes (a, d) first, then a chunk of b over its cached context, then c from scratch
    second, meta = pools.step(model, [("a", a[74:]), ("d", d[65:66]), ("b", b[64:139]), ("c", c)], num_decodes=2)
    assert meta.num_decodes == 2 and meta.query_lens == (1, 1, 75, 9)
    ref = {n: full_logits(model, t) for n, t in zip("abcd", (a, b, c, d))}
    assert rel(first[:74], ref["a"][:74]) < 1e-5 and rel(first[74:138], ref["b"][:64]) < 1e-5
    assert rel(second[0], ref["a"][74]) < 1e-5 and rel(second[1], ref["d"][65]) < 1e-5
    assert rel(second[2:77], ref["b"][64:139]) < 1e-5 and rel(second[77:], ref["c"]) < 1e-5


def test_snapshots_restore_exactly(model):
    """States written at interior 64-token boundaries and at the end of a prefill piece continue exactly."""
    x = tokens(150, 5)
    pools = Pools(model)
    pools.place("x", 160)
    snap64, snap128, snap_end = (pools.free_slots.pop() for _ in range(3))
    pools.step(model, [("x", x[:140])], snapshots=[Snapshot(0, 64, snap64), Snapshot(0, 128, snap128),
                                                  Snapshot(0, 140, snap_end)])
    ref = full_logits(model, x)
    for depth, slot in ((64, snap64), (128, snap128), (140, snap_end)):
        name = f"from{depth}"
        pools.slot[name] = slot
        pools.blocks[name] = pools.blocks["x"]  # the latents before `depth` are the same
        pools.length[name] = depth
        logits, _ = pools.step(model, [(name, x[depth:depth + 10])])
        assert rel(logits, ref[depth:depth + 10]) < 1e-5, depth
        pools.blocks[name] = []  # (the continuation overwrote x's latents past depth: same values)


def test_forward_reads_nothing_back_from_the_device(model):
    """A mixed step with decodes, context, snapshots and an uneven batch: no `.item()`, `.tolist()`, nonzero, mask
    indexing or data-dependent shapes inside the forward (on CUDA these synchronise with the host)."""
    pools = Pools(model)
    a, b = tokens(40, 6), tokens(70, 7)
    pools.place("a", 50)
    pools.place("b", 80)
    pools.step(model, [("a", a[:39]), ("b", b[:3])])
    meta = StepMetadata.build([1, 67], [39, 3], device="cpu", num_decodes=1,
                              state_slots=[pools.slot["a"], pools.slot["b"]],
                              block_tables=[pools.blocks["a"], pools.blocks["b"]], block_size=BS,
                              snapshots=[Snapshot(1, 64, pools.free_slots.pop())])
    ids = torch.cat([a[39:], b[3:]])
    with torch.no_grad(), no_host_reads():
        model.forward_step(ids, meta, pools.pool)
    with torch.no_grad(), no_host_reads():  # and a batch of unequal documents without a cache
        model.forward_step(torch.cat([a, b]), StepMetadata.build([40, 70], device="cpu"))


def test_producer_refuses_what_the_layers_cannot_serve():
    with pytest.raises(ValueError, match="decode rows must bring one token"):
        StepMetadata.build([2], [5], device="cpu", num_decodes=1, state_slots=[1], block_tables=[[1]], block_size=8)
    with pytest.raises(ValueError, match="block table has only 1 blocks"):
        StepMetadata.build([9], device="cpu", state_slots=[1], block_tables=[[1]], block_size=8)
    with pytest.raises(ValueError, match="multiple of 64"):
        StepMetadata.build([100], device="cpu", state_slots=[1], block_tables=[list(range(1, 14))], block_size=8,
                           snapshots=[Snapshot(0, 50, 2)])
    with pytest.raises(ValueError, match="need a cache"):
        StepMetadata.build([3], [4], device="cpu")


def test_cache_spec_and_static_batch():
    config = KimiLinearConfig.from_preset("kimi-linear-48b-a3b")
    spec = cache_spec(config, torch.bfloat16, block_size=64)
    assert spec.bytes_per_token == 8064  # 7 MLA layers x 576 latent values x 2 bytes
    assert spec.bytes_per_slot == 20 * (32 * 128 * 128 * 4 + 3 * 4096 * 3 * 2)
    cache = HybridCache(KimiLinearConfig.from_preset("test"), 2, 20, device="cpu", dtype=torch.float32,
                        block_size=8)
    meta = cache.step([1, 0], [5, 3])
    assert cache.lengths == [3, 5] and meta.state_slots.tolist() == [2, 1]
    with pytest.raises(ValueError, match="would exceed"):
        cache.step([0], [18])


def test_triton_kernels_serve_the_same_step(model):
    """The mixed step through the Triton kernels (interpreted on the CPU: chunk KDA with initial states and chunk
    states, the decode kernel on the slot pool, the conv and norm kernels, the paged MLA decode) equals the PyTorch
    path."""
    from kimi_linear.ops.backend import use_backend

    a, b = tokens(70, 8), tokens(30, 9)
    results = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            pools = Pools(model)
            pools.place("a", 80)
            pools.place("b", 40)
            first, _ = pools.step(model, [("a", a[:69]), ("b", b[:20])],
                                  snapshots=[Snapshot(0, 64, pools.free_slots.pop())])
            second, _ = pools.step(model, [("a", a[69:]), ("b", b[20:])], num_decodes=1)
            results[backend] = torch.cat([first, second])
    assert rel(results["triton"], results["torch"]) < 1e-4
