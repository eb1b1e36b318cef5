"""kimi-linear: a complete, fast, readable implementation of Moonshot AI's Kimi Linear architecture."""

from kimi_linear.cache import HybridCache
from kimi_linear.config import PRESETS, KimiLinearConfig
from kimi_linear.model import CausalLMOutput, KimiLinearForCausalLM

__all__ = ["PRESETS", "CausalLMOutput", "HybridCache", "KimiLinearConfig", "KimiLinearForCausalLM"]
__version__ = "0.1.0"
