"""HF Llama checkpoint (config.json + safetensors, sharded or not, + tokenizer files) -> GGUF.

Written as llama.cpp's convert_hf_to_gguf.py writes a llama model: ``llama.*`` hyperparameters,
``tokenizer.ggml.*`` vocabulary, ``general.*`` name/file type; tensors ``token_embd``,
``blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,ffn_up,ffn_down}``,
``output_norm`` and ``output`` (absent when tied) with the ``.weight`` suffix; Q and K rows
permuted from HF rotate-half to llama.cpp's adjacent pairs; 1-D tensors F32, 2-D weights as the
requested file type's mixture gives them (``mixture.tensor_types``, llama-quantize's choices).

RoPE scaling: linear and YaRN go into ``llama.rope.scaling.*``; llama3 becomes the
``rope_freqs`` tensor of per-frequency divisors (as llama.cpp stores it); dynamic NTK has no GGUF
form and is dropped with a warning (the engine applies it at run time: --rope-scaling dynamic).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from ..config import GGUF_DCA_CHUNK_SIZE, GGUF_DCA_LOCAL_WINDOW, GGUF_DCA_ORIGINAL_CONTEXT, ModelConfig
from ..errors import ModelFormatError
from ..loader import LoadedModel, WeightTensor, open_model
from ..models.family import HF_BUFFER_SUFFIXES, engine_tensor_name, family, gguf_tensor_name
from ..rope import inv_freq
from ..tokenizer.to_gguf import GGUFVocab, gguf_vocab_from_hf
from ..weights.quant import GGMLType
from ..weights.safetensors import SafetensorsCheckpoint
from .mixture import FileType, file_type_from_name, is_llama_70b, tensor_types
from .output import atomic_file, check_file_destination, warn
from .tensors import TensorJob, gguf_rope_row_order, thread_count
from .writer import WriteStats, write_gguf


def convert_hf_to_gguf(hf_dir: str | Path, dest: str | Path, file_type: str = "f16", force: bool = False,
                       pre: str | None = None, progress: bool = True,
                       on_warning: Callable[[str], None] = warn, threads: int | None = None) -> WriteStats:
    """Convert an HF Llama folder to a GGUF file ``dest`` of the given file type (mixture.FILE_TYPES: f16, q4_k_m...).

    pre: tokenizer.ggml.pre to write instead of the detected one (byte-level BPE tokenizers).
    threads: tensors are converted on this many threads (default: every available CPU).
    """
    hf_dir, dest = Path(hf_dir), Path(dest)
    requested = file_type_from_name(file_type)
    threads = thread_count(threads)
    check_file_destination(dest, force)
    if not hf_dir.is_dir():
        raise ModelFormatError(f"{hf_dir}: not an HF model folder (expected a folder with config.json)")
    model = open_model(hf_dir)  # validates config.json, tensor names and shapes, tokenizer
    config = model.config
    vocab = gguf_vocab_from_hf(hf_dir, config.vocab_size, pre=pre, engine_tokenizer=model.tokenizer)
    for message in vocab.warnings:
        on_warning(message)
    if config.rope.scaling == "dynamic":
        on_warning("GGUF has no dynamic-NTK RoPE scaling; it is not stored (use --rope-scaling dynamic when running)")
    jobs = _tensor_jobs(model, requested)
    _check_all_tensors_used(hf_dir, jobs, family(config.architecture))
    name = config.name or hf_dir.resolve().name

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(requested.ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hyperparameters(writer, config)
        _add_vocab(writer, vocab)

    with atomic_file(dest, force) as tmp:
        totals = write_gguf(tmp, config.architecture, add_metadata, jobs, progress, label=f"converting to {dest.name}",
                            threads=threads)
    return WriteStats(dest, len(jobs), *totals)


def _tensor_jobs(model: LoadedModel, requested: FileType) -> list[TensorJob]:
    config = model.config
    fam = family(config.architecture)
    shorts = list(fam.tensor_shapes(config, "output" in model.weights))
    types = tensor_types([(gguf_tensor_name(s), tuple(model.weights[s].shape), model.weights[s].ggml_type)
                          for s in shorts], requested, config.n_layers,
                         is_llama_70b(config.architecture, config.n_layers, config.n_heads, config.n_kv_heads))
    jobs = [] if config.rope.scaling != "llama3" else [_rope_freqs_job(config)]
    for short in shorts:
        source = model.weights[short]
        heads = {"attn_q": config.n_heads, "attn_k": config.n_kv_heads}.get(short.rsplit(".", 1)[-1])
        order = gguf_rope_row_order(source.shape[0], heads) if heads and fam.gguf_qk_permuted else None
        jobs.append(TensorJob(gguf_tensor_name(short), source, types[gguf_tensor_name(short)], order))
    return jobs


def _check_all_tensors_used(hf_dir: Path, jobs: list[TensorJob], fam) -> None:
    """A checkpoint tensor the family's graph has no place for (extra biases or norms) would be dropped: refuse."""
    used = {fam.hf_name(engine_tensor_name(job.name)) for job in jobs if job.name != "rope_freqs.weight"}
    for name in SafetensorsCheckpoint(hf_dir).tensors:
        if name not in used and not name.endswith(HF_BUFFER_SUFFIXES):
            raise ModelFormatError(f"{hf_dir}: tensor {name!r} has no place in a {fam.name} model (unsupported "
                                   f"variant)")


def _rope_freqs_job(config: ModelConfig) -> TensorJob:
    """llama3 RoPE as llama.cpp stores it: divisors of the base frequencies, F32 (rope.dim/2,)."""
    plain = dataclasses.replace(config.rope, scaling="none", factor=1.0)
    factors = (inv_freq(plain) / inv_freq(config.rope)).astype("<f4")
    source = WeightTensor("rope_freqs", GGMLType.F32, factors.shape, factors.view(np.uint8))
    return TensorJob("rope_freqs.weight", source, GGMLType.F32)


def _add_hyperparameters(writer: gguf.GGUFWriter, c: ModelConfig) -> None:
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.context_length)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.ffn_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_rope_freq_base(c.rope.theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_rope_dimension_count(c.rope.dim)
    if c.dca is not None:  # the model's own DCA settings, under this engine's keys
        writer.add_uint32(GGUF_DCA_CHUNK_SIZE, c.dca.chunk_size)
        writer.add_uint32(GGUF_DCA_LOCAL_WINDOW, c.dca.local_window)
    if c.temperature_length is not None:
        writer.add_uint32(GGUF_DCA_ORIGINAL_CONTEXT, c.temperature_length)
    if c.head_dim != c.d_model // c.n_heads:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    rope = c.rope
    if rope.scaling in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope.scaling))
        writer.add_rope_scaling_factor(rope.factor)
    if rope.scaling == "yarn":
        writer.add_rope_scaling_orig_ctx_len(rope.original_context)
        writer.add_rope_scaling_yarn_beta_fast(rope.yarn_beta_fast)
        writer.add_rope_scaling_yarn_beta_slow(rope.yarn_beta_slow)
        if rope.yarn_attn_factor is not None:
            writer.add_rope_scaling_yarn_attn_factor(rope.yarn_attn_factor)


def _add_vocab(writer: gguf.GGUFWriter, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    for add, token_id in ((writer.add_bos_token_id, vocab.bos_id), (writer.add_eos_token_id, vocab.eos_id),
                          (writer.add_unk_token_id, vocab.unk_id), (writer.add_pad_token_id, vocab.pad_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
