"""File types and their per-tensor mixtures: llama-quantize's choices (src/llama-quant.cpp, no imatrix).

The expected layer sets are written out by hand from llama.cpp's rules; tools/check_llama_quantize.py
compares whole files against llama-quantize itself.
"""
from __future__ import annotations

import random

import pytest

from engine.convert.mixture import FILE_TYPES, file_type_from_name, is_llama_70b, tensor_types
from engine.errors import ConfigError
from engine.weights.quant import GGMLType as T

F32 = T.F32
# use_more_bits(i, 32): the first and last 4 layers and every third layer from 6 on
MORE_BITS_32 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}


def listing(n_layers: int, d: int, ffn: int, kv: int, vocab: int = 1000, tied: bool = False):
    """(name, shape, source type) of a Llama model's tensors in GGUF file order."""
    tensors = [("token_embd.weight", (vocab, d), F32)]
    for i in range(n_layers):
        tensors += [(f"blk.{i}.attn_norm.weight", (d,), F32), (f"blk.{i}.attn_q.weight", (d, d), F32),
                    (f"blk.{i}.attn_k.weight", (kv, d), F32), (f"blk.{i}.attn_v.weight", (kv, d), F32),
                    (f"blk.{i}.attn_output.weight", (d, d), F32), (f"blk.{i}.ffn_norm.weight", (d,), F32),
                    (f"blk.{i}.ffn_gate.weight", (ffn, d), F32), (f"blk.{i}.ffn_up.weight", (ffn, d), F32),
                    (f"blk.{i}.ffn_down.weight", (d, ffn), F32)]
    tensors.append(("output_norm.weight", (d,), F32))
    if not tied:
        tensors.append(("output.weight", (vocab, d), F32))
    return tensors


def plan(tensors, name: str, n_layers: int, llama_70b: bool = False):
    return tensor_types(tensors, file_type_from_name(name), n_layers, llama_70b)


def per_layer(types, kind: str, n_layers: int):
    return [types[f"blk.{i}.{kind}.weight"] for i in range(n_layers)]


@pytest.mark.parametrize("name,base", [("q4_k_m", T.Q4_K), ("q5_k_m", T.Q5_K)])
def test_k_m_gives_attn_v_and_ffn_down_q6_k_where_llama_cpp_does(name, base):
    types = plan(listing(32, 4096, 14336, 1024), name, 32)
    expected = [T.Q6_K if i in MORE_BITS_32 else base for i in range(32)]
    assert per_layer(types, "attn_v", 32) == expected
    assert per_layer(types, "ffn_down", 32) == expected
    for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert set(per_layer(types, kind, 32)) == {base}, kind
    assert types["output.weight"] == T.Q6_K
    assert types["token_embd.weight"] == base  # untied: the embedding is not the head
    assert types["blk.7.attn_norm.weight"] == types["output_norm.weight"] == F32


def test_q4_k_s_gives_q5_k_to_the_first_layers():
    types = plan(listing(32, 4096, 14336, 1024), "q4_k_s", 32)
    assert per_layer(types, "attn_v", 32) == [T.Q5_K] * 4 + [T.Q4_K] * 28
    assert per_layer(types, "ffn_down", 32) == [T.Q5_K] * 4 + [T.Q4_K] * 28  # the first eighth
    assert types["output.weight"] == T.Q6_K


def test_q5_k_s_q6_k_and_legacy_types():
    tensors = listing(16, 2048, 8192, 512, tied=True)
    q5_k_s = plan(tensors, "q5_k_s", 16)
    assert {t for name, t in q5_k_s.items() if name != "token_embd.weight" and "norm" not in name} == {T.Q5_K}
    assert q5_k_s["token_embd.weight"] == T.Q6_K  # tied: the embedding is the head
    assert set(plan(tensors, "q6_k", 16).values()) == {T.Q6_K, F32}
    assert plan(tensors, "q8_0", 16)["token_embd.weight"] == T.Q8_0  # Q8_0 keeps its head
    q4_0 = plan(tensors, "q4_0", 16)
    assert q4_0["token_embd.weight"] == T.Q6_K and q4_0["blk.0.attn_v.weight"] == T.Q4_0
    f16 = plan(tensors, "f16", 16)
    assert {t for name, t in f16.items() if "norm" not in name} == {T.F16}


def test_smollm2_shapes_fall_back_as_llama_cpp():
    """hidden 576 is not a multiple of 256: Q4_K -> Q5_0, Q6_K -> Q8_0; ffn_down rows (1536) stay K-quants."""
    n = 30
    types = plan(listing(n, 576, 1536, 192, vocab=49152, tied=True), "q4_k_m", n)
    more_bits = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}  # use_more_bits(i, 30)
    assert types["token_embd.weight"] == T.Q8_0
    assert per_layer(types, "attn_v", n) == [T.Q8_0 if i in more_bits else T.Q5_0 for i in range(n)]
    assert per_layer(types, "ffn_down", n) == [T.Q6_K if i in more_bits else T.Q4_K for i in range(n)]
    assert set(per_layer(types, "attn_q", n)) == set(per_layer(types, "ffn_up", n)) == {T.Q5_0}
    q5 = plan(listing(n, 576, 1536, 192, tied=True), "q5_k_s", n)
    assert q5["blk.3.attn_q.weight"] == T.Q5_1 and q5["blk.3.ffn_down.weight"] == T.Q5_K


def test_rows_without_whole_blocks():
    tensors = [("a.weight", (4, 64), F32), ("b.weight", (4, 48), T.BF16), ("c.weight", (4, 48), T.F16)]
    types = plan(tensors, "q4_k_m", 1)
    assert types == {"a.weight": T.Q5_0, "b.weight": T.BF16, "c.weight": T.F16}  # 48: keeps its source type


def test_layers_count_in_numeric_order_whatever_the_listing_order():
    tensors = listing(32, 4096, 14336, 1024)
    shuffled = tensors[:]
    random.Random(0).shuffle(shuffled)
    assert plan(shuffled, "q4_k_m", 32) == plan(tensors, "q4_k_m", 32)


def test_llama_70b_attn_v_gets_q5_k():
    assert is_llama_70b("llama", 80, 64, 8) and not is_llama_70b("llama", 80, 64, 64)
    assert not is_llama_70b("qwen2", 80, 64, 8)
    types = plan(listing(80, 512, 1024, 128), "q4_k_m", 80, llama_70b=True)
    attn_v = per_layer(types, "attn_v", 80)
    assert attn_v[10] == T.Q5_K and attn_v[0] == attn_v[12] == T.Q6_K  # 12 = 10 + 2: use_more_bits
    assert per_layer(types, "ffn_down", 80)[10] == T.Q4_K


def test_file_type_names():
    assert file_type_from_name("Q4_K_M") is FILE_TYPES["q4_k_m"]
    assert int(FILE_TYPES["q4_k_m"].ftype) == 15 and int(FILE_TYPES["q6_k"].ftype) == 18  # llama_ftype numbers
    with pytest.raises(ConfigError, match="unknown file type 'q3_k_m'"):
        file_type_from_name("q3_k_m")
