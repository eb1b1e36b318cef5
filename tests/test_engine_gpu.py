"""The engine on CUDA (Triton kernels, CUDA graphs for decode). In fp32, as on the CPU: prefix hits equal misses and
preemption equals an uninterrupted run, token for token. In bf16: a request's greedy tokens do not depend on what
else runs. (A prefix hit continues a prompt on another chunk grid than a miss, so in bf16 their logits differ by
rounding and a random model's near-tied greedy choices can part: exactness is tested in fp32.)"""

from __future__ import annotations

import pytest
import torch

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.engine import EngineConfig, LLMEngine, SamplingParams, SchedulerConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def build(dtype: torch.dtype) -> KimiLinearForCausalLM:
    torch.manual_seed(0)
    # dense FFN: with random routers, bf16 rounding alone flips some tokens' top-k experts (see test_model_gpu.py)
    m = KimiLinearForCausalLM(KimiLinearConfig.from_preset("tiny", num_experts=0)).cuda().to(dtype).eval()
    for name, p in m.named_parameters():
        if name.endswith(("A_log", "dt_bias")):
            p.data = p.data.float()
    return m


@pytest.fixture(scope="module")
def model():
    return build(torch.float32)


@pytest.fixture(scope="module")
def bf16_model():
    return build(torch.bfloat16)


def engine(model, caching=True, blocks=512, interval=128) -> LLMEngine:
    return LLMEngine(model, EngineConfig(SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=1024,
                                                         enable_prefix_caching=caching, snapshot_interval=interval),
                                         num_slots=64, num_blocks=blocks, block_size=64, poison_freed=True))


def prompts(k: int, n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n + 37 * i,), generator=gen).tolist() for i in range(k)]


def test_prefix_hits_equal_misses_on_cuda(model):
    base = prompts(1, 300)[0]
    cases = [base, base + prompts(1, 50, seed=1)[0], base[:256] + prompts(1, 40, seed=2)[0], base]
    hit, miss = engine(model), engine(model, caching=False)
    for tokens in cases:
        assert hit.generate([tokens], GREEDY) == miss.generate([tokens], GREEDY)
    assert hit.scheduler.prefix_cache.stats.state_hits == 3


def test_preemption_on_cuda(model):
    ps = prompts(8, 200)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    roomy, tight = engine(model), engine(model, blocks=24)
    assert tight.generate(ps, params) == roomy.generate(ps, params)
    assert tight.scheduler.num_preemptions > 0


def test_batch_invariance_on_cuda(bf16_model):
    model = bf16_model
    target = prompts(1, 180, seed=3)[0]
    alone = engine(model).generate([target], GREEDY)[0]
    crowd = engine(model)
    crowd_prompts = prompts(20, 60, seed=4)
    out = crowd.generate(crowd_prompts[:10] + [target] + crowd_prompts[10:], GREEDY)
    assert out[10] == alone
