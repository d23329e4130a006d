"""Self-Extend and StreamingLLM as load settings: which one (if any) replaces DCA, and how it is described.

Flags (every command with the load options, engine/options.py):
  --grp-attn-n G --grp-attn-w W        Self-Extend (llama.cpp's names) when G > 1: group size, neighbour window
  --streaming-sinks S --streaming-window R   StreamingLLM when R is given: S sinks (default 4) + R recent tokens
Both replace DCA (``--dca auto`` turns off; ``--dca on`` or DCA chunk settings with them is an error) and exclude each
other. Both backends run them: numpy by tiled_attention.py, CUDA by the same algorithm over CuPy arrays
(backends/cuda/extension.py).
"""
from __future__ import annotations

from .config import DCAConfig
from .errors import ConfigError
from .self_extend import SelfExtendConfig
from .streaming import StreamingConfig

Extension = SelfExtendConfig | StreamingConfig
GRP_ATTN_W_DEFAULT = 512  # llama.cpp's default neighbour window
STREAMING_SINKS_DEFAULT = 4  # StreamingLLM's


def resolve_extension(grp_attn_n: int = 1, grp_attn_w: int = GRP_ATTN_W_DEFAULT,
                      streaming_sinks: int = STREAMING_SINKS_DEFAULT,
                      streaming_window: int | None = None) -> Extension | None:
    """The extension the flags ask for, or None (G = 1 and no window: ordinary attention)."""
    if grp_attn_n < 1:
        raise ConfigError(f"--grp-attn-n must be at least 1 (1 = Self-Extend off), got {grp_attn_n}")
    if grp_attn_n > 1 and streaming_window is not None:
        raise ConfigError("Self-Extend (--grp-attn-n) and StreamingLLM (--streaming-window) exclude each other: "
                          "choose one")
    if grp_attn_n > 1:
        return SelfExtendConfig(group_size=grp_attn_n, window=grp_attn_w)
    if streaming_window is not None:
        return StreamingConfig(sinks=streaming_sinks, window=streaming_window)
    return None


def dca_mode_beside(extension: Extension | None, dca, dca_chunk_size: int | None, dca_local_window: int | None):
    """The DCA mode to plan with: `dca` itself without an extension, else "off". Asking for DCA beside an extension
    (--dca on, a DCAConfig, or chunk settings unless --dca off) is an error: the two are exclusive."""
    if extension is None:
        return dca
    chunk_settings = dca_chunk_size is not None or dca_local_window is not None
    if dca == "on" or isinstance(dca, DCAConfig) or (chunk_settings and dca != "off"):
        raise ConfigError(f"{name(extension)} and DCA exclude each other: drop --dca on / --dca-chunk-size / "
                          f"--dca-local-window, or the {name(extension)} flags")
    return "off"


def require_16bit_cache(extension: Extension | None, device: str, cache_types: tuple[str, str]) -> None:
    """On CUDA the extensions' attention (backends/cuda/extension.py) reads 16-bit cache rows: a q8_0 cache with
    one is refused up front."""
    if extension is not None and device != "cpu" and "q8_0" in cache_types:
        raise ConfigError(f"{name(extension)} on CUDA reads a 16-bit KV cache: drop --cache-type-k/-v q8_0 "
                          f"(or run it with --device cpu)")


def name(extension: Extension) -> str:
    return "Self-Extend" if isinstance(extension, SelfExtendConfig) else "StreamingLLM"


def describe_attention(dca: DCAConfig | None, extension: Extension | None, context: int) -> str:
    """One line naming the attention in force (engine info, generate's summary line)."""
    if isinstance(extension, SelfExtendConfig):
        return (f"Self-Extend: group size {extension.group_size}, neighbour window {extension.window} "
                f"(largest relative position {extension.largest_position(context)})")
    if isinstance(extension, StreamingConfig):
        return f"StreamingLLM: {extension.sinks} sink tokens + a window of {extension.window}"
    if dca is not None:
        return f"DCA: chunk_size {dca.chunk_size}, local_window {dca.local_window}, chunk_len {dca.chunk_len}"
    return "plain causal attention"


def setting(dca: DCAConfig | None, extension: Extension | None) -> str:
    """The layout as a session file records it (cached keys and values depend on it)."""
    if isinstance(extension, SelfExtendConfig):
        return f"self-extend:group_size={extension.group_size},window={extension.window}"
    if isinstance(extension, StreamingConfig):
        return f"streaming:sinks={extension.sinks},window={extension.window}"
    return "off" if dca is None else f"chunk_size={dca.chunk_size},local_window={dca.local_window}"
