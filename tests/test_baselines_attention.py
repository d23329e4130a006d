"""Self-Extend and StreamingLLM attention (engine/self_extend.py, engine/streaming.py): the materialized
definitions, the tiled algorithm against them, and the cases where they are exactly plain RoPE."""
from __future__ import annotations

import math

import numpy as np
import pytest

from engine import tiled_attention as T
from engine.config import RopeConfig
from engine.errors import ConfigError
from engine.rope import RotaryTable
from engine.self_extend import SelfExtendConfig
from engine.streaming import StreamingConfig


def _qkv(rng, n, n_heads, n_kv, head_dim):
    shapes = [(n, n_heads, head_dim), (n, n_kv, head_dim), (n, n_kv, head_dim)]
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _rel_error(out, ref):
    return float(np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max())


def _blockwise(q, k, v, q_pos, rotary, scheme, **kwargs):
    """The tiled algorithm on keys cached as the model caches them."""
    k_cached = T.rotate_keys(k, np.arange(len(k)), rotary, scheme)
    return T.blockwise_attention(q, k_cached, v, q_pos, rotary, scheme, **kwargs)


# ---- the definitions, pair by pair -----------------------------------------------------------

@pytest.mark.parametrize("group,window", [(2, 4), (3, 4), (4, 8), (1, 5), (5, 3)])
def test_self_extend_pair_positions_follow_the_definition(group, window):
    se = SelfExtendConfig(group, window)
    n = 60
    qpos, kpos, visible = T.pair_positions(se, np.arange(n), n)
    for i in range(n):
        for j in range(i + 1):
            assert visible[i, j]
            if i - j < window:
                assert (qpos[i, j], kpos[i, j]) == (i, j)
            else:
                assert (qpos[i, j], kpos[i, j]) == (i // group + window - window // group, j // group)
    assert not visible[np.triu_indices(n, 1)].any()
    distance = (qpos - kpos)[np.tril_indices(n)]
    assert distance.min() >= 0 and distance.max() == se.largest_position(n)


@pytest.mark.parametrize("sinks,window", [(4, 8), (1, 1), (0, 5), (3, 20)])
def test_streaming_reduces_to_cache_places(sinks, window):
    """The relative-distance form (window keys i - j, sinks min(i, S+R-1) - j) against the literal
    definition: the cache keeps the first S and the last R tokens, RoPE positions are places in it."""
    stream = StreamingConfig(sinks, window)
    n = 50
    qpos, kpos, visible = T.pair_positions(stream, np.arange(n), n)
    for i in range(n):
        kept = sorted(set(range(min(sinks, i + 1))) | set(range(max(0, i - window + 1), i + 1)))
        place = {j: p for p, j in enumerate(kept)}
        assert np.flatnonzero(visible[i]).tolist() == kept
        for j in kept:
            assert qpos[i, j] - kpos[i, j] == place[i] - place[j]


def test_streaming_literal_attention_equals_reference():
    """Attention computed literally (evicted cache, keys and query rotated at their places) equals the
    reference's relative form."""
    rng = np.random.default_rng(1)
    sinks, window, n = 3, 7, 30
    q, k, v = _qkv(rng, n, 4, 2, 16)
    rotary = RotaryTable(RopeConfig(dim=16), n)
    ref = T.reference_attention(q, k, v, np.arange(n), rotary, StreamingConfig(sinks, window))
    for i in range(n):
        kept = np.array(sorted(set(range(min(sinks, i + 1))) | set(range(max(0, i - window + 1), i + 1))))
        places = np.arange(len(kept))
        k_rot = rotary.rotate(k[kept].astype(np.float64), places)  # (m, 2, 16)
        q_rot = rotary.rotate(q[i:i + 1].astype(np.float64), places[-1:])[0]  # (4, 16)
        scores = np.einsum("hgd,jhd->hgj", q_rot.reshape(2, 2, 16), k_rot) / math.sqrt(16)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        literal = np.einsum("hgj,jhd->hgd", probs, v[kept].astype(np.float64)).reshape(4, 16)
        # the same distances at other positions: equal up to the float32 cos/sin tables
        np.testing.assert_allclose(ref[i], literal, rtol=0, atol=1e-6)


# ---- exactly plain RoPE where the methods change nothing --------------------------------------

@pytest.mark.parametrize("scheme,n", [(SelfExtendConfig(4, 40), 40), (SelfExtendConfig(1, 3), 50),
                                      (StreamingConfig(4, 36), 40), (StreamingConfig(0, 50), 50)])
def test_short_sequences_are_plain_rope(scheme, n):
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, n, 6, 2, 32)
    rotary = RotaryTable(RopeConfig(dim=32), n)
    plain = T.reference_attention(q, k, v, np.arange(n), rotary, T.CAUSAL)
    np.testing.assert_array_equal(T.reference_attention(q, k, v, np.arange(n), rotary, scheme), plain)
    assert _rel_error(_blockwise(q, k, v, np.arange(n), rotary, scheme, block_q=16, block_k=8), plain) < 1e-5


