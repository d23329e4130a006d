"""File types (llama.cpp's ``llama_ftype``) and the type each tensor is written as under one.

A file type names a base tensor type; for the quantized ones the tensors that matter most get more
bits, as llama-quantize chooses without an importance matrix (src/llama-quant.cpp,
``llama_tensor_get_type``):

    output head    ``output.weight`` (``token_embd.weight`` when the head is tied to it): Q6_K, or
                   Q8_0 when its rows are not whole blocks of the base type, and Q8_0 under q8_0
    attn_v         q4_k_m / q5_k_m: Q6_K in the layers where ``use_more_bits`` holds (the first and
                   last eighth of the layers and every third one between); q4_k_s: Q5_K in the first 4
    ffn_down       q4_k_m / q5_k_m: Q6_K where ``use_more_bits``; q4_k_s: Q5_K in the first eighth
    Llama-70B      (80 layers, grouped-query attention): an attn_v chosen Q4_K becomes Q5_K

Layer indices count the attn_v (resp. ffn_down) tensors in layer order; ``use_more_bits`` takes the
number of attn_v tensors, resp. of layers. A type whose block does not divide the rows falls back as
llama.cpp falls back: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (so SmolLM2-135M, hidden size 576,
gets mostly Q5_0 under q4_k_m). Two deliberate differences: 1-D tensors are always F32 (llama.cpp
keeps their stored type), and a tensor whose rows are not even whole 32-blocks keeps its source
type (lossless) where llama.cpp writes F16.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import gguf

from ..errors import ConfigError
from ..weights.quant import GGMLType, block_layout

LFT = gguf.LlamaFileType


@dataclass(frozen=True)
class FileType:
    name: str  # as on the command line (llama-quantize's name, lower case)
    ftype: gguf.LlamaFileType  # general.file_type
    base: GGMLType  # the type of a tensor the mixture does not single out


FILE_TYPES: dict[str, FileType] = {ft.name: ft for ft in (
    FileType("f32", LFT.ALL_F32, GGMLType.F32),
    FileType("f16", LFT.MOSTLY_F16, GGMLType.F16),
    FileType("bf16", LFT.MOSTLY_BF16, GGMLType.BF16),
    FileType("q8_0", LFT.MOSTLY_Q8_0, GGMLType.Q8_0),
    FileType("q6_k", LFT.MOSTLY_Q6_K, GGMLType.Q6_K),
    FileType("q5_k_m", LFT.MOSTLY_Q5_K_M, GGMLType.Q5_K),
    FileType("q5_k_s", LFT.MOSTLY_Q5_K_S, GGMLType.Q5_K),
    FileType("q5_1", LFT.MOSTLY_Q5_1, GGMLType.Q5_1),
    FileType("q5_0", LFT.MOSTLY_Q5_0, GGMLType.Q5_0),
    FileType("q4_k_m", LFT.MOSTLY_Q4_K_M, GGMLType.Q4_K),
    FileType("q4_k_s", LFT.MOSTLY_Q4_K_S, GGMLType.Q4_K),
    FileType("q4_1", LFT.MOSTLY_Q4_1, GGMLType.Q4_1),
    FileType("q4_0", LFT.MOSTLY_Q4_0, GGMLType.Q4_0),
)}
FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
FALLBACKS = {GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q6_K: GGMLType.Q8_0}
_LAYER = re.compile(r"blk\.(\d+)\.")


def file_type_from_name(name: str) -> FileType:
    ft = FILE_TYPES.get(name.lower())
    if ft is None:
        raise ConfigError(f"unknown file type {name!r} (choose from {', '.join(FILE_TYPES)})")
    return ft


def is_llama_70b(arch: str, n_layers: int, n_heads: int, n_kv_heads: int) -> bool:
    """llama.cpp's LLM_TYPE_70B as llama-quantize infers it (the one model size its mixtures consult)."""
    return arch == "llama" and n_layers == 80 and n_heads != n_kv_heads


def tensor_types(tensors: Sequence[tuple[str, tuple[int, ...], GGMLType]], file_type: FileType, n_layers: int,
                 llama_70b: bool = False) -> dict[str, GGMLType]:
    """(GGUF name, numpy shape, source type) of every tensor -> the type each is written as."""
    tied = not any(name == "output.weight" for name, _, _ in tensors)
    in_layer_order = sorted(tensors, key=lambda t: (_layer(t[0]), t[0]))  # llama-quantize's order
    attn_v = {name: i for i, name in enumerate(n for n, _, _ in in_layer_order if _is_attn_v(n))}  # name -> index
    ffn_down = {name: i for i, name in enumerate(n for n, _, _ in in_layer_order if "ffn_down" in n)}
    types = {}
    for name, shape, source in tensors:
        if len(shape) < 2:
            types[name] = GGMLType.F32
            continue
        t = file_type.base
        if t not in FLOAT_TYPES:
            if name == "output.weight" or (tied and _is_token_embd(name)):
                t = _head_type(file_type.base, shape[-1])
            elif _is_attn_v(name):
                t = _attn_v_type(file_type, attn_v[name], len(attn_v), llama_70b)
            elif name in ffn_down:
                t = _ffn_down_type(file_type, ffn_down[name], n_layers)
            t = _fallback(t, shape[-1])
        types[name] = t if shape[-1] % block_layout(t)[0] == 0 else source
    return types


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _head_type(base: GGMLType, n_cols: int) -> GGMLType:
    if n_cols % block_layout(base)[0]:
        return GGMLType.Q8_0
    return base if base == GGMLType.Q8_0 else GGMLType.Q6_K


def _attn_v_type(ft: FileType, i: int, n: int, llama_70b: bool) -> GGMLType:
    t = ft.base
    if ft.name in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n):
        t = GGMLType.Q6_K
    elif ft.name == "q4_k_s" and i < 4:
        t = GGMLType.Q5_K
    if llama_70b and t == GGMLType.Q4_K:
        t = GGMLType.Q5_K
    return t


def _ffn_down_type(ft: FileType, i: int, n_layers: int) -> GGMLType:
    if ft.name in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n_layers):
        return GGMLType.Q6_K
    if ft.name == "q4_k_s" and i < n_layers // 8:
        return GGMLType.Q5_K
    return ft.base


def _fallback(t: GGMLType, n_cols: int) -> GGMLType:
    """llama.cpp's tensor_type_fallback, minus its last resort (F16: the caller keeps the source type)."""
    if n_cols % block_layout(t)[0]:
        return FALLBACKS.get(t, t)
    return t


def _layer(name: str) -> int:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else -1


def _is_attn_v(name: str) -> bool:
    return any(part in name for part in ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight"))


def _is_token_embd(name: str) -> bool:
    return name in ("token_embd.weight", "per_layer_token_embd.weight")
