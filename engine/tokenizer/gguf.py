"""Tokenizers described by GGUF metadata (``tokenizer.ggml.*``), following llama.cpp.

- ``gpt2``: byte-level BPE from ``tokens`` + ``merges``, split first by the
  ``tokenizer.ggml.pre`` family's regexes (``pretokenize.py``);
- ``llama``: SentencePiece-style BPE from ``tokens`` + ``scores``: the highest-scoring adjacent
  pair whose concatenation is a token merges first, characters outside the vocabulary fall back
  to ``<0xXX>`` byte tokens, spaces are written ``▁`` and each text fragment gets a leading space
  when ``add_space_prefix`` (default True) -- also after a special token, as llama.cpp does.

The merge loops run in the `tokenizers` library (Rust): the vocabulary becomes a
``tokenizers.models.BPE``, as transformers' GGUF converter does. Special tokens (token type
CONTROL, and UNKNOWN) are cut out of the text first when ``parse_special``; USER_DEFINED tokens
always are.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, NamedTuple

import numpy as np
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, normalizers

from ..errors import TokenizerError
from .core import FragmentEncoder, SpecialIds, SpecialTokenSplitter, Tokenizer, find_stop_ids
from .pieces import SPM_SPACE, byte_level_alphabet, byte_level_piece, bytes_to_unicode, spm_piece
from .pretokenize import FAMILIES, byte_level_pre_tokenizer

# llama.cpp token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class _Built(NamedTuple):
    kind: str
    encoder: FragmentEncoder
    pieces: list[bytes]
    special_ids: list[int]
    default_add_bos: bool


class _Vocab:
    """Validated ``tokenizer.ggml.*`` arrays."""

    def __init__(self, md: Mapping[str, Any], source: str):
        self.source = source
        tokens = md.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise TokenizerError(f"{source}: missing metadata key 'tokenizer.ggml.tokens'")
        if isinstance(tokens, (str, bytes)) or not all(isinstance(t, str) for t in tokens):
            raise TokenizerError(f"{source}: 'tokenizer.ggml.tokens' must be an array of strings")
        if len(tokens) == 0:
            raise TokenizerError(f"{source}: 'tokenizer.ggml.tokens' is empty")
        self.tokens: list[str] = list(tokens)
        # llama.cpp renames empty tokens so that every text is unique
        self.keys = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(self.tokens)]
        self.token_to_id = {t: i for i, t in enumerate(self.keys)}
        if len(self.token_to_id) != len(self.keys):
            duplicate = next(t for t, count in Counter(self.keys).items() if count > 1)
            raise TokenizerError(f"{source}: token {duplicate!r} appears more than once in 'tokenizer.ggml.tokens'")
        self.types = self._array(md, "tokenizer.ggml.token_type", np.int64, default=NORMAL)
        self.scores = self._array(md, "tokenizer.ggml.scores", np.float64, default=None)

    def _array(self, md: Mapping[str, Any], key: str, dtype: type, default: Any) -> np.ndarray | None:
        value = md.get(key)
        if value is None:
            return None if default is None else np.full(len(self.tokens), default, dtype=dtype)
        try:
            array = np.asarray(value, dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise TokenizerError(f"{self.source}: {key!r} is not a numeric array") from exc
        if array.shape != (len(self.tokens),):
            raise TokenizerError(
                f"{self.source}: {key!r} has {array.size} entries for {len(self.tokens)} tokens"
            )
        return array

    def ids_of_type(self, *types: int) -> list[int]:
        return np.flatnonzero(np.isin(self.types, types)).tolist()

    def special_id(self, md: Mapping[str, Any], name: str, default: int | None) -> int | None:
        key = f"tokenizer.ggml.{name}_token_id"
        value = md.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < len(self.tokens):
            raise TokenizerError(
                f"{self.source}: {key} = {value!r} is not a token id (vocabulary of {len(self.tokens)})"
            )
        return int(value)

    def splitter(self) -> SpecialTokenSplitter:
        control = {self.tokens[i]: i for i in self.ids_of_type(CONTROL, UNKNOWN)}
        always = {self.tokens[i]: i for i in self.ids_of_type(USER_DEFINED)}
        return SpecialTokenSplitter(control=control, always=always)


def _flag(md: Mapping[str, Any], key: str, default: bool, source: str) -> bool:
    value = md.get(key, default)
    if not isinstance(value, (bool, np.bool_)):
        raise TokenizerError(f"{source}: {key} must be a boolean, got {value!r}")
    return bool(value)


def _split_merges(merges: Any, source: str) -> list[tuple[str, str]]:
    if isinstance(merges, (str, bytes)) or not all(isinstance(m, str) for m in merges):
        raise TokenizerError(f"{source}: 'tokenizer.ggml.merges' must be an array of strings")
    pairs = []
    for index, merge in enumerate(merges):
        cut = merge.find(" ", 1)  # as llama.cpp: the first space after the first character
        if cut < 0:
            raise TokenizerError(f"{source}: merge {index} ({merge!r}) is not two tokens separated by a space")
        pairs.append((merge[:cut], merge[cut + 1:]))
    return pairs


def _build_bpe(vocab: Mapping[str, int], merges: list[tuple[str, str]], source: str, **options: Any) -> RustTokenizer:
    try:
        return RustTokenizer(models.BPE(vocab=dict(vocab), merges=merges, **options))
    except Exception as exc:  # tokenizers reports bad merges as a plain Exception
        raise TokenizerError(f"{source}: cannot build the BPE vocabulary: {exc}") from exc


def _special_pieces(vocab: _Vocab, pieces: list[bytes]) -> list[int]:
    """Render special and user-defined tokens as their literal text; return the special ids."""
    for i in vocab.ids_of_type(CONTROL, USER_DEFINED, UNKNOWN):
        pieces[i] = vocab.tokens[i].encode("utf-8")
    return vocab.ids_of_type(CONTROL, UNKNOWN)


def _gpt2_tokenizer(md: Mapping[str, Any], vocab: _Vocab, source: str) -> _Built:
    pre = md.get("tokenizer.ggml.pre") or "default"
    family = FAMILIES.get(pre) if isinstance(pre, str) else None
    if family is None:
        raise TokenizerError(
            f"{source}: unknown BPE pre-tokenizer tokenizer.ggml.pre = {pre!r} "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        )
    merges = md.get("tokenizer.ggml.merges")
    if merges is None:
        raise TokenizerError(f"{source}: a gpt2 BPE vocabulary needs 'tokenizer.ggml.merges', which is missing")
    # Tokens are spelled in the byte alphabet; one that is not (a mislabelled special) is respelled.
    alphabet, spelling = byte_level_alphabet(), bytes_to_unicode()
    bpe_vocab: dict[str, int] = {}
    for i, key in enumerate(vocab.keys):
        spelled = key if set(key) <= alphabet else "".join(spelling[b] for b in key.encode("utf-8"))
        bpe_vocab.setdefault(spelled, i)
    backend = _build_bpe(bpe_vocab, _split_merges(merges, source), source, ignore_merges=family.ignore_merges)
    backend.pre_tokenizer = byte_level_pre_tokenizer(family)

    def encode_fragment(text: str) -> list[int]:
        return backend.encode(text, add_special_tokens=False).ids

    pieces = [byte_level_piece(t) for t in vocab.tokens]
    special_ids = _special_pieces(vocab, pieces)
    return _Built(f"gpt2 BPE (pre: {pre})", FragmentEncoder(vocab.splitter(), encode_fragment), pieces, special_ids,
                  family.add_bos)


def _merges_from_scores(vocab: _Vocab) -> list[tuple[str, str]]:
    """Every (left, right) token pair whose concatenation is a normal token, best score first.

    With these ranks BPE merges exactly as SentencePiece/llama.cpp do: always the adjacent pair
    that forms the highest-scoring token.
    """
    scores = vocab.scores
    candidates = []
    for merged_id in vocab.ids_of_type(NORMAL):
        merged = vocab.keys[merged_id]
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in vocab.token_to_id and right in vocab.token_to_id:
                candidates.append((-scores[merged_id], -len(left), -len(right), merged_id, left, right))
    candidates.sort(key=lambda c: c[:4])
    return [(left, right) for *_, left, right in candidates]


def _llama_tokenizer(md: Mapping[str, Any], vocab: _Vocab, source: str) -> _Built:
    if vocab.scores is None:
        raise TokenizerError(
            f"{source}: a llama (SentencePiece) vocabulary needs 'tokenizer.ggml.scores', which is missing"
        )
    unk_id = vocab.special_id(md, "unknown", 0)
    backend = _build_bpe(
        vocab.token_to_id, _merges_from_scores(vocab), source,
        unk_token=vocab.keys[unk_id], fuse_unk=True, byte_fallback=True,
    )
    backend.normalizer = normalizers.Replace(" ", SPM_SPACE)
    space_prefix = " " if _flag(md, "tokenizer.ggml.add_space_prefix", True, source) else ""

    def encode_fragment(text: str) -> list[int]:
        return backend.encode(space_prefix + text, add_special_tokens=False).ids

    pieces = [spm_piece(t) for t in vocab.tokens]
    special_ids = _special_pieces(vocab, pieces)
    return _Built("llama SPM", FragmentEncoder(vocab.splitter(), encode_fragment), pieces, special_ids, True)


def tokenizer_from_gguf(metadata: Mapping[str, Any], source: str = "GGUF file") -> Tokenizer:
    """The tokenizer a GGUF file's metadata describes (``tokenizer.ggml.model`` gpt2 or llama)."""
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        raise TokenizerError(f"{source}: missing metadata key 'tokenizer.ggml.model'")
    builders = {"gpt2": _gpt2_tokenizer, "llama": _llama_tokenizer}
    if not isinstance(model, str) or model not in builders:
        raise TokenizerError(
            f"{source}: unsupported tokenizer.ggml.model {model!r} (supported: {', '.join(builders)})"
        )
    vocab = _Vocab(metadata, source)
    built = builders[model](metadata, vocab, source)
    spm = model == "llama"
    special = SpecialIds(
        bos_id=vocab.special_id(metadata, "bos", 1 if spm else None),
        eos_id=vocab.special_id(metadata, "eos", 2 if spm else None),
        extra_stop_ids=tuple(
            i for i in (vocab.special_id(metadata, name, None) for name in ("eot", "eom")) if i is not None
        ),
    )
    template = metadata.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{source}: tokenizer.chat_template must be a string")
    return Tokenizer(
        kind=built.kind,
        encoder=built.encoder,
        pieces=built.pieces,
        special_ids=built.special_ids,
        special=special,
        stop_ids=find_stop_ids(vocab.token_to_id, special),
        add_bos=_flag(metadata, "tokenizer.ggml.add_bos_token", built.default_add_bos, source),
        chat_template=template,
        strip_leading_space=spm and _flag(metadata, "tokenizer.ggml.add_space_prefix", True, source),
    )