def test_beyond_the_window_they_differ_from_plain_rope():
    rng = np.random.default_rng(3)
    n = 60
    q, k, v = _qkv(rng, n, 2, 1, 16)
    rotary = RotaryTable(RopeConfig(dim=16), n)
    plain = T.reference_attention(q, k, v, np.arange(n), rotary, T.CAUSAL)
    # Self-Extend: at i = W only key 0 is grouped, at distance W as in plain RoPE; StreamingLLM: nothing is
    # evicted before i = S + R
    for scheme, first_changed in [(SelfExtendConfig(3, 8), 9), (StreamingConfig(2, 10), 12)]:
        out = T.reference_attention(q, k, v, np.arange(n), rotary, scheme)
        np.testing.assert_allclose(out[:first_changed], plain[:first_changed], rtol=1e-12, atol=1e-12)
        assert np.abs(out[first_changed:] - plain[first_changed:]).max(axis=(1, 2)).min() > 1e-6


# ---- the tiled algorithm against the reference -------------------------------------------------

CASES = [  # scheme, n_k, first query, block_q, block_k, Hq, Hkv, head_dim
    (SelfExtendConfig(4, 16), 150, 0, 32, 64, 6, 2, 32),
    (SelfExtendConfig(3, 7), 97, 40, 16, 10, 4, 4, 16),
    (SelfExtendConfig(8, 32), 300, 0, 128, 256, 9, 3, 64),
    (SelfExtendConfig(2, 1), 40, 0, 7, 5, 2, 1, 16),
    (SelfExtendConfig(5, 12), 120, 119, 1, 16, 6, 3, 32),  # one decode step
    (StreamingConfig(4, 16), 150, 0, 32, 64, 6, 2, 32),
    (StreamingConfig(1, 9), 97, 40, 16, 10, 4, 4, 16),
    (StreamingConfig(0, 20), 120, 0, 32, 8, 2, 1, 16),  # no sinks: window attention
    (StreamingConfig(4, 64), 300, 0, 128, 256, 9, 3, 64),
    (StreamingConfig(3, 30), 120, 119, 1, 16, 6, 3, 32),  # one decode step
]


@pytest.mark.parametrize("scheme,n_k,start,block_q,block_k,n_heads,n_kv,head_dim", CASES)
def test_blockwise_matches_reference(scheme, n_k, start, block_q, block_k, n_heads, n_kv, head_dim):
    rng = np.random.default_rng(n_k + start)
    q, k, v = _qkv(rng, n_k, n_heads, n_kv, head_dim)
    q_pos = np.arange(start, n_k)
    rotary = RotaryTable(RopeConfig(dim=head_dim), n_k)
    logit_scale = 1.0 + 0.01 * q_pos
    ref = T.reference_attention(q[start:], k, v, q_pos, rotary, scheme, logit_scale=logit_scale)
    out = _blockwise(q[start:], k, v, q_pos, rotary, scheme, logit_scale=logit_scale, block_q=block_q,
                     block_k=block_k)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert _rel_error(out, ref) < 1e-5


@pytest.mark.parametrize("scheme", [SelfExtendConfig(4, 12), StreamingConfig(2, 15)])
def test_blockwise_with_yarn_partial_rotary_and_scattered_queries(scheme):
    """YaRN scales cos/sin: Self-Extend's neighbour keys, rotated on from the cached group keys, must not
    carry that factor twice; rope.dim < head_dim leaves the last dims unrotated."""
    rope = RopeConfig(dim=24, scaling="yarn", factor=4.0, original_context=32)
    rng = np.random.default_rng(9)
    n = 140
    q, k, v = _qkv(rng, n, 4, 2, 32)
    rotary = RotaryTable(rope, n)
    q_pos = np.sort(rng.choice(n, size=40, replace=False))[::-1].copy()
    ref = T.reference_attention(q[:40], k, v, q_pos, rotary, scheme)
    assert _rel_error(_blockwise(q[:40], k, v, q_pos, rotary, scheme, block_q=8, block_k=16), ref) < 1e-5


