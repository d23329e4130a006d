"""The q8_0 KV cache of the CUDA backend (``--cache-type-k q8_0`` / ``--cache-type-v q8_0``, each on its own; the
other operand stays in the activation dtype).

Layout (``DeviceQ8Rows``): ggml's q8_0 blocks of 32 values along head_dim, split into two arrays
    q  (n_layers, capacity, n_kv_heads, head_dim)       int8 values
    d  (n_layers, capacity, n_kv_heads, head_dim / 32)  fp16 scales        value = q * d
34 bytes per 32 values, as ggml's blocks, with every key's values 16-byte aligned for the kernels' copies. The
values are the CPU cache's (kv_storage.EncodedRows): kernels/kv_q8.cu quantizes as ggml's quantize_row_q8_0_ref
does (convert/quantize.py, the CPU's encoder), from the value a 16-bit cache would hold (act_t; keys rotated at
their DCA key position first). Rows leave and enter as ggml blocks (``to_bytes`` / ``load_bytes``: each block's
fp16 d, then its 32 values), the CPU cache's session-file format; a save joins them on the device
(``join_blocks_on_device``, engine/row_chunks.py) and copies each chunk to the host once; a restore
(engine/restore.py) copies a file's blocks to the device and splits them there (``load_blocks``: kernels/kv_q8.cu
split_kv_q8_blocks).

Who writes and reads them:
  store    kernels/kv_q8.cu store_kv_q8: a forward's K/V rows (CudaBackend.store_kv); in the fused decode step the
           qkv GEMV writes the token's unrotated K and V into a 16-bit scratch instead of the cache (fused.py) and
           the same kernel rotates, quantizes and stores them at pos[0]: one launch more a layer, no host sync
  decode   the split-K kernel reads them directly (flash_attention.flash_decode, dca_decode_q8_<D>_<K><V>): half
           the bytes a step reads at long context
  prefill  the layer's rows 0 .. positions[-1] are dequantized (dequant_kv_q8: q * d rounded to act_t, as the
           decode kernel rounds them) into a 16-bit scratch of the whole context (``DequantScratch``: one per
           q8_0 operand, held by the backend and shared by its caches), and the 16-bit flash kernels run on it;
           so does the simple tiled kernel (attention.cu) for the shapes the fused kernels do not serve, decode
           included. engine/memory.py counts the scratch (``scratch_bytes_per_token``).
tests/test_cuda_kv_q8.py's `cuda` tests check it against the CPU backend (first run on an H100 in session 10).
"""
from __future__ import annotations

import numpy as np

from ...errors import ConfigError
from ...kv_storage import EncodedStore, leading_index
from . import pdl
from .kernels import function
from .weights import activation_type

Q8_BLOCK = 32  # values per scale
Q8_TYPE = "q8_0"
STORE_THREADS = 256  # store_kv_q8: 8 warps, one 32-value block each
DEQUANT_THREADS = 256  # dequant_kv_q8: 8 values a thread
SPLIT_THREADS = 256  # split_kv_q8_blocks: a 2-byte word a thread
NULL = np.uint64(0)  # a null pointer argument


