"""The CUDA backend: the op set of engine/backends/__init__.py on CuPy arrays and NVRTC kernels.

Arrays: residual stream fp32 (n, d); everything that feeds a matrix product fp16; logits fp32;
token ids and positions int32. Weights stay in their GGUF encoding on the device (weights.py);
attention runs over a preallocated fp16 KV cache (attention.py). No op reads a device value back
to the host, so ``Llama.compute`` for one token can be captured as a CUDA graph (graph.py:
``CudaBackend.decoder``), and only the sampled token id comes back per step.
"""
from __future__ import annotations

import numpy as np

from ...errors import DeviceError
from ...kernels import function
from ...kvcache import KVCache
from . import attention as attention_ops
from . import flash_attention as flash
from .weights import DeviceMatrix, MatrixOps, upload_weight

ELEMENTWISE_THREADS = 256


def _cupy():
    import cupy

    return cupy


class CudaBackend:
    name = "cuda"
    prefill_batch = 8192  # large batches keep cuBLAS busy (79 TFLOP/s at 4096 tokens, 262 at 32k on an H200)

    def __init__(self):
        self.cp = _cupy()
        self.matrices = MatrixOps(self.cp)
        self._tables: dict[int, tuple[object, object, object]] = {}  # id(rotary) -> (rotary, cos, sin)

    # ----------------------------------------------------------------------------------- setup
    def prepare_weights(self, weights) -> dict[str, object]:
        """Upload every weight once: vectors as fp32, matrices in their stored encoding."""
        cp = self.cp
        try:
            return {name: upload_weight(cp, name, w) for name, w in weights.items()}
        except cp.cuda.memory.OutOfMemoryError as exc:
            needed = sum(int(w.raw.nbytes) for w in weights.values())
            free, _ = cp.cuda.runtime.memGetInfo()
            raise DeviceError(f"GPU out of memory loading the weights: they need {needed / 2**30:.2f} GiB, "
                              f"{free / 2**30:.2f} GiB is free") from exc

    def new_cache(self, n_layers: int, capacity: int, n_kv_heads: int, head_dim: int) -> KVCache:
        cp = self.cp
        needed = 2 * n_layers * capacity * n_kv_heads * head_dim * 2  # K and V, fp16
        free, _ = cp.cuda.runtime.memGetInfo()
        free += cp.get_default_memory_pool().free_bytes()
        if needed > free:
            raise DeviceError(
                f"the KV cache for {capacity} tokens needs {needed / 2**30:.2f} GiB of GPU memory but only "
                f"{free / 2**30:.2f} GiB is free; lower the context with -c/--ctx-size")
        try:
            return KVCache(n_layers, capacity, n_kv_heads, head_dim, dtype=cp.float16, xp=cp)
        except cp.cuda.memory.OutOfMemoryError as exc:
            raise DeviceError(f"GPU out of memory allocating the KV cache for {capacity} tokens "
                              f"({needed / 2**30:.2f} GiB); lower the context with -c/--ctx-size") from exc

    def rotary_tables(self, rotary) -> tuple[object, object]:
        """cos, sin (n_positions, rope_dim/2) fp32 on the device, uploaded once per RotaryTable."""
        entry = self._tables.get(id(rotary))
        if entry is None or entry[0] is not rotary:
            entry = (rotary, self.cp.asarray(rotary.cos), self.cp.asarray(rotary.sin))
            self._tables[id(rotary)] = entry
        return entry[1], entry[2]

    # ----------------------------------------------------------------------------------- transfers
    def tokens(self, ids) -> object:
        return self.cp.asarray(np.asarray(ids, dtype=np.int32))

    def positions(self, start: int, n: int) -> object:
        return self.cp.arange(start, start + n, dtype=self.cp.int32)

    def target_logprobs(self, logits, targets) -> np.ndarray:
        """log softmax(logits[r])[targets[r]] per row, reduced on the device: (n,) float64 on the host."""
        cp = self.cp
        rows = logits.astype(cp.float32, copy=False)  # (n, vocab)
        top = rows.max(axis=1, keepdims=True)
        log_norm = top[:, 0] + cp.log(cp.exp(rows - top).sum(axis=1))
        picked = rows[cp.arange(rows.shape[0]), cp.asarray(np.asarray(targets, dtype=np.int64))]
        return cp.asnumpy(picked - log_norm).astype(np.float64)

    def to_numpy(self, x) -> np.ndarray:
        out = self.cp.asnumpy(x)
        return out.astype(np.float32) if out.dtype == np.float16 else out

    # ----------------------------------------------------------------------------------- ops
    def embedding(self, table: DeviceMatrix, ids) -> object:
        return self.matrices.embedding(table, ids)

    def linear(self, x, w: DeviceMatrix) -> object:
        return self.matrices.linear(x, w)

    def rmsnorm(self, x, w, eps: float) -> object:
        """x (n, d) fp32 or fp16 -> fp16."""
        cp = self.cp
        x = cp.ascontiguousarray(x)
        n, d = x.shape
        out = cp.empty((n, d), dtype=cp.float16)
        if n:
            function("elementwise", "rmsnorm")(
                (n,), (ELEMENTWISE_THREADS,),
                (x, w, out, np.int32(d), np.float32(eps), np.int32(x.dtype == cp.float16)))
        return out

    def add(self, x, y) -> object:
        """Residual add: fp32 x + (fp16 or fp32) y -> fp32."""
        cp = self.cp
        x = cp.ascontiguousarray(x, dtype=cp.float32)
        y = cp.ascontiguousarray(y)
        if y.dtype not in (cp.float16, cp.float32):
            y = y.astype(cp.float32)
        out = cp.empty(x.shape, dtype=cp.float32)
        self._launch_1d("elementwise", "add_residual", x.size,
                        (x, y, out, np.int64(x.size), np.int32(y.dtype == cp.float16)))
        return out

    def swiglu(self, gate, up) -> object:
        cp = self.cp
        gate = cp.ascontiguousarray(gate, dtype=cp.float16)
        up = cp.ascontiguousarray(up, dtype=cp.float16)
        out = cp.empty(gate.shape, dtype=cp.float16)
        self._launch_1d("elementwise", "swiglu", gate.size, (gate, up, out, np.int64(gate.size)))
        return out

    def rotate_keys(self, k, positions, rotary, dca) -> object:
        """k (n, Hkv, D) -> fp16, rotated at key positions (j mod chunk_len with DCA)."""
        cp = self.cp
        k = cp.ascontiguousarray(k, dtype=cp.float16)
        n, heads, head_dim = k.shape
        rope_dim = rotary.rope.dim
        cos_t, sin_t = self.rotary_tables(rotary)
        out = cp.empty_like(k)
        per_head = head_dim - rope_dim // 2
        self._launch_1d("elementwise", "rotate_keys", n * heads * per_head,
                        (k, positions, cos_t, sin_t, out, np.int32(n), np.int32(heads), np.int32(head_dim),
                         np.int32(rope_dim), np.int32(dca.chunk_len if dca is not None else 0)))
        return out

    def store_kv(self, cache: KVCache, layer: int, k_rotated, v, positions) -> None:
        """Write rows at the (device) positions; model.forward has checked the room on the host."""
        cp = self.cp
        k_rotated = cp.ascontiguousarray(k_rotated, dtype=cp.float16)
        v = cp.ascontiguousarray(v, dtype=cp.float16)
        n = k_rotated.shape[0]
        row = k_rotated.shape[1] * k_rotated.shape[2]
        self._launch_1d("elementwise", "store_kv", n * row,
                        (k_rotated, v, positions, cache.k[layer], cache.v[layer], np.int32(n), np.int32(row)))

    def attention(self, q, cache: KVCache, layer: int, positions, rotary, dca, temperature_length=None):
        """q (n, Hq, D) unrotated, attending the cached keys 0 .. positions[-1] -> (n, Hq, D) fp16."""
        cos_t, sin_t = self.rotary_tables(rotary)
        n, n_heads, head_dim = q.shape
        if n > 1 and flash.unsupported_reason(head_dim, rotary.rope.dim, n_heads, cache.k.shape[2]) is None:
            # prefill: the fused tensor-core kernel (one launch, the rotation chosen per key tile)
            return flash.flash_attention(q, cache.k[layer], cache.v[layer], positions, cos_t, sin_t,
                                         rope_dim=rotary.rope.dim, dca=dca,
                                         temperature_length=temperature_length or 0,
                                         n_keys_hint=cache.length + n)
        return attention_ops.attention(self.cp, q, cache.k[layer], cache.v[layer], positions, cos_t, sin_t,
                                       rotary.rope.dim, dca, temperature_length, cache.capacity,
                                       keys_hint=cache.length + n)

    def decoder(self, model, cache: KVCache, sampling, history):
        """A graph-replaying decode loop with device-side sampling (see graph.GraphDecoder)."""
        from .graph import GraphDecoder

        return GraphDecoder(self, model, cache, sampling, history)

    def _launch_1d(self, file: str, kernel: str, n_threads: int, args: tuple) -> None:
        if n_threads:
            blocks = (n_threads + ELEMENTWISE_THREADS - 1) // ELEMENTWISE_THREADS
            function(file, kernel)((blocks,), (ELEMENTWISE_THREADS,), args)
