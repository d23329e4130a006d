"""GGUF llama model -> HF folder: model.safetensors (dequantized to f32, bf16 or f16), config.json
(LlamaForCausalLM), generation_config.json, tokenizer.json and tokenizer_config.json.

Q and K rows go back from llama.cpp's adjacent-pair RoPE layout to HF rotate-half; the output
head is ``lm_head.weight`` unless the GGUF ties it to the embedding (then
``tie_word_embeddings: true``). The tokenizer files run the same tokenization as the engine's
GGUF tokenizer (``engine.tokenizer.to_hf``). A ``rope_freqs`` tensor (llama3 frequency factors)
has no config.json form, so such a file is refused rather than exported with other numbers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError, ModelFormatError
from ..loader import WeightTensor
from ..models.family import family, gguf_tensor_name
from ..tokenizer.to_hf import hf_tokenizer_from_gguf
from ..weights.gguf import GGUFFile
from ..weights.quant import GGMLType
from .output import atomic_folder, check_folder_destination
from .tensors import TensorJob, hf_rope_row_order
from .writer import WriteStats, write_safetensors

DTYPES = {"f32": (GGMLType.F32, "float32"), "bf16": (GGMLType.BF16, "bfloat16"), "f16": (GGMLType.F16, "float16")}


def convert_gguf_to_hf(src: str | Path, dest: str | Path, dtype: str = "f32", force: bool = False,
                       progress: bool = True) -> WriteStats:
    """Export a GGUF llama model to the HF folder ``dest`` with weights stored as ``dtype`` (f32|bf16|f16)."""
    src, dest = Path(src), Path(dest)
    if dtype not in DTYPES:
        raise ConfigError(f"unknown safetensors dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    out_type, torch_dtype = DTYPES[dtype]
    check_folder_destination(dest, force)
    model = GGUFFile(src)
    config = ModelConfig.from_gguf_metadata(model.metadata, source=str(src))
    if config.rope.dim != config.head_dim:
        raise ModelFormatError(f"{src}: RoPE covers {config.rope.dim} of {config.head_dim} head dims, which a "
                               f"LlamaForCausalLM config cannot express")
    jobs = _tensor_jobs(model, config, out_type)
    tied = not any(job.name == "lm_head.weight" for job in jobs)
    tokenizer, tokenizer_config = hf_tokenizer_from_gguf(model.metadata, source=str(src))
    tokenizer_config["model_max_length"] = config.context_length
    bos, eos = (tokenizer.token_to_id(tokenizer_config[f"{role}_token"]) if f"{role}_token" in tokenizer_config
                else None for role in ("bos", "eos"))
    # end-of-turn tokens (eot/eom) also end generation, as HF lists them: eos_token_id [eos, eot, ...]
    stops = list(dict.fromkeys(i for i in (eos, *(model.metadata.get(f"tokenizer.ggml.{role}_token_id")
                                                  for role in ("eot", "eom"))) if i is not None))
    generation = {"bos_token_id": bos, "eos_token_id": stops[0] if len(stops) == 1 else stops or None}
    with atomic_folder(dest, force) as tmp:
        _write_json(tmp / "config.json", _config_json(config, tied, bos, eos, torch_dtype))
        _write_json(tmp / "generation_config.json", {k: v for k, v in generation.items() if v is not None})
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        totals = write_safetensors(tmp / "model.safetensors", jobs, progress, label=f"exporting to {dest.name}")
    return WriteStats(dest, len(jobs), *totals)


def _tensor_jobs(model: GGUFFile, config: ModelConfig, out_type: GGMLType) -> list[TensorJob]:
    if "rope_freqs.weight" in model.tensors:
        raise ModelFormatError(f"{model.path}: has a rope_freqs tensor (llama3 RoPE frequency factors), which "
                               f"config.json cannot express; export refused")
    fam = family(config.architecture)
    jobs = []
    for short, shape in fam.tensor_shapes(config, with_output="output.weight" in model.tensors).items():
        info = model.tensors.get(gguf_tensor_name(short))
        if info is None:
            raise ModelFormatError(f"{model.path}: missing tensor {gguf_tensor_name(short)!r}")
        if tuple(info.shape) != shape:
            raise ModelFormatError(f"{model.path}: tensor {info.name!r} has shape {tuple(info.shape)}, "
                                   f"expected {shape}")
        source = WeightTensor(info.name, info.ggml_type, info.shape, model.raw(info.name))
        heads = {"attn_q": config.n_heads, "attn_k": config.n_kv_heads}.get(short.rsplit(".", 1)[-1])
        order = hf_rope_row_order(info.shape[0], heads) if heads and fam.gguf_qk_permuted else None
        jobs.append(TensorJob(fam.hf_name(short), source, out_type, order))
    return jobs


def _config_json(c: ModelConfig, tied: bool, bos: int | None, eos: int | None, torch_dtype: str) -> dict[str, Any]:
    rope = c.rope
    scaling: dict[str, Any] | None = None
    if rope.scaling == "linear":
        scaling = {"rope_type": "linear", "factor": rope.factor}
    elif rope.scaling == "yarn":
        scaling = {"rope_type": "yarn", "factor": rope.factor,
                   "original_max_position_embeddings": rope.original_context,
                   "beta_fast": rope.yarn_beta_fast, "beta_slow": rope.yarn_beta_slow}
        if rope.yarn_attn_factor is not None:
            scaling["attention_factor"] = rope.yarn_attn_factor
    return {
        "architectures": [family(c.architecture).hf_architectures[0]],
        "model_type": family(c.architecture).hf_model_types[0],
        "_name_or_path": c.name,
        "hidden_size": c.d_model,
        "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.context_length,
        "rms_norm_eps": _shortest_float32(c.norm_eps),
        "rope_theta": _shortest_float32(rope.theta),
        "rope_scaling": scaling,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": torch_dtype,
        **({"dual_chunk_attention_config": {
            "chunk_size": c.dca.chunk_size, "local_size": c.dca.local_window,
            **({} if c.temperature_length is None else {"original_max_position_embeddings": c.temperature_length})}}
           if c.dca is not None else {}),
    }


def _shortest_float32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that reads back as it (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
