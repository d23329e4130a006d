"""Dual Chunk Attention: the single source of truth for its semantics (design.md §3).

For a model pretrained on L tokens, with chunk_size cs, local_window w and chunk_len cl = cs - w,
chunks aligned to absolute position 0 (chunk(p) = p // cl), a query at absolute position i and a
key at absolute position j <= i use:

  key position                  j mod cl                 (fixed per key: keys are cached rotated)
  query position, same chunk    i mod cl                 -> distance i - j, exact      (relation 0)
  next chunk (chunk diff 1)     min(cl + i mod cl, cs)   ("successive")               (relation 1)
  farther (chunk diff >= 2)     min(2*cl - 1, cs)        ("inter")                    (relation 2)

Every score uses exactly one of the three query rotations and the softmax runs over all keys at
once. Every distance lies in [0, cs]. ``dca=None`` everywhere means plain causal attention:
query position i, key position j, relation 0.

``reference_attention`` materializes the position matrix for small inputs (the spec);
``blockwise_attention`` is the tiled online-softmax algorithm the CUDA kernel follows, tested
against it.
"""
from __future__ import annotations

import numpy as np

from .config import DCAConfig
from . import tiled_attention as tiled
from .rope import RotaryTable

INTRA, SUCCESSIVE, INTER = 0, 1, 2


def key_positions(j: np.ndarray, dca: DCAConfig | None) -> np.ndarray:
    """Rotary position of keys at absolute positions j: j mod chunk_len (j without DCA)."""
    j = np.asarray(j)
    return j if dca is None else j % dca.chunk_len


def query_positions(i: np.ndarray, dca: DCAConfig | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intra, successive, inter) rotary positions of queries at absolute positions i, each shaped like i."""
    i = np.asarray(i)
    if dca is None:
        return i, i, i
    cl, cs = dca.chunk_len, dca.chunk_size
    intra = i % cl
    successive = np.minimum(cl + intra, cs)
    inter = np.full_like(i, min(2 * cl - 1, cs))
    return intra, successive, inter


def relation(i: np.ndarray, j: np.ndarray, dca: DCAConfig | None) -> np.ndarray:
    """Broadcast relation of query positions i to key positions j: 0 intra, 1 successive, 2 inter.

    Only meaningful for j <= i (a key after the query counts as intra; it is masked anyway).
    """
    i, j = np.asarray(i), np.asarray(j)
    if dca is None:
        return np.zeros(np.broadcast_shapes(i.shape, j.shape), dtype=np.int8)
    chunk_diff = i // dca.chunk_len - j // dca.chunk_len
    return np.clip(chunk_diff, INTRA, INTER).astype(np.int8)


def position_matrix(q_pos: np.ndarray, n_keys: int, dca: DCAConfig | None) -> tuple[np.ndarray, np.ndarray]:
    """Materialized positions: qpos (n_q, n_keys) — the query position used against each key — and
    kpos (n_keys,). Entries for keys after a query (j > q_pos[i]) are defined but never used."""
    q_pos = np.asarray(q_pos, dtype=np.int64)
    keys = np.arange(n_keys, dtype=np.int64)
    by_relation = np.stack(query_positions(q_pos, dca))  # (3, n_q)
    rel = relation(q_pos[:, None], keys[None, :], dca)  # (n_q, n_keys)
    qpos = np.take_along_axis(by_relation.T, rel.astype(np.int64), axis=1)  # (n_q, n_keys)
    return qpos, key_positions(keys, dca)


def temperature(q_pos: np.ndarray, training_length: int) -> np.ndarray:
    """Per-query logit multiplier 0.1*ln(n/L) + 1 for n > L, else 1 (float64, shaped like q_pos).

    n = q_pos + 1 is the number of tokens the query attends to (its own position included),
    i.e. the length of the context at that query, as vLLM's DCA uses the current length.
    """
    n = np.asarray(q_pos, dtype=np.float64) + 1.0
    return np.where(n > training_length, 0.1 * np.log(n / training_length) + 1.0, 1.0)


def rotate_keys(k: np.ndarray, positions: np.ndarray, rotary: RotaryTable, dca: DCAConfig | None) -> np.ndarray:
    """Keys (n, Hkv, d) at absolute positions (n,), rotated at their key positions (as cached)."""
    return rotary.rotate(k, key_positions(np.asarray(positions), dca))


def reference_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, rotary: RotaryTable,
                        dca: DCAConfig | None, scale: float | None = None,
                        logit_scale: np.ndarray | None = None) -> np.ndarray:
    """The spec: DCA (or causal) attention with the position matrix materialized, float64.

    q: (n_q, Hq, d) unrotated; k, v: (n_k, Hkv, d), k unrotated, keys at absolute positions 0..n_k-1;
    q_pos: (n_q,) absolute query positions; query i attends keys j <= q_pos[i]. Query head h uses
    KV head h // (Hq // Hkv). logit_scale: (n_q,) multiplier of each query's logits.
    Returns (n_q, Hq, d_v) float64 (tiled_attention.reference_attention under DCAScheme(dca)).
    """
    return tiled.reference_attention(q, k, v, q_pos, rotary, DCAScheme(dca), scale, logit_scale)


def blockwise_attention(q: np.ndarray, k_rot: np.ndarray, v: np.ndarray, q_pos: np.ndarray, rotary: RotaryTable,
                        dca: DCAConfig | None, scale: float | None = None, logit_scale: np.ndarray | None = None,
                        block_q: int = 128, block_k: int = 256) -> np.ndarray:
    """Tiled DCA (or causal) attention with online softmax, float32; the CUDA kernel's algorithm.

    q: (n_q, Hq, d) unrotated; k_rot: (n_k, Hkv, d) keys already rotated at key_positions (as the KV
    cache stores them); v: (n_k, Hkv, d_v). n_k may exceed max(q_pos)+1 (cache capacity): keys after
    a query are masked, keys after the tile's last query are never visited.
    Returns (n_q, Hq, d_v) float32. Memory: O(tiles) beyond the inputs, never n_q x n_k.

    Per query tile (tiled_attention.blockwise_attention under DCAScheme(dca)): the rotated copy of the tile
    for each relation is made on first use; key tiles are walked from 0 to the causal limit; a key tile with
    one relation for all its (query, key) pairs uses one score matmul, a tile straddling a chunk boundary
    selects the relation per element, and a tile crossing the diagonal is masked.
    """
    return tiled.blockwise_attention(q, k_rot, v, q_pos, rotary, DCAScheme(dca), scale, logit_scale, block_q,
                                     block_k)


def as_scheme(layout: DCAConfig | tiled.PositionScheme | None) -> tiled.PositionScheme:
    """The position scheme of an attention layout: a DCAConfig, None (plain causal) or a scheme itself
    (Self-Extend, StreamingLLM)."""
    return layout if isinstance(layout, tiled.PositionScheme) else DCAScheme(layout)


class DCAScheme(tiled.PositionScheme):
    """DCA's positions as a position scheme (relations intra, successive, inter; keys cached at j mod cl);
    dca None: plain causal attention."""

    n_relations = 3

    def __init__(self, dca: DCAConfig | None):
        self.dca = dca

    def query_positions(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return query_positions(i, self.dca)

    def key_positions(self, j: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        positions = key_positions(j, self.dca)
        return positions, positions, positions

    def relation(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return relation(i, j, self.dca)
