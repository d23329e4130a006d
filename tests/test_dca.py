"""DCA semantics (design.md §3): position maps, the materialized reference, blockwise == reference."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import dca as D
from engine.config import DCAConfig, RopeConfig
from engine.errors import ConfigError, ContextError
from engine.rope import RotaryTable

SMALL_CONFIGS = [(6, 2), (7, 3), (16, 4), (40, 10), (33, 32), (50, 1)]  # (chunk_size, local_window)


def _rotary(dca: DCAConfig | None, n: int, dim: int, rope: RopeConfig | None = None) -> RotaryTable:
    rope = rope or RopeConfig(theta=10000.0, dim=dim)
    return RotaryTable(rope, dca.chunk_size + 1 if dca else n)


def _qkv(rng, n_k: int, n_heads: int, n_kv: int, head_dim: int):
    q = rng.standard_normal((n_k, n_heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((n_k, n_kv, head_dim)).astype(np.float32)
    v = rng.standard_normal((n_k, n_kv, head_dim)).astype(np.float32)
    return q, k, v


def _rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max())


# ---- position maps -------------------------------------------------------------------------

def _check_pairs(i: np.ndarray, j: np.ndarray, dca: DCAConfig) -> None:
    """Every position-map property of design.md §3 on query/key pairs with j <= i."""
    cl, cs = dca.chunk_len, dca.chunk_size
    rel = D.relation(i, j, dca)
    np.testing.assert_array_equal(rel, np.minimum(i // cl - j // cl, 2))
    intra, successive, inter = D.query_positions(i, dca)
    qpos = np.choose(rel, [intra, successive, inter])
    distance = qpos - D.key_positions(j, dca)
    assert distance.min() >= 0 and distance.max() <= cs
    np.testing.assert_array_equal(distance[rel == 0], (i - j)[rel == 0])
    np.testing.assert_array_equal(successive, np.minimum(cl + i % cl, cs))
    np.testing.assert_array_equal(inter, min(2 * cl - 1, cs))


@pytest.mark.parametrize("chunk_size,local_window", SMALL_CONFIGS)
def test_position_maps_exhaustive_small(chunk_size, local_window):
    dca = DCAConfig(chunk_size=chunk_size, local_window=local_window)
    n = 6 * dca.chunk_len + 5
    i, j = np.tril_indices(n)  # every pair j <= i
    _check_pairs(i, j, dca)
    qpos, kpos = D.position_matrix(np.arange(n), n, dca)
    assert qpos.shape == (n, n) and kpos.shape == (n,)
    distance = (qpos - kpos[None, :])[i, j]
    assert distance.min() >= 0 and distance.max() <= chunk_size
    assert distance.max() == chunk_size or 2 * dca.chunk_len - 1 < chunk_size


@settings(max_examples=60, deadline=None, database=None)
@given(chunk_size=st.integers(2, 200_000), window_fraction=st.floats(0.001, 0.999),
       seed=st.integers(0, 2**32 - 1))
def test_position_maps_property_large(chunk_size, window_fraction, seed):
    local_window = min(max(1, int(chunk_size * window_fraction)), chunk_size - 1)
    dca = DCAConfig(chunk_size=chunk_size, local_window=local_window)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, 64 * chunk_size, size=2000)
    j = (i * rng.random(2000)).astype(np.int64)
    j[:100] = i[:100]  # the diagonal
    j[100:200] = np.maximum(i[100:200] - dca.chunk_len, 0)  # around chunk boundaries
    _check_pairs(i, j, dca)


def test_position_maps_by_hand():
    dca = DCAConfig(chunk_size=6, local_window=2)  # chunk_len 4
    #            (i, j): (relation, query position, key position)
    expected = {(3, 1): (0, 3, 1), (5, 4): (0, 1, 0), (5, 2): (1, 5, 2), (7, 2): (1, 6, 2),
                (9, 2): (2, 6, 2), (9, 7): (1, 5, 3), (13, 0): (2, 6, 0)}
    for (i, j), (rel, qp, kp) in expected.items():
        qpos, kpos = D.position_matrix(np.array([i]), i + 1, dca)
        assert (int(D.relation(i, j, dca)), int(qpos[0, j]), int(kpos[j])) == (rel, qp, kp), (i, j)


def test_no_dca_means_plain_positions():
    positions = np.arange(50)
    assert all(np.array_equal(p, positions) for p in D.query_positions(positions, None))
    np.testing.assert_array_equal(D.key_positions(positions, None), positions)
    qpos, kpos = D.position_matrix(positions, 50, None)
    np.testing.assert_array_equal(qpos, np.broadcast_to(positions[:, None], (50, 50)))
    assert not D.relation(positions[:, None], positions[None, :], None).any()


def test_temperature():
    scale = D.temperature(np.array([0, 99, 100, 199, 999]), 100)
    np.testing.assert_allclose(scale, [1.0, 1.0, 1.0 + 0.1 * np.log(1.01), 1.0 + 0.1 * np.log(2.0),
                                       1.0 + 0.1 * np.log(10.0)], rtol=1e-12)


# ---- attention -----------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size,local_window,n", [(40, 10, 30), (64, 8, 50), (100, 30, 11)])
def test_dca_equals_causal_attention_within_one_chunk(chunk_size, local_window, n):
    dca = DCAConfig(chunk_size=chunk_size, local_window=local_window)
    assert n <= dca.chunk_len
    rng = np.random.default_rng(n)
    q, k, v = _qkv(rng, n, 6, 2, 64)
    positions = np.arange(n)
    plain = D.reference_attention(q, k, v, positions, _rotary(None, n, 64), None)
    with_dca = D.reference_attention(q, k, v, positions, _rotary(dca, n, 64), dca)
    np.testing.assert_allclose(with_dca, plain, rtol=1e-12, atol=1e-12)
    rotary = _rotary(dca, n, 64)
    blockwise = D.blockwise_attention(q, D.rotate_keys(k, positions, rotary, dca), v, positions, rotary, dca,
                                      block_q=8, block_k=16)
    assert _rel_error(blockwise, plain) < 1e-5


def test_dca_differs_from_causal_beyond_one_chunk():
    dca = DCAConfig(chunk_size=20, local_window=5)
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, 60, 2, 2, 32)
    positions = np.arange(60)
    plain = D.reference_attention(q, k, v, positions, _rotary(None, 60, 32), None)
    with_dca = D.reference_attention(q, k, v, positions, _rotary(dca, 60, 32), dca)
    np.testing.assert_allclose(with_dca[:dca.chunk_len], plain[:dca.chunk_len], rtol=1e-12, atol=1e-12)
    assert np.abs(with_dca[dca.chunk_len:] - plain[dca.chunk_len:]).max() > 1e-3


def test_reference_scores_use_the_relative_distance_of_the_position_map():
    """One query, one head: the reference's attention weights are softmax(<R(qpos-kpos) q, k>)."""
    dca = DCAConfig(chunk_size=9, local_window=3)
    rope = RopeConfig(theta=100.0, dim=8)
    rotary = RotaryTable(rope, 40)
    rng = np.random.default_rng(4)
    n = 30
    q = rng.standard_normal((1, 1, 8))
    k = rng.standard_normal((n, 1, 8))
    v = np.eye(n)[:, None, :]  # (n, 1, n): the output row is the attention distribution itself
    qpos, kpos = D.position_matrix(np.array([n - 1]), n, dca)
    distances = qpos[0] - kpos
    scores = np.array([np.sum(rotary.rotate(q, np.array([d]))[0, 0] * k[j, 0]) for j, d in enumerate(distances)])
    expected = np.exp((scores - scores.max()) / np.sqrt(8))
    expected /= expected.sum()
    weights = D.reference_attention(q, k, v, np.array([n - 1]), rotary, dca)[0, 0]
    np.testing.assert_allclose(weights, expected, rtol=1e-5)  # float32 cos/sin tables
    assert sorted(set(D.relation(n - 1, np.arange(n), dca).tolist())) == [0, 1, 2]


