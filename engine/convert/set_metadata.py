"""GGUF -> GGUF with some metadata keys set: every tensor copied byte for byte, every other key kept with its
stored GGUF value type (as ``engine quantize`` copies them), the output written atomically beside its name."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

from ..errors import ModelFormatError
from ..loader import WeightTensor
from ..weights.gguf import GGUFFile
from .output import atomic_file
from .requantize import NOT_COPIED, _typed_metadata
from .tensors import TensorJob
from .writer import WriteStats, write_gguf


def copy_with_metadata(src: str | Path, dest: str | Path, updates: dict[str, tuple[Any, gguf.GGUFValueType]],
                       force: bool = False, progress: bool = True) -> WriteStats:
    """Write ``dest``: the GGUF ``src`` with ``updates`` (key -> (value, GGUF value type)) added or replaced."""
    src, dest = Path(src), Path(dest)
    model = GGUFFile(src)  # validates the whole header and tensor directory
    arch = model.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFormatError(f"{src}: missing metadata key 'general.architecture'")
    entries = {key: entry for key, entry in _typed_metadata(model).items() if key not in updates}
    jobs = [TensorJob(name, WeightTensor(name, info.ggml_type, info.shape, model.raw(name)), info.ggml_type)
            for name, info in model.tensors.items()]

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        for key, (value, vtype, element_type) in entries.items():
            if key not in NOT_COPIED or key == "general.file_type":
                writer.add_key_value(key, value, vtype, sub_type=element_type)
        for key, (value, vtype) in updates.items():
            writer.add_key_value(key, value, vtype)

    with atomic_file(dest, force, source=src) as tmp:
        totals = write_gguf(tmp, arch, add_metadata, jobs, progress, label=f"writing {dest.name}")
    return WriteStats(dest, len(jobs), *totals)
