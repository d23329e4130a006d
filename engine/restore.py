"""A session file's key/value rows into a GPU's KV cache at the rate the page cache and the bus allow: page cache ->
pinned host buffers (several reader threads) -> device (async copies on a stream), overlapped.

The file's k and v are (n_layers, n, n_kv_heads, row) tensors (prompt_cache.py), so one layer's n rows are one
contiguous byte range of the file; the cache keeps each layer rows first, (capacity, n_kv_heads, row), so they are
one contiguous range there too. ``plan`` cuts a tensor's layers into reads of whole rows (``Chunk``: at most
CHUNK_BYTES, or one row), each split at layer boundaries into ``Piece``s: one layer's rows first .. first+rows-1.

``copy_file`` reads the chunks with reader threads (os.preadv releases the GIL) into a ring of host buffers and,
in file order, hands each filled buffer's pieces to the cache (``put``) through a ``copies`` object:
    ring(nbytes) -> [(nbytes,) uint8 host buffers], one per slot   DeviceCopies: pinned
    upload(dst, host)     dst (m,) uint8 device bytes <- host (m,) uint8, queued
    staging(nbytes)       an (nbytes,) uint8 device buffer (q8_0 rows are split on the device from it)
    split_q8(raw, rows)   q8_0 rows (values, scales) <- raw: their ggml blocks in the staging buffer, queued
    done(slot)            every copy from that ring slot is queued   wait(slot): block until they have run
    finish()              block until everything queued has run
A slot is refilled only after wait(slot). ``DeviceCopies`` is the CUDA one; the tests run the same planning and
copying on the CPU with numpy stand-ins for the device arrays and this interface.
The CPU backend keeps reading its rows through a memory map of the file (prompt_cache._load_rows).
"""
from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .backends.cuda.kv_q8 import is_q8, load_blocks
from .copy_stream import CopyStream
from .prompt_cache import SessionFileError, TensorBytes

CHUNK_BYTES = 8 << 20  # a read and a host-to-device copy: large enough for the bus's rate, cheap to pin
READERS = 8  # threads copying page cache -> pinned buffers (one thread copies a few GB/s)
UPLOADS_IN_FLIGHT = 2  # chunks whose copies may still run when the main thread next needs a slot
SLOTS = READERS + 2 + UPLOADS_IN_FLIGHT  # ring buffers (96 MiB pinned): every reader busy, two reads queued


@dataclass(frozen=True)
class Piece:
    """Rows first .. first+rows-1 of one layer of the cache's keys ("k") or values ("v"), at byte `start` of the
    chunk's buffer."""

    name: str
    layer: int  # counted from the cache part's first layer
    first: int
    rows: int
    start: int
    nbytes: int


@dataclass(frozen=True)
class Chunk:
    """One read: nbytes of the file from byte `offset`, holding `pieces` one after another."""

    offset: int
    nbytes: int
    pieces: tuple[Piece, ...]


