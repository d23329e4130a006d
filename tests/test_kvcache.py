import numpy as np
import pytest

from engine.errors import ContextError
from engine.kvcache import KVCache


def test_write_commit_and_overflow():
    cache = KVCache(n_layers=2, capacity=5, n_kv_heads=3, head_dim=4)
    k = np.ones((3, 3, 4), np.float32)
    for layer in range(2):
        cache.write(layer, 0, k, 2 * k)
    cache.commit(3)
    assert cache.length == 3 and cache.free == 2
    np.testing.assert_array_equal(cache.v[1, :3], 2 * k)
    with pytest.raises(ContextError, match="-c"):
        cache.check_room(3)
    with pytest.raises(ContextError):
        cache.write(0, 3, np.ones((3, 3, 4), np.float32), np.ones((3, 3, 4), np.float32))


def test_write_must_follow_cached_tokens():
    cache = KVCache(n_layers=1, capacity=8, n_kv_heads=1, head_dim=2)
    with pytest.raises(ContextError):
        cache.write(0, 2, np.zeros((1, 1, 2)), np.zeros((1, 1, 2)))


def test_capacity_must_be_positive():
    with pytest.raises(ContextError):
        KVCache(n_layers=1, capacity=0, n_kv_heads=1, head_dim=2)
