"""safetensors reader (single file and HF sharded checkpoints) over a read-only np.memmap.

File layout: header length N (u64 little-endian) | N bytes of UTF-8 JSON | tensor data.
The JSON maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
relative to the start of the data) plus an optional "__metadata__" of string pairs.
Tensors come back as the GGUF reader's TensorInfo, with ggml types F32 / F16 / BF16.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import numpy as np

from ..errors import ModelFormatError
from .mapped import MappedTensorFile, TensorInfo
from .quant import GGMLType, tensor_nbytes

MAX_HEADER_BYTES = 100 * 1024 * 1024
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {"F32": GGMLType.F32, "F16": GGMLType.F16, "BF16": GGMLType.BF16}
# dtypes safetensors defines that no Llama weight uses (position_ids buffers, fp8 ...): such tensors are
# checked and listed in `unsupported`, and only an attempt to read one is an error
_OTHER_DTYPE_SIZES = {"F64": 8, "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class SafetensorsFile(MappedTensorFile):
    """One .safetensors file: string metadata and a directory of memory-mapped tensors."""

    kind = "safetensors"

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        header, data_start = self._read_header()
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise self._fail("__metadata__ must map strings to strings")
        self.metadata: dict[str, str] = metadata
        self.unsupported: dict[str, str] = {}  # tensor name -> dtype, for tensors of _OTHER_DTYPE_SIZES
        entries = [(name, self._tensor_info(name, entry, data_start)) for name, entry in header.items()]
        self.tensors: dict[str, TensorInfo] = {name: info for name, info in entries if info is not None}
        self._check_no_overlap()

    def _fail(self, problem: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: {problem}")

    def _read_header(self) -> tuple[dict[str, Any], int]:
        data = self._mapped()
        if data.size < 8:
            raise self._fail(f"file is too small ({data.size} bytes) to be a safetensors file")
        header_len = int(data[:8].view("<u8")[0])
        if header_len > MAX_HEADER_BYTES or header_len > data.size - 8:
            raise self._fail(f"header length {header_len} is impossible for a file of {data.size} bytes")
        try:
            text = bytes(data[8 : 8 + header_len]).decode("utf-8")
            header = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise self._fail(f"header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        return header, 8 + header_len

    def _info(self, name: str) -> TensorInfo:
        if name in self.unsupported:
            raise self._fail(f"tensor {name!r} has dtype {self.unsupported[name]!r}, which is not supported "
                             f"(F32, F16, BF16)")
        return super()._info(name)

    def _tensor_info(self, name: str, entry: Any, data_start: int) -> TensorInfo | None:
        """The entry checked against the file; None (and listed in `unsupported`) for an unused dtype."""
        label = f"tensor {name!r}"
        if not isinstance(entry, dict):
            raise self._fail(f"{label}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise self._fail(f"{label}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise self._fail(f"{label}: data_offsets {offsets!r} is not a pair of integers")
        ggml_type = _DTYPES.get(dtype) if isinstance(dtype, str) else None
        if ggml_type is None and dtype not in _OTHER_DTYPE_SIZES:
            raise self._fail(f"{label} has dtype {dtype!r}, which safetensors does not define")
        begin, end = offsets
        data_len = self._mapped().size - data_start
        if not 0 <= begin <= end <= data_len:
            raise self._fail(f"{label}: data_offsets [{begin}, {end}] are outside the {data_len} data bytes "
                             f"or inverted")
        shape_t = tuple(shape)
        if ggml_type is None:
            if end - begin != math.prod(shape_t) * _OTHER_DTYPE_SIZES[dtype]:
                raise self._fail(f"{label}: shape {list(shape_t)} of {dtype} does not match data_offsets "
                                 f"spanning {end - begin} bytes")
            self.unsupported[name] = dtype
            return None
        nbytes = tensor_nbytes(ggml_type, shape_t)
        if end - begin != nbytes:
            raise self._fail(f"{label}: shape {list(shape_t)} of {dtype} needs {nbytes} bytes but "
                             f"data_offsets span {end - begin}")
        return TensorInfo(name, ggml_type, shape_t, data_start + begin, nbytes)

    def _check_no_overlap(self) -> None:
        by_offset = sorted(self.tensors.values(), key=lambda t: (t.offset, t.nbytes))
        for before, after in zip(by_offset, by_offset[1:]):
            if before.offset + before.nbytes > after.offset:
                raise self._fail(f"tensors {before.name!r} and {after.name!r} overlap")


class SafetensorsCheckpoint:
    """A HF model folder: model.safetensors, or model.safetensors.index.json + shards."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = pathlib.Path(folder)
        if not self.folder.is_dir():
            raise ModelFormatError(f"{self.folder}: not a model folder (no such directory)")
        if (self.folder / INDEX_FILE).exists():
            self.files = self._open_shards()
        elif (self.folder / SINGLE_FILE).exists():
            self.files = [SafetensorsFile(self.folder / SINGLE_FILE)]
        else:
            raise ModelFormatError(f"{self.folder}: has neither {SINGLE_FILE} nor {INDEX_FILE}")
        self._file_of: dict[str, SafetensorsFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.unsupported: dict[str, str] = {}  # name -> dtype of tensors no Llama weight uses
        for f in self.files:
            self.unsupported.update(f.unsupported)
            for name, info in f.tensors.items():
                if name in self.tensors:
                    raise ModelFormatError(f"{f.path}: tensor {name!r} is also in {self._file_of[name].path}")
                self.tensors[name] = info
                self._file_of[name] = f

    def file_of(self, name: str) -> SafetensorsFile:
        f = self._file_of.get(name)
        if f is None:
            raise ModelFormatError(f"{self.folder}: no tensor named {name!r}")
        return f

    def raw(self, name: str) -> np.ndarray:
        return self.file_of(name).raw(name)

    def tensor(self, name: str) -> np.ndarray:
        return self.file_of(name).tensor(name)

    def read_json(self, filename: str) -> dict:
        """A JSON object file of the folder (config.json, tokenizer_config.json, ...)."""
        path = self.folder / filename
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelFormatError(f"{path}: file is missing") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{path}: cannot read: {e}") from None
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise ModelFormatError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(value, dict):
            raise ModelFormatError(f"{path}: expected a JSON object")
        return value

    def _open_shards(self) -> list[SafetensorsFile]:
        index_path = self.folder / INDEX_FILE
        weight_map = self.read_json(INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelFormatError(f"{index_path}: weight_map must map tensor names to shard file names")
        shards: dict[str, SafetensorsFile] = {}
        for shard_name in dict.fromkeys(weight_map.values()):  # first-seen order, no repeats
            shard_path = self.folder / shard_name
            if pathlib.PurePath(shard_name).name != shard_name or not shard_path.is_file():
                raise ModelFormatError(f"{index_path}: shard {shard_name!r} is not a file in {self.folder}")
            shards[shard_name] = SafetensorsFile(shard_path)
        for tensor_name, shard_name in weight_map.items():
            if tensor_name not in shards[shard_name].tensors:
                raise ModelFormatError(
                    f"{index_path}: tensor {tensor_name!r} is listed in shard {shard_name!r} but missing from it"
                )
        return list(shards.values())


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
