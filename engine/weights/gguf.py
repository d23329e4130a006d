"""GGUF reader: header, metadata and tensor directory parsed over a read-only np.memmap.

File layout (little-endian; GGUF v2/v3, llama.cpp gguf.cpp):
    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x  (key: string, value_type u32, value)
    tensor_count x  (name: string, n_dims u32, ne[n_dims] u64, ggml_type u32, offset u64)
    padding to `general.alignment` (default 32) | tensor data (offsets relative to here)
    string = length u64 + UTF-8 bytes; array = elem_type u32 + count u64 + elements

Every length and count is checked against the bytes that remain before anything is
allocated, so a malformed file costs at most O(file size) memory and raises
ModelFormatError naming the file and the problem. Tensor bytes are never read at open.
"""
from __future__ import annotations

import enum
import os
import pathlib
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ModelFormatError
from .mapped import MappedTensorFile, TensorInfo
from .quant import GGMLType, tensor_nbytes

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ARRAY_NESTING = 8  # arrays of arrays deeper than this are rejected (no recursion bombs)


class ValueType(enum.IntEnum):
    """gguf_type: the type tag of a metadata value."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# value type -> struct format (standard sizes, little-endian); numpy dtypes follow from it.
_SCALAR_STRUCTS: dict[int, struct.Struct] = {
    ValueType.UINT8: struct.Struct("<B"),
    ValueType.INT8: struct.Struct("<b"),
    ValueType.UINT16: struct.Struct("<H"),
    ValueType.INT16: struct.Struct("<h"),
    ValueType.UINT32: struct.Struct("<I"),
    ValueType.INT32: struct.Struct("<i"),
    ValueType.FLOAT32: struct.Struct("<f"),
    ValueType.BOOL: struct.Struct("<B"),
    ValueType.UINT64: struct.Struct("<Q"),
    ValueType.INT64: struct.Struct("<q"),
    ValueType.FLOAT64: struct.Struct("<d"),
}
_SCALAR_DTYPES: dict[int, np.dtype] = {t: np.dtype(s.format) for t, s in _SCALAR_STRUCTS.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_STRING_MIN_BYTES = 8  # the u64 length of an empty string
_ARRAY_MIN_BYTES = 12  # elem_type u32 + count u64 of an empty array
_KV_MIN_BYTES = _STRING_MIN_BYTES + 4 + 1  # empty key, type tag, one-byte value
_TENSOR_INFO_MIN_BYTES = _STRING_MIN_BYTES + 4 + 8 + 4 + 8  # empty name, n_dims, one ne, type, offset


class _HeaderParser:
    """Sequential little-endian reads over the file bytes with bounds checks."""

    def __init__(self, buf: memoryview, path: pathlib.Path):
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.path = path

    def fail(self, problem: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: {problem}")

    def need(self, n: int, what: str) -> None:
        if n > self.end - self.pos:
            raise self.fail(
                f"truncated: {what} at byte {self.pos} needs {n} bytes but only {self.end - self.pos} remain"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return value

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        start = self.pos
        self.pos += n
        try:
            return str(self.buf[start : self.pos], "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def check_count(self, count: int, min_bytes_each: int, what: str) -> None:
        """Refuse a count whose items cannot fit in the remaining bytes (before allocating)."""
        if count * min_bytes_each > self.end - self.pos:
            raise self.fail(
                f"{what} is {count}, which cannot fit in the {self.end - self.pos} bytes left in the file"
            )

    def value(self, vtype: int, key: str) -> Any:
        scalar = _SCALAR_STRUCTS.get(vtype)
        if scalar is not None:
            self.need(scalar.size, f"value of {key!r}")
            (value,) = scalar.unpack_from(self.buf, self.pos)
            self.pos += scalar.size
            return bool(value) if vtype == ValueType.BOOL else value
        if vtype == ValueType.STRING:
            return self.string(f"value of {key!r}")
        if vtype == ValueType.ARRAY:
            return self.array(key, depth=0)
        raise self.fail(f"metadata key {key!r} has unknown value type {vtype}")

    def array(self, key: str, depth: int) -> Any:
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(f"metadata key {key!r} nests arrays deeper than {MAX_ARRAY_NESTING} levels")
        elem_type = self.u32(f"array element type of {key!r}")
        count = self.u64(f"array length of {key!r}")
        dtype = _SCALAR_DTYPES.get(elem_type)
        if dtype is not None:
            self.check_count(count, dtype.itemsize, f"array length of {key!r}")
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return values != 0 if elem_type == ValueType.BOOL else values.astype(dtype.newbyteorder("="))
        if elem_type == ValueType.STRING:
            self.check_count(count, _STRING_MIN_BYTES, f"array length of {key!r}")
            return self.string_array(count, key)
        if elem_type == ValueType.ARRAY:
            self.check_count(count, _ARRAY_MIN_BYTES, f"array length of {key!r}")
            return [self.array(key, depth + 1) for _ in range(count)]
        raise self.fail(f"metadata key {key!r} is an array of unknown value type {elem_type}")

    def string_array(self, count: int, key: str) -> list[str]:
        # Tight loop: tokenizer vocabularies and merges hold ~10^5 strings.
        buf, pos, end = self.buf, self.pos, self.end
        unpack_length = _U64.unpack_from
        out: list[str] = [""] * count
        for i in range(count):
            if end - pos < 8:
                self.pos = pos
                self.need(8, f"length of {key!r}[{i}]")
            (n,) = unpack_length(buf, pos)
            pos += 8
            if n > end - pos:
                self.pos = pos
                self.need(n, f"{key!r}[{i}] ({n} bytes)")
            try:
                out[i] = str(buf[pos : pos + n], "utf-8")
            except UnicodeDecodeError:
                raise self.fail(f"metadata key {key!r} element {i} is not valid UTF-8") from None
            pos += n
        self.pos = pos
        return out


class GGUFFile(MappedTensorFile):
    """A GGUF model file: metadata and a directory of memory-mapped tensors.

    metadata values: str for strings, int/float/bool scalars, list[str] for string arrays,
    np.ndarray for numeric arrays (dtype as stored, bool arrays as np.bool_), list for
    arrays of arrays.
    """

    kind = "GGUF"

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        parser = _HeaderParser(memoryview(self._data), self.path)
        self.version = _read_preamble(parser)
        tensor_count = parser.u64("tensor count")
        kv_count = parser.u64("metadata key/value count")
        parser.check_count(kv_count, _KV_MIN_BYTES, "metadata key/value count")
        parser.check_count(tensor_count, _TENSOR_INFO_MIN_BYTES, "tensor count")
        self.metadata: dict[str, Any] = {}
        # key -> (value type, element type for arrays else None), as stored (uint32 vs int64 ...)
        self.metadata_types: dict[str, tuple[ValueType, ValueType | None]] = {}
        _read_metadata(parser, kv_count, self.metadata, self.metadata_types)
        self.alignment = _alignment(parser, self.metadata)
        entries = [_read_tensor_info(parser, i) for i in range(tensor_count)]
        data_start = -(-parser.pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = _place_tensors(parser, entries, data_start, self.alignment)


def _read_preamble(parser: _HeaderParser) -> int:
    if parser.end < 4 or bytes(parser.buf[:4]) != GGUF_MAGIC:
        head = bytes(parser.buf[:4])
        raise parser.fail(f"not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r})")
    parser.pos = 4
    version = parser.u32("version")
    if version in SUPPORTED_VERSIONS:
        return version
    if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
        raise parser.fail("big-endian GGUF files are not supported")
    if version == 1:
        raise parser.fail("GGUF version 1 is not supported (only versions 2 and 3)")
    raise parser.fail(f"unsupported GGUF version {version} (only versions 2 and 3)")


def _read_metadata(parser: _HeaderParser, kv_count: int, metadata: dict[str, Any],
                   types: dict[str, tuple[ValueType, ValueType | None]]) -> None:
    for i in range(kv_count):
        key = parser.string(f"metadata key #{i}")
        if key in metadata:
            raise parser.fail(f"duplicate metadata key {key!r}")
        vtype = parser.u32(f"value type of {key!r}")
        value_start = parser.pos
        metadata[key] = parser.value(vtype, key)  # validates vtype and, for arrays, the element type
        element_type = ValueType(_U32.unpack_from(parser.buf, value_start)[0]) if vtype == ValueType.ARRAY else None
        types[key] = (ValueType(vtype), element_type)


def _alignment(parser: _HeaderParser, metadata: dict[str, Any]) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int):
        raise parser.fail(f"general.alignment must be an integer, got {alignment!r}")
    if alignment <= 0 or alignment & (alignment - 1):
        raise parser.fail(f"general.alignment {alignment} is not a power of two")
    return alignment


@dataclass(frozen=True)
class _TensorEntry:
    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    relative_offset: int
    nbytes: int


def _read_tensor_info(parser: _HeaderParser, index: int) -> _TensorEntry:
    name = parser.string(f"name of tensor #{index}")
    label = f"tensor {name!r}"
    n_dims = parser.u32(f"dimension count of {label}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise parser.fail(f"{label} has {n_dims} dimensions (must be 1 to {MAX_DIMS})")
    ne = [parser.u64(f"dimension {d} of {label}") for d in range(n_dims)]
    if any(not 1 <= n < 2**63 for n in ne):
        raise parser.fail(f"{label} has an invalid dimension in {ne} (each must be >= 1)")
    code = parser.u32(f"type of {label}")
    offset = parser.u64(f"data offset of {label}")
    shape = tuple(reversed(ne))
    try:
        ggml_type = GGMLType(code)
        nbytes = tensor_nbytes(ggml_type, shape)
    except (ValueError, ModelFormatError) as e:
        problem = str(e) if isinstance(e, ModelFormatError) else f"unknown tensor type {code}"
        raise parser.fail(f"{label}: {problem}") from None
    return _TensorEntry(name, ggml_type, shape, offset, nbytes)


def _place_tensors(parser: _HeaderParser, entries: list[_TensorEntry], data_start: int,
                   alignment: int) -> dict[str, TensorInfo]:
    """Absolute offsets; reject duplicate names, misaligned, out-of-file and overlapping data."""
    file_size = parser.end
    tensors: dict[str, TensorInfo] = {}
    for e in entries:
        if e.name in tensors:
            raise parser.fail(f"duplicate tensor name {e.name!r}")
        if e.relative_offset % alignment:
            raise parser.fail(f"tensor {e.name!r} data offset {e.relative_offset} is not a multiple of "
                              f"the alignment {alignment}")
        start = data_start + e.relative_offset
        if start + e.nbytes > file_size:
            raise parser.fail(f"tensor {e.name!r} data (bytes {start}..{start + e.nbytes}) extends past the "
                              f"end of the file ({file_size} bytes)")
        tensors[e.name] = TensorInfo(e.name, e.ggml_type, e.shape, start, e.nbytes)
    by_offset = sorted(tensors.values(), key=lambda t: t.offset)
    for before, after in zip(by_offset, by_offset[1:]):
        if before.offset + before.nbytes > after.offset:
            raise parser.fail(f"tensors {before.name!r} and {after.name!r} overlap in the file")
    return tensors
