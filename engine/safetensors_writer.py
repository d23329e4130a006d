"""Safetensors files written as a stream: the header first, then each tensor's bytes straight from the host arrays
holding them, chunk after chunk (``StreamedTensor``), so that a tensor is never whole in memory nor copied before it is
written (a session file's KV rows come some rows of one layer at a time: kvcache.KVCache.host_row_chunks).

The bytes are safetensors.numpy.save_file's for the same tensors and metadata (the format:
https://github.com/huggingface/safetensors#format):
    8 bytes   N, the header's length, little-endian u64
    N bytes   JSON, compact, UTF-8 unescaped: {"__metadata__": {str: str}, name: {"dtype", "shape",
              "data_offsets": [begin, end]}, ...}, padded with spaces to a multiple of 8
    data      the tensors' bytes one after another (C order, little-endian; offsets count from the data's start)
in safetensors' order: by dtype, the widest first (its Dtype enum, ``DTYPES``), then by name. The metadata keys keep
the dict's order (save_file writes them in the order of a Rust hash map, which varies from process to process).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Mapping

import numpy as np

# numpy dtype -> safetensors dtype name, in safetensors' Dtype order (the sort key of its tensors)
DTYPES = {np.dtype(t).str: name for t, name in (
    (np.bool_, "BOOL"), (np.uint8, "U8"), (np.int8, "I8"), ("<i2", "I16"), ("<u2", "U16"), ("<f2", "F16"),
    ("<i4", "I32"), ("<u4", "U32"), ("<f4", "F32"), ("<f8", "F64"), ("<i8", "I64"), ("<u8", "U64"))}
_RANK = {name: rank for rank, name in enumerate(DTYPES.values())}


@dataclass(frozen=True)
class StreamedTensor:
    """A tensor whose bytes come in chunks: chunks() -> an iterable of C-contiguous host arrays of `dtype` whose bytes,
    one after another, are the tensor's (C order). Each chunk is written before the next is asked for, so a chunk
    only has to stay valid until then; a generator is closed once its chunks are written or a write failed."""

    dtype: np.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def write_safetensors(file: BinaryIO, tensors: Mapping[str, np.ndarray | StreamedTensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file of `tensors` (host arrays, or StreamedTensor) and string `metadata` to the open binary
    `file`. ValueError for a dtype safetensors has no name for (big-endian ones included) or chunks whose dtype or
    byte count are not their tensor's; the file's own OSError when a write fails."""
    streamed = {name: t if isinstance(t, StreamedTensor) else _whole(t) for name, t in tensors.items()}
    order = sorted(streamed, key=lambda name: (-_RANK[_dtype_name(name, streamed[name].dtype)], name))
    file.write(header(streamed, order, metadata))
    for name in order:
        tensor, written = streamed[name], 0
        chunks = iter(tensor.chunks())
        try:
            for chunk in chunks:
                if chunk.dtype != tensor.dtype or not chunk.flags.c_contiguous:
                    raise ValueError(f"tensor {name}: a chunk of {chunk.dtype} (contiguous: {chunk.flags.c_contiguous})"
                                     f" for a contiguous tensor of {np.dtype(tensor.dtype)}")
                file.write(chunk.reshape(-1).view(np.uint8).data)  # from the array's memory, no copy
                written += chunk.nbytes
        finally:
            getattr(chunks, "close", lambda: None)()  # a generator's cleanup runs now, even when a write failed
        if written != tensor.nbytes:
            raise ValueError(f"tensor {name}: its chunks hold {written} bytes, its shape {tensor.shape} "
                             f"{np.dtype(tensor.dtype)} {tensor.nbytes}")


def header(tensors: Mapping[str, StreamedTensor], order: list[str], metadata: Mapping[str, str] | None) -> bytes:
    """The header's length (8 bytes) and the header of `tensors` laid out in `order`, padded to a multiple of 8."""
    entries: dict[str, object] = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for name in order:
        tensor = tensors[name]
        entries[name] = {"dtype": _dtype_name(name, tensor.dtype), "shape": [int(s) for s in tensor.shape],
                         "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    text = json.dumps(entries, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _whole(array: np.ndarray) -> StreamedTensor:
    """A host array as one chunk: itself, made contiguous only if it is not."""
    def chunks() -> Iterator[np.ndarray]:
        yield np.ascontiguousarray(array)

    return StreamedTensor(array.dtype, array.shape, chunks)


def _dtype_name(name: str, dtype: np.dtype) -> str:
    try:
        return DTYPES[np.dtype(dtype).str]
    except KeyError:
        raise ValueError(f"tensor {name}: safetensors has no dtype for numpy's {np.dtype(dtype)} "
                         f"({np.dtype(dtype).str}); supported: {', '.join(DTYPES.values())}") from None
