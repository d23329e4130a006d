"""The reference backend: numpy, float32 math. Every other backend is tested against it."""
from __future__ import annotations

import numpy as np

from .. import dca as dca_ops
from ..decoder import HostDecoder
from ..errors import ContextError
from ..kvcache import KVCache


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where the OS does not say)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class NumpyBackend:
    name = "cpu"
    prefill_batch = 512  # tokens per forward call during prefill (bounds activation memory)

    def prepare_weights(self, weights) -> dict[str, np.ndarray]:
        """Dequantize every weight once to float32 (matrices (out, in), vectors (n,))."""
        return {name: w.dequantize() for name, w in weights.items()}

    def new_cache(self, n_layers: int, capacity: int, n_kv_heads: int, head_dim: int) -> KVCache:
        needed = 2 * n_layers * capacity * n_kv_heads * head_dim * np.dtype(np.float32).itemsize
        available = available_memory_bytes()
        if available is not None and needed > available:
            raise ContextError(
                f"a context of {capacity} tokens needs {needed / 2**30:.1f} GiB of KV cache but only "
                f"{available / 2**30:.1f} GiB of memory is available; lower the context size with -c/--ctx-size"
            )
        return KVCache(n_layers, capacity, n_kv_heads, head_dim, dtype=np.float32, xp=np)

    def decoder(self, model, cache: KVCache, sampling, history) -> HostDecoder:
        return HostDecoder(self, model, cache, sampling, history)

    def tokens(self, ids) -> np.ndarray:
        return np.asarray(ids, dtype=np.int64)

    def positions(self, start: int, n: int) -> np.ndarray:
        return np.arange(start, start + n, dtype=np.int64)

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    def target_logprobs(self, logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """log softmax(logits[r])[targets[r]] per row: (n,) float64 on the host (one float64 copy of the rows)."""
        rows = logits.astype(np.float64)  # (n, vocab)
        top = rows.max(axis=1, keepdims=True)
        picked = rows[np.arange(len(targets)), targets] - top[:, 0]
        rows -= top
        return picked - np.log(np.exp(rows, out=rows).sum(axis=1))

    def embedding(self, table: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return table[ids]  # (n, d)

    def rmsnorm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        # x: (n, d) float32; mean of squares in float32 as llama.cpp does
        inv_rms = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))
        return (x * inv_rms) * w

    def linear(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x @ w.T  # (n, in) @ (in, out) -> (n, out); w.T is a free transposed view

    def linear_group(self, x: np.ndarray, ws) -> list[np.ndarray]:
        return [x @ w.T for w in ws]

    def add_linear(self, x: np.ndarray, a: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x + a @ w.T

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        # silu(g) = g * sigmoid(g), with sigmoid written through tanh so large |g| cannot overflow
        return gate * (0.5 + 0.5 * np.tanh(0.5 * gate)) * up

    def store_kv(self, cache: KVCache, layer: int, k, v, positions, rotary, dca) -> None:
        cache.write(layer, int(positions[0]), dca_ops.rotate_keys(k, positions, rotary, dca), v)

    def attention(self, q, cache: KVCache, layer: int, positions, rotary, dca, temperature_length=None):
        """q: (n, Hq, hd) unrotated, attending the cached keys 0 .. positions[-1]."""
        end = int(positions[-1]) + 1
        logit_scale = None if temperature_length is None else dca_ops.temperature(positions, temperature_length)
        return dca_ops.blockwise_attention(q, cache.k[layer, :end], cache.v[layer, :end], positions, rotary, dca,
                                           logit_scale=logit_scale)
