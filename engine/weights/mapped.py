"""What every memory-mapped model file shares: the tensor directory entry and raw/float32 access."""
from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass

import numpy as np

from ..errors import ModelFormatError
from .quant import GGMLType, dequantize


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]  # numpy order = reversed GGUF ne; a 2D weight is (out, in)
    offset: int  # absolute byte offset in the file
    nbytes: int


class MappedTensorFile:
    """A read-only np.memmap of a whole file plus a directory ``tensors`` filled in by the subclass."""

    kind = "model"  # the format's name in messages

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._data: np.memmap | None = self._map()
        self.tensors: dict[str, TensorInfo] = {}

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes: a uint8 view of the memory map (no copy)."""
        info = self._info(name)
        return self._mapped()[info.offset : info.offset + info.nbytes]

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as float32 in numpy shape (F32 tensors: a read-only view of the map)."""
        info = self._info(name)
        return dequantize(self.raw(name), info.ggml_type, info.shape)

    def close(self) -> None:
        """Drop this object's map; arrays already returned keep their own reference to it."""
        self._data = None

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise ModelFormatError(f"{self.path}: no tensor named {name!r}")
        return info

    def _mapped(self) -> np.memmap:
        if self._data is None:
            raise ValueError(f"{self.path}: {self.kind} file is closed")
        return self._data

    def _map(self) -> np.memmap:
        """Map the whole file read-only, turning every OS problem into ModelFormatError."""
        try:
            if self.path.is_dir():
                raise ModelFormatError(f"{self.path}: is a directory, not a {self.kind} file")
            if self.path.stat().st_size == 0:
                raise ModelFormatError(f"{self.path}: file is empty")
            return np.memmap(self.path, dtype=np.uint8, mode="r")
        except OSError as e:
            raise ModelFormatError(f"{self.path}: cannot open: {e.strerror or e}") from None