@pytest.mark.parametrize("group", [3, 4])
def test_reference_gqa_equals_repeated_kv_heads(group):
    """Query head h reads KV head h // group: the same as repeating every KV head group times."""
    dca = DCAConfig(chunk_size=24, local_window=6)
    rng = np.random.default_rng(group)
    q, k, v = _qkv(rng, 70, 2 * group, 2, 32)
    rotary = _rotary(dca, 70, 32)
    positions = np.arange(70)
    grouped = D.reference_attention(q, k, v, positions, rotary, dca)
    repeated = D.reference_attention(q, np.repeat(k, group, axis=1), np.repeat(v, group, axis=1), positions,
                                     rotary, dca)
    np.testing.assert_allclose(grouped, repeated, rtol=1e-12, atol=1e-12)


# (n_keys, query start, chunk_size, local_window, block_q, block_k, Hq, Hkv, head_dim, logit scale)
BLOCKWISE_CASES = [
    (200, 0, 40, 10, 16, 24, 4, 4, 64, False),  # group 1; chunk_len 30 is no multiple of either tile
    (257, 0, 64, 16, 32, 32, 9, 3, 64, True),  # group 3 (SmolLM2); tiles straddle every other boundary
    (190, 0, 50, 13, 7, 11, 12, 3, 128, False),  # group 4, head_dim 128, odd tiles
    (230, 0, 37, 9, 64, 128, 8, 1, 64, True),  # group 8; query tiles span several chunks
    (240, 0, 48, 16, 32, 16, 4, 2, 64, False),  # tiles divide chunk_len 32: one relation per tile pair
    (240, 170, 40, 10, 16, 16, 6, 2, 64, True),  # chunked prefill: queries are the last 70 tokens
    (243, 101, 45, 15, 128, 256, 6, 2, 128, False),  # chunked prefill, default-size tiles
    (300, 299, 48, 12, 1, 64, 8, 2, 128, False),  # decode, n_q = 1
    (151, 150, 30, 7, 128, 5, 9, 3, 64, True),  # decode with tiny key tiles
    (180, 0, None, None, 32, 48, 6, 3, 64, False),  # no DCA: plain causal
    (180, 60, None, None, 16, 40, 8, 8, 128, True),  # no DCA, chunked prefill
]


