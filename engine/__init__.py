"""A llama.cpp-style LLM inference engine with Dual Chunk Attention for long contexts."""
from .api import LLM, GenerationStats, load
from .config import DCAConfig, ModelConfig, RopeConfig
from .errors import (ConfigError, ContextError, DeviceError, EngineError, ModelFormatError, NumericsError,
                     TokenizerError)
from .sampling import SamplingParams

__all__ = [
    "LLM", "GenerationStats", "load", "DCAConfig", "ModelConfig", "RopeConfig", "SamplingParams",
    "EngineError", "ModelFormatError", "ConfigError", "ContextError", "DeviceError", "NumericsError", "TokenizerError",
]
__version__ = "0.1.0"
