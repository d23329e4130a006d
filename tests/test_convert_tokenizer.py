"""Tokenizers through conversion: tokenizer.ggml.pre detection, SentencePiece vocabularies, the
exported tokenizer.json, and transformers loading the exported folder."""
from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece

import engine
from engine.convert import convert_gguf_to_hf, convert_hf_to_gguf
from engine.errors import TokenizerError
from engine.tokenizer import tokenizer_from_gguf, tokenizer_from_hf
from engine.tokenizer.pretokenize import FAMILIES, byte_level_pre_tokenizer
from engine.tokenizer.to_gguf import PRE_CANDIDATES, PROBE_TEXT
from engine.weights.gguf import GGUFFile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TRAINING_TEXT, VARIANTS, make_tiny_model  # noqa: E402

TEXTS = [
    "The lighthouse keeper wrote in his log every evening: wind from the north-west.",
    "In the spring of 1887 a storm broke the lower window; the repair cost 14 shillings and 6 pence.",
    "I'M SURE THEY'LL SAY IT'S FINE. We've been waiting, you'd say.",
    "Whitespace:   three spaces,\ttabs\t\tand\n\nnewlines  \n end",
    "Ünïcödé café, naïve, Ελληνικά, русский язык, 日本語のテキスト, 🙂 🚀 ½ ٤٢",
    "def fibonacci(n: int) -> list[int]:\n    values = [0, 1]\n    return values[:n]",
]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {  # tokenizer.json pre_tokenizer -> (model.ignore_merges, expected tokenizer.ggml.pre)
    "gpt2": (BYTE_LEVEL, False, "gpt2"),
    "smollm": ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]},
               False, "smollm"),
    "llama3": ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {**BYTE_LEVEL, "use_regex": False}]}, True, "llama-bpe"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), VARIANTS["gqa"], gguf_types=("q8_0",))


def hf_variant(tiny, folder: Path, pre_tokenizer: dict, ignore_merges: bool) -> Path:
    shutil.copytree(tiny["hf"], folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = pre_tokenizer
    data["model"]["ignore_merges"] = ignore_merges
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


def gguf_metadata(path) -> dict:
    return GGUFFile(path).metadata


@pytest.mark.parametrize("variant", list(PRE_TOKENIZERS))
def test_pre_tokenizer_is_detected_and_tokenizes_the_same(tiny, tmp_path, variant):
    pre_tokenizer, ignore_merges, expected = PRE_TOKENIZERS[variant]
    hf_dir = hf_variant(tiny, tmp_path / "hf", pre_tokenizer, ignore_merges)
    out = tmp_path / "out.gguf"
    convert_hf_to_gguf(hf_dir, out, "f32", progress=False)
    metadata = gguf_metadata(out)
    assert metadata["tokenizer.ggml.pre"] == expected
    hf_tokenizer, gguf_tokenizer = tokenizer_from_hf(hf_dir), tokenizer_from_gguf(metadata)
    for text in TEXTS:
        assert gguf_tokenizer.encode(text) == hf_tokenizer.encode(text), text


def test_probe_text_tells_every_candidate_family_apart():
    """Else detection could name a family that splits some other text differently."""
    splits = {}
    for name in PRE_CANDIDATES:
        pieces = tuple(p for p, _ in byte_level_pre_tokenizer(FAMILIES[name]).pre_tokenize_str(PROBE_TEXT))
        splits.setdefault((pieces, FAMILIES[name].ignore_merges), []).append(name)
    assert sorted(splits.values()) == sorted([name] for name in PRE_CANDIDATES)


def test_unknown_pre_tokenizer_is_an_error_unless_chosen(tiny, tmp_path):
    hf_dir = hf_variant(tiny, tmp_path / "hf", {"type": "Whitespace"}, False)
    with pytest.raises(TokenizerError, match="matches none of the known tokenizer.ggml.pre families.*--pre NAME"):
        convert_hf_to_gguf(hf_dir, tmp_path / "out.gguf", progress=False)
    assert not (tmp_path / "out.gguf").exists()
    convert_hf_to_gguf(hf_dir, tmp_path / "out.gguf", "f32", pre="gpt2", progress=False)
    assert gguf_metadata(tmp_path / "out.gguf")["tokenizer.ggml.pre"] == "gpt2"
    with pytest.raises(TokenizerError, match="unknown tokenizer.ggml.pre 'nonsense'"):
        convert_hf_to_gguf(hf_dir, tmp_path / "again.gguf", "f32", pre="nonsense", progress=False)


# ------------------------------------------------------------------------------------------ SentencePiece

@pytest.fixture(scope="module")
def spm_hf(tiny, tmp_path_factory) -> Path:
    """The tiny model with a 380-piece SentencePiece BPE tokenizer (byte fallback, a user-defined
    piece, Llama-style: no whitespace folding) in place of tokenizer.json."""
    folder = tmp_path_factory.mktemp("spm") / "hf"
    shutil.copytree(tiny["hf"], folder)
    (folder / "tokenizer.json").unlink()
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT.splitlines()), model_writer=model, vocab_size=380, model_type="bpe",
        byte_fallback=True, character_coverage=0.98, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["<tool>"], remove_extra_whitespaces=False, normalization_rule_name="identity",
        minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))
    return folder


