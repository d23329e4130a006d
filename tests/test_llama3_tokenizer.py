"""Llama 3's tokenizer family on a tiny faithful tokenizer (tools/golden_llama3_tokenizer.py): the llama-bpe
pre-tokenizer, BOS added by tokenizer.json's post-processor, Meta-Llama-3-Instruct's chat template (which writes
BOS itself) and <|eot_id|> ending a turn — against HF transformers' ids, from the HF folder and from the GGUF
`engine convert` writes, on the tiny llama3 model (llama3 RoPE scaling)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

import engine
from engine.convert import convert_hf_to_gguf
from engine.weights.gguf import GGUFFile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import VARIANTS, make_tiny_model  # noqa: E402

FOLDER = Path(__file__).parent / "golden" / "llama3_tokenizer"
GOLDEN = json.loads((FOLDER / "golden.json").read_text())


@pytest.fixture(scope="module")
def llama3_models(tmp_path_factory):
    """{"hf": the tiny llama3 model with the Llama-3-style tokenizer files, "gguf": engine convert's GGUF of it}."""
    root = tmp_path_factory.mktemp("llama3tok")
    hf = make_tiny_model(root, VARIANTS["llama3"], gguf_types=())["hf"]
    (hf / "tokenizer_config.json").unlink()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FOLDER / name, hf / name)
    convert_hf_to_gguf(hf, root / "llama3.gguf", "f32", progress=False)
    return {"hf": hf, "gguf": root / "llama3.gguf"}


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_text_and_chat_ids_equal_transformers(llama3_models, source):
    llm = engine.load(llama3_models[source], context=64)
    for text, want in zip(GOLDEN["texts"], GOLDEN["ids"]):
        assert llm.tokenize(text) == want, text
    for conversation, want in zip(GOLDEN["conversations"], GOLDEN["chat_ids"]):
        got = llm.chat_ids(conversation)
        assert got == want
        assert got.count(llm.tokenizer.bos_id) == 1  # the template's BOS only, no second one


def test_gguf_names_the_llama_bpe_family_and_eot_ends_a_turn(llama3_models):
    metadata = GGUFFile(llama3_models["gguf"]).metadata
    assert metadata["tokenizer.ggml.pre"] == "llama-bpe"
    assert metadata["tokenizer.ggml.add_bos_token"] is True
    for source in ("hf", "gguf"):
        tokenizer = engine.load(llama3_models[source], context=64).tokenizer
        eot = tokenizer.encode("<|eot_id|>", add_bos=False)
        assert len(eot) == 1 and eot[0] in tokenizer.stop_ids, source