def plan(tensors: dict[str, TensorBytes], layers: range, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
    """The reads filling layers `layers` of a cache (part) from the tensors ("k", "v"), in file order."""
    for name, tensor in tensors.items():
        yield from _tensor_chunks(name, tensor, layers, chunk_bytes)


def _tensor_chunks(name: str, tensor: TensorBytes, layers: range, chunk_bytes: int) -> Iterator[Chunk]:
    """Whole rows of `layers`, layer after layer, at most chunk_bytes a read (one row when a row is larger)."""
    n, row = tensor.shape[1], tensor.row_bytes
    per_chunk = max(1, chunk_bytes // row)
    begin, end = layers.start * n, layers.stop * n  # rows counted through the layers, in file order
    for flat in range(begin, end, per_chunk):
        rows = min(per_chunk, end - flat)
        yield Chunk(tensor.offset + flat * row, rows * row, tuple(_pieces(name, flat - begin, rows, n, row)))


def _pieces(name: str, flat: int, rows: int, n: int, row: int) -> Iterator[Piece]:
    """Rows flat .. flat+rows-1 counted through the layers (n a layer) as one piece per layer they touch."""
    start = 0
    while rows:
        layer, first = divmod(flat, n)
        count = min(rows, n - first)
        yield Piece(name, layer, first, count, start, count * row)
        flat, rows, start = flat + count, rows - count, start + count * row


def copy_file(path: Path, chunks: list[Chunk], cache: Any, copies: Any, readers: int = READERS) -> None:
    """cache's rows <- the chunks of the file at `path`, read by `readers` threads into the ring buffers of
    `copies` and put in file order; SessionFileError when the file cannot be read or ends before a chunk does.
    On any error the readers stop (reads not started are dropped, running ones end) and every queued copy has run
    before the ring is released."""
    if not chunks:
        return
    ring = copies.ring(max(chunk.nbytes for chunk in chunks))
    fd = _open(path)
    try:
        with ThreadPoolExecutor(readers, thread_name_prefix="session-read") as pool:
            try:
                _pipeline(pool, fd, path, chunks, cache, copies, ring)
            finally:
                pool.shutdown(cancel_futures=True)
    finally:
        try:
            copies.finish()
        finally:
            os.close(fd)


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        raise SessionFileError(f"{path}: cannot read the session file ({e.strerror})") from None


def _pipeline(pool: ThreadPoolExecutor, fd: int, path: Path, chunks: list[Chunk], cache: Any, copies: Any,
              ring: list[np.ndarray]) -> None:
    """Keep reads in flight in all ring slots but UPLOADS_IN_FLIGHT; put the oldest read's pieces when that many
    are pending, so that a slot is refilled UPLOADS_IN_FLIGHT chunks after its copies were queued (they have
    usually run by then: the main thread does not wait on the copy it has just queued)."""
    reads = max(1, len(ring) - UPLOADS_IN_FLIGHT)
    pending: deque[tuple[Chunk, int, Future]] = deque()  # (chunk, its slot, its read), in file order
    for i, chunk in enumerate(chunks):
        if len(pending) == reads:
            _put_chunk(*pending.popleft(), cache, copies, ring)
        slot = i % len(ring)
        copies.wait(slot)  # the chunk that used this slot before (put already) has been copied out of it
        pending.append((chunk, slot, pool.submit(read_chunk, fd, path, chunk, ring[slot])))
    while pending:
        _put_chunk(*pending.popleft(), cache, copies, ring)


def read_chunk(fd: int, path: Path, chunk: Chunk, buffer: np.ndarray) -> None:
    """buffer[:chunk.nbytes] <- the file's bytes from chunk.offset (a reader thread's job)."""
    view = memoryview(buffer)[:chunk.nbytes]
    done = 0
    while done < chunk.nbytes:
        try:
            got = os.preadv(fd, [view[done:]], chunk.offset + done)
        except OSError as e:
            raise SessionFileError(f"{path}: cannot read the session file ({e.strerror})") from None
        if got == 0:
            raise SessionFileError(f"{path}: not a readable session file (truncated: it ends at byte "
                                   f"{chunk.offset + done}, its rows need {chunk.offset + chunk.nbytes})")
        done += got


def _put_chunk(chunk: Chunk, slot: int, read: Future, cache: Any, copies: Any, ring: list[np.ndarray]) -> None:
    read.result()  # the reader's SessionFileError, if any
    for piece in chunk.pieces:
        put(cache, copies, piece, ring[slot][piece.start:piece.start + piece.nbytes])
    copies.done(slot)


def put(cache: Any, copies: Any, piece: Piece, host: np.ndarray) -> None:
    """The piece's rows of `cache` <- host (piece.nbytes,) uint8, as the file holds them: 16-bit rows as they are,
    q8_0 rows (ggml blocks) copied to the staging buffer and split there into the store's values and scales."""
    rows = getattr(cache, piece.name)[piece.layer, piece.first:piece.first + piece.rows]  # (rows, Hkv, D) view
    if not is_q8(rows):
        copies.upload(rows.view(np.uint8).reshape(-1), host)
        return
    raw = copies.staging(piece.nbytes)
    copies.upload(raw, host)
    copies.split_q8(raw, rows)


class DeviceCopies(CopyStream):
    """The copies of a restore on the current GPU: host-to-device copies from pinned ring buffers, one event per ring
    slot (copy_stream.CopyStream: done, wait, finish)."""

    def __init__(self, cp: Any, dtype: str, slots: int = SLOTS):
        super().__init__(cp, slots)
        self.dtype = dtype  # the activation dtype: the build of kv_q8.cu the cache's kernels use
        self.buffer_bytes = 0  # a ring buffer's size: the largest piece
        self._staging = None  # (buffer_bytes,) uint8 on the device, made for the first q8_0 piece

    def ring(self, nbytes: int) -> list[np.ndarray]:
        """A pinned (nbytes,) uint8 host buffer per slot, each of max(nbytes, CHUNK_BYTES) bytes: one size whatever
        the model's rows, so that CuPy's pinned pool (which reuses a freed buffer for a request of its size) gives
        a later restore, or pin_ring_in_background's, buffers back."""
        self.buffer_bytes = nbytes
        return [np.frombuffer(self.xp.cuda.alloc_pinned_memory(max(nbytes, CHUNK_BYTES)), np.uint8, nbytes)
                for _ in self.events]

    def upload(self, dst: Any, host: np.ndarray) -> None:
        self.copy(dst.data.ptr, host.ctypes.data, host.nbytes, self.xp.cuda.runtime.memcpyHostToDevice)

    def staging(self, nbytes: int) -> Any:
        """One device buffer for every q8_0 piece of the restore (its copies and splits are ordered by the stream)."""
        if self._staging is None:
            self._staging = self.device_buffer(self.buffer_bytes)
        return self._staging[:nbytes]

    def split_q8(self, raw: Any, rows: Any) -> None:
        load_blocks(raw, rows, self.dtype)


def pin_ring_in_background(slots: int = SLOTS) -> threading.Thread | None:
    """Pin a restore's ring (slots x CHUNK_BYTES: 96 MiB) on a thread and free it into CuPy's pinned pool, where the
    process's next restore finds it: pinning took 44 ms of a 32k-token restore's ~100 ms on an H100 host, which
    `engine generate --prompt-cache FILE` overlaps with loading the model (join the thread before the restore).
    None where there is no CuPy or no GPU. A failure is left to the restore, which pins again and reports it."""
    try:
        import cupy as cp

        if cp.cuda.runtime.getDeviceCount() == 0:
            return None
    except Exception:  # no CuPy, no driver: nothing to pin for
        return None

    def pin() -> None:
        try:
            buffers = [cp.cuda.alloc_pinned_memory(CHUNK_BYTES) for _ in range(slots)]
            del buffers  # back to the pool
        except Exception:
            pass

    thread = threading.Thread(target=pin, name="session-pin", daemon=True)
    thread.start()
    return thread


def device_restore(cache: Any, path: Path, tensors: dict[str, TensorBytes], dtype: str) -> None:
    """A CUDA cache (KVCache, or a split model's StagedCache: each part on its GPU) of activation dtype `dtype` <- the
    session file's rows of `tensors` ("k", "v": checked against the cache's stored layout), read through pinned
    buffers; its length becomes their n. The kernels splitting q8_0 rows (``put``) run on the restore's stream, after
    their copies."""
    n = tensors["k"].shape[1]
    first = 0
    for part in getattr(cache, "parts", [cache]):
        layers = range(first, first + len(part.k))
        with _device(part):
            copies = DeviceCopies(part.xp, dtype)
            with copies.stream:
                copy_file(path, list(plan(tensors, layers)), part, copies)
        first = layers.stop
    cache.commit(n)


def _device(part: Any) -> Any:
    """The GPU holding a cache part's keys (q8_0 rows: their values array)."""
    return getattr(part.k, "q", part.k).device
