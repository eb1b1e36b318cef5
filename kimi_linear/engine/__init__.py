"""The serving engine: continuous batching over the model's flat-token step, with exact prefix caching.

``LLMEngine`` (engine.py) runs steps; ``Scheduler`` (scheduler.py) decides them; ``PrefixCache`` (prefix_cache.py)
keeps reusable prefixes; allocator.py hands out state slots and latent blocks; request.py holds requests, their
completions and what they stream; async_engine.py runs the loop in the background. Nothing below this package
imports it.
"""

from kimi_linear.engine.engine import EngineConfig, LLMEngine, RequestError
from kimi_linear.engine.request import CompletionOutput, RequestOutput, TokenLogprob
from kimi_linear.engine.scheduler import SchedulerConfig
from kimi_linear.sampling import SamplingParams

__all__ = ["CompletionOutput", "EngineConfig", "LLMEngine", "RequestError", "RequestOutput", "SamplingParams",
           "SchedulerConfig", "TokenLogprob"]
