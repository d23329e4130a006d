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

import math

import numpy as np

from .config import DCAConfig
from .errors import ConfigError, ContextError
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


def _check_inputs(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray,
                  logit_scale: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate shapes and positions; returns q_pos as int64 and logit_scale as float64 (or None)."""
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ConfigError(
            f"attention expects 3-d q, k, v (tokens, heads, head_dim), got {q.shape}, {k.shape}, {v.shape}")
    if k.shape[:2] != v.shape[:2]:
        raise ConfigError(f"attention: keys {k.shape} and values {v.shape} disagree in tokens or heads")
    if q.shape[2] != k.shape[2]:
        raise ConfigError(f"attention: query head_dim {q.shape[2]} differs from key head_dim {k.shape[2]}")
    if q.shape[1] % k.shape[1]:
        raise ConfigError(f"attention: {q.shape[1]} query heads is not a multiple of {k.shape[1]} KV heads")
    q_pos = np.asarray(q_pos)
    if q_pos.shape != (q.shape[0],) or q_pos.dtype.kind not in "iu":
        raise ConfigError(f"attention: q_pos must be {q.shape[0]} integers, got shape {q_pos.shape} {q_pos.dtype}")
    q_pos = q_pos.astype(np.int64)
    if q_pos.size and (q_pos.min() < 0 or q_pos.max() >= k.shape[0]):
        raise ContextError(
            f"attention: query positions {int(q_pos.min())}..{int(q_pos.max())} need keys beyond the "
            f"{k.shape[0]} available"
        )
    if logit_scale is not None:
        logit_scale = np.asarray(logit_scale, dtype=np.float64)
        if logit_scale.shape != (q.shape[0],):
            raise ConfigError(f"attention: logit_scale shape {logit_scale.shape}, expected ({q.shape[0]},)")
    return q_pos, logit_scale


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
    Returns (n_q, Hq, d_v) float64. Memory O(n_k * Hq * d) per query: small inputs only.
    """
    q_pos, logit_scale = _check_inputs(q, k, v, q_pos, logit_scale)
    n_q, n_heads, head_dim = q.shape
    n_k, n_kv, _ = k.shape
    group = n_heads // n_kv
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    qpos, kpos = position_matrix(q_pos, n_k, dca)  # (n_q, n_k), (n_k,)
    k_rot = rotary.rotate(k.astype(np.float64), kpos)  # (n_k, Hkv, d)
    v64 = v.astype(np.float64)
    out = np.empty((n_q, n_heads, v.shape[2]), dtype=np.float64)
    for row in range(n_q):
        n_visible = q_pos[row] + 1  # keys 0..q_pos[row]
        q_row = np.broadcast_to(q[row].astype(np.float64), (n_visible, n_heads, head_dim))
        q_rot = rotary.rotate(q_row, qpos[row, :n_visible])  # (n_visible, Hq, d): one rotation per key
        q_rot = q_rot.reshape(n_visible, n_kv, group, head_dim)
        scores = np.einsum("jhgd,jhd->hgj", q_rot, k_rot[:n_visible]) * scale  # (Hkv, group, n_visible)
        if logit_scale is not None:
            scores *= logit_scale[row]
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out[row] = np.einsum("hgj,jhd->hgd", probs, v64[:n_visible]).reshape(n_heads, -1)
    return out


def blockwise_attention(q: np.ndarray, k_rot: np.ndarray, v: np.ndarray, q_pos: np.ndarray, rotary: RotaryTable,
                        dca: DCAConfig | None, scale: float | None = None, logit_scale: np.ndarray | None = None,
                        block_q: int = 128, block_k: int = 256) -> np.ndarray:
    """Tiled DCA (or causal) attention with online softmax, float32; the CUDA kernel's algorithm.

    q: (n_q, Hq, d) unrotated; k_rot: (n_k, Hkv, d) keys already rotated at key_positions (as the KV
    cache stores them); v: (n_k, Hkv, d_v). n_k may exceed max(q_pos)+1 (cache capacity): keys after
    a query are masked, keys after the tile's last query are never visited.
    Returns (n_q, Hq, d_v) float32. Memory: O(tiles) beyond the inputs, never n_q x n_k.

    Per query tile: the rotated copy of the tile for each relation is made on first use; key tiles
    are walked from 0 to the causal limit; a key tile with one relation for all its (query, key)
    pairs uses one score matmul, a tile straddling a chunk boundary selects the relation per element,
    and a tile crossing the diagonal is masked. GQA: the tile is laid out (Hkv, group*bq, d) so each
    KV head serves its group in one matmul, without repeating K/V.
    """
    q_pos, logit_scale = _check_inputs(q, k_rot, v, q_pos, logit_scale)
    if block_q <= 0 or block_k <= 0:
        raise ConfigError(f"attention tile sizes must be positive, got block_q={block_q}, block_k={block_k}")
    n_q, n_heads, head_dim = q.shape
    n_kv = k_rot.shape[1]
    group = n_heads // n_kv
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    row_scale = np.full(n_q, scale) if logit_scale is None else scale * logit_scale  # (n_q,) float64
    out = np.empty((n_q, n_heads, v.shape[2]), dtype=np.float32)

    for r0 in range(0, n_q, block_q):
        r1 = min(r0 + block_q, n_q)
        out[r0:r1] = _query_tile(q[r0:r1], k_rot, v, q_pos[r0:r1], row_scale[r0:r1], rotary, dca, group,
                                 block_k)
    return out


def _query_tile(q_tile: np.ndarray, k_rot: np.ndarray, v: np.ndarray, pos: np.ndarray, row_scale: np.ndarray,
                rotary: RotaryTable, dca: DCAConfig | None, group: int, block_k: int) -> np.ndarray:
    """Attention output (bq, Hq, d_v) float32 of one query tile at positions pos (bq,)."""
    bq, n_heads, head_dim = q_tile.shape
    n_kv = n_heads // group
    rows = group * bq  # row index within a KV head: g * bq + r
    positions_by_relation = query_positions(pos, dca)
    scaled_q = q_tile.astype(np.float32) * row_scale.astype(np.float32)[:, None, None]  # (bq, Hq, d)
    rotated: dict[int, np.ndarray] = {}

    def rotated_query(rel: int) -> np.ndarray:
        """The tile rotated for relation rel, laid out (Hkv, group*bq, d) float32 (made once)."""
        if rel not in rotated:
            q_rot = rotary.rotate(scaled_q, positions_by_relation[rel])  # (bq, Hq, d)
            rotated[rel] = np.ascontiguousarray(
                q_rot.reshape(bq, n_kv, group, head_dim).transpose(1, 2, 0, 3)).reshape(n_kv, rows, head_dim)
        return rotated[rel]

    pos_min, pos_max = int(pos.min()), int(pos.max())
    running_max = np.full((n_kv, rows), -np.inf, dtype=np.float32)
    running_sum = np.zeros((n_kv, rows), dtype=np.float32)
    acc = np.zeros((n_kv, rows, v.shape[2]), dtype=np.float32)

    for k0 in range(0, pos_max + 1, block_k):
        k1 = min(k0 + block_k, pos_max + 1)
        k_tile = k_rot[k0:k1].astype(np.float32, copy=False).transpose(1, 2, 0)  # (Hkv, d, bk)
        v_tile = v[k0:k1].astype(np.float32, copy=False).transpose(1, 0, 2)  # (Hkv, bk, d_v)
        # relations of the tile's extreme pairs bound every pair's relation (relation is monotone)
        lowest_rel = int(relation(pos_min, k1 - 1, dca))
        highest_rel = int(relation(pos_max, k0, dca))

        scores = np.matmul(rotated_query(lowest_rel), k_tile)  # (Hkv, rows, bk)
        if highest_rel != lowest_rel:  # the tile straddles a chunk boundary: pick the relation per element
            rel = relation(pos[:, None], np.arange(k0, k1)[None, :], dca)  # (bq, bk)
            by_group = scores.reshape(n_kv, group, bq, k1 - k0)
            for other in range(lowest_rel + 1, highest_rel + 1):
                other_scores = np.matmul(rotated_query(other), k_tile).reshape(by_group.shape)
                np.copyto(by_group, other_scores, where=rel == other)
        if k1 - 1 > pos_min:  # the tile crosses the diagonal for some query
            future = np.arange(k0, k1)[None, :] > pos[:, None]  # (bq, bk)
            np.copyto(scores.reshape(n_kv, group, bq, k1 - k0), -np.inf, where=future)

        tile_max = scores.max(axis=-1)  # (Hkv, rows); finite after the first tile (key 0 is visible to all)
        new_max = np.maximum(running_max, tile_max)
        correction = np.exp(running_max - new_max)
        scores -= new_max[..., None]
        np.exp(scores, out=scores)
        running_sum *= correction
        running_sum += scores.sum(axis=-1)
        acc *= correction[..., None]
        acc += np.matmul(scores, v_tile)
        running_max = new_max

    acc /= running_sum[..., None]
    return acc.reshape(n_kv, group, bq, -1).transpose(2, 0, 1, 3).reshape(bq, n_heads, -1)
