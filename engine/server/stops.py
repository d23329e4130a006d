"""Stop strings over streamed text: text is let through as soon as it can no longer begin a stop string.

    matcher = StopMatcher(["\\n\\n", "END"])
    text, stopped = matcher.push(piece)   # text safe to send; stopped: a stop string was found (text ends before it)
    rest = matcher.flush()                # at the end of generation: what was held back
"""
from __future__ import annotations

from typing import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._held = ""  # text that may be the start of a stop string

    def push(self, piece: str) -> tuple[str, bool]:
        text = self._held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self._held = ""
            return text[:min(found)], True
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        text, self._held = self._held, ""
        return text
