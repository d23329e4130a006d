"""The reference backend: numpy, float32 math. Every other backend is tested against it.

Weights (host_weights.py): vectors as float32; matrices as ``HostMatrix``es, float32 copies when the
memory plan keeps them (``f32_copies``), else as stored (memory-mapped) and dequantized a block of rows
at a time into one reused scratch buffer. The memory plan (engine/memory.py) is checked before this
backend allocates anything.
"""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from .. import dca as dca_ops
from .. import tiled_attention
from ..decoder import HostDecoder
from ..kvcache import KVCache
from .host_weights import HostMatrix, new_scratch


class NumpyBackend:
    name = "cpu"
    prefill_batch = 512  # tokens per forward call during prefill (bounds activation memory)
    batched_decode = True  # Llama.forward_batch: several sequences' rows in one forward (the server's decode steps)

    def __init__(self, f32_copies: bool | None = None):
        # keep float32 copies of the matrices? None: when they fit comfortably (memory.f32_copies_fit)
        self.f32_copies = f32_copies

    def prepare_weights(self, weights) -> dict[str, np.ndarray | HostMatrix]:
        """Vectors (n,) dequantized to float32; matrices (out, in) as HostMatrix (float32 or as stored)."""
        keep = self.f32_copies
        if keep is None:
            from ..memory import f32_copies_fit

            keep = f32_copies_fit(weights)
        scratch = None if keep else new_scratch()
        return {name: HostMatrix(w, scratch, keep) if len(w.shape) == 2 else w.dequantize()
                for name, w in weights.items()}

    def new_cache(self, n_layers: int, capacity: int, n_kv_heads: int, head_dim: int,
                  types: tuple[str, str] = ("f32", "f32")) -> KVCache:
        """types: the K and V cache types (kv_storage.py; checked by kv_storage.resolve_cache_types)."""
        return KVCache(n_layers, capacity, n_kv_heads, head_dim, xp=np, types=types)

    def decode_blocks(self, model):
        """The blocks a one-token step runs: the model's own (composed from these ops)."""
        return model

    def prefill_blocks(self, model):
        """The blocks a prompt runs: the model's own."""
        return model

    def decoder(self, model, cache: KVCache, sampling, history) -> HostDecoder:
        return HostDecoder(self, model, cache, sampling, history)

    def activate(self) -> nullcontext:
        """The context a stage of a split model runs its ops in: nothing to switch on the host."""
        return nullcontext()

    def synchronize(self) -> None:
        """Nothing runs asynchronously on the host."""

    def receive(self, x: np.ndarray) -> np.ndarray:
        """x from the previous stage of a split model -> this backend's own copy (a CPU rank's handover)."""
        return np.array(x)

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

    def embedding(self, table: HostMatrix, ids: np.ndarray) -> np.ndarray:
        return table.rows(ids)  # (n, d)

    def rmsnorm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        # x: (n, d) float32; mean of squares in float32 as llama.cpp does
        inv_rms = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))
        return (x * inv_rms) * w

    def linear(self, x: np.ndarray, w: HostMatrix) -> np.ndarray:
        return w.matmul_t(x)  # (n, in) @ (in, out) -> (n, out)

    def linear_group(self, x: np.ndarray, ws) -> list[np.ndarray]:
        return [w.matmul_t(x) for w in ws]

    def add_linear(self, x: np.ndarray, a: np.ndarray, w: HostMatrix) -> np.ndarray:
        return x + w.matmul_t(a)

    def concat_rows(self, parts) -> np.ndarray:
        return np.concatenate(parts, axis=0)  # [(n_i, ...)] -> (sum n_i, ...)

    def add_bias(self, y: np.ndarray, b: np.ndarray) -> np.ndarray:
        return y + b  # (n, out) + (out,)

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        # silu(g) = g * sigmoid(g), with sigmoid written through tanh so large |g| cannot overflow
        return gate * (0.5 + 0.5 * np.tanh(0.5 * gate)) * up

    def store_kv(self, cache: KVCache, layer: int, k, v, positions, rotary, dca) -> None:
        """dca: the attention layout (a DCAConfig, None, or a Self-Extend / StreamingLLM scheme)."""
        scheme = dca_ops.as_scheme(dca)
        cache.write(layer, int(positions[0]), tiled_attention.rotate_keys(k, positions, rotary, scheme), v)

    def attention(self, q, cache: KVCache, layer: int, positions, rotary, dca, temperature_length=None):
        """q: (n, Hq, hd) unrotated, attending the cached keys 0 .. positions[-1] under the layout `dca`."""
        end = int(positions[-1]) + 1
        logit_scale = None if temperature_length is None else dca_ops.temperature(positions, temperature_length)
        return tiled_attention.blockwise_attention(q, cache.k[layer, :end], cache.v[layer, :end], positions, rotary,
                                                   dca_ops.as_scheme(dca), logit_scale=logit_scale)