@pytest.mark.parametrize("n_k,start,chunk_size,local_window,block_q,block_k,n_heads,n_kv,head_dim,use_scale",
                         BLOCKWISE_CASES)
def test_blockwise_matches_reference(n_k, start, chunk_size, local_window, block_q, block_k, n_heads, n_kv,
                                     head_dim, use_scale):
    dca = DCAConfig(chunk_size=chunk_size, local_window=local_window) if chunk_size else None
    rng = np.random.default_rng(n_k * 7 + start)
    q, k, v = _qkv(rng, n_k, n_heads, n_kv, head_dim)
    q = q[start:]
    q_pos = np.arange(start, n_k)
    logit_scale = D.temperature(q_pos, 64) if use_scale else None
    rotary = _rotary(dca, n_k, head_dim)
    ref = D.reference_attention(q, k, v, q_pos, rotary, dca, logit_scale=logit_scale)
    k_rot = D.rotate_keys(k, np.arange(n_k), rotary, dca)
    out = D.blockwise_attention(q, k_rot, v, q_pos, rotary, dca, logit_scale=logit_scale,
                                block_q=block_q, block_k=block_k)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert _rel_error(out, ref) < 1e-5


def test_blockwise_matches_reference_with_scaled_rope_and_arbitrary_query_positions():
    dca = DCAConfig(chunk_size=36, local_window=8)
    rope = RopeConfig(theta=10000.0, dim=48, scaling="yarn", factor=4.0, original_context=32)  # rope.dim < head_dim
    rotary = RotaryTable(rope, dca.chunk_size + 1)
    rng = np.random.default_rng(5)
    n_k = 220
    _, k, v = _qkv(rng, n_k, 6, 2, 64)
    q_pos = np.sort(rng.choice(n_k, size=50, replace=False))[::-1].copy()  # scattered, descending
    q = rng.standard_normal((50, 6, 64)).astype(np.float32)
    ref = D.reference_attention(q, k, v, q_pos, rotary, dca, scale=0.2)
    out = D.blockwise_attention(q, D.rotate_keys(k, np.arange(n_k), rotary, dca), v, q_pos, rotary, dca,
                                scale=0.2, block_q=16, block_k=32)
    assert _rel_error(out, ref) < 1e-5


