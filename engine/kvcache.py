"""Chunk-aware KV cache, preallocated for the context asked for.

Keys are stored already rotated at their DCA key position (``j mod chunk_len``, or ``j`` when
DCA is off), so a cached key never needs re-rotation: its position depends only on itself.
Values are stored as they are. GQA stays grouped: n_kv_heads per token, never repeated.

Layout per layer: k[layer], v[layer] are (capacity, n_kv_heads, head_dim), stored as the cache types
say (kv_storage.py: float arrays, or the ggml bytes of each row for f16/bf16/q8_0/... on the CPU; CUDA's q8_0:
cuda/kv_q8.py). Buffers are fixed for the life of the cache (the decode step of a GPU backend can be captured
once).

Because a key's rotation depends only on its own position, the cache of a sequence truncated to
its first n tokens is exactly the cache a fresh prefill of those n tokens builds: ``truncate(n)``
only sets the length back (sessions reuse a common prompt prefix this way, engine/session.py).
``owner`` names the session whose tokens the cache holds (None after ``reset``).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import numpy as np

from . import row_chunks
from .errors import ContextError
from .kv_storage import EncodedStore, allocate


class KVCache:
    def __init__(self, n_layers: int, capacity: int, n_kv_heads: int, head_dim: int,
                 dtype: Any = np.float32, xp: Any = np, types: tuple[str, str] = ("f32", "f32"),
                 storage: Callable[[str, tuple[int, ...]], Any] | None = None):
        """types: the K and V cache types (kv_storage.CACHE_TYPES); dtype: the float arrays' dtype (CUDA: its
        activation dtype). storage(cache type, shape): the zeroed store of one of them (default
        kv_storage.allocate on xp; the CUDA backend passes its own, cuda/kv_q8.storage)."""
        if capacity <= 0:
            raise ContextError(f"context size must be positive, got {capacity}")
        self.capacity = capacity
        self.xp = xp
        self.types = types
        shape = (n_layers, capacity, n_kv_heads, head_dim)
        storage = storage or functools.partial(allocate, xp=xp, dtype=dtype)
        # zeros are allocated lazily by the OS on the CPU
        self.k = storage(types[0], shape)  # (n_layers, capacity, n_kv_heads, head_dim)
        self.v = storage(types[1], shape)
        self.length = 0  # tokens committed so far (positions 0 .. length-1)
        self.owner: object | None = None  # the session whose tokens these are (engine/session.py)

    def layer(self, index: int) -> tuple["KVCache", int]:
        """The cache holding layer `index` and its index there: this one (a split model's StagedCache hands
        out its parts, engine/pipeline.py)."""
        return self, index

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
        self.owner = None

    def truncate(self, length: int) -> None:
        """Keep positions 0 .. length-1 (their rows stay valid as they are), forget the rest."""
        if not 0 <= length <= self.length:
            raise ContextError(f"cannot truncate a KV cache of {self.length} tokens to {length}")
        self.length = length

    def host_row_chunks(self, name: str, chunk_bytes: int = row_chunks.CHUNK_BYTES) -> Iterator[np.ndarray]:
        """The keys (name "k") or values ("v") of the used positions as stored, on the host, in a session file's
        order: every layer's rows 0 .. length-1, layer after layer, in chunks of some rows of one layer (at most
        chunk_bytes, at least one row): (rows, n_kv_heads, head_dim) float arrays, or for encoded types their bytes,
        (rows, n_kv_heads, row_bytes) uint8. A chunk is valid until the next is asked for: the CPU's are views of the
        cache, a GPU's pinned buffers reused two chunks later (the next chunk is copied while one is used:
        row_chunks.device_chunks)."""
        if name not in ("k", "v"):
            raise ValueError(f"a KV cache holds rows 'k' and 'v', not {name!r}")
        store = getattr(self, name)
        if self.xp is np:
            return row_chunks.host_chunks(store, self.length, chunk_bytes)
        device = getattr(store, "q", store).device  # q8_0 rows: their values array's
        return row_chunks.device_chunks(store, self.length, row_chunks.DeviceDownloads(self.xp, device), chunk_bytes)

    def host_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of the used positions as stored, each one host array: (n_layers, length, n_kv_heads,
        head_dim) float arrays, or for encoded types their bytes, (n_layers, length, n_kv_heads, row_bytes) uint8."""
        return tuple(row_chunks.gather(self.host_row_chunks(name), shape, dtype)
                     for name, (shape, dtype) in zip("kv", self.stored_layout(self.length)))

    def stored_layout(self, n: int) -> list[tuple[tuple[int, ...], np.dtype]]:
        """(shape, dtype) of the keys and of the values ``host_rows`` gives for n positions."""
        return [(_stored_shape(store, n), np.dtype(np.uint8 if isinstance(store, EncodedStore) else store.dtype))
                for store in (self.k, self.v)]

    def load_rows(self, k: np.ndarray, v: np.ndarray) -> None:
        """Replace the content with host keys/values shaped and typed as ``host_rows`` returns them."""
        n = k.shape[1] if k.ndim > 1 else -1
        if [(k.shape, k.dtype), (v.shape, v.dtype)] != self.stored_layout(n):
            expected = ", ".join(f"{shape} {dtype}" for shape, dtype in self.stored_layout(max(n, 0)))
            raise ContextError(f"KV rows {k.shape} {k.dtype} / {v.shape} {v.dtype} do not fit a cache of "
                               f"{expected}")
        self.check_room(n - self.length)
        for store, rows in ((self.k, k), (self.v, v)):
            if isinstance(store, EncodedStore):
                store[:, :n].load_bytes(rows)
            else:
                for layer in range(rows.shape[0]):  # a layer at a time: rows may be a file's memory map
                    store[layer, :n] = self.xp.asarray(rows[layer])
        self.length = n


def _stored_shape(store: Any, n: int) -> tuple[int, ...]:
    shape = store.byte_shape if isinstance(store, EncodedStore) else store.shape
    return (shape[0], n) + tuple(shape[2:])
