"""What each token id renders as, in bytes.

Decoding (whole sequences and streams) is the concatenation of per-token byte strings, so the
only per-vocabulary work is building that table once:

- byte-level BPE (GPT-2 family): every byte is spelled as one printable character
  (``bytes_to_unicode``); a token's bytes are its characters mapped back;
- SentencePiece style: ``▁`` is a space and ``<0xXX>`` byte tokens are the raw byte;
- special and added tokens render as their literal text.
"""
from __future__ import annotations

import re
from functools import lru_cache

SPM_SPACE = "\u2581"  # "▁", SentencePiece's visible space
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the same table as openai/gpt-2)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    chars = printable[:]
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + shift)
            shift += 1
    return {byte: chr(code) for byte, code in zip(printable, chars)}


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {char: byte for byte, char in bytes_to_unicode().items()}


def byte_level_alphabet() -> frozenset[str]:
    return frozenset(unicode_to_bytes())


def byte_level_piece(token: str) -> bytes:
    """Bytes of a byte-level BPE token; a character outside the byte alphabet stands for itself
    (UTF-8), as the `tokenizers` ByteLevel decoder does."""
    table = unicode_to_bytes()
    return b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for c in token)


def spm_piece(token: str) -> bytes:
    """Bytes of a SentencePiece-style token: ``<0xXX>`` is one raw byte, ``▁`` is a space."""
    byte = _BYTE_TOKEN.fullmatch(token)
    if byte:
        return bytes([int(byte.group(1), 16)])
    return token.replace(SPM_SPACE, " ").encode("utf-8")
