"""The CUDA backend: the op set of engine/backends/__init__.py on CuPy arrays and NVRTC kernels.

Arrays: residual stream fp32 (n, d); everything that feeds a matrix product in the activation dtype
(``CudaBackend(dtype=...)``: "f16", or "bf16" held as uint16 bit patterns since CuPy has no bfloat16);
logits fp32; token ids and positions int32. Weights stay in their GGUF encoding on the device
(weights.py); attention runs over a preallocated KV cache whose keys and values are each in the activation
dtype or q8_0 (kv_q8.py) (the fused flash kernels; attention.py for odd shapes; Self-Extend and StreamingLLM: passes
of the flash kernel, or the tiled algorithm over CuPy arrays, extension.py). The activation kernels are the `dtype`
build of their .cu file (kernels/: one source, compiled with -DACT_BF16 for bf16). No op reads
a device value back to the host, so ``Llama.compute`` for one token can be captured as a CUDA graph
(graph.py: ``CudaBackend.decoder``), and only the sampled token id comes back per step.
"""
from __future__ import annotations

import weakref
from contextlib import nullcontext

import numpy as np

from ...errors import ConfigError, DeviceError
from ...models.family import INPUT_GROUPS
from ...weights.bf16 import from_bf16_bits
from .kernels import ACTIVATION_DTYPES, function
from ...kvcache import KVCache
from ...kv_storage import row_bytes
from . import attention as attention_ops
from . import extension
from . import flash_attention as flash
from . import kv_q8
from .graph import GraphDecoder, KeptSteps
from .weights import (PREFILL_FP16_BUDGET, DeviceMatrix, MatrixOps, activation_type, fuse, fused_whole,
                      row_stride, to_activation, upload_weight)

ELEMENTWISE_THREADS = 256
NORM_ROWS_PER_BLOCK = 8  # rmsnorm: one warp per row


def _cupy():
    import cupy

    return cupy


