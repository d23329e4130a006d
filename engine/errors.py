"""The one family of errors the engine raises for bad input.

Every user-facing failure (malformed model file, impossible option, prompt beyond the
cache, missing GPU) is an ``EngineError``; the CLI prints its message on one line and
exits non-zero, the API lets callers catch the base class.
"""


class EngineError(Exception):
    """Base class of every error caused by the user's input or environment."""


class ModelFormatError(EngineError):
    """A model file is malformed, truncated, or uses something unsupported."""


class ConfigError(EngineError):
    """An option or model configuration is impossible or inconsistent."""


class TokenizerError(EngineError):
    """The tokenizer cannot be built or cannot process the input."""


class ContextError(EngineError):
    """A prompt or generation does not fit in the context (KV cache)."""


class DeviceError(EngineError):
    """The requested device is unavailable (no CuPy, no GPU, out of memory)."""


class NumericsError(EngineError):
    """The model's arithmetic left the representable range: non-finite logits."""