class DeviceQ8Rows(EncodedStore):
    """q8_0 rows (..., head_dim) on the GPU: int8 values ``q`` (..., head_dim) and fp16 scales ``d``
    (..., head_dim/32). Indexing over the leading axes (ints and slices) gives a view."""

    cache_type = Q8_TYPE

    def __init__(self, q, d):
        self.q, self.d = q, d

    @classmethod
    def zeros(cls, cp, shape: tuple[int, ...]) -> "DeviceQ8Rows":
        if shape[-1] % Q8_BLOCK:
            raise ConfigError(f"q8_0 KV rows hold blocks of {Q8_BLOCK} values; head_dim {shape[-1]} is not a multiple")
        return cls(cp.zeros(shape, dtype=cp.int8), cp.zeros(shape[:-1] + (shape[-1] // Q8_BLOCK,), dtype=cp.float16))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def ndim(self) -> int:
        return self.q.ndim

    def __len__(self) -> int:
        return self.q.shape[0]

    def __getitem__(self, index) -> "DeviceQ8Rows":
        index = leading_index(index, self.ndim)
        return DeviceQ8Rows(self.q[index], self.d[index])

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return self.q.shape[:-1] + (self.q.shape[-1] // Q8_BLOCK * (2 + Q8_BLOCK),)

    def to_bytes(self) -> np.ndarray:
        """(..., head_dim/32 * 34) uint8 on the host: ggml's block_q8_0 rows, joined on the device
        (``join_blocks_on_device``) and copied to the host once."""
        joined = join_blocks_on_device(array_module(self.q), self.q, self.d)
        return joined if isinstance(joined, np.ndarray) else joined.get()

    def load_bytes(self, raw: np.ndarray) -> None:
        """Replace the rows by ggml block_q8_0 bytes shaped as ``to_bytes`` gives them."""
        import cupy as cp

        q, d = split_blocks(raw, self.q.shape[-1])
        self.q[...] = cp.asarray(q)
        self.d[...] = cp.asarray(d)


def join_blocks(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """int8 values (..., D) and fp16 scales (..., D/32) -> ggml block_q8_0 rows (..., D/32 * 34) uint8: per block its
    little-endian fp16 d, then its 32 values."""
    lead, blocks = q.shape[:-1], q.shape[-1] // Q8_BLOCK
    scales = np.ascontiguousarray(d, dtype="<f2").view(np.uint8).reshape(lead + (blocks, 2))
    values = np.ascontiguousarray(q, dtype=np.int8).view(np.uint8).reshape(lead + (blocks, Q8_BLOCK))
    return np.concatenate([scales, values], axis=-1).reshape(lead + (blocks * (2 + Q8_BLOCK),))


def join_blocks_on_device(xp, q, d, out=None):
    """``join_blocks`` where the rows are: int8 values (..., D) and fp16 scales (..., D/32), arrays of `xp` (cupy, or
    numpy standing in for it), -> their ggml block_q8_0 rows (..., D/32 * 34) uint8 in `out` (a contiguous uint8 array
    of as many bytes, e.g. a staging buffer) or a new array: each block's scale bytes (the fp16 bits as they are,
    little-endian) then its 32 values, two strided copies (two kernel launches on CuPy's current stream)."""
    lead, blocks = q.shape[:-1], q.shape[-1] // Q8_BLOCK
    block_shape = lead + (blocks, 2 + Q8_BLOCK)
    joined = xp.empty(block_shape, dtype=xp.uint8) if out is None else out.reshape(block_shape)
    joined[..., :2] = xp.ascontiguousarray(d).view(xp.uint8).reshape(lead + (blocks, 2))
    joined[..., 2:] = q.view(xp.uint8).reshape(lead + (blocks, Q8_BLOCK))
    return joined.reshape(lead + (blocks * (2 + Q8_BLOCK),))


def array_module(array):
    """numpy for a numpy array (the CPU tests' stand-in for device arrays), cupy otherwise."""
    if isinstance(array, np.ndarray):
        return np
    import cupy

    return cupy


def split_blocks(raw: np.ndarray, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml block_q8_0 rows (..., head_dim/32 * 34) uint8 -> (int8 values (..., head_dim), fp16 scales
    (..., head_dim/32)); the inverse of join_blocks."""
    raw = np.asarray(raw, dtype=np.uint8)
    lead, blocks = raw.shape[:-1], head_dim // Q8_BLOCK
    split = raw.reshape(lead + (blocks, 2 + Q8_BLOCK))
    d = np.ascontiguousarray(split[..., :2]).view("<f2").reshape(lead + (blocks,)).astype(np.float16)
    q = np.ascontiguousarray(split[..., 2:]).view(np.int8).reshape(lead + (head_dim,))
    return q, d


def is_q8(store) -> bool:
    return isinstance(store, DeviceQ8Rows)


def storage(cp, dtype: str):
    """KVCache's storage(cache type, shape) on the GPU: q8_0 rows, or zeros in the activation dtype `dtype`."""
    act = activation_type(cp, dtype)

    def allocate(cache_type: str, shape: tuple[int, ...]):
        if cache_type == Q8_TYPE:
            return DeviceQ8Rows.zeros(cp, shape)
        if cache_type != dtype:
            raise ConfigError(f"the CUDA backend keeps KV cache rows as {dtype} (its activation dtype) or {Q8_TYPE}, "
                              f"not {cache_type}")
        return cp.zeros(shape, dtype=act)

    return allocate


def scratch_bytes_per_token(n_kv_heads: int, head_dim: int, cache_types: tuple[str, str]) -> int:
    """Bytes per context token of the backend's DequantScratch: one layer's 16-bit rows per q8_0 operand."""
    return sum(2 * n_kv_heads * head_dim for t in cache_types if t == Q8_TYPE)


def store(k, k_stride: int, v, v_stride: int, positions, cos_t, sin_t, k_cache, v_cache, rope_dim: int,
          chunk_len: int, dtype: str) -> None:
    """Cache rows positions[t] <- k[t] rotated at its key position, v[t]: k, v (n, Hkv, D) act_t with rows
    k_stride / v_stride elements apart; k_cache, v_cache one layer's (capacity, Hkv, D) stores, each q8_0 rows
    (quantized) or an act_t array."""
    n, heads, head_dim = k.shape
    warps = n * heads * 2 * (head_dim // Q8_BLOCK)
    if warps == 0:
        return
    k_args = (k_cache.q, k_cache.d, NULL) if is_q8(k_cache) else (NULL, NULL, k_cache)
    v_args = (v_cache.q, v_cache.d, NULL) if is_q8(v_cache) else (NULL, NULL, v_cache)
    blocks = (warps * 32 + STORE_THREADS - 1) // STORE_THREADS
    pdl.launch(function("kv_q8", "store_kv_q8", dtype), (blocks,), (STORE_THREADS,),
               (k, np.int64(k_stride), v, np.int64(v_stride), positions, cos_t, sin_t) + k_args + v_args
               + (np.int32(n), np.int32(heads), np.int32(head_dim), np.int32(rope_dim), np.int32(chunk_len)))


def load_blocks(raw, rows: DeviceQ8Rows, dtype: str) -> None:
    """rows (contiguous (rows, Hkv, D) q8_0 rows) <- raw: their ggml blocks on the device, (rows * Hkv * D/32 * 34,)
    uint8 (a session file's bytes, ``join_blocks``' layout); one launch of split_kv_q8_blocks (the `dtype` build of
    kv_q8.cu, the one the cache's other kernels use) on the current stream."""
    n_blocks = rows.d.size
    if raw.nbytes != n_blocks * (2 + Q8_BLOCK) or not (rows.q.flags.c_contiguous and rows.d.flags.c_contiguous):
        raise ValueError(f"load_blocks: {raw.nbytes} bytes for {n_blocks} contiguous q8_0 blocks")
    if n_blocks == 0:
        return
    words = n_blocks * (2 + Q8_BLOCK) // 2
    function("kv_q8", "split_kv_q8_blocks", dtype)(
        ((words + SPLIT_THREADS - 1) // SPLIT_THREADS,), (SPLIT_THREADS,), (raw, rows.q, rows.d, np.int64(n_blocks)))


def dequantize(rows: DeviceQ8Rows, out, positions, max_rows: int, dtype: str) -> None:
    """out[:positions[-1] + 1] (act_t, (>= max_rows, Hkv, D)) <- rows' values, for rows up to max_rows (the launch's
    bound, known to the host; the device positions stop it earlier)."""
    _, heads, head_dim = rows.shape
    groups = max_rows * heads * head_dim // 8
    if groups == 0:
        return
    function("kv_q8", "dequant_kv_q8", dtype)(
        ((groups + DEQUANT_THREADS - 1) // DEQUANT_THREADS,), (DEQUANT_THREADS,),
        (rows.q, rows.d, out, positions, np.int32(positions.shape[0] - 1), np.int64(max_rows), np.int32(heads),
         np.int32(head_dim)))


class DequantScratch:
    """16-bit copies of one layer's q8_0 K and/or V rows, for the kernels that read 16-bit caches: one buffer per q8_0
    operand of the largest cache reserved so far, (rows, Hkv, D) act_t, reused by every layer and cache."""

    def __init__(self, cp, dtype: str):
        self.cp, self.dtype = cp, dtype
        self.buffers: dict[str, object] = {}  # "k" | "v" -> (rows, Hkv, D) act_t

    def reserve(self, capacity: int, n_kv_heads: int, head_dim: int, cache_types: tuple[str, str]) -> None:
        """Make room for a cache of `capacity` rows storing K and V as cache_types."""
        for name, cache_type in zip("kv", cache_types):
            have = self.buffers.get(name)
            if cache_type != Q8_TYPE or (have is not None and have.shape[0] >= capacity
                                         and have.shape[1:] == (n_kv_heads, head_dim)):
                continue
            self.buffers.pop(name, None)  # freed before its successor is allocated
            self.buffers[name] = self.cp.empty((capacity, n_kv_heads, head_dim),
                                               dtype=activation_type(self.cp, self.dtype))

    def rows16(self, name: str, store, positions, max_rows: int):
        """One layer's K (name "k") or V ("v") store as 16-bit rows (max_rows, Hkv, D): an act_t store's first rows,
        q8_0 rows dequantized (rows 0 .. positions[-1]) into this scratch."""
        if not is_q8(store):
            return store[:max_rows]
        out = self.buffers[name][:max_rows]
        dequantize(store, out, positions, max_rows, self.dtype)
        return out
