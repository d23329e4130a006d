"""A KV cache's stored rows leaving it in chunks, in a session file's order (kvcache.KVCache.host_row_chunks): the
keys or values of positions 0 .. n-1 of every layer, layer after layer, each chunk some rows of one layer (a layer's
first n rows are one contiguous range of the cache, (capacity, n_kv_heads, row) a layer), so that a save writes them
without gathering the cache in host memory first (prompt_cache.save_session, safetensors_writer).

    host_chunks     a CPU cache: views of its arrays (encoded types: of their ggml bytes), nothing copied
    device_chunks   a GPU cache: each chunk copied (q8_0 rows: first joined into ggml blocks on the device,
                    kv_q8.join_blocks_on_device) into one of SLOTS pinned host buffers on a private stream; the next
                    chunk's copy is queued before a chunk is handed out, so it runs while the caller writes that one

The copies go through a ``downloads`` object:
    xp                        the device's array module (cupy; numpy in the CPU tests)
    active()                  the context the device's work is queued in (its GPU current, the private stream)
    staging(slot, nbytes)     a device (nbytes,) uint8 buffer of that slot (for q8_0 blocks)
    download(slot, rows)      the slot's host buffer <- rows (a contiguous device array), queued
    wait(slot)                block until the slot's copy has run
    host[slot]                the slot's host buffer, uint8
    finish()                  block until everything queued has run
``DeviceDownloads`` is the CUDA one; the tests run device_chunks on the CPU with numpy arrays and a stand-in.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from .copy_stream import CopyStream
from .kv_storage import EncodedStore

CHUNK_BYTES = 8 << 20  # restore.CHUNK_BYTES: CuPy's pinned pool hands a restore's ring buffers to a save and back
SLOTS = 2  # a chunk being written, the next one being copied


def row_pieces(n_layers: int, n: int, row_bytes: int, chunk_bytes: int) -> Iterator[tuple[int, int, int]]:
    """(layer, first row, rows) of every layer's rows 0 .. n-1 in order: at most chunk_bytes a piece (one row when a
    row is larger), never two layers in one."""
    per_piece = max(1, chunk_bytes // row_bytes)
    for layer in range(n_layers):
        for first in range(0, n, per_piece):
            yield layer, first, min(per_piece, n - first)


def host_chunks(store: Any, n: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """The first n rows of every layer of a host store ((n_layers, capacity, n_kv_heads, head_dim) float array, or an
    EncodedStore) as (rows, n_kv_heads, head_dim) arrays of its dtype or (rows, n_kv_heads, row_bytes) uint8 ggml
    bytes: views of the store (each piece is contiguous in it)."""
    for layer, first, rows in row_pieces(len(store), n, _row_bytes(store), chunk_bytes):
        part = store[layer, first:first + rows]
        yield part.to_bytes() if isinstance(part, EncodedStore) else np.ascontiguousarray(part)


def device_chunks(store: Any, n: int, downloads: Any, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """host_chunks of a device store (a 16-bit array, or kv_q8.DeviceQ8Rows): each chunk in a pinned host buffer of
    `downloads`, valid until the next chunk is asked for (its slot is refilled then). Every queued copy has run when
    the generator ends or is closed."""
    from .backends.cuda.kv_q8 import is_q8, join_blocks_on_device  # (the backends import the cache)

    pieces = list(row_pieces(len(store), n, _row_bytes(store), chunk_bytes))
    shape = _byte_shape(store)[2:]
    dtype = np.dtype(np.uint8 if is_q8(store) else store.dtype)

    def queue(index: int) -> None:
        layer, first, rows = pieces[index]
        part = store[layer, first:first + rows]
        slot = index % SLOTS
        with downloads.active():
            if is_q8(part):
                staging = downloads.staging(slot, rows * _row_bytes(store))
                part = join_blocks_on_device(downloads.xp, part.q, part.d, out=staging)
            downloads.download(slot, part)

    try:
        if pieces:
            queue(0)
        for index, (_, _, rows) in enumerate(pieces):
            if index + 1 < len(pieces):
                queue(index + 1)  # into the slot of the chunk before this one, which the caller is done with
            downloads.wait(index % SLOTS)
            host = downloads.host[index % SLOTS][:rows * _row_bytes(store)]
            yield host.view(dtype).reshape((rows,) + shape)
    finally:
        downloads.finish()


def gather(chunks: Iterator[np.ndarray], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """One host array of `shape` and `dtype` holding the chunks' bytes one after another (each copied before the next
    is asked for)."""
    out = np.empty(shape, dtype)
    flat = out.reshape(-1).view(np.uint8)
    at = 0
    for chunk in chunks:
        flat[at:at + chunk.nbytes] = chunk.reshape(-1).view(np.uint8)
        at += chunk.nbytes
    if at != out.nbytes:
        raise ValueError(f"{at} bytes of rows for an array of {shape} {np.dtype(dtype)}")
    return out


class DeviceDownloads(CopyStream):
    """The copies of a save from one GPU (`device`) to SLOTS pinned host buffers of max(CHUNK_BYTES, a chunk) bytes,
    one event per slot (copy_stream.CopyStream: wait, finish); q8_0 blocks are joined in a device staging buffer per
    slot."""

    def __init__(self, cp: Any, device: Any):
        super().__init__(cp, SLOTS, device)
        self.host: list[np.ndarray | None] = [None] * SLOTS
        self.staged: list[Any] = [None] * SLOTS

    @contextmanager
    def active(self) -> Iterator[None]:
        with self.device, self.stream:
            yield

    def staging(self, slot: int, nbytes: int) -> Any:
        if self.staged[slot] is None or self.staged[slot].nbytes < nbytes:
            self.staged[slot] = self.device_buffer(max(nbytes, CHUNK_BYTES))
        return self.staged[slot][:nbytes]

    def download(self, slot: int, rows: Any) -> None:
        if not rows.flags.c_contiguous:
            raise ValueError(f"download: rows {rows.shape} are not contiguous on the device")
        host = self.host[slot]
        if host is None or host.nbytes < rows.nbytes:
            size = max(rows.nbytes, CHUNK_BYTES)
            host = self.host[slot] = np.frombuffer(self.xp.cuda.alloc_pinned_memory(size), np.uint8, size)
        self.copy(host.ctypes.data, rows.data.ptr, rows.nbytes, self.xp.cuda.runtime.memcpyDeviceToHost)
        self.done(slot)


def _row_bytes(store: Any) -> int:
    """Bytes of one position's row of one layer as stored: every KV head's."""
    shape = _byte_shape(store)
    return int(np.prod(shape[2:])) * (1 if isinstance(store, EncodedStore) else store.dtype.itemsize)


def _byte_shape(store: Any) -> tuple[int, ...]:
    return store.byte_shape if isinstance(store, EncodedStore) else store.shape