@pytest.fixture(scope="module")
def spm_gguf(spm_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spm_gguf") / "spm.gguf"
    convert_hf_to_gguf(spm_hf, out, "f32", progress=False)
    return out


def test_tokenizers_gguf_cannot_hold_are_refused(tiny, spm_hf, tmp_path):
    metaspace = hf_variant(tiny, tmp_path / "metaspace", PRE_TOKENIZERS["gpt2"][0], False)
    data = json.loads((metaspace / "tokenizer.json").read_text())
    data["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    (metaspace / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="only a byte-level BPE tokenizer.json"):
        convert_hf_to_gguf(metaspace, tmp_path / "a.gguf", progress=False)
    with pytest.raises(TokenizerError, match="SentencePiece vocabulary has no tokenizer.ggml.pre"):
        convert_hf_to_gguf(spm_hf, tmp_path / "b.gguf", pre="gpt2", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metaspace"]


def test_sentencepiece_vocabulary_in_gguf(spm_hf, spm_gguf):
    md = gguf_metadata(spm_gguf)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_hf / "tokenizer.model"))
    assert md["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in md
    tokens, types, scores = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"], md["tokenizer.ggml.scores"]
    assert len(tokens) == 384  # padded to the embedding rows
    assert tokens[:380] == [sp.id_to_piece(i) for i in range(380)]
    assert tokens[380:] == ["[PAD380]", "[PAD381]", "[PAD382]", "[PAD383]"]
    np.testing.assert_array_equal(scores[:380], np.array([sp.get_score(i) for i in range(380)], np.float32))
    assert list(types[:5]) == [2, 3, 3, 4, 6]  # <unk> UNKNOWN, <s> </s> CONTROL, <tool> USER_DEFINED, <0x00> BYTE
    assert set(types[5:260]) == {6} and set(types[260:380]) == {1} and set(types[380:]) == {5}
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"],
            md["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert md["tokenizer.ggml.add_bos_token"] is True and md["tokenizer.ggml.add_space_prefix"] is True


def test_sentencepiece_gguf_tokenizes_as_sentencepiece(spm_hf, spm_gguf):
    hf_tokenizer, gguf_tokenizer = tokenizer_from_hf(spm_hf), tokenizer_from_gguf(gguf_metadata(spm_gguf))
    for text in TEXTS:
        ids = gguf_tokenizer.encode(text)
        assert ids == hf_tokenizer.encode(text), text
        assert gguf_tokenizer.decode(ids[1:]) == hf_tokenizer.decode(ids[1:])


def test_exported_sentencepiece_tokenizer_json_equals_the_gguf_tokenizer(spm_gguf, tmp_path):
    out = tmp_path / "hf"
    convert_gguf_to_hf(spm_gguf, out, progress=False)
    exported, gguf_tokenizer = tokenizer_from_hf(out), tokenizer_from_gguf(gguf_metadata(spm_gguf))
    for text in TEXTS + ["<s>user <tool> call</s> done", "  <unk> leading spaces"]:
        ids = gguf_tokenizer.encode(text)
        assert exported.encode(text) == ids, text
        assert exported.encode(text, parse_special=False) == gguf_tokenizer.encode(text, parse_special=False), text
        assert exported.decode(ids) == gguf_tokenizer.decode(ids), text
    assert (exported.bos_id, exported.eos_id, exported.add_bos) == (1, 2, True)


# ------------------------------------------------------------------------------------------ transformers

def test_transformers_loads_the_exported_folder(tiny, spm_gguf, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    convert_gguf_to_hf(tiny["q8_0"], out, dtype="f32", progress=False)
    llm = engine.load(tiny["q8_0"])
    text = TEXTS[1]
    ids = llm.tokenize(text)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(theirs, llm.logits(ids), rtol=0, atol=1e-4)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert hf_tokenizer(text)["input_ids"] == llm.tokenize(text), text
    messages = [{"role": "user", "content": "Where is the lighthouse?"}]
    assert (hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == llm.tokenizer.apply_chat_template(messages))
    spm_out = tmp_path / "spm"
    convert_gguf_to_hf(spm_gguf, spm_out, progress=False)
    spm_tokenizer, gguf_tokenizer = (transformers.AutoTokenizer.from_pretrained(spm_out),
                                     tokenizer_from_gguf(gguf_metadata(spm_gguf)))
    for text in TEXTS:
        assert spm_tokenizer(text)["input_ids"] == gguf_tokenizer.encode(text), text
