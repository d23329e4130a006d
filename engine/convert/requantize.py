"""GGUF -> GGUF of another file type (``engine quantize``), as llama-quantize does.

Every metadata key is copied with its stored GGUF value type (llama.cpp checks types), except
``general.file_type`` (set to the new type) and ``general.alignment`` (the output uses the default
32). Tensors keep their names, order and row layout; each tensor gets the type the file type's
mixture gives it (``mixture.tensor_types``: 1-D tensors F32, the output head and some attn_v /
ffn_down layers with more bits, fallbacks for rows that are not whole blocks) and is re-quantized
from its dequantized values (copied as is when its type does not change). The file's architecture
does not matter otherwise: nothing is renamed or permuted.

``copy_with_metadata`` is the same rewrite with every tensor copied byte for byte and some metadata keys set
(``engine eval tune-dca --write-gguf``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from ..errors import ModelFormatError
from ..loader import WeightTensor
from ..weights.gguf import GGUFFile
from ..weights.quant import GGMLType
from .mixture import file_type_from_name, is_llama_70b, tensor_types
from .output import atomic_file, check_file_destination
from .tensors import TensorJob, thread_count
from .writer import WriteStats, write_gguf

NOT_COPIED = ("general.architecture", "general.alignment", "general.file_type")  # the writer sets these


def quantize_gguf(src: str | Path, dest: str | Path, file_type: str, force: bool = False,
                  progress: bool = True, threads: int | None = None) -> WriteStats:
    """Write ``dest``: the GGUF ``src`` as file type ``file_type`` (a name of mixture.FILE_TYPES: q4_k_m, q8_0, ...),
    encoding on ``threads`` threads (default: every available CPU)."""
    requested = file_type_from_name(file_type)
    threads = thread_count(threads)

    def types(model: GGUFFile, arch: str) -> dict[str, GGMLType]:
        return tensor_types([(name, info.shape, info.ggml_type) for name, info in model.tensors.items()], requested,
                            *_layer_counts(model, arch))

    def add_metadata(writer: gguf.GGUFWriter, entries: dict) -> None:
        writer.add_file_type(requested.ftype)
        if "general.quantization_version" not in entries:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    return _rewrite(src, dest, types, add_metadata, force, progress, label=f"quantizing to {Path(dest).name}",
                    threads=threads)


def copy_with_metadata(src: str | Path, dest: str | Path, updates: dict[str, tuple[Any, gguf.GGUFValueType]],
                       force: bool = False, progress: bool = True) -> WriteStats:
    """Write ``dest``: the GGUF ``src`` with ``updates`` (key -> (value, GGUF value type)) added or replaced, every
    tensor and its type as stored."""
    def types(model: GGUFFile, arch: str) -> dict[str, GGMLType]:
        return {name: info.ggml_type for name, info in model.tensors.items()}

    def add_metadata(writer: gguf.GGUFWriter, entries: dict) -> None:
        for key, (value, vtype, element_type) in entries.items():
            if key == "general.file_type" and key not in updates:
                writer.add_key_value(key, value, vtype, sub_type=element_type)
        for key, (value, vtype) in updates.items():
            writer.add_key_value(key, value, vtype)

    return _rewrite(src, dest, types, add_metadata, force, progress, label=f"writing {Path(dest).name}",
                    replaced=tuple(updates))


def _rewrite(src: str | Path, dest: str | Path, types: Callable[[GGUFFile, str], dict[str, GGMLType]],
             add_metadata: Callable[[gguf.GGUFWriter, dict], None], force: bool, progress: bool, label: str,
             replaced: tuple[str, ...] = (), threads: int = 1) -> WriteStats:
    """Write ``dest`` from the GGUF ``src``: its metadata keys copied as stored except NOT_COPIED and ``replaced``,
    then ``add_metadata(writer, the source's typed entries)``; tensor ``name`` as ``types(model, arch)[name]``."""
    src, dest = Path(src), Path(dest)
    check_file_destination(dest, force, source=src)
    model = GGUFFile(src)  # validates the whole header and tensor directory
    arch = model.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFormatError(f"{src}: missing metadata key 'general.architecture'")
    entries = typed_metadata(model)
    out_types = types(model, arch)
    jobs = [TensorJob(name, WeightTensor(name, info.ggml_type, info.shape, model.raw(name)), out_types[name])
            for name, info in model.tensors.items()]

    def write_metadata(writer: gguf.GGUFWriter) -> None:
        for key, (value, vtype, element_type) in entries.items():
            if key not in NOT_COPIED and key not in replaced:
                writer.add_key_value(key, value, vtype, sub_type=element_type)
        add_metadata(writer, entries)

    with atomic_file(dest, force, source=src) as tmp:
        totals = write_gguf(tmp, arch, write_metadata, jobs, progress, label=label, threads=threads)
    return WriteStats(dest, len(jobs), *totals)


def _layer_counts(model: GGUFFile, arch: str) -> tuple[int, bool]:
    """(number of layers, whether llama.cpp takes it for a Llama-70B) from the metadata, else the tensor names."""
    n_layers = model.metadata.get(f"{arch}.block_count")
    if not isinstance(n_layers, int):
        n_layers = len({name.split(".")[1] for name in model.tensors if name.startswith("blk.")})
    n_heads = model.metadata.get(f"{arch}.attention.head_count")
    n_kv_heads = model.metadata.get(f"{arch}.attention.head_count_kv", n_heads)
    return n_layers, is_llama_70b(arch, n_layers, n_heads, n_kv_heads)


def typed_metadata(model: GGUFFile) -> dict[str, tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """key -> (value, value type, array element type) as stored, ready for GGUFWriter.add_key_value."""
    entries = {}
    for key, value in model.metadata.items():
        vtype, element_type = model.metadata_types[key]
        if element_type == gguf.GGUFValueType.ARRAY:
            raise ModelFormatError(f"{model.path}: metadata key {key!r} is an array of arrays, which cannot be copied")
        if element_type is not None and len(value) == 0:
            raise ModelFormatError(f"{model.path}: metadata key {key!r} is an empty array, which gguf-py cannot write")
        entries[key] = (value.tolist() if isinstance(value, np.ndarray) else value, gguf.GGUFValueType(vtype),
                        None if element_type is None else gguf.GGUFValueType(element_type))
    return entries
