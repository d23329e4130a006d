"""A GGUF file of random weights with a real model's shapes, readable by the engine and by llama.cpp.

    write_synthetic_gguf("/tmp/llama-1b-shape.gguf", config, tokenizer_source="SmolLM2.gguf")

Weights: ``bench.synthetic_weights`` (random stored bytes of the requested types whose decoded values are
O(1/sqrt(fan-in))), written as they are. The vocabulary (every ``tokenizer.*`` key) is copied from
another GGUF whose vocabulary is no larger than config.vocab_size; hyperparameters are written as the
HF converter writes them. For memory and speed measurements, not for text.
"""
from __future__ import annotations

from pathlib import Path

import gguf

from ..bench import synthetic_weights
from ..config import ModelConfig
from ..errors import ConfigError
from ..models.family import family, gguf_tensor_name
from ..weights.gguf import GGUFFile
from ..weights.quant import GGMLType
from .hf_to_gguf import _add_hyperparameters
from .output import atomic_file
from .requantize import typed_metadata
from .tensors import TensorJob
from .writer import WriteStats, write_gguf


def write_synthetic_gguf(dest: str | Path, config: ModelConfig, tokenizer_source: str | Path,
                         matrix_type: GGMLType = GGMLType.Q4_K, embedding_type: GGMLType = GGMLType.Q6_K,
                         seed: int = 0, force: bool = False, weights: dict | None = None) -> WriteStats:
    """Write `dest`: random weights of `config` (projections `matrix_type`, embedding/output `embedding_type`;
    or `weights` as given) with the vocabulary of the GGUF `tokenizer_source`."""
    dest = Path(dest)
    vocabulary = _padded_vocabulary({key: entry for key, entry in typed_metadata(GGUFFile(tokenizer_source)).items()
                                     if key.startswith("tokenizer.")}, config.vocab_size)
    weights = synthetic_weights(config, matrix_type, embedding_type, seed) if weights is None else weights
    jobs = [TensorJob(gguf_tensor_name(name), weights[name], weights[name].ggml_type)
            for name in family(config.architecture).tensor_shapes(config, not config.tied_embeddings)]

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(config.name or "random weights")
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hyperparameters(writer, config)
        for key, (value, vtype, element_type) in vocabulary.items():
            writer.add_key_value(key, value, vtype, sub_type=element_type)

    with atomic_file(dest, force) as tmp:
        totals = write_gguf(tmp, config.architecture, add_metadata, jobs, progress=False, label=f"writing {dest.name}")
    return WriteStats(dest, len(jobs), *totals)


UNUSED_TOKEN = 5  # tokenizer.ggml.token_type of a slot no text maps to


def _padded_vocabulary(vocabulary: dict, vocab_size: int) -> dict:
    """The donor's tokenizer keys with its token list (and per-token arrays) padded with unused tokens up to the
    model's vocab_size rows: llama.cpp requires the embedding to have exactly one row per token."""
    if "tokenizer.ggml.tokens" not in vocabulary:
        raise ConfigError("the vocabulary donor has no tokenizer.ggml.tokens: give a GGUF file with a tokenizer")
    tokens, vtype, element_type = vocabulary["tokenizer.ggml.tokens"]
    extra = vocab_size - len(tokens)
    if extra < 0:
        raise ConfigError(f"the donor vocabulary has {len(tokens)} tokens, more than the model's {vocab_size} rows")
    padded = dict(vocabulary)
    padded["tokenizer.ggml.tokens"] = (tokens + [f"<|unused_{i}|>" for i in range(extra)], vtype, element_type)
    for key, fill in (("tokenizer.ggml.token_type", UNUSED_TOKEN), ("tokenizer.ggml.scores", 0.0)):
        if key in padded:
            values, vtype, element_type = padded[key]
            padded[key] = (list(values) + [fill] * extra, vtype, element_type)
    return padded
