"""One output tensor: its source bytes, the type it is written as, and an optional row reordering.

Conversion streams: a few source rows at a time are gathered (in ``row_order``), dequantized to
float32 and encoded in the output type, so the float32 working set stays ~CHUNK_ELEMENTS values
whatever the tensor size (times the number of threads: with ``threads`` > 1, that many slabs are
converted at once on a thread pool -- numpy releases the GIL inside its array operations -- and
yielded in order, so the bytes do not depend on the thread count). A tensor whose type does not
change is copied byte for byte (rows reordered if asked): quantized blocks run along a row, so
whole rows can move without decoding.

RoPE layouts of Q/K rows (per head of head_dim rows, half = head_dim/2):
    HF rotate-half: row t*half + i  (t in {0, 1}: first or second half, i < half)
    GGUF llama:     row 2*i + t     (llama.cpp rotates adjacent pairs)
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import prod
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from ..errors import ConfigError
from ..loader import WeightTensor
from ..weights.quant import GGMLType, dequantize, tensor_nbytes
from .quantize import encode_rows

CHUNK_ELEMENTS = 1 << 20  # float32 values decoded at once per thread (4 MiB)
T = TypeVar("T")
R = TypeVar("R")


def gguf_rope_row_order(n_rows: int, n_heads: int) -> np.ndarray:
    """Source rows (HF rotate-half) of each GGUF row: GGUF row (h, i, t) <- HF row (h, t, i)."""
    half = n_rows // n_heads // 2
    return np.arange(n_rows).reshape(n_heads, 2, half).transpose(0, 2, 1).reshape(-1)


def hf_rope_row_order(n_rows: int, n_heads: int) -> np.ndarray:
    """Source rows (GGUF adjacent pairs) of each HF row: HF row (h, t, i) <- GGUF row (h, i, t)."""
    half = n_rows // n_heads // 2
    return np.arange(n_rows).reshape(n_heads, half, 2).transpose(0, 2, 1).reshape(-1)


@dataclass(frozen=True)
class TensorJob:
    name: str  # name in the output file
    source: WeightTensor  # stored bytes, type and numpy shape of the input
    out_type: GGMLType
    row_order: np.ndarray | None = None  # output row r = source row row_order[r]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.out_type, self.shape)

    def chunks(self, threads: int = 1) -> Iterator[np.ndarray]:
        """The output bytes in order, a few rows at a time (1-D uint8 arrays), converted on ``threads`` threads."""
        n_cols = self.shape[-1]
        n_rows = prod(self.shape[:-1])  # 1 for a 1-D tensor
        rows = self.source.raw.reshape(n_rows, -1)  # (n_rows, source bytes per row)
        step = max(1, CHUNK_ELEMENTS // n_cols)
        same_type = self.out_type == self.source.ggml_type

        def convert(start: int) -> np.ndarray:
            picked = slice(start, start + step) if self.row_order is None else self.row_order[start:start + step]
            raw = rows[picked]
            if same_type:
                return np.ascontiguousarray(raw).reshape(-1)
            values = dequantize(raw, self.source.ggml_type, (raw.shape[0], n_cols))  # (k, n_cols) float32
            try:
                return encode_rows(values, self.out_type).reshape(-1)
            except ConfigError as e:
                raise ConfigError(f"tensor {self.name!r}: {e}") from None

        yield from map_in_order(convert, range(0, n_rows, step), 1 if same_type else threads)

    def data(self, threads: int = 1) -> np.ndarray:
        """All output bytes as one uint8 array (for writers that take a tensor whole)."""
        out = np.empty(self.nbytes, dtype=np.uint8)
        pos = 0
        for chunk in self.chunks(threads):
            out[pos:pos + chunk.size] = chunk
            pos += chunk.size
        return out


def thread_count(threads: int | None) -> int:
    """The threads to convert on: ``threads``, or by default every CPU this process may run on (as llama-quantize)."""
    if threads is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if threads < 1:
        raise ConfigError(f"the thread count must be at least 1, got {threads}")
    return threads


def map_in_order(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """fn(item) for each item, in order, computed on ``threads`` threads with at most 2 * threads results
    pending (so memory stays bounded however many items there are); the first exception is raised."""
    if threads <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(threads)
    try:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)  # after an error or an abandoned iteration: drop what has not started
