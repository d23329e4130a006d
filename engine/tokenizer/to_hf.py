"""A GGUF vocabulary (``tokenizer.ggml.*``) as HF tokenizer files: tokenizer.json + tokenizer_config.json.

The tokenizer.json runs, in the `tokenizers` library, the same tokenization as the engine's GGUF
tokenizer (``gguf.py``):
- gpt2: BPE over the byte-level vocabulary with the ``tokenizer.ggml.pre`` family's splits
  (``pretokenize.py``), ByteLevel decoding;
- llama (SentencePiece): BPE whose merge ranks come from the scores, byte fallback, spaces
  written "▁" with one prepended to each text fragment when ``add_space_prefix``, and the
  matching decoder (which strips that space again).
CONTROL and UNKNOWN tokens become special added tokens, USER_DEFINED ones plain added tokens (both
matched in the text before the model runs, as llama.cpp does), each keeping its GGUF id. BOS is
put in front by the post-processor when the model asks for it.
"""
from __future__ import annotations

from typing import Any, Mapping

from tokenizers import AddedToken, decoders, normalizers, processors
from tokenizers import Tokenizer as RustTokenizer

from ..errors import TokenizerError
from .gguf import (CONTROL, UNKNOWN, USER_DEFINED, _build_bpe, _flag, _merges_from_scores, _split_merges,
                   _Vocab)
from .pieces import SPM_SPACE, byte_level_alphabet, bytes_to_unicode
from .pretokenize import FAMILIES, byte_level_pre_tokenizer


def hf_tokenizer_from_gguf(metadata: Mapping[str, Any], source: str = "GGUF file") -> tuple[RustTokenizer, dict]:
    """(tokenizer.json as a `tokenizers.Tokenizer`, tokenizer_config.json contents) of a GGUF vocabulary."""
    model = metadata.get("tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise TokenizerError(f"{source}: cannot export tokenizer.ggml.model {model!r} to HF (supported: gpt2, llama)")
    vocab = _Vocab(metadata, source)
    spm = model == "llama"
    if spm:
        tokenizer, default_add_bos = _spm_tokenizer(metadata, vocab, source), True
    else:
        tokenizer, default_add_bos = _bpe_tokenizer(metadata, vocab, source)
    _add_tokens(tokenizer, vocab, source)
    bos = vocab.special_id(metadata, "bos", 1 if spm else None)
    eos = vocab.special_id(metadata, "eos", 2 if spm else None)
    add_bos = _flag(metadata, "tokenizer.ggml.add_bos_token", default_add_bos, source) and bos is not None
    if add_bos:
        bos_text = vocab.tokens[bos]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_text} $A", pair=f"{bos_text} $A {bos_text} $B", special_tokens=[(bos_text, bos)])
    template = metadata.get("tokenizer.chat_template")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **{f"{role}_token": vocab.tokens[i] for role, i in (
            ("bos", bos), ("eos", eos), ("unk", vocab.special_id(metadata, "unknown", None)),
            ("pad", vocab.special_id(metadata, "padding", None))) if i is not None},
        **({"chat_template": template} if isinstance(template, str) else {}),
    }
    return tokenizer, config


def _bpe_tokenizer(md: Mapping[str, Any], vocab: _Vocab, source: str) -> tuple[RustTokenizer, bool]:
    pre = md.get("tokenizer.ggml.pre") or "default"
    family = FAMILIES.get(pre) if isinstance(pre, str) else None
    if family is None:
        raise TokenizerError(f"{source}: unknown BPE pre-tokenizer tokenizer.ggml.pre = {pre!r} "
                             f"(supported: {', '.join(sorted(FAMILIES))})")
    merges = md.get("tokenizer.ggml.merges")
    if merges is None:
        raise TokenizerError(f"{source}: a gpt2 BPE vocabulary needs 'tokenizer.ggml.merges', which is missing")
    # As the engine does: a normal token spelled outside the byte alphabet is respelled in it. Added
    # tokens keep their text, which is what the added-token matcher looks for.
    alphabet, spelling = byte_level_alphabet(), bytes_to_unicode()
    added = set(vocab.ids_of_type(CONTROL, UNKNOWN, USER_DEFINED))
    bpe_vocab = {}
    for i, key in enumerate(vocab.keys):
        respell = i not in added and not set(key) <= alphabet
        bpe_vocab.setdefault("".join(spelling[b] for b in key.encode("utf-8")) if respell else key, i)
    if len(bpe_vocab) != len(vocab.keys):
        raise TokenizerError(f"{source}: two tokens have the same byte-level spelling; cannot export the vocabulary")
    tokenizer = _build_bpe(bpe_vocab, _split_merges(merges, source), source, ignore_merges=family.ignore_merges)
    tokenizer.pre_tokenizer = byte_level_pre_tokenizer(family)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, family.add_bos


def _spm_tokenizer(md: Mapping[str, Any], vocab: _Vocab, source: str) -> RustTokenizer:
    if vocab.scores is None:
        raise TokenizerError(f"{source}: a llama (SentencePiece) vocabulary needs 'tokenizer.ggml.scores', "
                             f"which is missing")
    unk_id = vocab.special_id(md, "unknown", 0)
    tokenizer = _build_bpe(vocab.token_to_id, _merges_from_scores(vocab), source,
                           unk_token=vocab.keys[unk_id], fuse_unk=True, byte_fallback=True)
    space_prefix = _flag(md, "tokenizer.ggml.add_space_prefix", True, source)
    to_spm_spaces = normalizers.Replace(" ", SPM_SPACE)
    tokenizer.normalizer = (normalizers.Sequence([normalizers.Prepend(SPM_SPACE), to_spm_spaces])
                            if space_prefix else to_spm_spaces)
    steps = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if space_prefix else steps)
    return tokenizer


def _add_tokens(tokenizer: RustTokenizer, vocab: _Vocab, source: str) -> None:
    """Special (CONTROL, UNKNOWN) and user-defined tokens as added tokens with their GGUF ids."""
    special = vocab.ids_of_type(CONTROL, UNKNOWN)
    user = vocab.ids_of_type(USER_DEFINED)
    tokenizer.add_special_tokens([AddedToken(vocab.keys[i], special=True, normalized=False) for i in special])
    tokenizer.add_tokens([AddedToken(vocab.keys[i], special=False, normalized=False) for i in user])
    for i in special + user:
        if tokenizer.token_to_id(vocab.keys[i]) != i:
            raise TokenizerError(f"{source}: token {vocab.keys[i]!r} (id {i}) cannot keep its id in tokenizer.json")