class CudaBackend:
    name = "cuda"
    # large batches keep cuBLAS busy: on an H200, SmolLM2's GEMMs run at 202 TFLOP/s in 8192-token batches,
    # 254 in 32k ones, and a 128k prefill takes 3.10 s in 8192-token batches, 2.54 s in 32k ones
    prefill_batch = 32768
    # the fused decode blocks and CUDA graphs serve one sequence: the server's slots decode turn by turn
    batched_decode = False

    def __init__(self, dtype: str = "f16", device: int | None = None):
        """device: the GPU of a split model's stage (engine/pipeline.py; its weights and cache are made there
        and its ops run with it current, ``activate``); None: the current GPU, as unsplit."""
        if dtype not in ACTIVATION_DTYPES:
            raise ConfigError(f"unknown activation dtype {dtype!r} for the CUDA backend "
                              f"(choose from {', '.join(ACTIVATION_DTYPES)})")
        self.cp = _cupy()
        self.dtype = dtype  # "f16" | "bf16": activations, KV cache, prefill weight copies
        self.device = device
        self.act = activation_type(self.cp, dtype)  # their CuPy dtype (bf16: uint16 bits)
        self.matrices = MatrixOps(self.cp, dtype)
        # bytes the 16-bit prefill copies may take (weights.keep_half); LLM sets its memory plan's (memory.py)
        self.prefill_copy_budget = PREFILL_FP16_BUDGET
        self.kv_scratch = kv_q8.DequantScratch(self.cp, dtype)  # 16-bit copies of a layer's q8_0 cache rows
        # RotaryTable -> (cos, sin) on the device, dropped with the table (LLM.relayout replaces it per eval cell)
        self._tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # RotaryTable -> {Self-Extend / StreamingLLM scheme: its key tables (cos, sin)}, dropped with the table
        self._key_tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.kept_steps = KeptSteps()  # KV cache -> its decode steps' graphs and buffers, kept across generations

    # ----------------------------------------------------------------------------------- setup
    def activate(self):
        """The context this backend's ops run in: its GPU current when it is bound to one (a split model's
        stage), else nothing to switch."""
        return nullcontext() if self.device is None else self.cp.cuda.Device(self.device)

    def synchronize(self) -> None:
        """Wait until this backend's GPU has done the work queued on it."""
        with self.activate():
            self.cp.cuda.Device().synchronize()

    def receive(self, x) -> object:
        """x of the previous stage (on another GPU) -> a copy on this one, device to device, ordered by events
        and without a host wait: the copy waits for x's producers on x's GPU, and later work there (which may
        reuse x's memory) waits for the copy. NOT YET RUN on several GPUs (tests/test_cuda_split.py)."""
        cp = self.cp
        with x.device:
            x = cp.ascontiguousarray(x)
            ready = cp.cuda.get_current_stream().record()
        with self.activate():
            stream = cp.cuda.get_current_stream()
            stream.wait_event(ready)
            out = cp.empty(x.shape, dtype=x.dtype)
            out.data.copy_from_device_async(x.data, x.nbytes)
            copied = stream.record()
        with x.device:
            cp.cuda.get_current_stream().wait_event(copied)
        return out

    def prepare_weights(self, weights) -> dict[str, object]:
        """Upload every weight once: vectors as fp32, matrices in their stored encoding; each layer's
        Q/K/V and gate/up fused into one matrix where their encodings agree (weights.fuse)."""
        with self.activate():
            return self._upload(weights)

    def _upload(self, weights) -> dict[str, object]:
        cp = self.cp
        try:
            device = {name: upload_weight(cp, name, w) for name, w in weights.items()}
            for name in list(device):
                for group in INPUT_GROUPS:
                    if name.endswith("." + group[0]):
                        prefix = name[:-len(group[0])]
                        parts = [device.get(prefix + part) for part in group]
                        if all(isinstance(p, DeviceMatrix) for p in parts):
                            fuse(cp, parts)
            matrices = {id(m.whole or m): m.whole or m for m in device.values() if isinstance(m, DeviceMatrix)}
            self.matrices.keep_half(list(matrices.values()), self.prefill_copy_budget)
            return device
        except cp.cuda.memory.OutOfMemoryError as exc:
            needed = sum(int(w.raw.nbytes) for w in weights.values())
            free, _ = cp.cuda.runtime.memGetInfo()
            raise DeviceError(f"GPU out of memory loading the weights: they need {needed / 2**30:.2f} GiB, "
                              f"{free / 2**30:.2f} GiB is free") from exc

    def new_cache(self, n_layers: int, capacity: int, n_kv_heads: int, head_dim: int,
                  types: tuple[str, str] | None = None) -> KVCache:
        """The KV cache, keys and values each in the activation dtype (the default) or q8_0 (kv_q8.py; other types
        are refused by kv_storage.resolve_cache_types), and room in the dequantization scratch for a q8_0 one;
        the memory plan (engine/memory.py) has checked that they fit, an out-of-memory error here is the last
        resort."""
        cp = self.cp
        types = types or (self.dtype, self.dtype)
        needed = n_layers * capacity * n_kv_heads * sum(row_bytes(t, head_dim) for t in types)
        try:
            with self.activate():
                cache = KVCache(n_layers, capacity, n_kv_heads, head_dim, dtype=self.act, xp=cp, types=types,
                                storage=kv_q8.storage(cp, self.dtype))
                self.kv_scratch.reserve(capacity, n_kv_heads, head_dim, types)
                return cache
        except cp.cuda.memory.OutOfMemoryError as exc:
            raise DeviceError(f"GPU out of memory allocating the KV cache for {capacity} tokens "
                              f"({needed / 2**30:.2f} GiB); lower the context with -c/--ctx-size") from exc

    def rotary_tables(self, rotary) -> tuple[object, object]:
        """cos, sin (n_positions, rope_dim/2) fp32 on the device, uploaded once per RotaryTable."""
        if rotary not in self._tables:
            self._tables[rotary] = (self.cp.asarray(rotary.cos), self.cp.asarray(rotary.sin))
        return self._tables[rotary]

    def key_tables(self, rotary, layout) -> tuple[object, object]:
        """cos, sin the kernels that store keys rotate row j's key with (at row key_position(j): j, or j mod
        chunk_len with DCA): the rotary tables, or for a Self-Extend / StreamingLLM scheme its key tables, whose
        row j is the rotation of the scheme's cached key position (extension.key_tables), made once."""
        if not extension.is_extension(layout):
            return self.rotary_tables(rotary)
        by_scheme = self._key_tables.setdefault(rotary, {})
        if layout not in by_scheme:
            by_scheme[layout] = extension.key_tables(self.cp, rotary, layout, self.rotary_tables(rotary))
        return by_scheme[layout]

    # ----------------------------------------------------------------------------------- transfers
    def tokens(self, ids) -> object:
        with self.activate():
            return self.cp.asarray(np.asarray(ids, dtype=np.int32))

    def positions(self, start: int, n: int) -> object:
        with self.activate():
            return self.cp.arange(start, start + n, dtype=self.cp.int32)

    def target_logprobs(self, logits, targets) -> np.ndarray:
        """log softmax(logits[r])[targets[r]] per row, reduced on the device: (n,) float64 on the host."""
        cp = self.cp
        with self.activate():
            rows = logits.astype(cp.float32, copy=False)  # (n, vocab)
            top = rows.max(axis=1, keepdims=True)
            log_norm = top[:, 0] + cp.log(cp.exp(rows - top).sum(axis=1))
            picked = rows[cp.arange(rows.shape[0]), cp.asarray(np.asarray(targets, dtype=np.int64))]
            return cp.asnumpy(picked - log_norm).astype(np.float64)

    def to_numpy(self, x) -> np.ndarray:
        """A device array on the host; 16-bit activations (fp16, bf16 bits) as float32."""
        out = self.cp.asnumpy(x)
        if out.dtype == np.uint16:  # bf16 bit patterns
            return from_bf16_bits(out)
        return out.astype(np.float32) if out.dtype == np.float16 else out

    # ----------------------------------------------------------------------------------- ops
    def embedding(self, table: DeviceMatrix, ids) -> object:
        return self.matrices.embedding(table, ids)

    def linear(self, x, w: DeviceMatrix) -> object:
        return self.matrices.linear(x, w)

    def linear_group(self, x, ws) -> list:
        """[x @ w.T for w in ws]; one GEMM when the ws are one fused matrix (column views of its product)."""
        whole = fused_whole(ws) if x.shape[0] > 1 else None
        if whole is None:
            return [self.linear(x, w) for w in ws]
        y = self.linear(x, whole)  # (n, sum of rows)
        return [y[:, w.row_offset:w.row_offset + w.rows] for w in ws]

    def add_linear(self, x, a, w: DeviceMatrix) -> object:
        """x + a @ w.T for the fp32 residual x: for n > 1 cuBLAS accumulates into x (updated in place)."""
        cp = self.cp
        if a.shape[0] == 1 or w.f32_out or x.dtype != cp.float32 or not x.flags.c_contiguous:
            return self.add(x, self.linear(a, w))
        self.matrices.linear_accumulate(x, a, w)
        return x

    def rmsnorm(self, x, w, eps: float) -> object:
        """x (n, d) fp32 or activations -> activations."""
        cp = self.cp
        x = cp.ascontiguousarray(x) if x.dtype == self.act else cp.ascontiguousarray(x, dtype=cp.float32)
        n, d = x.shape
        out = cp.empty((n, d), dtype=self.act)
        vec4 = d % 4 == 0 and x.data.ptr % 16 == 0
        if n:
            function("elementwise", "rmsnorm", self.dtype)(
                ((n + NORM_ROWS_PER_BLOCK - 1) // NORM_ROWS_PER_BLOCK,), (32 * NORM_ROWS_PER_BLOCK,),
                (x, w, out, np.int32(n), np.int32(d), np.float32(eps), np.int32(x.dtype == self.act),
                 np.int32(vec4)))
        return out

    def add(self, x, y) -> object:
        """Residual add: fp32 x + (activations or fp32) y -> fp32."""
        cp = self.cp
        x = cp.ascontiguousarray(x, dtype=cp.float32)
        y = cp.ascontiguousarray(y) if y.dtype == self.act else cp.ascontiguousarray(y, dtype=cp.float32)
        out = cp.empty(x.shape, dtype=cp.float32)
        self.launch_1d("elementwise", "add_residual", x.size,
                        (x, y, out, np.int64(x.size), np.int32(y.dtype == self.act)))
        return out

    def add_bias(self, y, b) -> object:
        """y (n, out) activations (a column view of a fused product, or contiguous) + b (out,) fp32 -> (n, out)."""
        cp = self.cp
        if y.dtype != self.act or y.strides[1] != 2:
            y = to_activation(cp, y, self.dtype)
        n, cols = y.shape
        out = cp.empty((n, cols), dtype=self.act)
        self.launch_1d("elementwise", "add_bias", n * cols,
                        (y, np.int64(y.strides[0] // 2 if n > 1 else cols), b, out, np.int32(n), np.int32(cols)))
        return out

    def swiglu(self, gate, up) -> object:
        """silu(gate) * up -> (n, f) activations; gate and up may be the column halves of one product."""
        cp = self.cp
        n, f = gate.shape
        if not (gate.dtype == up.dtype == self.act and gate.strides == up.strides and gate.strides[1] == 2):
            gate = to_activation(cp, gate, self.dtype)
            up = to_activation(cp, up, self.dtype)
        stride = gate.strides[0] // 2  # elements between rows
        vec8 = f % 8 == 0 and stride % 8 == 0 and gate.data.ptr % 16 == 0 and up.data.ptr % 16 == 0
        out = cp.empty((n, f), dtype=self.act)
        self.launch_1d("elementwise", "swiglu", n * (f // 8 if vec8 else f),
                        (gate, up, out, np.int32(n), np.int32(f), np.int64(stride), np.int32(vec8)))
        return out

    def store_kv(self, cache: KVCache, layer: int, k, v, positions, rotary, dca) -> None:
        """Write cache rows at the (device) positions: k (n, Hkv, D) rotated at the key positions (j mod
        chunk_len with DCA; a Self-Extend / StreamingLLM scheme `dca`: its cached key positions, through
        key_tables), v as given; model.forward has checked the room on the host. k and v may be
        row-strided views (the K and V columns of a fused QKV product). q8_0 rows are quantized (kv_q8.store)."""
        cp = self.cp
        n, heads, head_dim = k.shape
        rope_dim = rotary.rope.dim
        cos_t, sin_t = self.key_tables(rotary, dca)
        chunk_len = np.int32(extension.chunk_len_of(dca))
        k_stride, v_stride = row_stride(k, self.act), row_stride(v, self.act)
        k_cache, v_cache = cache.k[layer], cache.v[layer]
        if kv_q8.is_q8(k_cache) or kv_q8.is_q8(v_cache):
            if k_stride is None or v_stride is None:
                k, v = to_activation(cp, k, self.dtype), to_activation(cp, v, self.dtype)
                k_stride = v_stride = heads * head_dim
            kv_q8.store(k, k_stride, v, v_stride, positions, cos_t, sin_t, k_cache, v_cache, rope_dim, chunk_len,
                        self.dtype)
            return
        if k_stride is None or v_stride is None or rope_dim % 16 or head_dim % 8:  # the one-value-per-thread kernel
            k, v = to_activation(cp, k, self.dtype), to_activation(cp, v, self.dtype)
            k_stride = v_stride = heads * head_dim
            kernel, per_head = "store_kv", 2 * head_dim - rope_dim // 2
        else:
            kernel, per_head = "store_kv_vec8", (2 * head_dim - rope_dim // 2) // 8
        self.launch_1d("elementwise", kernel, n * heads * per_head,
                        (k, np.int64(k_stride), v, np.int64(v_stride), positions, cos_t, sin_t, k_cache,
                         v_cache, np.int32(n), np.int32(heads), np.int32(head_dim), np.int32(rope_dim),
                         chunk_len))

    def attention(self, q, cache: KVCache, layer: int, positions, rotary, dca, temperature_length=None,
                  out_staged=None):
        """q (n, Hq, D) unrotated, attending the cached keys 0 .. positions[-1] -> (n, Hq, D) activations;
        one-token decode may also write the output quantized for an int8 GEMV (out_staged, gemv.staged_bytes).

        The fused tensor-core kernels where they support the shape: prefill in one launch (the rotation
        chosen per key tile), decode (n == 1) split-K with its split count fixed by the cache capacity
        (CUDA graphs), reading q8_0 rows as they are; otherwise the simple tiled kernel (attention.cu). Those
        two read 16-bit rows: q8_0 ones are first dequantized into the backend's scratch (kv_q8.py), up to the
        last position (bounded on the host by the cache capacity for one token: a captured step's position
        grows). A Self-Extend / StreamingLLM scheme `dca` (16-bit caches): passes of the flash kernel, for one token
        with their positions made on the device from `positions` (extension.decode_attention, graph-ready),
        for a prompt from cache.length + 0..n-1 (extension.attention, which also keeps the composed path).
        """
        if extension.is_extension(dca):
            return extension.attention(self, q, cache, layer, rotary, dca, temperature_length, positions, out_staged)
        cos_t, sin_t = self.rotary_tables(rotary)
        n, n_heads, head_dim = q.shape
        rope_dim = rotary.rope.dim
        k_cache, v_cache = cache.k[layer], cache.v[layer]
        fused = flash.unsupported_reason(head_dim, rope_dim, n_heads, k_cache.shape[1], decode=n == 1) is None
        if fused and n == 1:
            return flash.flash_decode(q, k_cache, v_cache, positions, cos_t, sin_t,
                                      rope_dim=rope_dim, dca=dca, temperature_length=temperature_length or 0,
                                      out_staged=out_staged)
        if kv_q8.is_q8(k_cache) or kv_q8.is_q8(v_cache):
            rows = cache.capacity if n == 1 else min(cache.capacity, cache.length + n)
            k_cache = self.kv_scratch.rows16("k", k_cache, positions, rows)
            v_cache = self.kv_scratch.rows16("v", v_cache, positions, rows)
        if fused:
            return flash.flash_attention(q, k_cache, v_cache, positions, cos_t, sin_t,
                                         rope_dim=rope_dim, dca=dca, temperature_length=temperature_length or 0,
                                         n_keys_hint=cache.length + n)
        return attention_ops.attention(self.cp, q, k_cache, v_cache, positions, cos_t, sin_t,
                                       rope_dim, dca, temperature_length, cache.capacity,
                                       keys_hint=cache.length + n, dtype=self.dtype, out_staged=out_staged)

    def decode_blocks(self, model):
        """The blocks a one-token step runs: fused decode kernels (fused.FusedBlocks)."""
        from .fused import FusedBlocks

        return FusedBlocks(self, model)

    def prefill_blocks(self, model):
        """The blocks a prompt of n > 1 tokens runs: the composed ops with the host work its layers share done once
        a forward (prefill.PrefillBlocks)."""
        from .prefill import PrefillBlocks

        return PrefillBlocks(self, model)

    def decoder(self, model, cache: KVCache, sampling, history):
        """A graph-replaying decode loop with device-side sampling (see graph.GraphDecoder); eager steps where a
        Self-Extend / StreamingLLM attention runs its composed path (extension.graph_ready); a later decoder on the
        same cache replays the graph kept from an earlier one (graph.KeptSteps)."""
        return GraphDecoder(self, model, cache, sampling, history, use_graph=extension.graph_ready(model))

    def launch_1d(self, file: str, kernel: str, n_threads: int, args: tuple) -> None:
        """One thread per item of an activation kernel (the backend's dtype build of kernels/<file>.cu)."""
        if n_threads:
            blocks = (n_threads + ELEMENTWISE_THREADS - 1) // ELEMENTWISE_THREADS
            function(file, kernel, self.dtype)((blocks,), (ELEMENTWISE_THREADS,), args)
