"""tools/make_tiny_model.py writes consistent tiny models: GGUF (every type) and HF safetensors agree."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import GGUF_TYPES, SPECIAL_TOKENS, TRAINING_TEXT, VARIANTS, TinySpec, make_tiny_model  # noqa: E402

ALL_TYPES = tuple(GGUF_TYPES)
HF_LAYER_NAMES = {  # GGUF short name -> HF module
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# relative RMS error of a dequantized tensor vs its f32 source, per type (format allows: f16 ~3e-4,
# bf16 ~2e-3, q8_0 ~6e-3, 4-bit formats ~0.08-0.1, q6_k ~0.02)
REL_RMS_TOLERANCE = {QType.F16: 1e-3, QType.BF16: 5e-3, QType.Q8_0: 1e-2, QType.Q4_0: 0.15, QType.Q4_1: 0.12,
                     QType.Q4_K: 0.12, QType.Q6_K: 0.03}


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("gqa"), VARIANTS["gqa"], gguf_types=ALL_TYPES)


@pytest.fixture(scope="module")
def kquant(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("kquant"), VARIANTS["kquant"], gguf_types=ALL_TYPES)


def hf_name(gguf_name: str) -> str:
    base = gguf_name.removesuffix(".weight")
    if base.startswith("blk."):
        _, layer, short = base.split(".")
        return f"model.layers.{layer}.{HF_LAYER_NAMES[short]}.weight"
    return {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}[base] + ".weight"


def read_gguf(path: Path) -> tuple[gguf.GGUFReader, dict]:
    reader = gguf.GGUFReader(path)
    metadata = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    return reader, metadata


def gguf_tensor_f32(tensor) -> np.ndarray:
    """Dequantized (out, in) float32 array of a GGUF tensor."""
    return gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(tensor.shape[::-1])


def load_hf(hf_dir: Path) -> dict[str, np.ndarray]:
    with safe_open(str(hf_dir / "model.safetensors"), framework="numpy") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K permutation: adjacent rows (2i, 2i+1) -> rotate-half rows (i, i+hd/2)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def expected_tensor_names(spec: TinySpec) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not spec.tied else set())
    for i in range(spec.n_layers):
        names |= {f"blk.{i}.{short}.weight" for short in HF_LAYER_NAMES}
    return names


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_gguf_metadata_and_tensor_names_describe_the_spec(gqa, type_name):
    spec = VARIANTS["gqa"]
    reader, md = read_gguf(gqa[type_name])
    assert md["general.architecture"] == "llama"
    assert md["general.file_type"] == int(GGUF_TYPES[type_name][1])
    expected = {
        "llama.context_length": spec.context_length, "llama.embedding_length": spec.d_model,
        "llama.block_count": spec.n_layers, "llama.feed_forward_length": spec.ffn_dim,
        "llama.attention.head_count": spec.n_heads, "llama.attention.head_count_kv": spec.n_kv_heads,
        "llama.rope.dimension_count": spec.head_dim, "llama.vocab_size": spec.vocab_size,
    }
    assert {key: md[key] for key in expected} == expected
    assert md["llama.rope.freq_base"] == pytest.approx(spec.rope_theta)
    assert md["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(spec.norm_eps)
    assert {t.name for t in reader.tensors} == expected_tensor_names(spec)
    for t in reader.tensors:
        assert t.data.size > 0
        if len(t.shape) == 1:
            assert t.tensor_type == QType.F32, f"{t.name} is 1-D and must stay F32"


@pytest.mark.parametrize("type_name,expected", [
    ("f32", QType.F32), ("f16", QType.F16), ("bf16", QType.BF16), ("q8_0", QType.Q8_0), ("q4_0", QType.Q4_0),
    ("q4_1", QType.Q4_1), ("q4_k", QType.Q4_K), ("q6_k", QType.Q6_K),
])
def test_two_d_weights_get_the_requested_type_with_k_quant_fallback(gqa, kquant, type_name, expected):
    # default spec: rows of 64/96 values cannot hold a 256-wide K-quant super-block -> Q8_0
    small_expected = QType.Q8_0 if expected in (QType.Q4_K, QType.Q6_K) else expected
    for paths, want in ((gqa, small_expected), (kquant, expected)):
        reader, _ = read_gguf(paths[type_name])
        types = {t.name: t.tensor_type for t in reader.tensors if len(t.shape) == 2}
        assert set(types.values()) == {want}, (paths[type_name], types)


def test_mixed_file_holds_every_type(kquant):
    expected = {"token_embd": QType.Q8_0, "attn_q": QType.Q4_K, "attn_k": QType.Q4_0, "attn_v": QType.Q6_K,
                "attn_output": QType.Q4_1, "ffn_gate": QType.F16, "ffn_up": QType.BF16, "ffn_down": QType.Q4_K,
                "output": QType.Q6_K, "attn_norm": QType.F32, "ffn_norm": QType.F32, "output_norm": QType.F32}
    reader, _ = read_gguf(kquant["mixed"])
    assert {t.name: t.tensor_type for t in reader.tensors} == \
        {t.name: expected[t.name.split(".")[-2]] for t in reader.tensors}


def test_f32_gguf_holds_the_hf_weights_with_qk_permuted(gqa):
    spec = VARIANTS["gqa"]
    reader, _ = read_gguf(gqa["f32"])
    hf = load_hf(gqa["hf"])
    assert set(hf) == {hf_name(t.name) for t in reader.tensors}
    for t in reader.tensors:
        w = gguf_tensor_f32(t)
        if t.name.endswith("attn_q.weight"):
            assert not np.array_equal(w, hf[hf_name(t.name)]), "Q must be permuted in GGUF"
            w = unpermute(w, spec.n_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute(w, spec.n_kv_heads)
        np.testing.assert_array_equal(w, hf[hf_name(t.name)], err_msg=t.name)


def _rope_rotate_half(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """HF convention on (n_head, hd): pairs (i, i + hd/2)."""
    hd = x.shape[-1]
    angle = pos * theta ** (-np.arange(0, hd, 2) / hd)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def _rope_adjacent_pairs(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """llama.cpp LLAMA_ROPE_TYPE_NORM on (n_head, hd): pairs (2i, 2i+1)."""
    hd = x.shape[-1]
    angle = pos * theta ** (-np.arange(0, hd, 2) / hd)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
    out[..., 1::2] = odd * np.cos(angle) + even * np.sin(angle)
    return out


@pytest.mark.parametrize("variant", ["gqa", "mha"])
def test_permuted_qk_with_adjacent_pair_rope_give_hf_attention_scores(tmp_path, variant):
    spec = VARIANTS[variant]
    paths = make_tiny_model(tmp_path, spec)
    reader, _ = read_gguf(paths["f32"])
    gg = {t.name: gguf_tensor_f32(t) for t in reader.tensors}
    hf = load_hf(paths["hf"])
    x = np.random.default_rng(1).normal(size=(2, spec.d_model))
    hd, group = spec.head_dim, spec.n_heads // spec.n_kv_heads
    for layer in range(spec.n_layers):
        def scores(wq, wk, rope):
            q = rope((wq @ x[0]).reshape(spec.n_heads, hd), 37, spec.rope_theta)
            k = rope((wk @ x[1]).reshape(spec.n_kv_heads, hd), 5, spec.rope_theta)
            return np.einsum("hd,hd->h", q, np.repeat(k, group, axis=0))
        p = f"model.layers.{layer}.self_attn."
        hf_scores = scores(hf[p + "q_proj.weight"], hf[p + "k_proj.weight"], _rope_rotate_half)
        gguf_scores = scores(gg[f"blk.{layer}.attn_q.weight"], gg[f"blk.{layer}.attn_k.weight"], _rope_adjacent_pairs)
        np.testing.assert_allclose(gguf_scores, hf_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("type_name", ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k", "mixed"])
@pytest.mark.parametrize("variant", ["gqa", "kquant"])
def test_quantized_tensors_dequantize_close_to_f32(gqa, kquant, variant, type_name):
    paths = {"gqa": gqa, "kquant": kquant}[variant]
    f32 = {t.name: gguf_tensor_f32(t) for t in read_gguf(paths["f32"])[0].tensors}
    for t in read_gguf(paths[type_name])[0].tensors:
        got, want = gguf_tensor_f32(t), f32[t.name]
        assert got.shape == want.shape
        if t.tensor_type == QType.F32:
            np.testing.assert_array_equal(got, want)
            continue
        rel_rms = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel_rms < REL_RMS_TOLERANCE[t.tensor_type], (t.name, t.tensor_type.name, rel_rms)
        assert rel_rms > 0


def test_tokenizer_json_and_gguf_vocab_agree(gqa):
    spec = VARIANTS["gqa"]
    tok_json = json.loads((gqa["hf"] / "tokenizer.json").read_text())
    vocab = dict(tok_json["model"]["vocab"]) | {t["content"]: t["id"] for t in tok_json["added_tokens"]}
    by_id = sorted(vocab, key=vocab.__getitem__)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    _, md = read_gguf(gqa["q4_0"])
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "gpt2"
    assert md["tokenizer.ggml.tokens"] == by_id
    assert [vocab[t] for t in by_id] == list(range(spec.vocab_size))
    assert md["tokenizer.ggml.merges"] == merges and len(merges) == spec.vocab_size - 256 - len(SPECIAL_TOKENS)
    control = [i for i, kind in enumerate(md["tokenizer.ggml.token_type"]) if kind == gguf.TokenType.CONTROL]
    assert [by_id[i] for i in control] == list(SPECIAL_TOKENS)
    assert set(md["tokenizer.ggml.token_type"]) == {gguf.TokenType.CONTROL, gguf.TokenType.NORMAL}
    assert tok_json["pre_tokenizer"]["type"] == "ByteLevel" and tok_json["pre_tokenizer"]["use_regex"]

    config = json.loads((gqa["hf"] / "tokenizer_config.json").read_text())
    assert md["tokenizer.chat_template"] == config["chat_template"]
    assert by_id[md["tokenizer.ggml.bos_token_id"]] == config["bos_token"] == "<|im_start|>"
    assert by_id[md["tokenizer.ggml.eos_token_id"]] == config["eos_token"] == "<|im_end|>"
    assert md["tokenizer.ggml.add_bos_token"] is False and config["add_bos_token"] is False


def test_tokenizer_merges_and_round_trips(gqa):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(gqa["hf"] / "tokenizer.json"))
    text = TRAINING_TEXT + " unseen wörds 日本 🚀 <|im_start|>user"
    ids = tokenizer.encode(text).ids
    assert len(ids) < 0.6 * len(text.encode())                 # merges do real work
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.encode("<|im_start|>user").ids[0] == SPECIAL_TOKENS.index("<|im_start|>")


def test_hf_config_matches_gguf_metadata(gqa):
    config = json.loads((gqa["hf"] / "config.json").read_text())
    _, md = read_gguf(gqa["f32"])
    assert config["architectures"] == ["LlamaForCausalLM"]
    pairs = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
             "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
             "num_key_value_heads": "attention.head_count_kv", "max_position_embeddings": "context_length",
             "vocab_size": "vocab_size", "rope_theta": "rope.freq_base",
             "rms_norm_eps": "attention.layer_norm_rms_epsilon"}
    for hf_key, gguf_key in pairs.items():
        assert config[hf_key] == pytest.approx(md[f"llama.{gguf_key}"]), hf_key
    assert config["tie_word_embeddings"] is False


def test_tied_variant_has_no_output_head(tmp_path):
    paths = make_tiny_model(tmp_path, VARIANTS["tied"], gguf_types=("f32", "q8_0"))
    for type_name in ("f32", "q8_0"):
        names = {t.name for t in read_gguf(paths[type_name])[0].tensors}
        assert "output.weight" not in names and "token_embd.weight" in names
    assert "lm_head.weight" not in load_hf(paths["hf"])
    assert json.loads((paths["hf"] / "config.json").read_text())["tie_word_embeddings"] is True


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    spec = TinySpec(n_layers=1)
    a = make_tiny_model(tmp_path / "a", spec, gguf_types=("q4_k",))
    b = make_tiny_model(tmp_path / "b", spec, gguf_types=("q4_k",))
    c = make_tiny_model(tmp_path / "c", TinySpec(n_layers=1, seed=1), gguf_types=("q4_k",))
    assert a["q4_k"].read_bytes() == b["q4_k"].read_bytes()
    assert (a["hf"] / "model.safetensors").read_bytes() == (b["hf"] / "model.safetensors").read_bytes()
    assert a["q4_k"].read_bytes() != c["q4_k"].read_bytes()


def _read_bf16_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__")
    out = {}
    for name, info in header.items():
        assert info["dtype"] == "BF16"
        start, end = info["data_offsets"]
        bits = np.frombuffer(raw[8 + n + start:8 + n + end], dtype="<u2").reshape(info["shape"])
        out[name] = (bits.astype(np.uint32) << 16).view(np.float32)
    return out


def test_bf16_safetensors_hold_exactly_the_gguf_weights(tmp_path):
    spec = VARIANTS["gqa"]
    paths = make_tiny_model(tmp_path, spec, gguf_types=("f32", "bf16"), hf_dtype="bf16")
    with safe_open(str(paths["hf"] / "model.safetensors"), framework="numpy") as f:  # the library accepts the header
        assert len(list(f.keys())) == 9 * spec.n_layers + 3
    hf = _read_bf16_safetensors(paths["hf"] / "model.safetensors")
    assert json.loads((paths["hf"] / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for type_name in ("f32", "bf16"):
        for t in read_gguf(paths[type_name])[0].tensors:
            w = gguf_tensor_f32(t)
            if t.name.endswith("attn_q.weight"):
                w = unpermute(w, spec.n_heads)
            elif t.name.endswith("attn_k.weight"):
                w = unpermute(w, spec.n_kv_heads)
            np.testing.assert_array_equal(w, hf[hf_name(t.name)], err_msg=f"{type_name} {t.name}")


def test_sharded_safetensors_index_covers_every_tensor(tmp_path):
    paths = make_tiny_model(tmp_path, VARIANTS["gqa"], gguf_types=(), hf_shards=3)
    index = json.loads((paths["hf"] / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert not (paths["hf"] / "model.safetensors").exists()
    seen, total = {}, 0
    for name in files:
        with safe_open(str(paths["hf"] / name), framework="numpy") as f:
            for key in f.keys():
                seen[key] = name
                total += f.get_tensor(key).nbytes
    assert seen == index["weight_map"] and index["metadata"]["total_size"] == total
    assert len(seen) == 9 * VARIANTS["gqa"].n_layers + 3


def test_bad_requests_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown GGUF type"):
        make_tiny_model(tmp_path, gguf_types=("q5_0",))
    with pytest.raises(ValueError, match="n_kv_heads"):
        TinySpec(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        make_tiny_model(tmp_path, TinySpec(vocab_size=100_000))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None,
                    reason="optional cross-check with HF transformers")
def test_transformers_reads_the_gguf_as_the_same_model(gqa):
    """An independent GGUF reader (transformers: un-permutes Q/K, rebuilds the tokenizer) gets the HF model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "The keeper wrote 42 lines; café 🙂 <|im_start|>user\nhi<|im_end|>"
    hf_tok = AutoTokenizer.from_pretrained(gqa["hf"])
    gguf_tok = AutoTokenizer.from_pretrained(gqa["f32"].parent, gguf_file=gqa["f32"].name)
    ids = hf_tok(text)["input_ids"]
    assert gguf_tok(text)["input_ids"] == ids
    messages = [{"role": "user", "content": "hi"}]
    assert gguf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with torch.no_grad():
        x = torch.tensor([ids])
        hf_logits = AutoModelForCausalLM.from_pretrained(gqa["hf"], dtype=torch.float32)(x).logits[0].numpy()
        gguf_model = AutoModelForCausalLM.from_pretrained(gqa["f32"].parent, gguf_file=gqa["f32"].name,
                                                          dtype=torch.float32)
        gguf_logits = gguf_model(x).logits[0].numpy()
    assert 0.3 < hf_logits.std() < 3.0                          # random weights, O(1) logits
    np.testing.assert_allclose(gguf_logits, hf_logits, rtol=0, atol=1e-5 * np.abs(hf_logits).max())