@pytest.mark.parametrize("scheme", [SelfExtendConfig(4, 20), StreamingConfig(4, 30)])
def test_prefill_in_pieces_and_token_by_token_equal_one_pass(scheme):
    rng = np.random.default_rng(4)
    n = 200
    q, k, v = _qkv(rng, n, 6, 2, 32)
    rotary = RotaryTable(RopeConfig(dim=32), n)
    k_cached = T.rotate_keys(k, np.arange(n), rotary, scheme)
    whole = T.blockwise_attention(q, k_cached, v, np.arange(n), rotary, scheme)
    pieces = [T.blockwise_attention(q[a:b], k_cached[:b], v[:b], np.arange(a, b), rotary, scheme)
              for a, b in [(0, 70), (70, 71), (71, 150)]]
    pieces += [T.blockwise_attention(q[t:t + 1], k_cached[:t + 1], v[:t + 1], np.array([t]), rotary, scheme)
               for t in range(150, n)]
    np.testing.assert_allclose(np.concatenate(pieces), whole, rtol=0, atol=2e-6 * np.abs(whole).max())


def test_streaming_never_reads_evicted_keys():
    """Keys between the sinks and the window are never read: NaNs there change nothing."""
    stream = StreamingConfig(3, 20)
    rng = np.random.default_rng(6)
    n = 200
    q, k, v = _qkv(rng, n, 4, 2, 16)
    rotary = RotaryTable(RopeConfig(dim=16), n)
    k_cached = T.rotate_keys(k, np.arange(n), rotary, stream)
    v_cached = v.copy()
    k_cached[3:120], v_cached[3:120] = np.nan, np.nan  # evicted for every query from 139 on
    out = T.blockwise_attention(q[139:], k_cached, v_cached, np.arange(139, n), rotary, stream, block_k=8)
    ref = T.reference_attention(q[139:], k, v, np.arange(139, n), rotary, stream)
    assert np.isfinite(out).all() and _rel_error(out, ref) < 1e-5


@pytest.mark.parametrize("make,args", [(SelfExtendConfig, (0, 4)), (SelfExtendConfig, (2, 0)),
                                       (StreamingConfig, (-1, 4)), (StreamingConfig, (4, 0))])
def test_bad_settings_are_config_errors(make, args):
    with pytest.raises(ConfigError):
        make(*args)


class _CountingArrays(T.Arrays):
    """numpy tiles, counting the key rows read (the tiles of q, keys and values all pass through float32)."""

    def __init__(self):
        self.rows_read = 0

    def float32(self, x):
        self.rows_read += len(x)
        return super().float32(x)


@pytest.mark.parametrize("scheme,bound", [(StreamingConfig(4, 24), lambda bq: bq + 2 * (4 + 24 + bq - 1)),
                                          (SelfExtendConfig(4, 24), None)])
def test_blockwise_reads_every_tile_through_its_arrays(scheme, bound):
    """The result through an Arrays is HOST's; StreamingLLM reads per query tile at most its q rows plus, for K and
    V each, the sinks and the window span (the bounded work per token the CUDA path relies on)."""
    rng = np.random.default_rng(8)
    n, bq = 300, 16
    q, k, v = _qkv(rng, n, 4, 2, 16)
    rotary = RotaryTable(RopeConfig(dim=16), n)
    k_cached = T.rotate_keys(k, np.arange(n), rotary, scheme)
    arrays = _CountingArrays()
    out = T.blockwise_attention(q, k_cached, v, np.arange(n), rotary, scheme, block_q=bq, block_k=8, arrays=arrays)
    np.testing.assert_array_equal(out, T.blockwise_attention(q, k_cached, v, np.arange(n), rotary, scheme,
                                                             block_q=bq, block_k=8))
    tiles = n // bq + (n % bq > 0)
    if bound is not None:
        assert arrays.rows_read <= tiles * bound(bq)
    else:  # Self-Extend reads every earlier key: about n^2 / (2 bq) rows each of K and V
        assert arrays.rows_read >= n * n // bq
