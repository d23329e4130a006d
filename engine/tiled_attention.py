"""Attention under a position scheme: the materialized reference and the tiled online-softmax algorithm.

A position scheme says, for a query at absolute position i and a key at absolute position j:

  relation(i, j)            which of the scheme's relations the pair is in (0, 1, ...)
  query_positions(i)[r]     the rotary position of the query under relation r
  key_positions(j)[r]       the rotary position of the key under relation r
  visible(i, j)             whether the query attends the key at all (causal: j <= i)

Plain causal attention (``CAUSAL``) has one relation with positions (i, j). DCA (dca.py), Self-Extend
(self_extend.py) and StreamingLLM (streaming.py) are schemes. Keys are cached rotated at
``cached_key_positions(j)``; ``key_tile`` turns a tile of cached keys into the keys of a relation (for
most schemes: the cached keys themselves).

``reference_attention`` rotates the query and the key of every (query, key) pair at the pair's positions
(float64, small inputs: the spec). ``blockwise_attention`` is the algorithm the numpy backend runs (float32,
memory O(tiles)): per query tile, key tiles over ``key_spans``, one score matmul per relation that occurs in
the tile, a per-element choice where a tile holds several, a mask where it holds hidden pairs.
Requirement on schemes: relation(i, j) is non-decreasing in i and non-increasing in j (so a tile's extreme
pairs bound every pair's relation).

Arrays: ``blockwise_attention`` runs its arithmetic through an ``Arrays`` (``arrays``): numpy on the host
(``HOST``), or CuPy on the GPU (backends/cuda/extension.py: the CUDA backend's Self-Extend and StreamingLLM
attention is this algorithm over the device KV cache). The positions, relations and masks are small host
arrays either way (the schemes compute them with numpy); ``Arrays.upload`` moves them where the tiles are,
and ``rotary`` is any object with RotaryTable's ``rope`` and ``rotate`` on the tiles' arrays.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError, ContextError
from .rope import RotaryTable


class Arrays:
    """Where the tiled algorithm's tiles live: numpy on the host (``HOST``); a subclass for another array module
    overrides all three."""

    xp = np

    def float32(self, x) -> np.ndarray:
        """A tile of q, cached keys or values (float arrays, or kv_storage.EncodedRows decoded) as float32."""
        return np.asarray(x, dtype=np.float32)

    def upload(self, host: np.ndarray) -> np.ndarray:
        """A host array (masks, per-row scales) as an array of xp."""
        return host


HOST = Arrays()


class PositionScheme:
    """Plain causal attention; subclasses override what differs."""

    n_relations = 1

    def query_positions(self, i: np.ndarray) -> tuple[np.ndarray, ...]:
        """Rotary positions of queries at absolute positions i, one array shaped like i per relation."""
        return tuple(np.asarray(i) for _ in range(self.n_relations))

    def key_positions(self, j: np.ndarray) -> tuple[np.ndarray, ...]:
        """Rotary positions of keys at absolute positions j, one array shaped like j per relation."""
        return tuple(np.asarray(j) for _ in range(self.n_relations))

    def cached_key_positions(self, j: np.ndarray) -> np.ndarray:
        """The rotary positions keys are cached at (``key_tile`` derives the other relations' keys)."""
        return self.key_positions(j)[0]

    def relation(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Broadcast relation (int8) of queries i to keys j."""
        return np.zeros(np.broadcast_shapes(np.shape(i), np.shape(j)), dtype=np.int8)

    def visible(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Broadcast bool: does query i attend key j."""
        return np.asarray(j) <= np.asarray(i)

    def key_spans(self, pos_min: int, pos_max: int) -> list[tuple[int, int]]:
        """Key ranges [start, end) holding every key some query in pos_min..pos_max sees (ascending)."""
        return [(0, pos_max + 1)]

    def hides_in_tile(self, pos_min: int, pos_max: int, k0: int, k1: int) -> bool:
        """May a query in pos_min..pos_max be blind to a key in k0..k1-1? (False: skip the mask.)"""
        return k1 - 1 > pos_min

    def key_tile(self, rel: int, cached: np.ndarray, j: np.ndarray, rotary: RotaryTable) -> np.ndarray:
        """Keys of relation rel, (bk, Hkv, d), from the cached keys (bk, Hkv, d) at absolute positions j (bk,)."""
        return cached


CAUSAL = PositionScheme()


def rotate_keys(k: np.ndarray, positions: np.ndarray, rotary: RotaryTable, scheme: PositionScheme) -> np.ndarray:
    """Keys (n, Hkv, d) at absolute positions (n,), rotated as the cache stores them."""
    return rotary.rotate(k, scheme.cached_key_positions(np.asarray(positions)))


def check_inputs(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray,
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


def pair_positions(scheme: PositionScheme, q_pos: np.ndarray, n_keys: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Materialized (qpos, kpos, visible), each (n_q, n_keys): the rotary positions of the query and of the
    key in every (query, key) pair, and whether the pair is attended."""
    q_pos = np.asarray(q_pos, dtype=np.int64)
    keys = np.arange(n_keys, dtype=np.int64)
    rel = scheme.relation(q_pos[:, None], keys[None, :]).astype(np.int64)  # (n_q, n_keys)
    by_relation_q = np.stack(scheme.query_positions(q_pos))  # (R, n_q)
    by_relation_k = np.stack(scheme.key_positions(keys))  # (R, n_keys)
    qpos = np.take_along_axis(by_relation_q.T, rel, axis=1)  # (n_q, n_keys)
    kpos = by_relation_k[rel, keys[None, :]]  # (n_q, n_keys)
    return qpos, kpos, scheme.visible(q_pos[:, None], keys[None, :])


def reference_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, rotary: RotaryTable,
                        scheme: PositionScheme, scale: float | None = None,
                        logit_scale: np.ndarray | None = None) -> np.ndarray:
    """The spec: attention with every pair's positions materialized, float64.

    q: (n_q, Hq, d) unrotated; k, v: (n_k, Hkv, d), k unrotated, keys at absolute positions 0..n_k-1;
    q_pos: (n_q,) absolute query positions; query i attends the keys j with scheme.visible(i, j).
    Query head h uses KV head h // (Hq // Hkv). logit_scale: (n_q,) multiplier of each query's logits.
    Returns (n_q, Hq, d_v) float64. Memory O(n_k * Hq * d) per query: small inputs only.
    """
    q_pos, logit_scale = check_inputs(q, k, v, q_pos, logit_scale)
    n_q, n_heads, head_dim = q.shape
    n_k, n_kv, _ = k.shape
    group = n_heads // n_kv
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    qpos, kpos, visible = pair_positions(scheme, q_pos, n_k)  # (n_q, n_k) each
    k64, v64 = k.astype(np.float64), v.astype(np.float64)
    out = np.empty((n_q, n_heads, v.shape[2]), dtype=np.float64)
    for row in range(n_q):
        seen = np.flatnonzero(visible[row])  # the keys this query attends
        q_row = np.broadcast_to(q[row].astype(np.float64), (len(seen), n_heads, head_dim))
        q_rot = rotary.rotate(q_row, qpos[row, seen]).reshape(len(seen), n_kv, group, head_dim)
        k_rot = rotary.rotate(k64[seen], kpos[row, seen])  # (n_seen, Hkv, d): one rotation per pair
        scores = np.einsum("jhgd,jhd->hgj", q_rot, k_rot) * scale  # (Hkv, group, n_seen)
        if logit_scale is not None:
            scores *= logit_scale[row]
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out[row] = np.einsum("hgj,jhd->hgd", probs, v64[seen]).reshape(n_heads, -1)
    return out


def blockwise_attention(q: np.ndarray, k_cached: np.ndarray, v: np.ndarray, q_pos: np.ndarray,
                        rotary: RotaryTable, scheme: PositionScheme, scale: float | None = None,
                        logit_scale: np.ndarray | None = None, block_q: int = 128, block_k: int = 256,
                        arrays: Arrays = HOST) -> np.ndarray:
    """Tiled attention under `scheme` with online softmax, float32.

    q: (n_q, Hq, d) unrotated; k_cached: (n_k, Hkv, d) keys rotated at scheme.cached_key_positions (as the KV
    cache stores them); v: (n_k, Hkv, d_v); either may be stored encoded (kv_storage.EncodedRows: a tile is
    decoded when visited). n_k may exceed max(q_pos)+1 (cache capacity): keys after a query
    are hidden, keys outside the tile's key spans are never visited. q, k_cached, v are arrays of
    ``arrays.xp`` (or what ``arrays.float32`` reads); q_pos and logit_scale are host arrays.
    Returns (n_q, Hq, d_v) float32 of arrays.xp. Memory: O(tiles) beyond the inputs, never n_q x n_k.
    GQA: a query tile is laid out (Hkv, group*bq, d) so each KV head serves its group in one matmul.
    """
    q_pos, logit_scale = check_inputs(q, k_cached, v, q_pos, logit_scale)
    if block_q <= 0 or block_k <= 0:
        raise ConfigError(f"attention tile sizes must be positive, got block_q={block_q}, block_k={block_k}")
    n_q, n_heads, head_dim = q.shape
    group = n_heads // k_cached.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    row_scale = np.full(n_q, scale) if logit_scale is None else scale * logit_scale  # (n_q,) float64
    out = arrays.xp.empty((n_q, n_heads, v.shape[2]), dtype=np.float32)
    for r0 in range(0, n_q, block_q):
        r1 = min(r0 + block_q, n_q)
        out[r0:r1] = _query_tile(q[r0:r1], k_cached, v, q_pos[r0:r1], row_scale[r0:r1], rotary, scheme, group,
                                 block_k, arrays)
    return out


def _query_tile(q_tile: np.ndarray, k_cached: np.ndarray, v: np.ndarray, pos: np.ndarray, row_scale: np.ndarray,
                rotary: RotaryTable, scheme: PositionScheme, group: int, block_k: int, arrays: Arrays) -> np.ndarray:
    """Attention output (bq, Hq, d_v) float32 of one query tile at positions pos (bq,) (host)."""
    xp = arrays.xp
    bq, n_heads, head_dim = q_tile.shape
    n_kv = n_heads // group
    rows = group * bq  # row index within a KV head: g * bq + r
    positions_by_relation = scheme.query_positions(pos)
    scaled_q = arrays.float32(q_tile) * arrays.upload(row_scale.astype(np.float32)[:, None, None])  # (bq, Hq, d)
    rotated: dict[int, np.ndarray] = {}

    def rotated_query(rel: int) -> np.ndarray:
        """The tile rotated for relation rel, laid out (Hkv, group*bq, d) float32 (made once)."""
        if rel not in rotated:
            q_rot = rotary.rotate(scaled_q, positions_by_relation[rel])  # (bq, Hq, d)
            rotated[rel] = xp.ascontiguousarray(
                q_rot.reshape(bq, n_kv, group, head_dim).transpose(1, 2, 0, 3)).reshape(n_kv, rows, head_dim)
        return rotated[rel]

    def scores_for(rel: int, k_tile: np.ndarray, k0: int, k1: int) -> np.ndarray:
        """(Hkv, rows, bk) scores of the tile's queries against keys k0..k1-1 (k_tile, cached) under relation rel."""
        keys = scheme.key_tile(rel, k_tile, np.arange(k0, k1), rotary)  # (bk, Hkv, d)
        return xp.matmul(rotated_query(rel), keys.astype(np.float32, copy=False).transpose(1, 2, 0))

    pos_min, pos_max = int(pos.min()), int(pos.max())
    softmax = _OnlineSoftmax(xp, n_kv, rows, v.shape[2])
    for span_start, span_end in scheme.key_spans(pos_min, pos_max):
        for k0 in range(span_start, span_end, block_k):
            k1 = min(k0 + block_k, span_end)
            k_tile = arrays.float32(k_cached[k0:k1])  # (bk, Hkv, d): decoded once if stored encoded
            lowest_rel = int(scheme.relation(pos_min, k1 - 1))
            highest_rel = int(scheme.relation(pos_max, k0))
            scores = scores_for(lowest_rel, k_tile, k0, k1)  # (Hkv, rows, bk)
            by_group = scores.reshape(n_kv, group, bq, k1 - k0)
            if highest_rel != lowest_rel:  # several relations in the tile: pick one per element
                rel = scheme.relation(pos[:, None], np.arange(k0, k1)[None, :])  # (bq, bk) host
                for other in range(lowest_rel + 1, highest_rel + 1):
                    xp.copyto(by_group, scores_for(other, k_tile, k0, k1).reshape(by_group.shape),
                              where=arrays.upload(rel == other))
            if scheme.hides_in_tile(pos_min, pos_max, k0, k1):
                hidden = ~scheme.visible(pos[:, None], np.arange(k0, k1)[None, :])  # (bq, bk) host
                xp.copyto(by_group, np.float32(-np.inf), where=arrays.upload(hidden))
            softmax.add(scores, arrays.float32(v[k0:k1]).transpose(1, 0, 2))
    return softmax.result().reshape(n_kv, group, bq, -1).transpose(2, 0, 1, 3).reshape(bq, n_heads, -1)


class _OnlineSoftmax:
    """Running max, sum and weighted values of softmax rows over key tiles (float32 arrays of xp)."""

    def __init__(self, xp, n_kv: int, rows: int, d_v: int):
        self.xp = xp
        self.max = xp.full((n_kv, rows), -np.inf, dtype=np.float32)
        self.sum = xp.zeros((n_kv, rows), dtype=np.float32)
        self.acc = xp.zeros((n_kv, rows, d_v), dtype=np.float32)

    def add(self, scores: np.ndarray, v_tile: np.ndarray) -> None:
        """scores (Hkv, rows, bk), -inf where hidden (consumed); v_tile (Hkv, bk, d_v)."""
        xp = self.xp
        new_max = xp.maximum(self.max, scores.max(axis=-1))  # (Hkv, rows)
        # rows that have seen no visible key yet keep max -inf: shift them by 0 so exp gives 0, not nan
        shift = xp.where(xp.isfinite(new_max), new_max, xp.zeros_like(new_max))
        correction = xp.exp(self.max - shift)
        scores -= shift[..., None]
        xp.exp(scores, out=scores)
        self.sum *= correction
        self.sum += scores.sum(axis=-1)
        self.acc *= correction[..., None]
        self.acc += xp.matmul(scores, v_tile)
        self.max = new_max

    def result(self) -> np.ndarray:
        """(Hkv, rows, d_v): the normalized outputs (every row must have seen a visible key)."""
        return self.acc / self.sum[..., None]
