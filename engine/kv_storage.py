"""How the KV cache stores keys and values: llama.cpp's cache types (``--cache-type-k`` / ``--cache-type-v``).

    f32                          float32 arrays: the CPU's default
    f16, bf16                    16-bit floats: CUDA's default is its activation dtype
    q8_0, q5_1, q5_0, q4_1, q4_0 ggml blocks of 32 values along head_dim (CPU): 34, 24, 22, 20, 18 bytes a block;
                                 CUDA takes q8_0 too (backends/cuda/kv_q8.py: the same bytes, laid out for its kernels)

Every type but f32 is stored as the ggml bytes of its rows (``EncodedRows``): written by the engine's
llama.cpp-exact encoders (convert/quantize.py: the bytes llama.cpp's ``quantize_row_*_ref`` writes) and read
back through the loader's decoders (weights/quant.py), so a q8_0 cache holds exactly what llama.cpp's CPU
backend would store for the same keys. Keys are quantized after their rotation (kvcache.py: they are cached
rotated at their DCA position), so every attention layout works unchanged on every type. Attention reads a
tile of rows at a time (``np.asarray(rows[k0:k1], dtype=np.float32)``), so at most one tile is ever decoded.
Encoded storage of any device (``EncodedStore``: EncodedRows here, cuda/kv_q8.DeviceQ8Rows) gives and takes its
rows as those ggml bytes, which is what session files hold (kvcache.KVCache.host_row_chunks / load_rows).
"""
from __future__ import annotations

import abc
from typing import Any

import numpy as np

from .errors import ConfigError
from .weights.quant import GGMLType, dequantize, tensor_nbytes

CACHE_TYPES = {"f32": GGMLType.F32, "f16": GGMLType.F16, "bf16": GGMLType.BF16, "q8_0": GGMLType.Q8_0,
               "q5_1": GGMLType.Q5_1, "q5_0": GGMLType.Q5_0, "q4_1": GGMLType.Q4_1, "q4_0": GGMLType.Q4_0}
NATIVE_TYPE = {"f32": "f32", "f16": "f16", "bf16": "bf16"}  # activation dtype -> the cache type a backend keeps
CUDA_ENCODED_TYPES = ("q8_0",)  # the encoded types the CUDA backend stores besides its activation dtype


def row_bytes(cache_type: str, head_dim: int) -> int:
    """Bytes one KV head's row of head_dim values takes as cache_type."""
    return tensor_nbytes(CACHE_TYPES[cache_type], (head_dim,))


def resolve_cache_types(k_type: str | None, v_type: str | None, device: str, dtype: str,
                        head_dim: int) -> tuple[str, str]:
    """--cache-type-k / --cache-type-v (None: the backend's own) -> (k type, v type), or a ConfigError.

    device: "cpu" | "cuda"; dtype: the activation dtype ("f32" on the CPU, "f16" | "bf16" on CUDA)."""
    native = NATIVE_TYPE[dtype]
    chosen = []
    for flag, name in (("--cache-type-k", k_type), ("--cache-type-v", v_type)):
        name = native if name is None else name
        if name not in CACHE_TYPES:
            raise ConfigError(f"unknown KV cache type {name!r} for {flag} (choose from {', '.join(CACHE_TYPES)})")
        if device != "cpu" and name not in (native,) + CUDA_ENCODED_TYPES:
            raise ConfigError(f"{flag} {name}: on CUDA the KV cache is kept in the activation dtype ({native}) "
                              f"or as {' or '.join(CUDA_ENCODED_TYPES)}; the other cache types run on the CPU "
                              f"backend (--device cpu)")
        per_block = 32
        if CACHE_TYPES[name] not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16) and head_dim % per_block:
            raise ConfigError(f"{flag} {name} stores blocks of {per_block} values along a head, but this model's "
                              f"heads have {head_dim}; use f32, f16 or bf16")
        chosen.append(name)
    return chosen[0], chosen[1]


def allocate(cache_type: str, shape: tuple[int, ...], xp: Any = np, dtype: Any = np.float32) -> Any:
    """Zeroed storage for values of `shape` (..., head_dim): a float array of `dtype` for f32 and on a device
    (`xp` not numpy: CUDA allocates its activation dtype, the one type it takes), EncodedRows otherwise."""
    if cache_type == "f32" or xp is not np:
        return xp.zeros(shape, dtype=dtype)
    return EncodedRows(cache_type, np.zeros(shape[:-1] + (row_bytes(cache_type, shape[-1]),), dtype=np.uint8),
                       shape[-1])


class EncodedStore(abc.ABC):
    """Values (..., head_dim) kept encoded (not as a float array), indexed over the leading axes like an array.
    Their ggml bytes, (..., row_bytes) uint8 on the host, are how the rows leave and enter (session files)."""

    @property
    @abc.abstractmethod
    def byte_shape(self) -> tuple[int, ...]:
        """Shape of ``to_bytes()``: (..., row_bytes)."""

    @abc.abstractmethod
    def to_bytes(self) -> np.ndarray:
        """The rows as contiguous host ggml bytes, byte_shape uint8."""

    @abc.abstractmethod
    def load_bytes(self, raw: np.ndarray) -> None:
        """Replace the rows by host ggml bytes of byte_shape."""


class EncodedRows(EncodedStore):
    """Values (..., head_dim) held as the ggml bytes of each row, (..., row_bytes) uint8 (`raw`).

    Indexing selects along the leading axes and gives a view (writes through it reach the storage);
    assigning float values encodes them; ``np.asarray(rows, dtype=np.float32)`` decodes them."""

    def __init__(self, cache_type: str, raw: np.ndarray, head_dim: int):
        self.cache_type = cache_type
        self.raw = raw  # (..., row_bytes) uint8
        self.head_dim = head_dim

    @property
    def shape(self) -> tuple[int, ...]:
        return self.raw.shape[:-1] + (self.head_dim,)

    @property
    def ndim(self) -> int:
        return self.raw.ndim

    def __len__(self) -> int:
        return self.raw.shape[0]

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return self.raw.shape

    def to_bytes(self) -> np.ndarray:
        return np.ascontiguousarray(self.raw)

    def load_bytes(self, raw: np.ndarray) -> None:
        self.raw[...] = raw

    def __getitem__(self, index) -> "EncodedRows":
        return EncodedRows(self.cache_type, self.raw[leading_index(index, self.ndim)], self.head_dim)

    def __setitem__(self, index, values: np.ndarray) -> None:
        from .convert.quantize import encode_rows  # the writers' encoders (imported on first write)

        target = self.raw[leading_index(index, self.ndim)]
        rows = np.asarray(values, dtype=np.float32).reshape(-1, self.head_dim)
        target[...] = encode_rows(rows, CACHE_TYPES[self.cache_type]).reshape(target.shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        values = dequantize(self.raw, CACHE_TYPES[self.cache_type], self.shape)  # float32
        return values if dtype is None else values.astype(dtype, copy=False)


def leading_index(index, ndim: int) -> tuple:
    """An index over the leading axes (ints and slices only), so it never reaches the byte axis."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) >= ndim or not all(isinstance(i, (int, np.integer, slice)) for i in index):
        raise IndexError(f"encoded KV rows are indexed by ints and slices over their {ndim - 1} leading axes, "
                         f"got {index!r}")
    return index
