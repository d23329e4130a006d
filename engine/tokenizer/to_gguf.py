"""An HF model folder's tokenizer as GGUF vocabulary arrays (``tokenizer.ggml.*``), as llama.cpp's
convert_hf_to_gguf.py writes them.

- byte-level BPE ``tokenizer.json`` -> ``gpt2``: tokens by id, token types (added special tokens
  CONTROL, other added tokens USER_DEFINED), merges as "a b", and ``tokenizer.ggml.pre``;
- SentencePiece ``tokenizer.model`` -> ``llama``: pieces, scores, token types, add_space_prefix.

``tokenizer.ggml.pre`` is found by behaviour, as llama.cpp does with its hash of a test text: the
folder's own pre-tokenizer splits PROBE_TEXT and the first family of ``pretokenize.FAMILIES`` that
splits it identically (and agrees on ``ignore_merges``) is written. SmolLM2's
Digits+ByteLevel thus comes out "smollm", plain ByteLevel "gpt2", Llama 3's regex "llama-bpe".
Ids past the tokenizer's vocabulary up to the model's embedding rows become "[PAD<i>]" tokens
of type UNUSED, as llama.cpp pads them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import sentencepiece
from tokenizers import Tokenizer as RustTokenizer

from ..errors import TokenizerError
from .core import Tokenizer
from .gguf import CONTROL, NORMAL, UNUSED, USER_DEFINED
from .hf import tokenizer_from_hf
from .pieces import SPM_SPACE
from .pretokenize import FAMILIES, byte_level_pre_tokenizer

# Family names tried in order; each is the name llama.cpp knows that family by.
PRE_CANDIDATES = ("gpt2", "smollm", "llama-bpe", "dbrx", "qwen2", "default", "falcon", "deepseek-llm",
                  "deepseek-coder")
# llama.cpp's pre-tokenizer check text (convert_hf_to_gguf_update.py) plus non-ASCII numbers.
PROBE_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL ½ ٤٢ Ⅻ x²"
)
SPM_PAD_SCORE = -1000.0


@dataclass
class GGUFVocab:
    model: str  # tokenizer.ggml.model: "gpt2" | "llama"
    tokens: list[str]
    token_types: list[int]
    merges: list[str] | None  # gpt2
    pre: str | None  # gpt2
    scores: list[float] | None  # llama
    add_space_prefix: bool | None  # llama
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    chat_template: str | None
    warnings: list[str] = field(default_factory=list)  # what GGUF cannot express, for the user


def gguf_vocab_from_hf(folder: str | Path, n_embeddings: int, pre: str | None = None,
                       engine_tokenizer: Tokenizer | None = None) -> GGUFVocab:
    """The GGUF vocabulary of an HF folder whose embedding has ``n_embeddings`` rows.

    pre: tokenizer.ggml.pre to write instead of detecting it (byte-level BPE only).
    engine_tokenizer: the folder's tokenizer as the engine reads it (bos/eos, add_bos, chat template),
    if already built.
    """
    folder = Path(folder)
    engine_tokenizer = engine_tokenizer or tokenizer_from_hf(folder)
    json_path, model_path = folder / "tokenizer.json", folder / "tokenizer.model"
    backend = _load_json(json_path) if json_path.is_file() else None
    if backend is not None and _is_byte_level_bpe(backend):
        vocab = _bpe_vocab(backend, json_path, pre)
    elif model_path.is_file():
        if pre is not None:
            raise TokenizerError(f"{model_path}: a SentencePiece vocabulary has no tokenizer.ggml.pre to choose")
        vocab = _spm_vocab(model_path)
    else:
        raise TokenizerError(
            f"{json_path}: only a byte-level BPE tokenizer.json (or a SentencePiece tokenizer.model, absent "
            f"here) can be stored in GGUF"
        )
    _pad_to(vocab, n_embeddings, folder)
    names = _special_token_names(folder)
    token_to_id = {t: i for i, t in enumerate(vocab.tokens)}
    vocab.bos_id, vocab.eos_id = engine_tokenizer.bos_id, engine_tokenizer.eos_id
    vocab.unk_id = token_to_id.get(names["unk"], vocab.unk_id)
    vocab.pad_id = token_to_id.get(names["pad"], vocab.pad_id)
    vocab.add_bos = engine_tokenizer.add_bos
    vocab.chat_template = engine_tokenizer.chat_template
    return vocab


def detect_pre(backend: RustTokenizer, ignore_merges: bool, source: Path) -> str:
    """The tokenizer.ggml.pre family whose splits of PROBE_TEXT equal the tokenizer's own."""
    if backend.pre_tokenizer is None:
        raise TokenizerError(f"{source}: the tokenizer has no pre-tokenizer; pass --pre NAME to choose one")
    expected = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(PROBE_TEXT)]
    for name in PRE_CANDIDATES:
        family = FAMILIES[name]
        if family.ignore_merges != ignore_merges:
            continue
        if [piece for piece, _ in byte_level_pre_tokenizer(family).pre_tokenize_str(PROBE_TEXT)] == expected:
            return name
    described = json.loads(backend.pre_tokenizer.__getstate__())
    raise TokenizerError(
        f"{source}: pre-tokenizer {json.dumps(described)[:200]} matches none of the known tokenizer.ggml.pre "
        f"families ({', '.join(PRE_CANDIDATES)}); pass --pre NAME to choose one"
    )


