"""HF <-> GGUF conversion and re-quantization on tiny random models (tools/make_tiny_model.py)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType as VT
from safetensors import safe_open

import engine
from engine.convert import convert_gguf_to_hf, convert_hf_to_gguf, quantize_gguf
from engine.weights.gguf import GGUFFile
from engine.weights.quant import GGMLType

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import VARIANTS, TinySpec, make_tiny_model  # noqa: E402

IDS = list(range(3, 67))  # 64 tokens of the 384-token tiny vocabulary
GGUF_TYPES = ("f32", "q8_0", "q4_0", "q4_1", "mixed")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), VARIANTS["gqa"], gguf_types=GGUF_TYPES)


@pytest.fixture(scope="module")
def tied_bf16(tmp_path_factory):
    """Tied embeddings, HF weights in bf16 spread over 3 shards."""
    return make_tiny_model(tmp_path_factory.mktemp("tied"), VARIANTS["tied"], gguf_types=("f32",),
                           hf_dtype="bf16", hf_shards=3)


def logits(path) -> np.ndarray:
    return engine.load(path).logits(IDS).astype(np.float64)


def rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def read_back(path) -> tuple[gguf.GGUFReader, dict]:
    reader = gguf.GGUFReader(path)
    fields = {key: field for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    return reader, fields


def tensor_bytes(reader: gguf.GGUFReader) -> dict[str, tuple[int, np.ndarray]]:
    return {t.name: (int(t.tensor_type), np.asarray(t.data).view(np.uint8).reshape(-1)) for t in reader.tensors}


# ------------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("source_type", ["q4_1", "mixed"])
def test_gguf_to_hf_to_gguf_keeps_the_logits(tiny, tmp_path, source_type):
    hf_dir, back = tmp_path / "hf", tmp_path / "back.gguf"
    convert_gguf_to_hf(tiny[source_type], hf_dir, dtype="f32", progress=False)
    convert_hf_to_gguf(hf_dir, back, "f32", progress=False)
    original = logits(tiny[source_type])
    # f32 holds the dequantized values exactly, so nothing but summation order could differ
    np.testing.assert_allclose(logits(hf_dir), original, rtol=0, atol=1e-5)
    np.testing.assert_allclose(logits(back), original, rtol=0, atol=1e-5)


def test_hf_to_f16_gguf_is_within_fp16_error(tiny, tmp_path):
    out = tmp_path / "f16.gguf"
    convert_hf_to_gguf(tiny["hf"], out, "f16", progress=False)
    error = rel_rms(logits(out), logits(tiny["hf"]))
    assert 0 < error < 3e-3  # measured 9.5e-4


def test_bf16_sharded_hf_to_bf16_gguf_is_exact_and_stays_tied(tied_bf16, tmp_path):
    out = tmp_path / "bf16.gguf"
    convert_hf_to_gguf(tied_bf16["hf"], out, "bf16", progress=False)
    model = GGUFFile(out)
    assert "output.weight" not in model.tensors
    assert model.tensors["token_embd.weight"].ggml_type == GGMLType.BF16
    assert np.array_equal(logits(out), logits(tied_bf16["hf"]))
    back = tmp_path / "hf"
    convert_gguf_to_hf(out, back, dtype="bf16", progress=False)
    config = json.loads((back / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "bfloat16"
    assert np.array_equal(logits(back), logits(tied_bf16["hf"]))


@pytest.mark.parametrize("type_name", ["q8_0", "q4_0", "q4_1"])
def test_quantized_tensors_equal_gguf_py_quantize(tiny, tmp_path, type_name):
    """make_tiny_model writes its GGUFs with gguf.quants.quantize on the permuted HF weights."""
    out = tmp_path / f"{type_name}.gguf"
    convert_hf_to_gguf(tiny["hf"], out, type_name, progress=False)
    ours = tensor_bytes(gguf.GGUFReader(out))
    reference = tensor_bytes(gguf.GGUFReader(tiny[type_name]))
    head_reference = tensor_bytes(gguf.GGUFReader(tiny["q8_0"]))["output.weight"]
    assert ours.keys() == reference.keys()
    for name, (qtype, data) in ours.items():
        expected = head_reference if name == "output.weight" else reference[name]  # 4-bit: head stays Q8_0
        assert qtype == expected[0], name
        assert np.array_equal(data, expected[1]), name


@pytest.fixture(scope="module")
def kquant(tmp_path_factory):
    """d_model 256, ffn 512, 2 layers: every weight can be a K-quant."""
    return make_tiny_model(tmp_path_factory.mktemp("kq"), VARIANTS["kquant"], gguf_types=("f32",))


# relative RMS of the logits vs F32 (~1.5x what is measured: this random model amplifies weight error, Q8_0
# gives 0.022, Q4_0 0.34), and the types of (attn_q, attn_v of layers 0 and 1, ffn_down of 1, output)
K_FILE_TYPES = {
    "q6_k": (0.11, ("Q6_K", "Q6_K", "Q6_K", "Q6_K", "Q6_K")),
    "q5_k_m": (0.22, ("Q5_K", "Q5_K", "Q6_K", "Q6_K", "Q6_K")),  # use_more_bits(i, 2): layer 1 only
    "q5_k_s": (0.22, ("Q5_K", "Q5_K", "Q5_K", "Q5_K", "Q6_K")),
    "q4_k_m": (0.42, ("Q4_K", "Q4_K", "Q6_K", "Q6_K", "Q6_K")),
    "q4_k_s": (0.42, ("Q4_K", "Q5_K", "Q5_K", "Q4_K", "Q6_K")),  # attn_v of layers < 4 Q5_K; 2 // 8 = 0 ffn_down
}


@pytest.mark.parametrize("type_name", list(K_FILE_TYPES))
def test_k_quant_files_run_close_to_f32_and_both_routes_agree(kquant, tmp_path, type_name):
    tolerance, expected = K_FILE_TYPES[type_name]
    from_hf, from_gguf = tmp_path / "hf.gguf", tmp_path / "gguf.gguf"
    stats = convert_hf_to_gguf(kquant["hf"], from_hf, type_name, progress=False)
    quantize_gguf(kquant["f32"], from_gguf, type_name, progress=False)
    model = GGUFFile(from_hf)
    names = ("blk.0.attn_q", "blk.0.attn_v", "blk.1.attn_v", "blk.1.ffn_down", "output")
    assert tuple(model.tensors[f"{n}.weight"].ggml_type.name for n in names) == expected
    ours, other = tensor_bytes(gguf.GGUFReader(from_hf)), tensor_bytes(gguf.GGUFReader(from_gguf))
    assert all(np.array_equal(ours[name][1], other[name][1]) for name in ours)  # permuted rows encode alike
    reference = logits(kquant["f32"])
    assert 0 < rel_rms(logits(from_hf), reference) < tolerance
    assert 4 < stats.bits_per_weight < 8


def test_written_gguf_reads_back_with_gguf_py(tiny, tmp_path):
    out = tmp_path / "f16.gguf"
    convert_hf_to_gguf(tiny["hf"], out, "f16", progress=False)
    reader, fields = read_back(out)
    _, source_fields = read_back(tiny["f32"])
    spec = TinySpec()
    expected_scalars = {
        "general.architecture": (VT.STRING, "llama"), "general.file_type": (VT.UINT32, 1),
        "llama.block_count": (VT.UINT32, spec.n_layers), "llama.context_length": (VT.UINT32, spec.context_length),
        "llama.embedding_length": (VT.UINT32, spec.d_model), "llama.feed_forward_length": (VT.UINT32, spec.ffn_dim),
        "llama.attention.head_count": (VT.UINT32, spec.n_heads),
        "llama.attention.head_count_kv": (VT.UINT32, spec.n_kv_heads),
        "llama.rope.dimension_count": (VT.UINT32, spec.head_dim), "llama.vocab_size": (VT.UINT32, spec.vocab_size),
        "llama.rope.freq_base": (VT.FLOAT32, spec.rope_theta),
        "llama.attention.layer_norm_rms_epsilon": (VT.FLOAT32, np.float32(spec.norm_eps)),
        "tokenizer.ggml.model": (VT.STRING, "gpt2"), "tokenizer.ggml.pre": (VT.STRING, "gpt2"),
        "tokenizer.ggml.add_bos_token": (VT.BOOL, False),
    }
    for key, (vtype, value) in expected_scalars.items():
        assert fields[key].types == [vtype] and fields[key].contents() == value, key
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.chat_template"):
        assert fields[key].types == source_fields[key].types, key
        assert fields[key].contents() == source_fields[key].contents(), key
    source = engine.load(tiny["hf"]).loaded.weights
    assert len(reader.tensors) == len(source)
    for t in reader.tensors:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(t.shape[::-1])
        short = t.name.removesuffix(".weight")
        expected = source[short].dequantize()
        if short.endswith(("attn_q", "attn_k")):
            heads = spec.n_heads if short.endswith("attn_q") else spec.n_kv_heads
            expected = expected.reshape(heads, 2, -1, spec.d_model).swapaxes(1, 2).reshape(expected.shape)
        if values.ndim == 1:  # norms stay F32
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(values, expected), t.name
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, t.name
            assert np.array_equal(values, expected.astype(np.float16).astype(np.float32)), t.name


def test_llama3_rope_becomes_rope_freqs(tiny, tmp_path):
    hf_dir = tmp_path / "hf"
    shutil.copytree(tiny["hf"], hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    (hf_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "llama3.gguf"
    convert_hf_to_gguf(hf_dir, out, "f32", progress=False)
    factors = GGUFFile(out).tensor("rope_freqs.weight")
    assert factors.shape == (TinySpec().head_dim // 2,) and factors[0] == 1.0 and factors[-1] == 8.0
    np.testing.assert_allclose(logits(out), logits(hf_dir), rtol=0, atol=1e-5)
    assert not np.allclose(logits(out), logits(tiny["hf"]), atol=1e-3)  # the scaling does change the numbers
    with pytest.raises(engine.ModelFormatError, match="rope_freqs"):
        convert_gguf_to_hf(out, tmp_path / "back", progress=False)


def test_linear_rope_scaling_round_trips(tiny, tmp_path):
    hf_dir = tmp_path / "hf"
    shutil.copytree(tiny["hf"], hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    (hf_dir / "config.json").write_text(json.dumps(config))
    convert_hf_to_gguf(hf_dir, tmp_path / "linear.gguf", "f32", progress=False)
    _, fields = read_back(tmp_path / "linear.gguf")
    assert fields["llama.rope.scaling.type"].contents() == "linear"
    assert fields["llama.rope.scaling.factor"].contents() == 4.0
    convert_gguf_to_hf(tmp_path / "linear.gguf", tmp_path / "back", progress=False)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["rope_scaling"] == config["rope_scaling"]
    np.testing.assert_allclose(logits(tmp_path / "back"), logits(hf_dir), rtol=0, atol=1e-5)


def test_end_of_turn_tokens_become_generation_stops(tiny, tmp_path):
    """A GGUF naming an eot token (as Llama 3's does) lists it among the HF eos ids."""
    source = gguf.GGUFReader(tiny["f32"])
    with_eot = tmp_path / "eot.gguf"
    writer = gguf.GGUFWriter(with_eot, "llama")
    for key, field in source.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            element_type = field.types[-1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=element_type)
    writer.add_eot_token_id(1)
    for t in source.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_shape=t.shape[::-1], raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    convert_gguf_to_hf(with_eot, tmp_path / "hf", progress=False)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": [2, 1]}
    assert 1 in engine.load(tmp_path / "hf").tokenizer.stop_ids  # <|im_start|> stops only as the eot token


def test_what_gguf_cannot_hold_is_reported(tiny, tmp_path):
    hf_dir = tmp_path / "hf"
    shutil.copytree(tiny["hf"], hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (hf_dir / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {"type": "NFC"}
    (hf_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    warnings = []
    convert_hf_to_gguf(hf_dir, tmp_path / "m.gguf", "f32", progress=False, on_warning=warnings.append)
    assert len(warnings) == 2 and "NFC normalizer" in warnings[0] and "dynamic-NTK" in warnings[1]
    assert not any(key.startswith("llama.rope.scaling") for key in GGUFFile(tmp_path / "m.gguf").metadata)


def test_exported_folder_layout(tiny, tmp_path):
    out = tmp_path / "hf"
    convert_gguf_to_hf(tiny["q8_0"], out, dtype="bf16", progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert not list(tmp_path.glob(".*partial*"))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["rms_norm_eps"] == 1e-5
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["bos_token"] == "<|im_start|>" and tokenizer_config["eos_token"] == "<|im_end|>"
    assert tokenizer_config["add_bos_token"] is False and "im_start" in tokenizer_config["chat_template"]
    with safe_open(out / "model.safetensors", "np") as f:
        names = set(f.keys())
    assert "lm_head.weight" in names and "model.layers.1.self_attn.q_proj.weight" in names and len(names) == 21


# ------------------------------------------------------------------------------------------ quantize

def test_quantize_copies_metadata_with_types_and_requantizes(tiny, tmp_path):
    out = tmp_path / "q4_0.gguf"
    stats = quantize_gguf(tiny["f32"], out, "q4_0", progress=False)
    assert stats.n_tensors == 21 and stats.bytes_out < stats.bytes_in
    reader, fields = read_back(out)
    source_reader, source_fields = read_back(tiny["f32"])
    assert fields.keys() == source_fields.keys()
    for key, field in fields.items():
        if key != "general.file_type":
            assert field.types == source_fields[key].types and field.contents() == source_fields[key].contents(), key
    assert fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert [t.name for t in reader.tensors] == [t.name for t in source_reader.tensors]
    for ours, theirs in zip(reader.tensors, source_reader.tensors):
        values = np.asarray(theirs.data).reshape(theirs.shape[::-1])
        if values.ndim == 1:
            expected_type = gguf.GGMLQuantizationType.F32
        elif ours.name == "output.weight":
            expected_type = gguf.GGMLQuantizationType.Q8_0
        else:
            expected_type = gguf.GGMLQuantizationType.Q4_0
        assert ours.tensor_type == expected_type, ours.name
        assert np.array_equal(np.asarray(ours.data).view(np.uint8).reshape(-1),
                              gguf.quants.quantize(values, expected_type).view(np.uint8).reshape(-1)), ours.name


def test_quantize_to_the_same_type_copies_bytes(tiny, tmp_path):
    out = tmp_path / "same.gguf"
    quantize_gguf(tiny["q4_1"], out, "q4_1", progress=False)
    ours, source = tensor_bytes(gguf.GGUFReader(out)), tensor_bytes(gguf.GGUFReader(tiny["q4_1"]))
    assert all(np.array_equal(ours[name][1], source[name][1]) for name in source if name != "output.weight")
    np.testing.assert_allclose(logits(out), logits(tiny["q4_1"]), rtol=0, atol=0.05)


def test_quantize_any_architecture_keeps_key_types_and_ragged_tensors(tmp_path):
    """1-D -> F32, rows of 48 stay as they are, rows of 64 are quantized; every key keeps its GGUF type."""
    source = tmp_path / "toy.gguf"
    writer = gguf.GGUFWriter(source, "toy")
    writer.add_uint32("toy.answer", 42)
    writer.add_int64("toy.big", -2 ** 40)
    writer.add_float64("toy.pi", 3.141592653589793)
    writer.add_uint16("toy.small", 7)
    writer.add_array("toy.flags", [True, False, True])
    writer.add_key_value("toy.int8s", [1, -2, 3], VT.ARRAY, sub_type=VT.INT8)
    writer.add_key_value("toy.doubles", [0.1, 0.2], VT.ARRAY, sub_type=VT.FLOAT64)
    rng = np.random.default_rng(0)
    writer.add_tensor("ragged.weight", rng.normal(size=(4, 48)).astype(np.float32))
    writer.add_tensor("square.weight", rng.normal(size=(4, 64)).astype(np.float32))
    writer.add_tensor("norm.weight", rng.normal(size=(48,)).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "toy-q8_0.gguf"
    quantize_gguf(source, out, "q8_0", progress=False)
    result, original = GGUFFile(out), GGUFFile(source)
    assert {name: info.ggml_type for name, info in result.tensors.items()} == {
        "ragged.weight": GGMLType.F32, "square.weight": GGMLType.Q8_0, "norm.weight": GGMLType.F32}
    assert np.array_equal(result.tensor("norm.weight"), original.tensor("norm.weight"))
    assert np.array_equal(result.tensor("ragged.weight"), original.tensor("ragged.weight"))
    _, fields = read_back(out)
    _, source_fields = read_back(source)
    assert fields.keys() == source_fields.keys() | {"general.file_type", "general.quantization_version"}
    for key, field in source_fields.items():
        assert fields[key].types == field.types and fields[key].contents() == field.contents(), key
