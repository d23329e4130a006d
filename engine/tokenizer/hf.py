"""Tokenizers stored beside HF safetensors: ``tokenizer.json`` or ``tokenizer.model``.

- ``tokenizer.json`` is run by the `tokenizers` library itself (its own normalizer,
  pre-tokenizer and added tokens); decoding uses a per-token byte table derived from its
  decoder (ByteLevel, or SentencePiece-style ``▁`` + byte fallback).
- ``tokenizer.model`` is run by `sentencepiece`; its control pieces (``<s>``, ``</s>``) are cut
  out of the text first when parsing specials, and each text fragment is encoded on its own
  (so it gets SentencePiece's word-start space, as llama.cpp does after a special token).

``tokenizer_config.json`` supplies the chat template (or ``chat_template.jinja``), the BOS/EOS
tokens and ``add_bos_token``; ``special_tokens_map.json`` the BOS/EOS tokens when the config
does not; ``generation_config.json`` extra end-of-generation ids.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import sentencepiece
from tokenizers import Tokenizer as RustTokenizer

from ..errors import TokenizerError
from .core import Encoder, FragmentEncoder, SpecialIds, SpecialTokenSplitter, Tokenizer, find_stop_ids
from .pieces import SPM_SPACE, byte_level_piece, spm_piece


class _Loaded(NamedTuple):
    kind: str
    encoder: Encoder
    pieces: list[bytes]
    special_ids: list[int]
    token_to_id: dict[str, int]
    default_bos_eos: dict[str, int | None]  # ids used when the config names no bos/eos token
    prefix_ids: list[int] | None  # what the post-processor puts before a text (None: SentencePiece, adds BOS)
    strip_leading_space: bool


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read JSON: {exc}") from exc


def _token_name(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, config: dict) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string")
    return template


def _generation_stop_ids(folder: Path) -> tuple[int, ...]:
    config = _read_json(folder / "generation_config.json") or {}
    eos = config.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    return tuple(i for i in ids if isinstance(i, int) and not isinstance(i, bool))


class _TokenizersEncoder:
    """``tokenizers`` encode; with specials not parsed, a clone that treats them as text."""

    def __init__(self, backend: RustTokenizer):
        self._backend = backend
        self._literal: RustTokenizer | None = None

    def encode(self, text: str, parse_special: bool) -> list[int]:
        if not parse_special and self._literal is None:
            self._literal = RustTokenizer.from_str(self._backend.to_str())
            self._literal.encode_special_tokens = True
        backend = self._backend if parse_special else self._literal
        return backend.encode(text, add_special_tokens=False).ids


def _decoder_types(decoder: Any) -> Iterator[dict]:
    if isinstance(decoder, dict):
        yield decoder
        for child in decoder.get("decoders") or ():
            yield from _decoder_types(child)


def _piece_style(backend: RustTokenizer, path: Path) -> tuple[Any, bool]:
    """(token -> bytes function, strip a leading space) for the tokenizer's decoder."""
    decoder = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else None
    decoders = list(_decoder_types(decoder))
    types = {d.get("type") for d in decoders}
    if "ByteLevel" in types:
        return byte_level_piece, False
    if types & {"Metaspace", "ByteFallback", "Replace"}:
        strips = any(d.get("type") == "Strip" and d.get("start", 0) >= 1 for d in decoders)
        prepends = any(d.get("type") == "Metaspace" and d.get("prepend_scheme", "always") != "never" for d in decoders)
        return spm_piece, strips or prepends
    raise TokenizerError(f"{path}: unsupported decoder {sorted(t for t in types if t) or None} "
                         "(supported: ByteLevel, SentencePiece-style Metaspace/ByteFallback)")