def _load_json(path: Path) -> RustTokenizer:
    try:
        return RustTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a plain Exception for malformed files
        raise TokenizerError(f"{path}: cannot load: {exc}") from exc


def _is_byte_level_bpe(backend: RustTokenizer) -> bool:
    model = json.loads(backend.model.__getstate__())
    decoder = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}
    return model.get("type") == "BPE" and decoder.get("type") == "ByteLevel"


def _bpe_vocab(backend: RustTokenizer, path: Path, pre: str | None) -> GGUFVocab:
    model = json.loads(backend.model.__getstate__())
    ignore_merges = bool(model.get("ignore_merges", False))
    if pre is None:
        pre = detect_pre(backend, ignore_merges, path)
    elif pre not in FAMILIES:
        raise TokenizerError(f"unknown tokenizer.ggml.pre {pre!r} (known: {', '.join(sorted(FAMILIES))})")
    warnings = []
    if backend.normalizer is not None:
        kind = json.loads(backend.normalizer.__getstate__()).get("type")
        warnings.append(f"{path}: the {kind} normalizer is not stored in GGUF (llama.cpp does not apply one)")
    id_of = backend.get_vocab(with_added_tokens=True)
    added = backend.get_added_tokens_decoder()
    tokens, types = _by_id(id_of)
    for i, token in added.items():
        types[i] = CONTROL if token.special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return GGUFVocab(model="gpt2", tokens=tokens, token_types=types, merges=merges, pre=pre, scores=None,
                     add_space_prefix=None, bos_id=None, eos_id=None, unk_id=None, pad_id=None, add_bos=False,
                     chat_template=None, warnings=warnings)


def _by_id(id_of: dict[str, int]) -> tuple[list[str], list[int]]:
    """Tokens and NORMAL types by id; ids no token uses become UNUSED "[PAD<i>]" tokens."""
    n = max(id_of.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for token, i in id_of.items():
        tokens[i], types[i] = token, NORMAL
    return tokens, types


def _spm_vocab(path: Path) -> GGUFVocab:
    try:
        data = path.read_bytes()
        sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    except (OSError, RuntimeError) as exc:
        raise TokenizerError(f"{path}: cannot load SentencePiece model: {exc}") from exc
    n = sp.get_piece_size()
    types = _spm_piece_types(data)  # sentencepiece's Python API does not tell user-defined pieces apart
    if len(types) != n:
        raise TokenizerError(f"{path}: found {len(types)} pieces in the model, sentencepiece reports {n}")
    return GGUFVocab(
        model="llama", tokens=[sp.id_to_piece(i) for i in range(n)], token_types=types, merges=None, pre=None,
        scores=[float(sp.get_score(i)) for i in range(n)],
        add_space_prefix="".join(sp.encode("a", out_type=str)).startswith(SPM_SPACE),
        bos_id=None, eos_id=None, unk_id=sp.unk_id() if sp.unk_id() >= 0 else None,
        pad_id=sp.pad_id() if sp.pad_id() >= 0 else None, add_bos=True, chat_template=None,
    )


def _spm_piece_types(model_proto: bytes) -> list[int]:
    """The type of each piece of a SentencePiece ModelProto: field 1 is the repeated message
    SentencePiece {1: piece, 2: score, 3: type (NORMAL=1 when absent)}. The type numbers are
    GGUF's token types."""
    types = []
    for field_number, value in _proto_fields(model_proto):
        if field_number == 1:
            kind = NORMAL
            for sub_field, sub_value in _proto_fields(value):
                if sub_field == 3:
                    kind = sub_value
            types.append(kind)
    return types


def _proto_fields(data: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of a protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        wire_type = key & 7
        if wire_type == 0:
            value, pos = _varint(data, pos)
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire_type in (1, 5):  # fixed 64 / 32 bits
            size = 8 if wire_type == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        else:
            raise TokenizerError(f"SentencePiece model has an unsupported protobuf wire type {wire_type}")
        yield key >> 3, value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise TokenizerError("SentencePiece model is truncated")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _pad_to(vocab: GGUFVocab, n_embeddings: int, folder: Path) -> None:
    n = len(vocab.tokens)
    if n > n_embeddings:
        raise TokenizerError(f"{folder}: the tokenizer has {n} tokens but the model's embedding has only "
                             f"{n_embeddings} rows")
    vocab.tokens += [f"[PAD{i}]" for i in range(n, n_embeddings)]
    vocab.token_types += [UNUSED] * (n_embeddings - n)
    if vocab.scores is not None:
        vocab.scores += [SPM_PAD_SCORE] * (n_embeddings - n)


def _special_token_names(folder: Path) -> dict[str, str | None]:
    """unk/pad token texts from tokenizer_config.json, else special_tokens_map.json."""
    names: dict[str, str | None] = {"unk": None, "pad": None}
    for filename in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        path = folder / filename
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise TokenizerError(f"{path}: cannot read JSON: {exc}") from exc
        for role in names:
            value = config.get(f"{role}_token")
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names[role] = value
    return names