def test_blockwise_ignores_cache_capacity_beyond_the_queries():
    """Keys after the last query (unused cache capacity) are never read: NaNs there change nothing."""
    dca = DCAConfig(chunk_size=40, local_window=12)
    rng = np.random.default_rng(6)
    n, capacity = 150, 400
    q, k, v = _qkv(rng, n, 6, 3, 64)
    rotary = _rotary(dca, n, 64)
    k_cache = np.full((capacity, 3, 64), np.nan, dtype=np.float32)
    v_cache = np.full((capacity, 3, 64), np.nan, dtype=np.float32)
    k_cache[:n] = D.rotate_keys(k, np.arange(n), rotary, dca)
    v_cache[:n] = v
    q_pos = np.arange(n)
    ref = D.reference_attention(q, k, v, q_pos, rotary, dca)
    for block_q, block_k in [(32, 64), (128, 256), (1, 1000)]:
        out = D.blockwise_attention(q, k_cache, v_cache, q_pos, rotary, dca, block_q=block_q, block_k=block_k)
        assert np.isfinite(out).all()
        assert _rel_error(out, ref) < 1e-5


def test_blockwise_is_independent_of_tiling():
    dca = DCAConfig(chunk_size=96, local_window=32)
    rng = np.random.default_rng(7)
    n = 700
    q, k, v = _qkv(rng, n, 9, 3, 64)
    rotary = _rotary(dca, n, 64)
    k_rot = D.rotate_keys(k, np.arange(n), rotary, dca)
    q_pos = np.arange(n)
    results = [D.blockwise_attention(q, k_rot, v, q_pos, rotary, dca, block_q=bq, block_k=bk)
               for bq, bk in [(128, 256), (64, 64), (100, 37), (700, 700), (1, 512)]]
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=0, atol=2e-6 * np.abs(results[0]).max())
    # prefill in pieces (each piece sees the keys written so far) equals prefill in one pass
    pieces = [D.blockwise_attention(q[a:b], k_rot[:b], v[:b], q_pos[a:b], rotary, dca)
              for a, b in [(0, 150), (150, 151), (151, 400), (400, 700)]]
    np.testing.assert_allclose(np.concatenate(pieces), results[0], rtol=0, atol=2e-6 * np.abs(results[0]).max())


def test_blockwise_memory_is_bounded_by_tiles():
    dca = DCAConfig(chunk_size=1500, local_window=500)
    n = 4096
    rng = np.random.default_rng(8)
    q, k, v = _qkv(rng, n, 1, 1, 16)
    rotary = _rotary(dca, n, 16)
    k_rot = D.rotate_keys(k, np.arange(n), rotary, dca)
    tracemalloc.start()
    try:
        D.blockwise_attention(q, k_rot, v, np.arange(n), rotary, dca, block_q=128, block_k=256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < n * n * 4 / 16  # a full score matrix would be n*n*4 bytes = 64 MiB


def test_attention_input_errors():
    dca = DCAConfig(chunk_size=16, local_window=4)
    rotary = _rotary(dca, 20, 8)
    q, k, v = _qkv(np.random.default_rng(9), 20, 4, 2, 8)
    with pytest.raises(ContextError, match="20 available"):
        D.blockwise_attention(q, k, v, np.arange(1, 21), rotary, dca)
    with pytest.raises(ContextError, match="20 available"):
        D.reference_attention(q, k, v, np.arange(1, 21), rotary, dca)
    with pytest.raises(ConfigError, match="multiple"):
        D.blockwise_attention(q[:, :3], k, v, np.arange(20), rotary, dca)
    with pytest.raises(ConfigError, match="logit_scale"):
        D.blockwise_attention(q, k, v, np.arange(20), rotary, dca, logit_scale=np.ones(3))
    with pytest.raises(ConfigError, match="tile sizes"):
        D.blockwise_attention(q, k, v, np.arange(20), rotary, dca, block_k=0)
    with pytest.raises(ContextError, match="rotary table"):  # table too small for plain positions
        D.blockwise_attention(q, k, v, np.arange(20), RotaryTable(RopeConfig(dim=8), 10), None)
