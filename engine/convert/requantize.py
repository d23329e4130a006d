"""GGUF -> GGUF with another tensor type (``engine quantize``), as llama-quantize does.

Every metadata key is copied with its stored GGUF value type (llama.cpp checks types), except
``general.file_type`` (set to the new type) and ``general.alignment`` (the output uses the default
32). Tensors keep their names, order and row layout; each 2-D tensor is re-quantized from its
dequantized values (copied as is when its type does not change), 1-D tensors become F32, the
output head (``output.weight``, else ``token_embd.weight``) is Q8_0 under a 4-bit type, and a
tensor whose rows are not whole blocks of the new type keeps its type. The file's architecture
does not matter otherwise: nothing is renamed or permuted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import ModelFormatError
from ..loader import WeightTensor
from ..weights.gguf import GGUFFile
from .hf_to_gguf import FILE_TYPES
from .output import atomic_file, check_file_destination
from .quantize import output_type, type_from_name
from .tensors import TensorJob
from .writer import WriteStats, write_gguf

NOT_COPIED = ("general.architecture", "general.alignment", "general.file_type")  # the writer sets these


def quantize_gguf(src: str | Path, dest: str | Path, tensor_type: str, force: bool = False,
                  progress: bool = True) -> WriteStats:
    """Write ``dest``: the GGUF ``src`` with its weights as ``tensor_type`` (q8_0|q4_0|q4_1|f32|f16|bf16)."""
    src, dest = Path(src), Path(dest)
    requested = type_from_name(tensor_type)
    check_file_destination(dest, force, source=src)
    model = GGUFFile(src)  # validates the whole header and tensor directory
    arch = model.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFormatError(f"{src}: missing metadata key 'general.architecture'")
    entries = _typed_metadata(model)
    head = "output.weight" if "output.weight" in model.tensors else "token_embd.weight"
    jobs = [
        TensorJob(name, WeightTensor(name, info.ggml_type, info.shape, model.raw(name)),
                  output_type(info.shape, requested, info.ggml_type, output_head=name == head))
        for name, info in model.tensors.items()
    ]

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        for key, (value, vtype, element_type) in entries.items():
            if key not in NOT_COPIED:
                writer.add_key_value(key, value, vtype, sub_type=element_type)
        writer.add_file_type(FILE_TYPES[requested])
        if "general.quantization_version" not in entries:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    with atomic_file(dest, force, source=src) as tmp:
        totals = write_gguf(tmp, arch, add_metadata, jobs, progress, label=f"quantizing to {dest.name}")
    return WriteStats(dest, len(jobs), *totals)


def _typed_metadata(model: GGUFFile) -> dict[str, tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
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
