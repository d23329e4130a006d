"""Streaming writers: GGUF (through gguf-py's GGUFWriter) and safetensors, one tensor at a time.

GGUF: every tensor's name, shape, type and byte size are known before any data is produced, so
the header, metadata and tensor directory are written first (``add_tensor_info`` +
``write_ti_data_to_file``) and each tensor's bytes follow with ``write_tensor_data`` as soon as
they are converted; only one output tensor is held in memory at a time.
safetensors: the JSON header (offsets from the known sizes) is written first, then the data chunk
by chunk.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Callable, Sequence

import gguf
import numpy as np

from ..weights.quant import GGMLType
from .output import progress_bar
from .tensors import TensorJob

SAFETENSORS_DTYPES = {GGMLType.F32: "F32", GGMLType.F16: "F16", GGMLType.BF16: "BF16"}


@dataclass(frozen=True)
class WriteStats:
    path: Path
    n_tensors: int
    bytes_in: int  # tensor bytes read from the source
    bytes_out: int  # tensor bytes written
    seconds: float
    n_weights: int  # elements of all tensors
    type_counts: dict[str, int]  # output tensor type name -> number of tensors, most first

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes_out / self.n_weights if self.n_weights else 0.0

    def summary(self) -> str:
        rate = self.bytes_in / self.seconds / 1e6 if self.seconds > 0 else float("inf")
        types = ", ".join(f"{count} {name}" for name, count in self.type_counts.items())
        return (f"wrote {self.path}: {self.n_tensors} tensors ({types}), {self.bytes_out / 1e6:.1f} MB, "
                f"{self.bits_per_weight:.2f} bits/weight (from {self.bytes_in / 1e6:.1f} MB) in {self.seconds:.2f} s, "
                f"{rate:.0f} MB/s")


def write_gguf(path: Path, arch: str, add_metadata: Callable[[gguf.GGUFWriter], None],
               jobs: Sequence[TensorJob], progress: bool, label: str, threads: int = 1) -> tuple:
    """Write a complete GGUF file at ``path``, converting each tensor on ``threads`` threads; returns
    WriteStats' fields after n_tensors (``_totals``)."""
    started = time.perf_counter()
    writer = gguf.GGUFWriter(path, arch)
    try:
        add_metadata(writer)
        for job in jobs:
            writer.add_tensor_info(job.name, job.shape, np.dtype(np.float32), job.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType(int(job.out_type)))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with progress_bar(sum(job.nbytes for job in jobs), label, progress) as bar:
            for job in jobs:
                writer.write_tensor_data(job.data(threads))
                if bar is not None:
                    bar.update(job.nbytes)
    finally:
        writer.close()
    return _totals(jobs, started)


def write_safetensors(path: Path, jobs: Sequence[TensorJob], progress: bool, label: str) -> tuple:
    """Write one .safetensors file (tensor types F32/F16/BF16); returns WriteStats' fields after n_tensors."""
    started = time.perf_counter()
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for job in jobs:
        header[job.name] = {"dtype": SAFETENSORS_DTYPES[job.out_type], "shape": list(job.shape),
                            "data_offsets": [offset, offset + job.nbytes]}
        offset += job.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f, progress_bar(offset, label, progress) as bar:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for job in jobs:
            for chunk in job.chunks():
                f.write(chunk.data)
                if bar is not None:
                    bar.update(chunk.size)
    return _totals(jobs, started)


def _totals(jobs: Sequence[TensorJob], started: float) -> tuple[int, int, float, int, dict[str, int]]:
    """(bytes in, bytes out, seconds, weights, tensors per output type) -- WriteStats' fields after n_tensors."""
    counts = Counter(GGMLType(job.out_type).name for job in jobs)
    return (sum(job.source.raw.nbytes for job in jobs), sum(job.nbytes for job in jobs),
            time.perf_counter() - started, sum(prod(job.shape) for job in jobs), dict(counts.most_common()))
