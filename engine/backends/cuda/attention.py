"""DCA / causal attention over the device KV cache (kernels/attention.cu): launch geometry and splits.

One launch of attn_partial_<DPL> + the combine of the fused kernels (flash_attention.combine) per layer. Rows = (query, query head of the group),
one warp each, 4 to 8 warps per block (extra warps only help load K/V tiles), all rows of a block on
one KV head (GQA without copies).
Splits over the keys (flash-decoding): the rule of splits.py, filling two blocks per SM, slices of at least
four tiles; for one query (decode) over the cache capacity, so a captured graph stays valid as the context
grows.
"""
from __future__ import annotations

import math

import numpy as np

from ...errors import DeviceError
from .flash_attention import combine
from .kernels import function
from .splits import key_splits, sm_count
from .weights import activation_type, to_activation

MAX_WARPS = 8
MIN_WARPS = 4  # attention.cu: 32 keys x D/8 vectors <= LOAD_BATCH (4) x 32 x MIN_WARPS for D <= 128
TILE_KEYS = 32  # keys per shared-memory tile (one per lane)
BLOCKS_PER_SM = 2  # the launch fills two blocks per SM
MIN_KEYS_PER_SPLIT = 4 * TILE_KEYS
MAX_SPLITS = 512


def dims_per_lane(head_dim: int) -> int:
    for dpl in (1, 2, 4):
        if head_dim <= 32 * dpl:
            return dpl
    raise DeviceError(f"the CUDA attention kernel supports head_dim <= 128, got {head_dim}")


def n_splits(n_queries: int, row_blocks: int, n_kv: int, capacity: int, keys_hint: int, n_sms: int) -> int:
    """How many slices of the keys each row block's work is cut into (splits.key_splits)."""
    keys = capacity if n_queries == 1 else keys_hint
    return key_splits(row_blocks * n_kv, BLOCKS_PER_SM * n_sms, keys, MIN_KEYS_PER_SPLIT, MAX_SPLITS)


def attention(cp, q, cache_k, cache_v, positions, cos_t, sin_t, rope_dim: int, dca, temperature_length,
              capacity: int, keys_hint: int, dtype: str = "f16", out_staged=None):
    """q (n, Hq, D) unrotated; cache_k/v (capacity, Hkv, D) of one layer -> (n, Hq, D); all activations of
    `dtype` ("f16" | "bf16", the build of attention.cu that runs). out_staged: see flash_attention.combine."""
    n, n_heads, head_dim = q.shape
    n_kv = cache_k.shape[1]
    if head_dim % 8 or n_heads % n_kv:
        raise DeviceError(f"the CUDA attention kernel needs head_dim % 8 == 0 (got {head_dim}) and query heads "
                          f"a multiple of KV heads (got {n_heads} and {n_kv})")
    dpl = dims_per_lane(head_dim)
    group = n_heads // n_kv
    rows = n * group
    warps = max(MIN_WARPS, min(MAX_WARPS, rows))  # >= 4: one load batch covers a K/V tile
    row_blocks = (rows + warps - 1) // warps
    splits = n_splits(n, row_blocks, n_kv, capacity, keys_hint, sm_count(cp))
    q = to_activation(cp, q, dtype)
    part_o = cp.empty((splits, n, n_heads, head_dim), dtype=cp.float32)
    part_m = cp.empty((splits, n, n_heads), dtype=cp.float32)
    part_l = cp.empty((splits, n, n_heads), dtype=cp.float32)
    chunk_len, chunk_size = (dca.chunk_len, dca.chunk_size) if dca is not None else (0, 0)
    scale_log2 = math.log2(math.e) / math.sqrt(head_dim)
    smem = 4 * warps * 3 * head_dim + 2 * TILE_KEYS * (head_dim + 2) + 2 * TILE_KEYS * head_dim
    function("attention", f"attn_partial_{dpl}", dtype)(
        (row_blocks, n_kv, splits), (32 * warps,),
        (q, cache_k, cache_v, positions, cos_t, sin_t, part_o, part_m, part_l, np.int32(n), np.int32(n_heads),
         np.int32(n_kv), np.int32(head_dim), np.int32(rope_dim), np.int32(chunk_len), np.int32(chunk_size),
         np.float32(scale_log2), np.int32(temperature_length or 0), np.int32(splits)),
        shared_mem=smem)
    out = cp.empty((n, n_heads, head_dim), dtype=activation_type(cp, dtype))
    combine(part_o, part_m, part_l, out, n * n_heads, head_dim, splits, dtype, out_staged)
    return out
