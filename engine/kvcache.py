"""Chunk-aware KV cache, preallocated for the context asked for.

Keys are stored already rotated at their DCA key position (``j mod chunk_len``, or ``j`` when
DCA is off), so a cached key never needs re-rotation: its position depends only on itself.
Values are stored as they are. GQA stays grouped: n_kv_heads per token, never repeated.

Layout per layer: k[layer], v[layer] are (capacity, n_kv_heads, head_dim). Buffers are fixed
for the life of the cache (the decode step of a GPU backend can be captured once).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ContextError


class KVCache:
    def __init__(self, n_layers: int, capacity: int, n_kv_heads: int, head_dim: int,
                 dtype: Any = np.float32, xp: Any = np):
        if capacity <= 0:
            raise ContextError(f"context size must be positive, got {capacity}")
        self.capacity = capacity
        # (n_layers, capacity, n_kv_heads, head_dim); zeros are allocated lazily by the OS on the CPU
        self.k = xp.zeros((n_layers, capacity, n_kv_heads, head_dim), dtype=dtype)
        self.v = xp.zeros((n_layers, capacity, n_kv_heads, head_dim), dtype=dtype)
        self.length = 0  # tokens committed so far (positions 0 .. length-1)

    @property
    def free(self) -> int:
        return self.capacity - self.length

    def check_room(self, n_new: int) -> None:
        """Raise before any work if n_new more tokens would not fit."""
        if n_new > self.free:
            raise ContextError(
                f"{self.length + n_new} tokens do not fit in a context of {self.capacity} "
                f"({self.length} already used, {n_new} new); raise the context size with -c/--ctx-size"
            )

    def write(self, layer: int, start: int, k_rotated: Any, v: Any) -> None:
        """Store (n, n_kv_heads, head_dim) keys/values for positions start .. start+n-1."""
        n = k_rotated.shape[0]
        if start != self.length or start + n > self.capacity:
            raise ContextError(
                f"KV cache write at positions {start}..{start + n - 1} does not follow the "
                f"{self.length} cached tokens within capacity {self.capacity}"
            )
        self.k[layer, start:start + n] = k_rotated
        self.v[layer, start:start + n] = v

    def commit(self, n: int) -> None:
        """Mark n more positions as used once every layer has written them."""
        self.check_room(n)
        self.length += n

    def reset(self) -> None:
        self.length = 0
