"""The numpy backend's matrices: float32, or as stored and dequantized a block of rows at a time.

A ``HostMatrix`` wraps a loader ``WeightTensor`` (out, in). Its values come in blocks of
``block_rows`` rows (``row_blocks``), always the same blocks, from one of two sources:
  float32   a dequantized copy kept for the life of the model (or, for an F32 tensor, a view of the
            memory map itself: no copy)
  stored    the stored bytes stay memory-mapped; each block is dequantized into one float32 scratch
            buffer of SCRATCH_BYTES that every stored matrix of the model shares (a block is consumed
            before the next one is decoded)
Products run block by block in both cases (``matmul_t``), so the two sources give the same float32
values: rows decode independently, and each block's product is the same numpy call on the same numbers.
``rows(ids)`` (the embedding lookup) decodes only the rows asked for.
"""
from __future__ import annotations

import numpy as np

from ..weights.quant import GGMLType, dequantize

SCRATCH_BYTES = 16 << 20  # one dequantized block of rows (float32): 1024 rows of 4096 values


def new_scratch() -> np.ndarray:
    """The shared dequantization buffer: (SCRATCH_BYTES / 4,) float32."""
    return np.empty(SCRATCH_BYTES // 4, dtype=np.float32)


def block_rows(rows: int, cols: int) -> int:
    """Rows per block of a (rows, cols) matrix: as many as fill the scratch buffer (at least one)."""
    return max(1, min(rows, SCRATCH_BYTES // (4 * cols)))


class HostMatrix:
    def __init__(self, tensor, scratch: np.ndarray | None, keep_f32: bool):
        """tensor: a loader WeightTensor (out, in); scratch: new_scratch() (needed unless the values are
        float32); keep_f32: dequantize once and keep the float32 copy."""
        rows, cols = (int(s) for s in tensor.shape)
        self.name = tensor.name
        self.shape = (rows, cols)
        self.ggml_type = GGMLType(tensor.ggml_type)
        self.block_rows = block_rows(rows, cols)
        self.values = tensor.dequantize() if keep_f32 or self.ggml_type == GGMLType.F32 else None  # (rows, cols)
        if self.values is None and scratch is None:
            raise ValueError(f"{tensor.name}: a matrix kept as stored needs a scratch buffer")
        self._stored = tensor.row_bytes()  # (rows, bytes per row) uint8, memory-mapped where the file is
        self._scratch = scratch

    def row_blocks(self):
        """(start, stop, (stop - start, cols) float32) for consecutive blocks covering every row; a stored
        matrix's block lives in the shared scratch buffer until the next block is asked for."""
        rows, cols = self.shape
        for start in range(0, rows, self.block_rows):
            stop = min(start + self.block_rows, rows)
            if self.values is not None:
                yield start, stop, self.values[start:stop]
            else:
                out = self._scratch[:(stop - start) * cols].reshape(stop - start, cols)
                yield start, stop, dequantize(self._stored[start:stop], self.ggml_type, (stop - start, cols), out)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The rows `ids` (n,) as a new (n, cols) float32 array (an embedding lookup)."""
        if self.values is not None:
            return self.values[ids]
        return dequantize(self._stored[ids], self.ggml_type, (len(ids), self.shape[1]))

    def matmul_t(self, x: np.ndarray) -> np.ndarray:
        """x (n, cols) @ W^T -> (n, rows) float32, one product per block of rows."""
        if self.block_rows == self.shape[0]:  # one block: no copy into a separate output
            _, _, block = next(self.row_blocks())
            return x @ block.T
        out = np.empty((x.shape[0], self.shape[0]), dtype=np.float32)
        for start, stop, block in self.row_blocks():
            out[:, start:stop] = x @ block.T
        return out
