"""The engine's one tokenizer type: encoding, decoding, streaming, chat templates.

A ``Tokenizer`` is assembled by the loaders (``gguf.py``, ``hf.py``) from
- an encoder: ``encode(text, parse_special) -> list[int]`` without BOS,
- a piece table: the bytes each id renders as (``pieces.py``),
- the ids that count as special (dropped by ``decode(skip_special=True)``),
- the special ids and settings read from the model.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from ..errors import TokenizerError
from .chat import render_chat
from .stream import StreamDecoder

# Token texts that end a turn or a document (llama.cpp's end-of-generation list plus a few).
END_OF_TURN_TEXTS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>",
    "</s>", "<end_of_turn>", "<EOT>", "<|EOT|>", "<｜end▁of▁sentence｜>",
)


class Encoder(Protocol):
    def encode(self, text: str, parse_special: bool) -> list[int]: ...


class SpecialTokenSplitter:
    """Cuts text at special-token texts: leftmost match, the longest one at that position (as the
    `tokenizers` library does; llama.cpp agrees unless two special texts overlap).

    ``control`` tokens are recognised only when parsing specials; ``always`` tokens (user-defined
    added tokens such as ``<think>``) are recognised in every mode, as in llama.cpp.
    """

    def __init__(self, control: Mapping[str, int], always: Mapping[str, int]):
        self._ids = {**control, **always}
        self._with_control = self._pattern(self._ids)
        self._without_control = self._pattern(always)

    @staticmethod
    def _pattern(texts: Iterable[str]) -> re.Pattern[str] | None:
        ordered = sorted((t for t in texts if t), key=len, reverse=True)
        return re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def split(self, text: str, parse_special: bool) -> list[str | int]:
        """Text fragments (str) and special-token ids (int), in order; no empty fragments."""
        pattern = self._with_control if parse_special else self._without_control
        if pattern is None:
            return [text] if text else []
        parts: list[str | int] = []
        start = 0
        for match in pattern.finditer(text):
            if match.start() > start:
                parts.append(text[start:match.start()])
            parts.append(self._ids[match.group()])
            start = match.end()
        if start < len(text):
            parts.append(text[start:])
        return parts


class FragmentEncoder:
    """Encoder that splits out special tokens, then encodes each text fragment on its own."""

    def __init__(self, splitter: SpecialTokenSplitter, encode_fragment: Callable[[str], list[int]]):
        self._splitter = splitter
        self._encode_fragment = encode_fragment

    def encode(self, text: str, parse_special: bool) -> list[int]:
        ids: list[int] = []
        for part in self._splitter.split(text, parse_special):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids.extend(self._encode_fragment(part))
        return ids


@dataclass(frozen=True)
class SpecialIds:
    bos_id: int | None
    eos_id: int | None
    extra_stop_ids: tuple[int, ...] = ()  # eot/eom ids named by the model


def find_stop_ids(token_to_id: Mapping[str, int], special: SpecialIds) -> frozenset[int]:
    """EOS, the model's end-of-turn ids, and every end-of-turn token text present in the vocab."""
    ids = {token_to_id[text] for text in END_OF_TURN_TEXTS if text in token_to_id}
    ids.update(i for i in (special.eos_id, *special.extra_stop_ids) if i is not None)
    return frozenset(ids)


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template.

    encode() adds BOS when ``add_bos`` says so and parses special-token texts by default;
    decode() is exact (``decode(encode(s)) == s`` for text without special-token texts, the
    SentencePiece word-start space of the first token being removed); stream() decodes
    incrementally without ever splitting a character.
    """

    def __init__(
        self,
        *,
        kind: str,
        encoder: Encoder,
        pieces: Sequence[bytes],
        special_ids: Iterable[int],
        special: SpecialIds,
        stop_ids: frozenset[int],
        add_bos: bool,
        chat_template: str | None,
        strip_leading_space: bool,
    ):
        self.kind = kind
        self.vocab_size = len(pieces)
        self.bos_id = special.bos_id
        self.eos_id = special.eos_id
        self.stop_ids = stop_ids
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._encoder = encoder
        self._pieces = list(pieces)
        self._special = frozenset(special_ids)
        self._strip_leading_space = strip_leading_space
        for name, value in (("bos", self.bos_id), ("eos", self.eos_id)):
            if value is not None and not 0 <= value < self.vocab_size:
                raise TokenizerError(f"{kind}: {name} token id {value} is outside the vocabulary of {self.vocab_size}")
        if self.add_bos and self.bos_id is None:
            raise TokenizerError(f"{kind}: the model asks for a BOS token but defines none")

    # -- encoding -------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: e.g. bytes that are not UTF-8 in a command-line argument
            raise TokenizerError(f"the text is not valid Unicode ({e.reason} at character {e.start}); "
                                 f"is it UTF-8?") from None
        ids = self._encoder.encode(text, parse_special)
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise TokenizerError(f"{self.kind}: BOS requested but the model has no BOS token")
            ids.insert(0, self.bos_id)
        return ids

    # -- decoding -------------------------------------------------------------------------
    def piece(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` renders as."""
        try:
            index = operator.index(token_id)
        except TypeError:
            raise TokenizerError(f"token id must be an integer, got {token_id!r}") from None
        if not 0 <= index < self.vocab_size:
            raise TokenizerError(f"token id {index} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._pieces[index]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        pieces = [self.piece(i) for i in ids if not (skip_special and i in self._special)]
        data = b"".join(pieces)
        if self._strip_leading_space and pieces and pieces[0].startswith(b" "):
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self.piece)

    # -- chat -----------------------------------------------------------------------------
    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self._pieces[token_id].decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render the conversation with the model's template (ChatML when it has none)."""
        return render_chat(
            self.chat_template, messages, add_generation_prompt,
            bos_token=self._token_text(self.bos_id), eos_token=self._token_text(self.eos_id),
        )

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"
