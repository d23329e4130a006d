"""Incremental detokenization that never emits half a character.

Tokens are byte strings; a UTF-8 character may be split across tokens (byte-fallback tokens,
byte-level BPE pieces of an emoji or a CJK character). The decoder keeps the bytes of an
unfinished character back until it completes, so every string it returns is whole text and the
concatenation of all pushes plus ``flush()`` equals decoding all the bytes at once.
"""
from __future__ import annotations

from typing import Callable


def incomplete_tail_length(data: bytes | bytearray) -> int:
    """How many bytes at the end of ``data`` start a UTF-8 sequence that is not finished yet.

    Only a lead byte among the last three bytes can still be waiting for continuation bytes;
    anything else (ASCII, a complete sequence, or invalid bytes) can be decoded now.
    """
    n = len(data)
    for back in range(1, min(3, n) + 1):
        byte = data[n - back]
        if byte & 0xC0 == 0x80:  # continuation byte: look further back for its lead byte
            continue
        if byte >= 0xF0:
            needed = 4 if byte <= 0xF4 else 1
        elif byte >= 0xE0:
            needed = 3
        elif byte >= 0xC2:
            needed = 2
        else:  # ASCII or a byte that can never lead a sequence
            needed = 1
        return back if back < needed else 0
    return 0


class StreamDecoder:
    """Turns token ids, one at a time, into text made only of complete characters.

    ``push(id)`` returns the text that became complete with this token (possibly "");
    ``flush()`` returns what is left, with U+FFFD for bytes that never formed a character.
    A stream continues text that came before it, so a SentencePiece word-start space of the
    first token is kept (unlike ``Tokenizer.decode`` of a whole text).
    """

    def __init__(self, piece_of: Callable[[int], bytes]):
        self._piece_of = piece_of
        self._pending = bytearray()

    def push(self, token_id: int) -> str:
        self._pending += self._piece_of(token_id)
        keep = incomplete_tail_length(self._pending)
        ready = len(self._pending) - keep
        if ready == 0:
            return ""
        text = self._pending[:ready].decode("utf-8", errors="replace")
        del self._pending[:ready]
        return text

    def flush(self) -> str:
        text = self._pending.decode("utf-8", errors="replace")
        self._pending.clear()
        return text
