"""Open a model (GGUF file or HF safetensors folder) into one internal form.

Both formats come out the same: a ``ModelConfig``, a ``Tokenizer`` and weights named as in
GGUF without the ``.weight`` suffix (``token_embd``, ``blk.N.attn_q``, ...), each a
``WeightTensor`` holding its stored bytes (still quantized) and numpy shape (out, in).

RoPE convention: the engine uses HF rotate-half. GGUF llama files store Q/K rows permuted for
llama.cpp's adjacent-pair RoPE; the rows are put back here. Quantized blocks run along a row,
so whole rows move and the weights stay quantized.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import ModelConfig
from .errors import ModelFormatError
from .models import family
from .models.family import engine_tensor_name
from .tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_hf
from .weights.gguf import GGUFFile
from .weights.quant import GGMLType, dequantize
from .weights.safetensors import SafetensorsCheckpoint

@dataclass
class WeightTensor:
    """One weight as stored: type, numpy shape (out, in) or (n,), and raw bytes (uint8)."""

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    raw: np.ndarray  # uint8, memory-mapped where possible

    def dequantize(self) -> np.ndarray:
        return dequantize(self.raw, self.ggml_type, self.shape)

    def row_bytes(self) -> np.ndarray:
        """The raw bytes as (rows, bytes_per_row): quantized blocks never straddle rows."""
        return self.raw.reshape(self.shape[0], -1)


@dataclass
class LoadedModel:
    path: Path
    file_format: str  # "gguf" | "safetensors"
    config: ModelConfig
    tokenizer: Tokenizer
    weights: dict[str, WeightTensor]
    metadata: dict[str, Any] = field(default_factory=dict)  # GGUF metadata (empty for HF)
    gguf: GGUFFile | None = None  # the parsed GGUF file (its memory map backs the weights), for hashing it cheaply

    def tensor_type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for w in self.weights.values():
            counts[w.ggml_type.name] = counts.get(w.ggml_type.name, 0) + 1
        return counts

    def n_parameters(self) -> int:
        return sum(int(np.prod(w.shape)) for w in self.weights.values())


def open_model(path: str | Path) -> LoadedModel:
    """A GGUF file or a HF folder (config.json + safetensors) -> LoadedModel, validated."""
    path = Path(path)
    if path.is_dir():
        return _open_hf(path)
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file or directory")
    return _open_gguf(path)


def _open_gguf(path: Path) -> LoadedModel:
    gguf = GGUFFile(path)
    config = ModelConfig.from_gguf_metadata(gguf.metadata, source=str(path))
    tokenizer = tokenizer_from_gguf(gguf.metadata, source=str(path))
    weights = {}
    for name, info in gguf.tensors.items():
        short = engine_tensor_name(name)
        weights[short] = WeightTensor(short, info.ggml_type, info.shape, gguf.raw(name))
    if "rope_freqs" in weights:
        factors = weights.pop("rope_freqs").dequantize().astype(np.float64)
        config = dataclasses.replace(config, rope=dataclasses.replace(config.rope, freq_factors=factors))
    for layer in range(config.n_layers if family(config.architecture).gguf_qk_permuted else 0):
        for kind, n_heads in (("attn_q", config.n_heads), ("attn_k", config.n_kv_heads)):
            w = weights.get(f"blk.{layer}.{kind}")
            if w is not None:
                _check_shape(path, w, (n_heads * config.head_dim, config.d_model))
                w.raw = _unpermute_rows(w.row_bytes(), n_heads).reshape(-1)
    return _finish(path, "gguf", config, tokenizer, weights, gguf.metadata, gguf)


def _open_hf(folder: Path) -> LoadedModel:
    checkpoint = SafetensorsCheckpoint(folder)
    config = ModelConfig.from_hf_config(checkpoint.read_json("config.json"), source=str(folder / "config.json"))
    tokenizer = tokenizer_from_hf(folder)
    fam = family(config.architecture)
    for name, dtype in checkpoint.unsupported.items():
        if fam.engine_name(name) is not None:
            raise ModelFormatError(f"{folder}: weight {name!r} has dtype {dtype}, which is not supported "
                                   f"(F32, F16, BF16)")
    weights = {}
    for name, info in checkpoint.tensors.items():
        short = fam.engine_name(name)
        if short is None:
            continue  # e.g. rotary_emb.inv_freq buffers saved by old checkpoints
        weights[short] = WeightTensor(short, info.ggml_type, info.shape, checkpoint.raw(name))
    return _finish(folder, "safetensors", config, tokenizer, weights, {})


def _unpermute_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permute: GGUF row (h, i, t) holds HF row (h, t, i), t in {0, 1}, i < head_dim/2."""
    n_rows, row_len = rows.shape
    half = n_rows // n_heads // 2
    return np.ascontiguousarray(rows.reshape(n_heads, half, 2, row_len).swapaxes(1, 2)).reshape(n_rows, row_len)


def _check_shape(path: Path, w: WeightTensor, expected: tuple[int, ...]) -> None:
    if tuple(w.shape) != expected:
        raise ModelFormatError(f"{path}: tensor {w.name!r} has shape {tuple(w.shape)}, expected {expected}")


def _finish(path: Path, file_format: str, config: ModelConfig, tokenizer: Tokenizer,
            weights: dict[str, WeightTensor], metadata: dict[str, Any], gguf: GGUFFile | None = None) -> LoadedModel:
    expected = family(config.architecture).tensor_shapes(config, with_output="output" in weights)
    for name, shape in expected.items():
        if name not in weights:
            raise ModelFormatError(f"{path}: missing tensor {name!r}")
        _check_shape(path, weights[name], shape)
    config = dataclasses.replace(config, tied_embeddings="output" not in weights)
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelFormatError(
            f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the embedding has {config.vocab_size} rows"
        )
    used = {name: weights[name] for name in expected}
    return LoadedModel(path, file_format, config, tokenizer, used, metadata, gguf)
