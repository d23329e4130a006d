"""Sessions: one sequence kept in a KV cache across calls, so a prompt that shares a prefix with the
previous sequence prefills only what is new (llama.cpp's ``cache_prompt``).

    session = llm.session(system="You are terse.")
    for piece in session.generate(document + "Question 1?"): ...
    for piece in session.generate(document + "Question 2?"): ...   # the document is not read again
    session.last_stats.cached_tokens                                # prompt tokens reused
    for piece in session.chat("Hello"): ...                         # multi-turn chat through the template
    session.save("doc.session"); session.load("doc.session")        # engine/prompt_cache.py

Invariant: ``tokens`` are the ids whose keys/values the cache holds, in order (len(tokens) ==
cache.length). A key is cached rotated at its own (DCA) key position, so the cache truncated to a
common prefix is exactly what a fresh prefill of that prefix builds: reuse = truncate + prefill the
rest. The prompt's last token is always prefilled again (its logits start the generation). When
generation stops early (a stop string, a closed stream, Ctrl-C), ``tokens`` still follow the cache.

A session uses one of the LLM's caches (``llm.session(slot=i)``; the default, slot 0, is the cache of
``llm.logits``, ``llm.generate``, ...): any other use of it (those calls, another session on the same slot)
takes it over, and the session then starts again from an empty sequence.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .api import GenerationStats
from .sampling import SamplingParams


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens a and b share from the start: list comparisons (at C speed: a 32k-token history costs well
    under a millisecond, where a Python loop took one), bisecting for the first difference."""
    n = min(len(a), len(b))
    a, b = list(a[:n]), list(b[:n])
    if a == b:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class Session:
    def __init__(self, llm: Any, system: str | None = None, cache: Any = None):
        self.llm = llm
        self.cache = llm.cache if cache is None else cache
        self.system = system
        self.tokens: list[int] = []  # the ids held by the cache, in order
        self.messages: list[dict[str, str]] = self._first_messages()  # the chat so far (chat())
        self.last_stats = None  # GenerationStats of the latest generation

    # ------------------------------------------------------------------------------------ tokens
    def generate_ids(self, prompt_ids: Sequence[int], max_tokens: int = 128,
                     sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] | None = None,
                     progress: Callable[[int, int], None] | None = None, decoders=None) -> Iterator[int]:
        """Stream generated ids after prompt_ids, reusing the cached common prefix (see LLM.generate_on, which
        also says what progress and decoders are)."""
        checked = self.llm._check_ids(prompt_ids)  # refuse bad input before touching the cache
        prompt = checked.tolist()
        self._claim()
        reused = min(common_prefix_length(self.tokens, prompt), len(prompt) - 1)
        self.cache.truncate(reused)
        self.tokens = prompt[:reused]
        generated: list[int] = []
        self.last_stats = stats = GenerationStats()  # this session's own, whatever other sessions run meanwhile
        try:
            for token in self.llm.generate_on(self.cache, checked, max_tokens, sampling, stop_ids, progress, stats,
                                              decoders):  # the checked array: not converted again
                generated.append(token)
                yield token
        finally:
            self.tokens = (prompt + generated)[:self.cache.length]

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 128, chat: bool = False,
                 system: str | None = None, **sampling: Any) -> Iterator[str]:
        """LLM.generate on this session: text pieces; sampling: SamplingParams fields (temperature, seed, ...)."""
        ids = self.llm.prompt_ids(prompt, chat=chat, system=system)
        yield from self.llm.text_stream(self.generate_ids(ids, max_tokens, SamplingParams(**sampling)))

    # -------------------------------------------------------------------------------------- chat
    def chat(self, message: str, max_tokens: int = 1024, **sampling: Any) -> Iterator[str]:
        """Answer a user message, given the chat so far; the answer, as far as it got, joins the chat (a message
        refused or stopped before any answer, a prompt beyond the context for one, leaves the chat as it was)."""
        params = SamplingParams(**sampling)
        self.messages.append({"role": "user", "content": message})
        answer: list[str] = []
        finished = False
        try:
            tokens = self.generate_ids(self.llm.chat_ids(self.messages), max_tokens, params)
            for piece in self.llm.text_stream(tokens):
                answer.append(piece)
                yield piece
            finished = True
        finally:
            if finished or answer:
                self.messages.append({"role": "assistant", "content": "".join(answer)})
            else:
                self.messages.pop()

    def clear(self) -> None:
        """Forget the sequence and the chat (the system message stays)."""
        self.messages = self._first_messages()
        self.tokens = []
        if self.cache.owner is self:
            self.cache.truncate(0)

    # ---------------------------------------------------------------------------------- on disk
    def save(self, path: str | Path) -> None:
        """Write tokens, keys/values and the chat to a session file (engine/prompt_cache.py)."""
        from .prompt_cache import save_session

        self._claim()
        save_session(self, Path(path))

    def load(self, path: str | Path) -> None:
        """Replace the sequence and chat by a session file's; refused unless the model and settings match."""
        from .prompt_cache import load_session

        self._claim()
        load_session(self, Path(path))

    # ---------------------------------------------------------------------------------- helpers
    def _claim(self) -> None:
        """Make the cache hold this session's tokens: when something else used it, start from empty."""
        if self.cache.owner is not self:
            self.cache.reset()
            self.cache.owner = self
            self.tokens = []

    def _first_messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system else []
