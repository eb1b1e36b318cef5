"""kimi-linear: a complete, fast, readable implementation of Moonshot AI's Kimi Linear architecture."""

from kimi_linear.cache import CachePool, HybridCache, cache_spec
from kimi_linear.config import PRESETS, KimiLinearConfig
from kimi_linear.model import CausalLMOutput, KimiLinearForCausalLM
from kimi_linear.step import Snapshot, StepMetadata

__all__ = ["PRESETS", "CachePool", "CausalLMOutput", "HybridCache", "KimiLinearConfig", "KimiLinearForCausalLM",
           "Snapshot", "StepMetadata", "cache_spec"]
__version__ = "0.1.0"