def _tokenizer_json(path: Path) -> _Loaded:
    try:
        backend = RustTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a plain Exception for malformed files
        raise TokenizerError(f"{path}: cannot load: {exc}") from exc
    piece_of, strip = _piece_style(backend, path)
    added = backend.get_added_tokens_decoder()
    pieces = []
    for i in range(backend.get_vocab_size(with_added_tokens=True)):
        token = added[i].content if i in added else backend.id_to_token(i)
        pieces.append(b"" if token is None else token.encode("utf-8") if i in added else piece_of(token))
    model_type = json.loads(backend.model.__getstate__()).get("type", "?")
    return _Loaded(
        kind=f"HF tokenizer.json ({model_type})", encoder=_TokenizersEncoder(backend), pieces=pieces,
        special_ids=[i for i, token in added.items() if token.special],
        token_to_id=backend.get_vocab(with_added_tokens=True),
        default_bos_eos={"bos": None, "eos": None},
        prefix_ids=backend.encode("", add_special_tokens=True).ids,
        strip_leading_space=strip,
    )


def _sentencepiece_model(path: Path) -> _Loaded:
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise TokenizerError(f"{path}: cannot load SentencePiece model: {exc}") from exc
    texts = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    special_ids = [i for i in range(len(texts)) if sp.is_control(i) or sp.is_unknown(i)]
    pieces = [
        sp.decode([i]).encode("utf-8") if sp.is_unknown(i)  # SentencePiece's " ⁇ "
        else text.encode("utf-8") if sp.is_control(i)
        else spm_piece(text)
        for i, text in enumerate(texts)
    ]
    splitter = SpecialTokenSplitter(control={texts[i]: i for i in special_ids}, always={})
    return _Loaded(
        kind="SentencePiece tokenizer.model", encoder=FragmentEncoder(splitter, sp.encode), pieces=pieces,
        special_ids=special_ids, token_to_id={text: i for i, text in enumerate(texts)},
        default_bos_eos={"bos": sp.bos_id() if sp.bos_id() >= 0 else None,
                         "eos": sp.eos_id() if sp.eos_id() >= 0 else None},
        prefix_ids=None,
        strip_leading_space="".join(sp.encode("a", out_type=str)).startswith(SPM_SPACE),
    )


def tokenizer_from_hf(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer of an HF model folder: tokenizer.json if present, else tokenizer.model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError(f"{folder}: not a directory")
    config = _read_json(folder / "tokenizer_config.json") or {}
    special_map = _read_json(folder / "special_tokens_map.json") or {}
    names = {role: _token_name(config.get(f"{role}_token")) or _token_name(special_map.get(f"{role}_token"))
             for role in ("bos", "eos")}
    if (folder / "tokenizer.json").is_file():
        loaded = _tokenizer_json(folder / "tokenizer.json")
    elif (folder / "tokenizer.model").is_file():
        loaded = _sentencepiece_model(folder / "tokenizer.model")
    else:
        raise TokenizerError(f"{folder}: no tokenizer.json or tokenizer.model")
    ids = {}
    for role, name in names.items():
        ids[role] = loaded.token_to_id.get(name) if name else loaded.default_bos_eos[role]
        if name and ids[role] is None:
            raise TokenizerError(f"{folder}: {role}_token {name!r} is not in the vocabulary")
    special = SpecialIds(bos_id=ids["bos"], eos_id=ids["eos"], extra_stop_ids=_generation_stop_ids(folder))
    post_processor_adds_bos = loaded.prefix_ids is None or loaded.prefix_ids[:1] == [ids["bos"]]
    add_bos = config.get("add_bos_token", post_processor_adds_bos)
    if not isinstance(add_bos, bool):
        raise TokenizerError(f"{folder / 'tokenizer_config.json'}: add_bos_token must be true or false")
    return Tokenizer(
        kind=loaded.kind,
        encoder=loaded.encoder,
        pieces=loaded.pieces,
        special_ids=loaded.special_ids,
        special=special,
        stop_ids=find_stop_ids(loaded.token_to_id, special),
        add_bos=add_bos and special.bos_id is not None,
        chat_template=_chat_template(folder, config),
        strip_leading_space=loaded.strip_leading_space,
    )
