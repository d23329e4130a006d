"""Self-Extend and StreamingLLM on the CUDA backend: a composed path (no kernel of their own).

  keys       written by the kernels that write every key: store_kv (prefill) and the fused decode step's qkv
             (fused.py), given *key tables* instead of the rotary tables: row j of a key table holds the cos/sin
             of the scheme's cached key position of j (Self-Extend floor(j/G); StreamingLLM j, the rotary tables
             themselves), and the kernels (chunk_len 0) rotate the key of row j by row j. So the cache holds the
             keys the numpy backend's holds, in the activation dtype.
  attention  tiled_attention.blockwise_attention, the numpy backend's algorithm, over CuPy arrays: the cached
             keys and values stay on the GPU and are read one key tile at a time, cast to fp32; scores, the
             relations' choice, masks and the online softmax are CuPy fp32 (cuBLAS batched GEMMs). The key spans,
             relations and masks come from the scheme on the host (small arrays, uploaded per tile), so
             StreamingLLM reads only the sinks and the window of each query tile.
  decode     the fused step's GEMVs, with this attention; the key tiles depend on the position, which the host
             must know, so the step runs eagerly, not as a CUDA graph (graph.py, CudaBackend.decoder).

Host positions: the new rows are at cache.length .. cache.length + n - 1 when ``attention`` runs (Llama.forward
and the decoders run a forward before they commit it), which gives the tiles without reading the device
positions back.

Memory beyond engine/memory.py's plan (which does not know the attention in force): a prefill batch's fp32 output
(4 x Hq x D bytes a token, then its activation copy) and a few SCORES_BYTES of tiles.
"""
from __future__ import annotations

import numpy as np

from ... import dca as dca_ops
from ...rope import RotaryTable, checked_positions, rotate_with
from ...tiled_attention import Arrays, PositionScheme, blockwise_attention
from ...weights.bf16 import from_bf16_bits
from .weights import to_activation

# tiles on the GPU: larger than the numpy backend's (fewer launches, each busier). A query tile's scores against a
# key tile take Hq * block_q * BLOCK_K * 4 bytes: block_q is the largest power of two (16 .. 1024) within SCORES_BYTES
BLOCK_K = 1024
SCORES_BYTES = 64 << 20


def query_tile_rows(n_heads: int) -> int:
    """Queries per tile for n_heads query heads: scores within SCORES_BYTES (32 heads: 512 rows)."""
    rows = 1024
    while rows > 16 and n_heads * rows * BLOCK_K * 4 > SCORES_BYTES:
        rows //= 2
    return rows


def is_extension(layout) -> bool:
    """Is the attention layout a Self-Extend / StreamingLLM scheme (not a DCAConfig, not None)?"""
    return isinstance(layout, PositionScheme)


def chunk_len_of(layout) -> int:
    """The chunk_len argument of the kernels that store keys: DCA's, else 0 (the key of row j rotated by row j
    of the tables they get: CudaBackend.key_tables)."""
    return 0 if layout is None or is_extension(layout) else layout.chunk_len


class DeviceArrays(Arrays):
    """The tiled algorithm's tiles as CuPy arrays: activations (fp16, or bf16 bit patterns) read as fp32."""

    def __init__(self, cp):
        self.xp = cp

    def float32(self, x):
        if x.dtype == np.uint16:  # bf16 bit patterns
            return from_bf16_bits(x, self.xp)
        return x.astype(np.float32, copy=False)

    def upload(self, host: np.ndarray):
        return self.xp.asarray(host)


class DeviceRotary:
    """RotaryTable.rotate on CuPy arrays, at host positions, with the table's cos/sin on the device."""

    def __init__(self, cp, rotary: RotaryTable, cos, sin):
        self.cp = cp
        self.rope, self.n_positions = rotary.rope, rotary.n_positions
        self.cos, self.sin = cos, sin  # (n_positions, rope.dim/2) fp32, the backend's rotary_tables

    def rotate(self, x, positions: np.ndarray):
        """x (n, H, head_dim) CuPy, positions (n,) host ints -> x rotated (a new array of x's dtype)."""
        index = self.cp.asarray(checked_positions(x, positions, self.rope.dim, self.n_positions))
        return rotate_with(x, self.cos[index], self.sin[index], self.rope.dim)


def key_tables(cp, rotary: RotaryTable, scheme: PositionScheme, tables: tuple) -> tuple:
    """cos, sin (n_positions, rope.dim/2) fp32 whose row j rotates a key at absolute position j to the scheme's
    cached key position; `tables` (the rotary tables) when that is j itself."""
    every = np.arange(rotary.n_positions)
    cached = np.asarray(scheme.cached_key_positions(every))
    if np.array_equal(cached, every):
        return tables
    index = cp.asarray(cached)
    return tables[0][index], tables[1][index]


def attention(backend, q, cache, layer: int, rotary: RotaryTable, scheme: PositionScheme,
              temperature_length: int | None):
    """q (n, Hq, D) unrotated activations of the rows at cache.length .. cache.length + n - 1, attending the
    cached keys under `scheme` -> (n, Hq, D) activations."""
    cp = backend.cp
    n = q.shape[0]
    positions = np.arange(cache.length, cache.length + n)  # (n,) host
    logit_scale = dca_ops.temperature(positions, temperature_length) if temperature_length else None
    end = cache.length + n
    out = blockwise_attention(q, cache.k[layer, :end], cache.v[layer, :end], positions,
                              DeviceRotary(cp, rotary, *backend.rotary_tables(rotary)), scheme,
                              logit_scale=logit_scale, block_q=query_tile_rows(q.shape[1]), block_k=BLOCK_K,
                              arrays=DeviceArrays(cp))
    return to_activation(cp, out, backend.dtype)  # (n, Hq, D) fp32 -> activations
