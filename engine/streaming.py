"""StreamingLLM (Xiao et al. 2023): attention sinks + a recent window, positions by place in the cache.

With S sink tokens and a window of R tokens, the query at absolute position i attends the keys [0, S) and
(i - R, i] (itself included), as streaming-llm's StartRecentKVCache keeps them (mit-han-lab/streaming-llm,
``evict_for_space``: the first S and the last R entries once the new token is in), and their RoPE positions
are places in that cache (pos_shift: keys rotated at 0 .. cache length - 1, the query at the last place).
While nothing is evicted (i < S + R - 1) that is plain causal attention. After that the sinks sit at places
0..S-1, the window at S..S+R-1, the query at S+R-1, and since RoPE scores depend only on the difference of
positions:

  window key j (i - R < j <= i)   distance i - j                 query i,                key j  (relation 0)
  sink key j   (j < S)            distance min(i, S+R-1) - j     query min(i, S+R-1),    key j  (relation 1)

so keys are cached rotated at their absolute position j (as without any extension) and a query uses two
rotations. tests/test_streaming.py checks this against the literal cache-place definition. The KV cache
keeps every key (sessions may cut a sequence back); attention reads only the S + R it needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .tiled_attention import PositionScheme

WINDOW, SINK = 0, 1


@dataclass(frozen=True)
class StreamingConfig(PositionScheme):
    """sinks S (--streaming-sinks), window R (--streaming-window): recent tokens attended, the query included."""

    sinks: int
    window: int

    n_relations = 2

    def __post_init__(self) -> None:
        if self.sinks < 0:
            raise ConfigError(f"StreamingLLM sinks (--streaming-sinks) must be 0 or more, got {self.sinks}")
        if self.window < 1:
            raise ConfigError(f"StreamingLLM window (--streaming-window) must be positive, got {self.window}")

    @property
    def cache_size(self) -> int:
        """S + R: the keys a query attends at most (the query's place is S + R - 1)."""
        return self.sinks + self.window

    def query_positions(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i = np.asarray(i)
        return i, np.minimum(i, self.cache_size - 1)

    def relation(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        shape = np.broadcast_shapes(np.shape(i), np.shape(j))
        return np.broadcast_to(np.asarray(j) < self.sinks, shape).astype(np.int8)

    def visible(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        i, j = np.asarray(i), np.asarray(j)
        return (j <= i) & ((j < self.sinks) | (j > i - self.window))

    def key_spans(self, pos_min: int, pos_max: int) -> list[tuple[int, int]]:
        """The sinks, then the keys of the tile's windows (pos_min - R, pos_max]."""
        sink_end = min(self.sinks, pos_max + 1)
        window_start = max(self.sinks, pos_min - self.window + 1)
        spans = [(0, sink_end), (window_start, pos_max + 1)]
        return [(a, b) for a, b in spans if b > a]

    def hides_in_tile(self, pos_min: int, pos_max: int, k0: int, k1: int) -> bool:
        """Causal crossing, or a non-sink key of the tile that fell out of some query's window."""
        return k1 - 1 > pos_min or (k1 > self.sinks and max(k0, self.sinks) <= pos_max - self.window)
