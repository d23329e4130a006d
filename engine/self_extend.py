"""Self-Extend (LongLM, Jin et al. 2024): grouped positions beyond a neighbour window, as a position scheme.

With group size G and neighbour window W, a query at absolute position i and a key at j <= i use:

  neighbour   i - j <  W    query i                          key j          (relation 0: exact distance)
  group       i - j >= W    query floor(i/G) + W - floor(W/G)  key floor(j/G)  (relation 1)

so a grouped distance is floor(i/G) - floor(j/G) + W - floor(W/G): it continues the neighbour distances
(W at i - j = W when G divides W) and grows G times slower. One softmax covers all keys. G = 1 is plain RoPE,
and so is any sequence no longer than W. This is the reference code's definition (datamllab/LongLM,
self_extend_patch/Llama.py: ``query_position // G + W - W // G``, ``key_position // G``, neighbour mask
i - j < W), not llama.cpp's ``--grp-attn-n/--grp-attn-w`` driver, which keeps one position per cached key and
divides whole blocks of W cached positions by G as the sequence grows (``llama_kv_cache_seq_div``): there the
last 0..W-1 tokens keep exact positions and every older key has its grouped position for every query. The
flags keep llama.cpp's names; design.md §3b says why the reference definition.

Cache: keys are cached rotated at their group position floor(j/G) (the relation almost every pair uses);
the neighbour relation's keys — at most W + (query tile) of them per query tile — are rotated on from there
by j - floor(j/G) (``key_tile``), so the cache holds one copy of each key.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .rope import RotaryTable, attention_factor
from .tiled_attention import PositionScheme

NEIGHBOUR, GROUP = 0, 1


@dataclass(frozen=True)
class SelfExtendConfig(PositionScheme):
    """group_size G (llama.cpp --grp-attn-n), window W (--grp-attn-w): neighbour window in tokens."""

    group_size: int
    window: int

    n_relations = 2

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ConfigError(f"Self-Extend group size (--grp-attn-n) must be at least 1, got {self.group_size}")
        if self.window < 1:
            raise ConfigError(f"Self-Extend neighbour window (--grp-attn-w) must be positive, got {self.window}")

    def largest_position(self, context: int) -> int:
        """The largest relative distance a query within `context` tokens uses (compare: the training length)."""
        last = context - 1  # the last query; its farthest key is 0
        if last < self.window:
            return last
        return max(self.window - 1, last // self.group_size + self.window - self.window // self.group_size)

    def query_positions(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i = np.asarray(i)
        return i, i // self.group_size + self.window - self.window // self.group_size

    def key_positions(self, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        j = np.asarray(j)
        return j, j // self.group_size

    def cached_key_positions(self, j: np.ndarray) -> np.ndarray:
        return self.key_positions(j)[GROUP]

    def relation(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return (np.asarray(i) - np.asarray(j) >= self.window).astype(np.int8)

    def key_tile(self, rel: int, cached: np.ndarray, j: np.ndarray, rotary: RotaryTable) -> np.ndarray:
        """Group keys as cached; neighbour keys rotated on by j - floor(j/G) (to position j)."""
        if rel == GROUP:
            return cached
        rotated = rotary.rotate(cached, j - j // self.group_size)
        mscale = attention_factor(rotary.rope)  # rotate() scales by it: the cached keys already carry it once
        if mscale != 1.0:
            rotated[..., :rotary.rope.dim] /= rotated.dtype.type(mscale)
        return rotated
